"""Single-query search on one thread against the same query with ``threads=2``.

Usage::

    python tools/bench_single.py INDEX_DIR [--queries Q.npy] [--nq 200] [--nprobe 4,8,16,32]
                                 [--rounds 5] [--always-split]

For each nprobe it times ``index.search(q, 10, nprobe=p, threads=t)`` one query at a time, for
t = 1 and 2 in alternating order, and prints the median QPS over ``--rounds`` passes, their
ratio and the vector data scanned per query (MB/q). Both must return the same neighbours; the
script stops if they do not.

With ``threads=2`` diskivf splits a query over two threads when splits of its size have
been timed faster than one thread lately (``diskivf._threads``); the ``split`` column gives
the share of the row's 2-thread queries it split, ``steal`` the share of CPU time the
hypervisor gave to other guests while the row ran (a row timed in a slow spell of a shared
machine shows it there), and the median delay before a worker started
its chunk is printed at the end. Printed first: the memory read rate of one thread and of two
(what a split can gain), the round trip of an empty task through a thread pool, what handing a
task to a worker idle for 2 ms costs the caller and how late it starts (what a split between
single queries meets), and the read rates again with one GEMV per list-sized run of rows, as
a scan makes them. ``--always-split`` splits every 2-thread query instead, to see what a
split costs or gains at each size on a machine.

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
from bench import cpu_ticks, record_splits, steal_cell, steal_since  # tools/
from numpy.typing import NDArray

import diskivf
from diskivf._blas import blas_threads
from diskivf._threads import Workers
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


def parked_wake_us(rounds: int = 200, idle: float = 0.002) -> tuple[float, float]:
    """Median cost of handing a task to a worker thread that has been idle ``idle`` seconds,
    as a split between single queries finds it: microseconds the caller spends in ``submit``,
    and from the call until the task starts on the worker."""
    stamps: list[float] = []
    submit, start = [], []
    with ThreadPoolExecutor(1) as pool:
        pool.submit(int).result()
        for _ in range(rounds):
            time.sleep(idle)  # the worker parks; on a virtual machine its CPU may halt
            t0 = time.perf_counter()
            done = pool.submit(lambda: stamps.append(time.perf_counter()))
            submit.append(time.perf_counter() - t0)
            done.result()
            start.append(stamps[-1] - t0)
    return statistics.median(submit) * 1e6, statistics.median(start) * 1e6


def read_gbs(
    threads: int, mb: int = 256, rounds: int = 5, rows: int | None = None, dim: int = 128
) -> float:
    """Memory read rate of ``threads`` threads at once, each running GEMVs over its own
    ``mb`` MB array of ``dim``-wide float32 rows (BLAS held to one thread, as search does);
    median over ``rounds``.

    With ``rows``, each GEMV covers ``rows`` rows, as a scan calls one per list, rather than
    the whole array: between calls a thread needs the GIL back."""
    arrays = [np.ones(((mb << 20) // (4 * dim), dim), np.float32) for _ in range(threads)]
    q = np.ones(dim, np.float32)
    step = rows or len(arrays[0])

    def scan(x: NDArray[np.float32]) -> None:
        for a in range(0, len(x), step):  # lists, not vectors
            np.dot(x[a : a + step], q)

    rates = []
    with blas_threads(1), ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(scan, arrays))
            rates.append(threads * arrays[0].nbytes / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


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


def query_args(ap: argparse.ArgumentParser, *, nq: int, nprobe: str) -> None:
    """The arguments of a tool that times single queries on an index: the index, the
    queries (see :func:`load_queries`), the nprobe values and the rounds."""
    ap.add_argument("index")
    ap.add_argument("--queries", help=".npy of queries (default: stored vectors)")
    ap.add_argument("--nq", type=int, default=nq)
    ap.add_argument("--nprobe", default=nprobe)
    ap.add_argument("--rounds", type=int, default=5)


def load_queries(
    args: argparse.Namespace, index: diskivf.Index | None = None
) -> NDArray[np.float32]:
    """The first ``--nq`` rows of ``--queries``, or as many stored vectors of ``index`` (by
    default the index ``args`` name, opened only then)."""
    if args.queries:
        loaded: NDArray[np.float32] = np.load(args.queries)[: args.nq].astype(np.float32)
        return loaded
    if index is None:
        with diskivf.open(args.index) as opened:
            return stored_queries(opened, Path(args.index), args.nq)
    return stored_queries(index, Path(args.index), args.nq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    query_args(ap, nq=200, nprobe="4,8,16,32")
    ap.add_argument("--always-split", action="store_true", help="split every 2-thread query")
    args = ap.parse_args()
    split_choices = record_splits(Workers, (lambda self, n: True) if args.always_split else None)
    root = Path(args.index)
    nprobes = [int(p) for p in args.nprobe.split(",")]
    print(f"memory read, GEMV: {read_gbs(1):.1f} GB/s on 1 thread, {read_gbs(2):.1f} on 2")
    print(f"thread pool round trip: {handoff_us():.0f} us (median)")
    submit_us, start_us = parked_wake_us()
    print(
        f"waking a worker idle 2 ms: submit {submit_us:.0f} us in the caller, "
        f"task starts {start_us:.0f} us after the call (medians)"
    )
    with diskivf.open(root) as index:
        rows = max(1, round(index.ntotal / index.nlist))
        print(
            f"memory read, one GEMV per {rows} rows of {index.dim} (this index's mean list): "
            f"{read_gbs(1, rows=rows, dim=index.dim):.1f} GB/s on 1 thread, "
            f"{read_gbs(2, rows=rows, dim=index.dim):.1f} on 2"
        )
        q = load_queries(args, index)
        index.search(q, 10, nprobe=max(nprobes))  # page cache warm, lists mapped
        index.search(q[0], 10, nprobe=max(nprobes))  # a first single query's one-time load
        print(" nprobe   MB/q   1 thread QPS   2 threads QPS   ratio  split  steal")
        for p in nprobes:
            ticks = cpu_ticks()
            ref, st = index.search(q, 10, nprobe=p, stats=True)
            qps: dict[int, list[float]] = {1: [], 2: []}
            split_choices.clear()
            for r in range(args.rounds):
                for t in (1, 2) if r % 2 == 0 else (2, 1):  # neither always runs second
                    t0 = time.perf_counter()
                    out = [index.search(q[i], 10, nprobe=p, threads=t).ids for i in range(len(q))]
                    qps[t].append(len(q) / (time.perf_counter() - t0))
                    if not np.array_equal(np.concatenate(out), ref.ids):
                        raise SystemExit(f"nprobe {p}, {t} threads: neighbours differ from a batch")
            one, two = statistics.median(qps[1]), statistics.median(qps[2])
            mb = st.vectors_scanned / len(q) * index.dim * index.dtype.itemsize / 1e6
            split = sum(split_choices) / (args.rounds * len(q))
            steal = steal_cell(steal_since(ticks))
            print(
                f"{p:7d} {mb:6.2f} {one:14.0f} {two:15.0f} {two / one:7.2f}  {split:5.0%}  {steal}"
            )
        delay = index._workers.delay_us()
        shown = "no split" if delay is None else f"{delay:.0f} us (median)"
        print(f"worker start delay in splits: {shown}")


if __name__ == "__main__":
    main()
