"""Scoring a few queries against one list: one matrix product or one matrix-vector per query.

Usage: python tools/bench_kernels.py INDEX_DIR [--lists 300] [--rounds 5]

A batch search scores each probed list against the queries that probe it. At small nprobe
most lists have only a handful of queries, where OpenBLAS's GEMM (which packs the whole list
first) can lose to one GEMV per query (the first GEMV brings the list into cache for the
next). For m = 1..16 queries this prints the list bytes scored per second, median over
``--rounds`` passes, each over ``--lists`` random lists of the index (page cache warm, CPU
caches cold), with BLAS held to one thread as search does. ``diskivf.search._GEMV_MAX_ROWS``
is chosen from this table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

import diskivf
from diskivf._blas import blas_threads
from diskivf.format import list_file_names, read_commit

F32 = NDArray[np.float32]


def gemm(x: F32, q: F32) -> F32:
    out: F32 = np.matmul(q, x.T)
    return out


def gemv_per_query(x: F32, q: F32) -> F32:
    out = np.empty((len(q), len(x)), np.float32)
    for i in range(len(q)):
        np.dot(x, q[i], out=out[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--lists", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.index)
    with diskivf.open(root) as ix:
        dim, dtype, meta = ix.dim, ix.dtype, ix.metadata
    if dtype != np.float32:
        raise SystemExit("this comparison is for float32 indexes")
    rec = read_commit(root, meta.nlist, meta.index_uuid)
    lists = [
        np.fromfile(root / list_file_names(i, int(rec.list_gens[i]))[0], np.float32)[
            : int(rec.list_counts[i]) * dim
        ].reshape(-1, dim)
        for i in np.flatnonzero(rec.list_counts).tolist()
    ]
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((16, dim)).astype(np.float32)
    kernels: dict[str, Callable[[F32, F32], F32]] = {
        "GEMM": gemm,
        "GEMV per query": gemv_per_query,
    }
    print(f"{len(lists)} lists of {root}, {dim}-d float32; GB/s of list data scored")
    print(f"{'queries':>8}" + "".join(f"{name:>16}" for name in kernels))
    with blas_threads(1):
        for m in (1, 2, 3, 4, 6, 8, 16):
            rates = {}
            for name, fn in kernels.items():
                runs = []
                for _ in range(args.rounds):
                    picked = rng.permutation(len(lists))[: args.lists]
                    nbytes = sum(lists[i].nbytes for i in picked)
                    t0 = time.perf_counter()
                    for i in picked:
                        fn(lists[i], queries[:m])
                    runs.append(nbytes / (time.perf_counter() - t0) / 1e9)
                rates[name] = statistics.median(runs)
            print(f"{m:>8}" + "".join(f"{rates[name]:>16.1f}" for name in kernels))


if __name__ == "__main__":
    main()
