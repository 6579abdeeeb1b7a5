"""The one place where the ops go faster than their plain reading, and the switch that turns it off.

Two devices, each with its plain form kept one setting away and tested equal to it:

- **Causal block skipping** (``causal_block``): causal attention walks the queries in row
  blocks of ``causal_block`` and, for each block, multiplies only the keys some row of the
  block can see (ATT.19); the hidden keys' probabilities and gradients are exactly zero
  (ATT.11), so nothing is lost but about half of the work at Tq = Tk. ``causal_block=None``
  is the plain form: one block of every query against every key.
- **Row-parallel elementwise work** (``threads``): NumPy releases the GIL inside its ufunc
  loops, so independent row blocks of an elementwise or row-wise computation (GELU, layer
  norm, RMSNorm, the residual sums of ``add``, the optimizer's update) run at once on
  different cores, while the matrix products are already spread over the cores by the
  BLAS. ``row_parallel(fn, n)`` calls ``fn(rows)`` for a few contiguous slices covering
  ``range(n)``, on a small pool of threads (with ``blocked=True``, in cache-sized slices, for
  the norms' several passes). Every row is computed by the same instructions whichever thread
  runs it, so the result is bit for bit the one of ``threads=1``, the plain form.

One setting outside NumPy: OpenBLAS's idle worker threads spin for about 0.1 s after each matrix
product before they sleep, holding cores the row-parallel work needs; ``quiet_blas_threads``, run
once when this module is imported, shortens that to 2**BLAS_SPIN cycles (unless the environment
sets ``OPENBLAS_THREAD_TIMEOUT`` or another Python thread is running). The products' results do
not change. And one in the C library, for loops of training steps (``npformer.train`` and the bench
call it; a loop of one's own may too): ``keep_freed_memory`` has glibc's malloc keep the memory of
freed arrays for the next ones instead of handing it back to the kernel, so that a step's arrays
do not arrive as fresh pages, each zeroed by the kernel on its first touch. No result changes.

The defaults: ``threads`` is ``NPFORMER_NUM_THREADS`` if set, else the BLAS's own setting
(``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``), else the number of cores this process may
use; ``causal_block`` is 64. ``configure(threads=..., causal_block=...)`` changes them and
``configured(...)`` changes them inside a ``with`` block (tests use it to compare the two
forms).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import importlib
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional

import numpy as np

from ._checks import MAX_POSITION, check_count

_UNSET = object()
MIN_ELEMENTS = 1 << 15  # elements per thread below which handing work to a thread costs more than it saves
CACHE_BLOCK = 1 << 17  # elements (512 KiB of float32) a thread's passes over rows take at a time: see row_parallel


MAX_THREADS = 1024


def _default_threads() -> int:
    """``NPFORMER_NUM_THREADS``, else the BLAS's own setting, else the cores this process may use. A
    variable that is set but not an integer in [1, 1024] is named in a warning and passed over."""
    for name in ("NPFORMER_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if not value:
            continue
        if value.isdigit() and 1 <= int(value) <= MAX_THREADS:
            return int(value)
        warnings.warn(f"npformer.ops.fastpath: environment variable {name}={value!r} is not an integer in "
                      f"[1, {MAX_THREADS}]; passed over", RuntimeWarning, stacklevel=2)
    try:
        return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(MAX_THREADS, os.cpu_count() or 1))


class _Settings:
    def __init__(self) -> None:
        self.threads = _default_threads()
        self.causal_block: Optional[int] = 64
        self.pool: Optional[ThreadPoolExecutor] = None
        self.pool_size = 0
        self.lock = threading.Lock()
        self.blas_users = 0  # callers inside blas_parallel: the first sets the BLAS to 1 thread, the last restores
        self.blas_before = 0


_settings = _Settings()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's threads: it starts a pool of its own when it needs one."""
    _settings.pool, _settings.pool_size = None, 0
    _settings.lock = threading.Lock()
    _settings.blas_users = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """Threads that row-parallel work uses (1: all on the calling thread)."""
    return _settings.threads


def causal_block() -> Optional[int]:
    """Query rows per block of causal block skipping; None: off (the plain form)."""
    return _settings.causal_block


def _checked(threads, causal_block) -> tuple:
    op = "fastpath.configure"
    if threads is not _UNSET:
        threads = check_count(op, "threads", threads, 1, MAX_THREADS)
    if causal_block is not _UNSET and causal_block is not None:
        causal_block = check_count(op, "causal_block", causal_block, 1, MAX_POSITION)
    return threads, causal_block


def configure(threads=_UNSET, causal_block=_UNSET) -> None:
    """Set the fast path's options; an option not given keeps its value. Both are checked before
    either is set. The settings are the process's, shared by its threads.

    threads: int in [1, 1024];  causal_block: int >= 1, or None for the plain form.
    """
    threads, causal_block = _checked(threads, causal_block)
    if threads is not _UNSET:
        _settings.threads = threads
    if causal_block is not _UNSET:
        _settings.causal_block = causal_block


@contextlib.contextmanager
def configured(threads=_UNSET, causal_block=_UNSET) -> Iterator[None]:
    """``configure(...)`` inside a ``with`` block; the previous settings come back after it. The settings
    are the process's: two threads in ``configured`` blocks at once see each other's."""
    threads, causal_block = _checked(threads, causal_block)
    before = (_settings.threads, _settings.causal_block)
    configure(threads=threads, causal_block=causal_block)
    try:
        yield
    finally:
        _settings.threads, _settings.causal_block = before


def _pool(workers: int) -> ThreadPoolExecutor:
    """The pool of at least ``workers`` threads. A smaller one is replaced, not shut down: a thread may be
    handing it work at this moment, and it ends its threads once nothing refers to it."""
    with _settings.lock:
        if _settings.pool is None or _settings.pool_size < workers:
            _settings.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npformer-rows")
            _settings.pool_size = workers
        return _settings.pool


def row_slices(n: int, parts: int) -> List[slice]:
    """``parts`` contiguous slices of nearly equal length covering range(n) (empty ones dropped)."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def row_parallel(fn: Callable[[slice], None], n_rows: int, row_size: int = 1, blocked: bool = False) -> None:
    """Call ``fn(rows)`` for slices covering range(n_rows), on up to ``num_threads()`` threads.

    ``fn`` must write only the rows it is given (into preallocated outputs) and read nothing
    another call writes. ``row_size`` is the number of elements per row: small work runs in
    one call on the calling thread. The calling thread takes the first slice itself; an
    exception in any slice is raised here after every slice has finished.

    ``blocked``: each thread walks its rows in slices of at most ``CACHE_BLOCK`` elements (at
    least one row), so that work making several passes over its rows (layer norm: centre,
    square, scale, ...) finds them in the core's cache on each pass. The plain form
    (``threads=1``) is one call over all rows. A floating-point warning (overflow) is then issued
    by each slice that meets one, not once.
    """
    threads = _threads_for(n_rows, n_rows * row_size)
    step = max(1, CACHE_BLOCK // max(row_size, 1) if blocked and _settings.threads > 1 else n_rows)

    def walk(rows: slice) -> None:
        if rows.stop - rows.start <= step:
            fn(rows)  # (no rows at all: one call, with the empty slice)
            return
        error = None
        for start in range(rows.start, rows.stop, step):
            try:
                fn(slice(start, min(start + step, rows.stop)))
            except Exception as e:  # the other slices still run; the first error is raised at the end
                if error is None:
                    error = e
        if error is not None:
            raise error

    if threads <= 1:
        walk(slice(0, n_rows))
        return
    _run_together([functools.partial(walk, rows) for rows in row_slices(n_rows, threads)])


def add(a, b):
    """a + b, as NumPy's ``a + b`` gives it (bit for bit: each element is one rounding of the same two
    numbers), summed in blocks of elements on several cores when a and b are C-ordered float (or complex)
    arrays of one shape and one native dtype (a residual sum of two (B, T, D) streams); anything else
    (other layouts, broadcasting, mixed or other dtypes, scalars, subclasses) is ``a + b`` itself.

    A floating-point warning (overflow) is issued by each block that meets one, from this module."""
    if type(a) is not np.ndarray or type(b) is not np.ndarray or a.shape != b.shape or a.dtype != b.dtype \
            or a.dtype.kind not in "fc" or not a.dtype.isnative or not (a.flags.c_contiguous and b.flags.c_contiguous):
        return a + b
    out = np.empty(a.shape, a.dtype)
    a_flat, b_flat, out_flat = a.reshape(-1), b.reshape(-1), out.reshape(-1)  # views: blocks of elements
    row_parallel(lambda r: np.add(a_flat[r], b_flat[r], out=out_flat[r]), out_flat.size)
    return out


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
    pool = _pool(len(rest))
    # each task runs in a copy of the caller's context: NumPy's error state (np.errstate, np.seterr)
    # is a context variable, and a row must overflow, or raise, as it would on the calling thread
    futures = [pool.submit(contextvars.copy_context().run, task) for task in rest]
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
    ``_blas_threads``), the rows run in one call on the calling thread.

    On one thread (``threads=1``, or one row's work) the BLAS keeps its own threads. Where its
    product on several threads differs in the last bits from its product on one (OpenBLAS does,
    for products large enough to be split), results then differ by that much between the two
    forms; the tests compare them bit for bit on products the BLAS does not split.
    """
    control = _blas_threads()
    if _threads_for(n_rows, n_rows * row_size) <= 1 or control is None:
        fn(slice(0, n_rows))  # one thread's work (a single sequence while decoding, say): the BLAS keeps its threads
        return
    get, put = control
    with _settings.lock:  # callers on several threads at once: the first sets 1 thread, the last restores
        if _settings.blas_users == 0:
            _settings.blas_before = get()
            put(1)
        _settings.blas_users += 1
    try:
        row_parallel(fn, n_rows, row_size)
    finally:
        with _settings.lock:
            _settings.blas_users -= 1
            if _settings.blas_users == 0:
                put(_settings.blas_before)


# --- the BLAS's own threads --------------------------------------------------------------------

_blas = _UNSET


def _openblas_libraries() -> List[ctypes.CDLL]:
    """The OpenBLAS libraries loaded in this process, found among its shared libraries (NumPy's wheels
    bundle OpenBLAS under a prefixed name); none where there is none or no way to look (not Linux)."""
    importlib.import_module("numpy")  # loaded with NumPy's extension modules
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return []
    libraries = []
    for path in sorted(paths):
        try:
            libraries.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libraries


def _symbol(lib: ctypes.CDLL, name: str):
    """OpenBLAS's function ``name`` under any of the prefixes its builds export it with, or None."""
    for prefix, suffix in (("scipy_openblas_", "64_"), ("openblas_", "64_"), ("openblas_", "")):
        function = getattr(lib, f"{prefix}{name}{suffix}", None)
        if function is not None:
            return function
    return None


def _blas_threads():
    """(get, set) of the loaded OpenBLAS's thread count; None where there is none or no way to look."""
    global _blas
    if _blas is not _UNSET:
        return _blas
    _blas = None
    for lib in _openblas_libraries():
        get, put = _symbol(lib, "get_num_threads"), _symbol(lib, "set_num_threads")
        if get is not None and put is not None:
            get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
            _blas = (get, put)
            return _blas
    return None


BLAS_SPIN = 18  # an idle OpenBLAS thread waits for work spinning 2**BLAS_SPIN cycles (about 0.1 ms), then sleeps


def quiet_blas_threads() -> List[str]:
    """Make OpenBLAS's idle worker threads sleep after 2**BLAS_SPIN cycles instead of OpenBLAS's default
    2**28 (about 0.1 s); the names of the libraries changed.

    A worker that has finished its share of a matrix product spins, waiting for the next one, and
    while it spins it holds a core. Row-parallel work right after a product (the softmax of
    attention, layer norm, GELU, the optimizer) then shares that core with it: on two cores,
    attention ran at about 60% of its speed. The BLAS reads the timeout when it starts its threads,
    so they are restarted here with the new one (``openblas_read_env``, ``blas_thread_shutdown_``,
    ``blas_thread_init``); the products' results do not change.

    Called once, when this module is imported (by the first op imported), and only then if the
    process runs no other Python thread: one inside a BLAS call while its workers are stopped
    would hang. Where it cannot run (a notebook's kernel has threads of its own), set
    ``OPENBLAS_THREAD_TIMEOUT=18`` before NumPy loads. A timeout set that way is left as it is,
    and so is a BLAS without its own thread server (an OpenMP build) or without these functions.
    """
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or threading.active_count() > 1:
        return []
    changed = []
    for lib in _openblas_libraries():
        parallel = _symbol(lib, "get_parallel")
        functions = [getattr(lib, name, None) for name in ("openblas_read_env", "blas_thread_shutdown_",
                                                            "blas_thread_init")]
        if parallel is None or parallel() != 1 or None in functions:  # 1: OpenBLAS's own pthreads server
            continue
        read_env, shutdown, init = functions
        os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(BLAS_SPIN)  # read by read_env, then put back as it was
        try:
            read_env()
        finally:
            del os.environ["OPENBLAS_THREAD_TIMEOUT"]
        shutdown()
        init()
        changed.append(lib._name)
    return changed


QUIETED = quiet_blas_threads()  # the OpenBLAS libraries whose idle threads now sleep sooner


# --- the C library's malloc --------------------------------------------------------------------

KEEP_BELOW = 1 << 30  # bytes: arrays below this come from malloc's heaps rather than pages of their own
KEEP_PAD = 1 << 27  # bytes malloc adds whenever a heap grows; a pad above a thread heap's 64 MiB keeps it

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameters (glibc's malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory of freed arrays for the next allocations; True where it was set.

    A training step makes and frees the same few hundred megabytes of activations and gradients
    every step. By default glibc gives an array above its mmap threshold (which adapts, up to 32 MiB)
    pages of its own and hands them back to the kernel when it is freed; it also returns the free
    top of its main heap beyond a trim threshold, and deletes a thread's heap once it is empty (the
    blocks of ``row_parallel`` allocate on pool threads). The next step's arrays then arrive as
    fresh pages, and the kernel zeroes each on its first touch: 66,000-76,000 page faults in a step
    of ``npformer bench``'s reference model, and 4-11% of its time in the runs measured (one process,
    steps taking turns with these settings and with glibc's, at their start or as they adapt: 0.89x
    and 0.91x the time; processes with and without them against the torch twin: 3-4%). Here arrays
    below ``KEEP_BELOW`` made on the main thread come from its heap (a thread's heap holds at most
    64 MiB: larger arrays made on a thread still get pages of their own), the main heap is never trimmed, and every growth adds ``KEEP_PAD``, a
    pad that also keeps empty thread heaps from being deleted: after the first steps, a step reuses
    its own memory and faults almost never.

    The price, for the rest of the process: memory freed is not handed back, so the resident size
    does not fall after a peak, and allocations whose sizes keep growing (an array grown by copying,
    step after step) leave holes that larger arrays cannot reuse, so it can settle above the peak
    of live arrays (by half again, for a buffer grown 1 MiB at a time to 300 MiB). And ``np.zeros``
    on reused memory clears it rather than getting untouched pages. Steady loops of steps, which
    make the same arrays every step, do not see either.

    Left as it is where the environment tunes malloc (``GLIBC_TUNABLES`` naming malloc, or any
    ``MALLOC_*`` variable) or the C library is not glibc.
    """
    if any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if getattr(libc, "gnu_get_libc_version", None) is None or getattr(libc, "mallopt", None) is None:
        return False  # not glibc: its own malloc, its own ways
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1: never trim (mallopt(3)); each call returns 1 when the value is taken
    return all([libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW), libc.mallopt(_M_TRIM_THRESHOLD, -1),
                libc.mallopt(_M_TOP_PAD, KEEP_PAD)])
