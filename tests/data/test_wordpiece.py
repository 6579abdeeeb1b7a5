"""WordPiece vocabularies trained by npformer, encoded as BERT's tokenizers in ``transformers`` encode them.

A vocabulary is trained on the built-in corpus, saved as ``vocab.txt`` and loaded three ways:
``load_vocab_txt`` (npformer), ``BertTokenizerFast`` and the pure-Python ``BertTokenizerLegacy``
of ``transformers``, for ``do_lower_case`` True and False. Ids, token type ids of pairs and
decoded text must agree; the ``tokenizer.json`` npformer writes must read back the same in the
``tokenizers`` library.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from transformers import BertTokenizerFast  # noqa: E402
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # noqa: E402

from npformer.data.corpus import default_corpus  # noqa: E402
from npformer.data.wordpiece import (SPECIAL_TOKENS, bert_words, load_vocab_txt, read_vocab_txt,  # noqa: E402
                                     save_tokenizer_json, save_vocab_txt, tokenizer_json, train_wordpiece)
from npformer.hf.tokenizer import HFTokenizer  # noqa: E402

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 12345678 o'clock!",
    "I'LL don't you've we're she'd THEY'RE it's, do not.",
    "Größe, Straße, über; garçon, élève, naïve, Noël, cœur, ÅNGSTRÖM",
    "combining e\u0301 vs \u00e9 and Å vs A\u030a, ligature ﬁ ½",
    "Съешь же ещё этих мягких французских булок",
    "你好，世界！我们在学习分词。中文 and English 混合",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 heart ❤️ ☃",
    "lines\n\n\nthree blank   three spaces\t\ttabs\r\nwindows  ",
    "control\x00chars\x07here\x1f and\x7f del \x85 nel \u200b zwsp \ufeff bom \ufffd repl",
    "nbsp\u00a0here ideographic\u3000space thin\u2009space",
    "punctuation!!! ... ?!? (a) [b] {c} <d> \"e\" 'f' `g` $5 +6 =7 ^8 |9 ~0 @ # % & * / \\ _ -",
    "unicode punct ¡¿ «» „“ ‘’ — – … · § ¶ † ‡ • ‰ ′ ″",
    "def __init__(self, *args, **kwargs): return self.__class__.__name__",
    "supercalifragilisticexpialidociousness " + "x" * 120 + " antidisestablishmentarianism",
    "zzzzqqq qxj ωψχ ثلاثة ไทย עברית",
    "[CLS] [SEP] [MASK] [UNK] [PAD] [mask] ##s ##",
]
# Where the pure-Python tokenizer and the Rust one disagree by design, the legacy comparison skips the text:
# Python's str.lower() writes a final capital sigma as 'ς' where the Rust tokenizer lower-cases each
# character on its own ('σ'); the Rust tokenizer strips spacing marks (Mc) with the accents, and reads
# U+2028 / U+2029 as whitespace; the Python one also composes the text (NFC) first, which shows when
# accents are kept.
LEGACY_DIFFERS = ("Σ", "ไทย", "\u2028", "\u2029")


def legacy_agrees(text: str, lowercase: bool) -> bool:
    return not any(d in text for d in LEGACY_DIFFERS) and (lowercase or unicodedata.normalize("NFC", text) == text)


def train_text():
    return default_corpus(200_000) + "\n".join(TEXTS[:-2])


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    """lowercase -> (folder holding vocab.txt and tokenizer.json, vocab list)."""
    text = train_text()
    out = {}
    for lowercase in (True, False):
        vocab = train_wordpiece(text, 1500, lowercase=lowercase)
        folder = tmp_path_factory.mktemp(f"wordpiece-{lowercase}")
        save_vocab_txt(vocab, folder / "vocab.txt")
        save_tokenizer_json(vocab, folder / "tokenizer.json", lowercase=lowercase)
        out[lowercase] = (folder, vocab)
    return out


@pytest.fixture(scope="module")
def trio(vocab_files):
    """lowercase -> (npformer, BertTokenizerFast, BertTokenizerLegacy, tokenizers.Tokenizer) over one vocab.txt."""
    out = {}
    for lowercase, (folder, _) in vocab_files.items():
        path = folder / "vocab.txt"
        ours = load_vocab_txt(path, lowercase=lowercase)
        fast = BertTokenizerFast(vocab=str(path), do_lower_case=lowercase)
        slow = BertTokenizerLegacy(vocab_file=str(path), do_lower_case=lowercase)
        lib = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        out[lowercase] = (ours, fast, slow, lib)
    return out


def check(ours, fast, text, pair, slow, lib):
    for add in (True, False):
        expected = fast(text, add_special_tokens=add)["input_ids"]
        assert ours.encode(text, add_special_tokens=add) == expected, (text, add)
        assert lib.encode(text, add_special_tokens=add).ids == expected
        if slow is not None:
            assert slow(text, add_special_tokens=add)["input_ids"] == expected, (text, add)
        if not pair:  # transformers reads an empty pair as no pair; the tokenizers library does not
            both = lib.encode(text, pair, add_special_tokens=add)
            assert ours.encode_pair(text, pair, add_special_tokens=add) == (both.ids, both.type_ids)
            continue
        both = fast(text, pair, add_special_tokens=add, return_token_type_ids=True)
        assert ours.encode_pair(text, pair, add_special_tokens=add) == (both["input_ids"], both["token_type_ids"])
        if slow is not None and add:
            old = slow(text, pair, add_special_tokens=add, return_token_type_ids=True)
            assert (old["input_ids"], old["token_type_ids"]) == (both["input_ids"], both["token_type_ids"])
        for skip in (True, False):
            assert ours.decode(expected, skip_special_tokens=skip) == fast.decode(expected, skip_special_tokens=skip)


@pytest.mark.parametrize("lowercase", [True, False])
def test_fixed_texts_match_bert_tokenizers(trio, lowercase):
    ours, fast, slow, lib = trio[lowercase]
    for i, text in enumerate(TEXTS):
        pair = TEXTS[(3 * i + 1) % len(TEXTS)]
        legacy = slow if legacy_agrees(text + pair, lowercase) else None
        check(ours, fast, text, pair, legacy, lib)


def test_the_texts_reach_unk_continuations_and_case(trio):
    ours, _, _, _ = trio[True]
    unk = ours.token_to_id("[UNK]")
    assert ours.encode("x" * 120, add_special_tokens=False) == [unk]  # over 100 characters
    assert unk in ours.encode("ไทย", add_special_tokens=False)
    assert any(ours.id_to_token(i).startswith("##") for i in ours.encode("tokenizations"))
    cased, _, _, _ = trio[False]
    assert ours.encode("Hello") == ours.encode("hello") and cased.encode("Hello") != cased.encode("hello")
    ids, types = ours.encode_pair("a b", "c")
    assert ids[0] == ours.token_to_id("[CLS]") and types == [0, 0, 0, 0, 1, 1]


WEIGHTED = st.lists(
    st.one_of(
        st.sampled_from([" ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\x00", "\x07", "\u200b"]),
        st.sampled_from(list("abcdefxyzAÉßçñ") + ["the", "return", "'s", "don't", "Über", "Größe", "x" * 101]),
        st.sampled_from(list("0123456789") + ["12345678", "٣", "½"]),
        st.sampled_from(list(".,;:!?-_()[]{}'\"#@/\\*$+<=>^`|~¿«»—…")),
        st.sampled_from(["😀", "👍🏽", "中", "你好", "日本", "한", "e\u0301", "##", "[MASK]", "[SEP]", "[mask]"]),
    ),
    max_size=30,
).map("".join)


@pytest.mark.parametrize("lowercase", [True, False])
@given(text=WEIGHTED, pair=WEIGHTED)
def test_generated_text_matches_bert_tokenizers(trio, lowercase, text, pair):
    ours, fast, slow, lib = trio[lowercase]
    check(ours, fast, text, pair, slow if legacy_agrees(text + pair, lowercase) else None, lib)


@pytest.mark.parametrize("lowercase", [True, False])
@settings(max_examples=10)
@given(text=st.text(st.characters(exclude_categories=("Cs", "Cn"), max_codepoint=0x2FFFF), max_size=40))
def test_any_text_matches_the_fast_tokenizer(trio, lowercase, text):
    ours, fast, _, lib = trio[lowercase]
    check(ours, fast, text, "pair text", None, lib)


def test_trainer_vocabulary_is_well_formed(vocab_files):
    _, vocab = vocab_files[True]
    assert vocab[:5] == list(SPECIAL_TOKENS) and len(vocab) == 1500 and len(set(vocab)) == len(vocab)
    assert all(t == t.lower() for t in vocab[5:])
    words = set(bert_words(train_text()))
    for piece in vocab[5:]:  # every piece is part of some training word
        assert piece.startswith("##") or any(w.startswith(piece) for w in words), piece
    _, cased = vocab_files[False]
    assert any(t != t.lower() for t in cased)
    assert train_wordpiece("ab ab ab", 8, min_frequency=4) == list(SPECIAL_TOKENS) + ["##b", "a"]
    assert train_wordpiece("ab ab ab", 8) == list(SPECIAL_TOKENS) + ["##b", "a", "ab"]


def test_default_corpus_is_the_default_text():
    vocab = train_wordpiece(vocab_size=300)
    assert len(vocab) == 300 and "the" in vocab


def test_vocab_txt_reading_follows_bert(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nab\n##c\nab\n", encoding="utf-8")
    assert read_vocab_txt(path) == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "ab": 6, "##c": 5}
    ours = load_vocab_txt(path)
    fast = BertTokenizerFast(vocab=str(path))
    assert ours.encode("abc ab x") == fast("abc ab x")["input_ids"] == [2, 6, 5, 6, 1, 3]
    spec = tokenizer_json(["[UNK]", "[CLS]", "[SEP]", "a"], lowercase=False)
    assert HFTokenizer(spec).encode("a A") == [1, 3, 0, 2]


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="load_vocab_txt|read_vocab_txt"):
        load_vocab_txt(tmp_path / "missing.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("[CLS]\n[SEP]\n[UNK]\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        load_vocab_txt(bad)
    nocls = tmp_path / "nocls.txt"
    nocls.write_text("[UNK]\n[SEP]\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"nocls.txt.*\[CLS\]"):
        load_vocab_txt(nocls)
    with pytest.raises(ValueError, match="load_vocab_txt: argument 'lowercase'"):
        load_vocab_txt(nocls, lowercase="yes")
    with pytest.raises(TypeError, match="load_vocab_txt|read_vocab_txt.*'path'"):
        load_vocab_txt(3)
    with pytest.raises(TypeError, match="train_wordpiece: argument 'text'"):
        train_wordpiece(b"bytes")
    with pytest.raises(ValueError, match="train_wordpiece: argument 'vocab_size'"):
        train_wordpiece("a b", 0)
    with pytest.raises(TypeError, match="train_wordpiece: argument 'special_tokens'"):
        train_wordpiece("a b", 10, special_tokens="[UNK]")
    with pytest.raises(ValueError, match="save_vocab_txt: argument 'vocab'"):
        save_vocab_txt(["a", "b\nc"], tmp_path / "v.txt")
    with pytest.raises(TypeError, match="bert_words: argument 'text'"):
        bert_words(None)


def test_tokenizer_json_is_read_by_bert_tokenizer_fast(vocab_files, trio, tmp_path):
    for lowercase, (_, vocab) in vocab_files.items():
        folder = tmp_path / f"json-only-{lowercase}"
        folder.mkdir()
        save_tokenizer_json(vocab, folder / "tokenizer.json", lowercase=lowercase)
        fast = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=lowercase)  # its default is True
        ours = trio[lowercase][0]
        for text in TEXTS:
            assert fast(text)["input_ids"] == ours.encode(text)
            assert fast(text, "second part")["token_type_ids"] == ours.encode_pair(text, "second part")[1]
