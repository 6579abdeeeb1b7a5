"""Low-rank adapters (LoRA) on the ``Linear`` layers of any npformer model.

Derivation: ``proofs/lora.md``. A ``LoRALinear`` holds the wrapped layer's own ``weight``
W (O, I) and ``bias`` b (O,) Parameters (the same objects, so the model's names and tied
references do not change) and two trainable factors, ``lora_A`` A (r, I) and ``lora_B``
B (O, r), with s = alpha / r:

    y = x W^T + b + s (drop(x) A^T) B^T                                   (LORA.1)

W and b are frozen: the backward adds to ``lora_A.grad`` and ``lora_B.grad`` only, and
``lora_parameters(model)`` is the list an optimizer is given. B starts at zero, so a new
adapter leaves the model's output unchanged; A is drawn from U(-1/sqrt(I), 1/sqrt(I)), the
bound of PyTorch's kaiming_uniform_(a=sqrt(5)) that PEFT uses.

``merge()`` writes W + s B A into the weight for inference; ``unmerge()`` puts back a copy of
W kept at merge time, bit for bit (float subtraction of s B A would not in general give W
back: W + d rounds, see proofs/lora.md).

``save_peft_adapter`` writes a folder the ``peft`` library loads: ``adapter_config.json`` and
``adapter_model.safetensors`` with tensors ``base_model.model.<HF name>.lora_A.weight``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..ops._checks import check_count, check_real
from ..ops.dropout import DropoutCache, dropout_backward, dropout_forward
from ..ops.linear import _rows
from .layers import Linear, check_dout, check_features
from .module import Module, Parameter, atomic

__all__ = ["LoRALinear", "apply_lora", "lora_parameters", "save_peft_adapter"]


class LoRACache(NamedTuple):
    x: np.ndarray  # (..., I)  input, for dx of the frozen path (LORA.4)
    h: np.ndarray  # (..., I)  drop(x), needed by (LORA.3)
    u: np.ndarray  # (..., r)  h A^T, needed by (LORA.2)
    drop: DropoutCache  # the adapter dropout's mask, for (LORA.4)
    out_shape: Tuple[int, ...]  # (..., O), so that dy can be checked against it


class LoRALinear(Module):
    """y = x W^T + b + (alpha/r) B A drop(x): a frozen ``Linear`` plus a trainable rank-r update."""

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float = 0.0, *, rng: np.random.Generator):
        super().__init__()
        op = "LoRALinear"
        if not isinstance(base, Linear):
            raise TypeError(f"{op}: argument 'base' expected an npformer.nn.layers.Linear, got {type(base).__name__}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"{op}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")
        check_count(op, "r", r, 1)
        self.alpha = check_real(op, "alpha", alpha, lo=0.0, lo_open=True)
        self.dropout = check_real(op, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
        self.r = int(r)
        self.scale = self.alpha / self.r  # s of (LORA.1)
        self.rng = rng
        d_out, d_in = base.weight.shape
        dtype = base.weight.data.dtype
        self.weight = base.weight  # frozen: the wrapped layer's own Parameters
        self.bias = base.bias
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / I)
        self.lora_A = Parameter(rng.uniform(-bound, bound, (self.r, d_in)).astype(dtype))
        self.lora_B = Parameter(np.zeros((d_out, self.r), dtype))
        self.merged = False
        self._unmerged: Optional[np.ndarray] = None  # W as it was before merge()

    @property
    def frozen(self) -> List[Parameter]:
        return [self.weight] + ([] if self.bias is None else [self.bias])

    @atomic
    def forward(self, x: np.ndarray) -> np.ndarray:
        """x (..., I) -> y (..., O)."""
        op = "LoRALinear.forward"
        W = self.weight.data
        check_features(op, "x", x, W.shape[1], W.dtype)
        if self.merged:
            if self.training:
                raise RuntimeError(f"{op}: the adapter is merged into the weight; call unmerge() before training")
            y = (_rows(x) @ W.T).reshape(x.shape[:-1] + (W.shape[0],))  # (LORA.5): W already holds W + s B A
            if self.bias is not None:
                y += self.bias.data
            self.record("out", y)
            return y
        h, drop = dropout_forward(x, self.dropout, self.rng, training=self.training)  # (..., I)
        u = (_rows(h) @ self.lora_A.data.T)  # (N, r)
        y = _rows(x) @ W.T  # (N, O)
        y += self.scale * (u @ self.lora_B.data.T)  # (LORA.1)
        if self.bias is not None:
            y += self.bias.data  # (LORA.1)
        y = y.reshape(x.shape[:-1] + (W.shape[0],))
        self.save_cache(LoRACache(x=x, h=h, u=u, drop=drop, out_shape=y.shape))
        self.record("out", y)
        return y

    @atomic
    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy (..., O) -> dx (..., I); adds to lora_A.grad and lora_B.grad only (W and b are frozen)."""
        W = self.weight.data
        check_dout(self, "LoRALinear.backward", "dy", dy, W.shape[0], W.dtype)
        cache = self.pop_cache()
        dy2 = _rows(dy)  # (N, O)
        du = self.scale * (dy2 @ self.lora_B.data)  # (N, r)  (LORA.3)
        dB = self.scale * (dy2.T @ cache.u)  # (O, r)  (LORA.2)
        dA = du.T @ _rows(cache.h)  # (r, I)  (LORA.3)
        dh = (du @ self.lora_A.data).reshape(cache.x.shape)  # (..., I)  (LORA.4)
        dx = (dy2 @ W).reshape(cache.x.shape) + dropout_backward(dh, cache.drop)  # (LORA.4)
        self.lora_A.grad += dA
        self.lora_B.grad += dB
        self.record("dA", dA)
        self.record("dB", dB)
        return dx

    def delta_weight(self) -> np.ndarray:
        """s B A (O, I), the update merge() adds to W (LORA.5)."""
        return (self.scale * (self.lora_B.data @ self.lora_A.data)).astype(self.weight.data.dtype)

    def merge(self) -> None:
        """W <- W + s B A in place (LORA.5), keeping a copy of W for unmerge(); for inference."""
        op = "LoRALinear.merge"
        if self.merged:
            raise RuntimeError(f"{op}: the adapter is already merged")
        if self.pending_backwards:
            raise RuntimeError(f"{op}: {self.pending_backwards} forwards wait for their backward; run them or "
                               "clear_caches() first")
        self._unmerged = self.weight.data.copy()
        self.weight.data[...] = self.weight.data + self.delta_weight()  # (LORA.5)
        self.merged = True

    def unmerge(self) -> None:
        """Put back the weight as it was before merge(), bit for bit (the kept copy)."""
        op = "LoRALinear.unmerge"
        if not self.merged:
            raise RuntimeError(f"{op}: the adapter is not merged")
        if self._unmerged.dtype != self.weight.data.dtype or self._unmerged.shape != self.weight.shape:
            raise RuntimeError(f"{op}: the weight changed dtype or shape since merge(); cannot restore it")
        self.weight.data[...] = self._unmerged
        self._unmerged = None
        self.merged = False

    def __repr__(self) -> str:
        d_out, d_in = self.weight.shape
        return f"LoRALinear(in={d_in}, out={d_out}, r={self.r}, alpha={self.alpha}, dropout={self.dropout})"


def _check_model(op: str, model: object) -> Module:
    if not isinstance(model, Module):
        raise TypeError(f"{op}: argument 'model' expected an npformer Module, got {type(model).__name__}")
    return model


def apply_lora(model: Module, target_modules: Sequence[str] = ("q_proj", "v_proj"), r: int = 8,
               alpha: float = 16.0, dropout: float = 0.0, *, rng: np.random.Generator) -> List[Parameter]:
    """Replace every ``Linear`` whose attribute name is in ``target_modules`` by a ``LoRALinear``.

    A layer reached under several paths (shared) is wrapped once. Returns the new adapters'
    parameters (A and B of each), in the model's order: the list to give an optimizer.
    """
    op = "apply_lora"
    _check_model(op, model)
    if isinstance(target_modules, str) or not isinstance(target_modules, (tuple, list)) or not target_modules \
            or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"{op}: argument 'target_modules' expected a non-empty tuple or list of names, "
                        f"got {target_modules!r:.80}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: argument 'rng' expected a numpy.random.Generator, got {type(rng).__name__}")
    check_count(op, "r", r, 1)
    check_real(op, "alpha", alpha, lo=0.0, lo_open=True)
    check_real(op, "dropout", dropout, lo=0.0, hi=1.0, hi_open=True)
    if any(m.pending_backwards for _, m in model.named_modules()):
        raise RuntimeError(f"{op}: forwards wait for their backward; run them or clear_caches() first")
    wrapped: Dict[int, LoRALinear] = {}
    for _, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if name in target_modules and type(child) is Linear:
                if id(child) not in wrapped:
                    wrapped[id(child)] = LoRALinear(child, r, alpha, dropout, rng=rng).train(child.training)
                setattr(parent, name, wrapped[id(child)])
    if not wrapped:
        raise ValueError(f"{op}: argument 'target_modules' {tuple(target_modules)} matched no Linear layer of "
                         f"{type(model).__name__}")
    return lora_parameters(model)


def lora_parameters(model: Module) -> List[Parameter]:
    """Every adapter's A and B, in the model's order (each once)."""
    _check_model("lora_parameters", model)
    return [p for name, p in model.named_parameters() if name.endswith((".lora_A", ".lora_B"))]


def _lora_layers(model: Module) -> List[Tuple[str, LoRALinear]]:
    seen, out = set(), []
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear) and id(m) not in seen:
            seen.add(id(m))
            out.append((path, m))
    return out


def save_peft_adapter(model: Module, folder, base_model_name_or_path: str = "") -> Path:
    """Write the adapters as PEFT does: ``adapter_config.json`` and ``adapter_model.safetensors``.

    Tensor names are ``base_model.model.<HF name of the layer>.lora_A.weight`` (and ``lora_B``),
    the HF names from the Llama family's map (LLaMA, Mistral, Qwen2). Returns the folder.
    """
    from ..hf.llama_map import llama_rows  # the hf package imports models; kept local to keep nn light
    from ..hf.safetensors import write_safetensors
    from ..models.llama import Llama

    op = "save_peft_adapter"
    _check_model(op, model)
    if not isinstance(model, Llama):
        raise ValueError(f"{op}: argument 'model' expected a Llama-family model (the HF names come from "
                         f"its map), got {type(model).__name__}")
    if not isinstance(folder, (str, Path)):
        raise TypeError(f"{op}: argument 'folder' expected a str or pathlib.Path, got {type(folder).__name__}")
    if not isinstance(base_model_name_or_path, str):
        raise TypeError(f"{op}: argument 'base_model_name_or_path' expected a str, "
                        f"got {type(base_model_name_or_path).__name__}")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(f"{op}: argument 'model' has no LoRA adapters (call apply_lora first)")
    if len({(m.r, m.alpha, m.dropout) for _, m in layers}) > 1:
        raise ValueError(f"{op}: argument 'model' has adapters of several r/alpha/dropout; PEFT's config holds one")
    hf_name = {npf[0]: hf for hf, npf, _ in llama_rows(model.cfg)}
    tensors = {}
    for path, m in layers:
        weight = f"{path}.weight"
        if weight not in hf_name:
            raise ValueError(f"{op}: argument 'model' has an adapter on {path!r}, which the HF map does not name")
        stem = "base_model.model." + hf_name[weight][: -len(".weight")]
        tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(m.lora_A.data)
        tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(m.lora_B.data)
    first = layers[0][1]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
              "target_modules": sorted({path.rsplit(".", 1)[-1] for path, _ in layers}), "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
              "init_lora_weights": True, "use_rslora": False, "use_dora": False}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
    return folder
