"""Tokenizers on any Python string (lone surrogates too), unknown characters, and comparing vocabularies."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.data import ByteBPE, CharTokenizer, data_fingerprint
from npformer.data.vocab import check_same_tokenizer, check_vocab, tokenizer_difference

# Text that mixes ordinary characters with lone surrogates (U+D800..U+DFFF), which
# hypothesis's default text strategy never draws.
SURROGATES = st.characters(categories=["Cs"])
ANY_TEXT = st.lists(st.one_of(st.text(max_size=6), SURROGATES, st.just("\ud83d\ude00")), max_size=8).map("".join)
TRAINING_TEXT = "the cat sat on the mat; the hat \ud800 sat \udfff on the cat 😀 naïve"


@pytest.fixture(scope="module")
def bpe():
    return ByteBPE.train(TRAINING_TEXT * 3, 256 + 40)


@given(text=ANY_TEXT)
def test_bpe_round_trips_text_with_lone_surrogates(bpe, text):
    for tok in (bpe, ByteBPE()):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode_array(text), ids)
    # With no merges, the ids are the bytes: UTF-8, with a surrogate as its three-byte form.
    assert ByteBPE().encode(text) == list(text.encode("utf-8", "surrogatepass"))


@given(ids=st.lists(st.integers(0, 255), max_size=12))
def test_bpe_decodes_any_byte_sequence(ids):
    text = ByteBPE().decode(ids)
    raw = bytes(ids)
    try:
        expected = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # a cut character: U+FFFD where the bytes are not UTF-8
        assert "\ufffd" in text and len(text) <= len(raw)
    else:
        assert text == expected


@given(text=ANY_TEXT)
def test_bpe_trains_on_text_with_lone_surrogates(text):
    tok = ByteBPE.train(text, 256 + 8)
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) <= len(text.encode("utf-8", "surrogatepass"))


@given(text=ANY_TEXT.filter(bool), extra=SURROGATES | st.characters(), data=st.data())
def test_char_tokenizer_names_an_unknown_character_and_its_index(text, extra, data):
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    if extra in tok.stoi:
        return
    at = data.draw(st.integers(0, len(text)))
    bad = text[:at] + extra + text[at:]
    with pytest.raises(ValueError) as info:
        tok.encode(bad)
    message = str(info.value)
    assert "CharTokenizer.encode" in message and "'text'" in message
    assert f"character {extra!r} (U+{ord(extra):04X}) at position {at}," in message


# -- comparing a tokenizer with a model and with a saved tokenizer ------------------------------

@given(n=st.integers(1, 40), vocab_size=st.integers(1, 40), padding=st.booleans())
def test_check_vocab_accepts_exactly_the_models_ids(n, vocab_size, padding):
    tok = CharTokenizer([chr(ord("A") + i) for i in range(n)])
    fits = n == vocab_size or (padding and n < vocab_size)
    if fits:
        assert check_vocab(tok, vocab_size, "resume", allow_padding=padding) is None
        return
    with pytest.raises(ValueError) as info:
        check_vocab(tok, vocab_size, "resume", allow_padding=padding)
    message = str(info.value)
    assert message.startswith("resume: ") and f"{n} ids" in message and f"vocab_size is {vocab_size}" in message
    assert ("index past" in message) == (n > vocab_size)


@given(a=st.text(min_size=1, max_size=20), b=st.text(min_size=1, max_size=20))
def test_char_tokenizer_difference_names_the_characters(a, b):
    saved, current = CharTokenizer.from_text(a), CharTokenizer.from_text(b)
    same = set(a) == set(b)
    assert (saved == current) == same and (saved.fingerprint() == current.fingerprint()) == same
    assert (hash(saved) == hash(current)) or not same
    difference = tokenizer_difference(saved, current)
    assert (difference is None) == same
    if same:
        check_same_tokenizer(saved, current, "train --resume")
        return
    for c in sorted(set(a) - set(b))[:10]:
        assert repr(c) in difference.split("only in the current")[0]
    for c in sorted(set(b) - set(a))[:10]:
        assert repr(c) in difference.split("only in the current")[1]
    with pytest.raises(ValueError, match="^train --resume: the tokenizer does not match the saved one: "):
        check_same_tokenizer(saved, current, "train --resume")


@given(merges=st.integers(0, 12), data=st.data())
def test_bpe_difference_names_the_first_differing_merge(bpe, merges, data):
    saved = ByteBPE(bpe.merges[:merges])
    cut = data.draw(st.integers(0, merges))
    current = ByteBPE(bpe.merges[:cut] + [(7, 9)] * (cut < merges))
    difference = tokenizer_difference(saved, current)
    assert (difference is None) == (saved.merges == current.merges)
    assert (saved.fingerprint() == current.fingerprint()) == (difference is None)
    if cut < merges and saved.merges[cut] != (7, 9):
        assert difference.startswith(f"merge {cut} (id {256 + cut}) differs")
    assert tokenizer_difference(saved, CharTokenizer("ab")).startswith("the saved tokenizer is a ByteBPE")
    pattern = ByteBPE(saved.merges, pattern=r"\w+|\W")
    assert tokenizer_difference(saved, pattern).startswith("the split pattern differs")


@given(a=ANY_TEXT, b=ANY_TEXT)
def test_data_fingerprint_tells_texts_and_streams_apart(a, b):
    assert (data_fingerprint(a) == data_fingerprint(b)) == (a == b)
    ids = [ord(c) for c in a]
    assert data_fingerprint(ids) == data_fingerprint(np.asarray(ids, dtype=np.int32))
    assert data_fingerprint(ids) != data_fingerprint(ids + [0])
