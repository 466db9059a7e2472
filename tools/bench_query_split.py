"""Where a single query's time goes: the whole search against its scan alone.

Usage::

    python tools/bench_query_split.py INDEX_DIR [--queries Q.npy] [--nq 300] [--nprobe 1,4,16]
                                      [--rounds 5] [--sweep-mb MB] [--layouts N]

For each nprobe it times ``index.search(q, 10, nprobe=p, threads=1)`` one query at a time and,
on the same queries, the scan alone: search's own per-list step
(``diskivf.search._score_list``, the row kernel search picks for this index plus l2's stored
norms) over the same probed lists' maps into one buffer, as a one-thread search runs it. It
prints the median microseconds per query of each, the scan's share of the whole (with its
range over rounds), the bytes of vectors a query scans (MB/q, in 10^6 bytes; bench.py's
column of that name counts MiB) and the rate the scan streams them at. The rest of a query
is its work outside the scan: checking the query, scoring the centroids, fetching the lists,
selecting the candidates and building the result. With numba installed, search scores and
selects in one compiled loop instead (``diskivf._jit``); ``DISKIVF_JIT=0`` in the
environment times numpy's path, which this split describes.

The two are timed on queries half the set apart, in alternating order, so that neither finds
the lists it reads left in the CPU's cache by the other; the page cache is warm (every query
is searched once first). Before timing, the tool checks that the scan's costs give every
query the search's distances (within float32 rounding), so both read the same lists.
``--sweep-mb MB`` reads that many MB of another array before each timed call, as another
engine's scan in the same process would (see ``tools/bench_versions.py``).

With ``--layouts N`` a second table times the row kernel alone (no norms) over the first N
queries' lists as they lie in four layouts, interleaved query by query: the index's maps (as
search reads them); an anonymous copy of each list, placed wherever it was allocated; a
query's lists copied end to end into one array, still one call per list; and that array in
one call. It shows what the kernel loses to a query's data being many short arrays, each a
stream of its own, rather than one (the copies take N x MB/q of memory).

Queries default to ``--nq`` stored vectors of random lists.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import cast

import numpy as np
from bench_single import load_queries, query_args  # tools/, this script's directory
from numpy.typing import NDArray

import diskivf
from diskivf import search as scan
from diskivf.index import finish_distances, prepare_queries

F32 = NDArray[np.float32]
K = 10


class Scan:
    """One query's probed lists, held as search fetches them, and its scan."""

    def __init__(self, index: diskivf.Index, query: F32, nprobe: int) -> None:
        self.q = prepare_queries(query, index.dim, index.metric)  # (1, dim), as search has it
        csq = index._csq_or_none
        probes = scan.coarse_probes(self.q, index.centroids, csq, nprobe)[0]
        self.views, sizes = index._fetch_many(probes.tolist())
        self.starts = np.cumsum([0, *sizes]).tolist()
        self.qv = self.q[0] * np.float32(-2.0 if csq is not None else -1.0)
        self.buf = np.empty(self.starts[-1], np.float32)
        self.kernel = scan._row_kernel(index._streamed())
        self.nbytes = sum(v.vectors.nbytes for v in self.views)

    def run(self) -> None:
        """The scan as a one-thread search runs it: every probed list into one buffer."""
        buf, starts, qv, kernel = self.buf, self.starts, self.qv, self.kernel
        for i, v in enumerate(self.views):  # lists, not vectors
            scan._score_list(v, qv, buf[starts[i] : starts[i + 1]], kernel)

    def distances(self, metric: str) -> F32:
        """The ``K`` nearest distances the scan's costs give, as search reports them."""
        self.run()
        cost = np.full((1, K), np.inf, np.float32)  # padded as search pads a short result
        top = np.sort(self.buf)[:K]
        cost[0, : len(top)] = top
        ids = np.zeros(cost.shape, np.int64)
        finish_distances(metric, self.q, cost, ids)
        out: F32 = cost[0]
        return out


def check(index: diskivf.Index, scans: list[Scan], nprobe: int) -> None:
    """Stop unless each scan's costs give its query the search's distances."""
    for n, s in enumerate(scans):
        got = s.distances(index.metric)
        want = index.search(s.q, K, nprobe=nprobe, threads=1).distances[0]
        if not np.allclose(got, want, rtol=1e-5, atol=1e-5):
            sys.exit(f"nprobe {nprobe}, query {n}: the scan gives {got}, the search {want}")


def timed(fn: Callable[[], object], sweep: F32) -> float:
    if sweep.size:
        sweep.sum()  # another array's scan: the CPU caches hold none of fn's code and data
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def split_row(
    index: diskivf.Index, queries: F32, nprobe: int, rounds: int, sweep: F32
) -> tuple[float, float, list[float], float]:
    """Median us per query of the search and of its scan, the scan's share per round, and
    the mean bytes of vectors scanned per query."""
    scans = [Scan(index, q, nprobe) for q in queries]
    check(index, scans, nprobe)
    n, half = len(queries), len(queries) // 2
    whole: list[float] = []
    alone: list[float] = []
    for r in range(rounds):
        t_search = t_scan = 0.0
        for i in range(n):
            search = partial(index.search, queries[i], K, nprobe=nprobe, threads=1)
            first = (i + r) % 2 == 0
            if first:
                t_search += timed(search, sweep)
            t_scan += timed(scans[(i + half) % n].run, sweep)
            if not first:
                t_search += timed(search, sweep)
        whole.append(t_search / n * 1e6)
        alone.append(t_scan / n * 1e6)
    shares = [s / w for s, w in zip(alone, whole, strict=True)]
    mean_bytes = float(np.mean([s.nbytes for s in scans]))
    return statistics.median(whole), statistics.median(alone), shares, mean_bytes


LAYOUTS = ("maps", "anonymous per list", "adjacent, per list", "adjacent, one call")


def layout_times(scans: list[Scan], rounds: int, sweep: F32) -> list[float]:
    """Median us per query of the row kernel over ``scans``' lists in each of :data:`LAYOUTS`
    (see the module docstring), the layouts taking turns on every query."""
    copies: dict[int, F32] = {}  # one anonymous copy per list, shared by queries as maps are
    maps = [[cast("F32", v.vectors) for v in s.views] for s in scans]
    anonymous = [[copies.setdefault(x.ctypes.data, np.array(x)) for x in m] for m in maps]
    # Two copies end to end: layouts of the same bytes would find each other's in the cache.
    joined = [np.concatenate(m) for m in maps]
    adjacent = [
        [j[a:b] for a, b in itertools.pairwise(s.starts)]
        for j, s in zip((np.concatenate(m) for m in maps), scans, strict=True)
    ]

    def per_list(s: Scan, arrays: list[F32]) -> Callable[[], None]:
        def run() -> None:
            for x, a, b in zip(arrays, s.starts, s.starts[1:], strict=False):  # lists
                s.kernel(x, s.qv, s.buf[a:b])

        return run

    def one_call(s: Scan, x: F32) -> Callable[[], None]:
        def run() -> None:
            s.kernel(x, s.qv, s.buf)

        return run

    runs = [
        [per_list(s, m), per_list(s, an), per_list(s, ad), one_call(s, j)]
        for s, m, an, ad, j in zip(scans, maps, anonymous, adjacent, joined, strict=True)
    ]
    per_round: list[list[float]] = [[] for _ in LAYOUTS]
    for r in range(rounds):
        totals = [0.0] * len(LAYOUTS)
        for i, fns in enumerate(runs):
            for j in range(len(LAYOUTS)):
                turn = (i + r + j) % len(LAYOUTS)  # the first layout rotates query by query
                totals[turn] += timed(fns[turn], sweep)
        for j, total in enumerate(totals):
            per_round[j].append(total / len(scans) * 1e6)
    return [statistics.median(t) for t in per_round]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    query_args(ap, nq=300, nprobe="1,4,16")
    ap.add_argument(
        "--sweep-mb", type=int, default=0, help="MB read before each timed call (caches cold)"
    )
    ap.add_argument(
        "--layouts", type=int, default=0, help="time the kernel over N queries' lists, 4 layouts"
    )
    args = ap.parse_args()
    nprobes = [int(p) for p in args.nprobe.split(",")]
    with diskivf.open(args.index) as index:
        queries = load_queries(args, index)
        for q in queries:  # page cache warm: every probed list read once
            index.search(q, K, nprobe=max(nprobes), threads=1)
        sweep = np.ones(args.sweep_mb << 18, np.float32)  # 4-byte values: MB << 18
        print(
            f"{args.index}: {len(queries)} queries, {args.rounds} rounds, one thread, "
            f"{args.sweep_mb} MB read before each timed call"
        )
        print(" nprobe   MB/q  search us  scan us  scan share  per round    scan GB/s")
        for nprobe in nprobes:
            whole, alone, shares, nbytes = split_row(index, queries, nprobe, args.rounds, sweep)
            print(
                f"{nprobe:7d}  {nbytes / 1e6:5.2f}  {whole:9.1f}  {alone:7.1f}  "
                f"{alone / whole:10.2f}  {min(shares):.2f}-{max(shares):.2f}  "
                f"{nbytes / alone / 1e3:11.1f}"
            )
        if args.layouts > 0:
            n = min(args.layouts, len(queries))
            print(f"the row kernel alone over the first {n} queries' lists, us per query (GB/s):")
            print(" nprobe" + "".join(f"  {name:>20s}" for name in LAYOUTS))
            for nprobe in nprobes:
                scans = [Scan(index, q, nprobe) for q in queries[:n]]
                times = layout_times(scans, args.rounds, sweep)
                nbytes = float(np.mean([s.nbytes for s in scans]))
                cells = [f"{us:.1f} ({nbytes / us / 1e3:.1f})" for us in times]
                print(f"{nprobe:7d}" + "".join(f"  {c:>20s}" for c in cells))


if __name__ == "__main__":
    main()
