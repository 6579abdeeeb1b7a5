"""Parameter and Module: the bookkeeping every layer shares.

A layer's ``forward`` calls op pairs and pushes their cache onto the layer's own
stack (``self.save_cache(cache)``); its ``backward(dy)`` pops the cache of the
latest forward not yet matched (``cache = self.pop_cache()``), calls the matching
backward ops, *adds* parameter gradients into ``param.grad`` and returns the
gradient for its input.

One cache per call makes weight sharing exact: a layer applied three times before
one backward (ALBERT's shared block, T5's shared embedding, a looped model) keeps
three caches, and three backward calls, in reverse order (last in, first out),
consume them and add three gradients. A backward with no forward left to match
raises ``RuntimeError``. In eval mode (``model.eval()``) a forward keeps no cache,
so inference holds no memory for a backward that will never come; a forward in
training mode whose backward never runs keeps its cache until ``clear_caches()``.
Accumulating (``+=``) makes tied weights and gradient accumulation over
micro-batches come out right with no special case; ``zero_grad()`` starts a new step.

Backwards match forwards last in, first out, per module: ``L.forward(x1); L.forward(x2);
L.backward(dy)`` is the backward of the x2 call. A forward run only to look at a loss
belongs in eval mode (``model.eval()``), where it keeps no cache and cannot be matched.

A module of your own gets the same guarantees as the built-in layers by decorating its
``forward`` and ``backward`` with ``@atomic``: a call that raises (a bad argument, a bug,
Ctrl-C) puts back every cache stack, ``.grad``, KV cache length and recording below it.

Recording: ``model.start_recording()`` names every module by its path
(``blocks.3.attn``) and lets layers call ``self.record("probs", p)``; the values land
in ``model.recorder`` as ``"blocks.3.attn.probs"`` in execution order.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import OrderedDict
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from ..ops._checks import check_dtype_option

# A module that keeps this many unmatched forward caches is most likely doing inference in training mode.
PENDING_WARNING = 1024


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
    """Named forward intermediates and backward gradients, in the order they were produced.

    A name recorded again (a shared module's second call, ``blocks.0.attn.probs``)
    is kept under ``<name>@2``, ``<name>@3``, … so that no call's value is lost.
    """

    def __init__(self, copy: bool = True):
        super().__init__()
        self.copy = copy
        self._calls: Dict[str, int] = {}

    def put(self, name: str, value: np.ndarray) -> None:
        n = self._calls[name] = self._calls.get(name, 0) + 1
        self[name if n == 1 else f"{name}@{n}"] = np.array(value, copy=True) if self.copy else value


class _Snapshot:
    """What a layer call may change, taken before the outermost call so a failure can put it back.

    The cache stack of every module below the layer; in a backward, every parameter's
    ``.grad``; the ``length`` of every KV cache passed in (``kv_cache=``, ``kv_caches=[...]``);
    the entries of the recorder. Nested calls inside it take none (the outermost restores all).
    """

    def __init__(self, module: "Module", args, kwargs, grads: bool):
        modules = [m for _, m in module.named_modules()]
        self.stacks = [(m._caches, list(m._caches)) for m in modules]
        self.grads = [(p, p.grad.copy()) for p in module.parameters()] if grads else []
        passed = list(args) + list(kwargs.values())
        passed += [c for a in passed if isinstance(a, (list, tuple)) for c in a]
        self.kv = [(c, c.length) for c in passed if hasattr(c, "length") and hasattr(c, "stage")]
        rec = module._recorder
        self.recorder = None if rec is None else (rec, len(rec), dict(rec._calls))

    def restore(self) -> None:
        for stack, before in self.stacks:
            stack[:] = before
        for p, grad in self.grads:
            p.grad[...] = grad
        for cache, length in self.kv:
            cache.length = length
        if self.recorder is not None:
            rec, n, calls = self.recorder
            while len(rec) > n:
                rec.popitem(last=True)
            rec._calls = calls


_calls = threading.local()  # per thread: how many layer calls are in progress (only the outermost snapshots)


def atomic(method):
    """Make a layer's ``forward``/``backward`` all or nothing, and name the layer in its errors.

    If the call raises (a bad argument, a bug, Ctrl-C), everything it changed is put back
    (``_Snapshot``): a failed forward leaves no cache, no recording and no KV cache
    positions behind; a failed backward consumes no cache and adds to no ``.grad``. A
    ``ValueError``/``TypeError`` raised inside is re-raised with the layer's own name in
    front: ``Embedding.forward: embedding_forward: argument 'ids' ...``.
    """
    where = method.__qualname__
    is_backward = method.__name__ == "backward"

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        depth = getattr(_calls, "depth", 0)
        snapshot = _Snapshot(self, args, kwargs, grads=is_backward) if depth == 0 else None
        _calls.depth = depth + 1
        try:
            return method(self, *args, **kwargs)
        except BaseException as err:
            if snapshot is not None:
                snapshot.restore()
            if type(err) in (ValueError, TypeError) and not str(err).startswith(where):
                raise type(err)(f"{where}: {err}") from err
            raise
        finally:
            _calls.depth = depth

    return call


class Module:
    """Base class: attribute assignment registers parameters and sub-modules by name."""

    def __init__(self) -> None:
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_path", "")
        object.__setattr__(self, "_recorder", None)
        object.__setattr__(self, "_caches", [])

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._params[name] = value
        elif isinstance(value, Module):
            if any(m is self for _, m in value.named_modules()):
                raise ValueError(f"{type(self).__name__}: attribute '{name}' expected a module that does not "
                                 "contain this one (a module cannot hold itself)")
            self._params.pop(name, None)
            self._modules[name] = value
        elif name in self._params or name in self._modules:
            if value is not None:
                kind = "Parameter" if name in self._params else "Module"
                raise TypeError(f"{type(self).__name__}: attribute '{name}' expected a {kind} or None, "
                                f"got {type(value).__name__} (to change values, assign to .data)")
            self._params.pop(name, None)
            self._modules.pop(name, None)
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
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"{type(self).__name__}.train: argument 'mode' expected a bool, got {mode!r}")
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def astype(self, dtype) -> "Module":
        """Convert every parameter (and its gradient) to float32 or float64 in place; returns self.

        Pending forward caches hold the old dtype, so they are dropped (``clear_caches``).
        """
        dtype = check_dtype_option(f"{type(self).__name__}.astype", "dtype", dtype)
        self.clear_caches()
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = np.zeros_like(p.data)
        return self

    # -- per-call caches --------------------------------------------------------------------
    def save_cache(self, cache) -> None:
        """Keep one forward call's cache for its backward (training mode only)."""
        if self.training:
            self._caches.append(cache)
            if len(self._caches) == PENDING_WARNING:
                warnings.warn(f"{type(self).__name__}: {PENDING_WARNING} forwards wait for their backward; "
                              "use .eval() for inference, or clear_caches(), to free their memory",
                              RuntimeWarning, stacklevel=3)

    def pop_cache(self):
        """The cache of the latest forward not yet consumed by a backward (last in, first out)."""
        if not self._caches:
            why = ("a forward in eval mode keeps no cache; call .train() before the forward"
                   if not self.training else "every forward so far has been matched by a backward")
            raise RuntimeError(f"{type(self).__name__}.backward: no forward left to match ({why})")
        return self._caches.pop()

    def peek_cache(self):
        """The cache the next ``pop_cache`` returns, left in place (a backward checks dy against it first)."""
        if not self._caches:
            return self.pop_cache()  # raises the same error a pop would
        return self._caches[-1]

    @property
    def pending_backwards(self) -> int:
        """How many forwards of this module still wait for their backward."""
        return len(self._caches)

    def clear_caches(self) -> None:
        """Drop every kept forward cache in this module and its children (frees their memory)."""
        for _, m in self.named_modules():
            m._caches.clear()

    # -- state dict ---------------------------------------------------------------------
    def state_dict(self) -> Dict[str, np.ndarray]:
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True, *, cast: bool = False) -> None:
        """Copy ``state`` into the parameters: all of it, or nothing.

        Every key, shape and dtype is checked before the first parameter is written, so
        a bad entry leaves the model as it was. ``strict``: the keys must be exactly the
        parameters' names. A value must have its parameter's dtype; ``cast=True`` accepts
        another floating dtype (float16, float64 into float32, ...) and converts it.
        Integer, bool and other non-float arrays are never weights.
        """
        op = "load_state_dict"
        for flag, value in (("strict", strict), ("cast", cast)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{op}: argument '{flag}' expected a bool, got {value!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"{op}: argument 'state' expected a mapping of name -> numpy.ndarray, "
                            f"got {type(state).__name__}")
        params = dict(self.named_parameters())
        if strict:
            missing = sorted(set(params) - set(state))
            unexpected = sorted(set(state) - set(params), key=repr)
            if missing or unexpected:
                raise ValueError(f"{op}: argument 'state' has missing keys {missing}, unexpected keys {unexpected}")
        updates = []
        for name, value in state.items():
            if name not in params:
                continue
            p = params[name]
            where = f"{op}: argument 'state' entry {name!r}"
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{where} expected a numpy.ndarray, got {type(value).__name__}")
            if value.shape != p.data.shape:
                raise ValueError(f"{where} expected shape {p.data.shape}, got {value.shape}")
            if value.dtype != p.data.dtype:
                if not (cast and value.dtype.kind == "f"):
                    hint = " (pass cast=True to convert)" if value.dtype.kind == "f" else ""
                    raise ValueError(f"{where} expected dtype {p.data.dtype}{hint}, got {value.dtype}")
                with np.errstate(over="ignore"):
                    value = value.astype(p.data.dtype)
                if not np.isfinite(value).all() and np.isfinite(state[name]).all():
                    raise ValueError(f"{where} expected values that fit {p.data.dtype}, got some that overflow it")
            updates.append((p, np.array(value, dtype=p.data.dtype, copy=True)))  # a copy: states may alias params
        pending = sum(m.pending_backwards for _, m in self.named_modules())
        if pending:
            raise RuntimeError(f"{op}: forwards wait for their backward ({pending} caches), computed with the "
                               "current weights; run the backwards or clear_caches() before loading new weights")
        for p, value in updates:  # every entry checked: now write
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
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList.append: argument 'module' expected a Module, got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())
