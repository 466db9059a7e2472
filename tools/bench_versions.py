"""Single-query speed of two versions of diskivf in one process, query by query.

Usage::

    python tools/bench_versions.py INDEX_DIR --base REV [--variant REV] [--queries Q.npy]
                                   [--nq 300] [--nprobe 1,4,16] [--rounds 5] [--threads 1]
                                   [--rtol R] [--sweep-mb MB]

A change worth a few percent of a single query is lost in this machine's drift: a search
process's speed moves by more than that from one minute to the next, so two runs one after
the other cannot tell it. This tool loads both versions into one process instead: each
revision's ``diskivf/`` (``git archive``; the working tree when ``--variant`` is not given)
goes into a temporary directory as a package renamed ``diskivf_base`` or ``diskivf_variant``.
It opens the index with each and times ``search(q, 10, nprobe=p, threads=t)`` on every query
with both, the order alternating from query to query, so drift falls on both alike; the two
versions run queries half the set apart, so that neither finds the lists it scans left in
the CPU's cache by the other. Per
nprobe it prints the median microseconds per query of each version, their ratio
(variant / base, below 1 when the variant is faster) and the range of that ratio over rounds.
Both versions must return the same neighbours and distances; the script stops if they do not.
A change of kernel rounds the distances differently: with ``--rtol R`` the distances need only
agree within a relative ``R``, and the neighbours wherever that cannot reorder them (those
nearer than the k-th by more than ``R``).

Queries default to ``--nq`` stored vectors of random lists. The page cache is warm: every
query is searched once with both versions before timing. ``--sweep-mb MB`` reads that many MB
of another array before each timed search, as another engine's scan in the same process
would, so that the search meets CPU caches holding none of its code and data (a last-level
cache is 32 MiB here); with ``--variant`` equal to ``--base`` it prints what that costs a
version against a run without the sweep.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from bench_single import load_queries  # tools/, this script's directory

REPO = Path(__file__).resolve().parent.parent
_IMPORT = re.compile(r"^(\s*(?:from|import) )diskivf\b", re.MULTILINE)


def load_version(rev: str | None, name: str, into: Path) -> ModuleType:
    """Import ``diskivf/`` of git revision ``rev`` (the working tree if None) as ``name``."""
    dest = into / name
    if rev is None:
        shutil.copytree(REPO / "diskivf", dest, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        got = subprocess.run(
            ["git", "-C", str(REPO), "archive", rev, "diskivf"], capture_output=True, check=False
        )
        if got.returncode:
            sys.exit(f"cannot read diskivf/ at revision {rev!r}: {got.stderr.decode().strip()}")
        tar = got.stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
        (into / "diskivf").rename(dest)
    for src in dest.rglob("*.py"):
        src.write_text(_IMPORT.sub(rf"\g<1>{name}", src.read_text()))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(name)


def version_args(ap: argparse.ArgumentParser, nq: int) -> None:
    """The arguments of a tool that times two versions on an index: the index, the two
    revisions and the queries (see :func:`bench_single.load_queries`)."""
    ap.add_argument("index")
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--variant", help="git revision (default: the working tree)")
    ap.add_argument("--queries", help=".npy of queries (default: stored vectors)")
    ap.add_argument("--nq", type=int, default=nq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    version_args(ap, nq=300)
    ap.add_argument("--nprobe", default="1,4,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rtol", type=float, default=0.0, help="distances may differ by this much")
    ap.add_argument(
        "--sweep-mb", type=int, default=0, help="MB read before each search (CPU caches cold)"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = load_version(args.base, "diskivf_base", Path(tmp))
        variant = load_version(args.variant, "diskivf_variant", Path(tmp))
        with base.open(args.index) as a, variant.open(args.index) as b:
            queries = load_queries(args)
            sweep = np.ones(args.sweep_mb << 18, np.float32)  # 4-byte values: MB << 18
            print(
                f"{args.index}: {len(queries)} queries, {args.rounds} rounds, "
                f"threads={args.threads}, {args.sweep_mb} MB read before each search; "
                f"base {args.base}, variant {args.variant or 'working tree'}"
            )
            print(" nprobe   base us  variant us  variant/base  per round")
            for nprobe in [int(p) for p in args.nprobe.split(",")]:
                row = compare(a, b, queries, nprobe, args.threads, args.rounds, args.rtol, sweep)
                print(f"{nprobe:7d}  {row[0]:8.1f}  {row[1]:10.1f}  {row[2]:12.3f}  {row[3]}")


def agree(ra: Any, rb: Any, rtol: float) -> bool:
    """Whether two results of one query are the same, up to rounding of ``rtol`` (see the
    module docstring)."""
    if rtol == 0:
        return np.array_equal(ra.ids, rb.ids) and np.array_equal(ra.distances, rb.distances)
    da, db = ra.distances[0], rb.distances[0]
    if not np.allclose(da, db, rtol=rtol, atol=0.0):
        return False
    slack = 2 * rtol * max(abs(float(da[-1])), abs(float(db[-1])))
    # Neighbours nearer than the k-th by more than the rounding cannot be reordered out.
    return all(
        set(ours.ids[0][np.abs(d - d[-1]) > slack].tolist()) <= set(theirs.ids[0].tolist())
        for ours, theirs, d in ((ra, rb, da), (rb, ra, db))
    )


def compare(
    a: Any,
    b: Any,
    queries: np.ndarray,
    nprobe: int,
    threads: int,
    rounds: int,
    rtol: float = 0.0,
    sweep: np.ndarray | None = None,
) -> tuple[float, float, float, str]:
    """Median us per query of ``a`` and ``b``, their ratio and its range over rounds; a
    ``sweep`` array is read through before each timed search."""
    for q in queries:
        ra = a.search(q, 10, nprobe=nprobe, threads=threads)
        rb = b.search(q, 10, nprobe=nprobe, threads=threads)
        if not agree(ra, rb, rtol):
            sys.exit(f"the versions disagree at nprobe {nprobe}")
    times: tuple[list[float], list[float]] = ([], [])
    ratios = []
    for _ in range(rounds):
        got: tuple[list[float], list[float]] = ([], [])
        half = len(queries) // 2
        for i in range(len(queries)):
            for which in (i % 2, 1 - i % 2):  # alternate which version goes first
                # Each version half the queries apart: one query's lists searched twice in a
                # row would be in the CPU's cache for the second search, unlike in a stream
                # of queries, and favour whichever kernel is faster from cache.
                q = queries[(i + which * half) % len(queries)]
                index = (a, b)[which]
                if sweep is not None and sweep.size:
                    sweep.sum()
                t0 = time.perf_counter()
                index.search(q, 10, nprobe=nprobe, threads=threads)
                got[which].append((time.perf_counter() - t0) * 1e6)
        ratios.append(statistics.median(got[1]) / statistics.median(got[0]))
        times[0].extend(got[0])
        times[1].extend(got[1])
    ma, mb = statistics.median(times[0]), statistics.median(times[1])
    return ma, mb, mb / ma, f"{min(ratios):.3f}-{max(ratios):.3f}"


if __name__ == "__main__":
    main()
