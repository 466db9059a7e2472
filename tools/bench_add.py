"""Where ``Index.add``'s time goes: each of its phases alone, then the whole add, same rows.

Usage::

    python tools/bench_add.py BASE.npy [--nlist 1024] [--rounds 3] [--dir DIR] [--no-faiss]

Trains one set of centroids (``nlist * 256`` rows sampled with seed 0), then per round:

* ``prepare``: validation and conversion of every batch, as ``add`` does it (the prepared
  rows are kept for the next phases, so the input must fit in memory);
* ``checksums``: the CRC-32 of every batch's bytes, in pieces of a list's mean share, with the
  CRC-32 the writes use (ISA-L's when the optional ``isal`` package is installed) and with
  zlib's (``checksums zlib``);
* ``assign``: nearest-centroid assignment of every batch (``add``'s worker threads);
* ``write``: the grouped appends of every batch into a fresh index, labels already known;
* ``sync``: the commit's fsync of that index's list files (then the commit is published);
* ``add``: ``Index.add`` end to end into another fresh index, where one batch is assigned
  while the previous one is written.

Each phase prints its wall time and the CPU time of all the process's threads; each round
also the share of CPU time the hypervisor gave to other guests meanwhile (steal), which
tells a round timed in a slow spell of a shared machine. A whole add
that uses more CPU than its phases alone lost time to contention; one that takes longer than
its phases' CPU spread over the cores lost time to waiting.

With ``faiss`` installed it also times FAISS on the same centroids and in-memory rows: its
assignment alone (the quantizer's search) and ``IndexIVFFlat.add``, whose difference is what
FAISS spends appending to its in-memory lists. Medians over ``--rounds``. The indexes are
built under ``--dir`` (default: a temporary directory) and all deleted at the end: deleting
them between rounds would slow the next round's file creations on some file systems
(``tools/bench_writes.py``).
"""

from __future__ import annotations

import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
try:
    import diskivf
except ModuleNotFoundError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))
    import diskivf
from bench import cpu_ticks, steal_since, steal_text  # tools/, this script's directory
from bench_build import build_parser, training_sample

from diskivf import format as fmt
from diskivf.index import _ADD_BATCH, _Pending


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timed_cpu(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of all the process's threads."""
    c0 = time.process_time()
    wall = _timed(fn)
    return wall, time.process_time() - c0


Timing = tuple[float, float]  # wall seconds, CPU seconds of the whole process


def diskivf_phases(
    x: NDArray[Any], centroids: NDArray[np.float32], path: Path
) -> dict[str, Timing]:
    """Every phase of one add, alone and in turn, into a fresh index at ``path``."""
    dim, nlist = x.shape[1], centroids.shape[0]
    starts = range(0, len(x), _ADD_BATCH)
    out: dict[str, Timing] = {}
    batches: list[tuple[NDArray[np.float32], NDArray[Any]]] = []
    labels: list[NDArray[Any]] = []
    with diskivf.open(path, mode="w", dim=dim, nlist=nlist) as index:
        index.set_centroids(centroids)
        c = index.centroids

        rows = min(_ADD_BATCH, len(x))
        scratch = (np.empty((rows, dim), index.dtype), np.empty(rows, np.int64))

        def prepare() -> None:
            # Into one reused buffer, as add does (two, alternating); keeping every batch
            # would time the allocation of fresh memory instead.
            buffer = np.empty((rows, dim), np.float32)
            for a in starts:
                index._prepare_batch(x[a : a + _ADD_BATCH], a, buffer)

        def assign() -> None:
            labels.extend(index._assign(xb, c) for xb, _ in batches)

        writer = index._need_writer()
        pending = _Pending.start(index._commit)
        rowbytes = dim * index.dtype.itemsize

        def write() -> None:
            for a, (_, stored), lab in zip(starts, batches, labels, strict=True):
                ids = np.arange(a, a + len(stored), dtype=np.int64)
                index._append_grouped(writer, stored, ids, lab, pending, rowbytes, scratch)

        def checksums(crc32: Callable[[memoryview, int], int]) -> None:
            # In pieces of a batch's mean list size, as write checksums each list's rows.
            for _, stored in batches:
                for piece in np.array_split(stored, nlist):
                    crc32(piece.data.cast("B"), 0)

        out["prepare"] = _timed_cpu(prepare)
        batches.extend(index._prepare_batch(x[a : a + _ADD_BATCH], a) for a in starts)
        # The list-file checksums write computes, alone: the one add uses, and zlib's.
        out["checksums"] = _timed_cpu(lambda: checksums(fmt.crc32))
        out["checksums zlib"] = _timed_cpu(lambda: checksums(zlib.crc32))
        out["assign"] = _timed_cpu(assign)
        out["write"] = _timed_cpu(write)
        out["sync"] = _timed_cpu(writer.sync)
        index._commit_pending(writer, pending)
    return out


def diskivf_add(x: NDArray[Any], centroids: NDArray[np.float32], path: Path) -> Timing:
    """``Index.add`` of every row, into a fresh index at ``path``."""
    with diskivf.open(path, mode="w", dim=x.shape[1], nlist=centroids.shape[0]) as index:
        index.set_centroids(centroids)
        return _timed_cpu(lambda: index.add(x))


def faiss_phases(
    faiss: Any, xf: NDArray[np.float32], centroids: NDArray[np.float32]
) -> dict[str, Timing]:
    """FAISS's assignment alone and its whole add, on the same centroids."""
    dim, nlist = xf.shape[1], centroids.shape[0]
    quantizer = faiss.IndexFlatL2(dim)
    quantizer.add(centroids)
    out = {"faiss assign": _timed_cpu(lambda: quantizer.search(xf, 1))}
    index = faiss.IndexIVFFlat(quantizer, dim, nlist)
    index.is_trained = True
    out["faiss add"] = _timed_cpu(lambda: index.add(xf))
    return out


def _fmt(t: Timing) -> str:
    return f"{t[0]:.2f} s (cpu {t[1]:.2f})"


def main() -> None:
    ap = build_parser(__doc__)
    ap.add_argument("--no-faiss", action="store_true", help="skip FAISS even if installed")
    args = ap.parse_args()
    x = np.load(args.base, mmap_mode="r")
    faiss: Any = None
    if not args.no_faiss:
        try:
            faiss = importlib.import_module("faiss")
        except ImportError:
            print("faiss not installed (pip install faiss-cpu): diskivf only")
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        with diskivf.open(
            scratch / "trained", mode="w", dim=x.shape[1], nlist=args.nlist
        ) as trainee:
            trainee.train(training_sample(x, args.nlist))
            centroids = trainee.centroids
        xf = np.array(x, dtype=np.float32) if faiss is not None else None  # FAISS holds rows
        np.add.reduce(x, axis=0)  # the input in the page cache before the first round
        print(f"diskivf {diskivf.__version__}: {len(x):,} x {x.shape[1]}, nlist {args.nlist}")
        runs: dict[str, list[Timing]] = {}
        for r in range(args.rounds):
            ticks = cpu_ticks()
            got = diskivf_phases(x, centroids, scratch / f"phases{r}")
            got["add"] = diskivf_add(x, centroids, scratch / f"add{r}")
            if xf is not None:
                got.update(faiss_phases(faiss, xf, centroids))
            for key, t in got.items():
                runs.setdefault(key, []).append(t)
            print(
                f"round {r + 1} ({steal_text(steal_since(ticks))}): "
                + ", ".join(f"{k} {_fmt(t)}" for k, t in got.items())
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in runs.items()
    }
    print("median:")
    for key, t in med.items():
        print(f"  {key:14s} {_fmt(t)}")
    cpu = med["prepare"][1] + med["assign"][1] + med["write"][1]
    cores = len(os.sched_getaffinity(0))
    print(
        f"diskivf add {med['add'][0]:.2f} s (cpu {med['add'][1]:.2f}); its phases alone: "
        f"cpu {cpu:.2f} s before the sync, {cpu / cores:.2f} s if spread over {cores} cores, "
        f"then sync {med['sync'][0]:.2f} s"
    )
    if "faiss add" in med:
        lists = med["faiss add"][0] - med["faiss assign"][0]
        print(
            f"faiss add {med['faiss add'][0]:.2f} s = assign {med['faiss assign'][0]:.2f} s "
            f"+ appends to in-memory lists {lists:.2f} s"
        )


if __name__ == "__main__":
    main()
