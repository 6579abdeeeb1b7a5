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
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from ..nn.module import Parameter
from ..ops._checks import check_range

INF = math.inf


class Optimizer:
    """Parameter groups, state, zero_grad and state dicts; subclasses write ``_update``."""

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        self.defaults = dict(defaults)
        self.param_groups: List[Dict[str, Any]] = []
        self.state: Dict[Parameter, Dict[str, Any]] = {}
        name = type(self).__name__
        self._check_hyperparameters(self.defaults)
        params = list(params)
        if not params:
            raise ValueError(f"{name}: argument 'params' expected a non-empty list of Parameters or groups, got []")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    # -- groups -----------------------------------------------------------------------------
    def add_param_group(self, group: Dict[str, Any]) -> None:
        name = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise ValueError(f"{name}: argument 'params' expected Parameters or dicts with a 'params' key, "
                             f"got {type(group).__name__}")
        group = dict(group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, Parameter) else list(params)
        for p in group["params"]:
            if not isinstance(p, Parameter):
                raise ValueError(f"{name}: argument 'params' expected Parameter entries, got {type(p).__name__}")
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._check_hyperparameters(group)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in group["params"]}) != len(group["params"]) or seen & {id(p) for p in group["params"]}:
            raise ValueError(f"{name}: argument 'params' expected each Parameter in one group once, "
                             "got a Parameter twice")
        self.param_groups.append(group)

    def _check_hyperparameters(self, options: Dict[str, Any]) -> None:
        name = type(self).__name__
        for key in ("lr", "eps", "weight_decay", "momentum", "dampening"):
            if key in options:
                check_range(name, key, options[key], 0.0, INF)
        if "betas" in options:
            beta1, beta2 = options["betas"]
            check_range(name, "betas[0]", beta1, 0.0, 1.0)
            check_range(name, "betas[1]", beta2, 0.0, 1.0)

    def parameters(self) -> List[Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    # -- training ---------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Set the gradient of every parameter this optimizer updates to zero (in place)."""
        for p in self.parameters():
            p.grad.fill(0)

    def step(self) -> None:
        """One update of every parameter from its ``.grad``."""
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

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore state and hyperparameters saved by ``state_dict`` into the same layout of parameters.

        Accepts the dict as ``state_dict`` returns it or as ``npformer.checkpoint.load``
        gives it back (string keys, lists for tuples, no ``"state"`` entry if it was empty).
        """
        name = type(self).__name__
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: expected {len(self.param_groups)} parameter groups, "
                             f"got {len(saved_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{name}.load_state_dict: group {i} expected {len(group['params'])} parameters, "
                                 f"got {len(saved['params'])}")
        params = self.parameters()
        saved_state = {int(k): v for k, v in state_dict.get("state", {}).items()}
        self.state = {}
        for i, p in enumerate(params):
            if i not in saved_state:
                continue
            restored = {}
            for key, value in saved_state[i].items():
                if isinstance(value, np.ndarray):
                    if value.shape != p.data.shape:
                        raise ValueError(f"{name}.load_state_dict: state '{key}' of parameter {i} expected shape "
                                         f"{p.data.shape}, got {value.shape}")
                    value = value.astype(p.data.dtype, copy=True)
                restored[key] = value
            self.state[p] = restored
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value

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

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"SGD: argument 'nesterov' expected momentum > 0 and dampening = 0, "
                             f"got momentum={momentum}, dampening={dampening}")
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

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

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
