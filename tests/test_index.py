"""The public API end to end: modes, train/add/search, errors, snapshots, what gets mapped."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import diskivf
from diskivf import errors
from diskivf._threads import Workers
from diskivf.demo import clustered, exact_knn, recall_at_k
from diskivf.index import _IdMap, prepare_queries

DIM = 16
NLIST = 16


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clustered(4000, DIM, nq=50, nclusters=40, seed=7)


def _build(path: Path, x: np.ndarray, metric: str = "l2", **kw: object) -> None:
    with diskivf.open(path, mode="w-", dim=DIM, nlist=NLIST, metric=metric, **kw) as ix:
        ix.train(x)
        ix.add(x)


def _snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


# ------------------------------------------------------------------ quality


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_exhaustive_probe_equals_brute_force(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], metric: str
) -> None:
    x, q = data
    _build(tmp_path / "i", x, metric)
    with diskivf.open(tmp_path / "i") as ix:
        d, ids = ix.search(q, k=10, nprobe=NLIST)
    truth = exact_knn(x, q, 10, metric)
    # Ties aside: float32 GEMM rounding may swap exact near-ties, so compare sets and allow
    # a tiny fraction of rank swaps at the boundary.
    assert recall_at_k(ids, truth) >= 0.999
    assert (ids == truth).mean() >= 0.99
    ascending = metric == "l2"
    diffs = np.diff(d, axis=1)
    assert (diffs >= 0).all() if ascending else (diffs <= 0).all()
    # Distances are the true metric values of the returned ids.
    if metric == "l2":
        expect = ((x[ids] - q[:, None, :]) ** 2).sum(-1)
    elif metric == "ip":
        expect = np.einsum("qkd,qd->qk", x[ids], q)
    else:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True)
        expect = np.einsum("qkd,qd->qk", xn[ids], q / np.linalg.norm(q, axis=1, keepdims=True))
    np.testing.assert_allclose(d, expect, rtol=1e-3, atol=1e-3)


def test_recall_at_moderate_nprobe(tmp_path: Path) -> None:
    # Heavily overlapping clusters (1000 centres at unit scale in 32-d) make recall depend on
    # nprobe as on real embeddings. Measured: 0.53 / 0.71 / 0.86 at nprobe 4 / 8 / 16.
    x, q = clustered(20000, 32, nq=200, seed=3)
    truth = exact_knn(x, q, 10)
    with diskivf.open(tmp_path / "i", mode="w-", dim=32, nlist=64) as ix:
        ix.train(x)
        ix.add(x)
        recalls = [recall_at_k(ix.search(q, k=10, nprobe=p).ids, truth) for p in (4, 16, 64)]
    # Stated thresholds: >= 0.80 at nprobe = nlist / 4, monotone in nprobe, exact at nlist.
    assert recalls[1] >= 0.80
    assert recalls[0] < recalls[1] <= recalls[2]
    assert recalls[2] >= 0.999


def test_single_query_equals_batch_row(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i") as ix:
        d, i = ix.search(q, k=7, nprobe=3)
        for j in range(5):
            d1, i1 = ix.search(q[j], k=7, nprobe=3)
            assert d1.shape == (1, 7)
            np.testing.assert_array_equal(i1[0], i[j])
            np.testing.assert_allclose(d1[0], d[j], rtol=1e-5)


def test_reopen_in_new_process_gives_identical_results(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    _build(tmp_path / "i", x)
    np.save(tmp_path / "q.npy", q)
    with diskivf.open(tmp_path / "i") as ix:
        d, i = ix.search(q, k=10, nprobe=4)
    code = (
        "import sys, numpy as np, diskivf\n"
        "q = np.load(sys.argv[2])\n"
        "with diskivf.open(sys.argv[1]) as ix:\n"
        "    d, i = ix.search(q, k=10, nprobe=4)\n"
        "np.savez(sys.argv[3], d=d, i=i)\n"
    )
    out = tmp_path / "r.npz"
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "i"), str(tmp_path / "q.npy"), str(out)],
        check=True,
    )
    r = np.load(out)
    np.testing.assert_array_equal(r["i"], i)
    np.testing.assert_array_equal(r["d"], d)


def test_padding_when_fewer_than_k(tmp_path: Path) -> None:
    x = np.eye(4, dtype=np.float32) * 10
    for metric, pad in (("l2", np.inf), ("ip", -np.inf), ("cosine", -np.inf)):
        with diskivf.open(tmp_path / metric, mode="w-", dim=4, nlist=2, metric=metric) as ix:
            ix.train(x)
            ix.add(x[:3], ids=[10, 11, 12])
            d, i = ix.search(x[0], k=5, nprobe=2)
        assert i[0, :3].tolist()[0] == 10
        assert sorted(i[0, :3].tolist()) == [10, 11, 12]
        assert i[0, 3:].tolist() == [-1, -1]
        assert (d[0, 3:] == pad).all()
        assert d.dtype == np.float32
        assert i.dtype == np.int64


# ------------------------------------------------------------------ add


def test_add_returns_default_and_given_ids(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        assert ix.add(x[:10]).tolist() == list(range(10))
        assert ix.add(x[10:12], ids=[100, 50]).tolist() == [100, 50]
        assert ix.add(x[12:14]).tolist() == [101, 102]  # one past the largest id so far
        assert ix.ntotal == 14
        assert ix.generation == 3
        assert ix.list_sizes().sum() == 14
        _, i = ix.search(x[11], k=1, nprobe=NLIST)
        assert i[0, 0] == 50


def test_add_casts_float64_big_endian_and_ints(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8))
    variants = [x.astype(np.float32), x, x.astype(">f4"), x.astype(">f8")]
    results = []
    for j, v in enumerate(variants):
        with diskivf.open(tmp_path / str(j), mode="w-", dim=8, nlist=4) as ix:
            ix.train(x.astype(np.float32))
            ix.add(v)
            results.append(ix.search(x[:20].astype(">f8"), k=5, nprobe=4))
    for d, i in results[1:]:
        np.testing.assert_array_equal(i, results[0].ids)
        np.testing.assert_allclose(d, results[0].distances, rtol=1e-6)
    # Stored little-endian whatever came in.
    raw = next((tmp_path / "2" / "lists").glob("*.vec")).read_bytes()
    assert np.frombuffer(raw, "<f4").reshape(-1, 8).dtype.byteorder in "<="


def test_add_memmap_in_small_batches_is_one_commit(tmp_path: Path) -> None:
    x, _ = clustered(5000, DIM, seed=2)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    calls: list[tuple[int, int]] = []
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(mm)
        ix.add(mm, batch_size=700, progress=lambda done, total: calls.append((done, total)))
        assert ix.generation == 1
        assert ix.ntotal == 5000
        _, i = ix.search(x[:100], k=1, nprobe=NLIST)
    assert (i[:, 0] == np.arange(100)).all()
    assert calls[-1] == (5000, 5000)
    assert len(calls) == 8


@pytest.mark.parametrize("batch_size", [1, 333, 4000])
@pytest.mark.parametrize(("metric", "dtype"), [("l2", "float32"), ("cosine", "float16")])
def test_add_batch_size_does_not_change_the_files(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], batch_size: int, metric: str, dtype: str
) -> None:
    """Batches are assigned while the previous one is written; the files must not show it."""
    x, _ = data
    _build(tmp_path / "ref", x, metric, dtype=dtype)
    with diskivf.open(tmp_path / "ref") as ref:
        centroids = ref.centroids
    with diskivf.open(
        tmp_path / "b", mode="w-", dim=DIM, nlist=NLIST, metric=metric, dtype=dtype
    ) as ix:
        ix.set_centroids(centroids)
        ids = ix.add(x[:1000], batch_size=batch_size)
        ix.add(x[1000:], batch_size=batch_size)
    assert (ids == np.arange(1000)).all()
    got, want = _snapshot(tmp_path / "b"), _snapshot(tmp_path / "ref")
    lists = sorted(k for k in want if k.startswith("lists"))
    assert sorted(k for k in got if k.startswith("lists")) == lists
    assert all(got[k] == want[k] for k in lists)


def test_add_error_while_a_batch_is_in_flight_writes_nothing_visible(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    _build(tmp_path / "i", x[:500])
    before = _snapshot(tmp_path / "i")
    with diskivf.open(tmp_path / "i", mode="r+") as ix:
        ids = np.arange(10_000, 10_000 + 2000)
        ids[1500] = -3  # found while batch 2 (rows 1000..1499) is being assigned
        with pytest.raises(ValueError, match="row 1500"):
            ix.add(x[:2000], ids=ids, batch_size=500)
        assert ix.ntotal == 500
    assert _snapshot(tmp_path / "i")["commit.msgpack"] == before["commit.msgpack"]
    with diskivf.open(tmp_path / "i") as ix:
        assert ix.verify().ok
        assert ix.ntotal == 500


def test_float16_index(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    _build(tmp_path / "i", x, dtype="float16")
    with diskivf.open(tmp_path / "i") as ix:
        assert ix.dtype == np.float16
        _, i = ix.search(q, k=10, nprobe=NLIST)
    assert recall_at_k(i, exact_knn(x, q, 10)) >= 0.97
    size = sum(f.stat().st_size for f in (tmp_path / "i" / "lists").glob("*.vec"))
    assert size == x.size * 2


# ------------------------------------------------------------------ only probed lists are read


def test_open_maps_nothing_and_search_maps_only_probed_lists(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i") as ix:
        assert ix._reader.maps_created == 0
        (_res, st) = ix.search(q[0], k=5, nprobe=1, stats=True)
        assert ix._reader.maps_created == 1
        assert st.lists_read == 1
        assert st.vectors_scanned == int(ix.list_sizes()[ix_probe(ix, q[0])])
        ix.search(q[0], k=5, nprobe=1)
        assert ix._reader.maps_created == 1  # cached
        _, st = ix.search(q[:5], k=5, nprobe=3, stats=True)
        assert st.lists_probed == 15
        assert st.lists_read <= 15
        assert st.bytes_touched <= x.shape[0] * (DIM * 4 + 8)


def ix_probe(ix: diskivf.Index, v: np.ndarray) -> int:
    c = ix.centroids
    return int(np.argmin(((c - v) ** 2).sum(1)))


# ------------------------------------------------------------------ modes


def test_mode_r_is_read_only(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    before = _snapshot(tmp_path / "i")
    with diskivf.open(tmp_path / "i", mode="r") as ix:
        assert ix.readonly
        with pytest.raises(errors.ReadOnlyError, match="read-only"):
            ix.add(x[:1])
        with pytest.raises(PermissionError):
            ix.train(x)
        # Another reader and a writer may open alongside: readers take no lock.
        with diskivf.open(tmp_path / "i", mode="r+") as w:
            w.add(x[:3])
    assert _snapshot(tmp_path / "i") != before


def test_mode_r_missing_and_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(errors.IndexNotFoundError):
        diskivf.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        diskivf.open(tmp_path / "nope", mode="r+")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hello")
    with pytest.raises(errors.FormatError, match="not a diskivf index"):
        diskivf.open(tmp_path / "plain")


def test_mode_r_plus_appends(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i", mode="r+") as ix:
        ix.add(x[:5])
        assert ix.ntotal == len(x) + 5
    with diskivf.open(tmp_path / "i") as ix:
        assert ix.ntotal == len(x) + 5


def test_mode_a_creates_then_opens(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    with diskivf.open(tmp_path / "i", mode="a", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x[:10])
    with diskivf.open(tmp_path / "i", mode="a") as ix:
        assert ix.ntotal == 10
    with diskivf.open(tmp_path / "i", mode="a", dim=DIM) as ix:  # equal values are fine
        assert ix.dim == DIM
    with pytest.raises(ValueError, match="exists with dim=16"):
        diskivf.open(tmp_path / "i", mode="a", dim=DIM + 1)


def test_mode_w_overwrites_only_an_index(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i", mode="w", dim=8, nlist=2, metric="ip") as ix:
        assert ix.ntotal == 0
        assert not ix.is_trained
    assert (
        not list((tmp_path / "i" / "lists").glob("*"))
        if (tmp_path / "i" / "lists").exists()
        else True
    )
    with diskivf.open(tmp_path / "i") as ix:
        assert (ix.dim, ix.nlist, ix.metric) == (8, 2, "ip")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(errors.IndexExistsError, match="not a diskivf index"):
        diskivf.open(tmp_path / "mine", mode="w", dim=8, nlist=2)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_mode_w_minus_refuses_existing(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    with pytest.raises(errors.IndexExistsError, match="already exists"):
        diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST)
    with pytest.raises(FileExistsError):
        diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST)
    empty = tmp_path / "empty"
    empty.mkdir()
    with diskivf.open(empty, mode="w-", dim=4, nlist=1) as ix:  # an empty directory is fine
        assert ix.nlist == 1


def test_invalid_mode_and_creation_params(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    with pytest.raises(ValueError, match=r"mode must be one of .* \(got 'x'\)"):
        diskivf.open(tmp_path / "i", mode="x")  # type: ignore[arg-type]
    _build(tmp_path / "i", x)
    with pytest.raises(TypeError, match="only valid with modes"):
        diskivf.open(tmp_path / "i", mode="r", dim=4)
    with pytest.raises(TypeError, match="only valid with modes"):
        diskivf.open(tmp_path / "i", mode="r+", nlist=4)
    with pytest.raises(TypeError, match="needs keyword arguments"):
        diskivf.open(tmp_path / "j", mode="w-", dim=4)
    with pytest.raises(ValueError, match="expected metric to be one of"):
        diskivf.open(tmp_path / "k", mode="w-", dim=4, nlist=2, metric="hamming")
    with pytest.raises(ValueError, match="expected dtype"):
        diskivf.open(tmp_path / "k", mode="w-", dim=4, nlist=2, dtype="int8")
    with pytest.raises(ValueError, match=r"expected dim in \[1, 65536\] but got 0"):
        diskivf.open(tmp_path / "k", mode="w-", dim=0, nlist=2)
    with pytest.raises(ValueError, match=r"expected nprobe >= 1 but got 0"):
        diskivf.open(tmp_path / "k", mode="w-", dim=4, nlist=2, nprobe=0)
    assert not (tmp_path / "k").exists()  # every refusal above created nothing


def test_close_is_idempotent_and_closed_index_errors(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data
    _build(tmp_path / "i", x)
    ix = diskivf.open(tmp_path / "i", mode="r+")
    ix.close()
    ix.close()
    with pytest.raises(ValueError, match="closed"):
        ix.search(q)
    with pytest.raises(ValueError, match="closed"), ix:  # re-entering a closed handle
        pass
    # The lock was released by close: another writer may open now.
    with diskivf.open(tmp_path / "i", mode="r+") as again:
        assert again.ntotal == len(x)


def test_second_writer_is_refused(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i", mode="r+"):
        with pytest.raises(errors.LockedError, match="LOCK"):
            diskivf.open(tmp_path / "i", mode="r+")
        with pytest.raises(errors.LockedError):
            diskivf.open(tmp_path / "i", mode="a")


# ------------------------------------------------------------------ snapshots


def test_reader_keeps_snapshot_until_refresh(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    _build(tmp_path / "i", x[:1000])
    with diskivf.open(tmp_path / "i") as r, diskivf.open(tmp_path / "i", mode="r+") as w:
        w.add(x[1000:2000])
        assert r.ntotal == 1000
        _, i = r.search(x[1500], k=1, nprobe=NLIST)
        assert i[0, 0] != 1500
        assert r.refresh() is True
        assert r.refresh() is False
        assert r.ntotal == 2000
        _, i = r.search(x[1500], k=1, nprobe=NLIST)
        assert i[0, 0] == 1500


def test_reader_sees_training_after_refresh(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    with (
        diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as w,
        diskivf.open(tmp_path / "i") as r,
    ):
        with pytest.raises(errors.NotTrainedError):
            r.search(x[0])
        w.train(x)
        w.add(x[:10])
        assert r.refresh()
        assert r.search(x[3], k=1, nprobe=NLIST).ids[0, 0] == 3


# ------------------------------------------------------------------ rejected calls leave the index as it was


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda ix, x: ix.add(x[:, :5]), ValueError, "expected vectors of dimension 16 but got"),
        (lambda ix, x: ix.add(x[:3][None]), ValueError, r"shape \(n, 16\)"),
        (lambda ix, x: ix.add(np.where(np.arange(16) == 3, np.nan, x[:4])), ValueError, "NaN"),
        (lambda ix, x: ix.add(np.full((2, 16), np.inf)), ValueError, "infinity"),
        (
            lambda ix, x: ix.add(np.vstack([x[:2], np.full((1, 16), 1e18)])),
            ValueError,
            r"squared norms below 1e\+36 \(float32 range\) but row 2 does not",
        ),
        (  # non-finite values are named first, even after a row with a huge norm
            lambda ix, x: ix.add(
                np.vstack([np.full((1, 16), 1e18), x[:2], np.full((1, 16), np.inf)])
            ),
            ValueError,
            r"NaN or infinity \(first at row 3\)",
        ),
        (lambda ix, x: ix.add(x[:4], ids=[1, 2, 3]), ValueError, r"ids of shape \(4,\)"),
        (lambda ix, x: ix.add(x[:2], ids=[1.0, 2.0]), ValueError, "integer ids"),
        (lambda ix, x: ix.add(x[:2], ids=[1, -1]), ValueError, "non-negative ids"),
        (lambda ix, x: ix.add(np.array([["a"] * 16])), ValueError, "numeric"),
        (lambda ix, x: ix.add(x[:2], batch_size=0), ValueError, "batch_size"),
        (lambda ix, x: ix.train(x), errors.AlreadyTrainedError, "already trained"),
        (lambda ix, x: ix.search(x[:2], k=0), ValueError, "expected k >= 1 but got 0"),
        (lambda ix, x: ix.search(x[:2], nprobe=0), ValueError, "expected nprobe >= 1"),
        (lambda ix, x: ix.search(x[:2, :3]), ValueError, "dimension 16 but got dimension 3"),
        (lambda ix, x: ix.search(x[:2][None]), ValueError, "shape"),
        (lambda ix, x: ix.search(np.full(16, np.nan)), ValueError, "NaN"),
        (lambda ix, x: ix.search(np.full(16, 3e38)), ValueError, "squared norms below"),
        # One row takes a path of its own (a float64 dot): the same errors, row 0 named.
        (lambda ix, x: ix.search(np.full(16, 1e18)), ValueError, r"below 1e\+36 .* row 0 does"),
        (lambda ix, x: ix.add(np.full((1, 16), -np.inf)), ValueError, r"infinity \(first at row 0"),
        (lambda ix, x: ix.search(x[:2], k=1.5), TypeError, "integer"),
    ],
)
def test_rejected_calls_change_nothing(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], call: object, exc: type, match: str
) -> None:
    x, _ = data
    _build(tmp_path / "i", x[:2000])
    before = _snapshot(tmp_path / "i")
    with diskivf.open(tmp_path / "i", mode="r+") as ix:
        gen, n = ix.generation, ix.ntotal
        with pytest.raises(exc, match=match):
            call(ix, x)  # type: ignore[operator]
        assert (ix.generation, ix.ntotal) == (gen, n)
        ix.add(x[:1])  # still usable after the rejection
    after = _snapshot(tmp_path / "i")
    assert after["meta.diskivf"] == before["meta.diskivf"]
    with diskivf.open(tmp_path / "i") as ix:
        assert ix.ntotal == n + 1


def test_nan_in_a_late_batch_leaves_nothing_committed(tmp_path: Path) -> None:
    x, _ = clustered(3000, DIM, seed=4)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x[:100])
        bad = x.copy()
        bad[2500, 3] = np.nan
        with pytest.raises(ValueError, match="row 2500"):
            ix.add(bad, batch_size=1000)
        assert ix.ntotal == 100
        ix.add(x[100:200])
    with diskivf.open(tmp_path / "i") as ix:
        assert ix.ntotal == 200
        assert ix.verify().ok
        assert set(ix.search(x[150], k=1, nprobe=NLIST).ids[0].tolist()) == {150}


def test_train_errors(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        with pytest.raises(errors.NotTrainedError, match="train"):
            ix.add(x[:3])
        with pytest.raises(errors.NotTrainedError):
            ix.search(x[0])
        with pytest.raises(ValueError, match="at least nlist=16 training vectors but got 5"):
            ix.train(x[:5])
        with pytest.raises(ValueError, match="dimension"):
            ix.train(x[:, :4])
        assert not ix.is_trained
        info = ix.train(x, seed=3)
        assert info.npoints == len(x)
        assert info.seed == 3
        assert ix.is_trained


def test_training_is_deterministic(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    cents = []
    for name in ("a", "b"):
        with diskivf.open(tmp_path / name, mode="w-", dim=DIM, nlist=NLIST) as ix:
            ix.train(x, seed=11)
            cents.append(ix.centroids)
    np.testing.assert_array_equal(cents[0], cents[1])


def test_cosine_rejects_zero_vectors(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=4, nlist=2, metric="cosine") as ix:
        ix.train(x)
        x[7] = 0
        with pytest.raises(ValueError, match="zero vector"):
            ix.add(x)
        assert ix.ntotal == 0


def test_repr_and_properties(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    _build(tmp_path / "i", x, nprobe=5)
    with diskivf.open(tmp_path / "i") as ix:
        assert (ix.dim, ix.nlist, ix.metric, ix.nprobe, ix.ntotal) == (DIM, NLIST, "l2", 5, len(x))
        assert "ntotal=4000" in repr(ix)
        assert ix.verify().ok
    assert "closed" in repr(ix)


# ------------------------------------------------------------------ search threads


def test_threaded_batch_equals_single_thread(tmp_path: Path) -> None:
    # Lists of ~1000 x 64 float32 (256 KB): enough work per list for threads to be used.
    x, q = clustered(16_000, 64, nq=200, nclusters=160, seed=8)
    with diskivf.open(tmp_path / "i", mode="w-", dim=64, nlist=16) as ix:
        ix.train(x)
        ix.add(x)
        calls: list[int] = []
        real = ix._parallel
        ix._parallel = lambda n: calls.append(n) or real(n)  # type: ignore[method-assign]
        one = ix.search(q, k=10, nprobe=4, threads=1)
        for t in (2, 3):
            many = ix.search(q, k=10, nprobe=4, threads=t)
            np.testing.assert_array_equal(many.ids, one.ids)
            np.testing.assert_array_equal(many.distances, one.distances)
        assert calls == [2, 3]
        full = ix.search(q, k=10, nprobe=16, threads=2)
    np.testing.assert_array_equal(full.ids, exact_knn(x, q, 10))


def test_split_single_query_equals_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, q = clustered(8000, 32, nq=30, nclusters=80, seed=4)
    with diskivf.open(tmp_path / "i", mode="w-", dim=32, nlist=16) as ix:
        ix.train(x)
        ix.add(x)
        ix.remove(np.arange(0, 8000, 3))  # tombstones must survive the split
        monkeypatch.setattr(Workers, "should_split", lambda self, nbytes: True)
        for t in (2, 3):
            for j in range(len(q)):
                one = ix.search(q[j], k=10, nprobe=6, threads=1)
                split = ix.search(q[j], k=10, nprobe=6, threads=t)
                np.testing.assert_array_equal(split.ids, one.ids)
                np.testing.assert_array_equal(split.distances, one.distances)
        assert ix._workers._size == 2  # the caller is the third
        keep = np.setdiff1d(np.arange(8000), np.arange(0, 8000, 3))
        full = ix.search(q[0], k=10, nprobe=16, threads=2)
    np.testing.assert_array_equal(full.ids[0], keep[exact_knn(x[keep], q[:1], 10)[0]])


@pytest.mark.parametrize("failing", ["caller", "worker"])
def test_parallel_runner_raises_once_running_chunks_are_done(tmp_path: Path, failing: str) -> None:
    with diskivf.open(tmp_path / "i", mode="w-", dim=4, nlist=2) as ix:
        run = ix._parallel(2)
        main = threading.get_ident()
        worker_running = threading.Event()
        ran: list[int] = []
        finished: list[int] = []

        def work(chunk: list[int]) -> int:
            ran.append(chunk[0])
            if threading.get_ident() == main:
                assert worker_running.wait(5)
                if failing == "caller":
                    raise RuntimeError("chunk failed")
                time.sleep(0.1)  # the worker's failure comes first
                return chunk[0]
            worker_running.set()
            time.sleep(0.05)
            if failing == "worker":
                raise RuntimeError("chunk failed")
            finished.append(chunk[0])
            return chunk[0]

        with pytest.raises(RuntimeError, match="chunk failed"):
            run(work, [[0], [1], [2], [3]])
        # Raised only once the worker was done with its chunk; no chunk started after.
        assert len(ran) == 2
        assert len(finished) == (1 if failing == "caller" else 0)
        assert run(lambda c: c[0], [[5], [6]]) == [5, 6]


def test_small_lists_batch_stays_on_the_calling_thread(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, q = data  # 4000 x 16 in 16 lists: 16 KB lists, far below a thread hand-off's worth
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i") as ix:
        pool_used: list[int] = []
        ix._parallel = lambda n: pool_used.append(n)  # type: ignore[method-assign,assignment]
        res = ix.search(q, k=5, nprobe=NLIST, threads=4)
    assert pool_used == []
    np.testing.assert_array_equal(res.ids, exact_knn(x, q, 5))


@pytest.mark.parametrize(("nq", "threaded"), [(160, False), (400, True)])
def test_batch_threads_only_above_the_visit_threshold(
    tmp_path: Path, nq: int, threaded: bool
) -> None:
    # 4000 x 16 in 16 lists, every list probed by every query: the estimated GIL-free work
    # per visit grows with the queries sharing it, ~14 us for 160 and ~33 us for 400. Batches
    # of 10-20 us ran slower on two threads than on one (tools/bench_batch_threads.py).
    x, q = clustered(4000, 16, nq=nq, nclusters=40, seed=12)
    with diskivf.open(tmp_path / "i", mode="w-", dim=16, nlist=16) as ix:
        ix.train(x)
        ix.add(x)
        visit = ix._visit_us(nq * 16, np.arange(16))
        assert (10 < visit < 20) if not threaded else (visit > 20)
        pool_used: list[int] = []
        real = ix._parallel
        ix._parallel = lambda n: pool_used.append(n) or real(n)  # type: ignore[method-assign]
        res = ix.search(q, k=5, nprobe=16, threads=2)
    assert pool_used == ([2] if threaded else [])
    np.testing.assert_array_equal(res.ids, exact_knn(x, q, 5))


# ------------------------------------------------------------------ edge cases users hit


def test_empty_query_batch_gives_empty_results(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i") as ix:
        d, ids = ix.search(np.zeros((0, DIM), np.float32), k=5)
        assert d.shape == (0, 5)
        assert ids.shape == (0, 5)
        assert ids.dtype == np.int64
    with diskivf.ShardedIndex.open([tmp_path / "i"]) as sharded:
        d, ids = sharded.search(np.zeros((0, DIM), np.float32), k=5)
        assert d.shape == (0, 5)
        assert ids.shape == (0, 5)


def test_clipped_l2_ties_are_ordered_by_id() -> None:
    from diskivf.index import finish_distances

    q = np.zeros((2, 3), np.float32)  # ||q||^2 = 0, so distances are the clipped costs
    cost = np.array([[-2.0, -1.0, 0.5], [0.0, 0.25, 0.5]], np.float32)
    ids = np.array([[7, 3, 1], [9, 4, 2]], np.int64)
    finish_distances("l2", q, cost, ids)
    np.testing.assert_array_equal(cost, [[0, 0, 0.5], [0, 0.25, 0.5]])
    np.testing.assert_array_equal(ids, [[3, 7, 1], [9, 4, 2]])  # only the clipped row moves


@pytest.mark.parametrize(
    ("cost", "ids", "want_cost", "want_ids"),
    [
        ([[-2.0, -1.0, 0.5]], [[7, 3, 1]], [[0, 0, 0.5]], [[3, 7, 1]]),
        ([[0.0, -0.0, np.inf]], [[9, 4, -1]], [[0, 0, np.inf]], [[9, 4, -1]]),
        ([[0.25, 0.5, 0.5]], [[2, 8, 1]], [[0.25, 0.5, 0.5]], [[2, 8, 1]]),
    ],
)
def test_single_query_clipping(
    cost: list[list[float]],
    ids: list[list[int]],
    want_cost: list[list[float]],
    want_ids: list[list[int]],
) -> None:
    from diskivf.index import finish_distances

    c, i = np.array(cost, np.float32), np.array(ids, np.int64)
    finish_distances("l2", np.zeros((1, 3), np.float32), c, i)  # the one-row shortcut
    np.testing.assert_array_equal(c, want_cost)
    np.testing.assert_array_equal(i, want_ids)


def test_searches_score_with_blas_on_one_thread(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are scored against one query with BLAS's GEMV, so a search holds BLAS to one
    thread while it scores, single queries too, split over two threads or not."""
    import threadpoolctl  # the test extra installs it

    from diskivf import _blas
    from diskivf import search as scan

    x, q = data
    _build(tmp_path / "i", x, "l2")
    seen: list[int | None] = []
    row_costs = scan._row_costs

    def spy(*args: Any, **kwargs: Any) -> None:
        seen.append(_blas.current_threads())
        row_costs(*args, **kwargs)

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        monkeypatch.setattr(scan, "_row_costs", spy)
        with diskivf.open(tmp_path / "i") as ix:
            for threads in (1, 2):
                ix.search(q[0], k=5, nprobe=4, threads=threads)
                ix.search(q[:3], k=5, nprobe=ix.nlist, threads=threads)
        monkeypatch.undo()
        assert len(seen) > 4
        assert set(seen) == {1}
        assert _blas.current_threads() == 2  # restored afterwards


def _count_row_kernel(monkeypatch: pytest.MonkeyPatch, vecdot: Callable[..., Any]) -> list[int]:
    """Count, in the list returned, the row kernel's (``vecdot``'s, see the ``row_kernel``
    fixture) calls that score rows against one query (row norms, also computed with it, are
    not counted)."""
    from diskivf import search as scan

    calls = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += np.ndim(args[1]) == 1
        return vecdot(*args, **kwargs)

    monkeypatch.setattr(scan, "_VECDOT", counted)
    return calls


def test_row_kernel_without_threadpoolctl_finds_the_same_neighbours(
    tmp_path: Path,
    data: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    row_kernel: Callable[..., Any],
) -> None:
    """Where BLAS's threads cannot be held, numpy's row kernel scores instead of GEMV."""
    from diskivf import _blas

    x, q = data
    _build(tmp_path / "i", x, "l2")
    calls = _count_row_kernel(monkeypatch, row_kernel)
    with diskivf.open(tmp_path / "i") as ix:
        gemv = [ix.search(row, k=5, nprobe=4) for row in q[:20]]
        assert calls == [0]
        monkeypatch.setattr(_blas, "can_limit", lambda: False)
        rows = [ix.search(row, k=5, nprobe=4) for row in q[:20]]
        assert calls[0] >= 20 * 5  # the centroids and each probed list, per query
    for a, b in zip(gemv, rows, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-3)


def test_an_index_larger_than_the_cpu_cache_scores_single_queries_with_the_row_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row_kernel: Callable[..., Any]
) -> None:
    """Once an index's vectors outgrow the last-level cache, a single query's lists are
    scored with vecdot (faster from memory) instead of GEMV; the choice follows the index as
    it grows, and the neighbours are exact either way. Such a query scores the centroids
    with vecdot too and holds no BLAS region (vecdot starts no BLAS threads), on one thread
    or split over two; a batch still holds BLAS to one thread."""
    from diskivf import index as index_module

    rng = np.random.default_rng(5)
    dim = 128
    x = rng.standard_normal((3000, dim)).astype(np.float32)
    q = rng.standard_normal((8, dim)).astype(np.float32)
    # The first 2000 rows fill the "cache" exactly; the rest take the index past it.
    monkeypatch.setattr(index_module, "LAST_LEVEL_CACHE_BYTES", 2000 * dim * 4)
    calls = _count_row_kernel(monkeypatch, row_kernel)
    limits: list[int | None] = []
    region = index_module.blas_threads

    def recorded(limit: int | None) -> Any:
        limits.append(limit)
        return region(limit)

    monkeypatch.setattr(index_module, "blas_threads", recorded)
    with diskivf.open(tmp_path / "i", mode="w-", dim=dim, nlist=8) as ix:
        ix.train(x)
        ix.add(x[:2000])
        limits.clear()
        cached = [ix.search(row, k=10, nprobe=8).ids[0] for row in q]
        assert calls == [0]
        assert limits == [1] * len(q)
        ix.add(x[2000:])
        limits.clear()
        streamed = [ix.search(row, k=10, nprobe=8).ids[0] for row in q]
        # The centroids and each probed list of each query; no region.
        assert calls[0] == len(q) * (1 + int(np.count_nonzero(ix.list_sizes())))
        assert limits == [None] * len(q)
        limits.clear()
        calls[0] = 0
        asked: list[int] = []  # the query's bytes, asked once it falls into several runs

        def always(nbytes: int) -> bool:
            asked.append(nbytes)
            return True

        ix._workers.should_split = always  # type: ignore[method-assign]
        split = ix.search(q[0], k=10, nprobe=8, threads=2).ids[0]
        assert len(asked) == 1  # it was split
        assert calls[0] == 1 + int(np.count_nonzero(ix.list_sizes()))
        batch = ix.search(q, k=10, nprobe=8).ids
        assert limits == [None, 1]
        np.testing.assert_array_equal(split, streamed[0])
        np.testing.assert_array_equal(batch, np.array(streamed))
    with diskivf.open(tmp_path / "i") as reader:  # a new handle decides alike
        calls[0] = 0
        again = [reader.search(row, k=10, nprobe=8).ids[0] for row in q]
        assert calls[0] >= len(q) * 8
    np.testing.assert_array_equal(np.array(cached), exact_knn(x[:2000], q, 10))
    np.testing.assert_array_equal(np.array(streamed), exact_knn(x, q, 10))
    np.testing.assert_array_equal(np.array(again), np.array(streamed))


def test_exact_duplicates_come_in_id_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2000, 64)) * 10).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=64, nlist=4) as ix:
        ix.train(x)
        ix.add(x)
        ix.add(np.repeat(x[:1], 6, axis=0), ids=[50, 40, 30, 20, 10, 5])
        for queries in (x[0], x[:3]):
            d, ids = ix.search(queries, k=7, nprobe=4)
            row = list(zip(d[0].tolist(), ids[0].tolist(), strict=True))
            assert set(ids[0]) == {0, 5, 10, 20, 30, 40, 50}
            assert row == sorted(row)  # equal distances list ids ascending


def test_cosine_refuses_zero_query(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    _build(tmp_path / "i", x, "cosine")
    q = np.ones((3, DIM), np.float32)
    q[1] = 0
    with diskivf.open(tmp_path / "i") as ix:
        with pytest.raises(ValueError, match=r"cannot search for a zero vector \(row 1\)"):
            ix.search(q)
        assert ix.search(q[0]).ids.shape == (1, 10)


def test_cosine_single_query_scaled_as_in_a_batch(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    """A single query takes a path of its own (one float64 norm for the check and the
    scaling): it is scaled as the same query in a batch is, at any magnitude, including one
    whose float32 squared norm would underflow, and a zero query is refused by its row."""
    x, q = data
    rows = np.concatenate([q[:4], q[4:6] * np.float32(1e-23), q[6:8] * np.float32(1e15)])
    batch = prepare_queries(rows, DIM, "cosine")
    for i, row in enumerate(rows):
        one = prepare_queries(row, DIM, "cosine")
        np.testing.assert_array_max_ulp(one[0], batch[i], maxulp=1)
        assert np.linalg.norm(one[0].astype(np.float64)) == pytest.approx(1.0, rel=1e-6)
    assert np.array_equal(prepare_queries(rows[0], DIM, "l2")[0], rows[0])  # l2: unscaled
    _build(tmp_path / "i", x, "cosine")
    with diskivf.open(tmp_path / "i") as ix:
        together = ix.search(rows, k=5, nprobe=4)
        for i, row in enumerate(rows):
            alone = ix.search(row, k=5, nprobe=4)
            np.testing.assert_array_equal(alone.ids[0], together.ids[i])
            np.testing.assert_allclose(alone.distances[0], together.distances[i], atol=1e-6)
        with pytest.raises(ValueError, match=r"cannot search for a zero vector \(row 0\)"):
            ix.search(np.zeros(DIM, np.float32))
        with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 0\)"):
            ix.search(np.full(DIM, np.nan, np.float32))


def test_uint64_ids_below_2_63_are_accepted(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=2) as ix:
        ix.train(x)
        gen = ix.generation
        with pytest.raises(ValueError, match=r"expected ids below 2\*\*63 \(int64\) but got"):
            ix.add(x[:2], ids=np.array([1, 1 << 63], np.uint64))
        assert ix.generation == gen
        assert ix.ntotal == 0
        out = ix.add(x, ids=np.arange(64, dtype=np.uint64) + (1 << 62))
        assert out.dtype == np.int64
        assert out[0] == 1 << 62
        assert ix.remove(np.array([1 << 62], np.uint64)) == 1
        with pytest.raises(ValueError, match="expected integer ids but got dtype float64"):
            ix.add(x[:1], ids=[1.5])


def test_empty_add_and_upsert_commit_nothing(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=2) as ix:
        ix.train(x)
        ix.add(x)
        gen = ix.generation
        out = ix.add(np.zeros((0, DIM), np.float32))
        assert out.dtype == np.int64
        assert out.shape == (0,)
        assert ix.upsert(np.zeros((0, DIM)), ids=[]).shape == (0,)
        assert ix.generation == gen
        assert ix.ntotal == 64


def test_float16_overflow_is_an_error_not_a_warning(tmp_path: Path) -> None:
    import warnings

    x = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=2, dtype="float16") as ix:
        ix.train(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="overflow the index dtype float16"):
                ix.add(np.full((2, DIM), 1e6, np.float32))
        assert ix.ntotal == 0


def test_shape_errors_name_the_shape_passed(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=2) as ix:
        ix.train(x)
        with pytest.raises(
            ValueError, match=rf"dimension {DIM} but got dimension 15 \(shape \(15,\)\)"
        ):
            ix.add(np.zeros(15))
        with pytest.raises(ValueError, match=r"but got \(2, 3, 4\)"):
            ix.search(np.zeros((2, 3, 4)))


def test_creating_over_files_and_empty_directories(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_bytes(b"keep me")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for target in (afile, dangling):
        for mode in ("w", "w-", "a"):
            with pytest.raises(errors.IndexExistsError, match=target.name):
                diskivf.open(target, mode=mode, dim=4, nlist=2)  # type: ignore[arg-type]
    assert afile.read_bytes() == b"keep me"
    assert dangling.is_symlink()
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "empty").mkdir()
    diskivf.open(tmp_path / "empty", mode="w-", dim=4, nlist=2).close()  # documented: allowed
    diskivf.open(tmp_path / "deep" / "er" / "x", mode="w-", dim=4, nlist=2).close()
    assert (tmp_path / "deep" / "er" / "x" / "meta.diskivf").is_file()
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    with pytest.raises(errors.IndexExistsError, match=r"holds files that are not diskivf's"):
        diskivf.open(tmp_path / "empty", mode="w", dim=4, nlist=2)
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"


def test_nprobe_above_nlist_means_all_lists_at_creation_too(tmp_path: Path) -> None:
    with diskivf.open(tmp_path / "i", mode="w-", dim=4, nlist=8, nprobe=100) as ix:
        assert ix.nprobe == 8
    diskivf.open(tmp_path / "i", mode="a", dim=4, nlist=8, nprobe=100).close()
    with pytest.raises(ValueError, match="exists with nprobe=8, but nprobe=4 was given"):
        diskivf.open(tmp_path / "i", mode="a", nprobe=4)


def test_a_single_query_takes_its_lists_from_the_current_snapshot(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    """Single queries find their lists by indexing per-snapshot state (views validated so far,
    rows per list): it must follow commits, skip empty lists and survive cache evictions."""
    x, q = data
    path = tmp_path / "i"
    with diskivf.open(path, mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        near = (((x[:, None, :] - ix.centroids[None]) ** 2).sum(2)).argmin(1)
        first = np.flatnonzero(near < 3)[::2]  # three of the lists only, the others empty
        rest = np.setdiff1d(np.arange(len(x)), first)  # grows those three as well
        ix.add(x[first], ids=first)
        for stored in (first, np.arange(len(x))):
            sizes = ix.list_sizes()
            assert (sizes == 0).any() == (len(stored) < len(x))
            everything = list(range(NLIST))
            views, rows = ix._fetch_many(everything)
            assert rows == [int(n) for n in sizes if n]
            assert [len(v.ids) for v in views] == rows
            for v, lid in zip(views, np.flatnonzero(sizes).tolist(), strict=True):
                np.testing.assert_array_equal(v.ids, ix._fetch(lid).ids)  # type: ignore[union-attr]
            ix._map_budget = 2  # later fetches evict the views validated so far
            for row in q[:10]:
                got = ix.search(row, k=5, nprobe=NLIST)  # every list: an exact search
                d = ((x[stored] - row) ** 2).sum(1)
                expect = stored[np.lexsort((stored, d))[:5]]
                np.testing.assert_array_equal(got.ids[0], expect)
            ix._map_budget = 1 << 20
            ix.add(x[rest], ids=rest)


def test_prefetch_takes_only_bools(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i") as ix:
        with pytest.raises(TypeError, match="expected prefetch to be a bool but got str"):
            ix.prefetch = "yes"  # type: ignore[assignment]
        assert ix.prefetch is False
        ix.prefetch = True
        assert ix.prefetch is True
        assert ix.search(q[:2]).ids.shape == (2, 10)


def test_set_centroids_names_the_nan_row(tmp_path: Path) -> None:
    c = np.ones((4, 8))
    c[2, 5] = np.nan
    with diskivf.open(tmp_path / "i", mode="w-", dim=8, nlist=4) as ix:
        with pytest.raises(ValueError, match="expected finite centroids but row 2 has NaN"):
            ix.set_centroids(c)
        assert not ix.is_trained


def test_reader_of_a_replaced_index_is_told_so(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = data
    _build(tmp_path / "i", x)
    reader = diskivf.open(tmp_path / "i")
    with diskivf.open(tmp_path / "i", mode="w", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x[:100])
    with pytest.raises(errors.IndexReplacedError, match="was replaced by a new index"):
        reader.refresh()
    reader.close()
    with diskivf.open(tmp_path / "i") as fresh:
        assert fresh.ntotal == 100


def test_batch_chunks_bound_the_coarse_scores_too(
    tmp_path: Path, data: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    from diskivf import index as index_mod
    from diskivf import search as scan

    x, q = data
    _build(tmp_path / "i", x)
    with diskivf.open(tmp_path / "i") as ix:
        want = ix.search(q[:10], k=1, nprobe=1)
        rows: list[int] = []
        coarse = scan.coarse_probes

        def spy(queries: np.ndarray, *args: object) -> np.ndarray:
            rows.append(len(queries))
            return coarse(queries, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(scan, "coarse_probes", spy)
        # At k = nprobe = 1 the candidate bound alone would take all queries at once; the
        # (queries x nlist) coarse scores must be bounded as well.
        monkeypatch.setattr(index_mod, "_SEARCH_CHUNK_COARSE", 4 * NLIST)
        got = ix.search(q[:10], k=1, nprobe=1)
    assert rows == [4, 4, 2]
    np.testing.assert_array_equal(got.ids, want.ids)
    # Fewer queries per list may take another product kernel: the last bits may differ
    # (search's docstring), nothing more.
    np.testing.assert_allclose(got.distances, want.distances, rtol=1e-5)


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.parametrize("mode", ["r", "c"])
def test_add_of_a_memmap_keeps_only_a_batch_mapped(tmp_path: Path, mode: str) -> None:
    x = np.random.default_rng(0).standard_normal((20000, 64)).astype(np.float32)  # 5 MiB
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode=mode)  # type: ignore[call-overload]
    if mode == "c":
        mm[0] += 1  # a private change: never dropped, or it would be lost
    with diskivf.open(tmp_path / "i", mode="w-", dim=64, nlist=8) as ix:
        ix.train(x[:4000])
        ix.add(mm, batch_size=2048)  # 512 KiB per batch
        resident = _mapped_rss_kib((tmp_path / "x.npy").resolve())
        if mode == "r":
            assert resident <= 1024, resident  # about a batch, not the 5 MiB read
        else:
            assert resident >= 4096, resident  # copy-on-write maps are left alone
            np.testing.assert_array_equal(mm[0], x[0] + 1)
        assert ix.ntotal == 20000
        _, i = ix.search(x[:5], k=1, nprobe=8)
    if mode == "r":
        np.testing.assert_array_equal(i[:, 0], np.arange(5))


def test_add_past_a_lists_row_limit_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diskivf import format as fmt

    x, _ = clustered(400, 8, nclusters=4, seed=3)
    with diskivf.open(tmp_path / "i", mode="w", dim=8, nlist=4) as index:
        index.train(x)
        index.add(x[:10])
        sizes = index.list_sizes()
        listing = sorted(p.name for p in (tmp_path / "i" / "lists").iterdir())
        sizes_on_disk = [p.stat().st_size for p in sorted((tmp_path / "i" / "lists").iterdir())]
        # A 5-bit row number: a list may hold 31 rows; 400 rows over 4 lists overflow one.
        monkeypatch.setattr(fmt, "ROW_BITS", 5)
        with pytest.raises(ValueError, match=r"list \d+ would exceed 2\*\*5 rows"):
            index.add(x, batch_size=400)
        monkeypatch.undo()
        assert np.array_equal(index.list_sizes(), sizes)
        assert sorted(p.name for p in (tmp_path / "i" / "lists").iterdir()) == listing
        after = [p.stat().st_size for p in sorted((tmp_path / "i" / "lists").iterdir())]
        assert after == sizes_on_disk  # nothing appended past the committed rows either
        index.add(x[10:20])  # the writer is still usable
        assert index.ntotal == 20


def test_id_map_lookup_matches_brute_force_across_merges() -> None:
    # remove() and upsert() find rows by id through a sorted base plus the runs added since;
    # past 2**16 added ids the runs are merged into the base. Duplicate ids included.
    rng = np.random.default_rng(3)
    ids_all = [rng.integers(0, 50_000, 30_000)]
    rows_all = [np.arange(30_000)]
    m = _IdMap(ids_all[:], rows_all[:])
    for size in (40_000, 30_000, 5, 1):  # the second run takes the runs past 2**16: merged
        start = sum(len(r) for r in rows_all)
        ids_all.append(rng.integers(0, 80_000, size))
        rows_all.append(np.arange(start, start + size))
        m.extend(ids_all[-1], rows_all[-1])
        want = np.unique(rng.integers(0, 80_000, 500))
        ids, rows = np.concatenate(ids_all), np.concatenate(rows_all)
        assert np.array_equal(np.sort(m.lookup(want)), np.sort(rows[np.isin(ids, want)]))
    assert m.extra_size == 6  # merged after the 30,000: only the two later runs are extra
    assert len(m.ids) == 100_000
