"""Tests for diskivf.kmeans: k-means training and nearest-centroid assignment, without a disk."""

from __future__ import annotations

import functools
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import permutations
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from diskivf import _blas
from diskivf import kmeans as kmeans_module
from diskivf.kmeans import (
    BlockAssignment,
    KMeansResult,
    _cluster_sums,
    _ClusterSums,
    assign,
    assign_workers,
    group_by_label,
    label_order,
    train,
)


def make_blobs(
    nblobs: int, dim: int, per_blob: int, sigma: float, seed: int
) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.int64]]:
    """Return gaussian blobs around well-separated random centers, their centers and labels."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10, 10, (nblobs, dim))
    noise = sigma * rng.standard_normal((nblobs, per_blob, dim))
    x = (centers[:, None, :] + noise).reshape(-1, dim).astype(np.float32)
    labels = np.repeat(np.arange(nblobs), per_blob)
    return x, centers, labels


def brute_force_sqdist(x: NDArray[Any], c: NDArray[Any]) -> NDArray[np.float64]:
    """Exact squared L2 distances in float64, with np.linalg.norm instead of the GEMM expansion."""
    diff = x.astype(np.float64)[:, None, :] - c.astype(np.float64)[None, :, :]
    return np.asarray(np.linalg.norm(diff, axis=2) ** 2)


def random_data(n: int, dim: int, seed: int = 0) -> NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


# --- train: result shape and reproducibility -------------------------------------------------


def test_result_fields() -> None:
    x = random_data(300, 6)
    res = train(x, 7, niter=5, tol=0)
    assert isinstance(res, KMeansResult)
    assert res.centroids.shape == (7, 6)
    assert res.centroids.dtype == np.float32
    assert res.centroids.flags.c_contiguous
    assert res.niter == len(res.objective) == 5
    assert res.npoints == 300
    assert all(isinstance(v, float) for v in res.objective)
    assert np.isfinite(res.centroids).all()


def test_same_seed_is_bitwise_identical() -> None:
    x = random_data(2000, 16)
    a = train(x, 20, seed=42, niter=8)
    b = train(x.copy(), 20, seed=42, niter=8)
    assert a.centroids.tobytes() == b.centroids.tobytes()
    assert a.objective == b.objective
    assert (a.nsplit, a.niter, a.npoints) == (b.nsplit, b.niter, b.npoints)


def test_different_seeds_differ() -> None:
    x = random_data(2000, 16)
    a = train(x, 20, seed=1, niter=4)
    b = train(x, 20, seed=2, niter=4)
    assert not np.array_equal(a.centroids, b.centroids)


def test_negative_seed_is_accepted_and_distinct() -> None:
    x = random_data(500, 4)
    a = train(x, 5, seed=-3, niter=3)
    assert a.centroids.tobytes() == train(x, 5, seed=-3, niter=3).centroids.tobytes()
    assert not np.array_equal(a.centroids, train(x, 5, seed=3, niter=3).centroids)


def test_input_is_not_modified() -> None:
    x = random_data(400, 8) * 3
    before = x.copy()
    train(x, 4, niter=3, spherical=True)
    train(x, 4, niter=3)
    assert np.array_equal(x, before)


# --- train: quality ---------------------------------------------------------------------------


def test_objective_is_non_increasing() -> None:
    x, _, _ = make_blobs(6, 8, 150, 2.0, seed=3)
    res = train(x, 10, niter=15, tol=0)
    # A split perturbs centroids and may raise the objective; this data must not need one.
    assert res.nsplit == 0
    assert res.niter == 15
    obj = np.array(res.objective)
    assert np.all(obj[1:] <= obj[:-1] * (1 + 1e-6)), obj
    assert obj[-1] < obj[0]


def test_recovers_well_separated_blobs() -> None:
    nblobs, dim, sigma = 4, 8, 0.3
    x, centers, _ = make_blobs(nblobs, dim, 200, sigma, seed=1)
    # Random-row initialisation can start two centroids in one blob and be stuck in a local
    # minimum, so keep the best of several seeds, as FAISS's nredo does.
    best = min((train(x, nblobs, seed=s) for s in range(10)), key=lambda r: r.objective[-1])
    error = min(
        np.abs(best.centroids[list(perm)] - centers).max() for perm in permutations(range(nblobs))
    )
    assert error < 0.1
    # At the optimum the objective is the sum of squared noise: n * dim * sigma^2.
    expected = x.shape[0] * dim * sigma**2
    assert best.objective[-1] == pytest.approx(expected, rel=0.1)


def test_overclustering_never_mixes_blobs() -> None:
    # With more centroids than blobs, a single seed reliably gives every blob its own
    # centroids, so every cluster must be pure.
    x, _, truth = make_blobs(5, 6, 200, 0.5, seed=7)
    res = train(x, 25, seed=0)
    labels, _ = assign(x, res.centroids)
    for cluster in np.unique(labels):
        assert np.unique(truth[labels == cluster]).size == 1


def test_early_stopping() -> None:
    x, _, _ = make_blobs(4, 8, 200, 0.3, seed=1)
    res = train(x, 4, niter=100, tol=1e-3)
    assert res.niter < 100
    prev, last = res.objective[-2], res.objective[-1]
    assert (prev - last) / prev < 1e-3


def test_tol_zero_runs_all_iterations() -> None:
    x = random_data(3000, 8)
    assert train(x, 30, niter=12, tol=0).niter == 12


# --- train: empty clusters ------------------------------------------------------------------


def test_empty_clusters_are_split() -> None:
    # 5 distinct points repeated 40 times: with k=8 at least 3 clusters are empty after every
    # assignment, so each iteration must split.
    distinct = random_data(5, 4, seed=11)
    x = np.repeat(distinct, 40, axis=0)
    res = train(x, 8, niter=10, tol=0)
    assert res.nsplit >= 3 * 10
    assert np.isfinite(res.centroids).all()
    # Splitting lets every distinct point end up with a centroid (almost) on top of it.
    nearest = brute_force_sqdist(distinct, res.centroids).min(axis=1)
    assert nearest.max() < 1e-3


def test_split_of_identical_points_is_symmetric_perturbation() -> None:
    x = np.ones((10, 4), dtype=np.float32)
    res = train(x, 2, niter=1)
    assert res.nsplit == 1
    eps = 1 / 1024
    grown = np.array([1 + eps, 1 - eps, 1 + eps, 1 - eps], dtype=np.float32)
    shrunk = np.array([1 - eps, 1 + eps, 1 - eps, 1 + eps], dtype=np.float32)
    # Both initial centroids are the same point, so the tie sends every point to cluster 0 and
    # cluster 1 is the empty one that receives the grown copy.
    assert np.array_equal(res.centroids, np.stack([shrunk, grown]))


def test_all_zero_data_gives_finite_centroids() -> None:
    res = train(np.zeros((10, 3)), 3, niter=3)
    assert np.array_equal(res.centroids, np.zeros((3, 3), dtype=np.float32))
    assert res.objective == (0.0, 0.0, 0.0)


# --- train: subsampling and input types -----------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "mppc", "expected"),
    [(1000, 5, 20, 100), (100, 5, 20, 100), (101, 5, 20, 100), (99, 5, 20, 99), (7, 7, 1, 7)],
)
def test_subsampling_caps_npoints(n: int, k: int, mppc: int, expected: int) -> None:
    res = train(random_data(n, 3), k, niter=2, max_points_per_centroid=mppc)
    assert res.npoints == expected


def test_subsample_depends_on_seed_and_ignores_unsampled_rows() -> None:
    x = random_data(1000, 4)
    # Default settings use all 1000 rows; a cap of 10 per centroid must train on a subset and
    # therefore find different centroids from the same seed.
    full = train(x, 5, seed=0, niter=5)
    sub = train(x, 5, seed=0, niter=5, max_points_per_centroid=10)
    assert sub.npoints == 50
    assert not np.array_equal(full.centroids, sub.centroids)


def test_memmap_input_matches_in_memory(tmp_path: Path) -> None:
    x = random_data(5000, 8)
    mm = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.memmap(tmp_path / "x.f32", dtype=np.float32, mode="r", shape=x.shape)
    a = train(ro, 10, niter=4, max_points_per_centroid=50)
    b = train(x, 10, niter=4, max_points_per_centroid=50)
    assert a.npoints == 500
    assert a.centroids.tobytes() == b.centroids.tobytes()
    assert type(a.centroids) is np.ndarray


@pytest.mark.parametrize("dtype", ["<f8", ">f4", ">f8", "<f2", "i1", "u1", "<i4"])
def test_dtypes_and_byte_orders_match_float32(dtype: str) -> None:
    # Small integers are exact in every dtype listed, so all conversions give the same float32.
    rng = np.random.default_rng(5)
    x32 = rng.integers(0, 100, size=(600, 6)).astype(np.float32)
    ref = train(x32, 6, seed=3, niter=6)
    res = train(x32.astype(dtype), 6, seed=3, niter=6)
    assert res.centroids.tobytes() == ref.centroids.tobytes()
    assert res.objective == ref.objective


def test_nested_list_input() -> None:
    res = train([[0.0, 0.0], [0.0, 0.1], [10.0, 10.0], [10.0, 10.1]], 2, niter=5)
    assert sorted(res.centroids[:, 0].tolist()) == [0.0, 10.0]


# --- train: spherical -----------------------------------------------------------------------


def test_spherical_centroids_have_unit_norm() -> None:
    x = random_data(1500, 10) * 5 + 1
    res = train(x, 12, niter=6, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(res.centroids, axis=1), 1.0, atol=1e-5)
    # Each objective term is 1 - cos, in [0, 2].
    assert all(0 <= v <= 2 * x.shape[0] for v in res.objective)


def test_spherical_ignores_vector_length() -> None:
    x = random_data(800, 5) + 0.5
    scales = np.random.default_rng(1).uniform(0.1, 50, (800, 1)).astype(np.float32)
    a = train(x, 6, niter=5, spherical=True, seed=4)
    b = train(x * scales, 6, niter=5, spherical=True, seed=4)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-4)


# --- train: errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "kwargs", "match"),
    [
        (np.zeros(10), {}, r"expected x with 2 dimensions .* got shape \(10,\)"),
        (np.zeros((4, 3, 2)), {}, r"expected x with 2 dimensions .* got shape \(4, 3, 2\)"),
        (np.zeros((10, 0)), {}, r"expected x with dim >= 1"),
        (np.zeros((10, 2), dtype=bool), {}, r"integer or float dtype but got bool"),
        (np.zeros((10, 2), dtype=complex), {}, r"integer or float dtype but got complex128"),
        (np.zeros((2, 3)), {}, r"expected at least k=3 training vectors but got n=2"),
        (np.zeros((10, 2)), {"k": 0}, r"expected k >= 1 but got k=0"),
        (np.zeros((10, 2)), {"k": -2}, r"expected k >= 1 but got k=-2"),
        (np.zeros((10, 2)), {"niter": 0}, r"expected niter >= 1 but got niter=0"),
        (
            np.zeros((10, 2)),
            {"max_points_per_centroid": 0},
            r"expected max_points_per_centroid >= 1 but got 0",
        ),
        (np.zeros((10, 2)), {"tol": -0.1}, r"expected a finite tol >= 0 but got tol=-0.1"),
        (np.zeros((10, 2)), {"tol": float("nan")}, r"expected a finite tol >= 0"),
    ],
)
def test_train_rejects_bad_arguments(x: NDArray[Any], kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"k": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        train(x, **args)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
def test_train_rejects_non_finite_values(bad: float) -> None:
    x = random_data(50, 3).astype(np.float64)
    x[17, 1] = bad  # 1e39 is finite in float64 but overflows float32
    with pytest.raises(ValueError, match=r"expected finite training vectors .* in row 17"):
        train(x, 4)


def test_train_reports_original_row_of_non_finite_sample_value() -> None:
    x = np.full((1000, 2), np.nan)
    with pytest.raises(ValueError, match=r"NaN or infinity in row \d+"):
        train(x, 2, max_points_per_centroid=5)


def test_train_rejects_non_integer_k() -> None:
    with pytest.raises(TypeError):
        train(np.zeros((10, 2)), 2.5)  # type: ignore[arg-type]


# --- assign ---------------------------------------------------------------------------------


def check_against_brute_force(
    x: NDArray[Any],
    c: NDArray[np.float32],
    labels: NDArray[np.int64],
    distances: NDArray[np.float32],
) -> None:
    """Check labels/distances against exact float64 distances, allowing float32 rounding."""
    exact = brute_force_sqdist(x, c)
    scale = (np.linalg.norm(x.astype(np.float64), axis=1) ** 2)[:, None] + np.linalg.norm(
        c.astype(np.float64), axis=1
    ) ** 2
    slack = 1e-5 * scale.max(axis=1) + 1e-6
    rows = np.arange(x.shape[0])
    assert labels.dtype == np.int64
    assert distances.dtype == np.float32
    # The chosen centroid is (within rounding) the nearest one, and its distance is reported.
    assert np.all(exact[rows, labels] <= exact.min(axis=1) + slack)
    assert np.all(np.abs(distances - exact[rows, labels]) <= slack)
    assert np.all(distances >= 0)


@pytest.mark.parametrize("block_rows", [1, 7, 128, 1000, 1001, 16384])
def test_assign_matches_brute_force(block_rows: int) -> None:
    x = random_data(1000, 12, seed=1)
    c = random_data(37, 12, seed=2)
    labels, distances = assign(x, c, block_rows=block_rows)
    exact = brute_force_sqdist(x, c)
    # Random gaussian data has no near-ties, so labels must agree exactly.
    assert np.array_equal(labels, exact.argmin(axis=1))
    np.testing.assert_allclose(distances, exact.min(axis=1), rtol=1e-4, atol=1e-4)
    check_against_brute_force(x, c, labels, distances)


def test_assign_block_size_does_not_change_result() -> None:
    x = random_data(999, 9, seed=3)
    c = random_data(20, 9, seed=4)
    ref_labels, ref_dist = assign(x, c, block_rows=999)
    for block_rows in (1, 10, 998, 5000):
        labels, dist = assign(x, c, block_rows=block_rows)
        assert np.array_equal(labels, ref_labels)
        np.testing.assert_allclose(dist, ref_dist, rtol=1e-6, atol=1e-6)


def test_assign_spherical_is_max_inner_product() -> None:
    x = random_data(500, 8, seed=5)
    c = random_data(16, 8, seed=6)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    labels, distances = assign(x, c, spherical=True, block_rows=64)
    ip = x.astype(np.float64) @ c.T.astype(np.float64)
    assert np.array_equal(labels, ip.argmax(axis=1))
    np.testing.assert_allclose(distances, 1 - ip.max(axis=1), rtol=1e-5, atol=1e-5)


def test_assign_uses_precomputed_sqnorms() -> None:
    x = random_data(200, 4, seed=7)
    c = random_data(5, 4, seed=8)
    sqn = np.einsum("ij,ij->i", c, c)
    labels, dist = assign(x, c, centroid_sqnorms=sqn)
    ref_labels, ref_dist = assign(x, c)
    assert np.array_equal(labels, ref_labels)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-6)
    # A huge norm for centroid 0 must steer every row away from it, proving it is used.
    fake = sqn.copy()
    fake[0] = 1e9
    assert 0 not in assign(x, c, centroid_sqnorms=fake)[0]


@pytest.mark.parametrize("dtype", ["<f8", ">f4", "<f2"])
def test_assign_accepts_other_dtypes(dtype: str) -> None:
    # Values exact in float16, so every dtype converts to the very same float32 arrays.
    rng = np.random.default_rng(9)
    x = rng.integers(-8, 8, size=(300, 5)).astype(np.float32)
    c = (rng.integers(-8, 8, size=(7, 5)) + 0.5).astype(np.float32)
    ref = assign(x, c)
    labels, dist = assign(x.astype(dtype), c.astype(dtype), block_rows=50)
    assert np.array_equal(labels, ref[0])
    np.testing.assert_array_equal(dist, ref[1])


def test_assign_empty_input() -> None:
    labels, dist = assign(np.zeros((0, 3), dtype=np.float32), random_data(4, 3))
    assert labels.shape == (0,)
    assert dist.shape == (0,)


def test_assign_puts_blob_points_on_their_center() -> None:
    x, centers, truth = make_blobs(3, 4, 100, 0.2, seed=2)
    labels, dist = assign(x, centers.astype(np.float32))
    assert np.array_equal(labels, truth)
    # Squared distance to the own center is sigma^2 * chi2(dim): mean 0.16 here.
    assert dist.max() < 1.0


@pytest.mark.parametrize(
    ("x", "c", "kwargs", "match"),
    [
        (np.zeros(3), np.zeros((2, 3)), {}, r"expected x with 2 dimensions"),
        (np.zeros((4, 3)), np.zeros(3), {}, r"expected centroids with 2 dimensions"),
        (np.zeros((4, 3)), np.zeros((2, 5)), {}, r"expected x with dim=5 .* but got dim=3"),
        (np.zeros((4, 3)), np.zeros((0, 3)), {}, r"at least one centroid but got .* 0 rows"),
        (np.zeros((4, 3)), np.zeros((2, 3)), {"block_rows": 0}, r"block_rows >= 1 but got"),
        (
            np.zeros((4, 3)),
            np.zeros((2, 3)),
            {"centroid_sqnorms": np.zeros(3, dtype=np.float32)},
            r"expected centroid_sqnorms with shape \(2,\) but got \(3,\)",
        ),
        (np.zeros((4, 3), dtype=object), np.zeros((2, 3)), {}, r"integer or float dtype"),
    ],
)
def test_assign_rejects_bad_arguments(
    x: NDArray[Any], c: NDArray[Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        assign(x, c, **kwargs)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(0, 40),
    k=st.integers(1, 8),
    dim=st.integers(1, 6),
    block_rows=st.integers(1, 50),
)
def test_assign_property_matches_brute_force(
    data: st.DataObject, n: int, k: int, dim: int, block_rows: int
) -> None:
    elements = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)
    x = data.draw(hnp.arrays(np.float32, (n, dim), elements=elements))
    c = data.draw(hnp.arrays(np.float32, (k, dim), elements=elements))
    labels, distances = assign(x, c, block_rows=block_rows)
    assert labels.shape == distances.shape == (n,)
    assert np.all((labels >= 0) & (labels < k))
    check_against_brute_force(x, c, labels, distances)


# ---------------------------------------------------------------- worker threads


def needs_threadpoolctl(fn: Any) -> Any:
    """Worker threads need threadpoolctl, which the test extra installs: fail loudly without."""

    def check(*args: Any, **kwargs: Any) -> None:
        assert _blas.can_limit(), "threadpoolctl is missing: pip install -e '.[test]'"
        fn(*args, **kwargs)

    return functools.wraps(fn)(check)


@needs_threadpoolctl
@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("refine", [False, True])
def test_assign_result_does_not_depend_on_threads(spherical: bool, refine: bool) -> None:
    x = random_data(2000, 16, seed=11)
    c = random_data(50, 16, seed=12)
    ref = assign(x, c, spherical=spherical, block_rows=128, refine=refine, threads=1)
    for threads in (2, 3, 40):
        labels, dist = assign(
            x, c, spherical=spherical, block_rows=128, refine=refine, threads=threads
        )
        assert np.array_equal(labels, ref[0])
        assert np.array_equal(dist, ref[1])  # same block shapes: the same float32 bits
    if not spherical:
        check_against_brute_force(x, c, ref[0], ref[1])


@needs_threadpoolctl
def test_train_result_does_not_depend_on_threads() -> None:
    x = random_data(3000, 8, seed=13)
    one = train(x, 40, niter=6, tol=0, threads=1)
    two = train(x, 40, niter=6, tol=0, threads=2)
    assert np.array_equal(one.centroids, two.centroids)
    assert one.objective == two.objective


@pytest.mark.parametrize("k", [1, 7, 1 << 16, (1 << 16) + 1, 1 << 20])
def test_label_order_is_the_stable_argsort(k: int) -> None:
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 5000)
    labels[:50] = k - 1  # the largest label, where a narrowing cast would wrap
    assert np.array_equal(label_order(labels, k), np.argsort(labels, kind="stable"))


def _skewed_labels(rng: np.random.Generator, n: int, k: int) -> NDArray[np.int64]:
    # Skewed sizes and empty clusters, so the workers' cluster ranges are uneven.
    labels = np.minimum(rng.geometric(0.08, n) - 1, k - 1)
    labels[labels == 5] = 6
    return labels


@needs_threadpoolctl
def test_centroid_update_is_exact_and_thread_invariant() -> None:
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3000, 6)).astype(np.float32)
    k = 40
    labels = _skewed_labels(rng, len(x), k)
    old = rng.standard_normal((k, 6)).astype(np.float32)
    sums = _ClusterSums(x, labels, k, threads=1)
    ref = sums.means(old)
    assert np.array_equal(sums.counts, np.bincount(labels, minlength=k))
    for c in range(k):
        want = x[labels == c].mean(axis=0, dtype=np.float64) if sums.counts[c] else old[c]
        np.testing.assert_allclose(ref[c], want, rtol=1e-6, atol=1e-7)
    for threads in (2, 3, 7, 64):
        got, _ = _cluster_sums(x, labels, k, np.empty_like(x), threads=threads)
        assert np.array_equal(got, sums.sums)


def test_relabelled_sums_match_a_fresh_summation() -> None:
    rng = np.random.default_rng(22)
    x = rng.standard_normal((5000, 7)).astype(np.float32)
    k = 50
    labels = _skewed_labels(rng, len(x), k)
    sums = _ClusterSums(x, labels, k, threads=2)
    for moved in (0.5, 0.2, 0.0, 0.05, 1.0):
        labels = labels.copy()
        rows = rng.random(len(x)) < moved
        labels[rows] = rng.integers(0, k - 10, int(rows.sum()))  # clusters k-10.. empty out
        sums.relabel(labels)
        fresh, counts = _cluster_sums(x, labels, k, np.empty_like(x), threads=1)
        assert np.array_equal(sums.counts, counts)
        np.testing.assert_allclose(sums.sums, fresh, rtol=1e-12, atol=1e-9)
    assert (sums.counts[k - 10 :] == 0).all()
    # Means of float32 rows: the drift of the float64 sums never reaches them.
    old = np.zeros((k, 7), np.float32)
    full = counts > 0
    want = old.copy()
    want[full] = fresh[full] / counts[full, None]
    assert np.array_equal(sums.means(old), want)


def test_assign_without_threadpoolctl_runs_blocks_in_turn(monkeypatch: pytest.MonkeyPatch) -> None:
    x = random_data(1500, 8, seed=14)
    c = random_data(30, 8, seed=15)
    monkeypatch.setattr(_blas, "_libs", [])  # as if threadpoolctl were not installed
    assert not _blas.can_limit()
    assert _blas.current_threads() is None
    labels, dist = assign(x, c, block_rows=100, threads=4)
    check_against_brute_force(x, c, labels, dist)


@needs_threadpoolctl
def test_threads_default_follows_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    # A search holds BLAS to one thread; assignment inside such a section must not fan out.
    with _blas.blas_threads(1):
        assert _blas.current_threads() == 1
        assert assign_workers(None, 10) == 1
    # blas_threads only ever lowers the count; a machine whose BLAS uses 3 threads:
    monkeypatch.setattr(_blas, "current_threads", lambda: 3)
    monkeypatch.setattr(kmeans_module, "usable_cpus", lambda: 3)
    assert assign_workers(None, 10) == 3
    assert assign_workers(None, 2) == 2
    assert assign_workers(5, 10) == 5
    assert assign_workers(20, 100) == 20


@needs_threadpoolctl
def test_default_workers_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a big machine the default stops at 8 (each worker holds a score block)...
    monkeypatch.setattr(_blas, "current_threads", lambda: 64)
    monkeypatch.setattr(kmeans_module, "usable_cpus", lambda: 64)
    assert assign_workers(None, 100) == 8
    # ...while an explicit request is honoured.
    assert assign_workers(32, 100) == 32


@needs_threadpoolctl
def test_default_workers_stay_within_the_cpus_the_process_may_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # BLAS counts its threads from the affinity mask: in a container whose CPU quota is 2
    # on a 64-core host it starts 64, and a worker per thread would only queue.
    monkeypatch.setattr(_blas, "current_threads", lambda: 64)
    monkeypatch.setattr(kmeans_module, "usable_cpus", lambda: 2)
    assert assign_workers(None, 100) == 2
    assert assign_workers(6, 100) == 6  # asked for: honoured


class _FailingRows(np.ndarray):
    """An array whose row slices past ``fail_at`` raise, like a memmap whose disk fails."""

    fail_at = 0

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice) and (key.start or 0) >= self.fail_at:
            raise OSError(5, "simulated read error")
        return super().__getitem__(key)


@pytest.mark.parametrize("threads", [1, 2])
def test_assign_worker_error_propagates(threads: int) -> None:
    x = random_data(1000, 8, seed=16).view(_FailingRows)
    x.fail_at = 600
    c = random_data(10, 8, seed=17)
    with pytest.raises(OSError, match="simulated read error"):
        assign(x, c, block_rows=100, threads=threads)


def _block_job(x: NDArray[Any], c: NDArray[np.float32], block_rows: int) -> BlockAssignment:
    return BlockAssignment(x, c, np.einsum("ij,ij->i", c, c), False, block_rows, refine=True)


def test_block_assignment_shared_by_threads_matches_assign() -> None:
    # Threads that join at different times (an add's writer helps when it is free) take
    # blocks from the same job; the labels are those of a one-thread assignment.
    x = random_data(3000, 8, seed=18)
    c = random_data(40, 8, seed=19)
    ref_labels, ref_dist = assign(x, c, block_rows=64, refine=True, threads=1)
    job = _block_job(x, c, 64)
    assert job.nblocks == 47
    with _blas.blas_threads(1), ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(job.work) for _ in range(3)]
        job.work()
        for f in futures:
            f.result()
    labels, dist = job.result()
    assert np.array_equal(labels, ref_labels)
    assert np.array_equal(dist, ref_dist)
    job.work()  # nothing left to take: returns at once, changes nothing
    assert np.array_equal(job.result()[0], ref_labels)


def test_block_assignment_result_waits_for_blocks_in_progress() -> None:
    x = random_data(400, 8, seed=20)
    c = random_data(10, 8, seed=21)
    job = _block_job(x, c, 100)
    worker = threading.Thread(target=job.work)
    worker.start()
    labels, dist = job.result()  # this thread takes no block: it only waits
    worker.join()
    check_against_brute_force(x, c, labels, dist)


def test_block_assignment_error_reaches_result_and_stops_other_threads() -> None:
    x = random_data(1000, 8, seed=16).view(_FailingRows)
    x.fail_at = 300
    c = random_data(10, 8, seed=17)
    job = _block_job(x, c, 100)
    with pytest.raises(OSError, match="simulated read error"):
        job.work()
    with pytest.raises(OSError, match="simulated read error"):
        job.result()
    job.work()  # another thread arriving later takes no more blocks
    assert job._taken == 4  # blocks 0-2 and the failing one


def test_block_assignment_cancelled_before_the_end_has_no_result() -> None:
    x = random_data(1000, 8, seed=22)
    c = random_data(10, 8, seed=23)
    job = _block_job(x, c, 100)
    job.cancel()
    job.work()
    with pytest.raises(RuntimeError, match="cancelled"):
        job.result()


@needs_threadpoolctl
def test_overlapping_blas_limits_restore_the_original_count() -> None:
    # A search on one thread and training on another overlap like this; an early leaver must
    # not lift the limit under the other, nor the last one leave BLAS at one thread.
    libs = _blas._controllers()
    orig = [lib.get() for lib in libs]
    try:
        for lib in libs:  # a known starting point, whatever the machine has
            lib.set(2)
        first, second = _blas.blas_threads(1), _blas.blas_threads(1)
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert _blas.current_threads() == 1
        second.__exit__(None, None, None)
        assert _blas.current_threads() == 2
    finally:
        for lib, n in zip(libs, orig, strict=True):
            lib.set(n)


@pytest.mark.parametrize("k", [3, 1 << 16, (1 << 16) + 5])
def test_group_by_label_matches_a_stable_sort(k: int) -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, k, 500)
    labels[:40] = k - 1  # a run at the top label, and ties in input order
    rows = rng.standard_normal((500, 3)).astype(np.float32)
    ids = np.arange(500, dtype=np.int64)
    runs, (grouped_rows, grouped_ids) = group_by_label(labels, k, rows, ids)
    order = np.argsort(labels, kind="stable")
    assert np.array_equal(grouped_rows, rows[order])
    assert np.array_equal(grouped_ids, order)
    assert [lab for lab, _, _ in runs] == sorted(set(labels.tolist()))
    assert runs[0][1] == 0
    assert runs[-1][2] == 500
    for (_, _, stop), (_, start, _) in itertools.pairwise(runs):
        assert stop == start  # contiguous, covering every row
    for lab, start, stop in runs:
        assert (labels[grouped_ids[start:stop]] == lab).all()
    runs, (empty,) = group_by_label(labels[:0], k, rows[:0])
    assert runs == []
    assert empty.shape == (0, 3)
