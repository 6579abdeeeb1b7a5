"""Parameter and Module: the bookkeeping every layer shares.

A layer's ``forward`` calls op pairs and keeps their caches on itself; its
``backward(dy)`` calls the matching backward ops, *adds* parameter gradients into
``param.grad`` and returns the gradient for its input. Accumulating (``+=``) makes
tied weights and gradient accumulation over micro-batches come out right with no
special case; ``zero_grad()`` starts a new step.

Recording: ``model.start_recording()`` names every module by its path
(``blocks.3.attn``) and lets layers call ``self.record("probs", p)``; the values land
in ``model.recorder`` as ``"blocks.3.attn.probs"`` in execution order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np


class Parameter:
    """A trainable array and the gradient accumulated into it."""

    __slots__ = ("data", "grad")

    def __init__(self, data: np.ndarray):
        if not isinstance(data, np.ndarray) or data.dtype not in (np.float32, np.float64):
            raise ValueError(f"Parameter: argument 'data' expected a float32/float64 numpy.ndarray, got {type(data).__name__}"
                             f"{'' if not isinstance(data, np.ndarray) else ' of ' + str(data.dtype)}")
        self.data = data
        self.grad = np.zeros_like(data)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.data.shape

    def __repr__(self) -> str:
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype})"


class Recorder(OrderedDict):
    """Named forward intermediates and backward gradients, in the order they were produced."""

    def __init__(self, copy: bool = True):
        super().__init__()
        self.copy = copy

    def put(self, name: str, value: np.ndarray) -> None:
        self[name] = np.array(value, copy=True) if self.copy else value


class Module:
    """Base class: attribute assignment registers parameters and sub-modules by name."""

    def __init__(self) -> None:
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_path", "")
        object.__setattr__(self, "_recorder", None)

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    # -- traversal --------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[Tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, Parameter]]:
        """Every parameter once, under the first name it is reached by (tied weights appear once)."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, p in module._params.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{path}.{name}" if path else name), p

    def parameters(self) -> List[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters())

    # -- training state -----------------------------------------------------------------
    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad.fill(0)

    def train(self, mode: bool = True) -> "Module":
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def astype(self, dtype) -> "Module":
        """Convert every parameter (and its gradient) to ``dtype`` in place; returns self."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = np.zeros_like(p.data)
        return self

    # -- state dict ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state: Dict[str, np.ndarray], strict: bool = True) -> None:
        params = dict(self.named_parameters())
        if strict:
            missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            if missing or unexpected:
                raise ValueError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, value in state.items():
            if name not in params:
                continue
            p = params[name]
            if value.shape != p.data.shape:
                raise ValueError(f"load_state_dict: '{name}' expected shape {p.data.shape}, got {value.shape}")
            p.data[...] = value

    # -- recording ------------------------------------------------------------------------
    def start_recording(self, copy: bool = True) -> Recorder:
        """Name every module by its path and route ``record`` calls into one ``Recorder``."""
        recorder = Recorder(copy)
        for path, m in reversed(list(self.named_modules())):  # a shared module keeps its first path
            object.__setattr__(m, "_path", path)
            object.__setattr__(m, "_recorder", recorder)
        return recorder

    def stop_recording(self) -> None:
        for _, m in self.named_modules():
            object.__setattr__(m, "_recorder", None)

    @property
    def recorder(self) -> Optional[Recorder]:
        return self._recorder

    def record(self, name: str, value: np.ndarray) -> None:
        if self._recorder is not None:
            self._recorder.put(f"{self._path}.{name}" if self._path else name, value)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={tuple(p.shape)}" for k, p in self._params.items())
        kids = "".join(f"\n  ({k}): " + repr(m).replace("\n", "\n  ") for k, m in self._modules.items())
        return f"{type(self).__name__}({inner}){kids}"


class ModuleList(Module):
    """An indexable list of modules named ``0``, ``1``, … (``blocks.3.attn``)."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())
