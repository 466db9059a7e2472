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
        x = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)).astype(
            np.float32, copy=False
        )
        q = (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-30)).astype(
            np.float32, copy=False
        )
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


def _remove_created(path: str, existed: bool) -> None:
    """Undo what a failed demo wrote at ``path``: the directory, or only its contents."""
    p = Path(path)
    if not existed:
        shutil.rmtree(p, ignore_errors=True)
        return
    for child in p.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def run_demo(
    n: int = 200_000,
    dim: int = 64,
    nlist: int = 512,
    nq: int = 1000,
    nprobe: int = 16,
    path: str | None = None,
) -> DemoReport:
    """Build, reopen and search an index of ``n`` generated vectors; measure recall and QPS.

    Parameters
    ----------
    n, dim
        Vectors to generate and their dimension.
    nlist
        Lists of the index; at most ``n``.
    nq
        Queries to generate and search.
    nprobe
        Lists probed per query, capped at ``nlist`` (as :meth:`diskivf.Index.search` does:
        probing more lists than there are probes them all).
    path
        Where to keep the index: a path that does not exist yet, or an empty directory. Default:
        a temporary directory, removed at the end.

    Returns
    -------
    DemoReport
        The figures to print; ``nprobe`` is the one used (after capping).

    Raises
    ------
    ValueError
        A count is not a positive integer, or ``nlist > n``. Nothing is created.
    diskivf.errors.IndexExistsError
        ``path`` is an existing file or a non-empty directory. It is left untouched.
    OSError
        Writing the index failed; what the demo created at ``path`` is removed again.
    """
    for name, value in (("n", n), ("dim", dim), ("nlist", nlist), ("nq", nq), ("nprobe", nprobe)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} to be a positive integer but got {value!r}")
    if nlist > n:
        raise ValueError(f"expected nlist <= n (a point per list) but got nlist={nlist}, n={n}")
    nprobe = min(nprobe, nlist)
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="diskivf-demo-")
        path = str(Path(tmp) / "demo.index")
    existed = Path(path).is_dir()
    try:
        # Mode "w-" before any data is generated: an existing file or non-empty directory is
        # refused at once and never overwritten.
        index = open_index(path, mode="w-", dim=dim, nlist=nlist, metric="l2", nprobe=nprobe)
        try:
            with index as ix:
                x, q = clustered(n, dim, nq=nq, seed=1)
                t0 = time.perf_counter()
                ix.train(x)
                t1 = time.perf_counter()
                ix.add(x)
                t2 = time.perf_counter()
        except BaseException:
            # A half-built index would make the next `demo --out PATH` refuse PATH.
            if tmp is None:
                _remove_created(path, existed)
            raise
        with open_index(path) as ix:
            ix.search(q[:10], k=10)  # map the lists once, as a long-running service would
            # and load what a process's first single query loads (numba's compiled scan,
            # when installed: 0.4-0.6 s, which would dwarf the 200 timed below).
            ix.search(q[0], k=10)
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
