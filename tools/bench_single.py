"""Single-query search on one thread against the same query split over two (``threads=2``).

Usage::

    python tools/bench_single.py INDEX_DIR [--queries Q.npy] [--nq 200] [--nprobe 4,8,16,32]
                                 [--rounds 5]

For each nprobe it times ``index.search(q, 10, nprobe=p, threads=t)`` one query at a time,
for t = 1 and 2 in alternating order, and prints the median QPS over ``--rounds`` passes, their
ratio and the vector data scanned per query (MB/q). Both must return the same neighbours; the script
stops if they do not. ``diskivf.search._SPLIT_MIN_BYTES`` (the least list data worth a split)
is chosen from this table: below it the hand-off to a worker thread and back costs more than
the second core gains. The round trip of an empty task through a thread pool is printed
first, since it is the fixed price of a split on this machine.

Queries default to ``--nq`` stored vectors of random lists (page cache warm: every list is
read once before timing).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

import diskivf
from diskivf.format import read_commit


def handoff_us(rounds: int = 300) -> float:
    """Median round trip of an empty task through a two-thread pool, in microseconds."""
    with ThreadPoolExecutor(2) as pool:
        pool.submit(int).result()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            pool.submit(int).result()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def stored_queries(index: diskivf.Index, root: Path, nq: int) -> NDArray[np.float32]:
    """``nq`` stored vectors from random non-empty lists, as float32."""
    meta = index.metadata
    rec = read_commit(root, meta.nlist, meta.index_uuid)
    rng = np.random.default_rng(0)
    lists = rng.choice(np.flatnonzero(rec.list_counts), size=nq)
    rows = [index._fetch(int(lid)) for lid in lists]
    return np.stack([v.vectors[rng.integers(len(v.ids))] for v in rows if v is not None]).astype(
        np.float32
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--queries", help=".npy of queries (default: stored vectors)")
    ap.add_argument("--nq", type=int, default=200)
    ap.add_argument("--nprobe", default="4,8,16,32")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    root = Path(args.index)
    nprobes = [int(p) for p in args.nprobe.split(",")]
    print(f"thread pool round trip: {handoff_us():.0f} us (median)")
    with diskivf.open(root) as index:
        if args.queries:
            q = np.load(args.queries)[: args.nq].astype(np.float32)
        else:
            q = stored_queries(index, root, args.nq)
        index.search(q, 10, nprobe=max(nprobes))  # page cache warm, lists mapped
        print(" nprobe   MB/q   1 thread QPS   2 threads QPS   ratio")
        for p in nprobes:
            ref, st = index.search(q, 10, nprobe=p, stats=True)
            qps: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.rounds):
                for t in (1, 2) if r % 2 == 0 else (2, 1):  # neither always runs second
                    t0 = time.perf_counter()
                    out = [index.search(q[i], 10, nprobe=p, threads=t).ids for i in range(len(q))]
                    qps[t].append(len(q) / (time.perf_counter() - t0))
                    if not np.array_equal(np.concatenate(out), ref.ids):
                        raise SystemExit(f"nprobe {p}, {t} threads: neighbours differ from a batch")
            one, two = statistics.median(qps[1]), statistics.median(qps[2])
            mb = st.vectors_scanned / len(q) * index.dim * index.dtype.itemsize / 1e6
            print(f"{p:7d} {mb:6.2f} {one:14.0f} {two:15.0f} {two / one:7.2f}")


if __name__ == "__main__":
    main()
