"""Training end to end on a tiny corpus: learning, checkpoints, exact resume, and every refusal.

A run is refused before any work (nothing is written, not even the run folder) when an
option cannot work, when it would overwrite a saved run, when a resumed run's model,
split, data or any checkpoint entry does not fit, and when one step would not fit in
memory. While training, a non-finite loss, gradient or weight stops the run without
saving, and Ctrl-C saves the steps done so that the resumed run is bit-exact.
"""

import contextlib
import io
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
PARAGRAPHS = "".join(f"the {w} fox jumps over the lazy dog.\nit runs {i} miles home.\n" + ("\n" if i % 3 == 2 else "")
                     for i, w in enumerate(["quick", "brown", "red", "slow", "grey", "small"] * 12))


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


def test_llama_training_lowers_the_loss_and_resumes_bit_for_bit(tmp_path):
    """--model llama: the same loop, checkpoint and resume as GPT; grouped-query attention by n_kv_head."""
    llama = dict(model="llama", n_head=4, n_kv_head=2)
    full = train(tiny(tmp_path / "a", steps=60, eval_interval=30, **llama), log=QUIET)
    history = full["history"]
    assert np.mean(history.train_loss[:5]) - np.mean(history.train_loss[-5:]) > 1.0
    state = checkpoint.load(full["checkpoint"])
    assert state["config"]["model"] == "llama" and state["model_config"]["n_kv_head"] == 2
    assert "layers.0.self_attn.k_proj.weight" in state["model"] and state["model"]["layers.0.self_attn.k_proj.weight"].shape == (8, 16)
    train(tiny(tmp_path / "b", steps=60, eval_interval=30, stop_at=20, **llama), log=QUIET)
    resumed = train(tiny(tmp_path / "b", steps=60, eval_interval=30, resume=True, **llama), log=QUIET)["history"]
    assert resumed.train_loss == history.train_loss and resumed.val_loss == history.val_loss


@pytest.mark.parametrize("model", ["gpt", "llama"])
def test_prefix_lm_training_lowers_the_loss_and_resumes_bit_for_bit(tmp_path, model):
    """--objective prefix: the same windows, each row's random prefix seen both ways (ATT.18); its copied targets
    ignored, so the loss is over fewer, harder tokens; a stopped run resumes to the same losses."""
    opts = dict(model=model, objective="prefix", n_head=4 if model == "llama" else 2, steps=60, eval_interval=30)
    full = train(tiny(tmp_path / "a", **opts), log=QUIET)
    history = full["history"]
    assert np.mean(history.train_loss[:5]) - np.mean(history.train_loss[-5:]) > 1.0, history.train_loss
    assert checkpoint.load(full["checkpoint"])["config"]["objective"] == "prefix"
    train(tiny(tmp_path / "b", stop_at=20, **opts), log=QUIET)
    resumed = train(tiny(tmp_path / "b", resume=True, **opts), log=QUIET)["history"]
    assert resumed.train_loss == history.train_loss and resumed.val_loss == history.val_loss


@pytest.mark.parametrize("overrides, name", [
    (dict(model="llama", n_head=4, n_kv_head=3), "n_kv_head"),  # not a divisor of n_head
    (dict(model="llama", n_head=16, d_model=16), "n_head"),  # heads of width 1: no rotation pairs
    (dict(model="llama", dropout=0.1), "dropout"),  # llama has no dropout
    (dict(model="gpt", n_kv_head=2), "n_kv_head"),  # grouped-query attention is llama's
])
def test_llama_options_are_checked_by_name(tmp_path, overrides, name):
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, **overrides), log=QUIET)
    assert info.value.field == name and not (tmp_path / "run").exists()


@pytest.mark.parametrize("model, objective", [("bert", "mlm"), ("bert", "nsp"), ("bert", "wwm"), ("roberta", "mlm"),
                                              ("deberta", "mlm"), ("albert", "sop"), ("albert", "mlm"),
                                              ("electra", "rtd")])
def test_encoders_pretrain_with_their_objectives_and_resume_bit_for_bit(tmp_path, model, objective):
    """--model bert|roberta --objective ...: the loss falls; a stopped run resumes to the same losses."""
    enc = dict(model=model, objective=objective, n_head=2, d_model=32, block_size=24, batch_size=8, lr=3e-3,
               eval_batches=2, dropout=0.1)  # dropout: every mask must come back from the checkpoint's streams
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for run in ("a", "b"):  # documents (blank-line separated) for the sentence pairs of NSP
        (tmp_path / run / "corpus.txt").write_text(PARAGRAPHS, encoding="utf-8")
    full = train(tiny(tmp_path / "a", steps=40, eval_interval=20, **enc), log=QUIET)
    history = full["history"]
    assert np.mean(history.train_loss[:4]) - np.mean(history.train_loss[-4:]) > 0.3, history.train_loss
    state = checkpoint.load(full["checkpoint"])
    assert state["config"]["model"] == model and state["model_config"].get("nsp_head", False) == (objective == "nsp")
    words = next(v for k, v in state["model"].items() if k.endswith("word_embeddings.weight"))
    vocab = state["model_config"]["discriminator" if model == "electra" else "vocab_size"]
    assert (vocab["vocab_size"] if model == "electra" else vocab) == words.shape[0]
    train(tiny(tmp_path / "b", steps=40, eval_interval=20, stop_at=10, **enc), log=QUIET)
    resumed = train(tiny(tmp_path / "b", steps=40, eval_interval=20, resume=True, **enc), log=QUIET)["history"]
    assert resumed.train_loss == history.train_loss and resumed.val_loss == history.val_loss


@pytest.mark.parametrize("model, objective", [("t5", "span"), ("t5", "infill"), ("bart", "infill"),
                                              ("bart", "permute+infill"), ("transformer", "span"),
                                              ("transformer", "permute")])
def test_encoder_decoders_pretrain_with_their_objectives_and_resume_bit_for_bit(tmp_path, model, objective):
    """--model t5|bart|transformer --objective span|infill|permute...: the loss falls; the vocabulary holds the
    text's characters, pad, eos, bos, mask and the sentinels; a stopped run resumes to the same losses."""
    opts = dict(model=model, objective=objective, n_head=2, d_model=32, block_size=24, batch_size=8, lr=3e-3,
                eval_batches=2, dropout=0.1)  # dropout: every mask must come back from the checkpoint's streams
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "corpus.txt").write_text(PARAGRAPHS, encoding="utf-8")
    full = train(tiny(tmp_path / "a", steps=40, eval_interval=20, **opts), log=QUIET)
    history = full["history"]
    assert np.mean(history.train_loss[:4]) - np.mean(history.train_loss[-4:]) > 0.3, history.train_loss
    state = checkpoint.load(full["checkpoint"])
    chars = len(set(PARAGRAPHS))
    assert state["model_config"]["vocab_size"] == chars + 4 + 100
    assert state["model_config"]["decoder_start_token_id"] == chars + (0 if objective == "span" else 1)  # pad, eos
    train(tiny(tmp_path / "b", steps=40, eval_interval=20, stop_at=10, **opts), log=QUIET)
    resumed = train(tiny(tmp_path / "b", steps=40, eval_interval=20, resume=True, **opts), log=QUIET)["history"]
    assert resumed.train_loss == history.train_loss and resumed.val_loss == history.val_loss


@pytest.mark.parametrize("overrides, words", [(dict(model="bart", block_size=3), "at least 4"),
                                             (dict(model="t5", objective="span", block_size=2400), "133"),
                                             (dict(model="transformer", objective="span", block_size=1), "at least 4")])
def test_an_encoder_decoder_block_that_cannot_hold_its_objective_is_refused(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words) as info:
        train(tiny(tmp_path, **overrides), log=QUIET)
    assert info.value.field == "block_size" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides", [dict(model="gpt", objective="mlm"), dict(model="llama", objective="nsp"),
                                       dict(model="roberta", objective="nsp"), dict(model="bert", objective="clm"),
                                       dict(model="bert", objective="rtd"), dict(model="t5", objective="mlm"),
                                       dict(model="bart", objective="clm"), dict(model="gpt", objective="span"),
                                       dict(model="bert", objective="infill")])
def test_an_objective_the_family_does_not_train_with_is_refused(tmp_path, overrides):
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, **overrides), log=QUIET)
    assert info.value.field == "objective" and not (tmp_path / "run").exists()


def test_nsp_on_a_text_of_one_document_is_refused_naming_data(tmp_path):
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, model="bert", objective="nsp"), log=QUIET)
    assert info.value.field == "data" and "nsp" in info.value.reason and not (tmp_path / "run").exists()


def test_an_encoder_checkpoint_is_not_sampled(tmp_path, capsys):
    cfg = tiny(tmp_path, model="bert", steps=2, eval_interval=2, eval_batches=1)
    train(cfg, log=QUIET)
    assert cli_main(["sample", "--checkpoint", cfg.out_dir, "--prompt", "the"]) == 2
    assert "causal language model" in capsys.readouterr().err


def test_an_encoder_decoder_checkpoint_is_not_sampled_and_says_why(tmp_path, capsys):
    cfg = tiny(tmp_path, model="t5", objective="span", steps=2, eval_interval=2, eval_batches=1)
    train(cfg, log=QUIET)
    assert cli_main(["sample", "--checkpoint", cfg.out_dir, "--prompt", "the"]) == 2
    assert "got a T5, an encoder-decoder" in capsys.readouterr().err


def test_command_line_train_and_sample_llama(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=10, eval_interval=10)
    args = ["train", "--model", "llama", "--n-head", "4", "--n-kv-head", "1", "--d-model", "16", "--n-layer", "1",
            "--data", cfg.data, "--steps", "10", "--block-size", "16", "--batch-size", "4", "--eval-interval", "10",
            "--eval-batches", "1", "--sample-tokens", "5", "--out-dir", cfg.out_dir, "--no-progress"]
    assert cli_main(args) == 0
    assert "final: train loss" in capsys.readouterr().out
    sample = ["sample", "--checkpoint", cfg.out_dir, "--prompt", "the", "--tokens", "30", "--seed", "3"]
    assert cli_main(sample) == 0
    first = capsys.readouterr().out
    assert cli_main(sample + ["--no-cache"]) == 0
    assert first.startswith("the") and len(first.rstrip("\n")) == 33
    assert capsys.readouterr().out == first  # the KV cache (keys stored rotated) changes nothing but speed


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


VALID_CHANGES = {"precision": st.sampled_from(["bfloat16", "float16"]), "val_fraction": st.sampled_from([0.2, 0.3, 0.5]), "n_layer": st.integers(2, 3),
                 "n_head": st.sampled_from([1, 4, 8]), "d_model": st.sampled_from([8, 24, 32]),
                 "block_size": st.sampled_from([8, 12]), "dropout": st.sampled_from([0.1, 0.5]),
                 "dtype": st.just("float64"), "weight_decay": st.sampled_from([0.0, 0.3]),
                 "seed": st.integers(0, 1000), "model": st.sampled_from(["llama", "bert"]), "n_kv_head": st.sampled_from([1, 2]),
                 "objective": st.just("mlm"),  # a gpt run's objective is clm; mlm is refused for it
                 "hf": st.sampled_from(["no-such-folder", "."])}  # a folder without a config.json is refused too


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
    counts = {"n_layer": 1, "n_head": 1, "n_kv_head": 0, "d_model": 1, "block_size": 1, "steps": 1, "batch_size": 1,
              "eval_interval": 1, "eval_batches": 1, "warmup": 0, "sample_tokens": 0, "seed": 0, "stop_at": 0,
              "gradflow_every": 0}
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
            "precision": st.sampled_from(["fp16", "bf16", "float64", "FLOAT16", "", None]),
            "model": st.sampled_from(["GPT", "BERT", "gpt2", "", None]),
            "objective": st.sampled_from(["mlm", "nsp", "sop", "CLM", "PREFIX", None, 3]),  # none is gpt's
            "hf": st.sampled_from(["missing-folder", "corpus.txt", ".", None, 3]),
            "save_hf": st.sampled_from(["corpus.txt", "corpus.txt/sub", None, 3]),
            "checkpoint_format": st.sampled_from(["pt", "bin", "NPZ", "", None]),
            "data": st.sampled_from(["missing.txt", "", ".", None]),
            "out_dir": st.sampled_from(["", None, "corpus.txt"]),
            "resume": st.sampled_from([1, "yes", None]), "progress": st.sampled_from([0, "no", None]),
            "overwrite": st.sampled_from([1, "true", None])}[name]


FIELDS = ["precision", "val_fraction", "model", "objective", "n_kv_head", "hf", "save_hf", "n_layer", "n_head", "d_model", "block_size", "dropout", "dtype", "steps", "batch_size",
          "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "eval_interval", "eval_batches", "sample_tokens",
          "out_dir", "checkpoint_format", "seed", "stop_at", "progress", "overwrite", "resume", "data", "gradflow_every"]


@given(st.data())
def test_every_field_is_checked_before_any_work(tmp_path_factory, data):
    assert set(FIELDS) == {f for f in TrainConfig.__dataclass_fields__}
    root = tmp_path_factory.mktemp("fields")
    name = data.draw(st.sampled_from(FIELDS))
    value = data.draw(bad_values(name))
    cfg = tiny(root)
    if name in ("data", "out_dir", "hf", "save_hf") and isinstance(value, str) and value:
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


@given(batch=st.integers(1, 64), T=st.sampled_from([16, 256, 4096, 100_000]), D=st.sampled_from([16, 192, 4096]),
       L=st.sampled_from([1, 2, 12, 10**8]))
def test_memory_beyond_what_is_available_is_refused_naming_the_option_that_drives_it(batch, T, D, L):
    """The option named is the one whose lowering to 1 (the others kept) shrinks the estimate the most:
    a very deep model names --n-layer, not --d-model."""
    cfg = GPTConfig(vocab_size=65, block_size=T, n_layer=L, n_head=1, d_model=D)
    total = sum(estimate_memory(cfg, batch).values())
    assert check_memory(cfg, batch, available=total) == total  # exactly enough is enough
    with pytest.raises(ConfigError) as info:
        check_memory(cfg, batch, available=total - 1)

    def lowered(name):
        values = {**cfg.to_dict(), "batch_size": batch, name: 1}
        b = values.pop("batch_size")
        return sum(estimate_memory(GPTConfig(**values), b).values())

    order = ["block_size", "batch_size", "d_model", "n_layer"]
    expected = min(order, key=lambda name: (lowered(name), order.index(name)))
    assert info.value.field == expected and "available" in info.value.reason
    if L == 10**8:
        assert expected == "n_layer"


def test_train_refuses_a_step_larger_than_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "available_memory", lambda: 1 << 10)  # 1 KiB
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path), log=QUIET)
    assert "needs about" in info.value.reason and not (tmp_path / "run").exists()


# -- throughput --------------------------------------------------------------------------------------------
def test_reported_throughput_is_training_time_only(tmp_path, monkeypatch, capsys):
    """Each validation sleeps 0.25 s: tokens/s counting it would be below tokens / 1 s."""
    def slow_eval(model, data, cfg, tokenizer=None):
        time.sleep(0.25)
        return 1.0

    monkeypatch.setattr(train_module, "estimate_loss", slow_eval)
    cfg = tiny(tmp_path, steps=4, eval_interval=1, sample_tokens=0)
    summary = train(cfg)
    tokens = cfg.steps * cfg.batch_size * cfg.block_size
    assert summary["tokens_per_s"] > 4 * tokens  # trained in under a quarter of the evaluations' second
    printed = [float(x.replace(",", "")) for x in re.findall(r"([\d,]+) tok/s", capsys.readouterr().out)]
    assert len(printed) == 4 and min(printed) > 4 * tokens


# -- divergence: stop without saving -------------------------------------------------------------------
def inject_after(monkeypatch, owner, name, at, action, when=lambda *a, **k: True):
    """Wrap ``owner.name``: on its ``at``-th call (counting calls where ``when`` holds) run ``action`` on
    the call's arguments and result, and return what it returns instead of the result."""
    real = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            calls.append(1)
            if len(calls) == at:
                return action(result, *args, **kwargs)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def nan_loss(result, *args, **kwargs):
    return result[0], float("nan")


def nan_gradient(result, model, *args, **kwargs):
    model.parameters()[-1].grad[0] = np.nan
    return result


def training_forward(model, ids, targets=None, *args, **kwargs):
    return model.training and targets is not None


@given(what=st.sampled_from(["loss", "gradient", "validation"]), at=st.integers(1, 12))
def test_a_diverged_run_stops_at_the_step_and_saves_nothing(tmp_path_factory, what, at):
    root = tmp_path_factory.mktemp("diverged")
    cfg = tiny(root, steps=12, eval_interval=4, sample_tokens=0, eval_batches=1)
    with pytest.MonkeyPatch.context() as mp:
        if what == "loss":
            inject_after(mp, GPT, "forward", at, nan_loss, when=training_forward)
        elif what == "gradient":
            inject_after(mp, GPT, "backward", at, nan_gradient)
        else:
            at = 4 * ((at - 1) % 3 + 1)  # the validations come after steps 4, 8 and 12
            inject_after(mp, train_module, "estimate_loss", at // 4, lambda result, *a: float("inf"))
        with pytest.raises(train_module.TrainingDiverged) as info:
            train(cfg, log=QUIET)
    assert info.value.step == at and f"at step {at}:" in str(info.value) and "--lr" in str(info.value)
    saved = 4 * ((at - 1) // 4)  # the last checkpoint before the failing step
    path = root / "run" / "ckpt.npz"
    assert info.value.saved_step == (saved or None)
    if saved:
        state = checkpoint.load(path)
        assert state["step"] == saved and all(np.isfinite(w).all() for w in state["model"].values())
    else:
        assert not path.exists()


def test_a_huge_learning_rate_stops_the_command_and_keeps_the_checkpoint(finished, tmp_path, capsys):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    status = cli_main(["train", "--resume", "--out-dir", str(tmp_path / "run"), "--steps", "30", "--lr", "1e30",
                       "--data", str(tmp_path / "corpus.txt"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, err
    expected = (r"npformer train: error: the run diverged at step 2[1-9]: .*still holds step 20"
                r".*lower --lr \(now 1e\+30\)$")
    assert re.match(expected, err[0]), err
    assert snapshot(tmp_path) == before


# -- Ctrl-C: save the steps done, resume bit for bit --------------------------------------------------------
INTERRUPTED = dict(steps=12, eval_interval=4, dropout=0.1, sample_tokens=3, eval_batches=1)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    summary = train(tiny(root, **INTERRUPTED), log=QUIET)
    return checkpoint.load(summary["checkpoint"])


def raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def assert_same_run(state, reference):
    assert state["step"] == reference["step"]
    assert state["history"] == reference["history"]  # every train and validation loss, bit for bit
    for name, w in reference["model"].items():
        np.testing.assert_array_equal(state["model"][name], w)
    for index, moments in reference["optim"]["state"].items():
        for key, value in moments.items():
            np.testing.assert_array_equal(state["optim"]["state"][index][key], value)
    assert state["rng"] == reference["rng"]


@given(phase=st.sampled_from(["forward", "clip", "validation", "sample", "save"]), at=st.integers(1, 12))
def test_ctrl_c_saves_the_steps_done_and_resume_is_bit_exact(tmp_path_factory, uninterrupted, phase, at):
    root = tmp_path_factory.mktemp("interrupted")
    cfg = tiny(root, **INTERRUPTED)
    with pytest.MonkeyPatch.context() as mp:
        if phase == "forward":  # after the batch and the dropout masks are drawn: the step must be undone
            inject_after(mp, GPT, "forward", at, raise_interrupt, when=training_forward)
            done = at - 1
        elif phase == "clip":
            inject_after(mp, train_module, "clip_grad_norm_", at, raise_interrupt)
            done = at - 1
        else:  # the validations, their samples and saves come after steps 4, 8 and 12
            nth = (at - 1) % 3 + 1
            owner, name = {"validation": (train_module, "estimate_loss"), "sample": (train_module, "generate"),
                           "save": (checkpoint, "save")}[phase]
            inject_after(mp, owner, name, nth, raise_interrupt)
            done = 4 * nth
        with pytest.raises(train_module.TrainingInterrupted) as info:
            train(cfg, log=QUIET)
    assert info.value.step == done and f"interrupted at step {done};" in str(info.value)
    path = root / "run" / "ckpt.npz"
    if done == 0:
        assert not path.exists() and not info.value.saved
        train(cfg, log=QUIET)
    else:
        assert checkpoint.load(path)["step"] == done
        train(tiny(root, resume=True, **INTERRUPTED), log=QUIET)
    assert_same_run(checkpoint.load(path), uninterrupted)


@given(at=st.integers(1, 12))
def test_a_real_sigint_during_an_update_waits_for_the_update(tmp_path_factory, uninterrupted, at):
    """SIGINT delivered inside the optimizer's step: the update and its record finish first."""
    import signal

    root = tmp_path_factory.mktemp("sigint")
    with pytest.MonkeyPatch.context() as mp:
        inject_after(mp, AdamW, "step", at, lambda result, *a: signal.raise_signal(signal.SIGINT))
        with pytest.raises(train_module.TrainingInterrupted) as info:
            train(tiny(root, **INTERRUPTED), log=QUIET)
    assert info.value.step == at and checkpoint.load(root / "run" / "ckpt.npz")["step"] == at
    train(tiny(root, resume=True, **INTERRUPTED), log=QUIET)
    assert_same_run(checkpoint.load(root / "run" / "ckpt.npz"), uninterrupted)


def test_ctrl_c_on_the_command_line_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    inject_after(monkeypatch, train_module, "clip_grad_norm_", 6, raise_interrupt)
    cfg = tiny(tmp_path, **INTERRUPTED)
    status = cli_main(["train", "--data", cfg.data, "--n-layer", "1", "--n-head", "2", "--d-model", "16",
                       "--block-size", "16", "--steps", "12", "--eval-interval", "4", "--sample-tokens", "0",
                       "--out-dir", cfg.out_dir, "--no-progress"])
    captured = capsys.readouterr()
    assert status == 130 and "Traceback" not in captured.err
    assert captured.err.strip().splitlines() == [
        f"npformer train: interrupted at step 5; saved {cfg.out_dir}/ckpt.npz; continue with --resume "
        f"--out-dir {cfg.out_dir}"]
    assert checkpoint.load(f"{cfg.out_dir}/ckpt.npz")["step"] == 5 and (tmp_path / "run" / "loss.png").is_file()


# -- the validation share ----------------------------------------------------------------------------------
def model_line(lines):
    line = next(entry for entry in lines if entry.startswith("model:"))
    counts = re.search(r"([\d,]+) train / ([\d,]+) val tokens", line).groups()
    return tuple(int(n.replace(",", "")) for n in counts)


@given(length=st.integers(2_000, 30_000), fraction=st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.7]),
       seed=st.integers(0, 50))
def test_the_validation_share_is_the_fraction_asked_for(tmp_path_factory, length, fraction, seed):
    """Within 10% of min(f, 1 - f), on short texts too (chunks of 4096 gave 50% below 8192 characters)."""
    root = tmp_path_factory.mktemp("split")
    (root / "corpus.txt").write_text((TEXT * (length // len(TEXT) + 1))[:length], encoding="utf-8")
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "plot_losses", lambda history, path: path)
        train(tiny(root, val_fraction=fraction, seed=seed, steps=1, eval_batches=1, sample_tokens=0),
              log=lines.append)
    train_n, val_n = model_line(lines)
    assert train_n + val_n == length
    assert abs(val_n / length - fraction) <= 0.1 * min(fraction, 1 - fraction), (train_n, val_n)


def test_a_long_text_keeps_chunks_of_4096(tmp_path, monkeypatch):
    """Where chunks of 4096 already hold the fraction (the built-in corpus), the split is what it was."""
    from npformer.data.corpus import train_val_split

    text = (TEXT * 30)[:40_000]  # 10 chunks of 4000: one of them is exactly 10%
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(train_module, "plot_losses", lambda history, path: path)
    summary = train(tiny(tmp_path, steps=1, eval_batches=1, sample_tokens=0), log=QUIET)
    ids = train_module.CharTokenizer.from_text(text).encode_array(text)
    _, val_ids = train_val_split(ids, 0.1, seed=1337, chunk_size=4096)
    assert checkpoint.load(summary["checkpoint"])["split"] == {"chunk_size": 4096} and len(val_ids) == 4000


# -- data too short, folders that cannot be made -----------------------------------------------------------
@given(st.integers(1, 3))
def test_a_text_too_short_for_any_block_says_so(tmp_path_factory, length):
    root = tmp_path_factory.mktemp("short")
    (root / "corpus.txt").write_text("ab\n"[:length], encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        train(tiny(root, block_size=1), log=QUIET)
    assert info.value.field == "data" and ("too short" in info.value.reason or "at least 2" in info.value.reason)
    assert not (root / "run").exists()


@given(st.sampled_from(["corpus.txt/sub", "corpus.txt/a/b", "/proc/nope", "/proc/self/nope/deeper"]))
def test_an_out_dir_that_cannot_be_made_is_refused(tmp_path_factory, out_dir):
    root = tmp_path_factory.mktemp("outdir")
    cfg = tiny(root)
    cfg.out_dir = str(root / out_dir) if not out_dir.startswith("/") else out_dir
    with pytest.raises(ConfigError) as info:
        train(cfg, log=QUIET)
    assert info.value.field == "out_dir" and "folder" in info.value.reason
    assert (root / "corpus.txt").is_file()


# -- checkpoints that load but do not fit ----------------------------------------------------------------
def first(mapping):
    return next(iter(mapping))


DAMAGE = {
    "renamed weight": lambda s: s["model"].__setitem__("renamed", s["model"].pop(first(s["model"]))),
    "missing weight": lambda s: s["model"].pop(first(s["model"])),
    "weight of another shape": lambda s: s["model"].__setitem__(first(s["model"]), np.zeros(3, np.float32)),
    "float64 weights": lambda s: s["model"].update({k: v.astype(np.float64) for k, v in s["model"].items()}),
    "NaN weight": lambda s: s["model"][first(s["model"])].__setitem__((0, 0), np.nan),
    "optimizer groups": lambda s: s["optim"].__setitem__("param_groups", s["optim"]["param_groups"][:1]),
    "optimizer moment": lambda s: s["optim"]["state"]["0"].__setitem__("exp_avg", np.zeros(2, np.float32)),
    "optimizer not a dict": lambda s: s.__setitem__("optim", [1, 2]),
    "rng of another generator": lambda s: s["rng"]["data"].__setitem__("bit_generator", "MT19937"),
    "rng state garbage": lambda s: s["rng"]["model"].__setitem__("state", "garbage"),
    "history not lists": lambda s: s["history"].__setitem__("train_loss", 3.0),
    "history lengths": lambda s: s["history"]["train_loss"].pop(),
    "validation history lengths": lambda s: s["history"]["val_loss"].append(1.0),
    "history steps": lambda s: s["history"]["steps"].reverse(),
    "model config": lambda s: s["model_config"].__setitem__("bias", False),
    "split": lambda s: s.__setitem__("split", {"chunk_size": -4}),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_checks_the_whole_checkpoint_before_training(finished, tmp_path_factory, damage):
    root = tmp_path_factory.mktemp("misfit")
    state = checkpoint.load(finished / "run" / "ckpt.npz")
    DAMAGE[damage](state)
    path = checkpoint.save(root / "run" / "ckpt.npz", state)
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    before = snapshot(root)
    with pytest.raises(checkpoint.CheckpointError) as info:
        train(tiny(root, resume=True, steps=30), log=QUIET)
    assert str(path) in str(info.value)
    assert snapshot(root) == before
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(["train", "--resume", "--out-dir", str(root / "run"), "--steps", "30",
                           "--data", str(root / "corpus.txt")])
    lines = err.getvalue().strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("npformer train: error: argument --resume: ")
    assert snapshot(root) == before


# -- resuming: data checked first, the schedule stated, stop_at evaluated ---------------------------------
def test_a_finished_run_checks_the_data_before_saying_it_is_finished(finished, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(TEXT.upper(), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        train(tiny(finished, resume=True, data=str(other)), log=QUIET)
    assert info.value.field == "data"


@given(st.integers(21, 60))
def test_resume_states_the_learning_rate_of_the_new_schedule(finished, tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("extend")
    shutil.copytree(finished, root, dirs_exist_ok=True)
    lines = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "plot_losses", lambda history, path: path)
        mp.setattr(train_module, "estimate_loss", lambda *a: 1.0)
        mp.setattr(train_module, "get_batch", raise_interrupt)  # no need to train: the line comes first
        with pytest.raises(train_module.TrainingInterrupted):
            train(tiny(root, resume=True, steps=steps, sample_tokens=0), log=lines.append)
    cfg = tiny(root, steps=steps)
    expected = train_module.warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, steps)(20)
    last = train_module.warmup_cosine(cfg.lr, cfg.min_lr, cfg.warmup, 20)(19)
    line = next(entry for entry in lines if entry.startswith("resumed from"))
    assert f"at step 20 of {steps}; learning rate {expected:.3g} (the last step used {last:.3g})" in line
    assert f"decays to --min-lr at step {steps}, not 20" in line


@given(st.integers(1, 19))
def test_a_stopped_run_reports_the_validation_loss_at_its_step(tmp_path_factory, stop_at):
    root = tmp_path_factory.mktemp("stopat")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "plot_losses", lambda history, path: path)
        summary = train(tiny(root, stop_at=stop_at, sample_tokens=0), log=QUIET)
    assert summary["step"] == stop_at and not summary["complete"]
    model = GPT(GPTConfig(**checkpoint.load(summary["checkpoint"])["model_config"]))
    model.load_state_dict(checkpoint.load(summary["checkpoint"])["model"])
    text = TEXT
    tok = train_module.CharTokenizer.from_text(text)
    _, val_ids, _ = train_module.split_tokens(tok.encode_array(text), 0.1, 1337)
    assert summary["val_loss"] == train_module.estimate_loss(model, val_ids, tiny(root))


def test_stop_at_beyond_steps_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, steps=2, stop_at=5), log=QUIET)
    assert info.value.field == "stop_at" and "at most" in info.value.reason and not (tmp_path / "run").exists()


# -- overwrite in the other format ---------------------------------------------------------------------------
@given(st.sampled_from([("npz", "safetensors"), ("safetensors", "npz")]))
def test_overwrite_in_the_other_format_removes_the_old_checkpoint(tmp_path_factory, formats):
    old, new = formats
    root = tmp_path_factory.mktemp("formats")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "plot_losses", lambda history, path: path)
        train(tiny(root, steps=4, eval_interval=4, sample_tokens=0, checkpoint_format=old), log=QUIET)
        train(tiny(root, steps=2, eval_interval=2, sample_tokens=0, checkpoint_format=new, overwrite=True),
              log=QUIET)
    assert saved_runs(root / "run") == [root / "run" / f"ckpt.{new}"]
    assert checkpoint.load(root / "run" / f"ckpt.{new}")["step"] == 2


def test_a_folder_with_both_formats_is_refused_naming_both(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    state = checkpoint.load(tmp_path / "run" / "ckpt.npz")
    checkpoint.save(tmp_path / "run" / "ckpt.safetensors", state)
    for fmt in ("npz", "safetensors"):
        with pytest.raises(ConfigError) as info:
            train(tiny(tmp_path, resume=True, steps=30, checkpoint_format=fmt), log=QUIET)
        assert info.value.field == "resume"
        assert "ckpt.npz" in info.value.reason and "ckpt.safetensors" in info.value.reason


# -- one training per run folder ------------------------------------------------------------------------
@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_where_a_training_runs_is_refused(finished, tmp_path, resume, capsys):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    if not resume:
        for p in saved_runs(tmp_path / "run"):
            p.unlink()
    before = snapshot(tmp_path)
    lock = train_module.lock_run_folder(str(tmp_path / "run"))  # as a first training holds it
    try:
        with pytest.raises(ConfigError) as info:
            train(tiny(tmp_path, resume=resume, steps=30), log=QUIET)
        assert info.value.field == "out_dir" and f"another training is running in {tmp_path / 'run'}" in str(info.value)
        assert snapshot(tmp_path) == before
        capsys.readouterr()
        args = ["train", "--out-dir", str(tmp_path / "run"), "--steps", "30"] + (
            ["--resume"] if resume else ["--data", str(tmp_path / "corpus.txt")])
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"npformer train: error: argument --out-dir: another training is running in "
                       f"{tmp_path / 'run'}: wait for it to end, or use another --out-dir"]
        assert snapshot(tmp_path) == before
    finally:
        lock.release()
    summary = train(tiny(tmp_path, resume=resume, steps=30), log=QUIET)  # released: it trains
    assert summary["step"] == 30
    train_module.lock_run_folder(str(tmp_path / "run")).release()  # and train released its own lock


# -- an edited optimizer state, data entry, history or config is refused ----------------------------------
def drop_moments(s):
    del s["optim"]["state"][str(len(s["optim"]["state"]) - 1)]


def set_group(i, key, value):
    return lambda s: s["optim"]["param_groups"][i].__setitem__(key, value)


EDITS = {
    "moments deleted": drop_moments,
    "one step differs": lambda s: s["optim"]["state"]["3"].__setitem__("step", 19),
    "all steps differ from the run": lambda s: [e.__setitem__("step", 21) for e in s["optim"]["state"].values()],
    "betas": set_group(0, "betas", [0.9, 0.999]),
    "eps": set_group(1, "eps", 1e-6),
    "weight decay": set_group(0, "weight_decay", 0.2),
    "exempt decay": set_group(1, "weight_decay", 0.1),
    "lr": lambda s: [g.__setitem__("lr", g["lr"] * 2) for g in s["optim"]["param_groups"]],
    "names swapped": lambda s: s["optim"]["param_groups"][0]["names"].reverse(),
    "names between groups": lambda s: s["optim"]["param_groups"][0]["names"].__setitem__(
        0, s["optim"]["param_groups"][1]["names"][0]),
    "data not a dict": lambda s: s.__setitem__("data", "81a1dff0"),
    "data short": lambda s: s["data"].pop("sha256"),
    "NaN loss": lambda s: s["history"]["train_loss"].__setitem__(3, float("nan")),
    "inf val loss": lambda s: s["history"]["val_loss"].__setitem__(0, float("inf")),
    "history shorter than the step": lambda s: (s["history"]["steps"].pop(), s["history"]["train_loss"].pop()),
    "steps None": lambda s: s["config"].__setitem__("steps", None),
    "steps below the step": lambda s: s["config"].__setitem__("steps", 10),
    "lr None": lambda s: s["config"].__setitem__("lr", None),
}


@given(edit=st.sampled_from(sorted(EDITS)), fmt=st.sampled_from(["npz", "safetensors"]))
def test_resume_refuses_an_edited_optimizer_data_history_or_config(finished, tmp_path_factory, edit, fmt):
    root = tmp_path_factory.mktemp("edited")
    state = checkpoint.load(finished / "run" / "ckpt.npz")
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    checkpoint.save(root / "run" / f"ckpt.{fmt}", state)
    before = snapshot(root)
    with pytest.raises(ConfigError, match="20 steps"):  # the unedited file is accepted up to --steps
        train(tiny(root, resume=True, steps=10, checkpoint_format=fmt), log=QUIET)
    EDITS[edit](state)
    path = checkpoint.save(root / "run" / f"ckpt.{fmt}", state)
    before = snapshot(root)
    with pytest.raises(checkpoint.CheckpointError) as info:
        train(tiny(root, resume=True, steps=30, checkpoint_format=fmt), log=QUIET)
    assert str(path) in str(info.value)
    assert re.search(r"'(optim|data|history|config)[/']", str(info.value))
    assert snapshot(root) == before


def test_the_unedited_checkpoint_resumes(finished, tmp_path):
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    state = checkpoint.load(tmp_path / "run" / "ckpt.npz")
    checkpoint.save(tmp_path / "run" / "ckpt.npz", state)
    assert train(tiny(tmp_path, resume=True, steps=22), log=QUIET)["step"] == 22


def test_a_run_stopped_early_is_not_reported_as_final(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=6, eval_interval=3)
    args = ["train", "--data", cfg.data, "--steps", "6", "--stop-at", "3", "--block-size", "16", "--batch-size", "4",
            "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--eval-interval", "3", "--eval-batches", "1",
            "--sample-tokens", "5", "--out-dir", cfg.out_dir, "--no-progress"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "at step 3: train loss" in out and "final:" not in out
    assert "stopped at step 3 of 6" in out


def test_save_hf_of_a_family_without_a_map_is_refused_before_training(tmp_path, monkeypatch):
    """A model save_pretrained cannot write is refused up front, naming save_hf, with nothing written."""
    import npformer.hf as hf

    def no_map(model, **_):
        raise TypeError(f"hf_state_dict: argument 'model' expected a mapped family, got {type(model).__name__}")

    monkeypatch.setattr(hf, "check_savable", no_map)
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, model="bert", save_hf=str(tmp_path / "hf")), log=QUIET)
    assert info.value.field == "save_hf" and "Bert" in info.value.reason
    assert not (tmp_path / "run").exists() and not (tmp_path / "hf").exists()


def test_save_hf_of_the_electra_pair_is_refused_before_training(tmp_path):
    """The trained generator + discriminator pair is no single Hugging Face model: refused up front."""
    with pytest.raises(ConfigError) as info:
        train(tiny(tmp_path, model="electra", save_hf=str(tmp_path / "hf")), log=QUIET)
    assert info.value.field == "save_hf" and not (tmp_path / "run").exists()
