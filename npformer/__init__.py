"""npformer: an educational transformer engine in pure NumPy.

Every op is a forward/backward pair of plain functions (``npformer.ops``) whose
backward is derived by hand in ``proofs/`` and checked against PyTorch autograd
and central finite differences (``npformer.gradcheck``).
"""

import os

# OpenBLAS's idle threads spin for 2**28 cycles after each product before they sleep. Between the
# products npformer runs threads of its own (npformer.ops.fastpath), which that spinning would
# slow down; ask for a short spin (2**18 cycles, about a tenth of a millisecond) unless the environment says otherwise. It
# takes effect when NumPy loads OpenBLAS, so only if npformer is imported first (as by the CLI).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")

__version__ = "0.1.0"
