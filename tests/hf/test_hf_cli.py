"""The command line with Hugging Face folders: sample --hf, train --hf --save-hf, bench --inference.

A whole folder is built here, as a hub download would hold it: a tiny random transformers
model whose vocabulary is that of a tokenizer trained in the test (LLaMA-2-style
SentencePiece BPE with byte fallback, or GPT-2's byte-level BPE), its tokenizer.json,
tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from npformer.cli import main  # noqa: E402
from npformer.hf import load_pretrained  # noqa: E402
from tests.hf.test_tokenizer import build_gpt2, build_llama2, build_mistral_metaspace, build_qwen2, corpus  # noqa: E402
from tests.tolerances import HF_LOGITS_RTOL, assert_close  # noqa: E402

F32 = np.dtype(np.float32)


# each family with the tokenizer of its kind; the model's vocabulary padded beyond the tokenizer's for LLaMA
TOKENIZERS = {"llama": build_llama2, "mistral": build_mistral_metaspace, "qwen2": build_qwen2, "gpt2": build_gpt2}
SPECIAL = {"llama": ("<s>", "</s>"), "mistral": ("<s>", "</s>"), "qwen2": ("<|endoftext|>", "<|im_end|>"),
           "gpt2": ("<|endoftext|>", "<|endoftext|>")}


def _config(family: str, vocab: int, special: dict):
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab + 3, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, tie_word_embeddings=False, **special)
    if family == "mistral":  # a window shorter than the training block and the sampled text
        return transformers.MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                          sliding_window=6, tie_word_embeddings=False, **special)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True, use_sliding_window=False, **special)
    return transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)


def build_folder(folder, family: str, do_sample: bool = False):
    """A complete model folder: weights, config, tokenizer files and generation settings."""
    tok = TOKENIZERS[family]()
    names = dict(zip(("bos_token", "eos_token"), SPECIAL[family]))
    special = {k + "_id": tok.token_to_id(v) for k, v in names.items()}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, tok.get_vocab_size(), special))
    with torch.no_grad():  # weights large enough that greedy decoding is not one repeated token
        for name, p in model.named_parameters():
            if not ("norm" in name or ".ln_" in name):
                p.normal_(0.0, 0.2)
    model.generation_config = transformers.GenerationConfig(do_sample=do_sample, max_new_tokens=20,
                                                            eos_token_id=special["eos_token_id"],
                                                            bos_token_id=special["bos_token_id"])
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(names))
    return folder, tok


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def folder(request, tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp(request.param), request.param)


def run(argv, cwd):
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("prompt", ["the water", "def f(x):\n    return x"])
def test_sample_hf_is_transformers_greedy_generate(folder, tmp_path, prompt):
    """The folder's generation_config.json (greedy, max_new_tokens 20, eos) and tokenizer give the text
    of transformers' generate decoded by the tokenizers library."""
    path, oracle_tok = folder
    status, out, err = run(["sample", "--hf", str(path), "--prompt", prompt], tmp_path)
    assert status == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([oracle_tok.encode(prompt).ids])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids))[0].tolist()
    assert len(expected) > ids.shape[1] + 1  # the check sees generated tokens
    assert out == oracle_tok.decode(expected, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("tokens", [0, 1, 3])
def test_sample_hf_flags_win_over_the_generation_config(folder, tmp_path, tokens):
    """--tokens replaces the folder's max_new_tokens (20): the text of transformers' generate with
    max_new_tokens=tokens."""
    path, oracle_tok = folder
    status, out, err = run(["sample", "--hf", str(path), "--prompt", "the", "--tokens", str(tokens)], tmp_path)
    assert status == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([oracle_tok.encode("the").ids])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens)[0].tolist() \
            if tokens else ids[0].tolist()
    assert len(expected) == ids.shape[1] + tokens
    assert out == oracle_tok.decode(expected, skip_special_tokens=True) + "\n"


def test_train_hf_fine_tunes_and_saves_a_folder_transformers_loads(folder, tmp_path):
    path, _ = folder
    text = "\n".join(corpus()) * 2
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "tuned"
    argv = ["train", "--hf", str(path), "--data", "text.txt", "--steps", "30", "--block-size", "16",
            "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--eval-interval", "15", "--eval-batches", "2",
            "--sample-tokens", "4", "--out-dir", "run", "--save-hf", str(out), "--no-progress"]
    status, stdout, err = run(argv, tmp_path)
    assert status == 0, err
    losses = [float(line.split("val ")[1].split(",")[0]) for line in stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and losses[1] < losses[0]
    # transformers opens the saved folder and computes the same logits as npformer's model of it
    ours = load_pretrained(out)
    assert isinstance(ours.cfg.vocab_size, int) and (out / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, ours.cfg.vocab_size, (2, 10))
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits.numpy()
    logits, _ = ours.forward(ids)
    assert_close(logits, expected, rtol=HF_LOGITS_RTOL[F32], what="fine-tuned folder")
    # the saved weights moved away from the folder's
    before = load_pretrained(path).state_dict()
    assert any(not np.array_equal(v, before[k]) for k, v in ours.state_dict().items())
    # and the run resumes from its checkpoint with the folder's tokenizer
    status, _, err = run(argv[:5] + ["--steps", "32", "--resume", "--out-dir", "run", "--no-progress",
                                     "--sample-tokens", "0"], tmp_path)
    assert status == 0, err


@pytest.mark.parametrize("extra, option", [
    (["--n-layer", "3"], "--n-layer"), (["--model", "llama"], "--model"), (["--d-model", "64"], "--d-model"),
    (["--block-size", "4096"], "--block-size"), (["--dropout", "0.1"], "--dropout")])
def test_train_hf_refuses_what_the_folder_sets(folder, tmp_path, extra, option):
    path, _ = folder
    (tmp_path / "text.txt").write_text("\n".join(corpus()), encoding="utf-8")
    status, _, err = run(["train", "--hf", str(path), "--data", "text.txt", "--steps", "2", "--out-dir", "run",
                          "--no-progress"] + extra, tmp_path)
    assert status == 2 and f"argument {option}:" in err, err
    assert not (tmp_path / "run").exists()


def test_sample_hf_names_a_bad_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "bert"}')
    for bad in ("missing", "empty", "broken"):
        status, out, err = run(["sample", "--hf", bad, "--prompt", "x"], tmp_path)
        assert status == 2 and "argument --hf:" in err and out == "", err


def test_bench_inference_times_both_engines_on_a_folder(folder, tmp_path):
    """bench --inference --hf DIR: prefill and decode tokens/s of npformer and transformers on the same weights,
    the ratios consistent with them, the same greedy tokens, and both BLAS libraries named."""
    path, _ = folder
    status, out, err = run(["bench", "--inference", "--hf", str(path), "--prompt-len", "6", "--new-tokens", "5",
                            "--repeats", "1", "--json"], tmp_path)
    assert status == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    ours, theirs = result["npformer"], result["transformers"]
    assert result["same_tokens"] is True and result["prompt_len"] == 6 and result["new_tokens"] == 5
    for engine in (ours, theirs):
        assert engine["prefill_tokens_per_s"] > 0 and engine["decode_tokens_per_s"] > 0
    assert result["decode_ratio"] == pytest.approx(ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"])
    assert result["prefill_ratio"] == pytest.approx(ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"])
    assert theirs["blas"] != "unknown" and "internal_api" in result["numpy_blas"]


@pytest.mark.parametrize("argv, option", [
    (["--inference", "--prompt-len", "0"], "--prompt-len"), (["--inference", "--n-layer", "2"], "--n-layer"),
    (["--inference", "--hf", "missing"], "--hf"), (["--prompt-len", "8"], "--prompt-len"),
    (["--inference", "--new-tokens", "-1"], "--new-tokens")])
def test_bench_inference_options_are_checked_by_name(argv, option, tmp_path):
    status, out, err = run(["bench"] + argv, tmp_path)
    assert status == 2 and f"argument {option}:" in err and out == "", err


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.8), dict(min_new_tokens=12, max_new_tokens=14), dict(max_length=9),
    dict(repetition_penalty=0.7, max_new_tokens=10)])
def test_sample_hf_follows_more_generation_settings_as_transformers(folder, tmp_path, settings):
    """repetition_penalty, min_new_tokens and max_length in generation_config.json give transformers' text."""
    path, oracle_tok = folder
    local = tmp_path / "model"
    shutil.copytree(path, local)
    gen = json.loads((local / "generation_config.json").read_text())
    gen.pop("max_new_tokens") if "max_length" in settings else None
    gen.update(settings)
    (local / "generation_config.json").write_text(json.dumps(gen))
    status, out, err = run(["sample", "--hf", str(local), "--prompt", "the water of the"], tmp_path)
    assert status == 0, err
    hf = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    ids = torch.tensor([oracle_tok.encode("the water of the").ids])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids))[0].tolist()
    assert out == oracle_tok.decode(expected, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("settings, named", [
    (dict(num_beams=3), "num_beams"), (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(min_new_tokens=-1), "min_new_tokens")])
def test_sample_hf_refuses_settings_it_cannot_follow(folder, tmp_path, settings, named):
    path, _ = folder
    local = tmp_path / "model"
    shutil.copytree(path, local)
    gen = json.loads((local / "generation_config.json").read_text()) | settings
    (local / "generation_config.json").write_text(json.dumps(gen))
    status, out, err = run(["sample", "--hf", str(local), "--prompt", "the"], tmp_path)
    assert status == 2 and "argument --hf:" in err and named in err and out == "", err


def test_bench_inference_names_a_length_beyond_the_context(folder, tmp_path):
    path, _ = folder
    status, out, err = run(["bench", "--inference", "--hf", str(path), "--prompt-len", "100", "--new-tokens", "100"],
                           tmp_path)
    assert status == 2 and "argument --new-tokens:" in err, err


def test_hf_commands_refuse_an_encoder_folder_by_name(tmp_path):
    """A BERT folder loads (load_pretrained reads encoders too), but sample, train and bench need a causal LM."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertForPreTraining(config).save_pretrained(tmp_path / "bert")
    (tmp_path / "text.txt").write_text("some text " * 200)
    for argv in (["sample", "--hf", "bert", "--prompt", "x"],
                 ["train", "--hf", "bert", "--data", "text.txt", "--steps", "1", "--out-dir", "run", "--no-progress"],
                 ["bench", "--inference", "--hf", "bert", "--prompt-len", "4", "--new-tokens", "2"]):
        status, out, err = run(argv, tmp_path)
        assert status == 2 and "argument --hf:" in err and "causal language model" in err, (argv, err)
        assert not (tmp_path / "run").exists()
