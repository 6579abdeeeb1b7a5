"""Split a model's parameters into a weight-decayed group and an exempt group.

Weight decay pulls weights towards zero. That is wanted for the matrices of
linear maps, and not for parameters whose size *is* their meaning: the gains and
biases of norms, the biases of linear layers, and the rows of embedding tables
(a rare token's row would otherwise shrink every step it is not seen).

Each parameter falls in exactly one kind (``classify``), checked in this order:

- ``"embedding"``: the module holding it has ``Embedding`` in its class name
  (``Embedding``, ``PositionalEmbedding`` …), or its dotted name contains ``embed``
  (``embed_tokens.weight``, ``pos_embedding``);
- ``"norm"``: the module holding it has ``Norm`` in its class name (``LayerNorm``, ``RMSNorm``);
- ``"bias"``: its attribute name is ``bias`` or ends in ``_bias``;
- ``"matrix"``: any other parameter with ``ndim >= 2``;
- ``"vector"``: any other parameter with ``ndim < 2`` (scales, gates, scalars).

``param_groups(model, wd)`` decays every kind not in ``no_decay`` (default: all
but ``"matrix"``). To decay embeddings too, as GPT-2 and nanoGPT do (their
"ndim >= 2" rule), pass ``no_decay=("norm", "bias", "vector")``.

A tied weight (one Parameter reached by two names) is classified by the first name
``Module.named_parameters`` yields, which is where it appears first in the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Dict, List, Sequence

from ..nn.module import Module
from ..ops._checks import check_real

KINDS = ("embedding", "norm", "bias", "matrix", "vector")
NO_DECAY = ("embedding", "norm", "bias", "vector")


def classify(model: Module) -> Dict[str, str]:
    """``{dotted parameter name: kind}`` for every parameter of ``model``, in ``named_parameters`` order."""
    _check_model("classify", model)
    kinds: Dict[str, str] = {}
    seen = set()
    for path, module in model.named_modules():
        owner = type(module).__name__
        for attr, p in module._params.items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{path}.{attr}" if path else attr
            if "Embedding" in owner or "embed" in name.lower():
                kinds[name] = "embedding"
            elif "Norm" in owner:
                kinds[name] = "norm"
            elif attr == "bias" or attr.endswith("_bias"):
                kinds[name] = "bias"
            else:
                kinds[name] = "matrix" if p.data.ndim >= 2 else "vector"
    return kinds


def param_groups(model: Module, weight_decay: float, no_decay: Sequence[str] = NO_DECAY) -> List[Dict[str, Any]]:
    """Two optimizer groups: ``[decayed, exempt]``.

    ``decayed`` holds every parameter whose kind (see ``classify``) is not in
    ``no_decay`` and gets ``weight_decay``; ``exempt`` holds the rest with weight decay
    0. Each group also lists its parameter names under ``"names"`` (for reading, and
    kept in the optimizer's state dict). Either group may be empty.
    """
    _check_model("param_groups", model)
    weight_decay = check_real("param_groups", "weight_decay", weight_decay, lo=0.0)
    if isinstance(no_decay, (str, bytes, dict)) or not isinstance(no_decay, Iterable):
        raise TypeError(f"param_groups: argument 'no_decay' expected a sequence of kinds from {KINDS}, "
                        f"got {type(no_decay).__name__}")
    no_decay = list(no_decay)
    if not all(isinstance(k, str) for k in no_decay):
        raise TypeError(f"param_groups: argument 'no_decay' expected kinds as str, got {no_decay!r:.80}")
    unknown = sorted(set(no_decay) - set(KINDS))
    if unknown:
        raise ValueError(f"param_groups: argument 'no_decay' expected kinds from {KINDS}, got {unknown}")
    kinds = classify(model)
    params = dict(model.named_parameters())
    decay = [n for n, kind in kinds.items() if kind not in no_decay]
    exempt = [n for n, kind in kinds.items() if kind in no_decay]
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
        {"params": [params[n] for n in exempt], "weight_decay": 0.0, "names": exempt},
    ]


def _check_model(op: str, model: object) -> None:
    if not isinstance(model, Module):
        raise TypeError(f"{op}: argument 'model' expected an npformer Module, got {type(model).__name__}")
