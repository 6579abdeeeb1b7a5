"""Hugging Face transformers on torch's CPU build: the baseline of ``npformer bench --inference``.

Loads a local folder with ``AutoModelForCausalLM`` and times, as npformer's side does,
one forward over the prompt (prefill) and greedy one-token steps on the KV cache
(``past_key_values``), in float32 or float64. Imported by name from
``npformer.bench_inference`` only when transformers is installed, so the engine itself
never imports torch.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional

import numpy as np
import torch


def thread_count(value: Optional[str]) -> Optional[int]:
    """Threads for torch from an OMP_NUM_THREADS value: unset, every core; otherwise its first
    positive integer ("4", " 4 ", "2,1" -> 2, OpenMP's list form); anything else ("", "x", "0")
    None, which leaves torch's own default."""
    if value is None:
        return os.cpu_count() or 1
    first = value.split(",", 1)[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def set_threads() -> None:
    """torch's thread count from OMP_NUM_THREADS (``thread_count``); a value it cannot read changes nothing."""
    n = thread_count(os.environ.get("OMP_NUM_THREADS"))
    if n is not None:
        torch.set_num_threads(n)


def torch_blas() -> Dict[str, object]:
    """torch's BLAS (from its build configuration) and its thread count."""
    entries = [e.strip() for line in torch.__config__.show().splitlines() for e in line.split(",")]
    blas = next((e.split("BLAS_INFO=", 1)[1] for e in entries if "BLAS_INFO=" in e), "unknown")
    return {"blas": blas, "mkl": torch.backends.mkl.is_available(), "num_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _decode(model, prompt: torch.Tensor, new_tokens: int):
    """Greedy cached decoding: (seconds of the new_tokens - 1 one-token steps, the tokens (B, new_tokens))."""
    out = model(prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]
    tokens = [nxt]
    t = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)[:, None]
        tokens.append(nxt)
    return time.perf_counter() - t, torch.cat(tokens, dim=1).numpy()


def time_inference(folder: str, prompt: np.ndarray, new_tokens: int, repeats: int, attn: str = "eager",
                   dtype: str = "float32") -> Dict:
    """Median prefill and decode seconds (after one untimed run each), the greedy tokens, and the BLAS;
    the folder's weights loaded in ``dtype``, 'float32' or 'float64' (widened exactly from float32)."""
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # no deprecation notes about the cache's keyword between the timings
    warnings.filterwarnings("ignore", message=".*past_key_values.* is deprecated", category=FutureWarning)
    set_threads()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation=attn)
    model.eval()
    ids = torch.from_numpy(prompt)
    with torch.inference_mode():
        prefill = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            model(ids, use_cache=False)
            prefill.append(time.perf_counter() - t)
        decode, tokens = [], None
        for _ in range(repeats + 1):
            seconds, tokens = _decode(model, ids, new_tokens)
            decode.append(seconds)
    import transformers

    return {"prefill_s": float(np.median(prefill[1:])), "decode_s": float(np.median(decode[1:])), "tokens": tokens,
            "attention": attn, "transformers": transformers.__version__, **torch_blas()}
