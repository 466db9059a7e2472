"""Merge indexes that share centroids into one new index (``diskivf merge``).

Indexes share centroids when their trained metadata hashes are equal
(:func:`diskivf.format.trained_hash`: same ``dim``, ``nlist``, metric, dtype and centroid
bytes); for example the outputs of several builds whose indexes were given the same centroids
with :meth:`diskivf.Index.set_centroids`. Their lists then line up one to one, so merging is a
concatenation of list files: list ``i`` of the output holds the live rows of list ``i`` of the
first input, then of the second, and so on, in input order. Removed rows are dropped. Nothing
is re-assigned, so a merge costs one sequential read and write of the data.

The merge runs as :class:`diskivf.parallel.MergeTask` work items over ranges of lists, through
any :class:`concurrent.futures.Executor` (None: serially here), and the caller alone commits.

Ids
---
Each input's ids are kept, plus an optional per-input offset. Without offsets, an id present in
two inputs is an error (unless ``allow_duplicate_ids``), because a merged index would then
return both vectors under one id. ``id_offsets="auto"`` shifts input ``i`` by the sum of the
``next_id`` (one past the largest id ever added) of the inputs before it, so ids never collide
and stay in the order of the inputs; this is FAISS's usual ``merge_from`` recipe.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from diskivf import format as fmt
from diskivf.errors import NotTrainedError
from diskivf.index import open_index
from diskivf.parallel import (
    IndexSource,
    MergeTask,
    commit_merged,
    merge_lists,
    plan_list_ranges,
    run_tasks,
)
from diskivf.segments import ListReader

__all__ = ["IdOffsets", "MergeReport", "merge_indexes"]

#: ``None`` (keep ids), ``"auto"`` (cumulative ``next_id`` offsets) or one offset per input.
IdOffsets = Literal["auto"] | Sequence[int] | None


@dataclass(frozen=True)
class MergeReport:
    """What one :func:`merge_indexes` call did.

    Attributes
    ----------
    path : str
        The new index.
    inputs : tuple of str
        The merged indexes, in order.
    id_offsets : tuple of int
        The offset added to the ids of each input.
    ntotal : int
        Vectors in the new index.
    dropped : int
        Removed rows of the inputs that were not carried over.
    tasks, retries : int
        Merge tasks, and failed attempts that were retried.
    elapsed_s : float
        Wall time.
    """

    path: str
    inputs: tuple[str, ...]
    id_offsets: tuple[int, ...]
    ntotal: int
    dropped: int
    tasks: int
    retries: int
    elapsed_s: float

    def summary(self) -> str:
        """One line for humans."""
        offsets = "" if not any(self.id_offsets) else f", id offsets {list(self.id_offsets)}"
        dropped = f", {self.dropped:,} removed rows dropped" if self.dropped else ""
        return (
            f"merged {len(self.inputs)} indexes into {self.path}: {self.ntotal:,} vectors"
            f"{offsets}{dropped} ({self.tasks} tasks, {self.elapsed_s:.2f} s)"
        )


@dataclass(frozen=True)
class _Snapshot:
    path: str
    meta: fmt.Metadata
    rec: fmt.CommitRecord

    def live_counts(self) -> NDArray[np.int64]:
        counts = self.rec.list_counts.copy()
        np.subtract.at(counts, self.rec.tombstones >> fmt.ROW_BITS, 1)
        return counts

    def live_ids(self) -> Iterator[NDArray[np.int64]]:
        """The live ids, one array per non-empty list."""
        reader = ListReader(Path(self.path), self.meta.dim, self.meta.vector_dtype)
        t = self.rec.tombstones
        for lid in np.flatnonzero(self.rec.list_counts).tolist():
            view = reader.get(lid, int(self.rec.list_counts[lid]), int(self.rec.list_gens[lid]))
            if view is None:  # pragma: no cover - the count is non-zero
                continue
            ids = np.array(view.ids, dtype=np.int64)
            a, b = np.searchsorted(t, [lid << fmt.ROW_BITS, (lid + 1) << fmt.ROW_BITS])
            if b > a:
                keep = np.ones(len(ids), bool)
                keep[t[a:b] & ((1 << fmt.ROW_BITS) - 1)] = False
                ids = ids[keep]
            yield ids


def _snapshot(path: str) -> _Snapshot:
    with open_index(path) as index:
        meta = index.metadata
        if not meta.trained:
            raise NotTrainedError(f"{path} is not trained: there is nothing to merge")
        rec = fmt.read_commit(Path(path), meta.nlist, meta.index_uuid)
    return _Snapshot(path, meta, rec)


def _resolve_offsets(offsets: IdOffsets, snaps: list[_Snapshot]) -> tuple[int, ...]:
    if offsets is None:
        return (0,) * len(snaps)
    if isinstance(offsets, str):
        if offsets != "auto":
            raise ValueError(
                f"expected id_offsets 'auto', a list of integers or None, got {offsets!r}"
            )
        out, total = [], 0
        for s in snaps:
            out.append(total)
            total += s.rec.next_id
        if total >= 1 << 63:
            raise ValueError("the automatic id offsets overflow int64")
        return tuple(out)
    values = list(offsets)
    if len(values) != len(snaps):
        raise ValueError(f"expected {len(snaps)} id offsets (one per input) but got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or not 0 <= v < 1 << 63:
            raise ValueError(f"expected id offsets to be non-negative integers but got {v!r}")
    return tuple(int(v) for v in values)


def _check_collisions(snaps: list[_Snapshot], offsets: tuple[int, ...]) -> None:
    """Refuse ids present in two inputs (after offsets). Cheap when id ranges are disjoint."""
    bounds = []
    for s, off in zip(snaps, offsets, strict=True):
        lo, hi = None, None
        for ids in s.live_ids():
            if ids.size:
                lo = int(ids.min()) if lo is None else min(lo, int(ids.min()))
                hi = int(ids.max()) if hi is None else max(hi, int(ids.max()))
        if lo is not None and hi is not None:
            bounds.append((lo + off, hi + off))
    bounds.sort()
    if all(a[1] < b[0] for a, b in itertools.pairwise(bounds)):
        return
    # Overlapping ranges (interleaved ids, or a real collision): compare the id sets exactly,
    # at 8 bytes per vector.
    uniq = [
        np.unique(np.concatenate([np.zeros(0, np.int64), *s.live_ids()])) + off
        for s, off in zip(snaps, offsets, strict=True)
    ]
    owner = np.concatenate([np.full(len(u), i) for i, u in enumerate(uniq)])
    allids = np.concatenate(uniq)
    order = np.argsort(allids, kind="stable")
    dup = np.flatnonzero(np.diff(allids[order]) == 0)
    if dup.size:
        j = int(dup[0])
        a, b = (int(owner[order[j]]), int(owner[order[j + 1]]))
        raise ValueError(
            f"id {int(allids[order[j]])} is in both {snaps[a].path} and {snaps[b].path}: pass "
            "id offsets (--id-offsets auto) to keep every vector under its own id, or allow "
            "duplicate ids"
        )


def merge_indexes(
    out: str | os.PathLike[str],
    inputs: Sequence[str | os.PathLike[str]],
    *,
    id_offsets: IdOffsets = None,
    allow_duplicate_ids: bool = False,
    executor: Executor | None = None,
    retries: int = 2,
    durable: bool = True,
) -> MergeReport:
    """Create the index ``out`` holding the live vectors of every index in ``inputs``.

    Parameters
    ----------
    out
        New index directory (must not exist, or be empty).
    inputs
        Indexes that share centroids (equal trained hashes). They must not be modified during
        the merge. ``out`` gets the ``dim``, ``nlist``, metric, dtype, centroids, training
        information and default ``nprobe`` of the first.
    id_offsets
        ``None``: keep ids; ``"auto"``: shift input ``i`` by the total ``next_id`` of the
        inputs before it; or one non-negative offset per input.
    allow_duplicate_ids
        Skip the collision check: an id in two inputs then names two vectors of the result.
        Without it (and without ``"auto"``), the check reads the id files once and, when the
        inputs' id ranges overlap, holds 16 bytes per vector in memory.
    executor
        Runs the merge tasks (see :func:`diskivf.parallel.build_parallel`); None: here.
    retries
        Attempts after the first for a failed task.
    durable
        fsync the list files and the commit (default).

    Returns
    -------
    MergeReport
        What was done; ``report.summary()`` is a one-line description.

    Raises
    ------
    ValueError
        No inputs; inputs trained with other centroids (the trained hashes differ); bad id
        offsets; an id in two inputs; an offset id overflowing int64; an input changed during
        the merge.
    diskivf.errors.NotTrainedError
        An input is not trained.
    diskivf.errors.IndexNotFoundError, diskivf.errors.FormatError
        An input is missing or not a valid index.
    diskivf.errors.IndexExistsError
        ``out`` exists and is not empty. After a later failure, ``out`` stays as an empty
        trained index; remove it before retrying.
    OSError
        Reading or writing failed.

    Examples
    --------
    >>> import numpy as np, diskivf, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> x = np.random.default_rng(0).random((400, 8), np.float32)
    >>> with diskivf.open(os.path.join(d, "a"), "w-", dim=8, nlist=4) as a:
    ...     _ = a.train(x)
    ...     _ = a.add(x[:200])
    ...     with diskivf.open(os.path.join(d, "b"), "w-", dim=8, nlist=4) as b:
    ...         b.set_centroids(a.centroids)
    ...         _ = b.add(x[200:])
    >>> r = merge_indexes(os.path.join(d, "ab"), [os.path.join(d, "a"), os.path.join(d, "b")],
    ...                   id_offsets="auto")
    >>> r.ntotal, r.id_offsets
    (400, (0, 200))
    """
    t0 = time.perf_counter()
    paths = [os.path.abspath(os.fspath(p)) for p in inputs]
    if not paths:
        raise ValueError("expected at least one index to merge")
    snaps = [_snapshot(p) for p in paths]
    digest = fmt.trained_hash(snaps[0].meta)
    for s in snaps[1:]:
        if fmt.trained_hash(s.meta) != digest:
            raise ValueError(
                f"refusing to merge {s.path} with {snaps[0].path}: they were trained with other "
                "centroids (their trained hashes differ: dim, nlist, metric, dtype or "
                "centroid values)"
            )
    offsets = _resolve_offsets(id_offsets, snaps)
    if not allow_duplicate_ids and id_offsets != "auto" and len(snaps) > 1:
        _check_collisions(snaps, offsets)
    live = [s.live_counts() for s in snaps]
    totals = np.sum(live, axis=0).astype(np.int64)
    first = snaps[0].meta
    centroids = first.centroids
    if centroids is None:  # pragma: no cover - _snapshot refuses untrained inputs
        raise NotTrainedError(f"{snaps[0].path} is not trained")
    dest = Path(os.path.abspath(os.fspath(out)))
    with open_index(
        dest,
        "w-",
        dim=first.dim,
        nlist=first.nlist,
        metric=first.metric,
        dtype=first.vector_dtype,
        nprobe=first.nprobe,
        durable=durable,
    ) as index:
        index.set_centroids(centroids, training=first.training)
        if fmt.trained_hash(index.metadata) != digest:  # pragma: no cover - same bytes
            raise ValueError("the new index does not reproduce the inputs' trained hash")
        sources = tuple(
            IndexSource(s.path, s.rec.generation, off)
            for s, off in zip(snaps, offsets, strict=True)
        )
        rowbytes = first.dim * np.dtype(first.vector_dtype).itemsize + 8
        run = uuid.uuid4().hex
        tasks = [
            MergeTask(str(dest), digest, lo, hi, sources, durable, run=run)
            for lo, hi in plan_list_ranges(totals, rowbytes)
        ]
        results, retried = run_tasks(executor, merge_lists, tasks, retries=retries)
        next_id = max(off + s.rec.next_id for s, off in zip(snaps, offsets, strict=True))
        commit_merged(index, results, next_id=next_id, expected=totals)
        ntotal = index.ntotal
    return MergeReport(
        path=str(dest),
        inputs=tuple(paths),
        id_offsets=offsets,
        ntotal=ntotal,
        dropped=sum(len(s.rec.tombstones) for s in snaps),
        tasks=len(tasks),
        retries=retried,
        elapsed_s=time.perf_counter() - t0,
    )
