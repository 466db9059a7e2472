"""Tests for diskivf.parallel and diskivf.merge: parallel builds equal the single-process build,
tasks are idempotent and small, shards and indexes with other centroids are refused."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import os
import pickle
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from numpy.typing import NDArray

import diskivf
from diskivf import format as fmt
from diskivf import kmeans
from diskivf import parallel as parallel_module
from diskivf.build import build
from diskivf.cli import main
from diskivf.demo import clustered
from diskivf.errors import IndexExistsError
from diskivf.index import open_index
from diskivf.merge import merge_indexes
from diskivf.parallel import (
    WORK_DIR_NAME,
    InjectedCrash,
    MergeTask,
    ShardResult,
    ShardSource,
    ShardTask,
    build_parallel,
    merge_lists,
    plan_list_ranges,
    plan_row_ranges,
    process_executor,
    run_tasks,
    write_shard,
)

N, DIM, NLIST, BATCH, PER_TASK = 6000, 12, 16, 1000, 2000
Data = tuple[NDArray[np.float32], NDArray[np.float32]]


@pytest.fixture(scope="module")
def data() -> Data:
    return clustered(N, DIM, nq=60, nclusters=40, seed=3)


@pytest.fixture
def npy(tmp_path: Path, data: Data) -> Path:
    path = tmp_path / "base.npy"
    np.save(path, data[0])
    return path


@pytest.fixture
def reference(tmp_path: Path, npy: Path) -> Path:
    """The single-process build of ``npy``: what every parallel build must reproduce."""
    out = tmp_path / "serial.index"
    build(npy, out, nlist=NLIST, batch_size=BATCH, durable=False)
    return out


def list_files(index_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((index_dir / fmt.LISTS_DIR).iterdir())}


def commit(index_dir: Path) -> fmt.CommitRecord:
    meta = fmt.read_meta(index_dir)
    return fmt.read_commit(index_dir, meta.nlist, meta.index_uuid)


def temp_leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def assert_same_index(a: Path, b: Path, q: NDArray[np.float32]) -> None:
    """Same list files byte for byte, same counts/CRCs/ids, same centroids, same results."""
    assert list_files(a) == list_files(b)
    ra, rb = commit(a), commit(b)
    for field in ("list_counts", "list_gens", "vec_crc32", "ids_crc32", "tombstones"):
        np.testing.assert_array_equal(getattr(ra, field), getattr(rb, field), err_msg=field)
    assert ra.next_id == rb.next_id
    ma, mb = fmt.read_meta(a), fmt.read_meta(b)
    assert fmt.trained_hash(ma) == fmt.trained_hash(mb)
    assert ma.training == mb.training
    assert ma.nprobe == mb.nprobe
    with open_index(a) as ia, open_index(b) as ib:
        for nprobe in (1, 4):
            da, xa = ia.search(q, k=10, nprobe=nprobe)
            db, xb = ib.search(q, k=10, nprobe=nprobe)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(da, db)
        assert ib.verify().ok
    assert not temp_leftovers(b)
    assert not (b / WORK_DIR_NAME).exists()


class InlineExecutor(Executor):
    """Runs each task at submit time in this process (a stand-in for any Executor)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, as executors do
            future.set_exception(exc)
        return future


class Recording(Executor):
    """Wraps an executor; records every submitted call and may rewrite work items."""

    def __init__(self, inner: Executor, rewrite: Callable[[Any], Any] | None = None) -> None:
        self.inner = inner
        self.rewrite = rewrite
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if self.rewrite is not None:
            args = tuple(self.rewrite(a) for a in args)
        self.calls.append((fn, args, kwargs))
        return self.inner.submit(fn, *args, **kwargs)


def crash_shard(marker: Path, *, start: int) -> Callable[[Any], Any]:
    """A :class:`Recording` rewrite: the assign task of the rows from ``start`` crashes after
    writing part of its shard, once (the crash creates ``marker``; retries then succeed)."""

    def inject(arg: Any) -> Any:
        if isinstance(arg, ShardTask) and arg.start == start:
            return dataclasses.replace(arg, crash_marker=str(marker))
        return arg

    return inject


def _forkserver_pool(workers: int) -> ProcessPoolExecutor:
    import multiprocessing

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


def _dask() -> Any:
    """``dask.distributed``: the test extra installs it, so these tests never skip."""
    return importlib.import_module("distributed")


# ------------------------------------------------------------------------------ planning


def test_plan_row_ranges_are_whole_batches() -> None:
    ranges = plan_row_ranges(10_500, 1000, 2500)
    assert [(r.start, r.stop) for r in ranges] == [
        (0, 3000),
        (3000, 6000),
        (6000, 9000),
        (9000, 10_500),
    ]
    assert plan_row_ranges(0, 10) == []
    default = plan_row_ranges(1_000_000, 1000)
    assert 1 < len(default) <= 64
    assert all(r.start % 1000 == 0 for r in default)
    with pytest.raises(ValueError, match="batch_size"):
        plan_row_ranges(10, 0)


def test_plan_list_ranges_cover_every_list_once() -> None:
    counts = np.array([0, 100, 3, 0, 0, 50, 50, 1000, 2, 0], np.int64)
    ranges = plan_list_ranges(counts, 4, target_bytes=400, min_tasks=1)
    covered = [lid for a, b in ranges for lid in range(a, b)]
    assert covered == list(range(len(counts)))
    assert (7, 8) in ranges  # a list bigger than the target gets its own range
    assert plan_list_ranges(np.zeros(5, np.int64), 8) == [(0, 5)]


# ---------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("metric", "dtype"), [("l2", "float32"), ("ip", "float32"), ("cosine", "float16")]
)
def test_serial_build_equals_single_process_build(
    tmp_path: Path, npy: Path, data: Data, metric: str, dtype: str
) -> None:
    ref = tmp_path / "ref.index"
    build(npy, ref, nlist=NLIST, metric=metric, dtype=dtype, batch_size=BATCH, durable=False)
    out = tmp_path / "par.index"
    report = build_parallel(
        npy,
        out,
        nlist=NLIST,
        metric=metric,
        dtype=dtype,
        batch_size=BATCH,
        rows_per_task=PER_TASK,
        durable=False,
    )
    assert (report.shards, report.generation, report.retries) == (3, 1, 0)
    assert report.trained
    assert report.n == N
    assert "assign" in report.summary()
    assert_same_index(ref, out, data[1])


def test_ids_file_and_uneven_ranges(tmp_path: Path, npy: Path, data: Data) -> None:
    ids = np.random.default_rng(7).permutation(N).astype(np.int64) * 3 + 5
    ids_path = tmp_path / "ids.npy"
    np.save(ids_path, ids)
    ref = tmp_path / "ref.index"
    build(npy, ref, nlist=NLIST, ids=ids_path, batch_size=700, durable=False)
    out = tmp_path / "par.index"
    report = build_parallel(
        npy, out, nlist=NLIST, ids=ids_path, batch_size=700, rows_per_task=1000, durable=True
    )
    assert report.shards == 5  # ranges of 2 batches (1400 rows), the last one shorter
    assert_same_index(ref, out, data[1])
    assert commit(out).next_id == int(ids.max()) + 1


def test_process_pool_build_equals_single_process_build(
    tmp_path: Path, npy: Path, reference: Path, data: Data
) -> None:
    out = tmp_path / "pool.index"
    with _forkserver_pool(2) as pool:
        build_parallel(
            npy,
            out,
            nlist=NLIST,
            batch_size=BATCH,
            rows_per_task=PER_TASK,
            executor=pool,
            durable=False,
        )
    assert_same_index(reference, out, data[1])


def test_dask_local_cluster_build_equals_single_process_build(
    tmp_path: Path, npy: Path, reference: Path, data: Data, dask_client: Any
) -> None:
    out = tmp_path / "dask.index"
    report = build_parallel(
        npy,
        out,
        nlist=NLIST,
        batch_size=BATCH,
        rows_per_task=PER_TASK,
        executor=dask_client.get_executor(),
        durable=False,
    )
    assert report.shards == 3
    assert_same_index(reference, out, data[1])


def test_dask_build_fails_then_resumes(
    tmp_path: Path, npy: Path, reference: Path, data: Data, dask_client: Any
) -> None:
    marker = tmp_path / "crashed"
    inject = crash_shard(marker, start=0)

    out = tmp_path / "dask.index"
    kw: dict[str, Any] = {"nlist": NLIST, "batch_size": BATCH, "rows_per_task": PER_TASK}
    with pytest.raises(InjectedCrash):  # raised on a worker, re-raised here
        build_parallel(
            npy, out, **kw, executor=Recording(dask_client.get_executor(), inject), retries=0
        )
    # The same work items again, on the same client: Dask must not replay the cached error.
    report = build_parallel(npy, out, **kw, executor=dask_client.get_executor(), resume=True)
    assert report.retries == 0
    assert_same_index(reference, out, data[1])


def test_cli_build_with_workers_equals_serial(
    tmp_path: Path, npy: Path, reference: Path, data: Data, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli.index"
    code = main(
        [
            "build", str(npy), str(out), "--nlist", str(NLIST), "--metric", "l2",
            "--batch-size", str(BATCH), "--workers", "2", "--no-fsync",
        ]
    )  # fmt: skip
    assert code == 0
    assert "assign and" in capsys.readouterr().out
    assert_same_index(reference, out, data[1])


# ---------------------------------------------------------------- idempotence and retries


@pytest.mark.parametrize("engine", ["inline", "process"])
def test_task_crash_is_retried_with_identical_result(
    tmp_path: Path, npy: Path, reference: Path, data: Data, engine: str
) -> None:
    marker = tmp_path / "crashed"

    # Shard 1 crashes once, after writing part of its shard (its first attempt only).
    inject = crash_shard(marker, start=PER_TASK)

    with contextlib.ExitStack() as stack:
        inner: Executor = (
            InlineExecutor() if engine == "inline" else stack.enter_context(_forkserver_pool(2))
        )
        executor = Recording(inner, inject)
        out = tmp_path / "retried.index"
        report = build_parallel(
            npy,
            out,
            nlist=NLIST,
            batch_size=BATCH,
            rows_per_task=PER_TASK,
            executor=executor,
            durable=False,
        )
    assert marker.exists()
    assert report.retries == 1
    attempts = [a[0].attempt for _, a, _ in executor.calls if isinstance(a[0], ShardTask)]
    assert sorted(attempts) == [0, 0, 0, 1]
    assert_same_index(reference, out, data[1])  # includes: no temporary files or dirs left


def _shard_task(tmp_path: Path, npy: Path, index: Path, **kw: Any) -> ShardTask:
    meta = fmt.read_meta(index)
    fields: dict[str, Any] = {
        "source": str(npy),
        "dataset": None,
        "ids": None,
        "source_tag": "tag",
        "index": str(index),
        "trained_hash": fmt.trained_hash(meta),
        "shard_dir": str(tmp_path / "work" / "000000"),
        "start": 0,
        "stop": 2 * BATCH,
        "batch_size": BATCH,
        "durable": False,
    }
    fields.update(kw)
    return ShardTask(**fields)


def test_write_shard_retry_cleans_temp_dir_and_duplicates_are_harmless(
    tmp_path: Path, npy: Path, reference: Path
) -> None:
    marker = tmp_path / "crashed"
    task = _shard_task(tmp_path, npy, reference, crash_marker=str(marker))
    with pytest.raises(InjectedCrash):
        write_shard(task)
    work = tmp_path / "work"
    left = temp_leftovers(work)
    assert len(left) == 1
    assert (left[0] / "rows.vec").stat().st_size > 0
    first = write_shard(dataclasses.replace(task, attempt=1))  # the retry
    assert not first.reused
    assert not temp_leftovers(work)
    files = {p.name: p.read_bytes() for p in Path(task.shard_dir).iterdir()}
    again = write_shard(dataclasses.replace(task, attempt=2))  # a duplicated task
    assert again.reused
    np.testing.assert_array_equal(first.counts, again.counts)
    assert first.max_id == again.max_id == 2 * BATCH - 1
    assert {p.name: p.read_bytes() for p in Path(task.shard_dir).iterdir()} == files
    with pytest.raises(ValueError, match=r"rows 0\.\.1000"):  # same place, other rows
        write_shard(dataclasses.replace(task, stop=BATCH))


@pytest.mark.parametrize("when", ["while-filling", "before-rename"])
def test_a_duplicate_running_at_the_same_time_that_publishes_first(
    tmp_path: Path, npy: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A duplicate of a running task (a worker presumed lost but still running) starts by
    removing the temporary directories of earlier attempts, this attempt's included, then
    publishes the shard. The first attempt returns that shard instead of failing."""
    task = _shard_task(tmp_path, npy, reference)
    duplicate: list[ShardResult] = []
    started = False

    def run_duplicate() -> None:
        nonlocal started
        if not started:  # once: the duplicate's own calls pass through
            started = True
            duplicate.append(write_shard(dataclasses.replace(task, attempt=1)))

    if when == "while-filling":
        real_write_all = parallel_module._write_all

        def write_all(fd: int, data: Any, offset: int) -> None:
            run_duplicate()
            real_write_all(fd, data, offset)

        monkeypatch.setattr(parallel_module, "_write_all", write_all)
    else:
        real_fill = parallel_module._fill_shard

        def fill(t: ShardTask, tmp: Path) -> ShardResult:
            out = real_fill(t, tmp)
            run_duplicate()
            return out

        monkeypatch.setattr(parallel_module, "_fill_shard", fill)
    first = write_shard(task)
    assert first.reused
    assert not duplicate[0].reused
    np.testing.assert_array_equal(first.counts, duplicate[0].counts)
    assert not temp_leftovers(tmp_path / "work")
    monkeypatch.undo()
    again = write_shard(dataclasses.replace(task, attempt=2))
    assert again.reused
    np.testing.assert_array_equal(again.counts, first.counts)


def test_only_the_run_that_wrote_an_unsynced_shard_reuses_it(
    tmp_path: Path, npy: Path, reference: Path
) -> None:
    task = _shard_task(tmp_path, npy, reference)  # durable=False
    assert not write_shard(task).reused
    assert write_shard(dataclasses.replace(task, attempt=1)).reused  # a retry of its run
    other = _shard_task(tmp_path, npy, reference)  # made apart: another run by default
    assert other.run != task.run
    assert not write_shard(other).reused
    durable = _shard_task(tmp_path, npy, reference, durable=True)
    assert not write_shard(durable).reused  # the unsynced shard is not trusted either
    assert write_shard(_shard_task(tmp_path, npy, reference)).reused  # a fsynced one is


@pytest.mark.parametrize("first_durable", [True, False], ids=["fsynced", "not-fsynced"])
def test_failed_build_resumes_reusing_the_shards_it_can_trust(
    tmp_path: Path, npy: Path, reference: Path, data: Data, first_durable: bool
) -> None:
    """A resumed build reuses the shards a failed run published, unless that run did not
    fsync them: after a power loss their files may hold zeros at full size, which no
    checksum covers, so those are redone."""
    marker = tmp_path / "crashed"
    inject = crash_shard(marker, start=2 * PER_TASK)

    out = tmp_path / "resumed.index"
    kw: dict[str, Any] = {"nlist": NLIST, "batch_size": BATCH, "rows_per_task": PER_TASK}
    executor = Recording(InlineExecutor(), inject)
    with pytest.raises(InjectedCrash):
        build_parallel(npy, out, **kw, executor=executor, retries=0, durable=first_durable)
    with pytest.raises(IndexExistsError):
        build_parallel(npy, out, **kw)
    published = sorted((out / WORK_DIR_NAME / "shards").glob("[0-9]*"))
    assert len(published) == 2
    if not first_durable:  # what a power loss may leave of a file never fsynced
        vec = published[0] / fmt.SHARD_FILES[0]
        vec.write_bytes(bytes(vec.stat().st_size))
    report = build_parallel(npy, out, **kw, resume=True, durable=False)
    assert not report.trained
    assert report.shards_reused == (2 if first_durable else 0)
    assert_same_index(reference, out, data[1])
    again = build_parallel(npy, out, **kw, resume=True)
    assert again.shards == 0
    assert again.generation == 1


def test_work_dir_of_a_failed_build_goes_with_whatever_finishes_or_replaces_it(
    tmp_path: Path, npy: Path, reference: Path, data: Data
) -> None:
    kw: dict[str, Any] = {"nlist": NLIST, "batch_size": BATCH, "rows_per_task": PER_TASK}
    outs = [tmp_path / "single.index", tmp_path / "replaced.index"]
    for i, out in enumerate(outs):
        inject = crash_shard(tmp_path / f"crashed{i}", start=2 * PER_TASK)
        with pytest.raises(InjectedCrash):
            build_parallel(npy, out, **kw, executor=Recording(InlineExecutor(), inject), retries=0)
        assert (out / WORK_DIR_NAME).is_dir()
    # A single-process resume finishes the build: the parallel shards are obsolete.
    build(npy, outs[0], nlist=NLIST, batch_size=BATCH, resume=True)
    assert not (outs[0] / WORK_DIR_NAME).exists()
    assert_same_index(reference, outs[0], data[1])
    with open_index(outs[1], "w", dim=DIM, nlist=NLIST):
        pass
    assert not (outs[1] / WORK_DIR_NAME).exists()


def test_resume_refuses_a_partial_single_process_build(tmp_path: Path, npy: Path) -> None:
    out = tmp_path / "partial.index"
    with open_index(out, "w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(np.load(npy)[:2000])
        ix.add(np.load(npy)[:500])
    with pytest.raises(ValueError, match="single-process"):
        build_parallel(npy, out, nlist=NLIST, resume=True)


# ------------------------------------------------------------------------ task arguments


def _arrays_in(obj: Any) -> Iterator[Any]:
    if isinstance(obj, np.ndarray):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _arrays_in(getattr(obj, f.name))
    elif isinstance(obj, list | tuple | set):
        for item in obj:
            yield from _arrays_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays_in(item)


def test_no_task_argument_is_an_array(tmp_path: Path, npy: Path) -> None:
    executor = Recording(InlineExecutor())
    ids_path = tmp_path / "ids.npy"
    np.save(ids_path, np.arange(N, dtype=np.int64))
    build_parallel(
        npy,
        tmp_path / "guard.index",
        nlist=NLIST,
        ids=ids_path,
        batch_size=BATCH,
        rows_per_task=PER_TASK,
        executor=executor,
        durable=False,
    )
    kinds = {type(args[0]).__name__ for _, args, _ in executor.calls}
    assert kinds == {"ShardTask", "MergeTask"}
    for _, args, kwargs in executor.calls:
        assert not kwargs
        assert not list(_arrays_in(args)), "a task received an array"
        assert len(pickle.dumps(args)) < 4096, "a task received a large argument"


def test_arrays_are_refused_as_inputs(tmp_path: Path, data: Data) -> None:
    with pytest.raises(TypeError, match="never arrays"):
        build_parallel(data[0], tmp_path / "x.index", nlist=NLIST)  # type: ignore[arg-type]


def test_run_tasks_raises_permanent_errors_at_once() -> None:
    calls: list[int] = []

    def boom(task: MergeTask) -> None:
        calls.append(task.attempt)
        raise ValueError("bad input")

    task = MergeTask("/nowhere", "0" * 64, 0, 1, (), False)
    for executor in (None, InlineExecutor()):
        calls.clear()
        with pytest.raises(ValueError, match="bad input"):
            run_tasks(executor, boom, [task], retries=3)
        assert calls == [0]


def test_run_tasks_gives_up_after_retries() -> None:
    calls: list[int] = []

    def flaky(task: MergeTask) -> int:
        calls.append(task.attempt)
        if task.attempt < 2:
            raise OSError("transient")
        return task.lo

    task = MergeTask("/nowhere", "0" * 64, 7, 8, (), False)
    assert run_tasks(InlineExecutor(), flaky, [task], retries=2) == ([7], 2)
    calls.clear()
    with pytest.raises(OSError, match="transient"):
        run_tasks(None, flaky, [task], retries=1)
    assert calls == [0, 1]


# ----------------------------------------------------------------- other centroids refused


def _trained(path: Path, x: NDArray[np.float32], seed: int) -> Path:
    with open_index(path, "w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x[:3000], seed=seed)
    return path


def test_merge_refuses_shards_with_other_centroids(tmp_path: Path, npy: Path, data: Data) -> None:
    a = _trained(tmp_path / "a.index", data[0], seed=0)
    b = _trained(tmp_path / "b.index", data[0], seed=1)
    task = _shard_task(tmp_path, npy, a)
    write_shard(task)
    digest_b = fmt.trained_hash(fmt.read_meta(b))
    with pytest.raises(ValueError, match="other centroids"):
        merge_lists(MergeTask(str(b), digest_b, 0, NLIST, (ShardSource(task.shard_dir),), False))
    assert not list((b / fmt.LISTS_DIR).glob("*.vec"))  # refused before writing a list
    # A task planned for index a but pointed at index b refuses to assign.
    with pytest.raises(ValueError, match="trained hash differs"):
        write_shard(dataclasses.replace(task, index=str(b), shard_dir=str(tmp_path / "w2" / "0")))
    # A published shard of another build in a reused work directory is refused too.
    with pytest.raises(ValueError, match="other centroids"):
        write_shard(dataclasses.replace(task, trained_hash=digest_b))


def test_reused_work_dir_of_another_build_is_refused(tmp_path: Path, npy: Path) -> None:
    work = tmp_path / "work"
    kw: dict[str, Any] = {"nlist": NLIST, "batch_size": BATCH, "work_dir": work}
    with pytest.raises(InjectedCrash):
        build_parallel(
            npy,
            tmp_path / "one.index",
            **kw,
            retries=0,
            executor=Recording(
                InlineExecutor(),
                lambda t: (
                    dataclasses.replace(t, crash_marker=str(tmp_path / "m"))
                    if isinstance(t, ShardTask) and t.start == 2 * BATCH
                    else t
                ),
            ),
        )
    with pytest.raises(ValueError, match="other centroids"):
        build_parallel(npy, tmp_path / "two.index", **kw, seed=5)


def test_merge_indexes_refuses_other_centroids(tmp_path: Path, data: Data) -> None:
    a = _trained(tmp_path / "a.index", data[0], seed=0)
    b = _trained(tmp_path / "b.index", data[0], seed=1)
    with pytest.raises(ValueError, match="other centroids"):
        merge_indexes(tmp_path / "ab.index", [a, b])
    assert not (tmp_path / "ab.index").exists()
    assert main(["merge", str(tmp_path / "ab.index"), str(a), str(b)]) == 1


# --------------------------------------------------------------------- merging indexes


def _shards(tmp_path: Path, x: NDArray[np.float32], bounds: list[int]) -> tuple[Path, list[Path]]:
    """A union index over ``x`` and one index per slice, all with the union's centroids;
    every slice's ids restart at 0 (they collide)."""
    union = tmp_path / "union.index"
    with open_index(union, "w-", dim=DIM, nlist=NLIST) as u:
        u.train(x[:3000])
        u.add(x)
        centroids, training = u.centroids, u.metadata.training
    parts = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        path = tmp_path / f"part{i}.index"
        with open_index(path, "w-", dim=DIM, nlist=NLIST) as ix:
            ix.set_centroids(centroids, training=training)
            ix.add(x[a:b])
        parts.append(path)
    return union, parts


def test_merge_with_auto_offsets_equals_union(tmp_path: Path, data: Data) -> None:
    union, parts = _shards(tmp_path, data[0], [0, 2500, 2600, N])
    with pytest.raises(ValueError, match="is in both"):
        merge_indexes(tmp_path / "dup.index", parts)
    out = tmp_path / "merged.index"
    report = merge_indexes(out, parts, id_offsets="auto", executor=InlineExecutor())
    assert report.id_offsets == (0, 2500, 2600)
    assert report.ntotal == N
    # Offsets turn each part's 0-based ids into row numbers: the union, byte for byte.
    assert_same_index(union, out, data[1])
    assert "merged 3 indexes" in report.summary()


def test_merge_drops_removed_rows_and_reads_compacted_lists(
    tmp_path: Path, data: Data, committed_rows: Any
) -> None:
    x, q = data
    union, parts = _shards(tmp_path, x, [0, 3000, N])
    removed0 = np.arange(0, 3000, 7)  # stay tombstones in part 0
    removed1 = np.arange(0, 3000, 5)  # compacted away in part 1 (list files at generation 1)
    with open_index(parts[0], "r+") as ix:
        assert ix.remove(removed0) == len(removed0)
    with open_index(parts[1], "r+") as ix:
        ix.remove(removed1)
        ix.compact()
        assert commit(parts[1]).list_gens.any()
    gone = np.concatenate([removed0, removed1 + 3000])
    with open_index(union, "r+") as u:
        u.remove(gone)
        u.compact()
    out = tmp_path / "merged.index"
    report = merge_indexes(out, parts, id_offsets=[0, 3000])
    assert report.dropped == len(removed0)
    assert report.ntotal == N - len(gone)
    want_ids, want_vecs = committed_rows(union)
    got_ids, got_vecs = committed_rows(out)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_vecs, want_vecs)
    with open_index(out) as m, open_index(union) as u:
        assert m.nremoved == 0
        np.testing.assert_array_equal(m.list_sizes(), u.list_sizes())
        dm, im = m.search(q, k=10, nprobe=4)
        du, iu = u.search(q, k=10, nprobe=4)
        np.testing.assert_array_equal(im, iu)
        np.testing.assert_array_equal(dm, du)
        assert m.verify().ok
    with pytest.raises(ValueError, match="id offsets"):
        merge_indexes(tmp_path / "bad.index", parts, id_offsets=[0])
    with pytest.raises(ValueError, match="is in both"):
        merge_indexes(tmp_path / "bad.index", parts, id_offsets=[0, 2990])


@pytest.mark.parametrize("which", [0, 1], ids=["vec", "ids"])
def test_merge_refuses_a_source_list_that_fails_its_checksum(
    tmp_path: Path, data: Data, which: int
) -> None:
    # The merged lists get fresh checksums: copying a damaged list would make it verify.
    _, parts = _shards(tmp_path, data[0], [0, 3000, N])
    rec = commit(parts[1])
    lid = int(np.flatnonzero(rec.list_counts)[-1])
    name = fmt.list_file_names(lid, 0)[which]
    path = parts[1] / name
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    out = tmp_path / "merged.index"
    with pytest.raises(diskivf.errors.CorruptIndexError, match=f"list {lid} file {name}"):
        merge_indexes(out, parts, id_offsets=[0, 3000], retries=0)
    with open_index(out) as m:
        assert m.ntotal == 0  # nothing of the merge was committed
    assert not list((out / fmt.LISTS_DIR).glob(".*.tmp"))


def test_merge_accepts_interleaved_disjoint_ids(tmp_path: Path, data: Data) -> None:
    x = data[0][:2000]
    paths = []
    for parity in (0, 1):
        path = tmp_path / f"p{parity}.index"
        with open_index(path, "w-", dim=DIM, nlist=NLIST) as ix:
            if parity == 0:
                ix.train(x)
                centroids = ix.centroids
            else:
                ix.set_centroids(centroids)
            ix.add(x[parity::2], ids=np.arange(parity, 2000, 2))
        paths.append(path)
    report = merge_indexes(tmp_path / "m.index", paths)  # id ranges overlap, sets do not
    assert report.ntotal == 2000
    assert report.id_offsets == (0, 0)
    with open_index(tmp_path / "m.index") as m:
        _, ids = m.search(x[:50], k=1, nprobe=NLIST)
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))


def test_cli_merge(tmp_path: Path, data: Data, capsys: pytest.CaptureFixture[str]) -> None:
    union, parts = _shards(tmp_path, data[0], [0, 4000, N])
    out = tmp_path / "cli.index"
    assert main(["merge", str(out), *map(str, parts)]) == 1
    assert "--id-offsets auto" in capsys.readouterr().err
    assert main(["merge", str(out), *map(str, parts), "--id-offsets", "auto"]) == 0
    assert f"{N:,} vectors" in capsys.readouterr().out
    assert list_files(out) == list_files(union)
    dup = tmp_path / "dup.index"
    assert main(["merge", str(dup), *map(str, parts), "--allow-duplicate-ids", "--quiet"]) == 0
    with open_index(dup) as ix:
        assert ix.ntotal == N
        assert commit(dup).next_id == 4000
    assert (
        main(["merge", str(tmp_path / "x.index"), str(parts[0]), "--id-offsets", "1,x"]) == 2
    )  # a usage error


def test_set_centroids(tmp_path: Path, data: Data) -> None:
    a = _trained(tmp_path / "a.index", data[0], seed=0)
    with open_index(a) as ia, open_index(tmp_path / "b.index", "w-", dim=DIM, nlist=NLIST) as ib:
        with pytest.raises(ValueError, match="shape"):
            ib.set_centroids(ia.centroids[:3])
        bad = ia.centroids.copy()
        bad[0, 0] = np.nan
        with pytest.raises(ValueError, match="finite"):
            ib.set_centroids(bad)
        ib.set_centroids(ia.centroids, training=ia.metadata.training)
        assert fmt.trained_hash(ib.metadata) == fmt.trained_hash(ia.metadata)
        with pytest.raises(diskivf.errors.AlreadyTrainedError):
            ib.set_centroids(ia.centroids)


def test_adopt_lists_validates(tmp_path: Path, data: Data) -> None:
    a = _trained(tmp_path / "a.index", data[0], seed=0)
    zeros = np.zeros(NLIST, np.int64)
    with open_index(a, "r+") as ix:
        with pytest.raises(ValueError, match="shape"):
            ix.adopt_lists(zeros[:3], zeros, zeros, next_id=0)
        counts = zeros.copy()
        counts[2] = 5
        with pytest.raises(diskivf.errors.CorruptIndexError, match="missing"):
            ix.adopt_lists(counts, zeros, zeros, next_id=5)
        assert ix.generation == 0
        ix.add(data[0][:10])
        with pytest.raises(ValueError, match="empty index"):
            ix.adopt_lists(zeros, zeros, zeros, next_id=0)


def test_shard_manifest_round_trip() -> None:
    m = fmt.ShardManifest(0, 10, 4, 8, "<f4", "ab" * 32, 9, "12:34", "c0ffee" * 5, True)
    assert fmt.decode_shard_manifest(fmt.encode_shard_manifest(m)) == m
    # A manifest from before the run and durable keys: no run, not known to be durable.
    fields = {k: getattr(m, k) for k in ("start", "stop", "nlist", "dim", "vector_dtype")}
    fields |= {"trained_hash": m.trained_hash, "max_id": 9, "source_tag": "12:34"}
    body = msgpack.packb(fields, use_bin_type=True)
    old = fmt.decode_shard_manifest(fmt._pack_preamble(fmt.SHARD_MAGIC, body) + body)
    assert old == dataclasses.replace(m, run="", durable=False)
    raw = bytearray(fmt.encode_shard_manifest(m))
    raw[-1] ^= 1
    with pytest.raises(diskivf.errors.CorruptIndexError):
        fmt.decode_shard_manifest(bytes(raw))
    with pytest.raises(diskivf.errors.FormatError):
        fmt.decode_shard_manifest(b"\x93DISKIVF" + bytes(40))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trained_hash", "ab" * 31),
        ("trained_hash", "XY" * 32),
        ("source_tag", 7),
        ("run", 7),
        ("run", "a" * 65),
        ("durable", 1),
    ],
)
def test_shard_manifest_fields_are_validated(field: str, value: Any) -> None:
    m = dataclasses.replace(fmt.ShardManifest(0, 10, 4, 8, "<f4", "ab" * 32, 9), **{field: value})
    with pytest.raises(diskivf.errors.CorruptIndexError, match=field):
        fmt.decode_shard_manifest(fmt.encode_shard_manifest(m))


def test_shard_offsets_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "offsets.i8"
    path.write_bytes(fmt.encode_shard_offsets(np.array([3, 0, 2, 5], np.int64)))
    np.testing.assert_array_equal(fmt.read_shard_offsets(path, 4, 10, 0, 4), [0, 3, 3, 5, 10])
    np.testing.assert_array_equal(fmt.read_shard_offsets(path, 4, 10, 1, 2), [3, 3])
    with pytest.raises(ValueError, match="lo <= hi"):
        fmt.read_shard_offsets(path, 4, 10, 3, 2)
    with pytest.raises(diskivf.errors.CorruptIndexError, match="bytes"):
        fmt.read_shard_offsets(path, 5, 10, 0, 5)  # a file of another nlist
    with pytest.raises(diskivf.errors.CorruptIndexError, match="increasing offsets of 9"):
        fmt.read_shard_offsets(path, 4, 9, 0, 4)  # not the manifest's row count
    for bad in ([0, 3, 2, 5, 10], [1, 3, 3, 5, 10], [0, 3, 3, 5, 11], [-1, 3, 3, 5, 10]):
        path.write_bytes(np.array(bad, "<i8").tobytes())
        with pytest.raises(diskivf.errors.CorruptIndexError, match="increasing offsets"):
            fmt.read_shard_offsets(path, 4, 10, 0, 4)


@pytest.mark.slow
def test_dask_build_larger_with_retry(tmp_path: Path) -> None:
    distributed = _dask()
    x, q = clustered(200_000, 32, nq=100, nclusters=500, seed=11)
    npy = tmp_path / "big.npy"
    np.save(npy, x)
    ref = tmp_path / "ref.index"
    build(npy, ref, nlist=256, metric="cosine", batch_size=4096, durable=False)
    marker = tmp_path / "crashed"
    inject = crash_shard(marker, start=4 * 4096)

    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        out = tmp_path / "dask.index"
        report = build_parallel(
            npy,
            out,
            nlist=256,
            metric="cosine",
            batch_size=4096,
            rows_per_task=4096 * 4,
            executor=Recording(client.get_executor(), inject),
        )
    assert report.retries == 1
    assert marker.exists()
    assert_same_index(ref, out, q)


def test_process_executor_helper(tmp_path: Path, npy: Path, reference: Path, data: Data) -> None:
    with pytest.raises(ValueError, match="workers"):
        process_executor(0)
    with process_executor(2) as pool:
        out = tmp_path / "helper.index"
        build_parallel(
            npy,
            out,
            nlist=NLIST,
            batch_size=BATCH,
            executor=pool,
            blas_threads=1,
            durable=os.environ.get("DISKIVF_TEST_FSYNC") == "1",
        )
    assert_same_index(reference, out, data[1])


@pytest.mark.parametrize("spherical", [False, True])
def test_refined_assignment_does_not_depend_on_block_shapes(spherical: bool) -> None:
    # Points on the bisectors of centroid pairs: float32 products then pick either side
    # depending on the GEMM kernel, which changes with shapes and BLAS threads.
    rng = np.random.default_rng(1)
    c = rng.standard_normal((32, 16)).astype(np.float32)
    if spherical:
        c /= np.linalg.norm(c, axis=1, keepdims=True)
    i, j = rng.integers(0, 32, (2, 5000))
    x = ((c[i] + c[j]) / 2 + rng.standard_normal((5000, 16)) * 1e-6).astype(np.float32)
    x64, c64 = x[:, None, :].astype(np.float64), c[None].astype(np.float64)
    if spherical:
        exact = np.argmax((x64 * c64).sum(-1), axis=1)
    else:
        exact = np.argmin(((x64 - c64) ** 2).sum(-1), axis=1)
    for block in (1, 7, 333, 5000):
        labels, _ = kmeans.assign(x, c, spherical=spherical, block_rows=block, refine=True)
        np.testing.assert_array_equal(labels, exact)
