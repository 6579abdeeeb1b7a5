"""The one place where the ops go faster than their plain reading, and the switch that turns it off.

Two devices, each with its plain form kept one setting away and tested equal to it:

- **Causal block skipping** (``causal_block``): causal attention walks the queries in row
  blocks of ``causal_block`` and, for each block, multiplies only the keys some row of the
  block can see (ATT.19); the hidden keys' probabilities and gradients are exactly zero
  (ATT.11), so nothing is lost but about half of the work at Tq = Tk. ``causal_block=None``
  is the plain form: one block of every query against every key.
- **Row-parallel elementwise work** (``threads``): NumPy releases the GIL inside its ufunc
  loops, so independent row blocks of an elementwise or row-wise computation (GELU, layer
  norm, the optimizer's update) run at once on different cores, while the matrix products
  are already spread over the cores by the BLAS. ``row_parallel(fn, n)`` calls ``fn(rows)``
  for a few contiguous slices covering ``range(n)``, on a small pool of threads. Every row
  is computed by the same instructions whichever thread runs it, so the result is bit for
  bit the one of ``threads=1``, the plain form.

The defaults: ``threads`` is ``NPFORMER_NUM_THREADS`` if set, else the BLAS's own setting
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``), else the number of cores this process may
use; ``causal_block`` is 64. ``configure(threads=..., causal_block=...)`` changes them and
``configured(...)`` changes them inside a ``with`` block (tests use it to compare the two
forms).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional

from ._checks import check_count

_UNSET = object()
MIN_ELEMENTS = 1 << 15  # elements per thread below which handing work to a thread costs more than it saves


def _default_threads() -> int:
    for name in ("NPFORMER_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.strip().isdigit() and int(value) >= 1:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Settings:
    def __init__(self) -> None:
        self.threads = _default_threads()
        self.causal_block: Optional[int] = 64
        self.pool: Optional[ThreadPoolExecutor] = None
        self.pool_size = 0
        self.lock = threading.Lock()


_settings = _Settings()


def num_threads() -> int:
    """Threads that row-parallel work uses (1: all on the calling thread)."""
    return _settings.threads


def causal_block() -> Optional[int]:
    """Query rows per block of causal block skipping; None: off (the plain form)."""
    return _settings.causal_block


def configure(threads=_UNSET, causal_block=_UNSET) -> None:
    """Set the fast path's options; an option not given keeps its value.

    threads: int >= 1;  causal_block: int >= 1, or None for the plain form.
    """
    op = "fastpath.configure"
    if threads is not _UNSET:
        _settings.threads = check_count(op, "threads", threads, 1, 1024)
    if causal_block is not _UNSET:
        _settings.causal_block = None if causal_block is None else check_count(op, "causal_block", causal_block, 1)


@contextlib.contextmanager
def configured(threads=_UNSET, causal_block=_UNSET) -> Iterator[None]:
    """``configure(...)`` inside a ``with`` block; the previous settings come back after it."""
    before = (_settings.threads, _settings.causal_block)
    configure(threads=threads, causal_block=causal_block)
    try:
        yield
    finally:
        _settings.threads, _settings.causal_block = before


def _pool(workers: int) -> ThreadPoolExecutor:
    with _settings.lock:
        if _settings.pool is None or _settings.pool_size < workers:
            if _settings.pool is not None:
                _settings.pool.shutdown(wait=False)
            _settings.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npformer-rows")
            _settings.pool_size = workers
        return _settings.pool


def row_slices(n: int, parts: int) -> List[slice]:
    """``parts`` contiguous slices of nearly equal length covering range(n) (empty ones dropped)."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def row_parallel(fn: Callable[[slice], None], n_rows: int, row_size: int = 1) -> None:
    """Call ``fn(rows)`` for slices covering range(n_rows), on up to ``num_threads()`` threads.

    ``fn`` must write only the rows it is given (into preallocated outputs) and read nothing
    another call writes. ``row_size`` is the number of elements per row: small work runs in
    one call on the calling thread. The calling thread takes the first slice itself; an
    exception in any slice is raised here after every slice has finished.
    """
    threads = _threads_for(n_rows, n_rows * row_size)
    if threads <= 1:
        fn(slice(0, n_rows))
        return
    _run_together([functools.partial(fn, rows) for rows in row_slices(n_rows, threads)])


def parallel_items(fn: Callable[[int], None], sizes: List[int]) -> None:
    """Call ``fn(i)`` for every item i, on up to ``num_threads()`` threads, each item whole on one thread.

    ``sizes[i]`` is item i's amount of work (elements): items go largest first to the thread with
    the least work so far, and small work runs on the calling thread. ``fn`` must touch only what
    belongs to its item. An exception is raised here after every item has finished.
    """
    threads = _threads_for(len(sizes), sum(sizes))
    if threads <= 1:
        for i in range(len(sizes)):
            fn(i)
        return
    shares: List[List[int]] = [[] for _ in range(threads)]
    load = [0] * threads
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        t = load.index(min(load))
        shares[t].append(i)
        load[t] += sizes[i]

    def run(items: List[int]) -> None:
        for i in items:
            fn(i)

    _run_together([functools.partial(run, items) for items in shares])


def _threads_for(items: int, elements: int) -> int:
    """Threads worth using for ``items`` independent pieces holding ``elements`` in all: at most one per
    piece and one per MIN_ELEMENTS, and 1 on a pool thread (no nesting)."""
    if threading.current_thread().name.startswith("npformer-rows"):
        return 1
    return max(1, min(_settings.threads, items, elements // MIN_ELEMENTS))


def _run_together(tasks: List[Callable[[], None]]) -> None:
    """The first task on the calling thread, the others on the pool at the same time; the first
    exception raised by any of them is raised here, once every task has finished."""
    first, *rest = tasks
    futures = [_pool(len(rest)).submit(task) for task in rest]
    try:
        first()
    finally:
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def blas_parallel(fn: Callable[[slice], None], n_rows: int, row_size: int = 1) -> None:
    """``row_parallel`` for work whose rows make their own small matrix products (attention, one
    batch element per row): the BLAS runs one thread per call meanwhile, so that the threads here,
    not the BLAS's, share the cores. Without a BLAS whose thread count can be set (see
    ``blas_threads``), the rows run in one call on the calling thread.
    """
    if _threads_for(n_rows, n_rows * row_size) > 1 and _blas_threads() is not None:
        with blas_threads(1):
            row_parallel(fn, n_rows, row_size)
    else:  # one thread's work (a single sequence while decoding, say): the BLAS keeps its threads
        fn(slice(0, n_rows))


# --- the BLAS's own thread count --------------------------------------------------------------

_blas = _UNSET


def _blas_threads():
    """(get, set) of the loaded OpenBLAS's thread count, found among the process's shared libraries
    (NumPy's wheels bundle OpenBLAS under a prefixed name); None where there is none or no way to look."""
    global _blas
    if _blas is not _UNSET:
        return _blas
    _blas = None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "64_"), ("openblas_", "")):
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                _blas = (get, put)
                return _blas
    return None


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """The BLAS runs ``n`` threads per call inside the ``with`` block (where its count can be set)."""
    control = _blas_threads()
    if control is None:
        yield
        return
    get, put = control
    before = get()
    put(n)
    try:
        yield
    finally:
        put(before)
