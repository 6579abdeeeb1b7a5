"""Suite-wide set-up: Triton interpreter on CPU, hypothesis profiles, torch threads."""

import os

# The Triton interpreter must be chosen before triton is first imported.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import numpy as np
import torch
from hypothesis import HealthCheck, settings

# "ci" (default): few, derandomised examples, so the suite is bounded and repeatable.
# "dev": a deeper search for local runs: HYPOTHESIS_PROFILE=dev pytest
settings.register_profile(
    "ci",
    max_examples=15,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(1)
np.seterr(all="raise", under="ignore")
