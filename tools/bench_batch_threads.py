"""When does a batch gain from a second thread? Forced 1 and 2 threads against the estimate.

Usage::

    python tools/bench_batch_threads.py INDEX_DIR QUERIES.npy [--nq 1000] [--nprobe 1,4,16,64]
                                        [--rounds 5] [--threads 2]

A batch search spreads its probed lists over threads only when the estimated GIL-free work
per list visit (``Index._visit_us``: streaming the list and its matrix product) reaches
``_THREAD_MIN_VISIT_US``; below it, the GIL-held Python and small numpy calls of each visit
dominate and the threads mostly wait for each other. For each nprobe this script times the
whole batch (the first ``--nq`` queries in one call) on one thread and on ``--threads``
threads with the threads forced on, in alternating order, and prints the median QPS over
``--rounds``, their ratio, the estimate, and the way a search with ``threads=--threads``
chooses on its own (as ``threads=None`` does for batches of 64 queries or more).
A ratio beside "threads" in the "default" column below 1 is a batch the threshold lets down;
one above 1 next to "one" is a gain it leaves. The share of CPU time the hypervisor gave to
other guests during each row is printed too: a shared machine's slow spells show there.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench import cpu_ticks, steal_cell, steal_since  # tools/, this script's directory

import diskivf
from diskivf import index as index_module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("index", type=Path)
    ap.add_argument("queries", type=Path, help="(nq, dim) .npy")
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--nprobe", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    queries = np.load(args.queries, mmap_mode="r")[: args.nq]
    cls: Any = index_module.Index
    chosen = cls._worth_threads
    seen: list[tuple[float, bool]] = []

    def spied(self: Any, pairs: int, lists: Any) -> bool:
        seen.append((self._visit_us(pairs, lists), chosen(self, pairs, lists)))
        return force if force is not None else seen[-1][1]

    force: bool | None = None
    cls._worth_threads = spied
    print(f"{len(queries)} queries, threshold {index_module._THREAD_MIN_VISIT_US:g} us")
    print(" nprobe  visit us  1 thread QPS  threads QPS  ratio  default  steal")
    with diskivf.open(args.index) as index:
        index.search(queries, 10, nprobe=1)  # index opened and mapped before any timing
        for p in (int(v) for v in args.nprobe.split(",")):
            index.search(queries, 10, nprobe=p, threads=args.threads)
            qps: dict[int, list[float]] = {1: [], args.threads: []}
            ticks = cpu_ticks()
            for r in range(args.rounds):
                for t in (1, args.threads) if r % 2 == 0 else (args.threads, 1):
                    force = t > 1
                    t0 = time.perf_counter()
                    index.search(queries, 10, nprobe=p, threads=t)
                    qps[t].append(len(queries) / (time.perf_counter() - t0))
            force = None
            seen.clear()
            index.search(queries, 10, nprobe=p, threads=args.threads)
            visit = statistics.median(v for v, _ in seen)
            default = "threads" if any(c for _, c in seen) else "one"
            one, many = statistics.median(qps[1]), statistics.median(qps[args.threads])
            print(
                f"{p:7d}  {visit:8.0f}  {one:12.0f}  {many:11.0f}  {many / one:5.2f}  "
                f"{default:>7}  {steal_cell(steal_since(ticks))}"
            )
    cls._worth_threads = chosen


if __name__ == "__main__":
    main()
