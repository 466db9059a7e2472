"""K-means training and nearest-centroid assignment for the IVF coarse quantizer.

This module is pure numpy: it takes arrays and returns arrays, never touches files, and keeps all
randomness in one seeded :func:`numpy.random.default_rng`, so training is reproducible and can be
tested without a disk. :mod:`diskivf.index` wraps it and stores the centroids.

The algorithm follows FAISS's ``Clustering``: subsample at most ``k * max_points_per_centroid``
training vectors, initialise the centroids with distinct random sample rows, run Lloyd iterations
whose distances use the GEMM expansion ``||x||^2 - 2 x.c + ||c||^2``, and split a large cluster
whenever a cluster becomes empty.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from diskivf import _blas
from diskivf._cpu import usable_cpus

__all__ = [
    "BlockAssignment",
    "KMeansResult",
    "assign",
    "assign_workers",
    "group_by_label",
    "label_order",
    "train",
]

# FAISS's split_clusters perturbation: big enough that the two copies of a split centroid attract
# different points at the next assignment, small enough that neither moves far from the cluster.
_SPLIT_EPS = 1.0 / 1024.0

# Training bounds each worker's (rows x k) distance block to 2**20 float32 values (4 MiB): small
# enough that the argmin and tie passes after each GEMM run in cache and memory stays flat for
# large k, big enough that the GEMM runs near peak speed. Measured with two workers on 262k x 128,
# k 1024: 0.37-0.40 s per iteration with 1024-row blocks, 0.48 s with 4096-row ones.
_TRAIN_BLOCK_ELEMENTS = 1 << 20

# Default cap on assignment worker threads (an explicit ``threads=`` may ask for more).
_MAX_DEFAULT_WORKERS = 8

# Kinds numpy can convert to float32 without losing meaning: signed/unsigned integers and floats.
# Bools, complex numbers, strings and objects are rejected rather than silently coerced.
_NUMERIC_KINDS = "iuf"


@dataclass(frozen=True)
class KMeansResult:
    """The outcome of :func:`train`.

    Attributes
    ----------
    centroids : numpy.ndarray
        ``(k, dim)`` C-contiguous ``float32`` centroids. With ``spherical=True`` every row has unit
        L2 norm.
    objective : tuple of float
        One value per iteration: the sum over training points of the squared L2 distance to the
        assigned centroid, or of ``1 - cos`` with ``spherical=True``. Value ``i`` is measured at
        the assignment step of iteration ``i``, i.e. for the centroids entering that iteration
        (the FAISS convention); the returned centroids are one update step further along.
    nsplit : int
        Total number of empty clusters that were re-seeded by splitting a large cluster. A large
        value relative to ``k`` hints that the data has many duplicate vectors or that ``k`` is
        too large for it.
    niter : int
        Number of Lloyd iterations actually run (``len(objective)``); smaller than the requested
        ``niter`` when training converged early.
    npoints : int
        Number of training vectors used after subsampling.
    """

    centroids: NDArray[np.float32]
    objective: tuple[float, ...]
    nsplit: int
    niter: int
    npoints: int


def train(
    x: ArrayLike,
    k: int,
    *,
    niter: int = 10,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    spherical: bool = False,
    tol: float = 1e-4,
    threads: int | None = None,
) -> KMeansResult:
    """Cluster ``x`` into ``k`` centroids with Lloyd's k-means.

    Parameters
    ----------
    x : array_like
        ``(n, dim)`` training vectors of any integer or floating dtype and any byte order. A
        :class:`numpy.memmap` larger than RAM is fine: rows are subsampled *before* conversion, so
        only the chosen rows are read, and only the sample is held in memory as ``float32``.
    k : int
        Number of centroids (``nlist`` for an IVF index). More centroids make each inverted list
        shorter (faster probes) but cost proportionally more training time and need more training
        vectors; ``n`` must be at least ``k``.
    niter : int, optional
        Maximum number of Lloyd iterations. Each one costs one ``n x k x dim`` GEMM; FAISS's
        default of 20-25 is usually past the point of diminishing returns.
    seed : int, optional
        Seed for the subsampling, the initial centroids and the choice of clusters to split; any
        integer, negative ones included. The same input and seed give bitwise identical
        centroids on the same machine and BLAS.
    max_points_per_centroid : int, optional
        At most ``k * max_points_per_centroid`` vectors, drawn uniformly without replacement, are
        used for training. Larger values give slightly better centroids at a linear cost in time
        and memory (``4 * dim`` bytes per sampled vector).
    spherical : bool, optional
        If true, train for cosine similarity: sample rows are L2-normalised (all-zero rows are
        left as they are), points are assigned by maximum inner product and centroids are
        re-normalised after every update.
    tol : float, optional
        Stop once an iteration improves the objective by less than this fraction of its previous
        value. ``0`` runs all ``niter`` iterations unless the objective reaches zero or rises.
        Iterations right after a cluster split never trigger the stop, since a split may raise
        the objective temporarily.
    threads : int, optional
        Worker threads for the assignment steps, each running BLAS single-threaded on its own
        blocks. Default: as many as BLAS may use now, at most 8. Needs ``threadpoolctl``
        (without it BLAS keeps its own threads and blocks run one at a time). The result does
        not depend on it.

    Returns
    -------
    KMeansResult
        The centroids and the training statistics.

    Raises
    ------
    ValueError
        If ``x`` is not two-dimensional, has no columns or a non-numeric dtype; if ``k < 1``,
        ``n < k``, ``niter < 1``, ``max_points_per_centroid < 1`` or ``tol`` is negative or not
        finite; or if the training sample contains NaN or infinity (including values too large
        for ``float32``).
    TypeError
        If ``k``, ``niter``, ``seed`` or ``max_points_per_centroid`` is not an integer.

    Notes
    -----
    Initialisation picks ``k`` distinct random sample rows, as FAISS does. k-means++ gives better
    starting points but costs ``k`` passes over the sample, which is prohibitive for the
    thousands of centroids an IVF index needs. A cluster that ends up empty is given a perturbed
    copy of a large cluster's centroid, chosen with probability proportional to ``size - 1``
    (FAISS ``split_clusters``).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.concatenate([rng.normal(-5, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))])
    >>> result = train(x, 2, seed=1)
    >>> result.centroids.shape, result.centroids.dtype
    ((2, 2), dtype('float32'))
    >>> bool(np.all(np.abs(np.abs(result.centroids) - 5) < 0.1))
    True
    """
    arr = np.asarray(x)
    k = operator.index(k)
    niter = operator.index(niter)
    max_points_per_centroid = operator.index(max_points_per_centroid)
    n, _ = _check_matrix(arr, "x")
    if k < 1:
        raise ValueError(f"expected k >= 1 but got k={k}")
    if n < k:
        raise ValueError(f"expected at least k={k} training vectors but got n={n}")
    if niter < 1:
        raise ValueError(f"expected niter >= 1 but got niter={niter}")
    if max_points_per_centroid < 1:
        raise ValueError(f"expected max_points_per_centroid >= 1 but got {max_points_per_centroid}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"expected a finite tol >= 0 but got tol={tol}")

    seed = operator.index(seed)
    # default_rng rejects negative seeds; mapping them to non-negative ones keeps every integer
    # usable (collisions would need |seed| >= 2**127).
    rng = np.random.default_rng(seed % (1 << 128))
    max_points = k * max_points_per_centroid
    rows: NDArray[np.int64] | None = None
    if n > max_points:
        # Sorted indices turn the gather into one forward pass, so a memmap reads each chosen page
        # once and in order instead of seeking randomly.
        rows = np.sort(rng.choice(n, size=max_points, replace=False))
        picked = arr[rows]
    else:
        picked = arr
    # Values beyond float32's range become inf here; the finiteness check below reports them
    # with a row number, which is more useful than numpy's overflow warning.
    with np.errstate(over="ignore"):
        sample = np.ascontiguousarray(picked, dtype=np.float32)

    finite = np.isfinite(sample).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        row = bad if rows is None else int(rows[bad])
        raise ValueError(
            f"expected finite training vectors but got NaN or infinity in row {row} "
            "(after conversion to float32)"
        )
    if spherical:
        sample = _normalize_rows(sample)

    npoints = sample.shape[0]
    x_sqnorms = _row_sqnorms(sample)
    centroids = sample[rng.choice(npoints, size=k, replace=False)]
    block_rows = max(1, _TRAIN_BLOCK_ELEMENTS // k)

    objective: list[float] = []
    nsplit = 0
    split_before = False
    sums: _ClusterSums | None = None
    for it in range(niter):
        job = BlockAssignment(
            sample, centroids, _row_sqnorms(centroids), spherical, block_rows, x_sqnorms
        )
        labels, distances = job.run(threads)
        objective.append(float(distances.sum(dtype=np.float64)))
        if sums is None:
            sums = _ClusterSums(sample, labels, k, threads)
        else:
            sums.relabel(labels)
        centroids, counts = sums.means(centroids), sums.counts
        new_splits = _split_empty_clusters(centroids, counts, rng)
        if spherical:
            centroids = _normalize_rows(centroids)
        nsplit += new_splits
        if it > 0 and not split_before and _converged(objective[-2], objective[-1], tol):
            break
        split_before = new_splits > 0

    return KMeansResult(
        centroids=np.ascontiguousarray(centroids, dtype=np.float32),
        objective=tuple(objective),
        nsplit=nsplit,
        niter=len(objective),
        npoints=npoints,
    )


def assign(
    x: NDArray[np.floating[Any]],
    centroids: NDArray[np.float32],
    *,
    spherical: bool = False,
    centroid_sqnorms: NDArray[np.float32] | None = None,
    block_rows: int = 16384,
    refine: bool = False,
    threads: int | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Find the nearest centroid of every row of ``x``.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, dim)`` query or database vectors, any integer or floating dtype and byte order
        (a memmap works; it is read and converted to ``float32`` one block at a time).
    centroids : numpy.ndarray
        ``(k, dim)`` centroids, for example :attr:`KMeansResult.centroids`.
    spherical : bool, optional
        If false, "nearest" means smallest squared L2 distance. If true, it means largest inner
        product, which is cosine similarity when ``x`` and ``centroids`` have unit-norm rows.
    centroid_sqnorms : numpy.ndarray, optional
        ``(k,)`` precomputed squared L2 norms of ``centroids``, to save an ``O(k * dim)`` pass
        when ``assign`` is called repeatedly with the same centroids. Ignored if ``spherical``.
    block_rows : int, optional
        Rows processed per GEMM. Peak temporary memory is about ``block_rows * (k + dim) * 4``
        bytes; smaller blocks bound memory more tightly, larger ones amortise per-call overhead.
    refine : bool, optional
        Re-decide near-ties exactly, so that the labels do not depend on the BLAS library,
        its thread count or the block shapes (which change the rounding of the float32
        products). A row whose best score is within the worst-case float32 rounding error of
        another centroid's is re-scored against those candidates in float64 without BLAS,
        ties going to the lowest index. Near-ties are rare, so this costs one comparison pass
        over each block. Index builds use it: a parallel build then stores exactly what a
        single-process build stores.
    threads : int, optional
        Worker threads, each running BLAS single-threaded on its own blocks and holding one
        ``block_rows x k`` float32 score block. Default: as many as BLAS may use now, at most
        8 (one inside a search or a process-pool worker whose BLAS is held to one thread).
        Needs ``threadpoolctl``; without it blocks run one at a time.

    Returns
    -------
    labels : numpy.ndarray
        ``(n,)`` ``int64`` index of the nearest centroid. Exact ties go to the lowest index.
    distances : numpy.ndarray
        ``(n,)`` ``float32`` squared L2 distance to that centroid (clipped at 0, since the GEMM
        expansion can round slightly below it), or ``1 - inner product`` if ``spherical``.

    Raises
    ------
    ValueError
        If ``x`` or ``centroids`` is not two-dimensional or has a non-numeric dtype, if their
        ``dim`` differ, if ``centroids`` has no rows, if ``centroid_sqnorms`` does not have shape
        ``(k,)``, or if ``block_rows < 1``.

    Notes
    -----
    Distances come from ``||x||^2 - 2 x.c + ||c||^2`` computed in ``float32``, which loses
    relative precision when ``x`` is far from the origin compared with the spread of the
    centroids; near-ties may then resolve differently than an exact computation would.

    Examples
    --------
    >>> c = np.array([[0.0, 0.0], [10.0, 0.0]], dtype=np.float32)
    >>> labels, distances = assign(np.array([[1.0, 0.0], [9.0, 1.0]]), c)
    >>> labels.tolist(), distances.tolist()
    ([0, 1], [1.0, 2.0])
    """
    _, dim = _check_matrix(x, "x")
    k, cdim = _check_matrix(centroids, "centroids")
    block_rows = operator.index(block_rows)
    if cdim != dim:
        raise ValueError(f"expected x with dim={cdim} (as centroids) but got dim={dim}")
    if k < 1:
        raise ValueError("expected at least one centroid but got centroids with 0 rows")
    if block_rows < 1:
        raise ValueError(f"expected block_rows >= 1 but got block_rows={block_rows}")
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroid_sqnorms is None or spherical:
        c_sqnorms = _row_sqnorms(c)
    else:
        if np.shape(centroid_sqnorms) != (k,):
            raise ValueError(
                f"expected centroid_sqnorms with shape ({k},) but got {np.shape(centroid_sqnorms)}"
            )
        c_sqnorms = np.ascontiguousarray(centroid_sqnorms, dtype=np.float32)

    job = BlockAssignment(x, c, c_sqnorms, spherical, block_rows, refine=refine)
    return job.run(threads)


def _check_matrix(a: NDArray[Any], name: str) -> tuple[int, int]:
    """Validate that ``a`` is a non-empty-width numeric matrix and return its shape."""
    if a.ndim != 2:
        raise ValueError(f"expected {name} with 2 dimensions (n, dim) but got shape {a.shape}")
    if a.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"expected {name} with an integer or float dtype but got {a.dtype}")
    rows, dim = a.shape
    if dim < 1:
        raise ValueError(f"expected {name} with dim >= 1 but got shape {a.shape}")
    return int(rows), int(dim)


def _row_sqnorms(a: NDArray[np.float32]) -> NDArray[np.float32]:
    """Return the squared L2 norm of every row of a float32 matrix, without a temporary copy."""
    sqnorms: NDArray[np.float32] = np.einsum("ij,ij->i", a, a)
    return sqnorms


def _normalize_rows(a: NDArray[np.float32]) -> NDArray[np.float32]:
    """Return ``a`` with unit-norm rows; all-zero rows have no direction and stay zero.

    Norms in float64, as :func:`diskivf.search.normalize_rows` computes them: tiny float32 rows
    would otherwise have a squared norm of 0 and stay unscaled.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", a, a, dtype=np.float64))
    norms[norms == 0] = 1
    return np.ascontiguousarray(a / norms[:, None], dtype=np.float32)


class BlockAssignment:
    """Nearest-centroid assignment of the rows of ``x``, as blocks that any thread may take.

    Every thread that calls :meth:`work` takes blocks one at a time until none is left, so a
    thread with other duties (writing the previous batch of an add) can join an assignment
    when it is free, and a slow core just takes fewer blocks. Every block has the same shape
    whoever runs it, so the float32 scores, and hence the labels, do not depend on the threads.
    Callers hold BLAS to one thread while several threads work (:func:`assign` does).

    Parameters are as for :func:`assign`, with ``c_sqnorms`` the centroids' squared norms
    (ignored when ``spherical``) and ``x_sqnorms``, if given, the rows' squared norms. ``x``
    may have any numeric dtype; each block is converted to float32 on its own, so a memmap is
    never materialised whole. They are not checked here: :func:`assign` checks them before it
    builds one, and so must other callers.
    """

    def __init__(
        self,
        x: NDArray[Any],
        centroids: NDArray[np.float32],
        c_sqnorms: NDArray[np.float32],
        spherical: bool,
        block_rows: int,
        x_sqnorms: NDArray[np.float32] | None = None,
        *,
        refine: bool = False,
    ) -> None:
        self._x, self._centroids, self._c_sqnorms = x, centroids, c_sqnorms
        self._spherical, self._block_rows, self._x_sqnorms = spherical, block_rows, x_sqnorms
        self._refine = refine
        n = x.shape[0]
        self.labels = np.empty(n, dtype=np.int64)
        self.distances = np.empty(n, dtype=np.float32)
        # The GEMM operand, contiguous: a transposed view costs OpenBLAS a transposing pack
        # per block, 1-4% of the GEMM (tools/bench_assign.py). For l2 it is (dim + 1, k):
        # -2c (scaling by -2 is exact) over a last row ||c||^2, against rows of x with a
        # last column of ones, so the GEMM yields ||c||^2 - 2 x.c (all the argmin needs)
        # without a separate pass adding the norms to the scores, 5-10% of a block's time.
        if spherical:
            self._ct = np.ascontiguousarray(centroids.T)
        else:
            self._ct = np.empty((centroids.shape[1] + 1, len(centroids)), np.float32)
            np.multiply(centroids.T, -2, out=self._ct[:-1])
            self._ct[-1] = c_sqnorms
        norms = _row_sqnorms(centroids) if spherical else c_sqnorms
        self._cmax = float(np.sqrt(norms.max()))
        self.nblocks = -(-n // block_rows)
        self._taken = 0  # blocks handed out
        self._done = 0  # blocks finished
        self._error: BaseException | None = None
        self._cancelled = False
        self._cond = threading.Condition()

    def run(self, threads: int | None = None) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Assign every block on ``threads`` threads, this one included, and return
        :meth:`result` (``threads`` as for :func:`assign`)."""
        workers = assign_workers(threads, self.nblocks)
        if workers <= 1:
            with _blas.blas_threads(1 if workers == 1 else None):
                self.work()
            return self.result()
        with _blas.blas_threads(1), ThreadPoolExecutor(workers - 1, "diskivf-assign") as pool:
            for _ in range(workers - 1):
                pool.submit(self.work)
            try:
                self.work()
            finally:
                self.cancel()  # an interrupted caller stops the workers after their block
        return self.result()

    def work(self) -> None:
        """Assign blocks on this thread until none is left to take.

        Raises
        ------
        Exception
            Whatever a block raised; :meth:`result` raises it too, on any thread.
        """
        scores: NDArray[np.float32] | None = None
        rows_in: NDArray[np.float32] | None = None
        while True:
            with self._cond:  # blocks are handed out one at a time
                if self._cancelled or self._taken == self.nblocks:
                    return
                start = self._taken * self._block_rows
                self._taken += 1
            if scores is None or rows_in is None:
                # One buffer per thread and call for the (rows x k) scores: a fresh multi-MiB
                # array per block costs page faults that measured ~15% of the assignment time.
                # Likewise, for l2, the GEMM's input rows with their column of ones (__init__).
                rows = min(self._block_rows, len(self.labels))
                scores = np.empty((rows, len(self._centroids)), dtype=np.float32)
                rows_in = np.ones((0 if self._spherical else rows, len(self._ct)), np.float32)
            try:
                self._one_block(start, scores, rows_in)
            except BaseException as exc:
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._cancelled = True
                raise
            finally:
                with self._cond:
                    self._done += 1
                    self._cond.notify_all()

    def cancel(self) -> None:
        """Hand out no more blocks; those being worked on finish."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def result(self) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Wait until every block is assigned and return ``(labels, distances)`` as
        :func:`assign` does.

        Raises
        ------
        Exception
            The first error a block raised.
        RuntimeError
            The assignment was cancelled before every block was taken.
        """
        with self._cond:
            # Until every block handed out is finished, and no more will be.
            while self._done < self._taken or not (self._cancelled or self._taken == self.nblocks):
                self._cond.wait()
        if self._error is not None:
            raise self._error
        if self._done < self.nblocks:
            raise RuntimeError("the assignment was cancelled before it finished")
        return self.labels, self.distances

    def _one_block(
        self, start: int, scores: NDArray[np.float32], rows_in: NDArray[np.float32]
    ) -> None:
        x, centroids, refine = self._x, self._centroids, self._refine
        stop = min(start + self._block_rows, x.shape[0])
        block = scores[: stop - start]
        if self._spherical:
            xb = np.ascontiguousarray(x[start:stop], dtype=np.float32)  # float32 rows: no copy
            np.matmul(xb, self._ct, out=block)
            block_labels = np.argmax(block, axis=1)
            if refine:
                _refine_ties(xb, _row_sqnorms(xb), centroids, block, block_labels, True, self._cmax)
            best = np.take_along_axis(block, block_labels[:, None], axis=1)[:, 0]
            np.subtract(1, best, out=self.distances[start:stop])
        else:
            xin = rows_in[: stop - start]
            xb = xin[:, : x.shape[1]]
            xb[...] = x[start:stop]  # to float32; a memmap's block is read here
            np.matmul(xin, self._ct, out=block)  # ||c||^2 - 2 x.c: ||x||^2 is constant per row
            block_labels = np.argmin(block, axis=1)
            xsq = _row_sqnorms(xb) if self._x_sqnorms is None else self._x_sqnorms[start:stop]
            if refine:
                _refine_ties(xb, xsq, centroids, block, block_labels, False, self._cmax)
            # ||x||^2 added to the winning column alone.
            best = np.take_along_axis(block, block_labels[:, None], axis=1)[:, 0]
            best += xsq
            # The expansion can round a true zero slightly below it; a distance never is.
            np.maximum(best, 0, out=self.distances[start:stop])
        self.labels[start:stop] = block_labels


def assign_workers(threads: int | None, nblocks: int) -> int:
    """Worker threads for ``nblocks`` assignment blocks.

    The threads replace BLAS's own: every block's GEMM runs single-threaded while the workers
    also split the argmin and tie passes, which BLAS threads cannot. ``None`` means as many as
    BLAS may use now, so a process whose BLAS is held to one thread (a search, a worker of a
    process pool) stays at one, and no more than the CPUs the process may use: BLAS counts
    its threads from the affinity mask, which a container's CPU quota does not narrow.
    Without threadpoolctl BLAS cannot be held to one thread: the answer is then 0, meaning
    blocks run one at a time with BLAS threading as it is.
    """
    if not _blas.can_limit():
        return 0
    if threads is None:
        # Capped like search's default: each worker holds its own (rows x k) score block.
        threads = min(_blas.current_threads() or 1, usable_cpus(), _MAX_DEFAULT_WORKERS)
    return max(1, min(threads, nblocks))


def _refine_ties(
    xb: NDArray[np.float32],
    x_sqnorms: NDArray[np.float32],
    centroids: NDArray[np.float32],
    scores: NDArray[np.float32],
    labels: NDArray[np.int64],
    spherical: bool,
    cmax: float,
) -> None:
    """Re-decide, in place, the labels of rows whose best score has a rival within rounding.

    A float32 dot product of ``dim`` terms is off by at most ``dim * u * |x| |c|`` (u = 2**-24)
    whatever the summation order, so two BLAS runs may disagree on a row only when another
    centroid scores within twice that of the best. Those rows are re-scored exactly enough in
    float64 (products of float32 values are exact; numpy's summation order is fixed by the
    shape alone), and exact ties go to the lowest centroid index. ``x_sqnorms`` are the
    squared norms of the rows of ``xb``.
    """
    dim = xb.shape[1]
    xnorm = np.sqrt(x_sqnorms, dtype=np.float64)
    scale = xnorm * cmax if spherical else 2 * xnorm * cmax + cmax * cmax
    # x4 the bound for two runs, plus the rounding of ||c||^2 and of the final sums.
    tol = (4 * (dim + 2) * 2.0**-24 * scale).astype(np.float32)
    idx = np.arange(len(labels))
    best = scores[idx, labels]
    # The runner-up score, by masking the winner: one pass, no temporary matrix. numpy's
    # argmin/argmax along rows is faster than its min/max reduction along them.
    scores[idx, labels] = -np.inf if spherical else np.inf
    second = scores[idx, np.argmax(scores, axis=1) if spherical else np.argmin(scores, axis=1)]
    scores[idx, labels] = best
    gap = best - second if spherical else second - best
    # A zero row scores every centroid exactly 0 under ip/cosine: the argmax (index 0) is
    # already exact, and re-scoring it against every centroid would only cost time.
    rows = np.flatnonzero((gap <= tol) & (xnorm > 0))
    for r in rows.tolist():
        if spherical:
            cand = np.flatnonzero(scores[r] >= best[r] - tol[r])
        else:
            cand = np.flatnonzero(scores[r] <= best[r] + tol[r])
        x64 = xb[r].astype(np.float64)
        c64 = centroids[cand].astype(np.float64)
        if spherical:
            pick = int(np.argmax((c64 * x64).sum(axis=1)))
        else:
            pick = int(np.argmin(((c64 - x64) ** 2).sum(axis=1)))
        labels[r] = cand[pick]


def label_order(labels: NDArray[np.integer[Any]], k: int) -> NDArray[np.intp]:
    """Stable argsort of labels in ``[0, k)``: the rows of each label together, in row order.

    Labels that fit 16 bits are sorted as such, which numpy does with a radix sort: 3.7 ms
    instead of 17.5 ms for 262k labels (the comparison sort of int64). Stability makes the
    result the same either way.
    """
    if k <= 1 << 16:
        return np.argsort(labels.astype(np.uint16), kind="stable")
    return np.argsort(labels, kind="stable")


def group_by_label(
    labels: NDArray[np.integer[Any]],
    k: int,
    *arrays: NDArray[Any],
    out: Sequence[NDArray[Any]] | None = None,
) -> tuple[list[tuple[int, int, int]], list[NDArray[Any]]]:
    """Rows of ``arrays`` grouped by their label in ``[0, k)``, as index builds write them.

    Returns the ``(label, start, stop)`` run of every label present, in label order, and each
    array's rows gathered in that order (stable: input order within a label). The gather
    uses ``np.take``, which measured faster than fancy indexing for batches of rows. With
    ``out`` (one array per input, of its dtype, with at least ``len(labels)`` rows), the
    rows are gathered into the leading rows of those instead of new arrays.
    """
    order = label_order(labels, k)
    if out is None:
        gathered = [np.take(a, order, axis=0) for a in arrays]
    else:
        # mode="clip" (the indices come from argsort, so never clip) writes straight into
        # the output; the default mode="raise" buffers it through a temporary of its size.
        gathered = [
            np.take(a, order, axis=0, out=o[: len(order)], mode="clip")
            for a, o in zip(arrays, out, strict=True)
        ]
    if not len(order):
        return [], gathered
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.diff(sorted_labels)) + 1
    bounds = [0, *starts.tolist(), len(order)]
    runs = zip(sorted_labels[bounds[:-1]].tolist(), bounds[:-1], bounds[1:], strict=True)
    return list(runs), gathered


class _ClusterSums:
    """The float64 sum and the size of every cluster of ``sample`` under the latest labels.

    A full summation (:func:`_cluster_sums`) gathers the whole sample in cluster order. Once
    at most a quarter of the rows change cluster in an iteration, as happens after the first
    few Lloyd iterations, only those rows are moved: their sums are subtracted from their
    old clusters and added to their new ones, the two sides on two threads. Where more rows
    move, moving them cost more than summing afresh. Every step depends on the labels alone,
    not on the threads; the float64 sums drift from a fresh summation only in their last
    bits, far below the resolution of float32 centroids.
    """

    def __init__(
        self,
        sample: NDArray[np.float32],
        labels: NDArray[np.int64],
        k: int,
        threads: int | None,
    ) -> None:
        self._sample, self._labels, self._threads = sample, labels.copy(), threads
        # Scratch for full summations, kept: a fresh sample-sized array per summation costs
        # about as much in page faults as the gather into it.
        self._grouped = np.empty_like(sample)
        self.sums, self.counts = _cluster_sums(sample, labels, k, self._grouped, threads)

    def relabel(self, labels: NDArray[np.int64]) -> None:
        """Bring the sums and sizes to ``labels`` from the previous call's labels."""
        k = len(self.counts)
        moved = np.flatnonzero(labels != self._labels)
        if len(moved) > len(labels) // 4:
            self.sums, self.counts = _cluster_sums(
                self._sample, labels, k, self._grouped, self._threads
            )
        else:

            def sums_of_moved(
                clusters: NDArray[np.int64],
            ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
                runs, (rows,) = group_by_label(clusters, k, moved)
                grouped = np.take(self._sample, rows, axis=0)
                out = np.empty((len(runs), self.sums.shape[1]), np.float64)
                for i, (_, a, b) in enumerate(runs):
                    out[i] = grouped[a:b].sum(axis=0, dtype=np.float64)
                return np.array([c for c, _, _ in runs], np.int64), out

            if assign_workers(self._threads, 2) >= 2:
                with ThreadPoolExecutor(1, "diskivf-update") as pool:
                    leaving = pool.submit(sums_of_moved, self._labels[moved])
                    arrived = sums_of_moved(labels[moved])
                    left = leaving.result()
            else:
                left = sums_of_moved(self._labels[moved])
                arrived = sums_of_moved(labels[moved])
            self.sums[left[0]] -= left[1]  # clusters appear once per side: no repeated index
            self.sums[arrived[0]] += arrived[1]
            self.counts = np.bincount(labels, minlength=k).astype(np.int64, copy=False)
        self._labels[...] = labels

    def means(self, centroids: NDArray[np.float32]) -> NDArray[np.float32]:
        """The mean of every cluster; an empty one keeps its entry of ``centroids``."""
        updated = centroids.copy()
        full = self.counts > 0
        updated[full] = self.sums[full] / self.counts[full, None]
        return updated


def _cluster_sums(
    sample: NDArray[np.float32],
    labels: NDArray[np.int64],
    k: int,
    grouped: NDArray[np.float32],
    threads: int | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Return the float64 sum of the rows of each of the ``k`` clusters, and their sizes.

    ``grouped``, shaped like ``sample``, receives the rows sorted by cluster. ``threads`` as
    for :func:`assign_workers`: each worker gathers and sums a contiguous range of clusters,
    and every cluster's sum is one numpy call whatever the split, so the bits do not depend
    on it.
    """
    counts = np.bincount(labels, minlength=k).astype(np.int64, copy=False)
    # Sorting by label makes every cluster a contiguous run of rows. A stable sort fixes the
    # summation order, and hence the bits of the result.
    order = label_order(labels, k)
    ends = np.cumsum(counts)
    starts = ends - counts
    sums = np.zeros((k, sample.shape[1]), np.float64)
    nonempty = np.flatnonzero(counts)

    def gather_and_sum(clusters: NDArray[np.intp]) -> None:
        if clusters.size == 0:
            return
        rows = slice(int(starts[clusters[0]]), int(ends[clusters[-1]]))
        # mode="clip" (the indices come from argsort, so never clip) writes straight into
        # ``out``; the default mode="raise" buffers it through a temporary the size of out.
        np.take(sample, order[rows], axis=0, out=grouped[rows], mode="clip")
        # A loop over clusters (not vectors) measured 8-10x faster than np.add.reduceat
        # (axis=0), which walks (n, dim) rows column by column, and ~100x faster than
        # np.add.at. Float64 accumulation keeps means of clusters with millions of points
        # accurate.
        for c in clusters.tolist():
            sums[c] = grouped[starts[c] : ends[c]].sum(axis=0, dtype=np.float64)

    workers = assign_workers(threads, len(nonempty))
    if workers <= 1:
        gather_and_sum(nonempty)
        return sums, counts
    # Contiguous cluster ranges holding about the same number of rows each.
    cuts = np.searchsorted(ends[nonempty], np.arange(1, workers) * (len(labels) / workers))
    with ThreadPoolExecutor(workers, "diskivf-update") as pool:
        for f in [pool.submit(gather_and_sum, c) for c in np.split(nonempty, cuts)]:
            f.result()
    return sums, counts


def _split_empty_clusters(
    centroids: NDArray[np.float32], counts: NDArray[np.int64], rng: np.random.Generator
) -> int:
    """Re-seed every empty cluster from a large one in place and return how many were re-seeded.

    Like FAISS ``split_clusters``: the donor is drawn with probability proportional to
    ``size - 1`` (a singleton cannot be split), the empty centroid becomes ``c * (1 + eps)`` and
    the donor ``c * (1 - eps)`` with the sign of ``eps`` alternating per dimension, and the
    donor's points are assumed to divide evenly for the next draw.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return 0
    sizes = counts.copy()
    dim = centroids.shape[1]
    signs = np.where(np.arange(dim) % 2 == 0, _SPLIT_EPS, -_SPLIT_EPS)
    grow = (1 + signs).astype(np.float32)
    shrink = (1 - signs).astype(np.float32)
    for ci in empty:
        # n >= k guarantees some cluster has >= 2 points while any cluster is empty, so the total
        # weight is positive.
        cumulative = np.cumsum(np.maximum(sizes - 1, 0))
        draw = rng.integers(int(cumulative[-1]))
        cj = int(np.searchsorted(cumulative, draw, side="right"))
        donor = centroids[cj].copy()
        centroids[ci] = donor * grow
        centroids[cj] = donor * shrink
        sizes[ci] = sizes[cj] // 2
        sizes[cj] -= sizes[ci]
    return int(empty.size)


def _converged(previous: float, current: float, tol: float) -> bool:
    """Return whether the relative improvement from ``previous`` to ``current`` is below tol."""
    if previous <= 0:
        # Every point already sits on its centroid; no further iteration can improve anything.
        return True
    return (previous - current) / previous < tol
