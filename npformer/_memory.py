"""Keep large freed buffers in the process heap (glibc only).

A training step allocates and frees many arrays of tens of MB (attention scores, MLP
activations). By default glibc serves each one with a fresh ``mmap`` and returns it
to the system on ``free``, so every step page-faults and zero-fills the same memory
again: about a tenth of a step of the reference benchmark config. Raising the mmap
and trim thresholds lets the heap reuse those pages. Elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30  # 1 GiB: larger arrays still get their own mapping


def reuse_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed blocks below 1 GiB; True if it accepted."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    settings = ((_M_MMAP_THRESHOLD, _LIMIT), (_M_TRIM_THRESHOLD, 2 * _LIMIT), (_M_TOP_PAD, 256 << 20))
    return all(bool(mallopt(option, value)) for option, value in settings)
