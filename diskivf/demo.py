"""The ``diskivf demo`` job: build an index from generated data, search it, report quality.

It exercises the whole path a user takes (create, train, add, reopen read-only, search) on
clustered synthetic data and compares the results with exact brute force.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from diskivf.index import open_index

__all__ = ["DemoReport", "clustered", "exact_knn", "recall_at_k", "run_demo"]


def clustered(
    n: int,
    dim: int,
    *,
    nq: int = 0,
    nclusters: int = 1000,
    seed: int = 0,
    separation: float = 1.0,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Database and query points around shared Gaussian centres (after FAISS SyntheticDataset).

    Unit-variance noise around ``nclusters`` centres drawn with scale ``separation``; queries are
    fresh draws around the same centres. Overlapping clusters (``separation`` ~1) make recall
    depend on ``nprobe`` as on real embeddings; well separated ones (>= 4) make every method look
    perfect. Deterministic for a seed; generated in blocks.

    Returns
    -------
    x, q
        ``(n, dim)`` and ``(nq, dim)`` float32.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((nclusters, dim), dtype=np.float32) * np.float32(separation)

    def draw(m: int) -> NDArray[np.float32]:
        out = np.empty((m, dim), np.float32)
        for a in range(0, m, 1 << 16):
            b = min(m, a + (1 << 16))
            lab = rng.integers(0, nclusters, b - a)
            out[a:b] = centres[lab] + rng.standard_normal((b - a, dim), dtype=np.float32)
        return out

    return draw(n), draw(nq)


def exact_knn(
    x: NDArray[np.float32], q: NDArray[np.float32], k: int, metric: str = "l2"
) -> NDArray[np.int64]:
    """Exact top-``k`` ids by brute force (blocks of queries, one GEMM each)."""
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)
    xn = np.einsum("ij,ij->i", x, x) if metric == "l2" else None
    out = np.empty((len(q), k), np.int64)
    block = max(1, (1 << 24) // max(1, len(x)))  # ~64 MB of scores per block
    for a in range(0, len(q), block):
        s = -(q[a : a + block] @ x.T)
        if xn is not None:
            s = 2 * s + xn
        part = np.argpartition(s, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        out[a : a + block] = np.take_along_axis(part, order, axis=1)
    return out


def recall_at_k(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    """Mean fraction of the true top-k ids found (order ignored)."""
    k = truth.shape[1]
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return float(hits / (k * len(truth)))


@dataclass(frozen=True)
class DemoReport:
    """Figures printed by the demo."""

    n: int
    dim: int
    nlist: int
    nprobe: int
    recall_at_10: float
    qps_batch: float
    qps_single: float
    train_s: float
    add_s: float
    index_bytes: int


def run_demo(
    n: int = 200_000,
    dim: int = 64,
    nlist: int = 512,
    nq: int = 1000,
    nprobe: int = 16,
    path: str | None = None,
) -> DemoReport:
    """Build, reopen and search an index of ``n`` generated vectors; measure recall and QPS."""
    x, q = clustered(n, dim, nq=nq, seed=1)
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="diskivf-demo-")
        path = str(Path(tmp) / "demo.index")
    try:
        with open_index(path, mode="w", dim=dim, nlist=nlist, metric="l2", nprobe=nprobe) as ix:
            t0 = time.perf_counter()
            ix.train(x)
            t1 = time.perf_counter()
            ix.add(x)
            t2 = time.perf_counter()
        with open_index(path) as ix:
            ix.search(q[:10], k=10)  # map the lists once, as a long-running service would
            t3 = time.perf_counter()
            _, ids = ix.search(q, k=10)
            t4 = time.perf_counter()
            for row in q[:200]:
                ix.search(row, k=10)
            t5 = time.perf_counter()
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        truth = exact_knn(x, q, 10)
        return DemoReport(
            n,
            dim,
            nlist,
            nprobe,
            recall_at_k(ids, truth),
            nq / (t4 - t3),
            200 / (t5 - t4),
            t1 - t0,
            t2 - t1,
            size,
        )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
