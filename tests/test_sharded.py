"""Tests for diskivf.sharded: searching shards that share centroids equals searching their
union, locally and fanned out through a Dask cluster."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from diskivf.demo import clustered
from diskivf.errors import MissingDependencyError
from diskivf.index import Index, SearchResult, open_index
from diskivf.sharded import ShardedIndex

N, DIM, NLIST = 6000, 12, 16
BOUNDS = [0, 2500, 2600, N]  # three shards, one of them small
Data = tuple[NDArray[np.float32], NDArray[np.float32]]


@pytest.fixture(scope="module")
def data() -> Data:
    return clustered(N, DIM, nq=60, nclusters=40, seed=9)


def make_shards(
    root: Path, x: NDArray[np.float32], metric: str, bounds: list[int] = BOUNDS
) -> tuple[Path, list[Path]]:
    """The union index of ``x`` and one index per slice with the union's centroids; ids are
    global row numbers in both."""
    union = root / f"union-{metric}.index"
    with open_index(union, "w-", dim=DIM, nlist=NLIST, metric=metric) as u:
        u.train(x[:3000])
        u.add(x)
        centroids, training = u.centroids, u.metadata.training
    shards = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        path = root / f"shard{i}-{metric}.index"
        with open_index(path, "w-", dim=DIM, nlist=NLIST, metric=metric) as ix:
            ix.set_centroids(centroids, training=training)
            ix.add(x[a:b], ids=np.arange(a, b))
        shards.append(path)
    return union, shards


def assert_same(got: SearchResult, want: SearchResult) -> None:
    """Same ids; distances equal up to float32 rounding (BLAS rounds a product differently
    for matrices of other shapes, and a shard's lists are shorter than the union's)."""
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.distances, want.distances, rtol=2e-6, atol=1e-6)
    assert got.distances.dtype == np.float32
    assert got.ids.dtype == np.int64


@pytest.fixture(scope="module")
def l2_shards(tmp_path_factory: pytest.TempPathFactory, data: Data) -> tuple[Path, list[Path]]:
    return make_shards(tmp_path_factory.mktemp("l2"), data[0], "l2")


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_sharded_search_equals_union_search(tmp_path: Path, data: Data, metric: str) -> None:
    x, q = data
    union, shards = make_shards(tmp_path, x, metric)
    with ShardedIndex.open(shards) as sharded, open_index(union) as u:
        assert (sharded.nshards, sharded.ntotal, sharded.dim) == (3, N, DIM)
        assert (sharded.nlist, sharded.metric, sharded.nprobe) == (NLIST, metric, u.nprobe)
        for nprobe in (1, 3, NLIST):
            for k in (1, 10):
                assert_same(sharded.search(q, k=k, nprobe=nprobe), u.search(q, k=k, nprobe=nprobe))
                assert_same(
                    sharded.search(q[7], k=k, nprobe=nprobe), u.search(q[7], k=k, nprobe=nprobe)
                )
        assert_same(sharded.search(q), u.search(q, nprobe=u.nprobe))


def test_exhaustive_sharded_search_is_exact(l2_shards: tuple[Path, list[Path]], data: Data) -> None:
    x, q = data
    _, shards = l2_shards
    with ShardedIndex.open(shards) as sharded:
        d, ids = sharded.search(q, k=5, nprobe=NLIST)
    truth = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(ids, np.argsort(truth, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(d, np.sort(truth, axis=1)[:, :5], rtol=1e-4, atol=1e-4)


def test_ties_across_shards_are_broken_by_id(tmp_path: Path, data: Data) -> None:
    x = data[0].copy()
    x[4000:4050] = x[100:150]  # exact duplicates, in the first and the third shard
    union, shards = make_shards(tmp_path, x, "l2")
    q = x[100:150]
    with ShardedIndex.open(shards) as sharded, open_index(union) as u:
        got = sharded.search(q, k=2, nprobe=2)
        assert_same(got, u.search(q, k=2, nprobe=2))
    np.testing.assert_array_equal(
        got.ids, np.stack([np.arange(100, 150), np.arange(4000, 4050)], 1)
    )
    np.testing.assert_allclose(got.distances, 0, atol=1e-4)  # |x|^2 - 2 x.x + |x|^2


def test_removed_rows_and_padding(tmp_path: Path, data: Data) -> None:
    x, q = data
    union, shards = make_shards(tmp_path, x, "ip")
    gone = np.arange(0, N, 3)
    for path in [union, *shards]:
        with open_index(path, "r+") as ix:
            ix.remove(gone)
    with ShardedIndex.open(shards) as sharded, open_index(union) as u:
        assert sharded.ntotal == u.ntotal == N - len(gone)
        got = sharded.search(q, k=N, nprobe=1)  # more than one list holds: padded
        assert_same(got, u.search(q, k=N, nprobe=1))
        assert not np.isin(got.ids, gone).any()
        assert (got.ids[:, -1] == -1).all()
        assert np.isneginf(got.distances[:, -1]).all()


def test_refresh_sees_new_commits(tmp_path: Path, data: Data) -> None:
    x, q = data
    _, shards = make_shards(tmp_path, x, "l2", bounds=[0, 3000, 5000])
    with ShardedIndex.open(shards) as sharded:
        assert sharded.ntotal == 5000
        with open_index(shards[1], "r+") as ix:
            ix.add(x[5000:], ids=np.arange(5000, N))
        assert sharded.refresh()
        assert sharded.ntotal == N
        assert not sharded.refresh()
        assert "3 shards" not in repr(sharded)
        assert "ntotal=6000" in repr(sharded)
        _, ids = sharded.search(x[5500], k=1, nprobe=NLIST)
        assert ids[0, 0] == 5500
    with pytest.raises(ValueError, match="closed"):
        sharded.search(q)
    sharded.close()  # idempotent


def test_open_refuses_shards_with_other_centroids(tmp_path: Path, data: Data) -> None:
    x = data[0]
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"s{seed}.index"
        with open_index(path, "w-", dim=DIM, nlist=NLIST) as ix:
            ix.train(x[:3000], seed=seed)
            ix.add(x[:100])
        paths.append(path)
    with pytest.raises(ValueError, match="centroids"):
        ShardedIndex.open(paths)
    with pytest.raises(ValueError, match="at least one"):
        ShardedIndex.open([])
    other = tmp_path / "cos.index"
    with (
        open_index(other, "w-", dim=DIM, nlist=NLIST, metric="cosine") as ix,
        open_index(paths[0]) as first,
    ):
        ix.set_centroids(first.centroids)
    with pytest.raises(ValueError, match="centroids"):  # same values, other metric
        ShardedIndex.open([paths[0], other])


def test_search_validates_queries(l2_shards: tuple[Path, list[Path]], data: Data) -> None:
    _, shards = l2_shards
    with ShardedIndex.open(shards) as sharded:
        with pytest.raises(ValueError, match="dimension"):
            sharded.search(np.zeros((2, DIM + 1), np.float32))
        with pytest.raises(ValueError, match="k"):
            sharded.search(data[1], k=0)
        with pytest.raises(ValueError, match="nprobe"):
            sharded.search(data[1], nprobe=0)
        with pytest.raises(ValueError, match="NaN"):
            sharded.search(np.full(DIM, np.nan, np.float32))


def test_dask_fan_out_equals_local_search(
    dask_client: object, l2_shards: tuple[Path, list[Path]], data: Data
) -> None:
    union, shards = l2_shards
    q = data[1]
    workers = sorted(dask_client.scheduler_info()["workers"])  # type: ignore[attr-defined]
    placement = {str(shards[0]): workers[0], str(shards[2]): workers[1]}
    with (
        ShardedIndex.open(shards, client=dask_client, workers=placement) as remote,
        open_index(union) as u,
    ):
        assert remote.ntotal == N
        assert remote.paths == tuple(map(str, shards))
        for nprobe in (1, 4):
            assert_same(remote.search(q, k=10, nprobe=nprobe), u.search(q, k=10, nprobe=nprobe))
        assert_same(remote.search(q[0], k=3), u.search(q[0], k=3, nprobe=u.nprobe))
        assert not remote.refresh()


def test_client_without_distributed_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, l2_shards: tuple[Path, list[Path]]
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(MissingDependencyError, match=r"diskivf\[dask\]"):
        ShardedIndex.open(l2_shards[1], client=object())


def test_worker_cache_reuses_open_shards(l2_shards: tuple[Path, list[Path]], data: Data) -> None:
    from diskivf import sharded as mod

    path = str(l2_shards[1][0])
    info = mod.remote_info(path)
    assert info.ntotal == 2500
    assert isinstance(mod._WORKER_SHARDS[path], Index)
    cost, ids = mod.remote_costs(path, data[1][:3], 4, 2)
    assert cost.shape == ids.shape == (3, 4)
    assert mod.remote_info(path) == info
    mod._WORKER_SHARDS.pop(path).close()


def test_worker_cache_reopens_a_replaced_or_deleted_shard(tmp_path: Path, data: Data) -> None:
    import shutil

    from diskivf import sharded as mod
    from diskivf.errors import IndexNotFoundError

    x = data[0]
    path = tmp_path / "s.index"
    with open_index(path, "w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x[:3000])
        ix.add(x[:1000])
    key = str(path)
    assert mod.remote_info(key).ntotal == 1000
    with open_index(path, "w", dim=DIM, nlist=NLIST) as ix:  # replaced under the worker
        ix.train(x[:3000])
        ix.add(x[:700])
    assert mod.remote_info(key).ntotal == 700
    _, ids = mod.remote_costs(key, data[1][:2], 3, NLIST)
    assert ids.max() < 700
    shutil.rmtree(path)
    with pytest.raises(IndexNotFoundError, match="no diskivf index"):
        mod.remote_info(key)
    assert key not in mod._WORKER_SHARDS


def test_a_failed_open_closes_the_shards_it_opened(
    l2_shards: tuple[Path, list[Path]], tmp_path: Path, data: Data, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diskivf import sharded

    opened: list[Index] = []

    def recording_open(path: Path) -> Index:
        opened.append(open_index(path))
        return opened[-1]

    monkeypatch.setattr(sharded, "open_index", recording_open)
    _, paths = l2_shards
    with pytest.raises(FileNotFoundError):  # the third shard is missing
        ShardedIndex.open([*paths[:2], tmp_path / "missing.index"])
    assert len(opened) == 2
    assert all(ix._closed for ix in opened)
    opened.clear()
    other = tmp_path / "other.index"  # opens, but with other centroids
    with open_index(other, "w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(data[0][:3000], seed=7)
    with pytest.raises(ValueError, match="centroids"):
        ShardedIndex.open([*paths[:2], other])
    assert len(opened) == 3
    assert all(ix._closed for ix in opened)
