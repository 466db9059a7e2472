"""Single queries on several threads from a fresh start: two versions, each in new processes.

Usage::

    python tools/bench_policy.py INDEX_DIR --base REV [--variant REV] [--queries Q.npy]
                                 [--nq 200] [--nprobe 16] [--threads 2] [--pairs 10]

Whether a single query is split over threads is chosen from timings the process gathers as it
goes (``diskivf._threads``), so what a version does in its first few hundred queries depends on
its first timings; ``tools/bench.py`` times 200 queries per nprobe in each round's process.
``tools/bench_versions.py`` cannot show this: it warms both versions up in one process. This
tool starts a new process per version and pair, the order alternating from pair to pair so
drift falls on both alike. Each process opens the index with its version, searches every
query once on one thread (page cache and maps warm; a one-thread query gathers no timings),
times a second one-thread pass, then one pass with ``threads=--threads``.

Per pair it prints each version's one-thread and ``--threads`` QPS and the share of the
``--threads`` queries it split; then per version the medians over pairs, with the median and
the lowest of its ``--threads`` / one-thread ratio (a low one is a process whose choice went
the slow way), and the median over pairs of variant / base at ``--threads``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench import record_splits  # tools/
from bench_single import load_queries  # tools/, this script's directory
from bench_versions import load_version, version_args

VERSIONS = ("diskivf_base", "diskivf_variant")


def child(where: str, name: str, index: str, queries: str, nprobe: int, threads: int) -> None:
    """Time one fresh process's passes with version ``name`` under ``where``; print JSON."""
    sys.path.insert(0, where)
    version: Any = importlib.import_module(name)
    splits = record_splits(importlib.import_module(f"{name}._threads").Workers)
    q = np.load(queries)
    with version.open(index) as ix:
        for row in q:
            ix.search(row, 10, nprobe=nprobe, threads=1)
        qps = []
        for t in (1, threads):
            t0 = time.perf_counter()
            for row in q:
                ix.search(row, 10, nprobe=nprobe, threads=t)
            qps.append(len(q) / (time.perf_counter() - t0))
    share = sum(splits) / len(q)
    print(json.dumps({"one": qps[0], "many": qps[1], "split": share}))


def run_child(args: list[str]) -> dict[str, float]:
    got = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if got.returncode:
        sys.exit(f"a timing process failed:\n{got.stderr[-4000:]}")
    out: dict[str, float] = json.loads(got.stdout.splitlines()[-1])
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        where, name, index, queries, nprobe, threads = sys.argv[2:8]
        child(where, name, index, queries, int(nprobe), int(threads))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    version_args(ap, nq=200)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load_version(args.base, VERSIONS[0], Path(tmp))
        load_version(args.variant, VERSIONS[1], Path(tmp))
        q = load_queries(args)
        qpath = str(Path(tmp) / "queries.npy")
        np.save(qpath, q)
        print(
            f"{args.index}: {len(q)} queries, nprobe {args.nprobe}, threads={args.threads}, "
            f"{args.pairs} pairs; base {args.base}, variant {args.variant or 'working tree'}"
        )
        print(" pair   base 1t  base QPS  split  variant 1t  variant QPS  split")
        rows: tuple[list[dict[str, float]], list[dict[str, float]]] = ([], [])
        for pair in range(args.pairs):
            for which in (pair % 2, 1 - pair % 2):  # alternate which version goes first
                cmd = [tmp, VERSIONS[which], args.index, qpath, str(args.nprobe)]
                rows[which].append(run_child([*cmd, str(args.threads)]))
            b, v = rows[0][-1], rows[1][-1]
            print(
                f"{pair + 1:5d}  {b['one']:8.0f}  {b['many']:8.0f}  {b['split']:5.0%}"
                f"  {v['one']:10.0f}  {v['many']:11.0f}  {v['split']:5.0%}"
            )
    print("medians over pairs:")
    for name, runs in zip(("base", "variant"), rows, strict=True):
        ratios = [r["many"] / r["one"] for r in runs]
        print(
            f"  {name:8s} 1t {statistics.median(r['one'] for r in runs):6.0f} QPS, "
            f"{args.threads}t {statistics.median(r['many'] for r in runs):6.0f} QPS, "
            f"split {statistics.median(r['split'] for r in runs):4.0%}, "
            f"{args.threads}t / 1t {statistics.median(ratios):.3f} (lowest {min(ratios):.3f})"
        )
    pairs = [v["many"] / b["many"] for b, v in zip(*rows, strict=True)]
    print(
        f"  variant / base at {args.threads} threads: {statistics.median(pairs):.3f} "
        f"({min(pairs):.3f}-{max(pairs):.3f})"
    )


if __name__ == "__main__":
    main()
