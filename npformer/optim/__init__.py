"""Optimizers, parameter groups, gradient clipping and learning-rate schedules.

Everything here updates ``Parameter.data`` in place from ``Parameter.grad`` and
follows ``torch.optim`` semantics closely enough that the tests compare step by
step against it:

- ``SGD``, ``Adam``, ``AdamW`` (``optimizer.py``): a list of Parameters or of group
  dicts; ``param_groups``, ``step``, ``zero_grad``, ``state_dict``/``load_state_dict``;
- ``param_groups(model, weight_decay)`` (``groups.py``): decay the matrices, not the
  norms, biases and embeddings;
- ``clip_grad_norm_``, ``scale_grads_``, ``accumulate_gradients`` (``grads.py``);
- ``constant``, ``warmup_cosine``, ``linear_decay``, ``inverse_sqrt`` (``noam``, the original
  Transformer's warmup then inverse square root) (``schedules.py``): callables ``step -> lr`` with
  the step counted from 0.
"""

from .grads import accumulate_gradients, clip_grad_norm_, grad_norm, scale_grads_
from .groups import classify, param_groups
from .optimizer import SGD, Adam, AdamW, Optimizer
from .schedules import (Constant, InverseSqrt, LinearDecay, WarmupCosine, constant, inverse_sqrt, linear_decay, noam,
                        warmup_cosine)

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW",
    "param_groups", "classify",
    "clip_grad_norm_", "grad_norm", "scale_grads_", "accumulate_gradients",
    "constant", "warmup_cosine", "linear_decay", "inverse_sqrt", "noam", "Constant", "WarmupCosine", "LinearDecay",
    "InverseSqrt",
]
