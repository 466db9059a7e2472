"""Cold-cache single-query throughput of an existing index, per prefetch mode.

Usage: python tools/bench_cold.py INDEX QUERIES.npy [--nprobe 16] [--queries 100] [--rounds 2]
       [--modes off,new,all,inline,gemv] [--threads 1]

Before each pass every index file is evicted from the page cache (fsync, then
POSIX_FADV_DONTNEED), the index is reopened, and QUERIES are searched one at a time. Modes:
``off`` disables prefetching, ``new`` is the default (advise lists not mapped yet), ``all``
sets ``index.prefetch = True`` (advise every probed list on every search), ``inline`` is
``new`` with the advice given on the search's own thread rather than on the index's
background thread, ``gemv`` is ``new`` with every list scored with GEMV, as an index that
fits the CPU's cache is (``diskivf.search.streams_rows``). ``--threads 1,2`` times each mode with each ``threads=`` value, the
passes alternating within a round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import diskivf
from diskivf import index as index_module
from diskivf import search as scan
from diskivf._threads import Workers


def evict(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _inline(self: Workers, fn: Callable[[Any], object], arg: Any) -> None:
    """``Workers.background`` as it was before it had a thread: the call, on the caller's."""
    fn(arg)


def _never(vector_bytes: int, dim: int, dtype: np.dtype[np.generic], cache_bytes: int) -> bool:
    """``streams_rows`` for mode ``gemv``: every index is scored as one that fits the cache."""
    return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("queries", type=Path)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries-count", "--n", dest="n", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--modes",
        default="off,new,all,inline",
        help="comma-separated: off, new, all, inline, gemv",
    )
    ap.add_argument("--threads", default="1", help="comma-separated threads= values")
    args = ap.parse_args()
    q = np.load(args.queries).astype(np.float32)[: args.n]
    willneed = index_module.Index._willneed
    background = Workers.background
    modes = args.modes.split(",")
    known = ["off", "new", "all", "inline", "gemv"]
    unknown = set(modes) - set(known)
    if unknown:
        ap.error(f"expected --modes from {', '.join(known)} but got {sorted(unknown)}")
    streams_rows = scan.streams_rows
    threads = [int(t) for t in args.threads.split(",")]
    results: dict[tuple[str, int], list[float]] = {(m, t): [] for m in modes for t in threads}
    with diskivf.open(args.index) as ix:
        # A process's first single query loads what single queries need once (numba's
        # compiled scan, when installed): not in the first mode's first timed pass.
        ix.search(q[0], k=10, nprobe=args.nprobe)
    for _ in range(args.rounds):
        for (mode, nthreads), runs_of_mode in results.items():
            index_module.Index._willneed = (  # type: ignore[method-assign]
                # off: advise nothing; [] as the real one returns when no list is newly mapped
                (lambda self, list_ids: []) if mode == "off" else willneed
            )
            Workers.background = _inline if mode == "inline" else background  # type: ignore[method-assign]
            scan.streams_rows = _never if mode == "gemv" else streams_rows
            evict(args.index)
            with diskivf.open(args.index) as ix:
                ix.prefetch = mode == "all"
                t = time.perf_counter()
                for row in q:
                    ix.search(row, k=10, nprobe=args.nprobe, threads=nthreads)
                runs_of_mode.append(len(q) / (time.perf_counter() - t))
    index_module.Index._willneed = willneed  # type: ignore[method-assign]
    Workers.background = background  # type: ignore[method-assign]
    scan.streams_rows = streams_rows
    for (mode, nthreads), qps in results.items():
        runs = ", ".join(f"{v:.0f}" for v in qps)
        print(
            f"prefetch {mode:3s} threads {nthreads}: median {statistics.median(qps):7.0f}"
            f" cold QPS ({runs})"
        )


if __name__ == "__main__":
    main()
