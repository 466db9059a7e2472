"""The compiled single-query scan (numba, from the test extras) against numpy's path and brute
force: the same neighbours, ties, padding, removed rows and splits."""

from __future__ import annotations

import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import diskivf
from diskivf import _jit
from diskivf import search as scan


@pytest.fixture(scope="module")
def kernel() -> _jit.ScanTopK:
    # _compile ignores DISKIVF_JIT: CI's second pass sets it to run the rest on numpy's path.
    compiled = _jit._compile()
    if compiled is None:
        raise AssertionError("numba is in the test extras: pip install '.[test]'")
    return compiled


def _lists(
    x: np.ndarray, labels: np.ndarray, nlist: int, l2: bool, rng: np.random.Generator
) -> list[scan.ScanList | None]:
    """Lists of ``x`` by label (ids: row numbers), each with a random share of its rows
    removed (none in some)."""
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.searchsorted(labels[order], np.arange(1, nlist)))
    out: list[scan.ScanList | None] = []
    for rows in groups:
        v = np.ascontiguousarray(x[rows])
        removed = np.flatnonzero(rng.random(len(rows)) < rng.choice([0.0, 0.3, 0.9]))
        norms = scan.sqnorms(v) if l2 else None
        out.append(
            scan.ScanList(v, rows.astype(np.int64), norms, removed if removed.size else None)
            if len(rows)
            else None
        )
    return out


def _threads(fn: Callable[[list[int]], Any], chunks: list[list[int]]) -> list[Any]:
    with ThreadPoolExecutor(len(chunks)) as pool:
        return list(pool.map(fn, chunks))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    l2=st.booleans(),
    nprobe=st.integers(1, 8),
    k=st.integers(1, 40),
    dim=st.sampled_from([1, 3, 8, 33]),
)
def test_compiled_scan_equals_numpy_and_brute_force(
    kernel: _jit.ScanTopK, seed: int, l2: bool, nprobe: int, k: int, dim: int
) -> None:
    rng = np.random.default_rng(seed)
    # Integer-valued data keeps float32 sums exact in any order: ties are many, and both
    # paths must break them by id.
    n, nlist = int(rng.integers(0, 300)), 8
    x = rng.integers(-3, 4, (n, dim)).astype(np.float32)
    c = rng.integers(-3, 4, (nlist, dim)).astype(np.float32)
    lists = _lists(x, rng.integers(0, nlist, n), nlist, l2, rng)
    csq = scan.sqnorms(c) if l2 else None
    q = rng.integers(-3, 4, dim).astype(np.float32)
    fresh = [int(i) for i in rng.permutation(nlist)[: rng.integers(0, 3)]]
    fetch = scan.fetch_each(lambda i: lists[i])
    probed: list[int] = []  # as search_one chose them (ties among centroids included)
    plain = scan.search_one(q, c, csq, nprobe, fetch, k, prefetch=lambda p: probed.extend(p) or [])
    got = scan.search_one(q, c, csq, nprobe, fetch, k, jit=kernel)
    read = scan.search_one(q, c, csq, nprobe, fetch, k, jit=kernel, prefetch=lambda p: fresh)
    split = scan.search_one(
        q, c, csq, nprobe, fetch, k, jit=kernel, threads=2, parallel=_threads,
        split=lambda nbytes: True,
    )  # fmt: skip
    for other in (got, read, split):
        np.testing.assert_array_equal(other[1], plain[1])
        np.testing.assert_array_equal(other[0], plain[0])
        assert other[2] == plain[2]
    # Brute force over the live rows of the probed lists, ordered by (cost, id).
    live = [
        v.ids[np.setdiff1d(np.arange(len(v.ids)), v.removed if v.removed is not None else [])]
        for p in probed
        if (v := lists[p]) is not None
    ]
    rows = np.concatenate([np.empty(0, np.int64), *live])
    cost = ((x[rows] - q) ** 2).sum(1) if l2 else -(x[rows] @ q)
    expect = rows[np.lexsort((rows, cost))][:k]
    np.testing.assert_array_equal(got[1][0, : len(expect)], expect)
    assert (got[1][0, len(expect) :] == -1).all()
    assert np.isposinf(got[0][0, len(expect) :]).all()


def test_short_results_and_empty_lists_are_padded(kernel: _jit.ScanTopK) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    lists = [scan.ScanList(x, np.array([7, 3, 9, 1]), scan.sqnorms(x), np.array([2])), None]
    c = np.zeros((2, 3), np.float32)
    fetch = scan.fetch_each(lambda i: lists[i])
    cost, ids, stats = scan.search_one(x[0], c, scan.sqnorms(c), 2, fetch, 6, jit=kernel)
    # Row 2 (id 9) is removed: three live rows, nearest first, then padding.
    np.testing.assert_array_equal(ids[0], [7, 3, 1, -1, -1, -1])
    assert np.isposinf(cost[0, 3:]).all()
    assert stats == scan.ScanStats(2, 1, 4, 4 * (12 + 8))
    empty = scan.fetch_each(lambda i: None)
    cost, ids, stats = scan.search_one(x[0], c, scan.sqnorms(c), 2, empty, 3, jit=kernel)
    np.testing.assert_array_equal(ids, [[-1, -1, -1]])
    assert np.isposinf(cost).all()
    assert stats == scan.ScanStats(2, 0, 0, 0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda v: v._replace(ids=v.ids[:-1]),
        lambda v: v._replace(sqnorms=v.sqnorms[:-1]),
        lambda v: v._replace(vectors=v.vectors[:, :-1]),
        lambda v: v._replace(vectors=v.vectors.astype(np.float16)),
    ],
    ids=["ids", "norms", "dim", "float16"],
)
def test_lists_whose_shapes_disagree_never_reach_the_compiled_loop(
    kernel: _jit.ScanTopK, bad: Callable[[scan.ScanList], scan.ScanList]
) -> None:
    # The loop has no bounds checks: a shorter ids array would be read past its end.
    x = np.ones((5, 4), np.float32)
    lists = [bad(scan.ScanList(x, np.arange(5), scan.sqnorms(x)))]
    c = np.zeros((1, 4), np.float32)
    with pytest.raises(ValueError, match="expected float32 vectors of shape"):
        scan.search_one(x[0], c, scan.sqnorms(c), 1, scan.fetch_each(lambda i: lists[i]), 3, jit=kernel)  # fmt: skip


def test_nan_costs_never_enter_the_result(kernel: _jit.ScanTopK) -> None:
    # An overflowed norm minus an overflowed product is NaN; numpy's selection drops such
    # rows, and so does the heap (a NaN compares false both ways).
    x = np.ones((4, 2), np.float32)
    norms = np.array([np.nan, 1.0, np.nan, 2.0], np.float32)
    heap = np.full(3, np.inf, np.float32), np.full(3, _jit.NO_ID, np.int64)
    kernel(x, np.zeros(2, np.float32), norms, np.arange(4), *heap)
    assert sorted(heap[1].tolist()) == [1, 3, _jit.NO_ID]


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_index_single_queries_take_the_compiled_scan_with_the_same_neighbours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: _jit.ScanTopK, metric: str
) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    q = rng.standard_normal((30, 24)).astype(np.float32)
    calls: list[int] = []

    def counted(*args: Any) -> None:
        calls.append(1)
        kernel(*args)

    with diskivf.open(tmp_path / "i", mode="w", dim=24, nlist=16, metric=metric) as ix:
        ix.train(x)
        ix.add(x)
        ix.remove(np.arange(0, 3000, 7))
        monkeypatch.setattr(_jit, "scan_topk", lambda: None)
        plain = [ix.search(row, k=10, nprobe=4) for row in q]
        monkeypatch.setattr(_jit, "scan_topk", lambda: counted)
        got = [ix.search(row, k=10, nprobe=4, threads=t) for t in (1, 2) for row in q]
    assert len(calls) >= 2 * len(q) * 4  # every probed list of every query
    for a, b in zip(plain * 2, got, strict=True):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.distances, b.distances, rtol=1e-5, atol=1e-4)
        assert not np.isin(b.ids, np.arange(0, 3000, 7)).any()


def test_float16_indexes_never_ask_for_the_compiled_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse() -> None:
        raise AssertionError("a float16 index asked for the compiled float32 scan")

    x = np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w", dim=8, nlist=4, dtype="float16") as ix:
        ix.train(x)
        ix.add(x)
        monkeypatch.setattr(_jit, "scan_topk", refuse)
        assert ix.search(x[3], k=1, nprobe=4).ids[0, 0] == 3


def test_the_kernel_loads_once_and_not_without_numba_or_when_disabled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_jit, "_loaded", False)
    monkeypatch.setattr(_jit, "_kernel", None)  # both restored after the test
    monkeypatch.delenv("DISKIVF_JIT", raising=False)
    first = _jit.scan_topk()
    assert first is not None
    assert _jit.scan_topk() is first
    monkeypatch.setattr(_jit, "_loaded", False)
    monkeypatch.setenv("DISKIVF_JIT", "0")
    assert _jit.scan_topk() is None
    monkeypatch.setattr(_jit, "_loaded", False)
    monkeypatch.delenv("DISKIVF_JIT")
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    assert _jit.scan_topk() is None


def test_a_numba_that_cannot_compile_the_scan_leaves_numpys_path_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import numba

    def broken(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        def fail(*a: Any) -> None:
            raise numba.core.errors.TypingError("no such loop")

        return lambda fn: fail

    monkeypatch.setattr(numba, "njit", broken)
    monkeypatch.setattr(_jit, "_loaded", False)
    monkeypatch.setattr(_jit, "_kernel", None)
    monkeypatch.delenv("DISKIVF_JIT", raising=False)
    x = np.random.default_rng(2).standard_normal((400, 8)).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w", dim=8, nlist=4) as ix:
        ix.train(x)
        ix.add(x)
        with pytest.warns(RuntimeWarning, match="could not compile the single-query scan"):
            assert ix.search(x[5], k=1, nprobe=4).ids[0, 0] == 5
        assert _jit.scan_topk() is None  # decided once: no second warning
        assert ix.search(x[6], k=1, nprobe=4).ids[0, 0] == 6


def test_without_a_writable_cache_the_scan_is_compiled_for_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # numba refuses cache=True at decoration when no cache directory is writable (a
    # read-only install and no user cache): diskivf then compiles without caching.
    import numba

    real = numba.njit
    asked: list[bool] = []

    def no_locator(*args: Any, cache: bool = False, **kwargs: Any) -> Any:
        asked.append(cache)
        if cache:
            raise RuntimeError("cannot cache function '_scan_topk': no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_locator)
    kernel = _jit._compile()
    assert asked == [True, False]
    assert kernel is not None
    heap = np.full(2, np.inf, np.float32), np.full(2, _jit.NO_ID, np.int64)
    x = np.array([[1, 0], [0, 1], [2, 2]], np.float32)
    kernel(x, np.array([1, 0], np.float32), np.zeros(0, np.float32), np.array([5, 6, 7]), *heap)
    assert sorted(zip(heap[0].tolist(), heap[1].tolist(), strict=True)) == [(0.0, 6), (1.0, 5)]
