"""npformer.reasoning: decoding and exact match by length, a tiny trained run, grokking's bookkeeping, the CLI."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npformer.cli import main
from npformer.data.arithmetic import KINDS, ReasoningTask, exact_match, full_tokenizer
from npformer.reasoning import (GrokkingRecord, LengthScore, ModelShape, ReasoningError, answer, build_model,
                                evaluate_by_length, exact_match_by_length, grokking_verdict, heldout_by_length,
                                run_grokking, study_length, study_tasks, task_batches, teacher_forced_exact,
                                train_steps)
from tests.strategies import rngs

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

TOK = full_tokenizer()


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Tiny matrices: one BLAS thread is far faster than two competing for a busy machine."""
    if threadpool_limits is None:  # pragma: no cover
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield
TINY = ModelShape(n_layer=1, n_head=2, d_model=16)


class FakeCache:
    def __init__(self, batch):
        self.tokens = np.zeros((batch, 0), np.int64)

    @property
    def length(self):
        return self.tokens.shape[1]


class FakeAnswerer:
    """A 'model' that writes each prompt's line from a table (so it answers correctly by construction),
    except for the prompts in ``wrong``, whose answers it spoils by appending a digit."""

    def __init__(self, items, wrong=(), block_size=64):
        self.lines = {p.prompt: p.target + ("7" if p.prompt in wrong else "") + "\n" for p in items}
        self.cfg = SimpleNamespace(block_size=block_size, vocab_size=TOK.vocab_size)
        self.training = True
        self.cached_calls = 0
        self.widths = []

    def train(self, mode=True):
        self.training = mode

    def eval(self):
        self.training = False

    def make_kv_caches(self, batch, max_len=None):
        return [FakeCache(batch)]

    def _next(self, text):
        prompt = text[:text.index("=") + 1]
        line = self.lines[prompt]
        done = text[len(prompt):]
        return line[len(done)] if len(done) < len(line) else "\n"

    def forward(self, ids, targets=None, kv_caches=None, **options):
        self.widths.append(ids.shape[1])
        if kv_caches is not None:
            self.cached_calls += 1
            kv_caches[0].tokens = np.concatenate([kv_caches[0].tokens, ids], axis=1)
            ctx = kv_caches[0].tokens
        else:
            ctx = ids
        B, T = ids.shape
        logits = np.zeros((B, T, TOK.vocab_size), np.float32)
        offset = ctx.shape[1] - T
        for b in range(B):
            text = TOK.decode(ctx[b].tolist())
            for t in range(T):
                prefix = text[:offset + t + 1]
                if "=" in prefix:
                    logits[b, t, TOK.stoi[self._next(prefix)]] = 10.0
        return logits, None


def sample_items(rng, kinds=KINDS, per=6):
    items = []
    for kind in kinds:
        for fmt in ({}, {"reverse": True, "index_hints": True}, {"scratchpad": kind != "compare"}):
            items += ReasoningTask(kind, 3, min_digits=1, **fmt).sample(rng, per)
    return items


# -- exact match by length: accounting on a model that answers correctly by construction ----------------
@settings(max_examples=8)
@given(rng=rngs(), batch_size=st.sampled_from([1, 3, 256]))
def test_fake_answerer_is_answered_exactly(rng, batch_size):
    items = sample_items(rng)
    model = FakeAnswerer(items)
    got = answer(model, items, TOK, batch_size=batch_size)
    assert got == [p.target for p in items]
    assert model.cached_calls > 0 and 1 in model.widths  # incremental decoding: one new token per call
    scores = exact_match_by_length(got, items)
    assert sum(s.total for s in scores) == len(items) and all(s.correct == s.total for s in scores)
    assert teacher_forced_exact(FakeAnswerer(items), items, TOK).all()


@settings(max_examples=8)
@given(rng=rngs(), wrong_length=st.integers(1, 3))
def test_accounting_by_length(rng, wrong_length):
    """The fake answerer spoils every problem of one length: that length scores 0, the others 1, counts exact."""
    items = heldout_by_length("add", [1, 2, 3], 9, rng)
    wrong = {p.prompt for p in items if p.length == wrong_length}
    model = FakeAnswerer(items, wrong)
    scores = evaluate_by_length(model, items, TOK)
    assert [s.length for s in scores] == [1, 2, 3]
    for s in scores:
        n = sum(p.length == s.length for p in items)
        assert s.total == n and s.correct == (0 if s.length == wrong_length else n)
    assert scores[wrong_length - 1].accuracy == 0.0
    hits = teacher_forced_exact(FakeAnswerer(items, wrong), items, TOK)
    assert list(hits) == [p.prompt not in wrong for p in items]
    got = answer(FakeAnswerer(items, wrong), items, TOK)
    assert exact_match(got, items) == pytest.approx(sum(s.correct for s in scores) / len(items))


@settings(max_examples=8)
@given(rng=rngs(), spoil=st.sampled_from(["working", "answer", "both"]))
def test_teacher_forced_exact_agrees_with_exact_match_with_a_scratchpad(rng, spoil):
    """With scratchpad=True, exact_match scores the answer after ";" alone: a row whose working differs from
    the target's but whose answer is right counts in both, a wrong answer in neither."""
    items = []
    for kind in ("add", "sub", "mul", "mod"):
        items += ReasoningTask(kind, 2, min_digits=1, scratchpad=True).sample(rng, 5)
    model = FakeAnswerer(items)
    for p in items[::2]:  # every other row: other working, or another answer, or both
        working, ans = p.scratchpad, p.answer
        if spoil in ("working", "both"):
            working = "9" + working
        if spoil in ("answer", "both"):
            ans = ans + "7"
        model.lines[p.prompt] = f"{working};{ans}\n"
    got = answer(model, items, TOK)
    expected = [exact_match([g], [p]) == 1.0 for g, p in zip(got, items)]
    hits = teacher_forced_exact(model, items, TOK)
    assert list(hits) == expected
    assert hits.mean() == pytest.approx(exact_match(got, items))
    assert hits.sum() == (len(items) if spoil == "working" else len(items) // 2)


def test_the_default_output_folders_are_under_runs():
    from npformer.cli import build_parser

    parser = build_parser()[0]
    for study in ("tasks", "length", "grokking"):
        args = parser.parse_args(["reasoning", study])
        assert args.out == f"runs/reasoning_{study}" and not args.out.startswith("demos")


def test_heldout_by_length_is_distinct_and_held_out():
    items = heldout_by_length("add", [1, 2], 50, np.random.default_rng(0))
    ones = [p for p in items if p.length == 1]
    assert 0 < len(ones) <= 20 and sum(p.length == 2 for p in items) == 50  # about 10 of 100 one-digit pairs
    assert len({p.operands for p in items}) == len(items)
    assert all(p.task.is_heldout(p) and all(len(str(v)) == p.length for v in p.operands) for p in items)


def test_exact_match_by_length_bad_input():
    items = heldout_by_length("add", [1], 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="exact_match_by_length: argument 'generated'"):
        exact_match_by_length(["1"], items)
    assert LengthScore(3, 0, 0).accuracy != LengthScore(3, 0, 0).accuracy  # NaN for an empty group
    assert answer(FakeAnswerer(items), [], TOK) == []


# -- a tiny trained run -------------------------------------------------------------------------------
def test_tiny_run_beats_chance_on_one_digit_addition():
    """1-digit addition (answers 0..18, reversed): a tiny model well above the 1/19 of a guess, and greedy
    decoding with the KV cache agrees with the teacher-forced count."""
    task = ReasoningTask("add", 1, reverse=True)
    model = build_model("learned", TOK.vocab_size, task.max_line_length, ModelShape(1, 2, 32), seed=0)
    losses = train_steps(model, task_batches(task, np.random.default_rng(0), 64, TOK), 250, lr=1e-2, warmup=20)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    items = task.all_pairs()
    got = answer(model, items, TOK)
    acc = exact_match(got, items)
    assert acc > 0.3, acc
    greedy_hits = np.array([g == p.target for g, p in zip(got, items)])
    assert np.mean(greedy_hits == teacher_forced_exact(model, items, TOK)) >= 0.98


# -- grokking's bookkeeping ---------------------------------------------------------------------------
@pytest.mark.parametrize("steps, eval_every, expected", [(7, 3, [0, 3, 6, 7]), (6, 3, [0, 3, 6]), (2, 5, [0, 2])])
def test_grokking_records_at_the_right_steps(steps, eval_every, expected):
    record, facts = run_grokking(p=5, train_fraction=0.6, steps=steps, batch_size=4, lr=1e-2,
                                 eval_every=eval_every, shape=TINY)
    assert record.steps == expected
    assert len(record.train_acc) == len(record.val_acc) == len(record.train_loss) == len(expected)
    assert facts["train_pairs"] + facts["heldout_pairs"] == 25
    task = ReasoningTask("mod", 1, fixed_width=True, p=5, heldout_fraction=0.4)
    train, val = task.split_pairs(task.all_pairs())
    assert len(train) == facts["train_pairs"]
    # the last record is the final model's accuracy, recomputed independently
    assert record.train_acc[-1] == pytest.approx(teacher_forced_exact(record.model, train, TOK).mean())
    assert record.val_acc[-1] == pytest.approx(teacher_forced_exact(record.model, val, TOK).mean())
    assert facts["final_val"] == record.val_acc[-1]


def test_first_step_at_and_verdict():
    r = GrokkingRecord(steps=[0, 10, 20, 30], train_loss=[1] * 4, train_acc=[0, 1.0, 1.0, 1.0],
                       val_acc=[0, 0.2, 0.6, 0.995])
    assert r.first_step_at("train_acc", 0.99) == 10 and r.first_step_at("val_acc", 0.5) == 20
    assert r.first_step_at("val_acc", 0.999) is None
    facts = {"train_99": 100, "val_99": None, "final_train": 1.0, "final_val": 0.1}
    assert "no delayed generalisation" in grokking_verdict(facts, 1000)
    rising = grokking_verdict(dict(facts, val_at_train_99=0.6, final_val=0.9), 1000)
    assert "kept rising" in rising and "held-out then 60.0%" in rising
    assert "delayed generalisation: " in grokking_verdict(dict(facts, val_99=900, final_val=1.0), 1000)
    assert "close together" in grokking_verdict(dict(facts, val_99=150, final_val=1.0), 1000)
    never = dict(facts, train_99=None, final_train=0.01, final_val=0.01)
    assert "no memorisation yet" in grokking_verdict(never, 1000)
    together = grokking_verdict(dict(never, final_train=0.91, final_val=0.89), 1000)
    assert "without a memorisation phase" in together and "train 91.0%, held-out 89.0%" in together


# -- studies' bad arguments, by name -----------------------------------------------------------------------
@pytest.mark.parametrize("call, name", [
    (lambda out: study_tasks(out, kinds=["add", "div"]), "kinds"),
    (lambda out: study_tasks(out, kinds=[]), "kinds"),
    (lambda out: study_tasks(out, digits=5), "digits"),
    (lambda out: study_tasks(out, steps=0), "steps"),
    (lambda out: study_tasks(out, lr=-1.0), "lr"),
    (lambda out: study_tasks(out, reverse="yes"), "reverse"),
    (lambda out: study_tasks(out, shape=ModelShape(1, 3, 16)), "n_head"),
    (lambda out: study_length(out, kind="chain"), "kind"),
    (lambda out: study_length(out, positions=("learned", "learned")), "positions"),
    (lambda out: study_length(out, train_digits=0), "train_digits"),
    (lambda out: study_length(out, reverse_modes=()), "reverse_modes"),
    (lambda out: study_length(out, index_hints=1), "index_hints"),
    (lambda out: run_grokking(p=1), "p"),
    (lambda out: run_grokking(train_fraction=1.0), "train_fraction"),
    (lambda out: run_grokking(weight_decay=-1.0), "weight_decay"),
    (lambda out: run_grokking(eval_every=0), "eval_every"),
    (lambda out: build_model("xpos", 10, 8), "position"),
])
def test_bad_study_arguments(tmp_path, call, name):
    with pytest.raises(ReasoningError) as info:
        call(tmp_path / "out")
    assert info.value.field == name and f"argument '{name}'" in str(info.value)
    assert not (tmp_path / "out").exists()  # checked before any work


# -- the command ------------------------------------------------------------------------------------------
FAST = ["--steps", "3", "--n-layer", "1", "--n-head", "2", "--d-model", "16"]


def test_cli_tasks_writes_tables_and_plot(tmp_path, capsys):
    out = tmp_path / "tasks"
    rc = main(["reasoning", "tasks", "--kinds", "add,compare", "--digits", "2", "--eval-problems", "4",
               "--out", str(out)] + FAST)
    assert rc == 0
    rows = list(csv.DictReader(open(out / "tasks.csv")))
    assert [(r["task"], r["length"], r["total"]) for r in rows] == [("add", "1", "4"), ("add", "2", "4"),
                                                                    ("compare", "1", "4"), ("compare", "2", "4")]
    assert all(0 <= float(r["exact_match"]) <= 1 for r in rows)
    assert (out / "tasks.png").stat().st_size > 1000 and (out / "tasks.md").read_text().startswith("| task |")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["study"] == "tasks" and summary["seconds"] > 0
    assert "tables and plots in" in capsys.readouterr().out


def test_cli_length_and_grokking(tmp_path):
    out = tmp_path / "length"
    assert main(["reasoning", "length", "--train-digits", "1", "--positions", "learned", "--reverse-modes",
                 "reversed,plain", "--eval-problems", "3", "--index-hints", "--out", str(out)] + FAST) == 0
    rows = list(csv.DictReader(open(out / "length.csv")))
    assert [(r["reversed"], r["length"], r["seen"]) for r in rows] == [
        ("True", "1", "train"), ("True", "2", "unseen"), ("False", "1", "train"), ("False", "2", "unseen")]
    assert (out / "length.png").exists()
    out = tmp_path / "grok"
    assert main(["reasoning", "grokking", "--p", "5", "--eval-every", "2", "--batch-size", "8",
                 "--out", str(out)] + FAST) == 0
    rows = list(csv.DictReader(open(out / "grokking.csv")))
    assert [r["step"] for r in rows] == ["0", "2", "3"]
    assert "verdict" in json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("argv, flag", [
    (["tasks", "--steps", "0"], "--steps"),
    (["tasks", "--kinds", "add,div"], "--kinds"),
    (["tasks", "--digits", "7"], "--digits"),
    (["tasks", "--lr", "0"], "--lr"),
    (["tasks", "--d-model", "10", "--n-head", "4"], "--n-head"),
    (["length", "--positions", "learned,xpos"], "--positions"),
    (["length", "--reverse-modes", "backwards"], "--reverse-modes"),
    (["length", "--kind", "chain"], "--kind"),
    (["grokking", "--p", "1"], "--p"),
    (["grokking", "--train-fraction", "1.5"], "--train-fraction"),
    (["grokking", "--weight-decay", "-1"], "--weight-decay"),
    (["grokking", "--eval-every", "0"], "--eval-every"),
    (["grokking", "--steps", "many"], "--steps"),
])
def test_cli_bad_arguments_by_name(tmp_path, capsys, argv, flag):
    assert main(["reasoning"] + argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_cli_unknown_study_and_flag(capsys):
    assert main(["reasoning", "nope"]) == 2
    assert main(["reasoning", "tasks", "--no-such-flag"]) == 2
    assert main(["reasoning", "tasks", "--help"]) == 0
    assert "--eval-problems" in capsys.readouterr().out
