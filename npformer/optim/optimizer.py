"""SGD, Adam and AdamW over ``Parameter``s, with torch.optim's update rules.

An optimizer takes either a list of Parameters or a list of *group* dicts::

    AdamW(model.parameters(), lr=3e-4)
    AdamW([{"params": matrices, "weight_decay": 0.1},
           {"params": vectors, "weight_decay": 0.0}], lr=3e-4)

Each group is a dict holding ``"params"`` and every hyperparameter (missing ones
are filled from the constructor's defaults), so a trainer changes the learning
rate with ``for g in opt.param_groups: g["lr"] = schedule(step)``.

Per-parameter state (moments, step counts) lives in ``opt.state[param]``.
``state_dict()`` numbers the parameters 0, 1, … in group order (as torch does) and
holds only arrays, ints, floats, strings and lists of them, so
``npformer.checkpoint`` can store it without pickle.

Every parameter is updated on every ``step()``: a Parameter always has a ``.grad``
array, and a zero gradient is a gradient (torch instead skips ``grad is None``).
Updates are in place, in the parameter's own dtype (float32 stays float32).

Options are checked where they enter (the constructor, ``add_param_group``,
``load_state_dict``) and again by ``step()``, since a trainer writes ``group["lr"]``
directly: ``lr`` and ``weight_decay`` finite and >= 0, ``eps`` finite and > 0, each
of ``betas`` and ``momentum`` in [0, 1), ``dampening`` in [0, 1], ``nesterov`` a bool.
``step()`` also checks that every gradient is an array of its parameter's shape and
dtype. A failure raises ``ValueError`` (or ``TypeError`` for a wrong type) naming the
optimizer, the argument and the group; nothing is updated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Dict, List, Tuple

import numpy as np

from ..nn.module import Parameter
from ..ops._checks import check_bool, check_real

# The closed-open or closed intervals of each option: (lo, hi, lo_open, hi_open); None is unbounded.
_BOUNDS = {
    "lr": (0.0, None, False, False),
    "weight_decay": (0.0, None, False, False),
    "eps": (0.0, None, True, False),
    "momentum": (0.0, 1.0, False, True),
    "dampening": (0.0, 1.0, False, False),
}


class Optimizer:
    """Parameter groups, state, zero_grad and state dicts; subclasses write ``_update``."""

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        name = type(self).__name__
        if not isinstance(defaults, dict):
            raise TypeError(f"{name}: argument 'defaults' expected a dict, got {type(defaults).__name__}")
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

    @staticmethod
    def _checked_options(op: str, options: Dict[str, Any]) -> Dict[str, Any]:
        """``options`` with every known option checked (messages start with ``op``); betas become a tuple."""
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
        """One update of every parameter from its ``.grad``; options and gradients are checked first."""
        name = type(self).__name__
        for k, group in enumerate(self.param_groups):
            self._checked_options(f"{name}.step (group {k})", group)
            for i, p in enumerate(group["params"]):
                g = p.grad
                if not isinstance(g, np.ndarray) or g.shape != p.data.shape or g.dtype != p.data.dtype:
                    got = (f"{g.dtype} of shape {g.shape}" if isinstance(g, np.ndarray) else type(g).__name__)
                    raise ValueError(f"{name}.step: argument 'params': group {k}, parameter {i} has a gradient of "
                                     f"{got}; expected {p.data.dtype} of shape {p.data.shape}")
                for key, value in self.state.get(p, {}).items():
                    if isinstance(value, np.ndarray) and value.shape != p.data.shape:
                        raise ValueError(f"{name}.step: argument 'params': group {k}, parameter {i} has shape "
                                         f"{p.data.shape}, but its state '{key}' has shape {value.shape}")
        for group in self.param_groups:
            for p in group["params"]:
                self._update(p, p.grad, self.state.setdefault(p, {}), group)

    def _update(self, p: Parameter, g: np.ndarray, state: Dict[str, Any], group: Dict[str, Any]) -> None:
        raise NotImplementedError

    # -- state dicts ------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """``{"state": {"0": {...}, ...}, "param_groups": [{..., "params": [0, 1]}, ...]}``.

        Arrays are copies, so a later ``step()`` does not change a dict already taken.
        """
        index = {id(p): i for i, p in enumerate(self.parameters())}
        state = {str(index[id(p)]): {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()}
                 for p, s in self.state.items() if s}
        groups = []
        for g in self.param_groups:
            saved = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
            saved["params"] = [index[id(p)] for p in g["params"]]
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any], *, cast: bool = False) -> None:
        """Restore state and hyperparameters saved by ``state_dict`` into the same layout of parameters.

        Accepts the dict as ``state_dict`` returns it or as ``npformer.checkpoint.load``
        gives it back (string keys, lists for tuples, no ``"state"`` entry if it was empty).
        Everything is checked before anything changes: the number of groups and of
        parameters in each, the options, and each state entry's keys, shapes and
        dtypes. A state array must have its parameter's dtype unless ``cast=True``
        (then any float dtype is converted); a non-float array is always refused.
        """
        name = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{name}: argument 'state_dict' expected a dict, got {type(state_dict).__name__}")
        cast = check_bool(name, "cast", cast)
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
            j = int(key) if isinstance(key, str) and key.isdigit() else key
            if type(j) is not int or j not in by_index:
                raise ValueError(f"{name}: argument 'state_dict': state key {key!r} names no parameter "
                                 f"(expected one of the indices in 'param_groups')")
            new_state[by_index[j]] = self._checked_state(name, j, by_index[j], entry, cast)
        self.state = new_state
        for group, options in zip(self.param_groups, new_options):
            group.update(options)

    def _checked_state(self, op: str, index: int, p: Parameter, entry: object, cast: bool) -> Dict[str, Any]:
        """One parameter's saved state, checked against ``_STATE`` (names and kinds of its entries)."""
        where = f"{op}: argument 'state_dict': state of parameter {index}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} expected a dict, got {type(entry).__name__}")
        spec = getattr(self, "_STATE", None)
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
                value = value.astype(p.data.dtype, copy=True)
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


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    With d = g + weight_decay * p, momentum buffer b (b = d on the first step)::

        b <- momentum * b + (1 - dampening) * d
        p <- p - lr * (d + momentum * b)   if nesterov
        p <- p - lr * b                    otherwise (and p - lr * d without momentum)
    """

    _STATE = {"momentum_buffer": "array"}
    _STATE_REQUIRED = False

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def _update(self, p, g, state, group):
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = g + wd * p.data if wd != 0 else g  # L2 decay joins the gradient (a new array: .grad is untouched)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.copy()
            else:
                buf *= momentum
                buf += (1 - group["dampening"]) * d
            d = d + momentum * buf if group["nesterov"] else buf
        p.data -= lr * d


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
    _STATE = {"step": "int", "exp_avg": "array", "exp_avg_sq": "array"}
    _STATE_REQUIRED = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, p, g, state, group):
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = np.zeros_like(p.data)  # m: first moment
            state["exp_avg_sq"] = np.zeros_like(p.data)  # v: second moment
        state["step"] += 1
        t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        if wd != 0:
            if self.decoupled:
                p.data *= 1 - lr * wd
            else:
                g = g + wd * p.data
        tmp = np.subtract(g, m)  # the one scratch array of this update
        tmp *= 1 - beta1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= 1 - beta2
        v *= beta2
        v += tmp
        step_size = lr / (1 - beta1**t)
        denom = np.sqrt(v, out=tmp)
        denom /= math.sqrt(1 - beta2**t)
        denom += eps
        update = np.divide(m, denom, out=tmp)
        update *= step_size
        p.data -= update


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): ``p <- p (1 - lr wd)`` before the Adam step."""

    decoupled = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
