"""WordPiece and Unigram tokenizers (BERT, ALBERT, DeBERTa-v2 pipelines) against the ``tokenizers`` library.

Each pipeline is trained here with ``tokenizers``' WordPieceTrainer or UnigramTrainer on a small
corpus, saved as ``tokenizer.json`` (a few fields then edited in the JSON: a short
``max_input_chars_per_word``, byte-fallback pieces) and read back by both the library and
npformer. Ids, token type ids of pairs, and decoded text must be identical. A SentencePiece
precompiled character map is built here too (``build_charsmap``: a double-array trie written in
the format SentencePiece uses), so the Precompiled normalizer is checked without a model file.
"""

from __future__ import annotations

import json
import struct
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tokenizers")
pytest.importorskip("regex")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from npformer.hf.tokenizer import HFTokenizer

UNSEEN = "zzzzqqq qxj ωψχ ثلاثة ไทย עברית हिन्दी"  # characters left out of the training corpus
TEXTS = [
    "",
    " ",
    "a",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 12345678 o'clock!",
    "I'LL don't you've we're she'd THEY'RE it's, do not.",
    "Größe, Straße, über; garçon, élève, naïve, Noël, cœur, ÅNGSTRÖM",
    "combining e\u0301 vs \u00e9 and Å vs A\u030a, ligature ﬁ ½ ①",
    "ΑΛΦΑΒΗΤΟΣ ΟΔΟΣ — Ελληνικά",
    "Съешь же ещё этих мягких французских булок",
    "你好，世界！我们在学习分词。中文 and English 混合",
    "こんにちは世界、カタカナとひらがな。",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇩🇪🇫🇷 heart ❤️ ☃",
    "lines\n\n\nthree blank   three spaces\t\ttabs\r\nwindows  ",
    "   leading and trailing spaces   ",
    "control\x00chars\x07here\x1f and\x7f del \x85 nel \u200b zwsp \ufeff bom \ufffd repl \u00ad shy",
    "nbsp\u00a0here ideographic\u3000space thin\u2009space line\u2028sep",
    "punctuation!!! ... ?!? (a) [b] {c} <d> \"e\" 'f' `g` $5 +6 =7 ^8 |9 ~0 @ # % & * / \\ _ -",
    "unicode punct ¡¿ «» „“ ‘’ — – … · § ¶ † ‡ • ‰ ′ ″ ‹ › ※ ¦ ° ± × ÷",
    "supercalifragilisticexpialidociousness antidisestablishmentarianism",
    "x" * 30 + " " + "ab" * 20,
    UNSEEN,
    "[CLS] [SEP] [MASK] [UNK] [PAD] [mask] <unk> <pad>",
    "▁already▁spaced ▁ ▁▁",
    "``quoted'' and ''more``",
    "numbers 3.14159 1,000,000 -42 ٣٤٥",
]

CORPUS_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part über straße élève naïve garçon Größe 你好 世界 中文 学习 quick brown fox"
).split()


def corpus():
    lines = []
    for i in range(300):
        words = [CORPUS_WORDS[(i * 7 + j * 13) % len(CORPUS_WORDS)] for j in range(12)]
        words[i % 12] = words[i % 12].capitalize()
        sep = ["  ", "\n", " ", "\t", ", ", ". ", "! ", "? "][i % 8]
        lines.append(sep.join(words) + f" {i * 37} {i}")
    return lines + [t for t in TEXTS if t != UNSEEN] * 2


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_template(tok):
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    return processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def _wordpiece(normalizer, pre, post, vocab_size=260, decoder=None):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoder or decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False,
                                        limit_alphabet=120)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = post(tok)
    return tok, {"model": {"max_input_chars_per_word": 14}}


def build_bert_uncased():
    return _wordpiece(normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer(), _bert_template)


def build_bert_cased():
    return _wordpiece(
        normalizers.BertNormalizer(lowercase=False, handle_chinese_chars=True, strip_accents=None),
        pre_tokenizers.BertPreTokenizer(),
        lambda tok: processors.BertProcessing(("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))))


def build_bert_strip_cased():
    """Accents stripped but case kept; no CJK padding, no clean-up of the text."""
    return _wordpiece(
        normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=False, strip_accents=True, lowercase=False),
        pre_tokenizers.BertPreTokenizer(), _bert_template, decoder=decoders.WordPiece(prefix="##", cleanup=False))


def build_wordpiece_sequence():
    norm = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents(),
                                 normalizers.Strip()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    return _wordpiece(norm, pre, lambda tok: processors.RobertaProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))))


def build_wordpiece_split():
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Strip(left=False, right=True)])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("contiguous")])
    def post(tok):  # unusual type ids: a template sets them even when no special token is added
        template = processors.TemplateProcessing(
            single="[CLS]:0 $A:1 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:2 [SEP]:2",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
        return processors.Sequence([processors.ByteLevel(), template])

    return _wordpiece(norm, pre, post)


UNIGRAM_SPECIALS = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]


def _unigram(normalizer, scheme="always", split=True, byte_fallback=False):
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme, split=split)
    trainer = trainers.UnigramTrainer(vocab_size=700, special_tokens=UNIGRAM_SPECIALS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = _bert_template(tok)
    edit = {}
    if byte_fallback:
        edit = {"model": {"byte_fallback": True}, "byte_pieces": True}
    return tok, edit


def build_sentencepiece_unigram():
    """What SentencePieceUnigramTokenizer builds: Nmt, NFKC, runs of spaces collapsed."""
    norm = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    return _unigram(norm)


def build_albert():
    """ALBERT's normalizer chain (without its precompiled map); Metaspace prepends to the first piece only,
    which a leading "``" (replaced by '"') keeps from counting as first."""
    norm = normalizers.Sequence([
        normalizers.Replace("``", '"'), normalizers.Replace("''", '"'), normalizers.NFKD(),
        normalizers.StripAccents(), normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " ")])
    return _unigram(norm, scheme="first")


def build_deberta_v2():
    """DeBERTa-v2 style: Strip, NFKC, Metaspace without splitting, byte fallback for unknown characters."""
    norm = normalizers.Sequence([normalizers.Strip(), normalizers.NFKC(),
                                 normalizers.Replace(Regex(" {2,}"), " ")])
    return _unigram(norm, split=False, byte_fallback=True)


BUILDERS = {
    "bert_uncased": build_bert_uncased,
    "bert_cased": build_bert_cased,
    "bert_strip_cased": build_bert_strip_cased,
    "wordpiece_sequence": build_wordpiece_sequence,
    "wordpiece_split": build_wordpiece_split,
    "sentencepiece_unigram": build_sentencepiece_unigram,
    "albert": build_albert,
    "deberta_v2": build_deberta_v2,
}
NAMES = sorted(BUILDERS)


def _edited(spec, edit):
    spec = json.loads(json.dumps(spec))
    spec["model"].update(edit.get("model", {}))
    if edit.get("byte_pieces"):
        have = {p for p, _ in spec["model"]["vocab"]}
        spec["model"]["vocab"] += [[f"<0x{b:02X}>", -30.0] for b in range(256) if f"<0x{b:02X}>" not in have]
    return spec


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """name -> (oracle, npformer tokenizer), both read from the same edited tokenizer.json."""
    out = {}
    root = tmp_path_factory.mktemp("encoders")
    for name, build in BUILDERS.items():
        trained, edit = build()
        spec = _edited(json.loads(trained.to_str()), edit)
        path = root / f"{name}.json"
        path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        out[name] = (Tokenizer.from_file(str(path)), HFTokenizer.from_file(path))
    return out


def check_same(oracle, ours, text, pair=None):
    for add in (True, False):
        expected = oracle.encode(text, add_special_tokens=add)
        assert ours.encode(text, add_special_tokens=add) == expected.ids, (text, add)
        assert ours.encode_with_types(text, add_special_tokens=add) == (expected.ids, expected.type_ids)
        for skip in (True, False):
            decoded = ours.decode(expected.ids, skip_special_tokens=skip)
            assert decoded == oracle.decode(expected.ids, skip_special_tokens=skip), (text, skip)
        if pair is not None:
            both = oracle.encode(text, pair, add_special_tokens=add)
            assert ours.encode(text, pair, add_special_tokens=add) == both.ids, (text, pair, add)
            assert ours.encode_pair(text, pair, add_special_tokens=add) == (both.ids, both.type_ids)


@pytest.mark.parametrize("name", NAMES)
def test_fixed_texts_and_pairs_match_the_oracle(pairs, name):
    oracle, ours = pairs[name]
    for i, text in enumerate(TEXTS):
        check_same(oracle, ours, text, pair=TEXTS[(i * 5 + 3) % len(TEXTS)])


def test_fixed_texts_exercise_the_interesting_paths(pairs):
    """The texts reach [UNK], long words, continuation pieces, byte fallback and type ids of 1."""
    _, bert = pairs["bert_uncased"]
    unk = bert.token_to_id("[UNK]")
    assert unk in bert.encode("zzzzqqq ωψχ", add_special_tokens=False)
    assert bert.encode("x" * 30, add_special_tokens=False) == [unk]  # longer than max_input_chars_per_word
    assert any(bert.id_to_token(i).startswith("##") for i in bert.encode("peoplewater"))
    ids, types = bert.encode_pair("hello", "world")
    assert ids[0] == bert.token_to_id("[CLS]") and types[-1] == 1 and types[0] == 0
    _, deberta = pairs["deberta_v2"]
    assert any(deberta.id_to_token(i).startswith("<0x") for i in deberta.encode("ไทย"))
    _, spm = pairs["sentencepiece_unigram"]
    assert spm.token_to_id("<unk>") in spm.encode("ไทย")


ASSIGNED = st.characters(exclude_categories=("Cs", "Cn"), max_codepoint=0x2FFFF)
WEIGHTED = st.lists(
    st.one_of(
        st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\x00", "\x07", "\u200b", "\ufeff"]),
        st.sampled_from(list("abcdefxyzAÉßçñΣ") + ["the", "people", "'s", "don't", "x" * 15, "über", "Größe"]),
        st.sampled_from(list("0123456789") + ["12345678", "٣", "½"]),
        st.sampled_from(list(".,;:!?-_()[]{}'\"#@/\\*$+<=>^`|~¿«»—…")),
        st.sampled_from(["😀", "👍🏽", "中", "你好", "日本", "한", "▁", "e\u0301", "``", "''"]),
        st.sampled_from(["[CLS]", "[SEP]", "[MASK]", "[UNK]", "<unk>", "<pad>", "##", "##s"]),
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10)
@given(text=st.text(ASSIGNED, max_size=40), pair=st.text(ASSIGNED, max_size=20))
def test_any_text_matches_the_oracle(pairs, name, text, pair):
    oracle, ours = pairs[name]
    check_same(oracle, ours, text, pair)


@pytest.mark.parametrize("name", NAMES)
@given(text=WEIGHTED, pair=WEIGHTED)
def test_weighted_text_matches_the_oracle(pairs, name, text, pair):
    oracle, ours = pairs[name]
    check_same(oracle, ours, text, pair)


# ----------------------------------------------------------------------------- malformed files

def _bert_spec(pairs):
    _, ours = pairs["bert_uncased"]
    return json.loads(json.dumps(ours._spec))


def _unigram_spec(pairs):
    _, ours = pairs["sentencepiece_unigram"]
    return json.loads(json.dumps(ours._spec))


def _set(spec, dotted, value):
    *path, last = dotted.split(".")
    node = spec
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    return spec


MALFORMED = [
    ("bert", "model.max_input_chars_per_word", "100", "max_input_chars_per_word"),
    ("bert", "model.max_input_chars_per_word", -1, "max_input_chars_per_word"),
    ("bert", "model.unk_token", 3, "unk_token"),
    ("bert", "model.vocab", ["a"], "model.vocab"),
    ("bert", "normalizer.lowercase", "yes", "normalizer.lowercase"),
    ("bert", "normalizer.strip_accents", 1, "normalizer.strip_accents"),
    ("bert", "pre_tokenizer", {"type": "Punctuation", "behavior": "Sideways"}, "pre_tokenizer.behavior"),
    ("bert", "post_processor", {"type": "BertProcessing", "sep": ["[SEP]"], "cls": ["[CLS]", 2]}, "sep"),
    ("bert", "post_processor", {"type": "RobertaProcessing", "sep": ["</s>", -2], "cls": ["<s>", 0]}, "sep"),
    ("bert", "post_processor.pair.1.Sequence.id", "C", "post_processor.pair[1].Sequence.id"),
    ("bert", "post_processor.single.0.SpecialToken.type_id", -1, "type_id"),
    ("bert", "decoder.cleanup", "no", "decoder.cleanup"),
    ("bert", "normalizer", {"type": "Precompiled", "precompiled_charsmap": "AAAA"}, "normalizer.precompiled_charsmap"),
    ("bert", "normalizer", {"type": "Precompiled", "precompiled_charsmap": "not base64!"}, "not base64"),
    ("bert", "normalizer", {"type": "Precompiled", "precompiled_charsmap": "/////wAAAAA="}, "trie size"),
    ("bert", "normalizer", {"type": "Precompiled", "precompiled_charsmap": "BAAAAAAAAAD/"}, "not UTF-8"),
    ("unigram", "model.vocab", [], "model.vocab"),
    ("unigram", "model.vocab.3", ["piece"], "model.vocab[3]"),
    ("unigram", "model.vocab.3", ["piece", "high"], "model.vocab[3]"),
    ("unigram", "model.unk_id", 10**6, "model.unk_id"),
    ("unigram", "model.byte_fallback", "yes", "model.byte_fallback"),
    ("unigram", "model.type", "SentencePiece", "SentencePiece"),
]


@pytest.mark.parametrize("family, where, value, named", MALFORMED)
def test_malformed_files_name_the_file_and_the_field(pairs, tmp_path, family, where, value, named):
    spec = _set(_bert_spec(pairs) if family == "bert" else _unigram_spec(pairs), where, value)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(ValueError) as info:
        HFTokenizer.from_file(path)
    assert str(path) in str(info.value) and named in str(info.value)


def test_a_needed_unknown_piece_that_is_missing_is_named(pairs, tmp_path):
    spec = _set(_bert_spec(pairs), "model.unk_token", "<nothing>")
    ours = HFTokenizer(spec, source="bert.json")
    assert ours.encode("the") == HFTokenizer(_bert_spec(pairs)).encode("the")  # not needed: fine
    with pytest.raises(ValueError, match=r"bert.json: model.unk_token: '<nothing>' is needed"):
        ours.encode("ωψχ")
    spec = _set(_unigram_spec(pairs), "model.unk_id", None)
    ours = HFTokenizer(spec, source="spm.json")
    assert ours.encode("the") == HFTokenizer(_unigram_spec(pairs)).encode("the")
    with pytest.raises(ValueError, match=r"spm.json: model.unk_id: .*no unk_id"):
        ours.encode("ไทย")


def test_pair_arguments_are_checked(pairs):
    _, ours = pairs["bert_uncased"]
    with pytest.raises(TypeError, match="HFTokenizer.encode: argument 'pair' expected str, got int"):
        ours.encode("a", 3)
    with pytest.raises(TypeError, match="HFTokenizer.encode_pair: argument 'pair' expected str"):
        ours.encode_pair("a", None)
    with pytest.raises(ValueError, match="HFTokenizer.encode_pair: argument 'pair' holds a lone surrogate"):
        ours.encode_pair("a", "\ud800")
    spec = _bert_spec(pairs)
    del spec["post_processor"]["pair"]
    single_only = HFTokenizer(spec, source="single.json")
    assert single_only.encode("a") == ours.encode("a")
    with pytest.raises(ValueError, match="single.json: post_processor: has no 'pair' template"):
        single_only.encode("a", "b")


# ----------------------------------------------------------------------------- Viterbi ties and unknowns

TIE_VOCAB = [["<unk>", 0.0], ["a", -1.0], ["b", -1.0], ["ab", -2.0], ["ba", -2.0], ["aba", -3.0], ["c", -1.5],
             ["bc", -2.5], ["▁", -0.5], ["▁a", -1.5], ["<0xC3>", -9.0], ["<0xA9>", -9.0]]


@pytest.mark.parametrize("byte_fallback", [False, True])
@given(word=st.text(st.sampled_from("abcé▁<unk>x"), max_size=12))
def test_unigram_ties_and_unknown_runs_match_the_oracle(tmp_path_factory, byte_fallback, word):
    """Equal totals (a+b = ab, ab+a = a+ba = aba ...), unknown runs fused, byte fallback for é only."""
    spec = {"version": "1.0", "model": {"type": "Unigram", "unk_id": 0, "vocab": TIE_VOCAB,
                                        "byte_fallback": byte_fallback}}
    path = tmp_path_factory.mktemp("ties") / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    oracle, ours = Tokenizer.from_file(str(path)), HFTokenizer.from_file(path)
    assert ours.encode(word) == oracle.encode(word).ids


@settings(max_examples=5)
@given(scale=st.sampled_from([1.0, 20.0, 1e-3, 1e5, 1e300]), seed=st.integers(0, 2**32 - 1))
def test_scores_are_read_as_the_reference_reads_them(scale, seed):
    """The reference's JSON reader rounds twice (digits to an integer, then a division by a power of
    ten); a saved and reloaded model shows the scores it holds, and npformer's reading agrees."""
    from random import Random

    from npformer.hf._tokenizer_unigram import reference_float

    rng = Random(seed)
    scores = [-rng.random() * scale for _ in range(400)]
    spec = {"version": "1.0", "model": {"type": "Unigram", "unk_id": 0,
                                        "vocab": [["<unk>", 0.0]] + [[f"p{i}", x] for i, x in enumerate(scores)]}}
    held = json.loads(Tokenizer.from_str(json.dumps(spec)).to_str())["model"]["vocab"][1:]
    assert [y for _, y in held] == [reference_float(x) for x in scores]
    assert any(y != x for (_, y), x in zip(held, scores)) or scale == 1e300  # the double rounding shows


# A normalizer that drops or replaces the text's first characters decides whether Metaspace's "first" piece is first.
R = normalizers.Replace
FIRST_CASES = [
    (R("a", "b"), "ac"), (R("a", "bc"), "ad"), (R("ab", "c"), "abd"), (R("a", ""), "ab"), (R(Regex("a+"), "c"), "aab"),
    (R(Regex("a+"), "c"), "ab"), (R(Regex("x*"), "y"), "ab"), (R(" ", "  "), " a"),
    (normalizers.BertNormalizer(), "中a"), (normalizers.BertNormalizer(), "\x00a"), (normalizers.BertNormalizer(), " a"),
    (normalizers.BertNormalizer(strip_accents=True), "\u0301a"), (normalizers.NFKC(), "ﬁa"),
    (normalizers.NFC(), "e\u0301a"), (normalizers.NFD(), "éa"), (normalizers.StripAccents(), "\u0301a"),
    (normalizers.Strip(), " a"), (normalizers.Nmt(), "\x01a"), (normalizers.Nmt(), "\ta"),
    (normalizers.Lowercase(), "İa"), (normalizers.Prepend("▁"), "a"),
    (normalizers.Sequence([R("a", ""), normalizers.Prepend("q")]), "ab"),
    (normalizers.Sequence([R("``", '"'), normalizers.NFKD()]), "``quoted''"),
]


@pytest.mark.parametrize("normalizer, text", FIRST_CASES)
def test_metaspace_first_follows_where_the_first_character_came_from(normalizer, text):
    chars = set(normalizer.normalize_str(text)) | {"▁"}
    oracle = Tokenizer(models.Unigram([("<unk>", 0.0)] + [(c, -1.0) for c in sorted(chars)], 0, False))
    oracle.normalizer = normalizer
    oracle.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    ours = HFTokenizer(json.loads(oracle.to_str()))
    assert ours.encode(text) == oracle.encode(text).ids
    assert ours.encode("x" + text) == oracle.encode("x" + text).ids


def test_pairs_of_the_bpe_families_match_the_oracle():
    """Pairs and token type ids for the BPE families of test_tokenizer (templates with and without $B:1)."""
    from .test_tokenizer import BUILDERS as BPE_BUILDERS
    from .test_tokenizer import TEXTS as BPE_TEXTS

    for name in ("llama3", "llama2", "metaspace_split"):
        oracle = BPE_BUILDERS[name]()
        ours = HFTokenizer(json.loads(oracle.to_str()))
        for i, text in enumerate(BPE_TEXTS):
            pair = BPE_TEXTS[(7 * i + 2) % len(BPE_TEXTS)]
            for add in (True, False):
                expected = oracle.encode(text, pair, add_special_tokens=add)
                assert ours.encode_pair(text, pair, add_special_tokens=add) == (expected.ids, expected.type_ids)


# ----------------------------------------------------------------------------- Precompiled (SentencePiece) maps


def build_charsmap(mapping):
    """A precompiled character map as SentencePiece writes it: u32 n (little-endian), a darts-clone
    double-array trie of n bytes over the UTF-8 keys, then the NUL-terminated replacements the trie's
    values point into. Each trie unit is (offset << 10) | (has value << 8) | label; a node's child with
    byte c sits at base ^ c and its value at base ^ 0, base = position ^ offset."""
    pool = bytearray()
    root = {}
    for key, norm in mapping.items():
        node = root
        for b in key.encode("utf-8"):
            node = node.setdefault(b, {})
        node[None] = len(pool)
        pool += norm.encode("utf-8") + b"\0"
    units, used, bases = {}, {0}, set()

    def place(node, pos, label):
        children = [b for b in node if b is not None]
        base = 1
        while (base in bases or base == pos or any(base ^ c in used for c in children)
               or (None in node and base in used)):
            base += 1
        bases.add(base)
        units[pos] = ((pos ^ base) << 10) | (int(None in node) << 8) | label
        if None in node:
            used.add(base)
            units[base] = (1 << 31) | node[None]
        used.update(base ^ c for c in children)
        for c in children:
            place(node[c], base ^ c, c)

    place(root, 0, 0)
    array = [units.get(i, 0) for i in range(max(units) + 1)]
    trie = struct.pack(f"<{len(array)}I", *array)
    return struct.pack("<I", len(trie)) + trie + bytes(pool)


# NFKC of a few hundred characters (full-width forms, ligatures, circled digits, compatibility
# spaces ...), some keys of two or more characters, and replacements by nothing.
CHARSMAP = {c: unicodedata.normalize("NFKC", c) for c in map(chr, [*range(0xA0, 0x180), *range(0x2000, 0x2070),
                                                                    *range(0x2460, 0x2480), *range(0xFB00, 0xFB07),
                                                                    *range(0xFF01, 0xFF5F), 0x3000])
            if unicodedata.normalize("NFKC", c) != c}
CHARSMAP.update({"\u200b": "", "\u00ad": "", "e\u0301": "\u00e9", "ab": "AB", "\U0001F600": "<smile>", "q": "",
                 "\u3042\u3099": "\u3094", "\U0001F44D\U0001F3FD": "+1"})
PRECOMPILED_TEXT = st.lists(st.one_of(
    st.sampled_from(sorted(CHARSMAP)), st.sampled_from(list("abcdeqxyz .,") + ["e\u0301", "a\u0301\u0302"]),
    st.sampled_from(["\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F1E9\U0001F1EA", "\u3042\u3099"]),
    st.characters(exclude_categories=("Cs", "Cn"), max_codepoint=0x2FFFF)), max_size=25).map("".join)


@pytest.fixture(scope="module")
def precompiled_pair(tmp_path_factory):
    """An ALBERT-like Unigram pipeline whose normalizer holds the precompiled map above."""
    norm = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.Replace("''", '"'),
                                 normalizers.Precompiled(build_charsmap(CHARSMAP)),
                                 normalizers.Replace(Regex(" {2,}"), " ")])
    trained, _ = _unigram(norm, scheme="first")
    path = tmp_path_factory.mktemp("precompiled") / "tokenizer.json"
    trained.save(str(path))
    return Tokenizer.from_file(str(path)), HFTokenizer.from_file(path)


def test_precompiled_map_on_fixed_texts_matches_the_oracle(precompiled_pair):
    oracle, ours = precompiled_pair
    for i, text in enumerate(TEXTS + ["ｆｕｌｌ\u3000ｗｉｄｔｈ ﬁ ①② ab abc q\u200bq 😀 \u3042\u3099 👍🏽", "qqab", "\u00a0x"]):
        assert ours._normalizer(text) == oracle.normalizer.normalize_str(text), text
        check_same(oracle, ours, text, TEXTS[(i * 5 + 3) % len(TEXTS)])


@given(text=PRECOMPILED_TEXT, pair=PRECOMPILED_TEXT)
def test_precompiled_map_on_generated_text_matches_the_oracle(precompiled_pair, text, pair):
    oracle, ours = precompiled_pair
    assert ours._normalizer(text) == oracle.normalizer.normalize_str(text)
    check_same(oracle, ours, text, pair)


def test_an_empty_precompiled_map_changes_nothing(pairs):
    _, ours = pairs["bert_uncased"]
    for charsmap in ("", None):
        spec = json.loads(json.dumps(ours._spec))
        spec["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": charsmap}
        assert HFTokenizer(spec).encode("Hello World") != ours.encode("Hello World")  # not lower-cased
        assert HFTokenizer(spec).encode("hello world") == ours.encode("hello world")


def _words_by_hand(text, tokenizer):
    """Independently: encode each whitespace-separated word alone; its first piece starts a word."""
    starts = []
    for word in text.split():
        pieces = tokenizer.encode(word, add_special_tokens=False)
        starts += [True] + [False] * (len(pieces) - 1)
    return starts


@pytest.mark.parametrize("kind", ["wordpiece", "unigram", "bytelevel"])
def test_word_starts_mark_the_first_piece_of_each_word(kind, tmp_path):
    """Whole-word masking's unit: with WordPiece ("##") and SentencePiece ("▁") pieces, not single decodes."""
    from npformer.data.objectives import word_starts_for
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    text = "the walking dogs were jumping over fences while the cats kept sleeping on the warm mats " * 20
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"],
                                                                  show_progress=False))
    elif kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator([text], trainers.UnigramTrainer(vocab_size=60, unk_token="<unk>",
                                                                special_tokens=["<unk>"], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    sample = "the walking dogs were jumping over warm fences"
    ids = np.array(ours.encode(sample, add_special_tokens=False))
    expected = _words_by_hand(sample, ours)
    assert len(expected) == ids.size and sum(expected) == len(sample.split()) < ids.size  # some words split
    np.testing.assert_array_equal(word_starts_for(ours, ids), expected)
