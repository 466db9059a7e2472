"""Tests for diskivf.build: sampling, streaming, commits per batch, resume, validation."""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import diskivf.build as build_mod
from diskivf import format as fmt
from diskivf.build import build, sample_rows
from diskivf.demo import clustered
from diskivf.errors import IndexExistsError
from diskivf.index import Index, open_index
from diskivf.segments import ListWriter

N, DIM, NLIST = 6000, 12, 16


@pytest.fixture(scope="module")
def data() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    return clustered(N, DIM, nq=50, nclusters=40, seed=3)


@pytest.fixture
def npy(tmp_path: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]) -> Path:
    path = tmp_path / "base.npy"
    np.save(path, data[0])
    return path


def list_files(index_dir: Path) -> dict[str, bytes]:
    """Every list file's bytes, by name."""
    return {p.name: p.read_bytes() for p in sorted((index_dir / fmt.LISTS_DIR).iterdir())}


def committed_list_files(index_dir: Path) -> dict[str, bytes]:
    """Only the committed prefix of every list file (what readers see)."""
    with open_index(index_dir) as ix:
        rec = fmt.read_commit(index_dir, ix.nlist, ix.metadata.index_uuid)
        rowbytes = ix.dim * ix.dtype.itemsize
    out = {}
    for lid in np.flatnonzero(rec.list_counts).tolist():
        count = int(rec.list_counts[lid])
        for name, nbytes in zip(
            fmt.list_file_names(lid, int(rec.list_gens[lid])),
            (count * rowbytes, count * 8),
            strict=True,
        ):
            out[name] = (index_dir / name).read_bytes()[:nbytes]
    return out


def search_all(index_dir: Path, q: NDArray[np.float32]) -> tuple[NDArray[Any], NDArray[Any]]:
    with open_index(index_dir) as ix:
        d, i = ix.search(q, k=10, nprobe=4)
    return d, i


class Fault(OSError):
    """Injected write failure (stands in for a crash in the middle of a batch)."""


def fail_after_writes(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    """Make ListWriter.write write normally ``calls`` times, then half a buffer, then fail."""
    real = ListWriter.write
    count = [0]

    def write(self: ListWriter, name: str, offset: int, data: bytes | memoryview) -> None:
        count[0] += 1
        if count[0] > calls:
            view = memoryview(data).cast("B")
            real(self, name, offset, view[: len(view) // 2])  # a torn append
            raise Fault("injected crash")
        real(self, name, offset, data)

    monkeypatch.setattr(ListWriter, "write", write)


# ------------------------------------------------------------------------------- sample_rows


@pytest.mark.parametrize(("n", "m"), [(10, 3), (10, 10), (10, 20), (1000, 600), (10**6, 5000)])
def test_sample_rows_sorted_distinct_in_range_deterministic(n: int, m: int) -> None:
    rows = sample_rows(n, m, seed=7)
    assert rows.dtype == np.int64
    assert len(rows) == min(n, m)
    assert np.all(np.diff(rows) > 0)
    assert rows.min() >= 0
    assert rows.max() < n
    np.testing.assert_array_equal(rows, sample_rows(n, m, seed=7))
    if m < n:
        assert not np.array_equal(rows, sample_rows(n, m, seed=8))


def test_sample_rows_is_uniform() -> None:
    # Every row of 50 should be picked about trials * m / n = 400 times (sd ~ 17).
    hits = np.zeros(50, np.int64)
    for seed in range(2000):
        hits[sample_rows(50, 10, seed)] += 1
    assert hits.sum() == 20000
    assert hits.min() > 330, hits
    assert hits.max() < 470, hits
    # that was the sparse path (2m <= n); now the dense one
    hits = np.zeros(50, np.int64)
    for seed in range(2000):
        hits[sample_rows(50, 40, seed)] += 1
    assert hits.min() > 1500, hits
    assert hits.max() < 1700, hits


def test_sample_rows_memory_is_o_of_m() -> None:
    # numpy's choice(replace=False) would build a permutation of 10**12 rows here.
    rows = sample_rows(10**12, 1000, seed=0)
    assert len(np.unique(rows)) == 1000
    assert rows.max() < 10**12


def test_sample_rows_rejects_negative() -> None:
    with pytest.raises(ValueError, match="n >= 0"):
        sample_rows(-1, 3, 0)


# ------------------------------------------------------------------------------- building


def test_build_equals_train_on_sample_then_add(
    tmp_path: Path, npy: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    x = data[0]
    report = build(npy, tmp_path / "b.index", nlist=NLIST, batch_size=1000, seed=5)
    m = min(N, 256 * NLIST)
    assert report.train_size == m == 4096
    assert (report.n, report.dim, report.rows_added, report.commits) == (N, DIM, N, 6)
    assert report.trained
    assert report.rows_before == 0
    assert report.generation == 6

    with open_index(tmp_path / "ref.index", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x[sample_rows(N, m, 5)], seed=5, max_points_per_centroid=math.ceil(m / NLIST))
        ix.add(x)
    assert list_files(tmp_path / "b.index") == list_files(tmp_path / "ref.index")
    with open_index(tmp_path / "b.index") as ix:
        assert ix.ntotal == N
        assert ix.generation == 6
        assert ix.metadata.training is not None
        assert ix.metadata.training.npoints == m
        assert ix.metadata.training.seed == 5


def test_batch_size_changes_commits_not_lists(tmp_path: Path, npy: Path) -> None:
    a = build(npy, tmp_path / "a.index", nlist=NLIST, batch_size=1000)
    b = build(npy, tmp_path / "b.index", nlist=NLIST, batch_size=777)
    assert (a.commits, b.commits) == (6, 8)
    assert list_files(tmp_path / "a.index") == list_files(tmp_path / "b.index")


def test_progress_callable_sees_every_commit(tmp_path: Path, npy: Path) -> None:
    calls: list[tuple[int, int]] = []
    build(
        npy,
        tmp_path / "p.index",
        nlist=NLIST,
        batch_size=2500,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(2500, N), (5000, N), (6000, N)]


def test_default_ids_are_row_numbers(
    tmp_path: Path, npy: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    build(npy, tmp_path / "i.index", nlist=NLIST, batch_size=1000)
    with open_index(tmp_path / "i.index") as ix:
        _, ids = ix.search(data[0][[0, 4321, 5999]], k=1, nprobe=NLIST)
    assert ids.ravel().tolist() == [0, 4321, 5999]


def test_explicit_ids(
    tmp_path: Path, npy: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    ids = np.random.default_rng(0).permutation(N).astype(np.int64) * 3 + 10
    np.save(tmp_path / "ids.npy", ids)
    build(npy, tmp_path / "e.index", nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000)
    with open_index(tmp_path / "e.index") as ix:
        _, found = ix.search(data[0][[0, 17, 5999]], k=1, nprobe=NLIST)
    assert found.ravel().tolist() == ids[[0, 17, 5999]].tolist()


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_other_metrics_and_float16(
    tmp_path: Path, npy: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]], metric: str
) -> None:
    build(npy, tmp_path / "m.index", nlist=NLIST, metric=metric, dtype="float16", batch_size=2000)
    with open_index(tmp_path / "m.index") as ix:
        assert (ix.metric, ix.dtype, ix.ntotal) == (metric, np.dtype("<f2"), N)


def test_train_size(tmp_path: Path, npy: Path) -> None:
    r = build(npy, tmp_path / "t.index", nlist=NLIST, train_size=500)
    with open_index(tmp_path / "t.index") as ix:
        assert ix.metadata.training is not None
        assert ix.metadata.training.npoints == 500
    assert r.train_size == 500
    r = build(npy, tmp_path / "t2.index", nlist=NLIST, train_size=10**9)  # capped at n
    assert r.train_size == N
    with pytest.raises(ValueError, match="train_size >= nlist=16"):
        build(npy, tmp_path / "t3.index", nlist=NLIST, train_size=15)
    assert not (tmp_path / "t3.index").exists()


class Recorder:
    """A VectorSource that records which rows are read."""

    def __init__(self, x: NDArray[np.float32]) -> None:
        self.x = x
        self.shape = x.shape
        self.dtype = x.dtype
        self.rows_read = 0
        self.fancy_reads: list[int] = []

    def __getitem__(self, key: Any) -> NDArray[np.float32]:
        out: NDArray[np.float32] = self.x[key]
        if isinstance(key, slice):
            self.rows_read += len(out)
        else:
            self.fancy_reads.append(len(out))
            self.rows_read += len(out)
        return out


def test_reads_only_the_sample_then_each_row_once(
    tmp_path: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    src = Recorder(data[0])
    build(src, tmp_path / "r.index", nlist=4, train_size=300, batch_size=1000)
    assert sum(src.fancy_reads) == 300  # the training sample: only its rows
    assert src.rows_read == 300 + N  # then every row once for adding


def test_drop_pages_releases_mapped_pages(tmp_path: Path) -> None:
    path = tmp_path / "big.npy"
    np.save(path, np.ones((4096, 4096), np.float32))  # 64 MiB

    def rss_file_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
        raise AssertionError("no RssFile in /proc/self/status")

    x = np.load(path, mmap_mode="r")
    before = rss_file_kib()
    assert float(np.asarray(x, dtype=np.float64).sum()) == 4096.0 * 4096  # touch every page
    touched = rss_file_kib()
    build_mod._drop_pages(x)
    after = rss_file_kib()
    assert touched - before > 60_000
    assert touched - after > 60_000
    assert float(x[-1, -1]) == 1.0  # still readable: pages fault back in from the page cache
    assert isinstance(x._mmap, mmap.mmap)


# -------------------------------------------------------------------------------- resume


def test_resume_after_crash_mid_batch_equals_uninterrupted(
    tmp_path: Path,
    npy: Path,
    data: tuple[NDArray[np.float32], NDArray[np.float32]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = tmp_path / "ref.index"
    build(npy, ref, nlist=NLIST, batch_size=1000)
    out = tmp_path / "out.index"
    with monkeypatch.context() as mp:
        # each batch writes 2 files per touched list: 2 * 16 per batch, so the third batch
        fail_after_writes(mp, 2 * 16 * 2 + 9)
        with pytest.raises(Fault):
            build(npy, out, nlist=NLIST, batch_size=1000)
    with open_index(out) as ix:
        assert ix.ntotal == 2000
        assert ix.generation == 2
    # the crash left torn bytes past the committed prefix of some list
    assert list_files(out) != committed_list_files(out)

    report = build(npy, out, nlist=NLIST, batch_size=1000, resume=True)
    assert (report.rows_before, report.rows_added, report.trained) == (2000, 4000, False)
    assert list_files(out) == list_files(ref)
    for a, b in zip(search_all(out, data[1]), search_all(ref, data[1]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("metric", "dtype"), [("cosine", "float32"), ("ip", "float16")])
def test_resume_other_metrics_and_dtypes(
    tmp_path: Path, npy: Path, monkeypatch: pytest.MonkeyPatch, metric: str, dtype: str
) -> None:
    kw: dict[str, Any] = {"nlist": NLIST, "metric": metric, "dtype": dtype, "batch_size": 1000}
    build(npy, tmp_path / "ref.index", **kw)
    out = tmp_path / "out.index"
    with monkeypatch.context() as mp:
        fail_after_writes(mp, 70)
        with pytest.raises(Fault):
            build(npy, out, **kw)
    assert build(npy, out, resume=True, **kw).rows_before == 2000
    assert list_files(out) == list_files(tmp_path / "ref.index")


def test_resume_with_another_batch_size_still_equal(
    tmp_path: Path, npy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tmp_path / "ref.index"
    build(npy, ref, nlist=NLIST, batch_size=1000)
    out = tmp_path / "out.index"
    with monkeypatch.context() as mp:
        fail_after_writes(mp, 40)
        with pytest.raises(Fault):
            build(npy, out, nlist=NLIST, batch_size=1000)
    build(npy, out, nlist=NLIST, batch_size=2500, resume=True)
    assert list_files(out) == list_files(ref)


def test_resume_after_crash_during_training(
    tmp_path: Path, npy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = tmp_path / "ref.index"
    build(npy, ref, nlist=NLIST, batch_size=1000, seed=9)
    out = tmp_path / "out.index"
    with monkeypatch.context() as mp:

        def boom(self: Index, *a: Any, **k: Any) -> None:
            raise Fault("killed while training")

        mp.setattr(Index, "train", boom)
        with pytest.raises(Fault):
            build(npy, out, nlist=NLIST, batch_size=1000, seed=9)
    with open_index(out) as ix:
        assert not ix.is_trained
    report = build(npy, out, nlist=NLIST, batch_size=1000, seed=9, resume=True)
    assert report.trained
    assert report.rows_before == 0
    assert list_files(out) == list_files(ref)
    with open_index(out) as a, open_index(ref) as b:
        np.testing.assert_array_equal(a.centroids, b.centroids)


def test_resume_with_ids_file(tmp_path: Path, npy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = np.random.default_rng(1).permutation(N).astype(np.int64)
    np.save(tmp_path / "ids.npy", ids)
    ref, out = tmp_path / "ref.index", tmp_path / "out.index"
    build(npy, ref, nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000)
    with monkeypatch.context() as mp:
        fail_after_writes(mp, 70)
        with pytest.raises(Fault):
            build(npy, out, nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000)
    # the wrong ids are refused, the right ones accepted
    np.save(tmp_path / "other.npy", ids[::-1].copy())
    with pytest.raises(ValueError, match="other ids"):
        build(npy, out, nlist=NLIST, ids=tmp_path / "other.npy", batch_size=1000, resume=True)
    with pytest.raises(ValueError, match="other ids"):
        build(npy, out, nlist=NLIST, batch_size=1000, resume=True)
    build(npy, out, nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000, resume=True)
    assert list_files(out) == list_files(ref)


def test_resume_refuses_another_input_or_parameters(
    tmp_path: Path,
    npy: Path,
    data: tuple[NDArray[np.float32], NDArray[np.float32]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out.index"
    with monkeypatch.context() as mp:
        fail_after_writes(mp, 70)
        with pytest.raises(Fault):
            build(npy, out, nlist=NLIST, batch_size=1000)
    other = data[0][::-1].copy()
    np.save(tmp_path / "other.npy", other)
    with pytest.raises(ValueError, match="another input"):
        build(tmp_path / "other.npy", out, nlist=NLIST, resume=True)
    np.save(tmp_path / "short.npy", data[0][:500])
    with pytest.raises(ValueError, match="only 500 rows"):
        build(tmp_path / "short.npy", out, nlist=NLIST, resume=True)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"nlist": 8}, "nlist=16"),
        ({"nlist": NLIST, "metric": "ip"}, "metric='l2'"),
        ({"nlist": NLIST, "seed": 1}, "seed=0"),
        ({"nlist": NLIST, "train_size": 999}, "train_size=4096"),
        ({"nlist": NLIST, "nprobe": 3}, "nprobe="),
        ({"nlist": NLIST, "dtype": "float16"}, "dtype='<f4'"),
    ]
    for kwargs, what in cases:
        with pytest.raises(ValueError, match=what):
            build(npy, out, resume=True, **kwargs)
    with open_index(out) as ix:
        assert ix.ntotal == 2000  # untouched by the refused attempts


def test_resume_refuses_an_index_with_removed_rows(
    tmp_path: Path, npy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out.index"
    with monkeypatch.context() as mp:
        fail_after_writes(mp, 70)
        with pytest.raises(Fault):
            build(npy, out, nlist=NLIST, batch_size=1000)
    with open_index(out, mode="r+") as ix:
        ix.remove([5, 6])
    with pytest.raises(ValueError, match="2 of its rows were removed"):
        build(npy, out, nlist=NLIST, batch_size=1000, resume=True)


def test_resume_of_a_complete_build_does_nothing(tmp_path: Path, npy: Path) -> None:
    build(npy, tmp_path / "c.index", nlist=NLIST, batch_size=3000)
    r = build(npy, tmp_path / "c.index", nlist=NLIST, batch_size=3000, resume=True)
    assert (r.rows_before, r.rows_added, r.commits, r.trained, r.generation) == (N, 0, 0, False, 2)


def test_resume_with_nprobe_above_nlist(tmp_path: Path, npy: Path) -> None:
    # Stored as nlist, so the resumed build must compare its nprobe capped the same way.
    build(npy, tmp_path / "c.index", nlist=NLIST, nprobe=10 * NLIST, batch_size=3000)
    r = build(npy, tmp_path / "c.index", nlist=NLIST, nprobe=10 * NLIST, resume=True)
    assert r.rows_added == 0
    assert fmt.read_meta(tmp_path / "c.index").nprobe == NLIST


def test_resume_without_index_starts_a_new_build(tmp_path: Path, npy: Path) -> None:
    r = build(npy, tmp_path / "new.index", nlist=NLIST, resume=True)
    assert r.rows_added == N
    assert r.trained


def test_existing_output_needs_resume(tmp_path: Path, npy: Path) -> None:
    build(npy, tmp_path / "x.index", nlist=NLIST)
    with pytest.raises(IndexExistsError, match="--resume"):
        build(npy, tmp_path / "x.index", nlist=NLIST)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(IndexExistsError, match="not an index"):
        build(npy, tmp_path / "other", nlist=NLIST)
    with pytest.raises(IndexExistsError):
        build(npy, tmp_path / "other", nlist=NLIST, resume=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------- validation


def test_nan_row_is_reported_with_its_row_and_earlier_batches_stay(
    tmp_path: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    sample = set(sample_rows(N, 500, 0).tolist())
    bad = next(r for r in range(2345, N) if r not in sample)
    x = data[0].copy()
    x[bad, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match=f"nan.npy: row {bad} contains NaN"):
        build(
            tmp_path / "nan.npy", tmp_path / "n.index", nlist=NLIST, batch_size=1000, train_size=500
        )
    with open_index(tmp_path / "n.index") as ix:
        assert ix.ntotal == bad // 1000 * 1000
    # fix the input and resume
    x[bad, 3] = 0
    np.save(tmp_path / "nan.npy", x)
    r = build(
        tmp_path / "nan.npy",
        tmp_path / "n.index",
        nlist=NLIST,
        batch_size=1000,
        train_size=500,
        resume=True,
    )
    assert r.rows_before == bad // 1000 * 1000
    assert r.rows_added == N - r.rows_before


def test_nan_in_training_sample_is_reported_with_its_input_row(
    tmp_path: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    row = int(sample_rows(N, 500, 0)[123])
    x = data[0].copy()
    x[row, 0] = np.inf
    with pytest.raises(ValueError, match=f"row {row} contains NaN or infinity"):
        build(x, tmp_path / "s.index", nlist=NLIST, train_size=500)


def test_cosine_zero_row(
    tmp_path: Path, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> None:
    x = data[0].copy()
    x[4000] = 0
    with pytest.raises(ValueError, match="row 4000 is a zero vector"):
        build(x, tmp_path / "z.index", nlist=NLIST, metric="cosine", batch_size=1000)


def test_bad_ids(tmp_path: Path, npy: Path) -> None:
    np.save(tmp_path / "short.npy", np.arange(10, dtype=np.int64))
    with pytest.raises(ValueError, match=r"expected 6000 ids"):
        build(npy, tmp_path / "a.index", nlist=NLIST, ids=tmp_path / "short.npy")
    neg = np.arange(N, dtype=np.int64)
    neg[3210] = -5
    np.save(tmp_path / "neg.npy", neg)
    with pytest.raises(ValueError, match="row 3210 has id -5"):
        build(npy, tmp_path / "b.index", nlist=NLIST, ids=tmp_path / "neg.npy", batch_size=1000)
    with pytest.raises(ValueError, match="integer ids"):
        build(npy, tmp_path / "c.index", nlist=NLIST, ids=np.zeros(N))
    big = np.arange(N, dtype=np.uint64)
    big[7] = 2**63
    with pytest.raises(ValueError, match="does not fit int64"):
        build(npy, tmp_path / "d.index", nlist=NLIST, ids=big)


@pytest.mark.parametrize("parallel", [False, True], ids=["build", "build_parallel"])
@pytest.mark.parametrize(
    ("dtype", "bad", "match"),
    [
        pytest.param(np.int64, -5, "row 5999 has id -5", id="negative"),
        pytest.param(np.uint64, 2**63, "at row 5999 does not fit int64", id="too-big"),
    ],
)
def test_bad_id_in_the_last_row_creates_nothing(
    tmp_path: Path,
    npy: Path,
    monkeypatch: pytest.MonkeyPatch,
    parallel: bool,
    dtype: type,
    bad: int,
    match: str,
) -> None:
    # A small chunk, so that the last row sits in a partial chunk of several.
    monkeypatch.setattr(build_mod, "_ID_CHUNK", 1024)
    ids = np.arange(N, dtype=dtype)
    ids[-1] = bad
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "x.index"
    if parallel:
        from diskivf.parallel import build_parallel

        with pytest.raises(ValueError, match=match):
            build_parallel(npy, out, nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000)
    else:
        with pytest.raises(ValueError, match=match):
            build(npy, out, nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000)
    assert not out.exists()
    ids[-1] = N - 1  # the fixed file builds into the same OUT, without --resume
    np.save(tmp_path / "ids.npy", ids)
    assert build(npy, out, nlist=NLIST, ids=tmp_path / "ids.npy", batch_size=1000).n == N


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nlist": 0}, "nlist"),
        ({"nlist": 10**5}, "fewer than nlist"),
        ({"nlist": 4, "metric": "hamming"}, "metric"),
        ({"nlist": 4, "dtype": "int8"}, "dtype"),
        ({"nlist": 4, "batch_size": 0}, "batch_size"),
        ({"nlist": 4, "dataset": "train"}, "HDF5"),
    ],
)
def test_bad_parameters_create_nothing(
    tmp_path: Path, npy: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build(npy, tmp_path / "bad.index", **kwargs)
    assert not (tmp_path / "bad.index").exists()


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "nope.fvecs", tmp_path / "x.index", nlist=4)
    assert not (tmp_path / "x.index").exists()


def test_os_error_reaches_the_caller_and_index_keeps_its_commits(
    tmp_path: Path, npy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_after_writes(monkeypatch, 40)
    with pytest.raises(OSError, match="injected"):
        build(npy, tmp_path / "o.index", nlist=NLIST, batch_size=1000)
    monkeypatch.undo()
    assert os.path.isdir(tmp_path / "o.index")
    with open_index(tmp_path / "o.index") as ix:
        assert ix.ntotal == 1000
        assert ix.verify().ok
