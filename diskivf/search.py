"""Pure numpy scoring: probe selection, list scans and top-k merging. No file access.

Every metric is scored internally as a *cost*, smaller is better, so one selection path serves
all of them:

* ``"l2"``: ``cost = ||x||^2 - 2 x.q``; the reported distance adds ``||q||^2`` back (the squared
  Euclidean distance, clamped at 0 against rounding).
* ``"ip"`` and ``"cosine"``: ``cost = -x.q``; the reported value is ``x.q`` (for cosine both sides
  are unit vectors, so it is the cosine similarity).

Lists come from a ``fetch(list_id)`` callable returning :class:`ScanList` or ``None``; the caller
decides whether that is a memory map, an array or anything else with the same shape. A single
query takes all its probed lists from one ``fetch_many(list_ids)`` call (:data:`FetchMany`).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol, TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from diskivf import _blas, _jit

__all__ = [
    "ScanList",
    "ScanStats",
    "coarse_probes",
    "fetch_each",
    "finalize",
    "normalize_rows",
    "search_lists",
    "search_one",
    "sqnorms",
]

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]


class ScanList(NamedTuple):
    """What a scan needs from one inverted list."""

    vectors: NDArray[np.generic]  # (count, dim), float32 or float16 (converted per scan)
    ids: I64  # (count,)
    sqnorms: F32 | None  # (count,) squared norms for "l2"; None for inner-product metrics
    removed: I64 | None = None  # rows removed from search (tombstones), or None


class ScanStats(NamedTuple):
    """Work done by one search call (per call, summed over its queries)."""

    lists_probed: int  # (query, list) pairs scanned, empty lists included
    lists_read: int  # distinct non-empty lists read
    vectors_scanned: int  # (query, vector) pairs scored
    bytes_read: int  # bytes of vectors and ids read from distinct lists


Fetch = Callable[[int], "ScanList | None"]
# The non-empty lists among some list ids, in their order, and the rows each holds. A single
# query asks for all its probed lists in one call: cheaper than one call per list on a path
# whose every step meets CPU caches the previous scan flushed.
FetchMany = Callable[[list[int]], tuple[list["ScanList"], list[int]]]


def fetch_each(fetch: Fetch) -> FetchMany:
    """A :data:`FetchMany` that asks ``fetch`` for one list after the other."""

    def fetch_many(list_ids: list[int]) -> tuple[list[ScanList], list[int]]:
        views = [v for v in map(fetch, list_ids) if v is not None]
        return views, [len(v.ids) for v in views]

    return fetch_many


# numpy 2's vecdot scores each row with BLAS's dot, which keeps up with memory better than
# einsum's row kernel: 16.2-16.6 against 13.7-14.3 GB/s of list data through the maps of the
# 1M x 128 benchmark index (python tools/bench_kernels.py INDEX).
_VECDOT: Callable[..., F32] | None = getattr(np, "vecdot", None)


def normalize_rows(x: F32) -> F32:
    """Scale each row of ``x`` to unit L2 norm in place (zero rows stay zero); return ``x``.

    The norms are computed in float64: a float32 row of values around 1e-23 has a squared norm
    below float32's range, which would leave it unscaled (cosine does not depend on scale).
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return x


def sqnorms(x: NDArray[np.generic]) -> F32:
    """Squared L2 norm of each row of ``x`` as float32."""
    xf = np.asarray(x, dtype=np.float32)
    out: F32 = _VECDOT(xf, xf) if _VECDOT is not None else np.einsum("ij,ij->i", xf, xf)
    return out


RowKernel = Callable[[NDArray[Any], F32, F32], object]


def _einsum_rows(x: NDArray[Any], qs: F32, out: F32) -> None:
    np.einsum("ij,j->i", x, qs, out=out)  # numpy < 2


def _row_kernel(streamed: bool) -> RowKernel:
    """``kernel(x, qs, out)`` sets ``out[i] = x[i] . qs`` for float32 rows ``x`` and one query.

    BLAS's matrix-vector product where BLAS's threads can be held to one (the caller's
    region; ``Index.search`` holds one around every search), unless ``streamed`` says the rows
    come from memory rather than the CPU's caches (see :func:`streams_rows`): numpy 2's
    ``vecdot`` then. Without threadpoolctl a GEMV would run on all of BLAS's threads, so
    numpy's row kernel scores instead. GEMV and ``vecdot`` are numpy's own callables, with no
    Python frame of their own: a single query calls one per probed list.
    """
    if _blas.can_limit() and not (streamed and _VECDOT is not None):
        return np.dot
    return _VECDOT if _VECDOT is not None else _einsum_rows


def _row_costs(x: F32, qs: F32, norms: F32 | None, out: F32, *, streamed: bool = False) -> None:
    """``out[i] = x[i] . qs (+ norms[i])`` with the kernel :func:`_row_kernel` picks."""
    _row_kernel(streamed)(x, qs, out)
    if norms is not None:
        out += norms  # while the rows' costs are still in cache


# numpy's row kernel calls BLAS's dot once per row. OpenBLAS runs its float32 dot on one
# thread and splits its float64 dot over threads only above 10,000 elements: rows up to
# this length never start BLAS's threads. (python tools/bench_kernels.py, last line: 200,000
# float64 elements take 18 us with BLAS's threads free against 31 held to one; float32 15
# either way.)
SERIAL_DOT_MAX_DIM: Final = 10_000

# Rows this wide or wider are streamed faster by the row kernel; at 64 dimensions and fewer
# its call per row costs more than memory does (python tools/bench_kernels.py INDEX,
# "streamed": 0.73x GEMV's speed at 32 dimensions from 512 MB, 1.00x at 64, 1.06x at 96).
_STREAM_MIN_DIM = 96


def streams_rows(
    vector_bytes: int, dim: int, dtype: np.dtype[np.generic], cache_bytes: int
) -> bool:
    """Whether one query's lists are better scored with numpy 2's ``vecdot`` than with GEMV.

    Lists of an index holding more float32 vectors (``vector_bytes``) than the CPU's
    last-level cache (``cache_bytes``) come from memory. There BLAS's dot, one call per row,
    streams rows of 96 dimensions or more faster than GEMV, whose kernel works on four rows
    at once: 25.3 against 21.8 GB/s through the maps of the 1M x 128 benchmark index, and
    1.02-1.09x from anonymous memory beyond 32 MB at 128 dimensions, 1.10-1.27x at 256-960
    (python tools/bench_kernels.py INDEX). From cache GEMV is faster (1.5x at 128 dimensions
    within 8 MB), so a smaller index keeps it. float16 lists are converted into a fresh,
    cached, array first: they keep GEMV too.
    """
    return (
        _VECDOT is not None
        and dtype == np.float32
        and dim >= _STREAM_MIN_DIM
        and vector_bytes > cache_bytes
    )


# Up to this many queries, a product puts the rows (a list, or the centroids) on BLAS's left
# against the queries as one contiguous (dim, m) block and transposes the small result:
# OpenBLAS's kernels for that shape stream a list through its maps 1.1-2.1x as fast as for
# (queries x rows) with the rows transposed (python tools/bench_kernels.py, "GEMM list left"
# against "GEMM", 2-64 queries). Above it the transposing copy costs more than it saves.
_LIST_LEFT_MAX_QUERIES = 64


def _costs(q: F32, x: NDArray[np.generic], norms: F32 | None, *, streamed: bool = False) -> F32:
    """Cost matrix ``(len(q), len(x))`` of queries ``q`` against rows ``x``; ``streamed`` as
    in :func:`_row_costs`, for one query."""
    xf: F32 = np.asarray(x, dtype=np.float32)  # a float16 list converts here
    # Scaling the few query rows by -2 (l2) or -1 (ip) instead of the (queries x rows) result
    # saves a pass over it, with the same bits: a power-of-two scale is exact.
    qs = q * np.float32(-1.0 if norms is None else -2.0)
    s: F32
    if len(q) == 1:  # lists probed by one query of a batch: the single-query kernel
        s = np.empty((1, len(xf)), np.float32)
        _row_costs(xf, qs[0], norms, s[0], streamed=streamed and xf is x)
        return s
    if len(q) <= _LIST_LEFT_MAX_QUERIES:
        left = np.matmul(xf, np.ascontiguousarray(qs.T))
        s = np.empty((len(q), len(xf)), np.float32)
        if norms is None:
            np.copyto(s, left.T)
        else:
            np.add(left.T, norms, out=s)  # the transposing copy adds the norms too
        return s
    s = np.matmul(qs, xf.T)
    if norms is not None:
        s += norms
    return s


def coarse_probes(queries: F32, centroids: F32, centroid_sqnorms: F32 | None, nprobe: int) -> I64:
    """The ``nprobe`` lowest-cost lists per query, shape ``(n, nprobe)``, nearest first.

    ``centroid_sqnorms`` is given for ``"l2"`` and ``None`` for inner-product metrics (the
    same cost convention as list scans).
    """
    nlist = centroids.shape[0]
    s = _costs(queries, centroids, centroid_sqnorms)
    if nprobe >= nlist:
        part = np.broadcast_to(np.arange(nlist), s.shape)
    else:
        part = np.argpartition(s, nprobe - 1, axis=1)[:, :nprobe]
    # Nearest first, so a caller that stops early probes the best lists.
    order = np.argsort(np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.ascontiguousarray(np.take_along_axis(part, order, axis=1), dtype=np.int64)


RowIds = Callable[[int, I64], I64]


def _topk_rows(s: F32, k: int, row_ids: RowIds) -> I64:
    """Column indices of the ``k`` smallest entries of each row (unordered); all if fewer.

    Ties at the k-th value are broken by id (``row_ids(row, columns)`` gives the ids), so which
    of several equidistant vectors is returned never depends on list order or partition
    internals: duplicates are common in real collections, and sharded search relies on it.
    """
    if s.shape[1] <= k:
        return np.broadcast_to(np.arange(s.shape[1]), s.shape)
    part = np.argpartition(s, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(s, part, axis=1).max(axis=1, keepdims=True)
    # Only a row with more than k entries <= its k-th value needs the tie-breaking pass.
    tied = np.flatnonzero(np.count_nonzero(s <= kth, axis=1) > k)
    for r in tied.tolist():  # rows, not vectors: rare, and each is one small sort
        cand = np.flatnonzero(s[r] <= kth[r, 0])
        order = np.lexsort((row_ids(r, cand), s[r, cand]))[:k]
        part[r] = cand[order]
    return part


def finalize(cost: F32, ids: I64, k: int) -> tuple[F32, I64]:
    """Sort each row's candidates by (cost, id) and keep ``k``; pad with (+inf, -1).

    Candidates with id ``-1`` must carry cost ``+inf``; they sort after every real candidate.
    """
    n, m = cost.shape
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)  # padding last among +inf ties
    if m > k:
        part = _topk_rows(cost, k, lambda r, cols: key[r, cols])
        cost = np.take_along_axis(cost, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
        key = np.take_along_axis(key, part, axis=1)
    elif m < k:
        pad = k - m
        cost = np.concatenate([cost, np.full((n, pad), np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((n, pad), -1, np.int64)], axis=1)
        key = np.concatenate([key, np.full((n, pad), np.iinfo(np.int64).max)], axis=1)
    order = np.lexsort((key, cost), axis=1)
    return np.take_along_axis(cost, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _groups(list_ids: I64) -> tuple[I64, list[int], list[int], list[int]]:
    """Group positions of ``list_ids`` by value: (order, list id, start, end) per group."""
    order = np.argsort(list_ids, kind="stable")
    sorted_ids = list_ids[order]
    cuts = np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1
    starts = [0, *cuts.tolist()]
    ends = [*cuts.tolist(), len(order)]
    return order, sorted_ids[starts].tolist(), starts, ends


def _sortable(cost: F32) -> NDArray[np.uint64]:
    """Map float32 costs to uint64 keys with the same order (IEEE-754 bit trick)."""
    bits = np.ascontiguousarray(cost, dtype=np.float32).view(np.uint32)
    flip = np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    return (bits ^ flip).astype(np.uint64)


_RUNS_PER_THREAD = 4


def search_one(
    q: NDArray[np.float32],
    centroids: F32,
    centroid_sqnorms: F32 | None,
    nprobe: int,
    fetch_many: FetchMany,
    k: int,
    *,
    prefetch: Callable[[list[int]], list[int]] | None = None,
    threads: int = 1,
    parallel: Parallel | None = None,
    split: Callable[[int], bool] | None = None,
    streamed: bool = False,
    unthreaded: bool = False,
    jit: _jit.ScanTopK | None = None,
) -> tuple[F32, I64, ScanStats]:
    """Probe selection and scan for a single query ``q`` of shape ``(dim,)``.

    A single query has no batch to amortise per-call overhead over, so this path is kept
    short: one matrix-vector product for the probes, one per list into a shared buffer, and
    one selection over all candidates. Results match :func:`search_lists` for the same probes.
    ``fetch_many`` gives the probed lists (:func:`fetch_each` makes one of a :data:`Fetch`).
    With ``threads > 1`` and ``parallel``, the probed lists are split into runs of about
    equal rows (a few per thread), scored at once, if ``split(nbytes)`` says so for the bytes
    of vectors they hold: one core alone cannot draw all of the machine's memory bandwidth. Each
    product is the same call either way, so the result does not depend on the split.
    ``prefetch(probes)`` is told the probes before any is fetched and returns those it has
    just started reading in; they are fetched and scored last, one at a time (never split).
    ``streamed`` picks the row kernel for the lists (see :func:`streams_rows`); the
    centroids, read by every query, are scored with GEMV, unless ``unthreaded``: the caller
    then holds no BLAS region (see :func:`diskivf._blas.blas_threads`), and the row kernel,
    whose BLAS dot runs on one thread for rows of up to :data:`SERIAL_DOT_MAX_DIM`, scores
    them too. It needs ``streamed`` lists of float32.
    ``jit`` (:func:`diskivf._jit.scan_topk`, for float32 lists) scores the lists and selects
    the top ``k`` in one compiled loop instead (:func:`_search_one_jit`).
    """
    l2 = centroid_sqnorms is not None
    # Scale the query once so each product is the cost itself: -2 x.q for l2, -x.q for ip.
    qv = q * np.float32(-2.0 if l2 else -1.0)
    nlist = len(centroids)
    cc = np.empty(nlist, np.float32)
    _row_costs(centroids, qv, centroid_sqnorms, cc, streamed=unthreaded)
    # Nearest probe first: its k-th cost bounds the selection below.
    if nprobe >= nlist:
        plist = np.arange(nlist).tolist()
        first = int(cc.argmin())
        plist[0], plist[first] = first, 0
    elif nprobe == 1:
        plist = [int(cc.argmin())]
    else:  # partitioning at 0 as well puts the nearest first, for no extra pass
        # ndarray methods here and in the bound below rather than numpy's functions, whose
        # Python wrappers cost microseconds on this path, where each call meets caches a scan
        # flushed. (The rarer second partition keeps the function.)
        plist = cc.argpartition((0, nprobe - 1))[:nprobe].tolist()
    fresh = prefetch(plist) if prefetch is not None else []
    if jit is not None:
        return _search_one_jit(plist, fresh, fetch_many, qv, k, jit, threads, parallel, split)
    removed: bool | None = None
    if fresh:
        # Lists being read in now: fetch and score one at a time, resident lists first, so
        # their work overlaps the reads and each fresh list is scored while its norms pass
        # has left it in cache. The nearest list stays first unless it is one of them.
        late = set(fresh)
        ordered = [p for p in plist if p not in late] + [p for p in plist if p in late]
        views, sizes, buf, removed = _fetch_scored(ordered, fetch_many, qv, streamed)
    else:
        views, sizes = fetch_many(plist)
    if not views:
        return _padding(1, k), np.full((1, k), -1, np.int64), ScanStats(len(plist), 0, 0, 0)
    starts = list(itertools.accumulate(sizes, initial=0))
    total = starts[-1]
    if removed is None:
        buf = np.empty(total, np.float32)
        kernel = _row_kernel(streamed)  # once per query, not per list

        def score(positions: list[int]) -> bool:
            """Costs of the lists at ``positions`` of ``views`` into ``buf``; any removed?"""
            found = False
            for i in positions:  # lists, not vectors
                found |= _score_list(views[i], qv, buf[starts[i] : starts[i + 1]], kernel)
            return found

        if parallel is not None and split is not None:
            # Several runs per thread, taken one at a time by whichever thread is free: a
            # worker that wakes late then leaves fewer rows to the others' wait
            # (python tools/bench_single.py --always-split: 1.49-1.59x one thread at
            # nprobe 64 with 4 runs per thread, 1.19-1.46x with 1).
            parts = _RUNS_PER_THREAD * threads
            # Asked only when the lists do fall into several runs, so that a timing taken as
            # one of a split is one; the runs are cut only once a split is chosen.
            if _several_runs(starts, parts) and split(total * _row_bytes(views[0])):
                removed = any(parallel(score, _balanced_runs(starts, parts)))
        if removed is None:
            removed = score(list(range(len(views))))
    if total > k:
        # Select everything <= the k-th value (exactly k entries unless a tie straddles the
        # k-th place; the id decides ties below). Rather than partition all candidates, the
        # nearest list's k-th cost, an upper bound, filters them with one comparison and
        # only the survivors are partitioned.
        if sizes[0] >= k:
            bound = buf[: sizes[0]].copy()
            bound.partition(k - 1)
            cand = (buf <= bound[k - 1]).nonzero()[0]
        else:
            cand = np.arange(total)
        # Exactly k survivors (one list, or the nearest list holding the whole top k, which it
        # often does) are the answer already: a second partition would find the same.
        sel = cand if len(cand) == k else cand[buf[cand] <= np.partition(buf[cand], k - 1)[k - 1]]
    else:
        sel = np.arange(total)
    cost = buf[sel]
    ids = _ids_at(views, starts, sel)
    if removed:
        ids[np.isposinf(cost)] = -1  # removed rows that filled a short result
    order = np.lexsort((ids, cost))[:k]
    stats = _one_query_stats(plist, views, total)
    if len(order) == k:
        return cost[order][None, :], ids[order][None, :], stats
    out_cost, out_ids = _padding(1, k), np.full((1, k), -1, np.int64)
    out_cost[0, : len(order)] = cost[order]
    out_ids[0, : len(order)] = ids[order]
    return out_cost, out_ids, stats


_NO_NORMS: Final = np.empty(0, np.float32)


def _search_one_jit(
    plist: list[int],
    fresh: list[int],
    fetch_many: FetchMany,
    qv: F32,
    k: int,
    jit: _jit.ScanTopK,
    threads: int,
    parallel: Parallel | None,
    split: Callable[[int], bool] | None,
) -> tuple[F32, I64, ScanStats]:
    """:func:`search_one` past its probes, each list scored and its rows offered to a top-``k``
    heap by ``jit`` (same selection: the ``k`` lowest (cost, id) pairs)."""

    removed = False

    def new_heap() -> tuple[F32, I64]:
        return np.full(k, np.inf, np.float32), np.full(k, _jit.NO_ID, np.int64)

    def scan(views: list[ScanList], heap: tuple[F32, I64]) -> tuple[F32, I64]:
        """Offer every row of ``views`` to ``heap``; returns it."""
        nonlocal removed
        for v in views:  # lists, not vectors
            x, n = v.vectors, len(v.ids)
            norms = _NO_NORMS if v.sqnorms is None else v.sqnorms
            # The compiled loop has no bounds checks: shapes that disagree must not reach it.
            if x.dtype != np.float32 or x.shape != (n, len(qv)) or len(norms) not in (0, n):
                raise ValueError(
                    f"expected float32 vectors of shape ({n}, {len(qv)}) and {n} norms but "
                    f"got {x.dtype} vectors of shape {x.shape} and {len(norms)} norms"
                )
            if v.removed is not None:
                # An infinite norm keeps a removed row out, unless the result is short.
                norms = np.zeros(n, np.float32) if v.sqnorms is None else norms.copy()
                norms[v.removed] = np.inf
                removed = True
            jit(cast("F32", x), qv, norms, v.ids, *heap)
        return heap

    heaps: list[tuple[F32, I64]] = []
    if fresh:
        # As in search_one: lists being read in now go last, fetched and scored one at a time.
        late = set(fresh)
        heaps.append(new_heap())
        views, sizes = [], []
        for lid in [p for p in plist if p not in late] + [p for p in plist if p in late]:
            got, got_sizes = fetch_many([lid])
            scan(got, heaps[0])
            views += got
            sizes += got_sizes
    else:
        views, sizes = fetch_many(plist)
        starts = list(itertools.accumulate(sizes, initial=0))
        if parallel is not None and split is not None and views:
            parts = _RUNS_PER_THREAD * threads
            if _several_runs(starts, parts) and split(starts[-1] * _row_bytes(views[0])):
                runs = _balanced_runs(starts, parts)
                heaps = parallel(lambda run: scan([views[i] for i in run], new_heap()), runs)
        if not heaps:
            heaps.append(scan(views, new_heap()))
    if not views:
        return _padding(1, k), np.full((1, k), -1, np.int64), ScanStats(len(plist), 0, 0, 0)
    cost = np.concatenate([h[0] for h in heaps]) if len(heaps) > 1 else heaps[0][0]
    ids = np.concatenate([h[1] for h in heaps]) if len(heaps) > 1 else heaps[0][1]
    order = np.lexsort((ids, cost))[:k]
    cost, ids = cost[order], ids[order]
    ids[ids == _jit.NO_ID] = -1  # slots no row filled: padding, cost +inf
    if removed:
        ids[np.isposinf(cost)] = -1  # removed rows that filled a short result
    return cost[None, :], ids[None, :], _one_query_stats(plist, views, sum(sizes))


def _row_bytes(v: ScanList) -> int:
    """Bytes of one stored vector of ``v``."""
    return int(v.vectors.itemsize * v.vectors.shape[1])


def _one_query_stats(plist: list[int], views: list[ScanList], total: int) -> ScanStats:
    """A single query's stats: ``plist`` probed, ``views`` read, ``total`` rows scored (and
    each row's id, 8 bytes, counted as read)."""
    return ScanStats(len(plist), len(views), total, total * (_row_bytes(views[0]) + 8))


def _score_list(v: ScanList, qv: F32, out: F32, kernel: RowKernel) -> bool:
    """Costs of list ``v`` against the scaled query ``qv`` into ``out`` with ``kernel`` (of
    :func:`_row_kernel`); any rows removed?"""
    x = v.vectors
    if x.dtype == np.float32:
        kernel(x, qv, out)
    else:  # float16 converts into a fresh array, in cache: never streamed
        _row_kernel(False)(x.astype(np.float32), qv, out)
    if v.sqnorms is not None:
        out += v.sqnorms  # while the rows' costs are still in cache
    if v.removed is None:
        return False
    out[v.removed] = np.inf
    return True


def _fetch_scored(
    plist: list[int], fetch_many: FetchMany, qv: F32, streamed: bool
) -> tuple[list[ScanList], list[int], F32, bool]:
    """Fetch and score the lists of ``plist`` in turn: the non-empty views, their rows, their
    costs end to end, and whether any rows were removed."""
    views: list[ScanList] = []
    sizes: list[int] = []
    segs: list[F32] = []
    removed = False
    kernel = _row_kernel(streamed)
    for lid in plist:  # lists, not vectors
        for v, n in zip(*fetch_many([lid]), strict=True):
            segs.append(np.empty(n, np.float32))
            removed |= _score_list(v, qv, segs[-1], kernel)
            views.append(v)
            sizes.append(n)
    buf = segs[0] if len(segs) == 1 else np.concatenate(segs or [np.empty(0, np.float32)])
    return views, sizes, buf, removed


def _balanced_runs(starts: list[int], parts: int) -> list[list[int]]:
    """Split positions ``0..len(starts)-2`` into at most ``parts`` consecutive runs of about
    equal rows, where item ``i`` holds rows ``starts[i]:starts[i + 1]``; no run is empty.

    :func:`_several_runs` tells whether there is more than one without cutting them.
    """
    n, total = len(starts) - 1, starts[-1]
    cuts = {bisect.bisect_left(starts, total * j / parts) for j in range(1, parts)}
    bounds = sorted({0, n} | {c for c in cuts if 0 < c < n})
    return [list(range(a, b)) for a, b in itertools.pairwise(bounds)]


def _several_runs(starts: list[int], parts: int) -> bool:
    """Whether :func:`_balanced_runs` of ``starts`` into ``parts`` gives more than one run.

    Its first cut is at the first item starting at or after ``total / parts``; there is one
    inside the items unless the last item starts before that.
    """
    total = starts[-1]
    return parts > 1 and len(starts) > 2 and total > 0 and starts[-2] * parts >= total


def _padding(n: int, k: int) -> F32:
    return np.full((n, k), np.inf, np.float32)


def _ids_at(views: list[ScanList], starts: list[int], pos: I64) -> I64:
    """Ids at ascending positions ``pos`` of the concatenation of ``views``' lists, list ``i``
    starting at ``starts[i]``."""
    # One gather per list holding a winner, found in Python: the winners are few (k and
    # ties) and, right after a scan has flushed the caches, each numpy call costs several
    # times its usual overhead. Often they all lie in the first (nearest) list.
    at = pos.tolist() if len(views) > 1 else []
    if not at or at[-1] < starts[1]:
        return np.asarray(views[0].ids[pos], dtype=np.int64)
    out = np.empty(len(pos), np.int64)
    a = 0
    while a < len(at):  # lists holding winners, not vectors
        i = bisect.bisect_right(starts, at[a]) - 1
        b = bisect.bisect_left(at, starts[i + 1], a)
        out[a:b] = views[i].ids[pos[a:b] - starts[i]]
        a = b
    return out


_T = TypeVar("_T")


class Parallel(Protocol):
    """Runs ``fn`` on every chunk, possibly at once on several threads; results in order."""

    def __call__(self, fn: Callable[[list[int]], _T], chunks: list[list[int]]) -> list[_T]: ...


def _serial(fn: Callable[[list[int]], _T], chunks: list[list[int]]) -> list[_T]:
    return [fn(c) for c in chunks]


@dataclass
class _Partial:
    """Survivors and counters of one worker's share of a pass."""

    cost: list[F32] = field(default_factory=list)
    qidx: list[I64] = field(default_factory=list)
    ids: list[I64] = field(default_factory=list)
    read: set[int] = field(default_factory=set)
    scanned: int = 0
    nbytes: int = 0


def _scan_pass(
    queries: F32,
    list_of_slot: I64,
    per_query: int,
    tau: F32,
    k: int,
    fetch: Fetch,
    set_tau: bool,
    run: Parallel,
    threads: int,
    streamed: bool,
) -> list[_Partial]:
    """Scan every list named in ``list_of_slot`` once against the queries whose slots name it.

    Slot ``j`` belongs to query ``j // per_query``. Lists are dealt round-robin to ``threads``
    workers; each writes ``tau`` only for its own queries (a query's nearest list is one list),
    so workers never write the same entry.
    """
    order, lids, starts, ends = _groups(list_of_slot)

    def work(group_numbers: list[int]) -> _Partial:
        part = _Partial()
        for g in group_numbers:
            view = fetch(lids[g])
            if view is None:
                continue
            qs = order[starts[g] : ends[g]] // per_query
            s = _costs(queries[qs], view.vectors, view.sqnorms, streamed=streamed)
            if view.removed is not None:
                s[:, view.removed] = np.inf
            if set_tau and s.shape[1] >= k:
                tau[qs] = np.partition(s, k - 1, axis=1)[:, k - 1]
            hit = np.flatnonzero(s <= tau[qs][:, None])
            c = s.shape[1]
            part.cost.append(s.ravel()[hit])
            part.qidx.append(qs[hit // c])
            part.ids.append(view.ids[hit % c])
            part.read.add(lids[g])
            part.scanned += s.size
            part.nbytes += view.vectors.nbytes + view.ids.nbytes
        return part

    nthreads = max(1, min(threads, len(lids)))
    return run(work, [list(range(t, len(lids), nthreads)) for t in range(nthreads)])


def search_lists(
    queries: F32,
    probes: I64,
    fetch: Fetch,
    k: int,
    *,
    threads: int = 1,
    parallel: Parallel | None = None,
    streamed: bool = False,
) -> tuple[F32, I64, ScanStats]:
    """Exact top-``k`` (lowest cost) over the probed lists of each query.

    Queries are grouped by list, so each probed list is read once per call and scored against
    all of its queries with one matrix product. Selection avoids one partial sort per
    (query, list) pair, which would dominate the cost: a first pass over each query's nearest
    list gives a bound ``tau`` (its k-th best cost there); the main pass keeps only candidates
    ``<= tau`` (one vectorised comparison per list) and a final sort over the few survivors
    picks each query's top-k. Every candidate at or below the true k-th cost survives, so
    the result is exact over the probed lists, ties broken by id.

    Parameters
    ----------
    queries
        ``(n, dim)`` float32, already normalised for cosine.
    probes
        ``(n, nprobe)`` distinct list ids per query, nearest first.
    fetch
        Returns the :class:`ScanList` of a list id, or ``None`` for an empty list.
    k
        Results per query (>= 1).
    threads, parallel
        Split each pass's lists among ``threads`` workers run by ``parallel(fn, chunks)``
        (for example a thread pool's ``map``); numpy releases the GIL in BLAS and sorting.
    streamed
        Score lists that one query probes with the row kernel for lists streamed from
        memory (see :func:`streams_rows`).

    Returns
    -------
    cost, ids, stats
        ``(n, k)`` costs (ascending, ``+inf`` padding) and ids (``-1`` padding).
    """
    n, nprobe = probes.shape
    tau = np.full(n, np.inf, np.float32)
    run = parallel if parallel is not None else _serial
    parts: list[_Partial] = []
    # Pass 1: each query's nearest list sets tau (its k-th best cost there). Each (query, list)
    # cost is computed once: a recomputation with another batch shape may round differently
    # and fall just above tau.
    parts += _scan_pass(queries, probes[:, 0], 1, tau, k, fetch, True, run, threads, streamed)
    # Pass 2: the other probes, each list once, keeping candidates <= tau of their query.
    if nprobe > 1:
        other = probes[:, 1:].ravel()
        parts += _scan_pass(
            queries, other, nprobe - 1, tau, k, fetch, False, run, threads, streamed
        )
    read: set[int] = set().union(*(p.read for p in parts))
    stats = ScanStats(
        probes.size, len(read), sum(p.scanned for p in parts), sum(p.nbytes for p in parts)
    )
    keep_cost = [c for p in parts for c in p.cost]
    keep_q = [c for p in parts for c in p.qidx]
    keep_id = [c for p in parts for c in p.ids]
    if not keep_cost:
        return np.full((n, k), np.inf, np.float32), np.full((n, k), -1, np.int64), stats
    cost = np.concatenate(keep_cost)
    qidx = np.concatenate(keep_q)
    ids = np.concatenate(keep_id)
    # Sort survivors by (query, cost) with one integer key, then take each query's first k.
    srt = np.argsort((qidx.astype(np.uint64) << np.uint64(32)) | _sortable(cost))
    cost, qidx, ids = cost[srt], qidx[srt], ids[srt]
    counts = np.bincount(qidx, minlength=n)
    first = np.cumsum(counts) - counts
    width = min(k + 1, int(counts.max()))
    pos = first[:, None] + np.arange(width)
    valid = np.arange(width) < counts[:, None]
    pos = np.where(valid, pos, 0)
    out_cost = np.where(valid, cost[pos], np.float32(np.inf))
    out_ids = np.where(valid, ids[pos], -1)
    # width = k + 1 exposes a tie across the k-th boundary; finalize() resolves it by id
    # only for those rows. Rows with more tied survivors than k + 1 need their whole run.
    if width > k:
        run = (counts > k + 1) & (out_cost[:, k] == out_cost[:, k - 1])
        for r in np.flatnonzero(run).tolist():
            seg = slice(int(first[r]), int(first[r] + counts[r]))
            top = np.lexsort((ids[seg], cost[seg]))[:k]
            out_cost[r, :k], out_ids[r, :k] = cost[seg][top], ids[seg][top]
            out_cost[r, k], out_ids[r, k] = np.inf, -1
    out_ids[np.isposinf(out_cost)] = -1  # removed rows that filled a short result
    out_cost, out_ids = finalize(out_cost, out_ids, k)
    return out_cost, out_ids, stats
