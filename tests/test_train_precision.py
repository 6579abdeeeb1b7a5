"""``npformer train --precision``: bf16 and fp16 working copies over float32 master weights in the
training loop, with dynamic loss scaling for fp16 and a fixed scale of 1 for bf16, exact resume, and the
float32 path left as it was."""

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npformer.mixed_precision as mixed_precision
import npformer.train as train_module
from npformer import checkpoint
from npformer.cli import main as cli_main
from npformer.mixed_precision import MixedPrecisionTrainer, round_bf16
from npformer.models import build as build_model
from npformer.models.gpt import GPT
from npformer.train import ConfigError, TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
QUIET = lambda *a: None  # noqa: E731
LOW = ["bfloat16", "float16"]


def tiny(root, **overrides):
    root.mkdir(parents=True, exist_ok=True)
    data = root / "corpus.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    base = dict(data=str(data), n_layer=1, n_head=2, d_model=16, block_size=16, batch_size=4, steps=20,
                warmup=2, eval_interval=10, eval_batches=2, sample_tokens=4, lr=1e-2,
                out_dir=str(root / "run"), progress=False)
    return TrainConfig(**{**base, **overrides})


def saved(summary):
    return checkpoint.load(summary["checkpoint"])


def assert_same_state(state, reference):
    """Every loss, weight, optimizer moment, generator and loss-scale entry equal, bit for bit."""
    assert state["step"] == reference["step"]
    assert state["history"] == reference["history"]
    assert state.get("mixed_precision") == reference.get("mixed_precision")
    assert set(state["model"]) == set(reference["model"])
    for name, w in reference["model"].items():
        np.testing.assert_array_equal(state["model"][name], w)
    assert set(state["optim"]["state"]) == set(reference["optim"]["state"])
    for index, moments in reference["optim"]["state"].items():
        for key, value in moments.items():
            np.testing.assert_array_equal(state["optim"]["state"][index][key], value)
    assert state["rng"] == reference["rng"]


def exact_rounding(x, precision):
    """round_to that keeps every float32 bit: the mixed-precision path with nothing lost to rounding."""
    return x.copy()


def forced_scale(monkeypatch, **options):
    """The trainer train() builds, with other loss-scaling options (a start that overflows, a short interval,
    dynamic scaling), which take precedence over train()'s own."""
    def build(*args, **kwargs):
        return MixedPrecisionTrainer(*args, **{**kwargs, **options})

    monkeypatch.setattr(train_module, "MixedPrecisionTrainer", build)


def inject(monkeypatch, owner, name, action, at):
    """Wrap ``owner.name``: after its calls number ``at`` (a set, 1-based, training calls only), run ``action``."""
    real = getattr(owner, name)
    calls = []

    def wrapper(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        if model.training:
            calls.append(1)
            if len(calls) in at:
                action(model)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


# -- the default path -----------------------------------------------------------------------------------
def test_the_default_is_float32_and_builds_no_trainer(tmp_path, monkeypatch):
    assert TrainConfig().precision == "float32"

    def refused(*args, **kwargs):
        raise AssertionError("a float32 run built a MixedPrecisionTrainer")

    monkeypatch.setattr(train_module, "MixedPrecisionTrainer", refused)
    lines = []
    summary = train(tiny(tmp_path), log=lines.append)
    state = saved(summary)
    assert state["config"]["precision"] == "float32" and "mixed_precision" not in state
    assert summary["loss_scale"] is None and summary["skipped_steps"] is None
    assert next(l for l in lines if l.startswith("model:")).endswith(", float32")


@pytest.mark.parametrize("precision", LOW)
def test_the_precision_path_without_rounding_is_the_float32_run_bit_for_bit(tmp_path, monkeypatch, precision):
    """With rounding that loses nothing, the working copy, the scaled and unscaled gradients (a power of
    two), the clipping of the masters' gradients, the update and the evaluation of the masters give
    exactly the float32 run: every loss, weight, moment and gradient-flow statistic."""
    opts = dict(dropout=0.1, gradflow_every=3)
    reference = saved(train(tiny(tmp_path / "f32", **opts), log=QUIET))
    monkeypatch.setattr(mixed_precision, "round_to", exact_rounding)
    summary = train(tiny(tmp_path / "low", precision=precision, **opts), log=QUIET)
    state = saved(summary)
    assert state["config"]["precision"] == precision
    assert state["mixed_precision"] == ({"scale": 2.0**16, "good_steps": 20, "skipped": 0} if precision == "float16"
                                        else {"scale": 1.0, "good_steps": 0, "skipped": 0})
    state.pop("mixed_precision")
    assert_same_state(state, reference)
    flow = (tmp_path / "low" / "run" / "gradflow.json").read_text()
    assert flow == (tmp_path / "f32" / "run" / "gradflow.json").read_text() and '"steps": [0, 3, 6' in flow


# -- bf16 and fp16 train ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    return {p: train(tiny(root / p, precision=p, steps=60, eval_interval=30), log=QUIET)
            for p in ["float32"] + LOW}


@pytest.mark.derivation("MP.4")
@pytest.mark.parametrize("precision", LOW)
def test_bf16_and_fp16_loss_falls_as_float32_does(curves, precision):
    history, reference = curves[precision]["history"], curves["float32"]["history"]
    assert np.mean(history.train_loss[:5]) - np.mean(history.train_loss[-5:]) > 1.0
    assert history.val_loss[-1] == pytest.approx(reference.val_loss[-1], rel=0.03)
    assert history.train_loss != reference.train_loss  # the rounding does change the run
    assert curves[precision]["skipped_steps"] == 0


@pytest.mark.parametrize("precision", LOW)
def test_checkpoints_and_evaluation_hold_the_master_weights(curves, precision):
    """The saved weights keep float32's low bits (they are not the rounded working copy), and the last
    validation loss is that of those weights."""
    state = saved(curves[precision])
    for w in state["model"].values():
        assert w.dtype == np.float32
    assert all(not np.array_equal(w, round_bf16(w)) for w in state["model"].values() if w.ndim == 2)
    cfg = TrainConfig(**state["config"])
    model = build_model("gpt", state["model_config"])
    model.load_state_dict(state["model"])
    ids = train_module.CharTokenizer.from_text(TEXT).encode_array(TEXT)
    _, val_ids, _ = train_module.split_tokens(ids, cfg.val_fraction, cfg.seed, state["split"])
    assert train_module.estimate_loss(model, val_ids, cfg) == state["history"]["val_loss"][-1]


# -- resume -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", LOW)
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, monkeypatch, precision):
    """The loss scale and its counters are saved: with a start that overflows (steps skipped) and a short
    growth interval (the scale changing on both sides of the stop), the resumed run is the uninterrupted one
    (bf16 made dynamic here, to put a changing scale through its checkpoint)."""
    forced_scale(monkeypatch, init_scale=2.0**24 if precision == "float16" else 2.0**126, growth_interval=3,
                 dynamic=True)
    opts = dict(precision=precision, dropout=0.1, steps=24, eval_interval=8)
    full = saved(train(tiny(tmp_path / "a", **opts), log=QUIET))
    assert 0 < full["mixed_precision"]["skipped"] < 12
    assert full["optim"]["state"]["0"]["step"] == 24 - full["mixed_precision"]["skipped"]
    for stop_at in (1, 11):
        root = tmp_path / f"b{stop_at}"
        part = saved(train(tiny(root, stop_at=stop_at, **opts), log=QUIET))
        assert part["step"] == stop_at and part["mixed_precision"] != full["mixed_precision"]
        assert_same_state(saved(train(tiny(root, resume=True, **opts), log=QUIET)), full)


@pytest.mark.parametrize("precision", LOW)
def test_ctrl_c_in_a_step_saves_the_master_weights_and_resumes_bit_for_bit(tmp_path, monkeypatch, precision):
    """Cut after the working copy is cast (in the forward): the masters, not the rounded copy, are saved."""
    opts = dict(precision=precision, steps=12, eval_interval=4, sample_tokens=0)
    full = saved(train(tiny(tmp_path / "a", **opts), log=QUIET))
    root = tmp_path / "b"
    with pytest.MonkeyPatch.context() as mp:
        def interrupt(model):
            raise KeyboardInterrupt

        inject(mp, GPT, "forward", interrupt, at={7})
        with pytest.raises(train_module.TrainingInterrupted) as info:
            train(tiny(root, **opts), log=QUIET)
    assert info.value.step == 6
    part = checkpoint.load(root / "run" / "ckpt.npz")
    assert part["step"] == 6 and any(not np.array_equal(w, round_bf16(w)) for w in part["model"].values())
    assert_same_state(saved(train(tiny(root, resume=True, **opts), log=QUIET)), full)


def test_the_command_line_resumes_with_the_saved_precision_and_refuses_another(tmp_path, capsys):
    cfg = tiny(tmp_path, precision="float16", stop_at=10)
    common = ["--data", cfg.data, "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--block-size", "16",
              "--batch-size", "4", "--steps", "20", "--warmup", "2", "--eval-interval", "10", "--eval-batches", "2",
              "--sample-tokens", "0", "--lr", "0.01", "--out-dir", cfg.out_dir, "--no-progress"]
    assert cli_main(["train", *common, "--precision", "float16", "--stop-at", "10"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step 10: train [\d.]+, val [\d.]+, [\d,]+ tok/s \(training\), loss scale 65536, "
                     r"0 steps skipped", out), out
    assert cli_main(["train", "--resume", "--out-dir", cfg.out_dir, "--precision", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npformer train: error: argument --precision: expected 'float16'")
    assert cli_main(["train", "--resume", "--out-dir", cfg.out_dir, "--no-progress"]) == 0  # float16, from the run
    assert "loss scale 65536" in capsys.readouterr().out
    state = checkpoint.load(f"{cfg.out_dir}/ckpt.npz")
    assert state["step"] == 20 and state["config"]["precision"] == "float16"


# -- overflow: skipped steps ----------------------------------------------------------------------------
def huge_gradient(value):
    def action(model):
        model.parameters()[0].grad.flat[0] = np.float32(value)
    return action


@pytest.mark.derivation("MP.6")
@pytest.mark.parametrize("precision, value, at", [("float16", 1e5, {3, 7}), ("bfloat16", 3.4e38, {7})])
def test_an_overflowing_gradient_skips_its_step_and_halves_the_scale(tmp_path, capsys, precision, value, at):
    """A gradient that overflows the low precision once scaled (fp16: above 65504; bf16: above its largest
    value 3.39e38, which only a float32 gradient near float32's largest reaches) skips its step: no
    update, no optimizer step, the scale halved; the step still counts (its batch, loss and schedule)."""
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, GPT, "backward", huge_gradient(value), at=at)
        summary = train(tiny(tmp_path, precision=precision), log=QUIET)
    state = saved(summary)
    S = 2.0**16 / 2 ** len(at) if precision == "float16" else 1.0  # bf16: a fixed scale, skipped all the same
    assert summary["skipped_steps"] == len(at) and summary["loss_scale"] == S
    good = 13 if precision == "float16" else 0
    assert state["mixed_precision"] == {"scale": S, "good_steps": good, "skipped": len(at)}
    assert all(entry["step"] == 20 - len(at) for entry in state["optim"]["state"].values())
    assert state["history"]["steps"] == list(range(20)) and np.isfinite(state["history"]["train_loss"]).all()
    out = capsys.readouterr().out
    steps = "step" if len(at) == 1 else "steps"
    assert "step 20: " in out and f"loss scale {S:g}, {len(at)} {steps} skipped" in out


@pytest.mark.derivation("MP.6")
def test_a_bf16_run_keeps_a_fixed_loss_scale_of_one(tmp_path, monkeypatch, capsys):
    """bf16 has float32's range: with a growth interval of 2 a dynamic scale would double ten times in 20
    steps (and then overflow and skip); the bf16 run keeps S = 1, counts no good steps, skips none, and a
    run stopped and resumed from its checkpoint is the uninterrupted one bit for bit."""
    forced_scale(monkeypatch, growth_interval=2)
    opts = dict(precision="bfloat16", dropout=0.1, steps=20, eval_interval=5)
    full = train(tiny(tmp_path / "a", **opts), log=QUIET)
    assert full["loss_scale"] == 1.0 and full["skipped_steps"] == 0
    state = saved(full)
    assert state["mixed_precision"] == {"scale": 1.0, "good_steps": 0, "skipped": 0}
    assert state["optim"]["state"]["0"]["step"] == 20
    out = capsys.readouterr().out
    assert out.count("loss scale 1, 0 steps skipped") == 4 and "loss scale 2" not in out
    root = tmp_path / "b"
    part = saved(train(tiny(root, stop_at=7, **opts), log=QUIET))
    assert part["mixed_precision"] == {"scale": 1.0, "good_steps": 0, "skipped": 0}
    assert_same_state(saved(train(tiny(root, resume=True, **opts), log=QUIET)), state)


def test_a_skipped_step_changes_no_weight(tmp_path, monkeypatch):
    """The masters after a run whose step 3 overflowed equal those of a run whose step 3 had no gradient
    at all: the skipped step updated nothing (the schedule, the batches and the dropout streams advance)."""
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, GPT, "backward", huge_gradient(1e5), at={3})
        skipped = saved(train(tiny(tmp_path / "a", precision="float16", steps=3, eval_interval=3), log=QUIET))
    two = saved(train(tiny(tmp_path / "b", precision="float16", steps=3, eval_interval=3, stop_at=2), log=QUIET))
    for name, w in two["model"].items():
        np.testing.assert_array_equal(skipped["model"][name], w)
    assert skipped["mixed_precision"]["skipped"] == 1 and skipped["history"]["steps"] == [0, 1, 2]


@pytest.mark.parametrize("precision", LOW)
def test_a_non_finite_float32_gradient_is_divergence_not_a_skip(tmp_path, precision):
    """An inf or NaN in the model's own float32 gradient is no overflow of the scaling: the run stops."""
    with pytest.MonkeyPatch.context() as mp:
        inject(mp, GPT, "backward", huge_gradient(np.nan), at={5})
        with pytest.raises(train_module.TrainingDiverged) as info:
            train(tiny(tmp_path, precision=precision), log=QUIET)
    assert info.value.step == 5 and "the gradient is not finite" in str(info.value)


# -- options and checkpoints ------------------------------------------------------------------------------
@given(st.sampled_from(["fp16", "bf16", "float64", "FLOAT16", "half", ""]))
@settings(max_examples=6)
def test_a_bad_precision_is_refused_naming_the_flag(tmp_path_factory, value):
    root = tmp_path_factory.mktemp("bad")
    with pytest.raises(ConfigError) as info:
        train(tiny(root, precision=value), log=QUIET)
    assert info.value.field == "precision" and "train: argument 'precision'" in str(info.value)
    assert not (root / "run").exists()


def test_the_command_line_refuses_a_bad_precision_in_one_line(tmp_path, capsys):
    assert cli_main(["train", "--precision", "fp16", "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npformer train: error: argument --precision: ") and "fp16" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", [None, 16, True])
def test_a_precision_of_another_type_is_refused(tmp_path, value):
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, precision=value), log=QUIET)
    assert info.value.field == "precision"


@pytest.mark.parametrize("precision", LOW)
def test_mixed_precision_needs_float32_weights(tmp_path, precision):
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, precision=precision, dtype="float64"), log=QUIET)
    assert info.value.field == "precision" and "float64" in info.value.reason
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("precision", LOW)
def test_the_precision_is_recorded_in_the_run(curves, precision):
    state = saved(curves[precision])
    assert state["config"]["precision"] == precision
    assert set(state["mixed_precision"]) == {"scale", "good_steps", "skipped"}
    assert curves[precision]["loss_scale"] == state["mixed_precision"]["scale"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    root = tmp_path_factory.mktemp("stopped")
    train(tiny(root, precision="float16", stop_at=10), log=QUIET)
    return root


DAMAGE = {
    "no loss scale": lambda s: s.pop("mixed_precision"),
    "zero scale": lambda s: s["mixed_precision"].__setitem__("scale", 0.0),
    "NaN scale": lambda s: s["mixed_precision"].__setitem__("scale", float("nan")),
    "more skipped than steps": lambda s: s["mixed_precision"].__setitem__("skipped", 11),
    "negative good steps": lambda s: s["mixed_precision"].__setitem__("good_steps", -1),
    "an extra entry": lambda s: s["mixed_precision"].__setitem__("growth", 2.0),
    "skipped steps the optimizer took": lambda s: s["mixed_precision"].__setitem__("skipped", 2),
    "a loss scale on a float32 run": lambda s: s["config"].__setitem__("precision", "float32"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_checks_the_loss_scale_entry(stopped, tmp_path, damage):
    state = checkpoint.load(stopped / "run" / "ckpt.npz")
    DAMAGE[damage](state)
    path = checkpoint.save(tmp_path / "run" / "ckpt.npz", state)
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    precision = state["config"]["precision"]
    with pytest.raises(checkpoint.CheckpointError) as info:
        train(tiny(tmp_path, precision=precision, resume=True), log=QUIET)
    assert str(path) in str(info.value)
    assert "mixed_precision" in str(info.value) or "optim/state" in str(info.value)


# -- the trainer's phases and state, as the loop uses them -------------------------------------------------
def tiny_trainer(precision="float16", **options):
    from npformer.models.gpt import GPTConfig
    from npformer.optim import AdamW

    model = GPT(GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=2, d_model=8), seed=0)
    return model, MixedPrecisionTrainer(model, lambda ps: AdamW(ps, lr=1e-2), precision=precision, **options)


def forward_backward(model, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 7, (3, 6))
    loss = model.forward(ids, np.roll(ids, -1, axis=1))[1]
    model.backward()
    return loss


@given(st.sampled_from(LOW), st.integers(0, 2**10))
@settings(max_examples=6)
def test_the_phases_are_the_step(precision, seed):
    """cast_working_copy, forward and backward, unscale_gradients, update: what step() does, bit for bit."""
    (a, ta), (b, tb) = tiny_trainer(precision), tiny_trainer(precision)
    for i in range(3):
        loss_a, stepped_a = ta.step(lambda: forward_backward(a, seed + i))
        tb.cast_working_copy()
        b.zero_grad()
        loss_b = forward_backward(b, seed + i)
        stepped_b = tb.update(tb.unscale_gradients())
        assert (loss_a, stepped_a) == (loss_b, stepped_b)
    for ma, mb in zip(ta.master, tb.master):
        np.testing.assert_array_equal(ma.data, mb.data)
    assert ta.state_dict() == tb.state_dict()


def test_write_and_read_master_move_the_float32_weights_between_model_and_masters():
    model, trainer = tiny_trainer("bfloat16")
    trainer.step(lambda: forward_backward(model, 0))
    trainer.cast_working_copy()
    assert all(np.array_equal(p.data, round_bf16(m.data)) for p, m in zip(model.parameters(), trainer.master))
    trainer.write_master()
    assert all(np.array_equal(p.data, m.data) for p, m in zip(model.parameters(), trainer.master))
    masters = [m.data for m in trainer.master]
    for p in model.parameters():
        p.data[...] = 0.5
    trainer.read_master()
    assert all(m.data is a and (a == 0.5).all() for m, a in zip(trainer.master, masters))  # in place


def test_the_state_dict_round_trips():
    model, trainer = tiny_trainer("float16", init_scale=2.0**30, growth_interval=2)
    for i in range(6):
        trainer.step(lambda: forward_backward(model, i))
    state = trainer.state_dict()
    assert state["skipped"] > 0 and state["scale"] < 2.0**30
    _, other = tiny_trainer("float16", growth_interval=2)
    other.load_state_dict(state)
    assert other.state_dict() == state and (other.scale, other.good_steps, other.skipped) == \
        (trainer.scale, trainer.good_steps, trainer.skipped)


BAD_STATES = [("scale", 0.0), ("scale", -1.0), ("scale", float("inf")), ("scale", float("nan")), ("scale", "1"),
              ("scale", True), ("good_steps", -1), ("good_steps", 2000), ("good_steps", 1.0), ("skipped", -1),
              ("skipped", None), ("skipped", False)]


@given(st.sampled_from(BAD_STATES + [("missing", None), ("extra", None), ("not a dict", None)]))
def test_a_bad_state_is_refused_by_name_and_changes_nothing(bad):
    _, trainer = tiny_trainer("float16")
    key, value = bad
    state = {"scale": 1024.0, "good_steps": 3, "skipped": 2}
    if key == "missing":
        state.pop("skipped")
    elif key == "extra":
        state["growth"] = 2.0
    elif key == "not a dict":
        state = [1024.0, 3, 2]
    else:
        state[key] = value
    before = trainer.state_dict()
    with pytest.raises(ValueError, match=r"MixedPrecisionTrainer\.load_state_dict: argument 'state'") as info:
        trainer.load_state_dict(state)
    if key in ("scale", "good_steps", "skipped"):
        assert f"entry '{key}'" in str(info.value)
    assert trainer.state_dict() == before


def test_update_refuses_a_flag_that_is_not_a_bool():
    _, trainer = tiny_trainer()
    with pytest.raises(TypeError, match=r"MixedPrecisionTrainer\.update: argument 'finite'"):
        trainer.update(1)
