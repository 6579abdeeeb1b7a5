"""``npformer bench --inference``: prompt processing and KV-cached decoding, three engines side by side.

One model, three engines, one run, the same weights: npformer in NumPy; its torch twin
(``kernels/twins/gpt.py`` or ``llama.py``: the repository's own torch model, decoding with a
KV cache through ``kernels/twins/decode.py``); and Hugging Face transformers on torch's CPU
build (npformer writes the folder that transformers loads, so all three read identical
float32 tensors; a float64 run widens them exactly). Reported:

- prompt processing (prefill): tokens/s of one forward over a ``prompt_len``-token prompt;
- decoding: tokens/s of ``new_tokens`` greedy steps, one token per forward, each
  attending to the KV cache (transformers: ``past_key_values``; eager attention, as
  named in the result, or ``attn="sdpa"``; the twin: torch's ``scaled_dot_product_attention``);
- the ratios npformer / twin and npformer / transformers (above 1: npformer is faster);
- whether the engines picked the same greedy tokens, and where they first part if not
  (reported, never raised: in float32 a near tie of two logits may go either way);
- the BLAS each engine runs (NumPy's through threadpoolctl, torch's from its build) and
  the thread counts.

Timings are the median of ``repeats`` runs after one untimed warm-up. The default model is
GPT-2-124M-shaped with random weights (no download), or a LLaMA of its size (``family="llama"``,
grouped-query attention); ``folder`` benches a local Hugging Face folder instead (GPT-2, LLaMA,
Mistral, Qwen2).
"""

from __future__ import annotations

import importlib
import importlib.util
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
        batch: int = 1, repeats: int = 3, hf: bool = True, twin: bool = True, attn: str = "eager",
        dtype: str = "float32", log=print) -> Dict[str, object]:
    """Time prefill and decode of npformer, of its torch twin (if ``twin`` and torch is installed) and of
    transformers (if ``hf`` and it is installed), all in ``dtype``; the figures by name."""
    from .hf import load_pretrained, save_pretrained
    from .models import build, check_causal_lm, family_of

    op = "bench_inference.run"
    if family not in SHAPES:
        raise ValueError(f"{op}: argument 'family' expected one of {', '.join(SHAPES)}, got {family!r}")
    for name, value, lo in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("batch", batch, 1),
                            ("repeats", repeats, 1)):
        check_count(op, name, value, lo=lo)
    check_bool(op, "hf", hf)
    check_bool(op, "twin", twin)
    if attn not in ("eager", "sdpa"):
        raise ValueError(f"{op}: argument 'attn' expected 'eager' or 'sdpa', got {attn!r}")
    if dtype not in ("float32", "float64"):
        raise ValueError(f"{op}: argument 'dtype' expected 'float32' or 'float64', got {dtype!r}")

    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:  # the folder holds float32; a float64 run widens the same values exactly
            model = build(family, SHAPES[family], seed=0)
            folder = os.path.join(tmp, "model")
            save_pretrained(model, folder)
            if dtype != model.cfg.dtype:
                model.astype(dtype)
            source = f"random {family} weights, {SHAPES[family]}"
        else:
            model = load_pretrained(folder, dtype=dtype)
            check_causal_lm(op, "folder", model)
            source = str(folder)
        cfg = model.cfg
        if prompt_len + new_tokens > cfg.block_size:
            raise ValueError(f"{op}: argument 'new_tokens' expected prompt_len + new_tokens <= block_size = "
                             f"{cfg.block_size}, got {prompt_len} + {new_tokens}")
        model.eval()
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len))
        n_params = model.num_parameters()
        log(f"model: {source} ({n_params / 1e6:.1f}M parameters, {dtype}); prompt {batch} x {prompt_len}, "
            f"{new_tokens} new tokens, median of {repeats}")
        result: Dict[str, object] = {"model": source, "parameters": n_params, "dtype": dtype, "batch": batch,
                                     "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
                                     "numpy_blas": blas_info()}
        steps = batch * (new_tokens - 1)  # tokens of the timed one-token steps (the first comes with the prompt)

        t_prefill = _median_time(lambda: model.forward(prompt), repeats)
        decode: List[float] = []
        ours = None
        for _ in range(repeats + 1):
            seconds, ours = npformer_decode(model, prompt, new_tokens)
            decode.append(seconds)
        t_decode = float(np.median(decode[1:]))  # the first is the warm-up
        result["npformer"] = _figures(batch * prompt_len, steps, t_prefill, t_decode)
        log(f"npformer:     prefill {result['npformer']['prefill_tokens_per_s']:,.0f} tok/s, decode "
            f"{_rate(result['npformer']['decode_tokens_per_s'])} ({result['numpy_blas']})")

        # torch lives in kernels/, imported by name here only, so the engine itself never imports torch
        has_torch = importlib.util.find_spec("torch") is not None
        for engine, keys in _KEYS.items():  # None for an engine that does not run
            result.update({engine: None, **{keys[k]: None for k in ("prefill", "decode", "same", "first")}})
        if not twin:
            log("torch twin:   skipped")
        elif not has_torch:
            log("torch twin:   not run (torch not installed)")
        elif family_of(model) not in ("gpt", "llama"):
            log(f"torch twin:   not run (no twin decodes a {type(model).__name__} with a cache)")
        else:
            cached = importlib.import_module("kernels.twins.decode")
            twin_model = cached.load_twin(family_of(model), cfg.to_dict(), model.state_dict())
            theirs = cached.time_inference(twin_model, prompt, new_tokens, repeats)
            del twin_model
            _compare(result, "twin", theirs, ours, t_prefill, t_decode, log)

        if not hf:
            log("transformers: skipped")
        elif not has_torch or importlib.util.find_spec("transformers") is None:
            log("transformers: not run (not installed; pip install 'npformer[hf]')")
        else:
            baseline = importlib.import_module("kernels.twins.hf_decode")
            try:  # transformers may not run this model in this dtype (float64 in a grouped MoE matmul)
                theirs = baseline.time_inference(folder, prompt, new_tokens, repeats, attn, dtype)
            except Exception as err:  # its failure is its own: report it, keep the other engines' figures
                reason = " ".join(str(err).split())[:200]
                log(f"transformers: not run ({type(err).__name__}: {reason})")
            else:
                _compare(result, "transformers", theirs, ours, t_prefill, t_decode, log)

        ran = [e for e in _KEYS if result[e] is not None]
        result["all_same_tokens"] = all(result[_KEYS[e]["same"]] for e in ran) if ran else None
        if ran:
            log(f"greedy tokens: {'the same in every engine' if result['all_same_tokens'] else 'they differ'} "
                f"(npformer, {', '.join(ran)}; {dtype})")
    return result


# the result's keys per engine: its own figures, its ratios (npformer / engine) and its token agreement
_KEYS = {"twin": {"prefill": "twin_prefill_ratio", "decode": "twin_decode_ratio", "same": "same_tokens_twin",
                  "first": "first_difference_twin", "name": "torch twin"},
         "transformers": {"prefill": "prefill_ratio", "decode": "decode_ratio", "same": "same_tokens",
                          "first": "first_difference", "name": "transformers"}}


def _figures(prompt_tokens: int, steps: int, prefill_s: float, decode_s: float) -> Dict[str, Optional[float]]:
    return {"prefill_tokens_per_s": prompt_tokens / prefill_s, "decode_tokens_per_s": steps / decode_s if steps else None}


def _compare(result: Dict[str, object], engine: str, theirs: Dict[str, object], ours: np.ndarray, t_prefill: float,
             t_decode: float, log) -> None:
    """Put a torch engine's figures, the ratios npformer / engine and their greedy tokens' agreement in ``result``.

    A disagreement is reported, never raised: at float32 two engines' sums round differently, and a near tie
    of the two largest logits may go either way, after which the continuations part."""
    keys = _KEYS[engine]
    tokens, t_prefill_e, t_decode_e = theirs.pop("tokens"), theirs.pop("prefill_s"), theirs.pop("decode_s")
    batch, prompt_len = result["batch"], result["prompt_len"]
    steps = batch * (result["new_tokens"] - 1)
    result[engine] = {**_figures(batch * prompt_len, steps, t_prefill_e, t_decode_e), **theirs}
    result[keys["prefill"]] = t_prefill_e / t_prefill
    result[keys["decode"]] = t_decode_e / t_decode if steps else None
    differ = np.nonzero((np.asarray(ours) != np.asarray(tokens)).any(axis=0))[0]
    result[keys["same"]] = differ.size == 0
    result[keys["first"]] = int(differ[0]) if differ.size else None  # the first new token (0-based) that differs
    name, figures = keys["name"], result[engine]
    extra = f"{theirs['attention']} attention, " if "attention" in theirs else ""
    log(f"{name + ':':<13} prefill {figures['prefill_tokens_per_s']:,.0f} tok/s, decode "
        f"{_rate(figures['decode_tokens_per_s'])} ({extra}{theirs['blas']}, {theirs['num_threads']} threads)")
    agree = "yes" if differ.size == 0 else f"no, from new token {int(differ[0]) + 1} of {result['new_tokens']} on"
    log(f"npformer / {name}: prefill {result[keys['prefill']]:.2f}x, decode {_ratio(result[keys['decode']])}; "
        f"same greedy tokens: {agree}")


def _rate(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.1f} tok/s"


def _ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"
