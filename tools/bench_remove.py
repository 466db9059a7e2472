"""Cost of removals: 1k removals on an n-vector index (issue: deletes without a full pass).

Usage: python tools/bench_remove.py [--n 1000000] [--dim 128] [--nlist 1024] [--repeats 5]

Reports the first remove() of a writer session (which builds the id -> row map by reading
every id file once: 8 bytes per vector), later remove() calls (O(r log n) lookups plus one
commit), search QPS before/after removals, and compact() time and bytes reclaimed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import diskivf
from diskivf.demo import clustered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--removals", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "i"
        x, q = clustered(args.n, args.dim, nq=200, seed=0)
        with diskivf.open(path, mode="w-", dim=args.dim, nlist=args.nlist) as ix:
            ix.train(x[: 256 * args.nlist])
            ix.add(x)
        del x
        with diskivf.open(path, mode="r+") as ix:
            ix.search(q, k=10)
            t = time.perf_counter()
            ix.search(q, k=10)
            qps_before = len(q) / (time.perf_counter() - t)
            victims = rng.choice(args.n, size=args.removals * (args.repeats + 1), replace=False)
            t = time.perf_counter()
            ix.remove(victims[: args.removals])
            first = time.perf_counter() - t
            later = []
            for r in range(1, args.repeats + 1):
                batch = victims[r * args.removals : (r + 1) * args.removals]
                t = time.perf_counter()
                removed = ix.remove(batch)
                later.append(time.perf_counter() - t)
                assert removed == args.removals
            ix.search(q, k=10)
            t = time.perf_counter()
            ix.search(q, k=10)
            qps_after = len(q) / (time.perf_counter() - t)
            t = time.perf_counter()
            freed = ix.compact()
            compact_s = time.perf_counter() - t
    print(f"index: n={args.n} dim={args.dim} nlist={args.nlist}")
    print(f"first remove({args.removals}) incl. id-map build: {first * 1e3:.1f} ms")
    print(
        f"later remove({args.removals}): median {statistics.median(later) * 1e3:.2f} ms "
        f"over {args.repeats} (min {min(later) * 1e3:.2f}, max {max(later) * 1e3:.2f})"
    )
    print(f"batch search QPS before {qps_before:,.0f}, after removals {qps_after:,.0f}")
    print(f"compact(): {compact_s:.2f} s, {freed / 2**20:.1f} MiB reclaimed")


if __name__ == "__main__":
    main()
