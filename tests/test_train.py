"""Training end to end on a tiny corpus: learning, checkpoints, exact resume, the command line."""

import json

import numpy as np
import pytest

from npformer import checkpoint
from npformer.cli import main as cli_main
from npformer.train import TrainConfig, train

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40


def tiny(tmp_path, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "corpus.txt"
    data.write_text(TEXT, encoding="utf-8")
    base = dict(data=str(data), n_layer=1, n_head=2, d_model=16, block_size=16, batch_size=4, steps=20,
                warmup=2, eval_interval=10, eval_batches=2, sample_tokens=8, lr=1e-2,
                out_dir=str(tmp_path / "run"), progress=False)
    return TrainConfig(**{**base, **overrides})


def test_training_lowers_the_loss_and_writes_its_files(tmp_path):
    summary = train(tiny(tmp_path, steps=60, eval_interval=30), log=lambda *a: None)
    history = summary["history"]
    assert np.mean(history.train_loss[:5]) - np.mean(history.train_loss[-5:]) > 1.0
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    state = checkpoint.load(summary["checkpoint"])
    assert state["step"] == 60 and state["model_config"]["n_layer"] == 1


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, fmt):
    quiet = lambda *a: None  # noqa: E731
    full = train(tiny(tmp_path / "a", checkpoint_format=fmt, dropout=0.1), log=quiet)["history"]
    train(tiny(tmp_path / "b", checkpoint_format=fmt, dropout=0.1, stop_at=10), log=quiet)
    resumed = train(tiny(tmp_path / "b", checkpoint_format=fmt, dropout=0.1, resume=True), log=quiet)["history"]
    assert resumed.steps == full.steps
    assert resumed.train_loss == full.train_loss  # bit for bit: same weights, optimizer, data and dropout streams
    assert resumed.val_loss == full.val_loss


def test_command_line_train_and_sample(tmp_path, capsys):
    cfg = tiny(tmp_path, steps=10, eval_interval=10)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"n_layer": 1, "d_model": 16, "n_head": 2}))
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
    summary = train(tiny(tmp_path, steps=10, eval_interval=10), log=lambda *a: None)
    path = summary["checkpoint"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError):
        train(tiny(tmp_path, steps=20, resume=True), log=lambda *a: None)
