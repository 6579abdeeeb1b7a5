"""``npformer bench --inference``: prompt processing and KV-cached decoding, side by side with transformers.

One model, two engines, one run: npformer in NumPy and Hugging Face transformers on
torch's CPU build, with the same weights (npformer writes the folder that transformers
loads, so both read identical float32 tensors). Reported:

- prompt processing (prefill): tokens/s of one forward over a ``prompt_len``-token prompt;
- decoding: tokens/s of ``new_tokens`` greedy steps, one token per forward, each
  attending to the KV cache (transformers: ``past_key_values``; eager attention, as
  named in the result, or ``attn="sdpa"``);
- whether the two engines picked the same greedy tokens;
- the BLAS each engine runs (NumPy's through threadpoolctl, torch's from its build) and
  the thread counts.

Timings are the median of ``repeats`` runs after one untimed warm-up. The default model is
GPT-2-124M-shaped with random weights (no download); ``folder`` benches a local Hugging
Face folder instead (GPT-2, LLaMA, Mistral, Qwen2).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from .bench import blas_info
from .ops._checks import check_bool, check_count

# GPT-2 small (124M parameters) and a LLaMA of about the same size (LLaMA-2's 32k vocabulary).
SHAPES = {
    "gpt": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768),
    "llama": dict(vocab_size=32000, block_size=1024, n_layer=12, n_head=12, n_kv_head=4, d_model=768),
}


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, BLAS threads, lazy imports
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def npformer_decode(model, prompt: np.ndarray, new_tokens: int) -> tuple:
    """Greedy KV-cached decoding: (seconds of the ``new_tokens - 1`` one-token steps after the prompt's forward,
    the tokens (B, new_tokens))."""
    model.eval()
    caches = model.make_kv_caches(prompt.shape[0])
    logits, _ = model.forward(prompt, kv_caches=caches)
    nxt = logits[:, -1].argmax(-1)[:, None]
    out = [nxt]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, _ = model.forward(nxt, kv_caches=caches)
        nxt = logits[:, -1].argmax(-1)[:, None]
        out.append(nxt)
    return time.perf_counter() - t, np.concatenate(out, axis=1)


def run(folder: Optional[str] = None, *, family: str = "gpt", prompt_len: int = 128, new_tokens: int = 32,
        batch: int = 1, repeats: int = 3, hf: bool = True, attn: str = "eager", log=print) -> Dict[str, object]:
    """Time prefill and decode of npformer (and transformers, if ``hf`` and it is installed); figures by name."""
    from .hf import load_pretrained, save_pretrained
    from .models import build, check_causal_lm

    op = "bench_inference.run"
    if family not in SHAPES:
        raise ValueError(f"{op}: argument 'family' expected one of {', '.join(SHAPES)}, got {family!r}")
    for name, value, lo in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("batch", batch, 1),
                            ("repeats", repeats, 1)):
        check_count(op, name, value, lo=lo)
    check_bool(op, "hf", hf)
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"{op}: argument 'attn' expected 'eager' or 'sdpa', got {attn!r}")

    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            model = build(family, SHAPES[family], seed=0)
            folder = os.path.join(tmp, "model")
            save_pretrained(model, folder)
            source = f"random {family} weights, {SHAPES[family]}"
        else:
            model = load_pretrained(folder)
            check_causal_lm(op, "folder", model)
            source = str(folder)
        cfg = model.cfg
        if prompt_len + new_tokens > cfg.block_size:
            raise ValueError(f"{op}: argument 'new_tokens' expected prompt_len + new_tokens <= block_size = "
                             f"{cfg.block_size}, got {prompt_len} + {new_tokens}")
        model.eval()
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
        n_params = model.num_parameters()
        log(f"model: {source} ({n_params / 1e6:.1f}M parameters); prompt {batch} x {prompt_len}, "
            f"{new_tokens} new tokens, median of {repeats}")
        result: Dict[str, object] = {"model": source, "parameters": n_params, "batch": batch,
                                     "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                                     "numpy_blas": blas_info()}

        t_prefill = _median_time(lambda: model.forward(prompt), repeats)
        decode: List[float] = []
        ours = None
        for _ in range(repeats + 1):
            seconds, ours = npformer_decode(model, prompt, new_tokens)
            decode.append(seconds)
        t_decode = float(np.median(decode[1:]))  # the first is the warm-up
        steps = batch * (new_tokens - 1)
        result["npformer"] = {"prefill_tokens_per_s": batch * prompt_len / t_prefill,
                              "decode_tokens_per_s": steps / t_decode if steps else None}
        log(f"npformer:     prefill {result['npformer']['prefill_tokens_per_s']:,.0f} tok/s, decode "
            f"{_rate(result['npformer']['decode_tokens_per_s'])} ({result['numpy_blas']})")

        result["transformers"] = None
        if hf:
            import importlib
            import importlib.util

            if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
                log("transformers: not run (not installed; pip install 'npformer[hf]')")
                return result
            baseline = importlib.import_module("kernels.twins.hf_decode")  # torch lives in kernels/, never here
            theirs = baseline.time_inference(folder, prompt, new_tokens, repeats, attn)
            tokens = theirs.pop("tokens")
            t_hf_prefill, t_hf_decode = theirs.pop("prefill_s"), theirs.pop("decode_s")
            result["transformers"] = {"prefill_tokens_per_s": batch * prompt_len / t_hf_prefill,
                                      "decode_tokens_per_s": steps / t_hf_decode if steps else None, **theirs}
            result["same_tokens"] = bool(np.array_equal(ours, tokens))
            result["prefill_ratio"] = t_hf_prefill / t_prefill
            result["decode_ratio"] = t_hf_decode / t_decode if steps else None
            log(f"transformers: prefill {result['transformers']['prefill_tokens_per_s']:,.0f} tok/s, decode "
                f"{_rate(result['transformers']['decode_tokens_per_s'])} ({attn} attention, "
                f"{theirs['blas']}, {theirs['num_threads']} threads)")
            log(f"npformer / transformers: prefill {result['prefill_ratio']:.2f}x, decode "
                f"{_ratio(result['decode_ratio'])}; same greedy tokens: {result['same_tokens']}")
    return result


def _rate(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.1f} tok/s"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"
