"""SGD, Adam and AdamW over ``Parameter``s, with torch.optim's update rules.

An optimizer takes either a list of Parameters or a list of *group* dicts::

    AdamW(model.parameters(), lr=3e-4)
    AdamW([{"params": matrices, "weight_decay": 0.1},
           {"params": vectors, "weight_decay": 0.0}], lr=3e-4)

Each group is a dict holding ``"params"`` and every hyperparameter (missing ones
are filled from the constructor's defaults), so a trainer changes the learning
rate with ``for g in opt.param_groups: g["lr"] = schedule(step)``. A group may also
hold ``"names"`` (the parameters' names, as ``param_groups`` writes them); any other
key is refused by name, so a misspelt option (``"lrr"``) cannot be silently ignored.

Per-parameter state (moments, step counts) lives in ``opt.state[param]``: arrays of
the parameter's shape and dtype (a 0-d parameter has 0-d moments) and ints.
``state_dict()`` numbers the parameters 0, 1, … in group order (as torch does), names
the optimizer's class under ``"type"``, and holds only arrays, ints, floats, strings
and lists of them, so ``npformer.checkpoint`` can store it without pickle.

Every parameter is updated on every ``step()``: a Parameter always has a ``.grad``
array, and a zero gradient is a gradient (torch instead skips ``grad is None``).
Updates are computed in the parameter's own dtype (float32 stays float32) and written
into the parameter's own array (``p.data`` stays the same object).

``step()`` is all or nothing. It first checks everything: options (a trainer writes
``group["lr"]`` directly), that every gradient is an array of its parameter's shape
and dtype, that every state entry fits its parameter, that every parameter's array is
writeable. It then computes every new value into new arrays (about one extra copy of
the parameters and of the optimizer state, held for the length of the step), and only
then writes them all. So an error at any point, a ``FloatingPointError`` under
``np.seterr(all="raise")`` or a ``MemoryError`` included, leaves every parameter and
the whole state as they were.

Options are checked where they enter (the constructor, ``add_param_group``,
``load_state_dict``) and again by ``step()``: ``lr`` and ``weight_decay`` finite and
>= 0, ``eps`` finite and > 0, each of ``betas`` and ``momentum`` in [0, 1),
``dampening`` in [0, 1], ``nesterov`` a bool. A failure raises ``ValueError`` (or
``TypeError`` for a wrong type) naming the optimizer, the argument and the group;
nothing is updated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..nn.module import Parameter
from ..ops._checks import check_bool, check_real
from ..ops.fastpath import parallel_items

# The closed-open or closed intervals of each option: (lo, hi, lo_open, hi_open); None is unbounded.
_BOUNDS = {
    "lr": (0.0, None, False, False),
    "weight_decay": (0.0, None, False, False),
    "eps": (0.0, None, True, False),
    "momentum": (0.0, 1.0, False, True),
    "dampening": (0.0, 1.0, False, False),
}
# Keys a group may hold besides its options.
_GROUP_KEYS = ("params", "names")
# The keys of a state dict.
_STATE_DICT_KEYS = ("state", "param_groups", "type")
# A parameter index written as text: decimal digits, no sign, no leading zero ("01" and "²" are refused).
_INDEX = re.compile(r"0|[1-9][0-9]*")


class Optimizer:
    """Parameter groups, state, zero_grad and state dicts; subclasses write ``_update``.

    A subclass names its options in ``_OPTIONS`` (its constructor's keyword arguments)
    and its per-parameter state in ``_STATE``; an ``Optimizer`` made directly takes the
    keys of ``defaults`` as its options.
    """

    _OPTIONS: Optional[Tuple[str, ...]] = None
    _STATE: Optional[Dict[str, str]] = None
    _STATE_REQUIRED = False

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        name = type(self).__name__
        if not isinstance(defaults, dict):
            raise TypeError(f"{name}: argument 'defaults' expected a dict, got {type(defaults).__name__}")
        for key in defaults:
            if not isinstance(key, str) or key in _GROUP_KEYS or (self._OPTIONS is not None
                                                                   and key not in self._OPTIONS):
                expected = f"options from {list(self._OPTIONS)}" if self._OPTIONS is not None else "option names"
                raise ValueError(f"{name}: argument 'defaults' expected {expected}, got the key {key!r}")
        self._option_names: Tuple[str, ...] = tuple(self._OPTIONS if self._OPTIONS is not None else defaults)
        self.defaults = self._checked_options(name, dict(defaults))
        self.param_groups: List[Dict[str, Any]] = []
        self.state: Dict[Parameter, Dict[str, Any]] = {}
        if isinstance(params, (Parameter, dict, str, bytes, np.ndarray)) or not isinstance(params, Iterable):
            hint = " (wrap it in a list)" if isinstance(params, (Parameter, dict)) else ""
            raise TypeError(f"{name}: argument 'params' expected a list of Parameters or of group dicts, "
                            f"got {type(params).__name__}{hint}")
        params = list(params)
        if not params:
            raise ValueError(f"{name}: argument 'params' expected a non-empty list of Parameters or groups, got []")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self._add_group(name, "params", group)

    # -- groups -----------------------------------------------------------------------------
    def add_param_group(self, group: Dict[str, Any]) -> None:
        """Append a group dict (``"params"`` and any options; missing options come from the defaults)."""
        self._add_group(f"{type(self).__name__}.add_param_group", "group", group)

    def _add_group(self, op: str, arg: str, group: object) -> None:
        k = len(self.param_groups)
        where = f"{op}: argument '{arg}', group {k},"
        if not isinstance(group, dict):
            raise TypeError(f"{where} expected a dict with a 'params' key (or Parameters only), "
                            f"got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{where} expected a 'params' key, got the keys {sorted(map(str, group))}")
        group = dict(group)
        params = group["params"]
        if isinstance(params, Parameter):
            params = [params]
        if isinstance(params, (dict, str, bytes, np.ndarray)) or not isinstance(params, Iterable):
            raise TypeError(f"{where} expected a list of Parameters under 'params', got {type(params).__name__}")
        group["params"] = list(params)
        for i, p in enumerate(group["params"]):
            if not isinstance(p, Parameter):
                raise TypeError(f"{where} expected Parameter entries, got {type(p).__name__} at position {i}")
        ids = [id(p) for p in group["params"]]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len(set(ids)) != len(ids) or seen.intersection(ids):
            raise ValueError(f"{where} expected each Parameter in one group once, got a Parameter twice")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self.param_groups.append(self._checked_options(f"{op} (group {k})", group))

    def _checked_options(self, op: str, options: Dict[str, Any]) -> Dict[str, Any]:
        """``options`` with every key known and every option checked (messages start with ``op``);
        betas become a tuple."""
        for key in options:
            if key not in _GROUP_KEYS and key not in self._option_names:
                raise ValueError(f"{op}: argument {str(key)!r:.60} is not an option of {type(self).__name__}: "
                                 f"expected one of {list(_GROUP_KEYS + self._option_names)}, got {key!r:.60}")
        for key, (lo, hi, lo_open, hi_open) in _BOUNDS.items():
            if key in options:
                check_real(op, key, options[key], lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
        if "nesterov" in options:
            check_bool(op, "nesterov", options["nesterov"])
        if "betas" in options:
            betas = options["betas"]
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                raise ValueError(f"{op}: argument 'betas' expected a pair (beta1, beta2), got {betas!r:.60}")
            for beta in betas:
                check_real(op, "betas", beta, lo=0.0, hi=1.0, hi_open=True)
            options = dict(options, betas=tuple(betas))
        if options.get("nesterov") and (options.get("momentum", 0) <= 0 or options.get("dampening", 0) != 0):
            raise ValueError(f"{op}: argument 'nesterov' expected momentum > 0 and dampening = 0, "
                             f"got momentum={options.get('momentum', 0)}, dampening={options.get('dampening', 0)}")
        return options

    def parameters(self) -> List[Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- training ---------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Set the gradient of every parameter this optimizer updates to zero (in place).

        A gradient that is not an array of its parameter's shape and dtype (replaced by
        hand) is replaced by a fresh zero array.
        """
        for p in self.parameters():
            g = p.grad
            if isinstance(g, np.ndarray) and g.shape == p.data.shape and g.dtype == p.data.dtype:
                g.fill(0)
            else:
                p.grad = np.zeros_like(p.data)

    def step(self) -> None:
        """One update of every parameter from its ``.grad``: check everything, compute everything, then write."""
        self._check_step()
        work = [(p, group) for group in self.param_groups for p in group["params"]]
        # (parameter, its new values, its new state): nothing is written until all are computed. Parameters
        # are independent: they are shared among threads, largest first (npformer.ops.fastpath).
        updates: List[Optional[tuple]] = [None] * len(work)

        def update(i: int) -> None:
            p, group = work[i]
            updates[i] = (p, *self._update(p.data, p.grad, self.state.get(p, {}), group))

        parallel_items(update, [p.data.size for p, _ in work])
        for p, new_data, new_state in updates:  # same shapes and dtypes, writeable: these cannot fail
            np.copyto(p.data, new_data)
            self.state[p] = new_state

    def _check_step(self) -> None:
        name = type(self).__name__
        for k, group in enumerate(self.param_groups):
            self._checked_options(f"{name}.step (group {k})", group)
            for i, p in enumerate(group["params"]):
                where = f"{name}.step: argument 'params': group {k}, parameter {i}"
                g = p.grad
                if not isinstance(g, np.ndarray) or g.shape != p.data.shape or g.dtype != p.data.dtype:
                    got = (f"{g.dtype} of shape {g.shape}" if isinstance(g, np.ndarray) else type(g).__name__)
                    raise ValueError(f"{where} has a gradient of {got}; expected {p.data.dtype} of shape "
                                     f"{p.data.shape}")
                if not p.data.flags.writeable:
                    raise ValueError(f"{where} expected a writeable array, got a read-only one")
                self._check_live_state(where, p, self.state.get(p, {}))

    def _check_live_state(self, where: str, p: Parameter, state: object) -> None:
        """The state ``step`` is about to read: the entries of ``_STATE``, arrays of ``p``'s shape and dtype."""
        if not isinstance(state, dict):
            raise ValueError(f"{where} has a state of type {type(state).__name__}; expected a dict")
        spec = self._STATE
        if spec is not None and state:
            missing = sorted(set(spec) - set(state)) if self._STATE_REQUIRED else []
            unknown = sorted(map(str, set(state) - set(spec)))
            if missing or unknown:
                raise ValueError(f"{where} has the state entries {sorted(map(str, state))}; expected {sorted(spec)}")
        for key, value in state.items():
            kind = None if spec is None else spec[key]
            if isinstance(value, np.ndarray) and kind != "int":
                if value.shape != p.data.shape or value.dtype != p.data.dtype:
                    raise ValueError(f"{where} has shape {p.data.shape} and dtype {p.data.dtype}, but its state "
                                     f"'{key}' has shape {value.shape} and dtype {value.dtype}")
            elif kind == "array":
                raise ValueError(f"{where} has a state '{key}' of type {type(value).__name__}; expected an array")
            elif kind == "int" and (type(value) is not int or value < 0):
                raise ValueError(f"{where} has a state '{key}' = {value!r:.40}; expected an integer >= 0")

    def _update(self, data: np.ndarray, grad: np.ndarray, state: Dict[str, Any],
                group: Dict[str, Any]) -> Tuple[np.ndarray, Dict[str, Any]]:
        """``(new values of the parameter, its new state)``, in new arrays; ``data``, ``grad`` and ``state``
        are only read."""
        raise NotImplementedError

    # -- state dicts ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """``{"state": {"0": {...}, ...}, "param_groups": [{..., "params": [0, 1]}, ...], "type": "AdamW"}``.

        Arrays are copies, so a later ``step()`` does not change a dict already taken.
        """
        index = {id(p): i for i, p in enumerate(self.parameters())}
        state = {str(index[id(p)]): {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                 for p, s in self.state.items() if s and id(p) in index}
        groups = []
        for g in self.param_groups:
            saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            saved["params"] = [index[id(p)] for p in g["params"]]
            groups.append(saved)
        return {"state": state, "param_groups": groups, "type": type(self).__name__}

    def load_state_dict(self, state_dict: Dict[str, Any], *, cast: bool = False) -> None:
        """Restore state and hyperparameters saved by ``state_dict`` into the same layout of parameters.

        Accepts the dict as ``state_dict`` returns it or as ``npformer.checkpoint.load``
        gives it back (string keys, lists for tuples, no ``"state"`` entry if it was empty).
        Everything is checked before anything changes: the optimizer's type (when the dict
        names one), the number of groups and of parameters in each, the options (each
        group must hold exactly this optimizer's options, so another optimizer's state is
        refused), the state keys (parameter indices written ``"0"``, ``"1"``, …, each once)
        and each state entry's names, shapes and dtypes. A state array must have its
        parameter's dtype unless ``cast=True`` (then any float dtype is converted, if its
        values fit); a non-float array is always refused.
        """
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{name}: argument 'state_dict' expected a dict, got {type(state_dict).__name__}")
        cast = check_bool(name, "cast", cast)
        unknown = [k for k in state_dict if k not in _STATE_DICT_KEYS]
        if unknown:
            raise ValueError(f"{name}: argument 'state_dict' expected the keys {list(_STATE_DICT_KEYS)}, "
                             f"got {unknown[0]!r:.60}")
        kind = state_dict.get("type", type(self).__name__)
        if kind != type(self).__name__:
            raise ValueError(f"{name}: argument 'state_dict' expected a state dict of {type(self).__name__}, "
                             f"got one of {kind!r:.60}")
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list):
            raise ValueError(f"{name}: argument 'state_dict' expected a list under 'param_groups', "
                             f"got {type(saved_groups).__name__}")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}: argument 'state_dict' expected {len(self.param_groups)} parameter groups, "
                             f"got {len(saved_groups)}")
        new_options, by_index = [], {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            indices = saved.get("params") if isinstance(saved, dict) else None
            if not isinstance(indices, list) or not all(type(j) is int for j in indices):
                raise ValueError(f"{name}: argument 'state_dict': group {i} expected a dict with a list of "
                                 f"integer 'params'")
            if len(indices) != len(group["params"]):
                raise ValueError(f"{name}: argument 'state_dict': group {i} expected {len(group['params'])} "
                                 f"parameters, got {len(indices)}")
            for j, p in zip(indices, group["params"]):
                if j in by_index:
                    raise ValueError(f"{name}: argument 'state_dict': parameter index {j} appears twice")
                by_index[j] = p
            options = {k: v for k, v in saved.items() if k != "params"}
            missing = [k for k in self._option_names if k not in options]
            if missing:
                raise ValueError(f"{name}: argument 'state_dict': group {i} expected the options "
                                 f"{list(self._option_names)}, got {sorted(map(str, options))} (no {missing[0]!r})")
            try:
                new_options.append(self._checked_options(f"{name} (group {i})", options))
            except ValueError as e:
                raise ValueError(f"{name}: argument 'state_dict' holds a bad option in group {i}: {e}") from None
        saved_state = state_dict.get("state", {})
        if not isinstance(saved_state, dict):
            raise ValueError(f"{name}: argument 'state_dict' expected a dict under 'state', "
                             f"got {type(saved_state).__name__}")
        new_state: Dict[Parameter, Dict[str, Any]] = {}
        for key, entry in saved_state.items():
            j = _state_index(key)
            if j is None or j not in by_index:
                raise ValueError(f"{name}: argument 'state_dict': state key {key!r:.60} names no parameter "
                                 f"(expected one of the indices in 'param_groups', written as '0', '1', ...)")
            if by_index[j] in new_state:
                raise ValueError(f"{name}: argument 'state_dict': the state of parameter {j} appears twice "
                                 f"(key {key!r:.60})")
            new_state[by_index[j]] = self._checked_state(name, j, by_index[j], entry, cast)
        self.state = new_state
        for group, options in zip(self.param_groups, new_options):
            group.update(options)

    def _checked_state(self, op: str, index: int, p: Parameter, entry: object, cast: bool) -> Dict[str, Any]:
        """One parameter's saved state, checked against ``_STATE`` (names and kinds of its entries)."""
        where = f"{op}: argument 'state_dict': state of parameter {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} expected a dict, got {type(entry).__name__}")
        spec = self._STATE
        if spec is not None and entry:
            unknown = sorted(set(map(str, entry)) - set(spec))
            missing = sorted(set(spec) - set(entry)) if self._STATE_REQUIRED else []
            if unknown or missing:
                raise ValueError(f"{where} expected the entries {sorted(spec)}, got {sorted(map(str, entry))}")
        restored = {}
        for key, value in entry.items():
            kind = None if spec is None else spec[key]
            if isinstance(value, np.ndarray):
                if kind == "int":
                    raise ValueError(f"{where}: '{key}' expected an integer, got an array")
                if value.shape != p.data.shape:
                    raise ValueError(f"{where}: '{key}' expected shape {p.data.shape}, got {value.shape}")
                if value.dtype.kind != "f" or (value.dtype != p.data.dtype and not cast):
                    raise ValueError(f"{where}: '{key}' expected dtype {p.data.dtype} (the parameter's), "
                                     f"got {value.dtype}" + ("" if value.dtype.kind != "f" else "; cast=True converts"))
                with np.errstate(over="ignore"):
                    converted = value.astype(p.data.dtype, copy=True)
                if not np.array_equal(np.isfinite(converted), np.isfinite(value)):
                    raise ValueError(f"{where}: '{key}' holds values too large for {p.data.dtype}")
                value = converted
            elif kind == "array":
                raise ValueError(f"{where}: '{key}' expected an array, got {type(value).__name__}")
            elif kind == "int" and (type(value) is not int or value < 0):
                raise ValueError(f"{where}: '{key}' expected an integer >= 0, got {value!r:.40}")
            restored[key] = value
        return restored

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}("]
        for i, g in enumerate(self.param_groups):
            opts = ", ".join(f"{k}={v}" for k, v in g.items() if k not in ("params", "names"))
            lines.append(f"  group {i}: {len(g['params'])} params, {opts}")
        return "\n".join(lines + [")"])


def _state_index(key: object) -> Optional[int]:
    """The parameter index a state key stands for: an int >= 0, or its decimal text; None for anything else."""
    if type(key) is int:
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and _INDEX.fullmatch(key):
        return int(key)
    return None


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    With d = g + weight_decay * p, momentum buffer b (b = d on the first step)::

        b <- momentum * b + (1 - dampening) * d
        p <- p - lr * (d + momentum * b)   if nesterov
        p <- p - lr * b                    otherwise (and p - lr * d without momentum)
    """

    _OPTIONS = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
    _STATE = {"momentum_buffer": "array"}
    _STATE_REQUIRED = False

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def _update(self, data, grad, state, group):
        lr, momentum, wd = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
        # Every array this update writes into is a copy made here: an array stays an array even when
        # the parameter is 0-d (where NumPy arithmetic on two arrays returns a scalar).
        d = grad.copy()
        if wd != 0:
            d += wd * data  # L2 decay joins the gradient
        new_state = {}
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = d.copy()
            else:
                buf = buf.copy()
                buf *= momentum
                buf += (1 - float(group["dampening"])) * d
            new_state["momentum_buffer"] = buf
            if group["nesterov"]:
                d += momentum * buf
            else:
                d = buf
        new_data = data.copy()
        new_data -= lr * d
        return new_data, new_state


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` is L2, added to the gradient (as torch.optim.Adam).

    With t counted from 1, m and v starting at zero::

        g <- g + weight_decay * p                    (Adam only)
        p <- p * (1 - lr * weight_decay)             (AdamW only: decoupled decay)
        m <- m + (1 - beta1) (g - m)
        v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    decoupled = False
    _OPTIONS = ("lr", "betas", "eps", "weight_decay")
    _STATE = {"step": "int", "exp_avg": "array", "exp_avg_sq": "array"}
    _STATE_REQUIRED = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, data, grad, state, group):
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        t = state.get("step", 0) + 1
        m0 = state["exp_avg"] if state else np.zeros_like(data)  # first moment before this step
        v0 = state["exp_avg_sq"] if state else np.zeros_like(data)  # second moment before this step
        if wd != 0 and not self.decoupled:
            grad = grad + wd * data  # a new value: .grad is untouched
        # Each line below makes a new array or works in one made here (never in data, grad or the
        # state), and each is one pass over the parameter: the fewest NumPy can do it in. ``out=``
        # keeps a 0-d parameter's values arrays (NumPy arithmetic on two 0-d arrays returns a scalar).
        def new() -> np.ndarray:
            return np.empty_like(data)

        m = np.subtract(grad, m0, out=new())
        m *= 1 - beta1
        m += m0  # m <- m + (1 - beta1) (g - m)
        v = np.multiply(v0, beta2, out=new())
        g2 = np.square(grad, out=new())  # grad * grad, the same bits
        g2 *= 1 - beta2
        v += g2  # v <- beta2 v + (1 - beta2) g^2
        step = np.sqrt(v, out=g2)
        step /= math.sqrt(1 - beta2**t)
        step += eps  # sqrt(v) / sqrt(1 - beta2^t) + eps
        np.divide(m, step, out=step)
        step *= lr / (1 - beta1**t)  # the step: lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
        new_data = np.multiply(data, 1 - lr * wd, out=new()) if wd != 0 and self.decoupled else data.copy()
        new_data -= step
        return new_data, {"step": t, "exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p <- p (1 - lr wd)`` before the Adam step."""

    decoupled = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
