"""Control of BLAS's own thread pool, through ``threadpoolctl`` when it is installed.

diskivf runs its own threads over blocks of work (list scans, assignment blocks), each making
small BLAS calls. Those calls must run single-threaded inside BLAS, or the two levels of threads
oversubscribe the cores. ``threadpoolctl`` is an optional dependency: without it the thread
count of BLAS can neither be read nor set, and callers fall back to one block at a time with
BLAS threading as it is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["blas_threads", "can_limit", "current_threads"]

_libs: list[Any] | None = None
_libs_lock = threading.Lock()


def _controllers() -> list[Any]:
    """threadpoolctl's controllers of the loaded BLAS libraries (empty without threadpoolctl)."""
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
                    _libs = list(ctl.lib_controllers)
    return _libs


def can_limit() -> bool:
    """Whether BLAS's thread count can be set in this process (threadpoolctl found a BLAS)."""
    return bool(_controllers())


def current_threads() -> int | None:
    """The largest thread count of the loaded BLAS libraries, or None if it cannot be known."""
    libs = _controllers()
    if not libs:
        return None
    return max(int(lib.num_threads) for lib in libs)


# Thread counts are process-wide, and regions overlap: a search on one thread while another
# thread trains. The first region to enter saves the counts, the last to leave restores them,
# and every region in between holds BLAS at the smallest limit asked for. Saving and restoring
# per region instead would let an early leaver lift the limit under a region still running,
# and a late one "restore" the limit it found, leaving BLAS at one thread for good.
_regions = 0
_saved: list[tuple[Any, int]] = []
_state_lock = threading.Lock()


@contextlib.contextmanager
def blas_threads(limit: int | None) -> Iterator[None]:
    """Hold BLAS to at most ``limit`` threads for the duration (no-op without threadpoolctl or
    when ``limit`` is None). Safe to nest and to use from several threads at once.

    Search issues many small GEMM/GEMV calls; OpenBLAS splits those over its threads, which
    costs more in synchronisation than it gains, and collapses when another process holds a
    core (we measured a 200-query batch at 168 to 4,625 QPS with 2 BLAS threads on a busy
    machine, a steady ~5,700 with 1). The setting is process-wide while any region runs.
    """
    global _regions, _saved
    if limit is None:
        yield
        return
    libs = _controllers()
    with _state_lock:
        if _regions == 0:
            _saved = [(lib, lib.num_threads) for lib in libs]
        _regions += 1
        for lib in libs:
            if lib.num_threads > limit:
                _set(lib, limit)
    try:
        yield
    finally:
        with _state_lock:
            _regions -= 1
            if _regions == 0:
                for lib, n in _saved:
                    if lib.num_threads != n:
                        _set(lib, n)
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
