"""Pure scoring functions against exact brute force, without any file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from diskivf import search as scan


def _lists(x: np.ndarray, labels: np.ndarray, nlist: int, l2: bool) -> list[scan.ScanList | None]:
    out: list[scan.ScanList | None] = []
    for i in range(nlist):
        rows = np.flatnonzero(labels == i)
        if rows.size == 0:
            out.append(None)
            continue
        v = np.ascontiguousarray(x[rows])
        out.append(scan.ScanList(v, rows.astype(np.int64), scan.sqnorms(v) if l2 else None))
    return out


def _brute_cost(q: np.ndarray, x: np.ndarray, l2: bool) -> np.ndarray:
    if l2:
        return ((q[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1) - (
            q.astype(np.float64) ** 2
        ).sum(1)[:, None]
    return -(q.astype(np.float64) @ x.T.astype(np.float64))


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("nq", [1, 2, 3, 4, 7, 70])  # 1, up to 64 and more: three kernels
def test_all_lists_probed_equals_brute_force(l2: bool, nq: int) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((nq, 16)).astype(np.float32)
    nlist = 9
    labels = rng.integers(0, nlist, len(x))
    lists = _lists(x, labels, nlist, l2)
    probes = np.tile(np.arange(nlist), (nq, 1))
    cost, ids, stats = scan.search_lists(q, probes, lambda i: lists[i], 10)
    truth = _brute_cost(q, x, l2)
    expect = np.argsort(truth, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(ids, expect)
    np.testing.assert_allclose(cost, np.take_along_axis(truth, expect, 1), rtol=1e-4, atol=1e-3)
    assert stats.vectors_scanned == nq * len(x)
    assert stats.lists_read == np.unique(labels).size


def test_single_and_batch_paths_agree() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 8)).astype(np.float32)
    nlist = 20
    c = x[rng.choice(len(x), nlist, replace=False)]
    labels = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), 1)
    lists = _lists(x, labels, nlist, True)
    q = rng.standard_normal((12, 8)).astype(np.float32)
    probes = scan.coarse_probes(q, c, scan.sqnorms(c), 4)
    batch = scan.search_lists(q, probes, lambda i: lists[i], 5)
    for j in range(len(q)):
        one = scan.search_lists(q[j : j + 1], probes[j : j + 1], lambda i: lists[i], 5)
        np.testing.assert_array_equal(one[1], batch[1][j : j + 1])
        np.testing.assert_allclose(one[0], batch[0][j : j + 1], rtol=1e-5)


def test_padding_when_fewer_than_k() -> None:
    x = np.eye(3, dtype=np.float32)
    lists = [scan.ScanList(x, np.array([7, 8, 9]), scan.sqnorms(x)), None]
    for q in (x[:1], np.vstack([x[:1], x[1:2]])):
        cost, ids, _ = scan.search_lists(q, np.tile([0, 1], (len(q), 1)), lambda i: lists[i], 5)
        assert ids.shape == (len(q), 5)
        assert (ids[:, 3:] == -1).all()
        assert np.isinf(cost[:, 3:]).all()
        assert ids[0, 0] == 7


def test_all_probed_lists_empty_gives_only_padding() -> None:
    q = np.ones((2, 4), np.float32)
    for nq in (1, 2):
        cost, ids, st = scan.search_lists(q[:nq], np.zeros((nq, 1), np.int64), lambda i: None, 3)
        assert (ids == -1).all()
        assert np.isposinf(cost).all()
        assert st.vectors_scanned == 0


def test_coarse_probes_nearest_first() -> None:
    c = np.array([[0.0], [10.0], [1.0], [5.0]], np.float32)
    q = np.array([[0.9]], np.float32)
    probes = scan.coarse_probes(q, c, scan.sqnorms(c), 3)
    assert probes.tolist() == [[2, 0, 3]]
    all_probes = scan.coarse_probes(q, c, scan.sqnorms(c), 4)
    assert all_probes.tolist() == [[2, 0, 3, 1]]
    ip = scan.coarse_probes(q, c, None, 2)
    assert ip.tolist() == [[1, 3]]


def test_finalize_breaks_ties_by_id() -> None:
    cost = np.array([[1.0, 0.5, 1.0, 1.0]], np.float32)
    ids = np.array([[9, 4, 2, 5]], np.int64)
    c, i = scan.finalize(cost, ids, 3)
    assert i.tolist() == [[4, 2, 5]]
    assert c.tolist() == [[0.5, 1.0, 1.0]]


def test_float16_lists_scored_as_float32() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float16)
    lst = scan.ScanList(x, np.arange(50), scan.sqnorms(x))
    q = rng.standard_normal((1, 8)).astype(np.float32)
    _, ids, _ = scan.search_lists(q, np.zeros((1, 1), np.int64), lambda i: lst, 4)
    truth = np.argsort(_brute_cost(q, x.astype(np.float32), True), axis=1)[:, :4]
    np.testing.assert_array_equal(ids, truth)


def test_normalize_rows_keeps_zero_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    scan.normalize_rows(x)
    np.testing.assert_allclose(x, [[0.6, 0.8], [0.0, 0.0]])


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    nq=st.integers(1, 5),
    k=st.integers(1, 12),
    nlist=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    l2=st.booleans(),
)
def test_property_exhaustive_probe_is_exact(
    n: int, nq: int, k: int, nlist: int, seed: int, l2: bool
) -> None:
    rng = np.random.default_rng(seed)
    # Integer-valued data keeps float32 sums exact, so ties compare equal on both sides.
    x = rng.integers(-4, 5, (n, 4)).astype(np.float32)
    q = rng.integers(-4, 5, (nq, 4)).astype(np.float32)
    labels = rng.integers(0, nlist, n)
    lists = _lists(x, labels, nlist, l2)
    probes = np.tile(np.arange(nlist), (nq, 1))
    _cost, ids, _ = scan.search_lists(q, probes, lambda i: lists[i], k)
    truth = _brute_cost(q, x, l2)
    kk = min(k, n)
    # Ties broken by id, as finalize promises: sort by (cost, id).
    expect = np.lexsort((np.broadcast_to(np.arange(n), truth.shape), truth), axis=1)[:, :kk]
    np.testing.assert_array_equal(ids[:, :kk], expect)
    assert (ids[:, kk:] == -1).all()


def _recording_pool(calls: list[list[list[int]]]) -> scan.Parallel:
    """A runner on real threads that records the chunks it was given."""
    from concurrent.futures import ThreadPoolExecutor

    def run(fn, chunks):  # type: ignore[no-untyped-def]
        calls.append(chunks)
        with ThreadPoolExecutor(len(chunks)) as pool:
            return list(pool.map(fn, chunks))

    return run


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_split_single_query_equals_one_thread(threads: int, dtype: type) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3000, 16)).astype(dtype)
    nlist = 12
    c = x[rng.choice(len(x), nlist, replace=False)].astype(np.float32)
    labels = np.argmin(((x[:, None].astype(np.float32) - c[None]) ** 2).sum(-1), 1)
    lists = _lists(x, labels, nlist, True)
    # Tombstones in one list: a split must still report them as removed.
    first = next(v for v in lists if v is not None)
    i0 = lists.index(first)
    lists[i0] = first._replace(removed=np.arange(0, len(first.ids), 2))
    q = rng.standard_normal((20, 16)).astype(np.float32)
    for j in range(len(q)):
        one = scan.search_one(q[j], c, scan.sqnorms(c), 7, scan.fetch_each(lambda i: lists[i]), 10)
        calls: list[list[list[int]]] = []
        split = scan.search_one(
            q[j], c, scan.sqnorms(c), 7, scan.fetch_each(lambda i: lists[i]), 10,
            threads=threads, parallel=_recording_pool(calls), split=lambda nbytes: True,
        )  # fmt: skip
        np.testing.assert_array_equal(split[1], one[1])
        np.testing.assert_array_equal(split[0], one[0])
        assert split[2] == one[2]
        assert len(calls) == 1
        assert 1 < len(calls[0]) <= scan._RUNS_PER_THREAD * threads
        assert [i for chunk in calls[0] for i in chunk] == list(range(one[2].lists_read))


def test_single_query_splits_only_when_told() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    lists = _lists(x, rng.integers(0, 4, len(x)), 4, True)
    c = rng.standard_normal((4, 8)).astype(np.float32)
    calls: list[list[list[int]]] = []
    asked: list[int] = []
    scan.search_one(
        x[0], c, scan.sqnorms(c), 4, scan.fetch_each(lambda i: lists[i]), 5,
        threads=2, parallel=_recording_pool(calls), split=asked.append,
    )  # fmt: skip
    assert calls == []  # the answer (None) was no
    assert asked == [400 * 8 * 4]  # asked once, with the bytes of vectors scanned
    scan.search_one(
        x[0], c, scan.sqnorms(c), 4, scan.fetch_each(lambda i: lists[i]), 5,
        threads=2, parallel=_recording_pool(calls), split=lambda nbytes: True,
    )  # fmt: skip
    assert len(calls) == 1


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=30), parts=st.integers(1, 9))
@example(sizes=[1, 1], parts=2)  # the last list starts exactly at the first share: two runs
@example(sizes=[3, 0], parts=2)
@example(sizes=[0, 0], parts=2)
def test_balanced_runs_cover_in_order_and_balance(sizes: list[int], parts: int) -> None:
    starts = [0]
    for s in sizes:
        starts.append(starts[-1] + s)
    runs = scan._balanced_runs(starts, parts)
    assert [i for r in runs for i in r] == list(range(len(sizes)))
    assert all(runs)
    assert len(runs) <= parts
    # Each run stops at the first list reaching its share: at most one list over it.
    share = starts[-1] / parts
    assert all(sum(sizes[i] for i in r) <= share + max(sizes) for r in runs)
    # search_one's test for a split, before it cuts the runs.
    assert scan._several_runs(starts, parts) == (len(runs) > 1)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 20), min_size=1, max_size=12), data=st.data())
def test_ids_at_gathers_from_the_concatenated_lists(sizes: list[int], data: st.DataObject) -> None:
    # Empty lists in between, winners in any subset of lists, one list or many.
    rng = np.random.default_rng(len(sizes))
    views = [
        scan.ScanList(np.zeros((n, 2), np.float32), rng.integers(0, 1 << 40, n), None)
        for n in sizes
    ]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    every = np.concatenate([v.ids for v in views])
    chosen = data.draw(st.sets(st.integers(0, max(0, starts[-1] - 1)), max_size=starts[-1]))
    pos = np.array(sorted(chosen), np.int64)[: starts[-1]]
    np.testing.assert_array_equal(scan._ids_at(views, starts, pos), every[pos])


@pytest.mark.parametrize(
    "pos",
    [[], [0], [1, 3], [3, 4], [0, 6, 8, 11]],  # none; all in the first list; across lists
)
def test_ids_at_winners_in_the_first_list_or_across(pos: list[int]) -> None:
    sizes = [4, 3, 0, 5]
    rng = np.random.default_rng(1)
    views = [
        scan.ScanList(np.zeros((n, 2), np.float32), rng.integers(0, 1 << 40, n), None)
        for n in sizes
    ]
    starts = [0, 4, 7, 7, 12]
    every = np.concatenate([v.ids for v in views])
    at = np.array(pos, np.int64)
    got = scan._ids_at(views, starts, at)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, every[at])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), l2=st.booleans(), nprobe=st.integers(1, 9))
def test_lists_being_read_are_scored_last_with_the_same_result(
    seed: int, l2: bool, nprobe: int
) -> None:
    # prefetch reports the lists it just began to read: those are fetched after the resident
    # ones (so the reads overlap that work), and the result cannot depend on it.
    rng = np.random.default_rng(seed)
    # Integer-valued data keeps float32 sums exact: ties are many, and compare equal.
    x = rng.integers(-4, 5, (600, 8)).astype(np.float32)
    nlist = 9
    c = rng.integers(-4, 5, (nlist, 8)).astype(np.float32)
    lists = _lists(x, rng.integers(0, nlist - 1, len(x)), nlist, l2)  # the last list is empty
    with_rows = [i for i, v in enumerate(lists) if v is not None]
    t = with_rows[int(rng.integers(len(with_rows)))]
    lists[t] = lists[t]._replace(removed=np.arange(0, len(lists[t].ids), 3))  # type: ignore[union-attr]
    csq = scan.sqnorms(c) if l2 else None
    q = rng.integers(-4, 5, 8).astype(np.float32)
    plain = scan.search_one(q, c, csq, nprobe, scan.fetch_each(lambda i: lists[i]), 10)
    probed: list[int] = []
    fetched: list[int] = []

    def prefetch(plist: list[int]) -> list[int]:
        probed.extend(plist)
        return [p for p in plist if rng.random() < 0.5]

    def fetch(i: int) -> scan.ScanList | None:
        fetched.append(i)
        return lists[i]

    got = scan.search_one(q, c, csq, nprobe, scan.fetch_each(fetch), 10, prefetch=prefetch)
    np.testing.assert_array_equal(got[1], plain[1])
    np.testing.assert_array_equal(got[0], plain[0])
    assert got[2] == plain[2]
    assert sorted(fetched) == sorted(probed)  # each probed list fetched once
    truth = _brute_cost(q[None], x, l2)[0]
    live = np.ones(len(x), bool)
    live[lists[t].ids[lists[t].removed]] = False  # type: ignore[union-attr,index]
    in_probes = np.isin(np.arange(len(x)), [i for p in probed if lists[p] for i in lists[p].ids])  # type: ignore[union-attr]
    keep = np.flatnonzero(live & in_probes)
    expect = keep[np.lexsort((keep, truth[keep]))][:10]
    np.testing.assert_array_equal(got[1][0, : len(expect)], expect)
    assert (got[1][0, len(expect) :] == -1).all()


def test_resident_lists_are_fetched_before_lists_being_read() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    lists = _lists(x, rng.integers(0, 6, len(x)), 6, True)
    c = rng.standard_normal((6, 8)).astype(np.float32)
    fetched: list[int] = []
    probes: list[int] = []

    def prefetch(plist: list[int]) -> list[int]:
        probes.extend(plist)
        return plist[:3]  # the nearest three are being read in

    def fetch(i: int) -> scan.ScanList | None:
        fetched.append(i)
        return lists[i]

    scan.search_one(x[0], c, scan.sqnorms(c), 6, scan.fetch_each(fetch), 5, prefetch=prefetch)
    assert fetched == probes[3:] + probes[:3]


@pytest.mark.parametrize("l2", [True, False])
def test_row_kernel_without_vecdot_gives_the_same_neighbours(
    l2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # numpy < 2 has no vecdot: the einsum row kernel stands in, for single queries and for
    # lists that one query of a batch probes.
    rng = np.random.default_rng(8)
    x = rng.integers(-4, 5, (800, 8)).astype(np.float32)  # exact sums: equal costs either way
    nlist = 6
    c = rng.integers(-4, 5, (nlist, 8)).astype(np.float32)
    lists = _lists(x, rng.integers(0, nlist, len(x)), nlist, l2)
    csq = scan.sqnorms(c) if l2 else None
    q = rng.integers(-4, 5, (3, 8)).astype(np.float32)
    probes = np.tile(np.arange(nlist), (1, 1))
    runs = []
    for vecdot in (scan._VECDOT, None):
        monkeypatch.setattr(scan, "_VECDOT", vecdot)
        one = [
            scan.search_one(qi, c, csq, nlist, scan.fetch_each(lambda i: lists[i]), 10) for qi in q
        ]
        batch = [scan.search_lists(qi[None], probes, lambda i: lists[i], 10) for qi in q]
        runs.append((one, batch))
    truth = _brute_cost(q, x, l2)
    expect = np.lexsort((np.broadcast_to(np.arange(len(x)), truth.shape), truth), axis=1)[:, :10]
    for one, batch in runs:
        for j in range(len(q)):
            np.testing.assert_array_equal(one[j][1][0], expect[j])
            np.testing.assert_array_equal(batch[j][1][0], expect[j])
            np.testing.assert_array_equal(one[j][0], batch[j][0])


def test_streams_rows_only_for_wide_float32_rows_beyond_the_cache(
    monkeypatch: pytest.MonkeyPatch, row_kernel: Callable[..., Any]
) -> None:
    f32, f16 = np.dtype(np.float32), np.dtype(np.float16)
    big, cache = 64 << 20, 32 << 20
    monkeypatch.setattr(scan, "_VECDOT", row_kernel)  # numpy 1 has none: a stand-in there
    assert scan.streams_rows(big, 128, f32, cache)
    assert scan.streams_rows(big, 96, f32, cache)
    assert not scan.streams_rows(big, 64, f32, cache)  # narrow rows: a call per row costs more
    assert not scan.streams_rows(big, 128, f16, cache)  # converted into a cached array first
    assert not scan.streams_rows(cache, 128, f32, cache)  # fits the cache
    assert scan.streams_rows(cache + 1, 128, f32, cache)
    monkeypatch.setattr(scan, "_VECDOT", None)  # numpy 1: no row kernel, GEMV always
    assert not scan.streams_rows(big, 128, f32, cache)


@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_streamed_lists_are_scored_with_the_row_kernel_and_give_the_same_neighbours(
    l2: bool, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``streamed=True`` scores the float32 lists that one query scans (a single query, or a
    batch's lists probed by one of its queries) with vecdot; float16 lists, converted into a
    fresh array, and lists probed by several queries keep their kernels. Exact either way."""
    rng = np.random.default_rng(12)
    x = rng.integers(-4, 5, (900, 8)).astype(dtype)  # exact sums: equal costs either way
    nlist = 6
    c = rng.integers(-4, 5, (nlist, 8)).astype(np.float32)
    labels = rng.integers(0, nlist, len(x))
    lists = _lists(x, labels, nlist, l2)
    csq = scan.sqnorms(c) if l2 else None
    q = rng.integers(-4, 5, (2, 8)).astype(np.float32)
    vecdot = scan._VECDOT
    if vecdot is None:  # numpy < 2: GEMV (or einsum) always
        assert not scan.streams_rows(1 << 40, 128, np.dtype(np.float32), 0)
        return
    rows_of: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        if np.ndim(args[1]) == 1:  # rows against one query, not row norms
            rows_of.append(len(args[0]))
        return vecdot(*args, **kwargs)

    monkeypatch.setattr(scan, "_VECDOT", counted)
    # Both queries probe lists 1 and 3; 0 and 2 are query 0's alone, 4 and 5 query 1's.
    probes = np.array([[3, 0, 1, 2], [3, 4, 5, 1]])
    runs = []
    for streamed in (False, True):
        rows_of.clear()
        one = [
            scan.search_one(
                qi, c, csq, nlist, scan.fetch_each(lambda i: lists[i]), 10, streamed=streamed
            )
            for qi in q
        ]
        batch = scan.search_lists(q, probes, lambda i: lists[i], 10, streamed=streamed)
        runs.append((one, batch, list(rows_of)))
    assert runs[0][2] == []
    sizes = [0 if v is None else len(v.ids) for v in lists]
    if dtype == np.float32:
        # Single queries: every list, twice; the batch: lists 0, 2, 4, 5 probed by one query.
        expect = sizes * 2 + [sizes[i] for i in (0, 2, 4, 5)]
        assert sorted(runs[1][2]) == sorted(s for s in expect if s)
    else:
        assert runs[1][2] == []
    truth = _brute_cost(q, x.astype(np.float32), l2)
    top = np.lexsort((np.broadcast_to(np.arange(len(x)), truth.shape), truth), axis=1)[:, :10]
    for one, _, _ in runs:
        for j in range(len(q)):
            np.testing.assert_array_equal(one[j][1][0], top[j])
    np.testing.assert_array_equal(runs[0][1][1], runs[1][1][1])
    np.testing.assert_array_equal(runs[0][1][0], runs[1][1][0])
