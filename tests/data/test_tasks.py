"""Built-in fine-tuning tasks: docstring -> module, Python token tagging, batches, alignment and metrics.

The tasks are checked against independent readings of the same sources (the imported
module's ``__doc__``, ``keyword`` and ``ast.literal_eval``), the metrics against loops over
the definitions and against hand-computed cases.
"""

import ast
import hashlib
import importlib
import inspect
import io
import keyword
import re
import time
import tokenize

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npformer.data import CharTokenizer
from npformer.data import tasks as T
from npformer.data.objectives import SpecialIds, special_ids_for
from npformer.data.tasks import (IGNORE_INDEX, SPLITS, TASK_MODULES, TOKEN_TAGS, TaggedLine, Task, TextExample,
                                 accuracy, align_labels, classification_batches, classification_metrics,
                                 clean_docstring, confusion_matrix, docstring_task, encode_words, load_task,
                                 macro_f1, majority_baseline, split_of, tag_source, token_accuracy, token_task)
from npformer.nn.lm import IGNORE_INDEX as LM_IGNORE_INDEX
from tests.badinput import expect_rejected

DOCS = docstring_task()
TOKENS = token_task()
CHAR = CharTokenizer.from_text("".join(e.text for t in (DOCS, TOKENS) for s in SPLITS for e in t.split(s)))
TAG = {name: i for i, name in enumerate(TOKEN_TAGS)}


def all_examples(task):
    return [e for s in SPLITS for e in task.split(s)]


# -- building: determinism, speed, splits ------------------------------------------------------------

def test_rebuilding_gives_the_same_tasks_and_is_fast():
    start = time.perf_counter()
    docs = T._docstring_task.__wrapped__(TASK_MODULES, 300, 3, (0.8, 0.1, 0.1))  # past the cache
    tokens = T._token_task.__wrapped__(TASK_MODULES, (0.8, 0.1, 0.1))
    seconds = time.perf_counter() - start
    assert docs == DOCS and tokens == TOKENS
    assert docs is not DOCS
    assert seconds < 4.0  # each task builds in well under 2 s; both together with slack for a busy machine
    assert load_task("docstrings") is DOCS and load_task("tokens") is TOKENS


def test_split_of_is_the_documented_hash_and_fixed():
    for text in ["", "hello", "Return the sum.", "é ü \u2028", "x" * 1000]:
        u = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2**64
        expected = "train" if u < 0.8 else ("validation" if u < 0.9 else "test")
        assert split_of(text) == expected
        assert split_of(text, (1.0, 0.0, 0.0)) == "train"
    # Fixed values: the split of a text never changes between runs or Python versions.
    assert [split_of(f"example {i}") for i in range(12)].count("train") >= 6
    assert hashlib.sha256(b"hello").hexdigest()[:16] == "2cf24dba5fb0a30e"
    assert split_of("hello") == "train"  # 0x2cf24dba5fb0a30e / 2**64 = 0.176


@pytest.mark.parametrize("task", [DOCS, TOKENS], ids=["docstrings", "tokens"])
def test_no_text_in_two_splits_and_splits_follow_the_hash(task):
    texts = {s: [e.text for e in task.split(s)] for s in SPLITS}
    for s in SPLITS:
        assert len(set(texts[s])) == len(texts[s])  # no repeats within a split
        assert all(split_of(t) == s for t in texts[s])
        assert len(texts[s]) > 0
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])
    n = sum(len(v) for v in texts.values())
    assert abs(len(texts["train"]) / n - 0.8) < 0.06  # 0.8 of a few hundred examples, within 4 sd


@pytest.mark.parametrize("task", [DOCS, TOKENS], ids=["docstrings", "tokens"])
def test_labels_in_range_every_class_in_train_and_counts(task):
    K = task.num_labels
    for s in SPLITS:
        y = task.labels(s)
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < K
        counts = task.class_counts(s)
        assert counts.shape == (K,) and counts.sum() == y.size
        assert np.array_equal(counts, [int(np.sum(y == k)) for k in range(K)])
    assert (task.class_counts("train") > 0).all()
    summary = task.summary()
    assert all(name in summary for name in task.label_names)
    assert str(int(task.class_counts("train").sum())) in summary


def test_docstring_task_shape():
    assert DOCS.kind == "sequence" and DOCS.label_names == TASK_MODULES and DOCS.num_labels == 10
    assert 6 <= len(TASK_MODULES) <= 10 and list(TASK_MODULES) == sorted(TASK_MODULES)
    examples = all_examples(DOCS)
    assert len(examples) > 500
    for e in examples:
        assert isinstance(e, TextExample)
        assert "\n" not in e.text and "  " not in e.text and e.text == e.text.strip()
        assert 0 < len(e.text) <= 300 and len(e.text.split()) >= 3
        assert e.source.split(":")[0] == TASK_MODULES[e.label]
    # A text never comes with two labels, even across splits.
    label_of = {}
    for e in examples:
        assert label_of.setdefault(e.text, e.label) == e.label


def test_docstring_texts_match_the_imported_objects():
    """Independently: import the module, follow the qualified name, clean its __doc__ the documented way."""
    checked = differ = 0
    for e in all_examples(DOCS)[::3]:
        module, qualname = e.source.split(":")
        obj = importlib.import_module(module)
        try:
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue  # defined inside a function, or only under some condition
        doc = getattr(obj, "__doc__", None)
        if not isinstance(doc, str):
            continue
        words = " ".join(inspect.cleandoc(doc).strip().split("\n\n")[0].split())
        if words == e.text or (len(words) > 300 and words.startswith(e.text) and words[len(e.text)] == " "):
            checked += 1
        else:  # a class replaced at import time by a C one (OrderedDict) carries another docstring
            differ += 1
    assert checked > 150 and differ <= 0.05 * checked


@given(st.lists(st.sampled_from(["word", "a", "longerword", " ", "  ", "\n", "\t", "\n\n", "\n \n"]), max_size=40),
       st.integers(1, 40))
def test_clean_docstring_rules(pieces, max_chars):
    doc = "".join(pieces)
    out = clean_docstring(doc, max_chars)
    assert len(out) <= max_chars
    assert "\n" not in out and "  " not in out and out == out.strip() or out == ""
    first = " ".join(re.split(r"\n[ \t]*\n", doc.strip())[0].split())
    assert first.startswith(out)
    if len(first) <= max_chars:
        assert out == first
    elif " " in first[: max_chars + 1]:  # cut at a word boundary
        assert first[len(out)] == " "


def test_clean_docstring_cases():
    assert clean_docstring("Return x.\n\n    More text.") == "Return x."
    assert clean_docstring("  Split   across\n  lines.\n") == "Split across lines."
    assert clean_docstring("alpha beta gamma", max_chars=12) == "alpha beta"
    assert clean_docstring("abcdefgh", max_chars=3) == "abc"


# -- token tagging -------------------------------------------------------------------------------

SNIPPET = '''\
def f(x, y=1.5):  # add
    if x is None and not y:
        return f"{x!r}-{y}" + 'a' + b"b"
    s = """multi
line"""
    match = [0x1F, 2j, ...]
    return lambda z: z ** 2 >= -3
'''


def test_tag_source_snippet_by_hand():
    got = {r: [(s, w, t) for s, w, t in words] for r, words in tag_source(SNIPPET)}
    assert sorted(got) == [1, 2, 3, 6, 7]  # lines 4-5 hold a multi-line string
    assert got[1] == [("", "def", "KEYWORD"), (" ", "f", "NAME"), ("", "(", "OP"), ("", "x", "NAME"),
                      ("", ",", "OP"), (" ", "y", "NAME"), ("", "=", "OP"), ("", "1.5", "NUMBER"), ("", ")", "OP"),
                      ("", ":", "OP"), ("  ", "# add", "COMMENT")]
    assert [(w, t) for _, w, t in got[2]] == [("if", "KEYWORD"), ("x", "NAME"), ("is", "KEYWORD"),
                                              ("None", "KEYWORD"), ("and", "KEYWORD"), ("not", "KEYWORD"),
                                              ("y", "NAME"), (":", "OP")]
    assert [(w, t) for _, w, t in got[3]] == [("return", "KEYWORD"), ('f"{x!r}-{y}"', "STRING"), ("+", "OP"),
                                              ("'a'", "STRING"), ("+", "OP"), ('b"b"', "STRING")]
    assert [(w, t) for _, w, t in got[6]] == [("match", "NAME"), ("=", "OP"), ("[", "OP"), ("0x1F", "NUMBER"),
                                              (",", "OP"), ("2j", "NUMBER"), (",", "OP"), ("...", "OP"),
                                              ("]", "OP")]
    assert [t for _, _, t in got[7]] == ["KEYWORD", "KEYWORD", "NAME", "OP", "NAME", "OP", "NUMBER", "OP", "OP",
                                         "NUMBER"]


def test_fstring_tokens_of_python_312_merge_into_one_string():
    """A 3.12-style stream (FSTRING_START ... FSTRING_END, nested) becomes the single STRING of 3.10/3.11."""
    start, end = 9001, 9002
    line = 'x = f"a{f"{b}"}c"\n'
    TI = tokenize.TokenInfo
    stream = [TI(tokenize.NAME, "x", (1, 0), (1, 1), line), TI(tokenize.OP, "=", (1, 2), (1, 3), line),
              TI(start, 'f"', (1, 4), (1, 6), line), TI(tokenize.OP, "{", (1, 7), (1, 8), line),
              TI(start, 'f"', (1, 8), (1, 10), line), TI(tokenize.OP, "{", (1, 10), (1, 11), line),
              TI(tokenize.NAME, "b", (1, 11), (1, 12), line), TI(tokenize.OP, "}", (1, 12), (1, 13), line),
              TI(end, '"', (1, 13), (1, 14), line), TI(tokenize.OP, "}", (1, 14), (1, 15), line),
              TI(end, '"', (1, 16), (1, 17), line), TI(tokenize.NEWLINE, "\n", (1, 17), (1, 18), line)]
    saved = T._FSTRING_START, T._FSTRING_END
    T._FSTRING_START, T._FSTRING_END = start, end
    try:
        merged = list(T._merge_fstrings(stream))
    finally:
        T._FSTRING_START, T._FSTRING_END = saved
    assert [m.type for m in merged] == [tokenize.NAME, tokenize.OP, tokenize.STRING, tokenize.NEWLINE]
    assert merged[2].start == (1, 4) and merged[2].end == (1, 17)
    assert line[4:17] == 'f"a{f"{b}"}c"'


def test_token_task_tags_agree_with_independent_rules():
    assert TOKENS.kind == "token" and TOKENS.label_names == TOKEN_TAGS
    operators = set(tokenize.EXACT_TOKEN_TYPES)
    examples = all_examples(TOKENS)
    assert len(examples) > 5000
    for e in examples:
        assert isinstance(e, TaggedLine) and len(e.words) == len(e.spaces) == len(e.tags) >= 1
        assert e.spaces[0] == "" and all(s.strip(" \t\f") == "" for s in e.spaces)
        for word, tag in zip(e.words, e.tags):
            name = TOKEN_TAGS[tag]
            if name == "KEYWORD":
                assert keyword.iskeyword(word)
            elif name == "NAME":
                assert word.isidentifier() and not keyword.iskeyword(word)
            elif name == "OP":
                assert word in operators
            elif name == "NUMBER":
                assert isinstance(ast.literal_eval(word), (int, float, complex))
            elif name == "COMMENT":
                assert word.startswith("#")
            else:
                assert name == "STRING"
                if "f" not in word.split(word[-1])[0].lower():  # not an f-string
                    assert isinstance(ast.literal_eval(word), (str, bytes))
    # The source line holds the text, after its indentation.
    module, line = examples[123].source.split(":")
    source = T._module_file(module).read_text(encoding="utf-8").splitlines()[int(line) - 1]
    assert source.strip().startswith(examples[123].text)


def test_token_task_lines_retokenize_to_the_same_words():
    """A sample of lines that tokenize on their own give the same words as in context."""
    checked = 0
    for e in all_examples(TOKENS)[::97]:
        try:
            toks = [t for t in tokenize.generate_tokens(io.StringIO(e.text + "\n").readline)
                    if t.type not in T._SKIPPED]
        except (tokenize.TokenError, SyntaxError, IndentationError):
            continue
        if any(t.type == tokenize.ERRORTOKEN for t in toks):
            continue
        assert tuple(t.string for t in toks) == e.words
        checked += 1
    assert checked > 50


# -- alignment -----------------------------------------------------------------------------------

@st.composite
def tokenizations(draw):
    """Words with 0-3 pieces each, separated by 0-2 unlabelled pieces, and random word labels."""
    W = draw(st.integers(0, 8))
    counts = draw(st.lists(st.integers(0, 3), min_size=W, max_size=W))
    gaps = draw(st.lists(st.integers(0, 2), min_size=W + 1, max_size=W + 1))
    word_ids = []
    for w in range(W):
        word_ids += [None] * gaps[w] + [w] * counts[w]
    word_ids += [None] * gaps[W]
    labels = draw(st.lists(st.integers(0, 5), min_size=W, max_size=W))
    return word_ids, labels, counts


@given(tokenizations())
def test_align_labels_first_piece_gets_the_label(case):
    word_ids, labels, counts = case
    out = align_labels(word_ids, labels)
    assert out.dtype == np.int64 and out.shape == (len(word_ids),)
    expected = np.full(len(word_ids), -100)
    for w in range(len(labels)):
        positions = [j for j, v in enumerate(word_ids) if v == w]
        if positions:
            expected[positions[0]] = labels[w]
    assert np.array_equal(out, expected)
    assert np.count_nonzero(out != IGNORE_INDEX) == sum(c > 0 for c in counts)
    every = align_labels(word_ids, labels, label_all_pieces=True)
    assert np.array_equal(every, [labels[w] if w is not None else -100 for w in word_ids])


def test_align_labels_cases():
    assert IGNORE_INDEX == LM_IGNORE_INDEX == -100
    assert align_labels([None, 0, 0, None, 1, 2, 2, 2, None], [3, 4, 5]).tolist() == [
        -100, 3, -100, -100, 4, 5, -100, -100, -100]
    assert align_labels([], []).tolist() == []


@given(st.integers(0, 2**32 - 1))
def test_encode_words_pieces_map_back_to_words(seed):
    rng = np.random.default_rng(seed)
    examples = all_examples(TOKENS)
    e = examples[int(rng.integers(len(examples)))]
    ids, word_ids = encode_words(CHAR, e)
    assert CHAR.decode(ids) == e.text
    for w, word in enumerate(e.words):
        assert CHAR.decode([i for i, v in zip(ids, word_ids) if v == w]) == word
    assert "".join(CHAR.decode([i]) for i, v in zip(ids, word_ids) if v is None) == "".join(e.spaces)
    labels = align_labels(word_ids, e.tags)
    assert labels[labels != -100].tolist() == list(e.tags)  # each word is at least one character


# -- batches -------------------------------------------------------------------------------------

@given(st.sampled_from([1, 3, 8, 50]), st.sampled_from([3, 4, 17, 64, 400]), st.sampled_from(["validation", "test"]))
def test_sequence_batches_in_order(batch_size, max_length, split):
    S = special_ids_for(CHAR)
    examples = DOCS.split(split)
    batches = list(classification_batches(CHAR, DOCS, split, batch_size=batch_size, max_length=max_length, rng=None))
    assert [len(b["labels"]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert sum(len(b["labels"]) for b in batches) == len(examples)
    row = 0
    for b in batches:
        n = len(b["labels"])
        assert set(b) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        assert all(v.dtype == np.int64 for v in b.values())
        assert b["input_ids"].shape == (n, max_length) and b["labels"].shape == (n,)
        assert not b["token_type_ids"].any()
        for r in range(n):
            e = examples[row + r]
            assert b["labels"][r] == e.label
            pieces = CHAR.encode(e.text)[: max_length - 2]
            k = len(pieces)
            assert b["input_ids"][r, :k + 2].tolist() == [S.cls] + pieces + [S.sep]
            assert (b["input_ids"][r, k + 2:] == S.pad).all()
            assert b["attention_mask"][r].tolist() == [1] * (k + 2) + [0] * (max_length - k - 2)
        row += n


@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 7, 32]))
def test_shuffled_batches_cover_the_split_once_and_repeat_with_the_seed(seed, batch_size):
    def labels(rng):
        return np.concatenate([b["labels"] for b in classification_batches(
            CHAR, DOCS, "validation", batch_size=batch_size, max_length=8, rng=rng)])

    a, b = labels(np.random.default_rng(seed)), labels(np.random.default_rng(seed))
    assert np.array_equal(a, b)
    order = np.random.default_rng(seed).permutation(len(DOCS.validation))
    assert np.array_equal(a, DOCS.labels("validation")[order])


@given(st.sampled_from([3, 5, 12, 40, 200]), st.booleans())
def test_token_batches_align_tags(max_length, label_all_pieces):
    specials = SpecialIds(cls=1000, sep=1001, mask=1002, pad=1003, vocab_size=1004)
    examples = TOKENS.test[:40]
    (batch,) = classification_batches(CHAR, TOKENS, "test", batch_size=len(TOKENS.test), max_length=max_length,
                                      rng=None, specials=specials, label_all_pieces=label_all_pieces)
    assert batch["labels"].shape == batch["input_ids"].shape == (len(TOKENS.test), max_length)
    for r, e in enumerate(examples):
        ids, word_ids = encode_words(CHAR, e)
        k = min(len(ids), max_length - 2)
        assert batch["input_ids"][r, 0] == 1000 and batch["input_ids"][r, k + 1] == 1001
        assert batch["input_ids"][r, 1:k + 1].tolist() == ids[:k]
        expected = [-100] + align_labels(word_ids, e.tags, label_all_pieces=label_all_pieces)[:k].tolist()
        expected += [-100] * (max_length - len(expected))
        assert batch["labels"][r].tolist() == expected
        kept = [w for w in dict.fromkeys(v for v in word_ids[:k] if v is not None)]  # words whose first piece fits
        if not label_all_pieces:
            assert batch["labels"][r][batch["labels"][r] != -100].tolist() == [e.tags[w] for w in kept]


# -- metrics -------------------------------------------------------------------------------------

def test_metrics_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 1, 0, 1, 2, 2])
    assert accuracy(y, p) == pytest.approx(4 / 6)
    assert confusion_matrix(y, p, 3).tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # F1: class 0: 2*2/(4+0+1) = 0.8; class 1: 2/(2+1+1) = 0.5; class 2: 2/(2+1+0) = 2/3
    assert macro_f1(y, p, 3) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert macro_f1(y, p, 5) == macro_f1(y, p, 3)  # classes 3, 4 occur nowhere: not averaged
    # class 1 only predicted: F1 = 0 and it counts
    assert macro_f1(np.array([0, 0]), np.array([0, 1]), 2) == pytest.approx((2 / 3 + 0.0) / 2)
    assert majority_baseline(np.array([2, 2, 1, 0, 2]), np.array([2, 0, 0, 2])) == 0.5
    assert majority_baseline(np.array([1, 0, 1, 0]), np.array([0, 0, 1])) == pytest.approx(2 / 3)  # tie: lowest
    labels = np.array([[-100, 3, -100, 1], [2, -100, -100, -100]])
    preds = np.array([[9, 3, 9, 0], [2, 5, 5, 5]])
    assert token_accuracy(labels, preds) == pytest.approx(2 / 3)
    assert token_accuracy(labels, preds, ignore_index=1) == pytest.approx(2 / 7)  # 3 and 2 match
    report = classification_metrics(y, p, 3, train_labels=np.array([1, 1, 0]))
    assert report["accuracy"] == accuracy(y, p) and report["macro_f1"] == macro_f1(y, p, 3)
    assert report["majority_baseline"] == pytest.approx(2 / 6)
    assert "majority_baseline" not in classification_metrics(y, p, 3)


@st.composite
def label_pairs(draw):
    K = draw(st.integers(1, 6))
    N = draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = rng.integers(0, K, size=N)
    p = np.where(rng.random(N) < 0.5, y, rng.integers(0, K, size=N))
    dtype = draw(st.sampled_from([np.int64, np.int32, np.uint8]))
    return y.astype(dtype), p.astype(dtype), K


@given(label_pairs())
def test_metrics_against_loops(case):
    y, p, K = case
    N = len(y)
    C = confusion_matrix(y, p, K)
    loop = np.zeros((K, K), dtype=np.int64)
    for a, b in zip(y.tolist(), p.tolist()):
        loop[a, b] += 1
    assert np.array_equal(C, loop) and C.dtype == np.int64
    assert accuracy(y, p) == pytest.approx(sum(a == b for a, b in zip(y.tolist(), p.tolist())) / N)
    assert accuracy(y, p) == pytest.approx(np.trace(C) / N)
    f1s = []
    for k in range(K):
        tp = sum(a == k and b == k for a, b in zip(y.tolist(), p.tolist()))
        fp = sum(a != k and b == k for a, b in zip(y.tolist(), p.tolist()))
        fn = sum(a == k and b != k for a, b in zip(y.tolist(), p.tolist()))
        if tp + fp + fn:
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    assert macro_f1(y, p, K) == pytest.approx(np.mean(f1s), abs=1e-12)
    assert macro_f1(y, y, K) == 1.0
    # The baseline is the majority share, and the accuracy of a constant prediction.
    counts = [int(np.sum(y == k)) for k in range(K)]
    top = counts.index(max(counts))
    assert majority_baseline(y, y) == pytest.approx(max(counts) / N)
    assert majority_baseline(y, p) == accuracy(p, np.full(N, top, dtype=p.dtype))
    mask = np.where(np.arange(N) % 3 == 0, IGNORE_INDEX, y.astype(np.int64))
    if (mask != IGNORE_INDEX).any():
        keep = mask != IGNORE_INDEX
        assert token_accuracy(mask, p.astype(np.int64)) == pytest.approx(np.mean(y[keep] == p[keep]))


@pytest.mark.parametrize("task", [DOCS, TOKENS], ids=["docstrings", "tokens"])
def test_task_majority_baseline_is_the_majority_share(task):
    train = task.class_counts("train")
    top = int(np.argmax(train))
    for s in SPLITS:
        counts = task.class_counts(s)
        assert task.majority_baseline(s) == pytest.approx(counts[top] / counts.sum())
    assert task.majority_baseline("train") == pytest.approx(train.max() / train.sum())


# -- bad input -----------------------------------------------------------------------------------

Y = np.array([0, 1, 1])


@pytest.mark.parametrize("call, func, arg", [
    (lambda: docstring_task("json"), "docstring_task", "modules"),
    (lambda: docstring_task(()), "docstring_task", "modules"),
    (lambda: docstring_task(("json", "json")), "docstring_task", "modules"),
    (lambda: docstring_task(("itertools",)), "docstring_task", "modules"),
    (lambda: docstring_task(("../etc",)), "docstring_task", "modules"),
    (lambda: docstring_task(max_chars=0), "docstring_task", "max_chars"),
    (lambda: docstring_task(min_words=1.5), "docstring_task", "min_words"),
    (lambda: docstring_task(fractions=(0.5, 0.5)), "docstring_task", "fractions"),
    (lambda: docstring_task(fractions=(0.5, 0.2, 0.2)), "docstring_task", "fractions"),
    (lambda: docstring_task(fractions=(0.0, 0.5, 0.5)), "docstring_task", "fractions"),
    (lambda: token_task([1]), "token_task", "modules"),
    (lambda: token_task(fractions=(np.nan, 0.5, 0.5)), "token_task", "fractions"),
    (lambda: load_task("glue"), "load_task", "name"),
    (lambda: split_of(b"x"), "split_of", "text"),
    (lambda: split_of("x", (1.2, -0.1, -0.1)), "split_of", "fractions"),
    (lambda: clean_docstring(None), "clean_docstring", "doc"),
    (lambda: clean_docstring("x", True), "clean_docstring", "max_chars"),
    (lambda: tag_source(b"x = 1"), "tag_source", "source"),
    (lambda: tag_source("x = (\n"), "tag_source", "source"),
    (lambda: DOCS.split("dev"), "Task.split", "split"),
    (lambda: DOCS.labels(0), "Task.labels", "split"),
    (lambda: DOCS.majority_baseline("valid"), "Task.majority_baseline", "split"),
    (lambda: encode_words("abc", TOKENS.test[0]), "encode_words", "tokenizer"),
    (lambda: encode_words(CHAR, DOCS.test[0]), "encode_words", "example"),
    (lambda: encode_words(CHAR, TaggedLine(("a",), (), (0,), "")), "encode_words", "example"),
    (lambda: align_labels(np.array([0]), [1]), "align_labels", "word_ids"),
    (lambda: align_labels([0, 1], [1]), "align_labels", "word_ids"),
    (lambda: align_labels([-1], [1]), "align_labels", "word_ids"),
    (lambda: align_labels([0.0], [1]), "align_labels", "word_ids"),
    (lambda: align_labels([True], [1]), "align_labels", "word_ids"),
    (lambda: align_labels([0], [1.5]), "align_labels", "word_labels"),
    (lambda: align_labels([0], "a"), "align_labels", "word_labels"),
    (lambda: align_labels([0], [1], label_all_pieces=1), "align_labels", "label_all_pieces"),
    (lambda: classification_batches(None, DOCS, "train", rng=None), "classification_batches", "tokenizer"),
    (lambda: classification_batches(CHAR, "docstrings", "train", rng=None), "classification_batches", "task"),
    (lambda: classification_batches(CHAR, DOCS, "dev", rng=None), "classification_batches", "split"),
    (lambda: classification_batches(CHAR, DOCS, "train", batch_size=0, rng=None), "classification_batches",
     "batch_size"),
    (lambda: classification_batches(CHAR, DOCS, "train", max_length=2, rng=None), "classification_batches",
     "max_length"),
    (lambda: classification_batches(CHAR, DOCS, "train", max_length=8.0, rng=None), "classification_batches",
     "max_length"),
    (lambda: classification_batches(CHAR, DOCS, "train", rng=0), "classification_batches", "rng"),
    (lambda: classification_batches(CHAR, DOCS, "train", rng=None, specials=(1, 2, 3, 4, 5)),
     "classification_batches", "specials"),
    (lambda: classification_batches(CHAR, DOCS, "train", rng=None, label_all_pieces="no"),
     "classification_batches", "label_all_pieces"),
    (lambda: accuracy([0, 1], np.array([0, 1])), "accuracy", "labels"),
    (lambda: accuracy(Y, Y.astype(float)), "accuracy", "predictions"),
    (lambda: accuracy(Y, Y[:2]), "accuracy", "predictions"),
    (lambda: accuracy(Y[None], Y[None]), "accuracy", "labels"),
    (lambda: accuracy(Y[:0], Y[:0]), "accuracy", "labels"),
    (lambda: confusion_matrix(Y, Y, 0), "confusion_matrix", "num_labels"),
    (lambda: confusion_matrix(Y, Y, 1), "confusion_matrix", "labels"),
    (lambda: confusion_matrix(Y, -Y, 2), "confusion_matrix", "predictions"),
    (lambda: macro_f1(Y, Y, 2.0), "macro_f1", "num_labels"),
    (lambda: macro_f1(Y, Y + 5, 2), "macro_f1", "predictions"),
    (lambda: macro_f1(Y[:0], Y[:0], 2), "macro_f1", "labels"),
    (lambda: majority_baseline(Y[:0], Y), "majority_baseline", "train_labels"),
    (lambda: majority_baseline(-Y - 1, Y), "majority_baseline", "train_labels"),
    (lambda: majority_baseline(Y, Y.astype(float)), "majority_baseline", "eval_labels"),
    (lambda: majority_baseline(Y, Y[None]), "majority_baseline", "eval_labels"),
    (lambda: token_accuracy(np.full(3, -100), Y), "token_accuracy", "labels"),
    (lambda: token_accuracy(Y, Y[None]), "token_accuracy", "predictions"),
    (lambda: token_accuracy(Y, Y, ignore_index=None), "token_accuracy", "ignore_index"),
    (lambda: classification_metrics(Y, Y, 2, train_labels=[1]), "majority_baseline", "train_labels"),
])
def test_bad_input_is_named(call, func, arg):
    message = expect_rejected(call, func, arg)
    assert "expected" in message


def test_tokenizer_returning_bad_ids_is_named():
    class Floats:
        vocab_size = 5

        def encode(self, text):
            return [0.5] * len(text)

    batches = classification_batches(Floats(), DOCS, "test", batch_size=2, max_length=8, rng=None)
    expect_rejected(lambda: next(batches), "classification_batches", "tokenizer")
    expect_rejected(lambda: encode_words(Floats(), TOKENS.test[0]), "encode_words", "tokenizer")


def test_task_is_immutable():
    with pytest.raises(AttributeError):
        DOCS.train = ()
    assert isinstance(DOCS, Task) and isinstance(DOCS.train, tuple)


def test_byte_bpe_batches_label_every_word_that_fits():
    """A byte-level tokenizer (no merges: one piece per UTF-8 byte) with its four new special ids after 256."""
    from npformer.data import ByteBPE

    bpe = ByteBPE()
    S = special_ids_for(bpe)
    assert (S.cls, S.sep, S.pad) == (256, 257, 259)
    examples = TOKENS.validation[:16]
    batch = next(classification_batches(bpe, TOKENS, "validation", batch_size=16, max_length=512, rng=None))
    for r, e in enumerate(examples):
        n = len(e.text.encode("utf-8"))
        assert batch["attention_mask"][r].sum() == n + 2
        assert bpe.decode(batch["input_ids"][r, 1:n + 1].tolist()) == e.text
        assert batch["labels"][r][batch["labels"][r] != -100].tolist() == list(e.tags)
    batch = next(classification_batches(bpe, DOCS, "validation", batch_size=4, max_length=20, rng=None))
    for r, e in enumerate(DOCS.validation[:4]):
        k = min(len(e.text.encode("utf-8")), 18)
        assert batch["input_ids"][r, k + 1] == S.sep and batch["attention_mask"][r].sum() == k + 2
