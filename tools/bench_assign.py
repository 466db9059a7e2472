"""Where one assignment block's time goes: the GEMM and the passes over its scores.

Usage: python tools/bench_assign.py [--k 1024] [--dim 128] [--blocks 64] [--rounds 5] [--rows R]

Training and ``Index.add`` assign rows to centroids in blocks of ``2**20 // k`` rows (one
``rows x k`` float32 score block each, as ``diskivf.kmeans.BlockAssignment`` does), with BLAS
held to one thread per worker. For random data of the given shape this times, per block
(median over ``--blocks`` blocks, then over ``--rounds``), the GEMM against the centroids as
a transposed view and as a contiguous ``(dim, k)`` array, the pass adding the centroid norms
to the scores, and the GEMM that folds them in instead (rows with a column of ones against
``(dim + 1, k)``: what BlockAssignment does for l2); then the argmin, the near-tie check of
``refine=True`` (what index builds add), and a whole assignment as BlockAssignment runs it,
per block.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from diskivf import _blas, kmeans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=0, help="rows per block (default 2**20 // k)")
    args = ap.parse_args()
    k, dim = args.k, args.dim
    rows = args.rows or max(1, (1 << 20) // k)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows * args.blocks, dim), dtype=np.float32)
    c = rng.standard_normal((k, dim), dtype=np.float32)
    csq = np.einsum("ij,ij->i", c, c)
    view = (-2 * c).T
    contiguous = np.ascontiguousarray(view)
    folded = np.concatenate([contiguous, csq[None, :]])  # (dim + 1, k): -2c over ||c||^2
    x1 = np.concatenate([x, np.ones((len(x), 1), np.float32)], axis=1)
    xsq = np.einsum("ij,ij->i", x, x)
    scores = np.empty((rows, k), np.float32)
    labels = np.zeros(rows, np.int64)
    cmax = float(np.sqrt(csq.max()))

    def block(i: int) -> np.ndarray:
        return x[i * rows : (i + 1) * rows]

    cases: list[tuple[str, Callable[[int], object]]] = [
        ("GEMM, transposed view", lambda i: np.matmul(block(i), view, out=scores)),
        ("GEMM, contiguous", lambda i: np.matmul(block(i), contiguous, out=scores)),
        ("scores += norms", lambda i: np.add(scores, csq, out=scores)),
        (
            "GEMM, norms folded in",
            lambda i: np.matmul(x1[i * rows : (i + 1) * rows], folded, out=scores),
        ),
        ("argmin", lambda i: np.argmin(scores, axis=1)),
        (
            "near-tie check",
            lambda i: kmeans._refine_ties(
                block(i), xsq[i * rows : (i + 1) * rows], c, scores, labels, False, cmax
            ),
        ),
    ]
    print(f"{rows} x {dim} rows against {k} centroids per block, BLAS on one thread")
    np.matmul(block(0), contiguous, out=scores)
    labels[:] = np.argmin(scores, axis=1)
    results: dict[str, list[float]] = {name: [] for name, _ in cases}
    with _blas.blas_threads(1):
        for _ in range(args.rounds):
            for name, fn in cases:
                times = []
                for i in range(args.blocks):
                    t = time.perf_counter()
                    fn(i)
                    times.append(time.perf_counter() - t)
                results[name].append(statistics.median(times))
            # The whole assignment as index builds run it, per block (its buffers made once).
            job = kmeans.BlockAssignment(x, c, csq, False, rows, refine=True)
            t = time.perf_counter()
            job.work()
            results.setdefault("whole, per block", []).append(
                (time.perf_counter() - t) / args.blocks
            )
    gemm_flop = 2.0 * rows * k * dim
    for name, times in results.items():
        ms = statistics.median(times) * 1e3
        rate = f"  {gemm_flop / ms / 1e6:6.1f} GFLOP/s" if name.startswith("GEMM") else ""
        print(f"{name:24s} {ms:7.3f} ms{rate}")


if __name__ == "__main__":
    main()
