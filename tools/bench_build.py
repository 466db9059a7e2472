"""Time ``Index.train`` and ``Index.add`` (durable, one commit) and sample their peak memory.

Usage::

    python tools/bench_build.py BASE.npy [--nlist 1024] [--rounds 3] [--dir DIR]
    PYTHONPATH=/path/to/other/checkout python tools/bench_build.py BASE.npy   # compare versions

Each round builds a fresh index from the memory-mapped ``.npy`` (every row added in one call)
after training on ``nlist * 256`` rows sampled with seed 0 (FAISS's default cap), and reports
the median train and add times over rounds and the peak anonymous memory (``RssAnon``,
sampled every 3 ms) each phase added. Only the public API is used, so the script runs against
any diskivf version on ``PYTHONPATH``. ``tools/bench.py`` compares the same two steps with
FAISS; this script isolates diskivf to compare its own versions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import diskivf


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakAnon:
    """Peak RssAnon above the level at entry, sampled by a background thread."""

    def __enter__(self) -> PeakAnon:  # noqa: PYI034 - final class; Self needs Python 3.11
        self.base = rss_anon_mb()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.003)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())

    @property
    def added_mb(self) -> float:
        return self.peak - self.base


def build_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments shared with ``tools/bench_add.py``: input, nlist, rounds, directory."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("base", type=Path, help="(n, dim) float32 .npy, memory-mapped")
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to build, created if missing (default: temp dir)",
    )
    return ap


def training_sample(x: np.ndarray, nlist: int) -> np.ndarray:
    """``nlist * 256`` rows of ``x`` (FAISS's default cap) drawn with seed 0, as float32."""
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(x), min(len(x), nlist * 256), replace=False))
    return np.asarray(x[rows], np.float32)


def main() -> None:
    args = build_parser(__doc__).parse_args()
    x = np.load(args.base, mmap_mode="r")
    sample = training_sample(x, args.nlist)
    np.add.reduce(x, axis=0)  # read the input once, so no round pays for the first read
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    print(f"diskivf {diskivf.__version__} from {Path(diskivf.__file__).parent}")
    print(f"{len(x):,} x {x.shape[1]}, nlist {args.nlist}, {len(sample):,} training rows")
    train_s, add_s, train_mb, add_mb = [], [], [], []
    try:
        for r in range(args.rounds):
            # A fresh directory per round, all deleted at the end: deleting an index right
            # before the next build slows that build's file creations on some file systems
            # (see tools/bench_writes.py).
            path = scratch / f"index{r}"
            with diskivf.open(path, mode="w", dim=x.shape[1], nlist=args.nlist) as index:
                with PeakAnon() as mem:
                    t0 = time.perf_counter()
                    index.train(sample)
                    t1 = time.perf_counter()
                train_mb.append(mem.added_mb)
                with PeakAnon() as mem:
                    index.add(x)
                    t2 = time.perf_counter()
                add_mb.append(mem.added_mb)
            train_s.append(t1 - t0)
            add_s.append(t2 - t1)
            print(
                f"round {r + 1}: train {t1 - t0:.2f} s (+{train_mb[-1]:.0f} MB anon), "
                f"add {t2 - t1:.2f} s (+{add_mb[-1]:.0f} MB anon)"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = statistics.median
    print(
        f"median: train {med(train_s):.2f} s (+{med(train_mb):.0f} MB), add {med(add_s):.2f} s "
        f"(+{med(add_mb):.0f} MB), train + add {med(train_s) + med(add_s):.2f} s"
    )


if __name__ == "__main__":
    main()
