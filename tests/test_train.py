"""Training end to end on a tiny corpus: learning, checkpoints, exact resume, and every refusal.

A run is refused before any work (nothing is written, not even the run folder) when an
option cannot work, when it would overwrite a saved run, when a resumed run's model,
split or data differ from its checkpoint, and when one step would not fit in memory.
"""

import math
import re
import shutil
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npformer.train as train_module
from npformer import checkpoint
from npformer.cli import main as cli_main
from npformer.models.gpt import GPT, GPTConfig
from npformer.optim import AdamW, clip_grad_norm_, param_groups
from npformer.train import (FIXED_ON_RESUME, ConfigError, TrainConfig, check_memory, estimate_memory,
                            saved_runs, train)

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
QUIET = lambda *a: None  # noqa: E731


def tiny(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "corpus.txt"
    if not data.exists():
        data.write_text(TEXT, encoding="utf-8")
    base = dict(data=str(data), n_layer=1, n_head=2, d_model=16, block_size=16, batch_size=4, steps=20,
                warmup=2, eval_interval=10, eval_batches=2, sample_tokens=8, lr=1e-2,
                out_dir=str(tmp_path / "run"), progress=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 20-step run; tests must not change it (they copy it when they resume it)."""
    root = tmp_path_factory.mktemp("finished")
    train(tiny(root), log=QUIET)
    return root


def snapshot(root):
    """The bytes and modification time of every file of the run in ``root``."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((root / "run").iterdir())}


def test_training_lowers_the_loss_and_writes_its_files(tmp_path):
    summary = train(tiny(tmp_path, steps=60, eval_interval=30), log=QUIET)
    history = summary["history"]
    assert np.mean(history.train_loss[:5]) - np.mean(history.train_loss[-5:]) > 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    state = checkpoint.load(summary["checkpoint"])
    assert state["step"] == 60 and state["model_config"]["n_layer"] == 1
    assert summary["complete"] and summary["steps_run"] == 60


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, fmt):
    full = train(tiny(tmp_path / "a", checkpoint_format=fmt, dropout=0.1), log=QUIET)["history"]
    train(tiny(tmp_path / "b", checkpoint_format=fmt, dropout=0.1, stop_at=10), log=QUIET)
    resumed = train(tiny(tmp_path / "b", checkpoint_format=fmt, dropout=0.1, resume=True), log=QUIET)["history"]
    assert resumed.steps == full.steps
    assert resumed.train_loss == full.train_loss  # bit for bit: same weights, optimizer, data and dropout streams
    assert resumed.val_loss == full.val_loss


def test_command_line_train_and_sample(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=10, eval_interval=10)
    config = tmp_path / "cfg.json"
    config.write_text('{"n_layer": 1, "d_model": 16, "n_head": 2}')
    args = ["train", "--config", str(config), "--data", cfg.data, "--steps", "10", "--block-size", "16",
            "--batch-size", "4", "--eval-interval", "10", "--eval-batches", "1", "--sample-tokens", "5",
            "--out-dir", cfg.out_dir, "--no-progress"]
    assert cli_main(args) == 0
    assert "final: train loss" in capsys.readouterr().out
    assert cli_main(["sample", "--checkpoint", f"{cfg.out_dir}/ckpt.npz", "--prompt", "the", "--tokens", "12",
                     "--seed", "3"]) == 0
    first = capsys.readouterr().out
    cli_main(["sample", "--checkpoint", f"{cfg.out_dir}/ckpt.npz", "--prompt", "the", "--tokens", "12", "--seed", "3",
              "--no-cache"])
    assert first.startswith("the") and len(first.rstrip("\n")) >= 15
    assert capsys.readouterr().out == first  # the KV cache changes nothing but speed


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    summary = train(tiny(tmp_path, steps=10, eval_interval=10), log=QUIET)
    path = summary["checkpoint"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError):
        train(tiny(tmp_path, steps=20, resume=True), log=QUIET)


# -- resuming ---------------------------------------------------------------------------------------
def test_a_finished_run_says_so_and_how_to_extend_it(finished):
    before = snapshot(finished)
    lines = []
    summary = train(tiny(finished, resume=True), log=lines.append)
    assert summary["complete"] and summary["steps_run"] == 0 and summary["step"] == 20
    assert len(lines) == 1 and "finished run" in lines[0] and "--steps 40" in lines[0], lines
    assert snapshot(finished) == before  # nothing rewritten


def test_a_finished_run_extends_with_a_larger_steps(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    summary = train(tiny(tmp_path, resume=True, steps=30), log=QUIET)
    assert summary["steps_run"] == 10 and checkpoint.load(summary["checkpoint"])["step"] == 30
    assert summary["history"].steps == list(range(30))


VALID_CHANGES = {"val_fraction": st.sampled_from([0.2, 0.3, 0.5]), "n_layer": st.integers(2, 3),
                 "n_head": st.sampled_from([1, 4, 8]), "d_model": st.sampled_from([8, 24, 32]),
                 "block_size": st.sampled_from([8, 12]), "dropout": st.sampled_from([0.1, 0.5]),
                 "dtype": st.just("float64"), "weight_decay": st.sampled_from([0.0, 0.3]),
                 "seed": st.integers(0, 1000)}


@given(st.data())
def test_resume_refuses_another_model_split_or_seed(finished, data):
    assert set(VALID_CHANGES) == set(FIXED_ON_RESUME)
    name = data.draw(st.sampled_from(FIXED_ON_RESUME))
    value = data.draw(VALID_CHANGES[name])
    before = snapshot(finished)
    with pytest.raises(ConfigError) as info:
        train(tiny(finished, resume=True, steps=30, **{name: value}), log=QUIET)
    assert info.value.field == name and repr(value) in info.value.reason
    assert snapshot(finished) == before


def upper(text, rng):
    return text.upper()


def new_character(text, rng):
    i = int(rng.integers(len(text)))
    return text[:i] + "Z" + text[i:]


def swap(text, rng):  # the same characters in another order: two different neighbours exchanged
    i = next(j for j in range(int(rng.integers(len(text) - 1)), len(text) - 1) if text[j] != text[j + 1])
    return text[:i] + text[i + 1] + text[i] + text[i + 2:]


def drop_character(text, rng):
    return text.replace("z", "")


@given(edit=st.sampled_from([upper, new_character, swap, drop_character]), seed=st.integers(0, 2**16))
def test_resume_refuses_other_data_and_names_the_difference(finished, edit, seed, tmp_path_factory):
    edited = edit(TEXT, np.random.default_rng(seed))
    assert edited != TEXT
    other = tmp_path_factory.mktemp("data") / "edited.txt"
    other.write_text(edited, encoding="utf-8")
    before = snapshot(finished)
    with pytest.raises(ConfigError) as info:
        train(tiny(finished, resume=True, steps=30, data=str(other)), log=QUIET)
    assert info.value.field == "data"
    if set(edited) != set(TEXT):
        assert "vocabulary" in info.value.reason
        for only in (set(edited) - set(TEXT), set(TEXT) - set(edited)):
            assert not only or repr(min(only)) in info.value.reason  # names the differing characters
    else:
        assert "sha256" in info.value.reason and str(len(edited)) in info.value.reason
    assert snapshot(finished) == before


def test_the_same_text_under_another_name_resumes(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    moved = tmp_path / "moved.txt"
    moved.write_text(TEXT, encoding="utf-8")
    assert train(tiny(tmp_path, resume=True, steps=21, data=str(moved)), log=QUIET)["steps_run"] == 1


@given(st.sampled_from(["drop", "add"]), st.integers(1, 5))
def test_a_vocabulary_that_does_not_fit_the_model_is_refused_at_load(finished, tmp_path_factory, change, n):
    root = tmp_path_factory.mktemp("badvocab")
    state = checkpoint.load(finished / "run" / "ckpt.npz")
    chars = state["vocab"]["chars"]
    state["vocab"]["chars"] = chars[n:] if change == "drop" else chars + "".join(chr(0x4E00 + i) for i in range(n))
    bad = checkpoint.save(root / "run" / "ckpt.npz", state)
    with pytest.raises(checkpoint.CheckpointError, match="vocab_size"):
        train(tiny(root, resume=True, steps=30), log=QUIET)
    assert cli_main(["sample", "--checkpoint", str(bad), "--tokens", "3"]) == 2


MISSING = object()


@given(st.sampled_from([(key, MISSING) for key in train_module.RUN_ENTRIES]
                       + [("step", -1), ("step", 1.5), ("history", [1]), ("rng", {"seed": 3})]))
def test_resume_refuses_a_checkpoint_that_is_not_a_run(finished, tmp_path_factory, damage):
    root = tmp_path_factory.mktemp("notarun")
    state = checkpoint.load(finished / "run" / "ckpt.npz")
    key, value = damage
    if value is MISSING:
        del state[key]
    else:
        state[key] = value
    checkpoint.save(root / "run" / "ckpt.npz", state)
    with pytest.raises(checkpoint.CheckpointError, match=key):
        train(tiny(root, resume=True, steps=30), log=QUIET)
    assert cli_main(["train", "--resume", "--out-dir", str(root / "run"), "--steps", "30"]) == 2


def test_resume_without_a_run_creates_nothing(tmp_path):
    cfg = tiny(tmp_path, resume=True)
    with pytest.raises(ConfigError) as info:
        train(cfg, log=QUIET)
    assert info.value.field == "resume" and "no " in info.value.reason
    assert not (tmp_path / "run").exists()


def test_resume_names_the_checkpoint_of_the_other_format(finished):
    with pytest.raises(ConfigError, match="--checkpoint-format npz"):
        train(tiny(finished, resume=True, checkpoint_format="safetensors", steps=30), log=QUIET)


@given(st.integers(-3, 19), st.integers(1, 20))
def test_resume_refuses_fewer_steps_or_a_stop_already_passed(finished, steps, stop_at):
    with pytest.raises(ConfigError) as info:
        train(tiny(finished, resume=True, steps=steps), log=QUIET)
    assert info.value.field == "steps"
    with pytest.raises(ConfigError) as info:
        train(tiny(finished, resume=True, steps=30, stop_at=stop_at), log=QUIET)
    assert info.value.field == "stop_at" and "20 steps" in info.value.reason


# -- never overwrite a run ----------------------------------------------------------------------------
@given(st.sampled_from(["npz", "safetensors"]), st.integers(1, 40))
def test_a_saved_run_is_never_overwritten_without_the_flag(finished, fmt, steps):
    before = snapshot(finished)
    with pytest.raises(ConfigError) as info:
        train(tiny(finished, checkpoint_format=fmt, steps=steps), log=QUIET)
    assert info.value.field == "out_dir" and "--overwrite" in info.value.reason and "--resume" in info.value.reason
    assert snapshot(finished) == before


def test_overwrite_replaces_a_run(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    summary = train(tiny(tmp_path, steps=10, overwrite=True), log=QUIET)
    assert checkpoint.load(summary["checkpoint"])["step"] == 10
    assert saved_runs(tmp_path / "run") == [tmp_path / "run" / "ckpt.npz"]


# -- options ------------------------------------------------------------------------------------------
def bad_values(name):
    """Values a field cannot take (counts, rates, choices, files, flags)."""
    counts = {"n_layer": 1, "n_head": 1, "d_model": 1, "block_size": 1, "steps": 1, "batch_size": 1,
              "eval_interval": 1, "eval_batches": 1, "warmup": 0, "sample_tokens": 0, "seed": 0, "stop_at": 0}
    if name in counts:
        lo = counts[name]
        return st.integers(max_value=lo - 1) | st.sampled_from([1.5, float(lo + 1), True, "3", None])
    reals = {"val_fraction": (0.0, 1.0, True, True), "dropout": (0.0, 1.0, False, True),
             "lr": (0.0, None, True, False), "min_lr": (0.0, 1e-2, False, False),
             "weight_decay": (0.0, None, False, False), "grad_clip": (0.0, None, True, False)}
    if name in reals:
        lo, hi, lo_open, hi_open = reals[name]
        below = st.floats(max_value=lo, exclude_max=not lo_open)
        above = st.floats(min_value=hi, exclude_min=not hi_open) if hi is not None else st.nothing()
        return below | above | st.sampled_from([math.nan, math.inf, "0.1", True, None])
    return {"dtype": st.sampled_from(["float16", "bfloat16", "int64", "", None]),
            "checkpoint_format": st.sampled_from(["pt", "bin", "NPZ", "", None]),
            "data": st.sampled_from(["missing.txt", "", ".", None]),
            "out_dir": st.sampled_from(["", None, "corpus.txt"]),
            "resume": st.sampled_from([1, "yes", None]), "progress": st.sampled_from([0, "no", None]),
            "overwrite": st.sampled_from([1, "true", None])}[name]


FIELDS = ["val_fraction", "n_layer", "n_head", "d_model", "block_size", "dropout", "dtype", "steps", "batch_size",
          "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "eval_interval", "eval_batches", "sample_tokens",
          "out_dir", "checkpoint_format", "seed", "stop_at", "progress", "overwrite", "resume", "data"]


@given(st.data())
def test_every_field_is_checked_before_any_work(tmp_path_factory, data):
    assert set(FIELDS) == {f for f in TrainConfig.__dataclass_fields__}
    root = tmp_path_factory.mktemp("fields")
    name = data.draw(st.sampled_from(FIELDS))
    value = data.draw(bad_values(name))
    cfg = tiny(root)
    if name in ("data", "out_dir") and isinstance(value, str) and value:
        value = str(root / value)
    setattr(cfg, name, value)
    with pytest.raises(ConfigError) as info:
        train(cfg, log=QUIET)
    assert info.value.field == name, info.value
    assert f"train: argument '{name}'" in str(info.value)
    assert not (root / "run").exists()


@given(st.sampled_from([(7, 2), (12, 5), (16, 3), (30, 4)]))
def test_heads_must_divide_the_width(tmp_path_factory, shape):
    d_model, n_head = shape
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path_factory.mktemp("heads"), d_model=d_model, n_head=n_head), log=QUIET)
    assert info.value.field == "n_head" and str(d_model) in info.value.reason


@given(st.integers(900, 5000))
def test_a_block_longer_than_the_data_is_refused(tmp_path_factory, block):
    root = tmp_path_factory.mktemp("block")
    with pytest.raises(ConfigError) as info:
        train(tiny(root, block_size=block), log=QUIET)
    assert info.value.field == "block_size" and not (root / "run").exists()


# -- memory ---------------------------------------------------------------------------------------------
def measured_peak(cfg, batch):
    """Peak bytes that numpy allocates in two training steps (tracemalloc sees numpy's buffers)."""
    tracemalloc.start()
    try:
        model = GPT(cfg)
        opt = AdamW(param_groups(model, 0.1), lr=1e-3)
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.block_size))
        for _ in range(2):
            model.forward(ids, ids)
            model.zero_grad()
            model.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@given(batch=st.integers(2, 4), T=st.sampled_from([32, 64, 96]), L=st.integers(1, 2), H=st.sampled_from([1, 2, 4]),
       D=st.sampled_from([32, 48]), V=st.sampled_from([30, 300]), dtype=st.sampled_from(["float32", "float64"]))
def test_the_memory_estimate_is_within_a_factor_of_two_of_the_measured_peak(batch, T, L, H, D, V, dtype):
    cfg = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, d_model=D, dtype=dtype)
    estimate, peak = sum(estimate_memory(cfg, batch).values()), measured_peak(cfg, batch)
    assert 0.5 <= estimate / peak <= 2.0, (estimate, peak)


@given(batch=st.integers(1, 64), T=st.sampled_from([16, 256, 4096, 100_000]), D=st.sampled_from([16, 192, 4096]))
def test_memory_beyond_what_is_available_is_refused_naming_the_largest_part(batch, T, D):
    cfg = GPTConfig(vocab_size=65, block_size=T, n_layer=2, n_head=2, d_model=D)
    parts = estimate_memory(cfg, batch)
    total = sum(parts.values())
    assert check_memory(cfg, batch, available=total) == total  # exactly enough is enough
    with pytest.raises(ConfigError) as info:
        check_memory(cfg, batch, available=total - 1)
    weights = parts["parameters"] + parts["gradients"] + parts["optimizer"]
    largest = max((parts["attention"], "block_size"), (parts["activations"], "batch_size"), (weights, "d_model"))[1]
    assert info.value.field == largest and "available" in info.value.reason


def test_train_refuses_a_step_larger_than_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "available_memory", lambda: 1 << 10)  # 1 KiB
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path), log=QUIET)
    assert "needs about" in info.value.reason and not (tmp_path / "run").exists()


# -- throughput --------------------------------------------------------------------------------------------
def test_reported_throughput_is_training_time_only(tmp_path, monkeypatch, capsys):
    """Each validation sleeps 0.25 s: tokens/s counting it would be below tokens / 1 s."""
    def slow_eval(model, data, cfg):
        time.sleep(0.25)
        return 1.0

    monkeypatch.setattr(train_module, "estimate_loss", slow_eval)
    cfg = tiny(tmp_path, steps=4, eval_interval=1, sample_tokens=0)
    summary = train(cfg)
    tokens = cfg.steps * cfg.batch_size * cfg.block_size
    assert summary["tokens_per_s"] > 4 * tokens  # trained in under a quarter of the evaluations' second
    printed = [float(x.replace(",", "")) for x in re.findall(r"([\d,]+) tok/s", capsys.readouterr().out)]
    assert len(printed) == 4 and min(printed) > 4 * tokens
