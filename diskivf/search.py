"""Pure numpy scoring: probe selection, list scans and top-k merging. No file access.

Every metric is scored internally as a *cost*, smaller is better, so one selection path serves
all of them:

* ``"l2"``: ``cost = ||x||^2 - 2 x.q``; the reported distance adds ``||q||^2`` back (the squared
  Euclidean distance, clamped at 0 against rounding).
* ``"ip"`` and ``"cosine"``: ``cost = -x.q``; the reported value is ``x.q`` (for cosine both sides
  are unit vectors, so it is the cosine similarity).

Lists come from a ``fetch(list_id)`` callable returning :class:`ScanList` or ``None``; the caller
decides whether that is a memory map, an array or anything else with the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "ScanList",
    "ScanStats",
    "coarse_probes",
    "finalize",
    "normalize_rows",
    "search_lists",
    "sqnorms",
]

F32 = NDArray[np.float32]
I64 = NDArray[np.int64]


class ScanList(NamedTuple):
    """What a scan needs from one inverted list."""

    vectors: NDArray[np.generic]  # (count, dim), float32 or float16 (converted per scan)
    ids: I64  # (count,)
    sqnorms: F32 | None  # (count,) squared norms for "l2"; None for inner-product metrics


class ScanStats(NamedTuple):
    """Work done by one search call (per call, summed over its queries)."""

    lists_probed: int  # (query, list) pairs scanned, empty lists included
    lists_read: int  # distinct non-empty lists read
    vectors_scanned: int  # (query, vector) pairs scored
    bytes_read: int  # bytes of vectors and ids read from distinct lists


Fetch = Callable[[int], "ScanList | None"]


def normalize_rows(x: F32) -> F32:
    """Scale each row of ``x`` to unit L2 norm in place (zero rows stay zero); return ``x``."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0] = 1.0
    x /= norms[:, None]
    return x


def sqnorms(x: NDArray[np.generic]) -> F32:
    """Squared L2 norm of each row of ``x`` as float32."""
    xf = np.asarray(x, dtype=np.float32)
    return np.einsum("ij,ij->i", xf, xf)


def _costs(q: F32, x: NDArray[np.generic], norms: F32 | None, out: F32 | None = None) -> F32:
    """Cost matrix ``(len(q), len(x))`` of queries ``q`` against rows ``x``."""
    xf = x if x.dtype == np.float32 else np.asarray(x, dtype=np.float32)
    s: F32 = np.matmul(q, xf.T, out=out)
    if norms is None:
        np.negative(s, out=s)
    else:
        s *= -2.0
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
        return np.broadcast_to(np.arange(s.shape[1]), s.shape)  # type: ignore[return-value]
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


def _search_one(q: F32, probes: I64, fetch: Fetch, k: int) -> tuple[F32, I64, int, int]:
    """One query: score all probed lists into one buffer, then select once.

    Per list this costs a single matrix-vector product; the one selection over all candidates
    replaces ``nprobe`` small ones, which is what dominates single-query latency.
    """
    views = [v for v in map(fetch, probes.tolist()) if v is not None]
    if not views:
        return (np.full((1, k), np.inf, np.float32), np.full((1, k), -1, np.int64), 0, 0)
    sizes = [len(v.ids) for v in views]
    total = sum(sizes)
    buf = np.empty((1, total), np.float32)
    off = 0
    for v, c in zip(views, sizes, strict=True):
        _costs(q, v.vectors, v.sqnorms, out=buf[:, off : off + c])
        off += c
    bounds = np.cumsum(sizes)
    starts = bounds - np.asarray(sizes)

    def ids_at(_row: int, pos: I64) -> I64:
        # Buffer positions -> (list, row) -> id, only for winners and boundary ties.
        which = np.searchsorted(bounds, pos, side="right").tolist()
        return np.fromiter(
            (views[w].ids[p - starts[w]] for w, p in zip(which, pos.tolist(), strict=True)),
            dtype=np.int64,
            count=len(pos),
        )

    sel = _topk_rows(buf, k, ids_at)[0]
    nbytes = sum(v.vectors.nbytes + v.ids.nbytes for v in views)
    return buf[:, sel], ids_at(0, sel)[None, :], total, nbytes


def search_lists(queries: F32, probes: I64, fetch: Fetch, k: int) -> tuple[F32, I64, ScanStats]:
    """Exact top-``k`` (lowest cost) over the probed lists of each query.

    Queries are grouped by list, so each probed list is read once per call and scored against
    all of its queries with one matrix product; each (query, list) pair keeps a partial top-k,
    and a final pass merges ``nprobe * k`` candidates per query.

    Parameters
    ----------
    queries
        ``(n, dim)`` float32, already normalised for cosine.
    probes
        ``(n, nprobe)`` list ids per query.
    fetch
        Returns the :class:`ScanList` of a list id, or ``None`` for an empty list.
    k
        Results per query (>= 1).

    Returns
    -------
    cost, ids, stats
        ``(n, k)`` costs (ascending, ``+inf`` padding) and ids (``-1`` padding).
    """
    n, nprobe = probes.shape
    if n == 1:
        cost, ids, scanned, nbytes = _search_one(queries, probes[0], fetch, k)
        cost, ids = finalize(cost, ids, k)
        nread = len(set(probes[0].tolist()))
        return cost, ids, ScanStats(nprobe, nread, scanned, nbytes)

    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    lists_sorted = flat[order]
    cuts = np.flatnonzero(np.diff(lists_sorted)) + 1
    starts = np.concatenate([[0], cuts]).tolist()
    ends = np.concatenate([cuts, [flat.size]]).tolist()

    width = k
    cand_cost = np.full((flat.size, width), np.inf, np.float32)
    cand_ids = np.full((flat.size, width), -1, np.int64)
    scanned = nread = nbytes = 0
    for a, b in zip(starts, ends, strict=True):
        view = fetch(int(lists_sorted[a]))
        if view is None:
            continue
        slots = order[a:b]  # (query, probe) slots that probe this list
        s = _costs(queries[slots // nprobe], view.vectors, view.sqnorms)
        part = _topk_rows(s, k, lambda _r, cols, ids=view.ids: ids[cols])
        kk = part.shape[1]
        cand_cost[slots, :kk] = np.take_along_axis(s, part, axis=1)
        cand_ids[slots, :kk] = view.ids[part]
        scanned += s.size
        nread += 1
        nbytes += view.vectors.nbytes + view.ids.nbytes
    cost, ids = finalize(
        cand_cost.reshape(n, nprobe * width), cand_ids.reshape(n, nprobe * width), k
    )
    return cost, ids, ScanStats(flat.size, nread, scanned, nbytes)
