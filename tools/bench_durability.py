"""Measure the cost of durability: add() throughput with ``durable=True`` vs ``durable=False``.

``durable=True`` (the default) fsyncs every touched list file, the new commit record and the
directory on every commit, so an add that returned survives a power cut. ``durable=False``
skips the fsyncs: a process crash still cannot lose a returned batch, a power cut can (until
``Index.flush()``). Each configuration adds ``--rows`` vectors in batches of a given size, one
commit per batch, to a fresh copy of one trained index; the table reports medians over
``--runs`` runs. The non-durable column "+flush" includes one final ``flush()``.

Usage::

    python tools/bench_durability.py [--dim 64] [--nlist 64] [--rows 20000]
                                     [--batch-sizes 10,100,1000,10000] [--runs 5] [--dir DIR]

Results depend heavily on the storage (fsync on a laptop SSD, a cloud volume and tmpfs differ
by orders of magnitude): run it on the file system the index will live on (``--dir``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
try:
    import diskivf
except ModuleNotFoundError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))
    import diskivf


def _one_run(
    template: Path, work: Path, x: np.ndarray, batch: int, *, durable: bool
) -> tuple[float, float]:
    """Seconds to add all of ``x`` in ``batch``-row commits, and including a final flush()."""
    root = work / f"run-{'d' if durable else 'n'}-{batch}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    with diskivf.open(root, "r+", durable=durable) as index:
        t0 = time.perf_counter()
        for start in range(0, len(x), batch):
            index.add(x[start : start + batch])
        t1 = time.perf_counter()
        index.flush()
        t2 = time.perf_counter()
    shutil.rmtree(root)
    return t1 - t0, t2 - t0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--nlist", type=int, default=64)
    parser.add_argument("--rows", type=int, default=20_000, help="vectors added per run")
    parser.add_argument("--batch-sizes", default="10,100,1000,10000")
    parser.add_argument("--runs", type=int, default=5, help="runs per configuration (median)")
    parser.add_argument("--max-commits", type=int, default=50, help="cap on commits per run")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to build, created if missing (default: tmp)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="diskivf-bench-", dir=args.dir))
    t_start = time.perf_counter()
    try:
        template = work / "template.index"
        with diskivf.open(template, "w-", dim=args.dim, nlist=args.nlist) as index:
            index.train(x[: min(len(x), args.nlist * 64)], niter=5, seed=args.seed)
        print(
            f"diskivf {diskivf.__version__}: dim={args.dim} nlist={args.nlist}, "
            f"median of {args.runs} runs, in {work}"
        )
        header = (
            f"{'batch':>6} {'commits':>7} | {'durable vec/s':>13} {'ms/commit':>9} | "
            f"{'no-fsync vec/s':>14} {'ms/commit':>9} {'+flush vec/s':>12} | {'cost':>5}"
        )
        print(header)
        print("-" * len(header))
        for batch in sizes:
            rows = min(args.rows, batch * args.max_commits)
            commits = -(-rows // batch)
            data = x[:rows]
            timings: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for _ in range(args.runs):
                for durable in (True, False):  # interleaved, so drift hits both alike
                    timings[durable].append(_one_run(template, work, data, batch, durable=durable))
            med_d = statistics.median(t for t, _ in timings[True])
            med_n = statistics.median(t for t, _ in timings[False])
            med_nf = statistics.median(t for _, t in timings[False])
            print(
                f"{batch:>6} {commits:>7} | {rows / med_d:>13,.0f} {med_d / commits * 1e3:>9.2f} | "
                f"{rows / med_n:>14,.0f} {med_n / commits * 1e3:>9.2f} {rows / med_nf:>12,.0f} | "
                f"{med_d / med_n:>4.1f}x"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"(total {time.perf_counter() - t_start:.1f} s; cost = durable time / no-fsync time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
