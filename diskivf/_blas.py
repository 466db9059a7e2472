"""Control of BLAS's own thread pool, through ``threadpoolctl`` when it is installed.

diskivf runs its own threads over blocks of work (list scans, assignment blocks), each making
small BLAS calls. Those calls must run single-threaded inside BLAS, or the two levels of threads
oversubscribe the cores. ``threadpoolctl`` is an optional dependency: without it the thread
count of BLAS can neither be read nor set, and callers fall back to one block at a time with
BLAS threading as it is.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["blas_threads", "can_limit", "current_threads"]


class _Lib(NamedTuple):
    """How to read and set one loaded BLAS library's thread count."""

    get: Callable[[], int]
    set: Callable[[int], object]


_libs: list[_Lib] | None = None
_libs_lock = threading.Lock()


def _controllers() -> list[_Lib]:
    """The loaded BLAS libraries, found by threadpoolctl (empty without threadpoolctl)."""
    global _libs
    if _libs is None:
        with _libs_lock:
            if _libs is None:
                try:
                    from threadpoolctl import ThreadpoolController
                except ImportError:
                    _libs = []
                else:
                    # Scanning the loaded libraries costs milliseconds: done once per process.
                    ctl = ThreadpoolController().select(user_api="blas")
                    _libs = [_access(lib) for lib in ctl.lib_controllers]
    return _libs


def _access(lib: Any) -> _Lib:
    """Getter and setter of ``lib``'s thread count.

    For OpenBLAS, the C functions threadpoolctl's methods end in, called straight through its
    ctypes handles: a region then costs a few microseconds (``python tools/bench_kernels.py``,
    last line), several times less than through those methods and their controlling-thread
    bookkeeping, which matters to a single query (0.2-3 ms). Regions are serialised by
    ``_state_lock`` here, so that bookkeeping has nothing to add. Any other library, or a
    threadpoolctl without ``_get_symbol``, goes through the public methods.
    """
    symbol = getattr(lib, "_get_symbol", None)
    if symbol is not None and lib.internal_api == "openblas":
        # The functions threadpoolctl 3.x calls for each threading layer.
        if lib.threading_layer == "openmp":
            get, put = symbol("omp_get_max_threads"), symbol("omp_set_num_threads")
        else:
            get, put = symbol("openblas_get_num_threads"), symbol("openblas_set_num_threads")
        if get is not None and put is not None:
            return _Lib(get, put)
    return _Lib(lambda: int(lib.num_threads), functools.partial(_set, lib))


def can_limit() -> bool:
    """Whether BLAS's thread count can be set in this process (threadpoolctl found a BLAS)."""
    return bool(_controllers())


def current_threads() -> int | None:
    """The largest thread count of the loaded BLAS libraries, or None if it cannot be known."""
    libs = _controllers()
    if not libs:
        return None
    return max(int(lib.get()) for lib in libs)


# Thread counts are process-wide, and regions overlap: a search on one thread while another
# thread trains. The first region to enter saves the counts, the last to leave restores them,
# and every region in between holds BLAS at the smallest limit asked for. Saving and restoring
# per region instead would let an early leaver lift the limit under a region still running,
# and a late one "restore" the limit it found, leaving BLAS at one thread for good.
_regions = 0
_saved: list[tuple[_Lib, int]] = []
_state_lock = threading.Lock()


def blas_threads(limit: int | None) -> _Region:
    """Hold BLAS to at most ``limit`` threads for the duration of a ``with`` block (no-op
    without threadpoolctl or when ``limit`` is None). Safe to nest and to use from several
    threads at once.

    Search issues many small GEMM/GEMV calls; OpenBLAS splits those over its threads, which
    costs more in synchronisation than it gains, and collapses when another process holds a
    core (we measured a 200-query batch at 168 to 4,625 QPS with 2 BLAS threads on a busy
    machine, a steady ~5,700 with 1). The setting is process-wide while any region runs.
    """
    return _Region(limit)


class _Region:
    """One :func:`blas_threads` region. A class rather than a generator-based context manager,
    and each library's count read once on entry: every search enters a region, and on a small
    index a single query is mostly such fixed costs (commit 2ba7fde, tools/bench_single.py)."""

    __slots__ = ("_limit",)

    def __init__(self, limit: int | None) -> None:
        self._limit = limit

    def __enter__(self) -> None:
        global _regions, _saved
        limit = self._limit
        if limit is None:
            return
        libs = _controllers()
        with _state_lock:
            if _regions == 0:
                _saved = [(lib, lib.get()) for lib in libs]
                for lib, n in _saved:
                    if n > limit:
                        lib.set(limit)
            else:
                for lib in libs:
                    if lib.get() > limit:
                        lib.set(limit)
            _regions += 1

    def __exit__(self, *exc: object) -> None:
        global _regions, _saved
        if self._limit is None:
            return
        with _state_lock:
            _regions -= 1
            if _regions == 0:
                for lib, n in _saved:
                    if lib.get() != n:
                        lib.set(n)
                _saved = []


def _set(lib: Any, n: int) -> None:
    """Set ``lib``'s thread count from whichever thread runs this (under ``_state_lock``).

    threadpoolctl 3.8 lets only the first thread that ever set OpenBLAS's (process-wide)
    count set it again, and silently ignores the others: a region entered on a worker thread
    after the main thread had entered one would leave BLAS at full width under diskivf's own
    threads. Regions here are already serialised by ``_state_lock``, so control is taken for
    the call and released after it, for the next setter, ours or the caller's.
    """
    release = getattr(type(lib), "clear_controlling_thread", None)
    if release is not None:
        release(force=True)
    try:
        lib.set_num_threads(n)
    finally:
        if release is not None:
            release(force=True)
