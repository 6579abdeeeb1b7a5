"""ReasoningTask: every kind and format, answers parsing back, working, splits, batches, bad input."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.data.arithmetic import (CHAIN_ORDERS, FULL_VOCAB, IGNORE_INDEX, KINDS, ArithmeticTask, Item,
                                      ReasoningTask, exact_match, full_tokenizer, heldout_mask, make_batch,
                                      tokenizer)
from tests.badinput import BAD_COUNTS, BAD_FLAGS, expect_rejected, rejects_all
from tests.strategies import rngs

FORMATS = st.fixed_dictionaries({"fixed_width": st.booleans(), "reverse": st.booleans(),
                                 "index_hints": st.booleans(), "scratchpad": st.booleans()})


def make_task(kind, digits, fmt, min_digits=1, p=97):
    fmt = dict(fmt, scratchpad=fmt["scratchpad"] and kind != "compare")
    return ReasoningTask(kind, digits, min_digits=min_digits, p=p, **fmt)


def true_value(item):
    """The value computed from the operands with Python's own precedence (an independent evaluation)."""
    v, kind = item.operands, item.task.kind
    if kind == "compare":
        return int(np.sign(v[0] - v[1]))
    if kind == "mod":
        return (v[0] + v[1]) % item.task.p
    if kind == "chain":
        return eval(f"{v[0]}{item.ops[0]}{v[1]}{item.ops[1]}{v[2]}")
    return eval(f"{v[0]}{ {'add': '+', 'sub': '-', 'mul': '*'}[kind]}{v[1]}")


# -- formats: one example line per kind and option, as the module documents them ---------------------------
@pytest.mark.parametrize("task, operands, ops, line", [
    (ReasoningTask("add", 3), (352, 469), (), "352+469=821\n"),
    (ReasoningTask("sub", 3), (35, 469), (), "35-469=-434\n"),
    (ReasoningTask("mul", 3), (12, 34), (), "12*34=408\n"),
    (ReasoningTask("compare", 3), (123, 456), (), "123?456=<\n"),
    (ReasoningTask("compare", 3), (456, 456), (), "456?456==\n"),
    (ReasoningTask("mod", 3), (35, 80), (), "(35+80)%97=18\n"),
    (ReasoningTask("mod", 3, p=7), (35, 80), (), "(35+80)%7=3\n"),
    (ReasoningTask("chain", 3), (12, 34, 2), ("+", "*"), "12+34*2=80\n"),
    (ReasoningTask("chain", 3), (12, 3, 4), ("-", "-"), "12-3-4=5\n"),
    (ReasoningTask("chain", 3), (12, 3, 4), ("*", "+"), "12*3+4=40\n"),
    (ReasoningTask("chain", 3), (12, 3, 4), ("-", "*"), "12-3*4=0\n"),
    (ReasoningTask("add", 3, index_hints=True), (352, 469), (), "c3b5a2+c4b6a9=c8b2a1\n"),
    (ReasoningTask("add", 3, index_hints=True, reverse=True), (352, 469), (), "c3b5a2+c4b6a9=a1b2c8\n"),
    (ReasoningTask("sub", 3, index_hints=True, reverse=True), (5, 46), (), "a5-b4a6=a1b4-\n"),
    (ReasoningTask("add", 3, scratchpad=True), (352, 469), (), "352+469=110;821\n"),
    (ReasoningTask("sub", 3, scratchpad=True), (352, 469), (), "352-469=000;-117\n"),
    (ReasoningTask("sub", 3, scratchpad=True), (402, 17), (), "402-17=110;385\n"),
    (ReasoningTask("mul", 3, scratchpad=True), (12, 34), (), "12*34=48,36;408\n"),
    (ReasoningTask("mod", 3, scratchpad=True), (35, 80), (), "(35+80)%97=115;18\n"),
    (ReasoningTask("chain", 3, scratchpad=True), (12, 34, 2), ("+", "*"), "12+34*2=68;80\n"),
    (ReasoningTask("add", 3, fixed_width=True, reverse=True), (7, 456), (), "007+456=3640\n"),
])
def test_documented_lines(task, operands, ops, line):
    item = task.item(*operands, ops=ops)
    assert item.text == line
    assert item.parse(item.target) == item.result == true_value(item)
    assert CHAIN_ORDERS == ("precedence",)


@pytest.mark.parametrize("op, kind", [("+", "add"), ("-", "sub"), ("*", "mul")])
@given(rng=rngs(), fixed=st.booleans(), reverse=st.booleans())
def test_plain_kinds_match_arithmetic_task(op, kind, rng, fixed, reverse):
    """With no new option a ReasoningTask writes ArithmeticTask's lines and keeps its split."""
    old = ArithmeticTask(op, 3, fixed_width=fixed, reverse=reverse)
    new = ReasoningTask(kind, 3, fixed_width=fixed, reverse=reverse, heldout_fraction=0.1)
    for p in old.sample(rng, 20, "train") + old.sample(rng, 20, "heldout"):
        item = new.item(p.a, p.b)
        assert item.text == p.text
        assert new.is_heldout(item) == bool(old.is_heldout(p.a, p.b))


# -- every format parses back to the true value --------------------------------------------------------
@settings(max_examples=40)
@given(rng=rngs(), kind=st.sampled_from(KINDS), digits=st.integers(1, 5), fmt=FORMATS,
       p=st.sampled_from([2, 7, 97, 1009]))
def test_answers_parse_back(rng, kind, digits, fmt, p):
    task = make_task(kind, digits, fmt, p=p)
    for item in task.sample(rng, 30):
        assert item.text == item.prompt + item.target + "\n"
        assert item.parse(item.target) == item.result == true_value(item)
        assert item.parse(item.target + "\n") == item.result  # the closing newline is ignored
        assert set(item.text) <= set(FULL_VOCAB)
        assert len(item.text) <= task.max_line_length
        assert exact_match([item.target], [item]) == 1.0 and exact_match([item.result], [item]) == 1.0


@given(kind=st.sampled_from(KINDS), digits=st.integers(1, 4), fmt=FORMATS)
def test_max_line_length_bounds_the_extremes(kind, digits, fmt):
    """No extreme problem (0 or 10^digits - 1 everywhere, every operator pair) writes a longer line."""
    task = make_task(kind, digits, fmt, min_digits=None)
    big = 10**digits - 1
    ops = list(itertools.product("+-*", repeat=2)) if kind == "chain" else [()]
    cands = [task.item(*v, ops=o) for v in itertools.product((0, big), repeat=task.n_operands) for o in ops]
    if kind == "mod":
        cands += [task.item(a, b) for a in range(min(97, big + 1)) for b in (0,)]
    assert max(len(c.text) for c in cands) <= task.max_line_length
    longest_prompt = max(len(c.prompt) for c in cands)
    assert longest_prompt < task.max_line_length


@given(kind=st.sampled_from([k for k in KINDS if k != "compare"]), fmt=FORMATS, value=st.integers(0, 10**6))
def test_wrong_answers_do_not_parse_to_the_value(kind, fmt, value):
    task = make_task(kind, 3, fmt, min_digits=None)
    item = task.item(*([value % 1000] * task.n_operands), ops=("+", "+") if kind == "chain" else ())
    assert item.parse("") is None and item.parse("x") is None
    if task.index_hints:  # a marker out of place is not an answer
        s = item.final(item.target)
        swapped = s.replace("a", "#").replace("b", "a").replace("#", "b")
        assert s == swapped or item.parse(swapped) is None
    if task.scratchpad:  # the working is not scored
        assert item.parse("999;" + item.answer) == item.result


def test_compare_answers():
    task = ReasoningTask("compare", 2)
    assert [task.item(a, b).answer for a, b in [(3, 40), (40, 40), (41, 40)]] == ["<", "=", ">"]
    assert [task.item(3, 4).parse(s) for s in ["<", "=", ">", "?", "<<"]] == [-1, 0, 1, None, None]


# -- scratchpads against an independent formula ------------------------------------------------------------
@given(a=st.integers(0, 10**6 - 1), b=st.integers(0, 10**6 - 1))
def test_carries_and_borrows(a, b):
    """Carry out of place i: (a mod 10^(i+1)) + (b mod 10^(i+1)) >= 10^(i+1); borrow taken at place i
    (big - small): big mod 10^(i+1) < small mod 10^(i+1)."""
    width = max(len(str(a)), len(str(b)))
    add = ReasoningTask("add", 6, scratchpad=True).item(a, b).scratchpad
    assert add == "".join(str(int(a % 10**(i + 1) + b % 10**(i + 1) >= 10**(i + 1))) for i in range(width))
    big, small = max(a, b), min(a, b)
    sub = ReasoningTask("sub", 6, scratchpad=True).item(a, b).scratchpad
    assert sub == "".join(str(int(big % 10**(i + 1) < small % 10**(i + 1))) for i in range(width))


@given(a=st.integers(0, 9999), b=st.integers(0, 9999))
def test_multiplication_working_sums_to_the_product(a, b):
    item = ReasoningTask("mul", 4, scratchpad=True).item(a, b)
    partials = [int(s) for s in item.scratchpad.split(",")]
    assert sum(v * 10**i for i, v in enumerate(partials)) == a * b == item.result


# -- mixed lengths ---------------------------------------------------------------------------------------
@given(rng=rngs(), lo=st.integers(1, 3), span=st.integers(0, 3), kind=st.sampled_from(KINDS))
def test_mixed_lengths_cover_the_range(rng, lo, span, kind):
    task = ReasoningTask(kind, lo + span, min_digits=lo)
    items = task.sample(rng, 400)
    for item in items:
        assert all(lo <= len(str(v)) <= lo + span for v in item.operands)
        assert item.length == max(len(str(v)) for v in item.operands)
    assert {i.length for i in items} <= set(task.lengths) == set(range(lo, lo + span + 1))
    assert max(i.length for i in items) == lo + span  # the longest length is the commonest: always drawn


# -- splits ------------------------------------------------------------------------------------------------
@settings(max_examples=20)
@given(rng=rngs(), kind=st.sampled_from(KINDS), digits=st.integers(1, 3), fraction=st.sampled_from([0.1, 0.5, 0.9]))
def test_heldout_split_disjoint(rng, kind, digits, fraction):
    task = ReasoningTask(kind, digits, min_digits=1, heldout_fraction=fraction)
    train = task.sample(rng, 200, "train")
    held = task.sample(rng, 200, "heldout")
    key = lambda p: (p.operands, p.ops)  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in held}
    assert not any(task.is_heldout(p) for p in train) and all(task.is_heldout(p) for p in held)
    # the side depends on the operands only: the same problem in another format and length range
    other = ReasoningTask(kind, 3, fixed_width=True, reverse=True, heldout_fraction=fraction)
    assert all(other.is_heldout(other.item(*p.operands, ops=p.ops)) for p in held)


def test_heldout_fraction_is_respected_and_commutative():
    task = ReasoningTask("mod", 2, p=97, heldout_fraction=0.3)
    train, held = task.split_pairs(task.all_pairs())
    assert len(train) + len(held) == 97 * 97
    assert abs(len(held) / 97**2 - 0.3) < 0.03
    assert all(task.is_heldout(task.item(b, a)) for a, b in (p.operands for p in held))  # a+b and b+a together
    add = ReasoningTask("add", 3)
    assert [add.is_heldout(add.item(a, b)) for a, b in [(3, 5), (5, 3)]] == [bool(heldout_mask("+", 3, 5, 0.1))] * 2


# -- batches -----------------------------------------------------------------------------------------------
@given(rng=rngs(), kind=st.sampled_from(KINDS), fmt=FORMATS)
def test_make_batch_loss_on_the_target(rng, kind, fmt):
    task = make_task(kind, 3, fmt)
    items = task.sample(rng, 7)
    tok = full_tokenizer()
    x, y, mask = make_batch(items, None)
    for b, item in enumerate(items):
        n = len(item.text) - 1
        assert tok.decode(x[b, :n].tolist()) == item.text[:-1]
        assert tok.decode(y[b][mask[b]].tolist()) == item.target + "\n"
        assert mask[b].sum() == len(item.target) + 1
    assert (y[~mask] == IGNORE_INDEX).all()


def test_make_batch_needs_the_characters():
    item = ReasoningTask("compare", 2).item(3, 4)
    expect_rejected(lambda: make_batch([item], tokenizer()), "make_batch", "tok")
    x, _, _ = make_batch([ArithmeticTask("+", 2).problem(1, 2), item])  # mixed lines: the full vocabulary
    assert x.max() < full_tokenizer().vocab_size


def test_exact_match_scores_the_final_answer():
    task = ReasoningTask("add", 3, scratchpad=True)
    items = [task.item(352, 469), task.item(1, 1)]
    assert exact_match(["999;821", "0;2\n"], items) == 1.0
    assert exact_match(["110;822", "0;2"], items) == 0.5
    assert exact_match(["821", "2"], items) == 1.0  # no working at all: the whole string is the answer


# -- bad input ---------------------------------------------------------------------------------------------
def test_bad_task_options():
    rejects_all(lambda bad: ReasoningTask(bad), "ReasoningTask", "kind", ["div", "", None, 3, "+"])
    rejects_all(lambda bad: ReasoningTask("add", bad), "ReasoningTask", "digits", BAD_COUNTS + (0, 10))
    rejects_all(lambda bad: ReasoningTask("add", 3, min_digits=bad), "ReasoningTask", "min_digits", (0, 4, 2.0, "1"))
    rejects_all(lambda bad: ReasoningTask("mod", 3, p=bad), "ReasoningTask", "p", (0, 1, -5, 2.5, None))
    for name in ("fixed_width", "reverse", "index_hints", "scratchpad"):
        rejects_all(lambda bad: ReasoningTask("add", 3, **{name: bad}), "ReasoningTask", name, BAD_FLAGS)
    rejects_all(lambda bad: ReasoningTask("add", 3, heldout_fraction=bad), "ReasoningTask", "heldout_fraction",
                (0.0, 1.0, -0.1, np.nan, "0.5"))
    expect_rejected(lambda: ReasoningTask("compare", 3, scratchpad=True), "ReasoningTask", "scratchpad")
    expect_rejected(lambda: ReasoningTask("chain", 9, index_hints=True), "ReasoningTask", "index_hints")


def test_bad_item_and_sample_arguments():
    task, chain = ReasoningTask("add", 2), ReasoningTask("chain", 2)
    expect_rejected(lambda: task.item(1), "ReasoningTask.item", "operands")
    expect_rejected(lambda: task.item(1, 100), "ReasoningTask.item", "operands[1]")
    expect_rejected(lambda: task.item(-1, 1), "ReasoningTask.item", "operands[0]")
    expect_rejected(lambda: chain.item(1, 2, 3), "ReasoningTask.item", "ops")
    expect_rejected(lambda: chain.item(1, 2, 3, ops=("/", "+")), "ReasoningTask.item", "ops")
    expect_rejected(lambda: chain.item(1, 2, 3, ops="++"), "ReasoningTask.item", "ops")
    rng = np.random.default_rng(0)
    expect_rejected(lambda: task.sample(0, 3), "ReasoningTask.sample", "rng")
    expect_rejected(lambda: task.sample(rng, 0), "ReasoningTask.sample", "n")
    expect_rejected(lambda: task.sample(rng, 3, "test"), "ReasoningTask.sample", "split")
    expect_rejected(lambda: task.is_heldout((1, 2)), "ReasoningTask.is_heldout", "item")
    expect_rejected(lambda: chain.all_pairs(), "ReasoningTask.all_pairs", "kind")
    expect_rejected(lambda: task.all_pairs(101), "ReasoningTask.all_pairs", "high")
    expect_rejected(lambda: task.item(1, 2).parse(5), "Item.final", "generated")
    expect_rejected(lambda: exact_match([1.5], [task.item(1, 2)]), "exact_match", "predicted_answers")
    assert isinstance(task.item(1, 2), Item)
