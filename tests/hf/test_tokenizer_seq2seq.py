"""T5 and BART tokenizers from tokenizer.json against the ``tokenizers`` library.

T5 (and T5 v1.1): a SentencePiece Unigram model behind a precompiled character map, Metaspace
pieces after a whitespace split, ``$A </s>`` / ``$A </s> $B </s>`` templates, and the hundred
sentinel tokens ``<extra_id_0>`` ... ``<extra_id_99>`` as special added tokens. BART: a
byte-level BPE with RoBERTa's ``<s> A </s></s> B </s>`` processing and a ``<mask>`` that takes the
space before it (``lstrip``). Each pipeline is trained here (UnigramTrainer, BpeTrainer), saved as
tokenizer.json and read by both libraries: ids, token types and decoded text must be identical.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tokenizers")
pytest.importorskip("regex")
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, processors

from npformer.hf.tokenizer import HFTokenizer
from tests.hf.test_tokenizer import _byte_level_bpe
from tests.hf.test_tokenizer_encoders import ASSIGNED, CHARSMAP, TEXTS, WEIGHTED, _unigram, build_charsmap, check_same

SENTINELS = [f"<extra_id_{i}>" for i in range(100)]
SPAN_TEXTS = ["The <extra_id_0> walks in <extra_id_1> park", "<extra_id_0> cute dog <extra_id_1> the <extra_id_2>",
              "no space<extra_id_7>between<extra_id_99>", "<extra_id_100> is not a sentinel", "</s><pad><unk>",
              "Replace me by any text you'd like.<mask> and <mask>", "a <mask>b  <mask>   c<mask>"]


def build_t5():
    """T5's pipeline: precompiled map and space collapsing, whitespace split then Metaspace, sentinels."""
    norm = normalizers.Sequence([normalizers.Precompiled(build_charsmap(CHARSMAP)),
                                 normalizers.Replace(Regex(" {2,}"), " ")])
    tok, _ = _unigram(norm)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.add_special_tokens(["</s>"] + SENTINELS)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    return tok


def build_bart():
    """BART's pipeline (RoBERTa's vocabulary layout): byte-level BPE, <s> A </s></s> B </s>, <mask> lstrip."""
    tok = _byte_level_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<s>", "<pad>", "</s>", "<unk>"])
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, rstrip=False, normalized=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")),
                                                      ("<s>", tok.token_to_id("<s>")), trim_offsets=True,
                                                      add_prefix_space=False)
    return tok


BUILDERS = {"t5": build_t5, "bart": build_bart}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (oracle, npformer tokenizer), both read from the same tokenizer.json."""
    root = tmp_path_factory.mktemp("seq2seq_tokenizers")
    out = {}
    for name, build in BUILDERS.items():
        path = root / f"{name}.json"
        build().save(str(path))
        out[name] = (Tokenizer.from_file(str(path)), HFTokenizer.from_file(path))
    return out


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fixed_texts_pairs_and_sentinels_match_the_oracle(pairs, name):
    oracle, ours = pairs[name]
    texts = TEXTS + SPAN_TEXTS
    for i, text in enumerate(texts):
        check_same(oracle, ours, text, texts[(i * 7 + 2) % len(texts)])


def test_the_sentinels_are_single_special_tokens(pairs):
    """Each <extra_id_i> is one id, the T5 span-corruption sentinel, and decoding can skip it."""
    oracle, ours = pairs["t5"]
    ids = ours.encode("a <extra_id_0> b <extra_id_42>", add_special_tokens=False)
    sentinel_ids = [oracle.token_to_id(s) for s in ("<extra_id_0>", "<extra_id_42>")]
    assert [i for i in ids if i in sentinel_ids] == sentinel_ids
    assert ours.decode(ids, skip_special_tokens=True) == oracle.decode(ids, skip_special_tokens=True)
    assert ours.encode("x")[-1] == oracle.token_to_id("</s>")  # the template's end of sequence


def test_the_mask_token_takes_the_space_before_it(pairs):
    oracle, ours = pairs["bart"]
    mask = oracle.token_to_id("<mask>")
    for text in ("a <mask>", "a<mask>", "a   <mask> b"):
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == oracle.encode(text, add_special_tokens=False).ids and ids.count(mask) == 1


@pytest.mark.parametrize("name", sorted(BUILDERS))
@settings(max_examples=10)
@given(text=st.text(ASSIGNED, max_size=40), pair=st.text(ASSIGNED, max_size=20))
def test_any_text_matches_the_oracle(pairs, name, text, pair):
    oracle, ours = pairs[name]
    check_same(oracle, ours, text, pair)


SPAN_PIECES = st.lists(st.one_of(WEIGHTED, st.sampled_from(SENTINELS[:3] + ["<mask>", " <mask>", "</s>", "<s>"])),
                       max_size=6).map("".join)


@pytest.mark.parametrize("name", sorted(BUILDERS))
@given(text=SPAN_PIECES, pair=SPAN_PIECES)
def test_text_with_special_tokens_inside_matches_the_oracle(pairs, name, text, pair):
    oracle, ours = pairs[name]
    check_same(oracle, ours, text, pair)
