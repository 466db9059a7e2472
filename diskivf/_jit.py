"""A compiled scan for single queries, when the optional ``numba`` package is installed.

numpy's path scores each probed list of a single query with one call of its fastest row
kernel (``vecdot``, BLAS's dot once per row), then selects the top k over all candidates
with a few more calls. At nprobe 16 on the 1M x 128 benchmark index the scan took 556 of a
query's 648 us (``python tools/bench_query_split.py INDEX --queries Q.npy --nprobe 16``,
before this module). One compiled loop that scores each row and keeps the k best in a heap
as it goes leaves nothing to select afterwards, and streams the lists faster too: 28.9
against 26.3 GB/s through the maps (``python tools/bench_kernels.py INDEX``, "compiled scan,
maps" against "vecdot, maps"). A query took 0.51 ms in run 55 of ``tools/bench.py`` (README,
Performance).

numba is optional (``pip install 'diskivf[fast]'``): it is imported at the first single query
of a float32 index, not at ``import diskivf``, and compiles the loop once per machine (numba
caches it beside this file, or in its user-wide cache where this file's directory is not
writable). Importing numba and loading the cached loop cost that first query 0.4-0.6 s here
(bench.py logs it as its warm-up single query). Without numba, or with ``DISKIVF_JIT=0`` in
the environment, numpy's path runs. The neighbours are the same but for ties within float32
rounding: the loop sums a row's products in another order than BLAS.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

__all__ = ["NO_ID", "ScanTopK", "scan_topk"]

# The id of a heap slot no row has filled; sorts after every real id among +inf costs.
NO_ID: Final = np.iinfo(np.int64).max

# scan_topk(vectors, query, norms, ids, heap_cost, heap_id): score every row of ``vectors``
# as ``vectors[i] . query + norms[i]`` (``+ 0`` when ``norms`` is empty) and keep the
# ``len(heap_cost)`` lowest (cost, id) pairs in the max-heap ``heap_cost``/``heap_id``.
ScanTopK = Callable[
    [
        NDArray[np.float32],
        NDArray[np.float32],
        NDArray[np.float32],
        NDArray[np.int64],
        NDArray[np.float32],
        NDArray[np.int64],
    ],
    None,
]

_lock = threading.Lock()
_loaded = False
_kernel: ScanTopK | None = None


def scan_topk() -> ScanTopK | None:
    """The compiled kernel, or None without numba (or with ``DISKIVF_JIT=0``, or where numba
    failed to compile it: a warning says so once)."""
    global _loaded, _kernel
    if not _loaded:
        with _lock:
            if not _loaded:
                _kernel = _compile() if os.environ.get("DISKIVF_JIT", "1") != "0" else None
                _loaded = True
    return _kernel


def _compile() -> ScanTopK | None:
    """Compile the kernel for the arrays search passes it, or None (see :func:`scan_topk`)."""
    try:
        import numba
    except ImportError:
        return None
    # Reassociation alone of the fast-math flags: it lets a row's sum use vector lanes, while
    # comparisons keep their meaning for NaN and infinities.
    flags: dict[str, Any] = {"nogil": True, "fastmath": {"reassoc", "contract"}}
    try:
        kernel: ScanTopK
        try:
            kernel = numba.njit(cache=True, **flags)(_scan_topk)
        except RuntimeError:
            # No writable cache directory (beside this file, or numba's user-wide one):
            # compiled for this process alone.
            kernel = numba.njit(**flags)(_scan_topk)
        # Compiled (or loaded from numba's cache) here rather than inside a search, so that a
        # numba that cannot compile it costs single queries their speed, not their answers.
        # Vectors and ids come read-only from the list maps, or writable from memory.
        for writable in (False, True):
            x = np.zeros((2, 2), np.float32)
            ids = np.arange(2, dtype=np.int64)
            x.flags.writeable = ids.flags.writeable = writable
            heap = np.full(1, np.inf, np.float32), np.full(1, NO_ID, np.int64)
            kernel(x, np.zeros(2, np.float32), np.zeros(0, np.float32), ids, *heap)
    except Exception as exc:  # noqa: BLE001 - any numba or LLVM failure: numpy answers
        warnings.warn(
            f"diskivf: numba {getattr(numba, '__version__', '?')} could not compile the "
            f"single-query scan ({type(exc).__name__}: {exc}); single queries take numpy's "
            "path (set DISKIVF_JIT=0 to skip numba)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return kernel


def _scan_topk(
    x: NDArray[np.float32],
    q: NDArray[np.float32],
    norms: NDArray[np.float32],
    ids: NDArray[np.int64],
    heap_cost: NDArray[np.float32],
    heap_id: NDArray[np.int64],
) -> None:
    # Python source for numba, which compiles the loop over rows. LLVM's code for it is
    # fragile: in trials, a test per row for removed rows or for the metric, a rare branch
    # that looked removed rows up, or rows taken in blocks each made the loop stream the
    # lists clearly slower ("compiled scan, maps" in tools/bench_kernels.py measures it). So
    # the loop runs over range(n), an inner-product scan reads a zero norm from one slot
    # (``step`` 0), and the caller gives removed rows an infinite norm.
    n, d = x.shape
    k = heap_cost.shape[0]
    step = 1
    if norms.shape[0] == 0:
        norms = np.zeros(1, np.float32)
        step = 0
    for i in range(n):
        s = np.float32(0.0)
        for j in range(d):
            s += x[i, j] * q[j]
        s += norms[i * step]
        # Ids are read for the few rows that enter, not for every row. A NaN cost (from an
        # overflowed norm) enters neither branch, as numpy's selection drops it too.
        worst = heap_cost[0]
        if not (s < worst or (s == worst and ids[i] < heap_id[0])):
            continue
        row_id = ids[i]
        # Replace the root, the largest (cost, id), and sift the new pair down.
        p = 0
        while True:
            c = 2 * p + 1
            if c >= k:
                break
            r = c + 1
            if r < k and (
                heap_cost[r] > heap_cost[c]
                or (heap_cost[r] == heap_cost[c] and heap_id[r] > heap_id[c])
            ):
                c = r
            if heap_cost[c] > s or (heap_cost[c] == s and heap_id[c] > row_id):
                heap_cost[p] = heap_cost[c]
                heap_id[p] = heap_id[c]
                p = c
            else:
                break
        heap_cost[p] = s
        heap_id[p] = row_id
