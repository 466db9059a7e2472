"""Parallel and distributed builds: idempotent tasks over small work items, on any executor.

:func:`build_parallel` builds the same index as :func:`diskivf.build.build`, splitting the work
into pure steps that run through any :class:`concurrent.futures.Executor`: ``None`` runs them
serially in-process, a :class:`~concurrent.futures.ProcessPoolExecutor` (see
:func:`process_executor`) uses the cores of one machine, and a Dask cluster's
``Client.get_executor()`` spreads them over many machines.

The steps
---------
1. *Plan* (driver): split the input rows into ranges from the input's header alone. Range
   bounds fall on multiples of ``batch_size``, so every task sees exactly the batches that the
   single-process build sees, and assigns them with bit-identical arithmetic.
2. *Train* (driver): :func:`diskivf.build.train_index`, the very function the single-process
   build uses, so the centroids are the same for the same input, seed and ``train_size``.
3. *Assign* (one task per row range, :func:`write_shard`): read the rows, assign them to lists
   and write a *shard*: a directory holding the range's rows grouped by list, in input order
   within each list (the layout is in :mod:`diskivf.format`, ``SHARD_FILES``). The shard is
   written in a temporary directory and published by one ``rename``, so a retried or
   duplicated task is harmless (a published shard is reused), and a task that died half-way
   left only a temporary directory, which its retry removes.
4. *Merge* (one task per range of lists, :func:`merge_lists`): concatenate each list's pieces
   from every shard, in shard order, into the index's list files, and return their row counts
   and CRC32s. Shards assigned with other centroids are refused (their manifests record a
   hash of the trained metadata, :func:`diskivf.format.trained_hash`).
5. *Commit* (driver): :meth:`diskivf.Index.adopt_lists` publishes every list in one commit;
   the driver alone writes the commit record, and holds the index's writer lock throughout.

Tasks receive paths, row ranges and list ranges (small frozen dataclasses), never arrays or
memory maps: pickling a memmap would copy the whole file into the task. Every path a task
receives is absolute; on a cluster, the input, the index and the work directory must be on
storage that every worker sees at the same path.

Why the result equals the single-process build
----------------------------------------------
The single-process build appends each batch grouped by list with a stable sort, so each list
holds its rows in input order. Shards cover consecutive row ranges and keep that order within
each list, and the merge concatenates them in shard order: each list file receives the same
rows in the same order, hence the same bytes and CRC32s. Only the index uuid and the commit
``generation`` differ (one commit instead of one per batch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    wait,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
from numpy.typing import NDArray

from diskivf import format as fmt
from diskivf import kmeans
from diskivf._blas import blas_threads
from diskivf._cpu import usable_cpus
from diskivf.build import (
    DEFAULT_BATCH_SIZE,
    ProgressArg,
    _check_and_train,
    _check_resume_point,
    _check_rows,
    _drop_pages,
    _id_batch,
    _open_ids,
    _open_input,
    _open_job,
    _open_output,
    _progress,
)
from diskivf.errors import CorruptIndexError, DiskIVFError
from diskivf.index import Index, open_index

__all__ = [
    "IndexSource",
    "InjectedCrash",
    "MergeResult",
    "MergeTask",
    "ParallelBuildReport",
    "ShardResult",
    "ShardSource",
    "ShardTask",
    "build_parallel",
    "merge_lists",
    "plan_list_ranges",
    "plan_row_ranges",
    "process_executor",
    "run_tasks",
    "write_shard",
]

#: Name of the work directory created inside the output index, unless ``work_dir`` says
#: otherwise (defined with the other file names in :mod:`diskivf.format`).
WORK_DIR_NAME: Final = fmt.WORK_DIR_NAME
#: About this many row ranges when ``rows_per_task`` is not given (at least one batch each).
_TARGET_TASKS: Final = 64
#: Row bytes per merge task, and the least number of merge tasks worth splitting into.
_MERGE_TASK_BYTES: Final = 256 << 20
_MIN_MERGE_TASKS: Final = 8
#: Bytes read or written per system call by the merge.
_CHUNK_BYTES: Final = 8 << 20


class InjectedCrash(RuntimeError):
    """Raised by a task's fault hook (``crash_marker``); it leaves its files as a crash would."""


# ------------------------------------------------------------------------------- work items


@dataclass(frozen=True)
class ShardTask:
    """Assign input rows ``[start, stop)`` to lists and publish them as the shard ``shard_dir``.

    Attributes
    ----------
    source, dataset
        Absolute input path (any format :func:`diskivf.io.open_vectors` reads) and HDF5
        dataset.
    ids
        Absolute ids file, or None for row numbers.
    source_tag
        Size and modification time of the input (and ids) files: a published shard is reused
        only when they are unchanged.
    index, trained_hash
        The trained output index (read-only here: its centroids) and the hash of its trained
        metadata; the task refuses an index whose hash differs.
    shard_dir
        Absolute path where the shard is published.
    start, stop, batch_size
        The row range, and the batch grid (``start`` is a multiple of ``batch_size``).
    durable
        fsync the shard before publishing it.
    blas_threads
        Hold BLAS to this many threads in the task (needs ``threadpoolctl``); None: leave it.
    attempt, run
        Retry number and an id of the calling build: every attempt is a distinct work item
        (Dask identifies tasks by a hash of their arguments, and would hand a retry, or a
        resumed build, the cached error of an earlier attempt). A shard published without
        fsync is reused only by tasks of the run that wrote it; ``run`` defaults to a fresh
        id, so tasks made apart never trust each other's unsynced shards.
    crash_marker
        Fault-injection hook for tests: when set and the file does not exist, the task creates
        it after writing part of its shard and raises :class:`InjectedCrash`, leaving its
        temporary directory behind as a killed process would.
    """

    source: str
    dataset: str | None
    ids: str | None
    source_tag: str
    index: str
    trained_hash: str
    shard_dir: str
    start: int
    stop: int
    batch_size: int
    durable: bool = True
    blas_threads: int | None = None
    attempt: int = 0
    run: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    crash_marker: str | None = None


@dataclass(frozen=True)
class ShardResult:
    """What :func:`write_shard` returns: rows per list and the largest id of the shard."""

    shard_dir: str
    start: int
    stop: int
    counts: NDArray[np.int64]
    max_id: int
    reused: bool


@dataclass(frozen=True)
class ShardSource:
    """A published shard, as a source of list rows for :func:`merge_lists`."""

    path: str


@dataclass(frozen=True)
class IndexSource:
    """The live rows of an index at commit ``generation``, ids shifted by ``id_offset``."""

    path: str
    generation: int
    id_offset: int = 0


@dataclass(frozen=True)
class MergeTask:
    """Write lists ``[lo, hi)`` of the index ``out`` (file generation 0) from ``sources``.

    Each list receives the pieces of every source in the order given. Every source must have
    been assigned with the centroids of ``trained_hash``. ``attempt`` and ``run`` are as for
    :class:`ShardTask`.
    """

    out: str
    trained_hash: str
    lo: int
    hi: int
    sources: tuple[ShardSource | IndexSource, ...]
    durable: bool = True
    attempt: int = 0
    run: str = ""


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_lists` returns for lists ``[lo, hi)``: rows and CRC32s per list."""

    lo: int
    hi: int
    counts: NDArray[np.int64]
    vec_crc32: NDArray[np.uint32]
    ids_crc32: NDArray[np.uint32]


@dataclass(frozen=True)
class ParallelBuildReport:
    """What one :func:`build_parallel` call did.

    Attributes
    ----------
    path : str
        The index directory.
    n, dim, nlist : int
        Input rows, dimension and lists.
    shards, merge_tasks : int
        Assign and merge tasks.
    shards_reused : int
        Shards found already published (by a duplicated task or an earlier, failed call).
    retries : int
        Failed task attempts that were retried.
    trained : bool
        Whether this call trained the centroids.
    train_size : int
        Training sample size.
    generation : int
        Commit generation of the index at the end.
    train_s, assign_s, merge_s, commit_s : float
        Seconds per phase (commit includes removing the work directory).
    """

    path: str
    n: int
    dim: int
    nlist: int
    shards: int
    merge_tasks: int
    shards_reused: int
    retries: int
    trained: bool
    train_size: int
    generation: int
    train_s: float
    assign_s: float
    merge_s: float
    commit_s: float

    def summary(self) -> str:
        """One line for humans: what was built and how long each phase took."""
        total = self.train_s + self.assign_s + self.merge_s + self.commit_s
        rate = self.n / total if total > 0 else 0.0
        train = f"train {self.train_s:.2f} s, " if self.trained else ""
        return (
            f"built {self.path}: {self.n:,} x {self.dim} vectors in {self.nlist} lists with "
            f"{self.shards} assign and {self.merge_tasks} merge tasks ({train}assign "
            f"{self.assign_s:.2f} s, merge {self.merge_s:.2f} s, commit {self.commit_s:.2f} s; "
            f"{rate:,.0f} vec/s overall, {self.retries} retried)"
        )


# ------------------------------------------------------------------------------ planning


def plan_row_ranges(n: int, batch_size: int, rows_per_task: int | None = None) -> list[range]:
    """Split ``n`` input rows into consecutive ranges whose bounds are multiples of
    ``batch_size`` (but the last).

    Parameters
    ----------
    n
        Input rows.
    batch_size
        The build's batch size: the unit of assignment arithmetic.
    rows_per_task
        Rows per range, rounded up to a multiple of ``batch_size``. Default: about
        ``n / 64``, so that there are enough tasks to balance workers of unequal speed.

    Returns
    -------
    list of range
        ``range(start, stop)`` per task, in input order.

    Raises
    ------
    ValueError
        ``n < 0``, ``batch_size < 1`` or ``rows_per_task < 1``.

    Examples
    --------
    >>> [(r.start, r.stop) for r in plan_row_ranges(10, 3, 5)]
    [(0, 6), (6, 10)]
    """
    if n < 0 or batch_size < 1 or (rows_per_task is not None and rows_per_task < 1):
        raise ValueError(
            f"expected n >= 0, batch_size >= 1 and rows_per_task >= 1 but got n={n}, "
            f"batch_size={batch_size}, rows_per_task={rows_per_task}"
        )
    want = math.ceil(n / _TARGET_TASKS) if rows_per_task is None else rows_per_task
    step = max(1, math.ceil(want / batch_size)) * batch_size
    return [range(a, min(n, a + step)) for a in range(0, n, step)]


def plan_list_ranges(
    counts: NDArray[np.int64],
    rowbytes: int,
    *,
    target_bytes: int = _MERGE_TASK_BYTES,
    min_tasks: int = _MIN_MERGE_TASKS,
) -> list[tuple[int, int]]:
    """Split lists ``[0, nlist)`` into consecutive ranges of about equal bytes.

    Each range holds about ``min(target_bytes, total / min_tasks)`` bytes of rows (``counts``
    times ``rowbytes``); a list larger than that gets a range of its own.

    Raises
    ------
    ValueError
        ``rowbytes`` or ``target_bytes`` below 1.

    Examples
    --------
    >>> plan_list_ranges(np.array([5, 5, 0, 10, 1]), 1, target_bytes=10, min_tasks=1)
    [(0, 2), (2, 4), (4, 5)]
    """
    if rowbytes < 1 or target_bytes < 1:
        raise ValueError(
            f"expected positive rowbytes and target_bytes, got {rowbytes}, {target_bytes}"
        )
    nlist = len(counts)
    sizes = np.asarray(counts, np.int64) * rowbytes
    total = int(sizes.sum())
    target = max(1, min(target_bytes, math.ceil(total / max(1, min_tasks))))
    group = (np.cumsum(sizes) - sizes) // target  # which target-sized slab each list starts in
    cuts = (np.flatnonzero(np.diff(group)) + 1).tolist()
    bounds = [0, *cuts, nlist]
    return [(a, b) for a, b in itertools.pairwise(bounds) if a < b]


# ---------------------------------------------------------------------------- task runner

TaskT = TypeVar("TaskT", ShardTask, MergeTask)
ResultT = TypeVar("ResultT")


def _permanent(exc: BaseException) -> bool:
    """Whether retrying cannot help: bad input or parameters, refusals, a broken executor,
    interrupts."""
    permanent = (ValueError, TypeError, DiskIVFError, BrokenExecutor)
    return isinstance(exc, permanent) or not isinstance(exc, Exception)


def run_tasks(
    executor: Executor | None,
    fn: Callable[[TaskT], ResultT],
    tasks: Sequence[TaskT],
    *,
    retries: int = 2,
    on_result: Callable[[int, ResultT], None] | None = None,
) -> tuple[list[ResultT], int]:
    """Run ``fn`` over ``tasks`` through ``executor``, retrying failed attempts.

    Parameters
    ----------
    executor
        Any :class:`concurrent.futures.Executor`, or None to run the tasks here, one by one.
    fn, tasks
        An idempotent task function and its work items (each with an ``attempt`` field, bumped
        on every retry so that no engine mistakes a retry for the failed attempt).
    retries
        Attempts after the first for each task. Errors that retrying cannot fix (``ValueError``,
        ``TypeError``, diskivf errors) are raised at once.
    on_result
        Called in the calling thread as ``on_result(task_number, result)`` when a task
        succeeds.

    Returns
    -------
    results, retried
        Results in task order, and the number of failed attempts that were retried.

    Raises
    ------
    Exception
        The error of a task that failed permanently or on its last attempt; tasks not yet
        started are cancelled first.
    """
    results: list[Any] = [None] * len(tasks)
    retried = 0
    if executor is None:
        for i, task in enumerate(tasks):
            attempt = task
            while True:
                try:
                    results[i] = fn(attempt)
                    break
                except Exception as exc:
                    if _permanent(exc) or attempt.attempt >= retries:
                        raise
                    retried += 1
                    attempt = dataclasses.replace(attempt, attempt=attempt.attempt + 1)
            if on_result is not None:
                on_result(i, results[i])
        return results, retried
    pending: dict[Future[ResultT], tuple[int, TaskT]] = {
        executor.submit(fn, task): (i, task) for i, task in enumerate(tasks)
    }
    try:
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i, task = pending.pop(future)
                err = future.exception()
                if err is None:
                    results[i] = future.result()
                    if on_result is not None:
                        on_result(i, results[i])
                    continue
                if _permanent(err) or task.attempt >= retries:
                    raise err
                retried += 1
                again = dataclasses.replace(task, attempt=task.attempt + 1)
                pending[executor.submit(fn, again)] = (i, again)
    finally:
        for future in pending:
            future.cancel()
    return results, retried


def _init_process_worker(blas_threads: int) -> None:
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=blas_threads, user_api="blas")


def process_executor(workers: int) -> ProcessPoolExecutor:
    """A process pool for :func:`build_parallel` on one machine (what ``diskivf build
    --workers N`` uses).

    Processes start from a fork server (never a fork of a process that may hold threads), and
    each holds BLAS to ``usable CPUs // workers`` threads when ``threadpoolctl`` is installed, so
    that the workers do not oversubscribe the cores.

    Raises
    ------
    ValueError
        ``workers < 1``.
    """
    if workers < 1:
        raise ValueError(f"expected workers >= 1 but got {workers}")
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    threads = max(1, usable_cpus() // workers)
    return ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_process_worker, initargs=(threads,)
    )


# ----------------------------------------------------------------------------- assign task


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")


def _remove_temps(final: Path) -> None:
    """Remove the temporary directories that earlier attempts at ``final`` left behind."""
    with contextlib.suppress(FileNotFoundError):
        for p in final.parent.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(p, ignore_errors=True)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _read_manifest(shard: Path) -> fmt.ShardManifest:
    return fmt.decode_shard_manifest((shard / fmt.SHARD_MANIFEST_NAME).read_bytes())


def _check_published(task: ShardTask, shard: Path) -> ShardResult | None:
    """The result of an already published shard for ``task``, or None if there is none (an
    untrusted one, published without fsync by another build run, is removed)."""
    try:
        m = _read_manifest(shard)
    except FileNotFoundError:
        return None
    if m.trained_hash != task.trained_hash:
        raise ValueError(
            f"shard {shard} was assigned with other centroids (trained hash {m.trained_hash[:12]}"
            f"...) than {task.index} ({task.trained_hash[:12]}...); remove the work directory "
            "of the earlier build"
        )
    if (m.start, m.stop) != (task.start, task.stop) or m.source_tag != task.source_tag:
        raise ValueError(
            f"shard {shard} holds rows {m.start}..{m.stop} of input {m.source_tag!r}, not rows "
            f"{task.start}..{task.stop} of {task.source_tag!r}; remove the work directory of "
            "the earlier build"
        )
    if not m.durable and m.run != task.run:
        # Published without fsync by another build run: a power loss since may have left its
        # files holding zeros or stale bytes at their full size, which no checksum covers (the
        # merge computes the lists' checksums from them). Only the run that wrote it can vouch
        # for it; any other redoes it.
        shutil.rmtree(shard, ignore_errors=True)
        return None
    rows = m.stop - m.start
    offsets = fmt.read_shard_offsets(shard / fmt.SHARD_FILES[2], m.nlist, rows, 0, m.nlist)
    return ShardResult(str(shard), m.start, m.stop, np.diff(offsets), m.max_id, True)


def write_shard(task: ShardTask) -> ShardResult:
    """Assign the task's rows to lists and publish them as a shard (idempotent).

    Reads the input twice (first to assign every row, then to write each row at its place
    in its list's run), so memory stays at a batch plus 8 bytes per row of the range.

    Returns
    -------
    ShardResult
        Rows per list and the largest id; ``reused`` when the shard was already published,
        or when a duplicate of the task running at the same time published it first.

    Raises
    ------
    ValueError
        The index's trained hash is not ``task.trained_hash``; a published shard at
        ``shard_dir`` comes from another build; an input row holds NaN or infinity (or zero,
        for cosine); bad ids.
    diskivf.errors.FormatError
        The input, ids or index is malformed.
    OSError
        Reading or writing failed; a retry starts over.
    InjectedCrash
        The ``crash_marker`` fault hook fired.
    """
    final = Path(task.shard_dir)
    done = _check_published(task, final)
    if done is not None:
        return done
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_temps(final)
    tmp = _temp_name(final)
    tmp.mkdir()
    try:
        with blas_threads(task.blas_threads):
            result = _fill_shard(task, tmp)
    except InjectedCrash:
        raise  # leave the temporary directory, as a killed process would
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # A duplicate of this task that started meanwhile removed this attempt's temporary
        # directory as a crashed attempt's, so writing into it failed; if the duplicate has
        # published the shard, that is this task's result.
        done = _check_published(task, final) if isinstance(exc, OSError) else None
        if done is None:
            raise
        return done
    try:
        os.rename(tmp, final)
    except OSError:
        # A duplicate of this task published first: keep its shard (the same rows).
        shutil.rmtree(tmp, ignore_errors=True)
        done = _check_published(task, final)
        if done is None:
            raise
        return done
    if task.durable:
        fmt.fsync_dir(final.parent)
    return result


def _fill_shard(task: ShardTask, tmp: Path) -> ShardResult:
    x, xname = _open_input(task.source, task.dataset)
    n = int(x.shape[0])
    id_src = _open_ids(task.ids, n)
    start, stop, bs = task.start, task.stop, task.batch_size
    if not (0 <= start <= stop <= n and start % bs == 0):
        raise ValueError(f"rows {start}..{stop} are not a batch-aligned range of {n} rows")
    with open_index(task.index) as index:
        if fmt.trained_hash(index.metadata) != task.trained_hash:
            raise ValueError(
                f"{task.index} is not the trained index this task was planned for (its trained "
                "hash differs)"
            )
        centroids = index.centroids
        metric, nlist, vdtype = index.metric, index.nlist, index.metadata.vector_dtype
        rowbytes = index.dim * index.dtype.itemsize

        def batches() -> Iterator[tuple[int, NDArray[np.float32], NDArray[Any]]]:
            # Exactly the single-process build's batches and conversions (build -> Index.add).
            for a in range(start, stop, bs):
                b = min(stop, a + bs)
                xb = np.ascontiguousarray(x[a:b], dtype=np.float32)
                _check_rows(xb, metric, xname, a)
                xb, stored = index._prepare_batch(xb, a)
                _drop_pages(x)
                yield a, xb, stored

        # Pass 1: the list of every row, so that each list's run in the shard can be placed.
        labels = np.empty(stop - start, np.int64)
        for a, xb, _ in batches():
            labels[a - start : a - start + len(xb)] = index._assign(xb, centroids)
        counts = np.bincount(labels, minlength=nlist).astype(np.int64)
        offsets = fmt.encode_shard_offsets(counts)
        cursor = np.concatenate([[0], np.cumsum(counts)])[:-1]

        # Pass 2: each batch grouped by list (stable: input order within a list), each group
        # written at its list's cursor.
        max_id = -1
        vec_name, ids_name, off_name = fmt.SHARD_FILES
        vfd = os.open(tmp / vec_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        ifd = os.open(tmp / ids_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for a, _, stored in batches():
                b = a + len(stored)
                bids = (
                    np.arange(a, b, dtype=np.int64)
                    if id_src is None
                    else _id_batch(id_src[0], id_src[1], a, b)
                )
                if id_src is not None:
                    _drop_pages(id_src[0])
                if len(bids):
                    max_id = max(max_id, int(bids.max()))
                lab = labels[a - start : b - start]
                runs, (vec_sorted, ids_sorted) = kmeans.group_by_label(lab, nlist, stored, bids)
                vec_sorted = vec_sorted.astype(vdtype, copy=False)
                ids_sorted = ids_sorted.astype("<i8", copy=False)
                for g, (lid, ga, gb) in enumerate(runs):
                    if task.crash_marker is not None and a == start and g == (len(runs) - 1) // 2:
                        _maybe_crash(task.crash_marker)
                    c = int(cursor[lid])
                    vbytes = vec_sorted[ga:gb].data
                    ibytes = ids_sorted[ga:gb].data
                    _write_all(vfd, vbytes, c * rowbytes)
                    _write_all(ifd, ibytes, c * 8)
                    cursor[lid] = c + (gb - ga)
            if task.durable:
                os.fsync(vfd)
                os.fsync(ifd)
        finally:
            os.close(vfd)
            os.close(ifd)
    manifest = fmt.ShardManifest(
        start=start,
        stop=stop,
        nlist=nlist,
        dim=index.dim,
        vector_dtype=vdtype,
        trained_hash=task.trained_hash,
        max_id=max_id,
        source_tag=task.source_tag,
        run=task.run,
        durable=task.durable,
    )
    for name, data in (
        (off_name, offsets),
        (fmt.SHARD_MANIFEST_NAME, fmt.encode_shard_manifest(manifest)),
    ):
        with open(tmp / name, "xb") as f:
            f.write(data)
            f.flush()
            if task.durable:
                os.fsync(f.fileno())
    if task.durable:
        fmt.fsync_dir(tmp)
    return ShardResult(str(task.shard_dir), start, stop, counts, max_id, False)


def _maybe_crash(marker: str) -> None:
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return
    raise InjectedCrash(f"injected crash (marker {marker})")


# ------------------------------------------------------------------------------ merge task


class _Source:
    """Rows of lists ``[lo, hi)`` of one merge source, read in bounded chunks."""

    rowbytes: int

    def count(self, lid: int) -> int:
        raise NotImplementedError

    def pieces(self, lid: int) -> Iterator[tuple[bytes, bytes]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _ShardReader(_Source):
    def __init__(self, src: ShardSource, task: MergeTask) -> None:
        path = Path(src.path)
        m = _read_manifest(path)
        if m.trained_hash != task.trained_hash:
            raise ValueError(
                f"refusing to merge shard {path}: it was assigned with other centroids (trained "
                f"hash {m.trained_hash[:12]}...) than {task.out} ({task.trained_hash[:12]}...)"
            )
        rows = m.stop - m.start
        self.lo = task.lo
        self.rowbytes = m.dim * np.dtype(m.vector_dtype).itemsize
        self.off = fmt.read_shard_offsets(
            path / fmt.SHARD_FILES[2], m.nlist, rows, task.lo, task.hi
        )
        self.fds: list[int] = []
        for name, need in zip(fmt.SHARD_FILES[:2], (rows * self.rowbytes, rows * 8), strict=True):
            fd = os.open(path / name, os.O_RDONLY)
            self.fds.append(fd)
            if os.fstat(fd).st_size < need:
                self.close()
                raise CorruptIndexError(f"corrupt: shard file {path / name} is truncated")

    def count(self, lid: int) -> int:
        i = lid - self.lo
        return int(self.off[i + 1] - self.off[i])

    def pieces(self, lid: int) -> Iterator[tuple[bytes, bytes]]:
        i = lid - self.lo
        a, b = int(self.off[i]), int(self.off[i + 1])
        step = max(1, _CHUNK_BYTES // self.rowbytes)
        for r in range(a, b, step):
            e = min(b, r + step)
            yield (
                _pread(self.fds[0], (e - r) * self.rowbytes, r * self.rowbytes),
                _pread(self.fds[1], (e - r) * 8, r * 8),
            )

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


class _IndexReader(_Source):
    def __init__(self, src: IndexSource, task: MergeTask) -> None:
        self.root = Path(src.path)
        meta = fmt.read_meta(self.root)
        if meta.centroids is None or fmt.trained_hash(meta) != task.trained_hash:
            raise ValueError(
                f"refusing to merge {self.root}: it was not trained with the centroids of "
                f"{task.out} (trained hashes differ)"
            )
        rec = fmt.read_commit(self.root, meta.nlist, meta.index_uuid)
        if rec.generation != src.generation:
            raise ValueError(
                f"{self.root} changed during the merge (commit generation {rec.generation}, "
                f"expected {src.generation}); do not modify the inputs of a merge"
            )
        self.rec = rec
        self.offset = src.id_offset
        self.rowbytes = meta.dim * np.dtype(meta.vector_dtype).itemsize

    def removed(self, lid: int) -> NDArray[np.int64]:
        t = self.rec.tombstones
        a, b = np.searchsorted(t, [lid << fmt.ROW_BITS, (lid + 1) << fmt.ROW_BITS])
        return t[a:b] & ((1 << fmt.ROW_BITS) - 1)

    def count(self, lid: int) -> int:
        return int(self.rec.list_counts[lid]) - len(self.removed(lid))

    def pieces(self, lid: int) -> Iterator[tuple[bytes, bytes]]:
        count = int(self.rec.list_counts[lid])
        if count == 0:
            return
        removed = self.removed(lid)
        names = fmt.list_file_names(lid, int(self.rec.list_gens[lid]))
        step = max(1, _CHUNK_BYTES // self.rowbytes)
        vcrc = icrc = 0
        with open(self.root / names[0], "rb") as fv, open(self.root / names[1], "rb") as fi:
            for r in range(0, count, step):
                e = min(count, r + step)
                vec = _pread(fv.fileno(), (e - r) * self.rowbytes, r * self.rowbytes)
                raw_ids = _pread(fi.fileno(), (e - r) * 8, r * 8)
                # The merged lists get fresh checksums: check the source's as its bytes pass,
                # so that damage fails the merge (after the last piece, before the publish).
                vcrc, icrc = fmt.crc32(vec, vcrc), fmt.crc32(raw_ids, icrc)
                ids = np.frombuffer(raw_ids, "<i8")
                gone = removed[(removed >= r) & (removed < e)] - r
                if gone.size:
                    keep = np.ones(e - r, bool)
                    keep[gone] = False
                    rows = np.frombuffer(vec, np.uint8).reshape(e - r, self.rowbytes)
                    vec, ids = rows[keep].tobytes(), ids[keep]
                if self.offset:
                    if ids.size and int(ids.max()) > np.iinfo(np.int64).max - self.offset:
                        raise ValueError(
                            f"id offset {self.offset} makes an id of {self.root} overflow int64"
                        )
                    ids = ids + np.int64(self.offset)
                yield vec, np.asarray(ids, "<i8").tobytes()
        fmt.check_list_crc(names[0], lid, vcrc, int(self.rec.vec_crc32[lid]))
        fmt.check_list_crc(names[1], lid, icrc, int(self.rec.ids_crc32[lid]))


def _pread(fd: int, nbytes: int, offset: int) -> bytes:
    data = os.pread(fd, nbytes, offset)
    if len(data) != nbytes:
        raise CorruptIndexError(f"corrupt: short read ({len(data)} of {nbytes} bytes)")
    return data


def _remove_list_temps(lists_dir: Path, lo: int, hi: int) -> None:
    """Remove temporary list files of lists ``[lo, hi)`` that a dead attempt left behind."""
    with contextlib.suppress(FileNotFoundError), os.scandir(lists_dir) as it:
        for entry in it:
            name = entry.name
            ours = name.startswith(".") and name.endswith(".tmp") and name[1:8].isdigit()
            if ours and lo <= int(name[1:8]) < hi:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def merge_lists(task: MergeTask) -> MergeResult:
    """Write lists ``[task.lo, task.hi)`` of ``task.out`` from the task's sources (idempotent).

    Each non-empty list is written to temporary files that are renamed over the final
    ``fmt.list_file_names(list_id, 0)``; the files are not part of the index until the driver
    commits them, so a retried or duplicated task simply writes the same bytes again.

    Returns
    -------
    MergeResult
        Rows per list and the CRC32s of the list files.

    Raises
    ------
    ValueError
        A source was assigned or trained with other centroids, an index source changed since
        the merge was planned, or an id offset overflows.
    diskivf.errors.FormatError
        A source is malformed or truncated.
    OSError
        Reading or writing failed; a retry starts over.
    """
    out = Path(task.out)
    lists_dir = out / fmt.LISTS_DIR
    lists_dir.mkdir(exist_ok=True)
    _remove_list_temps(lists_dir, task.lo, task.hi)
    width = task.hi - task.lo
    counts = np.zeros(width, np.int64)
    vcrc = np.zeros(width, np.uint32)
    icrc = np.zeros(width, np.uint32)
    readers: list[_Source] = []
    try:
        for src in task.sources:
            if isinstance(src, ShardSource):
                readers.append(_ShardReader(src, task))
            else:
                readers.append(_IndexReader(src, task))
        for lid in range(task.lo, task.hi):
            names = fmt.list_file_names(lid, 0)
            total = sum(r.count(lid) for r in readers)
            if total == 0:
                for name in names:  # nothing of an earlier, different attempt may linger
                    with contextlib.suppress(FileNotFoundError):
                        (out / name).unlink()
                continue
            i = lid - task.lo
            counts[i] = total
            vcrc[i], icrc[i] = _write_list(out, names, readers, lid, task.durable)
    finally:
        for r in readers:
            r.close()
    return MergeResult(task.lo, task.hi, counts, vcrc, icrc)


def _write_list(
    out: Path, names: tuple[str, str], readers: list[_Source], lid: int, durable: bool
) -> tuple[int, int]:
    finals = [out / name for name in names]
    tmps = [_temp_name(p) for p in finals]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644) for p in tmps]
    crcs = [0, 0]
    sizes = [0, 0]
    try:
        for r in readers:
            for piece in r.pieces(lid):
                for j in (0, 1):
                    _write_all(fds[j], piece[j], sizes[j])
                    crcs[j] = fmt.crc32(piece[j], crcs[j])
                    sizes[j] += len(piece[j])
        if durable:
            for fd in fds:
                os.fsync(fd)
    except BaseException:
        for fd, p in zip(fds, tmps, strict=True):
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    for fd in fds:
        os.close(fd)
    for tmp, final in zip(tmps, finals, strict=True):
        os.replace(tmp, final)
    return crcs[0], crcs[1]


# ---------------------------------------------------------------------------------- driver


def _file_tag(*paths: str | None) -> str:
    parts = []
    for p in paths:
        if p is not None:
            st = os.stat(p)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
    return "/".join(parts)


def _as_path(value: Any, what: str) -> str:
    if not isinstance(value, str | os.PathLike):
        raise TypeError(
            f"expected {what} to be a file path but got {type(value).__name__}: parallel "
            "tasks receive paths, never arrays (use diskivf.build.build for in-memory arrays)"
        )
    return os.path.abspath(os.fspath(value))


def commit_merged(
    index: Index,
    results: Sequence[MergeResult],
    *,
    next_id: int,
    expected: NDArray[np.int64] | None = None,
) -> None:
    """Assemble merge results and publish them with :meth:`diskivf.Index.adopt_lists`.

    Raises
    ------
    ValueError
        The results do not cover every list exactly once, or their counts differ from
        ``expected``.
    diskivf.errors.CorruptIndexError
        A list file is missing or short.
    OSError
        Publishing failed.
    """
    nlist = index.nlist
    counts = np.zeros(nlist, np.int64)
    vcrc = np.zeros(nlist, np.uint32)
    icrc = np.zeros(nlist, np.uint32)
    covered = np.zeros(nlist, np.int64)
    for r in results:
        counts[r.lo : r.hi] = r.counts
        vcrc[r.lo : r.hi] = r.vec_crc32
        icrc[r.lo : r.hi] = r.ids_crc32
        covered[r.lo : r.hi] += 1
    if not (covered == 1).all():
        raise ValueError("the merge tasks do not cover every list exactly once")
    if expected is not None and not np.array_equal(counts, expected):
        bad = int(np.flatnonzero(counts != expected)[0])
        raise ValueError(
            f"list {bad} was merged with {counts[bad]} rows but the shards hold {expected[bad]}"
        )
    lists_dir = Path(index.path) / fmt.LISTS_DIR
    _remove_list_temps(lists_dir, 0, nlist)
    index.adopt_lists(counts, vcrc, icrc, next_id=next_id)


def build_parallel(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    nlist: int,
    metric: str = "l2",
    ids: str | os.PathLike[str] | None = None,
    dataset: str | None = None,
    train_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    nprobe: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    niter: int = 10,
    executor: Executor | None = None,
    rows_per_task: int | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    retries: int = 2,
    blas_threads: int | None = None,
    resume: bool = False,
    durable: bool = True,
    progress: ProgressArg = False,
) -> ParallelBuildReport:
    """Build an index at ``out`` from the vectors in ``source`` with tasks run by ``executor``.

    The result is identical to :func:`diskivf.build.build` with the same input, ids and
    parameters: the same list files byte for byte, the same per-list counts and CRC32s, the
    same search results (see the module docstring for the steps and why).

    Parameters
    ----------
    source
        Path of a vector file (any format :func:`diskivf.io.open_vectors` reads). Tasks open
        it themselves, so it must be visible to every worker at the same path.
    out
        Index directory to create (or to resume, with ``resume=True``).
    nlist, metric, ids, dataset, train_size, batch_size, nprobe, dtype, seed, niter
        As for :func:`diskivf.build.build` (``ids`` must be a file path here). ``batch_size``
        is also the unit of work: row ranges are whole batches.
    executor
        Any :class:`concurrent.futures.Executor`: None runs every task here, serially;
        :func:`process_executor` uses the cores of this machine; ``client.get_executor()`` of
        a Dask ``distributed.Client`` uses a cluster. The executor is not shut down.
    rows_per_task
        Rows per assign task (rounded up to whole batches). Default: about ``n / 64``. Each
        task holds one batch plus 8 bytes per row of its range in memory.
    work_dir
        Directory for the shards (default: ``out/.parallel-build.tmp``); removed after a
        successful build, kept after a failure so that ``resume=True`` reuses what was done.
    retries
        Attempts after the first for each task that fails with an error a retry may fix
        (``OSError``, a lost worker...). Tasks are idempotent, so a retry is always safe.
    blas_threads
        Hold BLAS to this many threads inside each task (needs ``threadpoolctl``); useful when
        several workers share a machine. Default: leave BLAS alone.
    resume
        Continue in ``out`` after a failed or killed :func:`build_parallel`: training is
        reused if it finished, and so is every shard that was published.
    durable
        fsync shards, list files and the commit (default).
    progress
        As for :func:`diskivf.build.build`; a callable receives ``(rows_assigned, n)`` after
        each assign task.

    Returns
    -------
    ParallelBuildReport
        What was done; ``report.summary()`` is a one-line description.

    Raises
    ------
    TypeError
        ``source`` or ``ids`` is not a path.
    FileNotFoundError
        ``source`` or ``ids`` does not exist.
    diskivf.errors.FormatError
        ``source`` or ``ids`` is malformed, or ``out`` is a damaged index.
    diskivf.errors.IndexExistsError
        ``out`` exists and ``resume`` is False.
    diskivf.errors.LockedError
        Another writer holds ``out``.
    ValueError
        Invalid parameters or input rows, as for :func:`diskivf.build.build`; on resume, an
        index built with other parameters, or one that holds part of a single-process build
        (resume that with :func:`diskivf.build.build`); a work directory holding shards of
        another build.
    OSError
        Reading, writing, or a task failed after its retries; the index keeps its last commit.
    Exception
        Whatever the executor raises for a lost task (Dask's ``KilledWorker``...), after the
        retries.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "x.npy"), np.random.default_rng(0).random((500, 8), np.float32))
    >>> r = build_parallel(os.path.join(d, "x.npy"), os.path.join(d, "x.index"), nlist=4,
    ...                    batch_size=100, rows_per_task=200)
    >>> r.shards, r.generation
    (3, 1)
    """
    src = _as_path(source, "source")
    ids_path = None if ids is None else _as_path(ids, "ids")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"expected retries >= 0 but got {retries!r}")
    x, xname, n, id_src, spec = _open_job(
        src,
        ids_path,
        dataset=dataset,
        nlist=nlist,
        metric=metric,
        dtype=dtype,
        nprobe=nprobe,
        seed=seed,
        batch_size=batch_size,
        train_size=train_size,
    )
    dim, m = spec.dim, spec.train_size
    ranges = plan_row_ranges(n, batch_size, rows_per_task)
    path = Path(os.path.abspath(os.fspath(out)))
    index = _open_output(path, spec, resume=resume, durable=durable)
    with index:
        if index.nremoved or index.ntotal:
            if index.ntotal == n and not index.nremoved:
                _check_resume_point(index, x, xname, id_src, n)  # complete: nothing to do
                return _report(index, n, dim, 0, 0, 0, 0, False, m, (0.0, 0.0, 0.0, 0.0))
            raise ValueError(
                f"cannot resume {str(path)!r} in parallel: it holds {index.ntotal:,} of "
                f"{n:,} rows from a single-process build (or removals); resume it with "
                "diskivf.build.build (diskivf build --resume without --workers)"
            )
        t0 = time.perf_counter()
        trained = _check_and_train(index, x, xname, spec, niter=niter, progress=progress)
        _drop_pages(x)
        del x, id_src
        digest = fmt.trained_hash(index.metadata)
        t1 = time.perf_counter()

        work = path / WORK_DIR_NAME if work_dir is None else Path(os.path.abspath(work_dir))
        shard_root = work / "shards"
        tag = _file_tag(src, ids_path)
        run = uuid.uuid4().hex
        tasks = [
            ShardTask(
                source=src,
                dataset=dataset,
                ids=ids_path,
                source_tag=tag,
                index=str(path),
                trained_hash=digest,
                shard_dir=str(shard_root / f"{i:06d}"),
                start=r.start,
                stop=r.stop,
                batch_size=batch_size,
                durable=durable,
                blas_threads=blas_threads,
                run=run,
            )
            for i, r in enumerate(ranges)
        ]
        totals = np.zeros(nlist, np.int64)
        max_id = -1
        reused = 0
        rows_done = 0
        callback = progress if callable(progress) else None
        bar = _progress(progress, "assign")

        def shard_done(_: int, res: ShardResult) -> None:
            nonlocal max_id, reused, rows_done
            totals[:] += res.counts
            max_id = max(max_id, res.max_id)
            reused += res.reused
            rows_done += res.stop - res.start
            if callback is not None:
                callback(rows_done, n)
            if bar is not None:
                bar(rows_done, n)

        if bar is not None:
            bar(0, n)
        try:
            _, retried = run_tasks(
                executor, write_shard, tasks, retries=retries, on_result=shard_done
            )
        finally:
            if bar is not None:
                bar(-1, n)
        t2 = time.perf_counter()

        rowbytes = dim * index.dtype.itemsize + 8
        sources = tuple(ShardSource(t.shard_dir) for t in tasks)
        mtasks = [
            MergeTask(str(path), digest, lo, hi, sources, durable, run=run)
            for lo, hi in plan_list_ranges(totals, rowbytes)
        ]
        bar = _progress(progress, "merge")
        merged = 0

        def merge_done(_: int, res: MergeResult) -> None:
            nonlocal merged
            merged += res.hi - res.lo
            if bar is not None:
                bar(merged, nlist)

        try:
            results, retried2 = run_tasks(
                executor, merge_lists, mtasks, retries=retries, on_result=merge_done
            )
        finally:
            if bar is not None:
                bar(-1, nlist)
        t3 = time.perf_counter()
        commit_merged(index, results, next_id=max_id + 1, expected=totals)
        shutil.rmtree(work, ignore_errors=True)
        t4 = time.perf_counter()
        return _report(
            index,
            n,
            dim,
            len(tasks),
            len(mtasks),
            reused,
            retried + retried2,
            trained,
            m,
            (t1 - t0, t2 - t1, t3 - t2, t4 - t3),
        )


def _report(
    index: Index,
    n: int,
    dim: int,
    shards: int,
    merge_tasks: int,
    reused: int,
    retries: int,
    trained: bool,
    m: int,
    times: tuple[float, float, float, float],
) -> ParallelBuildReport:
    return ParallelBuildReport(
        path=str(index.path),
        n=n,
        dim=dim,
        nlist=index.nlist,
        shards=shards,
        merge_tasks=merge_tasks,
        shards_reused=reused,
        retries=retries,
        trained=trained,
        train_size=m,
        generation=index.generation,
        train_s=times[0],
        assign_s=times[1],
        merge_s=times[2],
        commit_s=times[3],
    )
