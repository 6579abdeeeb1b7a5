"""npformer: an educational transformer engine in pure NumPy.

Every op is a forward/backward pair of plain functions (``npformer.ops``) whose
backward is derived by hand in ``proofs/`` and checked against PyTorch autograd
and central finite differences (``npformer.gradcheck``).
"""

__version__ = "0.1.0"
