"""Benchmark diskivf against FAISS ``IndexIVFFlat`` (in memory and on disk), side by side.

Usage::

    python tools/bench.py                  # 1M x 128 clustered data, nlist 1024 (~20 min, 2 cores)
    python tools/bench.py --quick          # 100k x 64, nlist 256: a smoke run in under a minute
    python tools/bench.py --data sift-128-euclidean.hdf5      # ann-benchmarks train/test/neighbors
    python tools/bench.py --data base.fvecs --queries query.fvecs --gt groundtruth.ivecs
    python tools/bench.py --data vectors.npy --nq 1000        # last 1000 rows become the queries
    python tools/bench.py --no-faiss --no-cold --nprobe 8,16 --threads 1

Run ``python tools/bench.py --help`` for every option. Optional dependencies (the ``bench``
extra, ``pip install "diskivf[bench]"``): ``faiss-cpu`` (without it only diskivf is measured),
``threadpoolctl`` (BLAS thread limits and machine context), ``matplotlib`` (the plot), and
``h5py`` for HDF5 input. Each is imported only when used; a missing one is reported, not fatal.

What is measured
----------------
Every engine is built and searched in its own child process (this script re-run as a worker),
so neither the build's memory nor another engine's pollutes a measurement. The parent samples
each child's ``/proc/PID/status`` every 5 ms for peak ``VmRSS`` and peak ``RssAnon`` (anonymous
memory: heap and arrays, excluding file-backed pages such as diskivf's mapped lists); the child
also reports its exact ``VmHWM``.

* **Engines.** ``diskivf`` (this package), ``faiss-mem`` (``IndexIVFFlat``, same nlist and
  metric, lists in memory) and ``faiss-disk`` (the same trained index with its lists moved into
  ``faiss.OnDiskInvertedLists`` and reloaded with ``faiss.read_index`` defaults, i.e. mmapped).
  Those defaults include ``prefetch_nthread`` = 32: each search starts a thread per probed
  list (up to 32) to read it, besides its OpenMP threads. ``--faiss-disk-prefetch-threads N``
  sets it (the "threads via" column names it; 0 starts none) to see what they cost or give;
  the targets are set against the default, and their lines name any other setting.
* **Build.** Both engines train on the same random sample of ``nlist * 256`` rows (FAISS's own
  default cap, so neither sub-samples further) with their default k-means settings, then add
  every row. Train and add times are medians over ``--build-repeats`` builds, which alternate
  between the engines (each build in a fresh child process, after an untimed ``os.sync()``
  so that no build waits on the writeback of the one before). diskivf's add
  streams from the memory-mapped input and includes its commit (fsync, ``durable=True``, the
  default); FAISS gets the rows as one in-memory array, loaded before the clock starts.
* **Search.** For each thread count and nprobe: recall@k of a batch over all queries; batch QPS
  (all queries in one call); single-query QPS with p50/p99 latency (``--single`` queries one at
  a time), after one warm-up batch and one warm-up single query at the largest nprobe (the
  first single query of a diskivf process loads numba, when installed, for its compiled
  scan: the log gives that query's time). This machine's speed drifts over
  minutes, so the search phase runs in ``--rounds`` rounds, each running every engine once in
  rotating order with ``--repeats`` timed runs; QPS figures are medians over all timed runs of
  all rounds, latency percentiles and byte counts medians over rounds.
  Threads: diskivf's ``search(..., threads=t)`` when that keyword exists, else BLAS is limited
  with threadpoolctl (``--limit-blas`` does both); FAISS uses ``faiss.omp_set_num_threads(t)``.
* **Interleaved single queries.** Separate processes minutes apart meet the machine in
  different states, and single queries, mostly fixed costs and memory stalls, feel that most.
  So after each round's engine processes, one more child opens every engine (or those
  ``--interleave`` names) and times the same ``--single`` queries one at a time with all of
  them, for each thread count and nprobe. Its QPS are in their own table and give the
  single-query targets a second pair of lines ("interleaved in one process");
  ``--no-interleaved`` skips the pass. Each engine's query then follows another engine's
  instead of its own, and what that costs depends on which. FAISS's on-disk lists start
  prefetch threads on every search (one per probed list, up to 32, each reading its list),
  which slow what runs after them in the process, for more than one query. So the engines'
  order changes from query to query in a cycle (:func:`balanced_orders`) in which every
  engine follows every other one equally often; the table also gives each engine's QPS over
  the queries that came right after each other engine's ("after ..."), and
  ``--interleave diskivf,faiss-mem`` runs the pass without FAISS's on-disk lists. On a
  small index whose lists stay in cache every engine runs slower interleaved than alone.
* **Cold.** Before each cold pass the index is closed (unmapped), every index file is fsynced
  and evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` (the residency left is checked with
  ``mincore`` and reported), the index is reopened (timed separately) and the first
  ``--single`` queries run one at a time; then once more for a cold batch. diskivf runs with
  its default prefetching (each list is advised with ``madvise(WILLNEED)`` when first mapped;
  ``--cold-prefetch-all`` advises every probed list on every search, which
  ``tools/bench_cold.py`` measured slower on a freshly opened index). Bytes actually read
  from storage come from ``/proc/self/io``. FAISS in memory has no cold state.
* **Work.** ``vec/q`` is the vectors scanned per query (diskivf's ``stats=True``, FAISS's
  ``indexIVF_stats.ndis``); ``MB/q`` is that times ``dim * itemsize``; ``GB/s`` is the scan rate
  it implies, to compare with the machine's memory bandwidth printed at the top. ``1q disk MB``
  is what the warm single-query passes read from storage (``/proc/self/io``): non-zero means
  the page cache dropped index pages between passes (memory pressure or the kernel's
  proactive reclaim), which shows up as p99 outliers of the file-backed engines.
* **Steal.** The last line gives each phase's wall time and the share of the virtual CPUs'
  time the hypervisor gave to other guests during it (``steal`` in ``/proc/stat``;
  ``phases_steal`` in results.json): a phase that ran in a slow spell of a shared machine
  shows it there.

Targets (issue 4) are evaluated at the smallest nprobe where every engine compared reaches
recall@k >= 0.90 (FAISS in memory and on disk share centroids, so they share recall).

Generated data
--------------
:func:`diskivf.demo.clustered` with ``nclusters = n / 100`` (clusters of ~100 points) and
``separation = 1.4``. At that density the recall curve depends on scale roughly like real
embeddings: with FAISS IVF-Flat and ~1000 points per list, recall@10 reaches 0.90 at nprobe
~4 of 64 lists (64k points), ~8 of 256 (256k) and ~10 of 512 (512k), which extrapolates to
nprobe ~16 of 1024 lists at 1M x 128, the middle of the 1..128 sweep. Well separated clusters
(``--separation 4``) make every nprobe look perfect; ``--separation 1.0`` moves the 0.90 point
to a few times more lists.

Output
------
Tables on stdout (progress on stderr); ``results.json``, ``recall_qps.png`` and a ``cache/``
of generated data and ground truth in ``--out`` (default ``./bench-out``). The cache is reused
by later runs with the same parameters; the index directories are rebuilt every run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
from diskivf.demo import clustered, recall_at_k
from diskivf.index import open_index
from diskivf.io import HDF5_SUFFIXES, open_vectors

ENGINES = ("diskivf", "faiss-mem", "faiss-disk")
RECALL_TARGET = 0.90
TRAIN_POINTS_PER_LIST = 256  # FAISS's max_points_per_centroid default
POINTS_PER_CLUSTER = 100
BENCH_EXTRA = 'pip install "diskivf[bench]"'
SCHEMA = 1

DEFAULTS: dict[str, Any] = {
    "n": 1_000_000,
    "dim": 128,
    "nlist": 1024,
    "nq": 1000,
    "k": 10,
    "nprobe": "1,2,4,8,16,32,64,128",
    "threads": "1,2",
    "repeats": 1,
    "rounds": 3,
    "single": 200,
    "separation": 1.4,
}
QUICK: dict[str, Any] = {
    "n": 100_000,
    "dim": 64,
    "nlist": 256,
    "nq": 200,
    "k": 10,
    "nprobe": "1,4,16,64",
    "threads": "1,2",
    "repeats": 1,
    "rounds": 1,
    "single": 100,
    "separation": 1.4,
}

MB = 1 << 20
WARMUP_QUERIES = 200


class BenchError(RuntimeError):
    """A benchmark step failed (bad arguments, a worker died)."""


def log(msg: str) -> None:
    """Progress message on stderr (tables and results go to stdout)."""
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ optional imports


def optional_import(name: str, purpose: str) -> Any:
    """Import an optional dependency; on ImportError say what is skipped and return None."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        log(f"note: {name} is not installed ({exc}); {purpose} ({BENCH_EXTRA})")
        return None


def _installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, without importing it; None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _quiet_import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ------------------------------------------------------------------------ process accounting


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of a process in bytes (empty off Linux)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def cpu_ticks() -> list[int] | None:
    """The machine's CPU time counters (``/proc/stat``'s ``cpu`` line, in clock ticks): user,
    nice, system, idle, iowait, irq, softirq, steal; None where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        if fields[0] != "cpu" or len(fields) < 9:
            return None
        return [int(v) for v in fields[1:9]]
    except (OSError, ValueError, IndexError):
        return None


def steal_share(spent: list[int]) -> float | None:
    """Share of the virtual CPUs' time in ``spent`` (differences of :func:`cpu_ticks`
    readings) that the hypervisor ran something else instead (steal): slow spells of a
    shared machine show here. None if no time passed."""
    total = sum(spent)
    return spent[7] / total if total > 0 else None


def ticks_since(before: list[int] | None) -> list[int] | None:
    """The CPU counters spent from the ``before`` reading of :func:`cpu_ticks` until now."""
    after = cpu_ticks()
    if before is None or after is None:
        return None
    return [b - a for a, b in zip(before, after, strict=True)]


def steal_since(before: list[int] | None) -> float | None:
    """:func:`steal_share` from the ``before`` reading of :func:`cpu_ticks` until now."""
    spent = ticks_since(before)
    return None if spent is None else steal_share(spent)


def steal_text(share: float | None) -> str:
    """``steal 12%``, or ``steal n/a`` where the counters cannot be read."""
    return "steal n/a" if share is None else f"steal {share:.0%}"


def steal_cell(share: float | None) -> str:
    """A table cell five wide: `` 12%``, or ``  n/a`` where the counters cannot be read or
    no CPU tick passed (a fast machine, a small index)."""
    return "  n/a" if share is None else f"{share:5.0%}"


def storage_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage (``/proc/self/io``), or None."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def evict(paths: Sequence[str | Path]) -> None:
    """Drop files from the page cache: fsync (dirty pages cannot be dropped), then fadvise.

    Pages still mapped by a live mapping are not dropped, so callers close their index first.
    """
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc: Any = None


def resident_fraction(paths: Sequence[str | Path]) -> float | None:
    """Fraction of the files' pages in the page cache (``mincore``), or None if unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _libc.mincore.restype = ctypes.c_int
        page = mmap.PAGESIZE
        total = resident = 0
        for p in paths:
            size = os.path.getsize(p)
            if size == 0:
                continue
            npages = (size + page - 1) // page
            vec = np.zeros(npages, np.uint8)
            with open(p, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
                view = np.frombuffer(mm, np.uint8)
                rc = _libc.mincore(view.ctypes.data, size, vec.ctypes.data)
                del view
            if rc != 0:
                return None
            resident += int(np.count_nonzero(vec & 1))
            total += npages
    except (OSError, AttributeError, ValueError):
        return None
    return resident / total if total else 0.0


def files_under(path: str | Path) -> list[str]:
    """Every regular file of an index: the file itself, or all files below a directory."""
    p = Path(path)
    if p.is_file():
        return [str(p)]
    return sorted(str(f) for f in p.rglob("*") if f.is_file())


def disk_bytes(paths: Sequence[str | Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)


# ------------------------------------------------------------------------ statistics


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile_ms(lat_s: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(lat_s), q) * 1e3) if len(lat_s) else float("nan")


# ------------------------------------------------------------------------ ground truth


def exact_topk(
    base: Any,
    queries: NDArray[np.float32],
    k: int,
    metric: str,
    *,
    block_rows: int = 16384,
    query_block: int = 1024,
    progress: Callable[[int, int], None] | None = None,
) -> NDArray[np.int64]:
    """Exact top-``k`` row numbers of ``base`` per query by blocked brute force.

    ``base`` is any row-sliceable ``(n, dim)`` array (a memory map is read one block at a
    time); each block is scored against a block of queries with one GEMM and merged into a
    running top-k, so memory stays near ``query_block * block_rows * 8`` bytes.
    """
    n = base.shape[0]
    q_all = np.array(queries, dtype=np.float32)
    if metric == "cosine":
        q_all /= np.maximum(np.linalg.norm(q_all, axis=1, keepdims=True), 1e-30)
    out = np.empty((len(q_all), k), np.int64)
    steps = ((len(q_all) + query_block - 1) // query_block) * ((n + block_rows - 1) // block_rows)
    done = 0
    for qa in range(0, len(q_all), query_block):
        q = q_all[qa : qa + query_block]
        best_s = np.full((len(q), 0), np.inf, np.float32)
        best_i = np.full((len(q), 0), -1, np.int64)
        for a in range(0, n, block_rows):
            xb = np.array(base[a : a + block_rows], dtype=np.float32)
            if metric == "cosine":
                xb /= np.maximum(np.linalg.norm(xb, axis=1, keepdims=True), 1e-30)
            s = q @ xb.T
            if metric == "l2":
                s *= -2.0
                s += np.einsum("ij,ij->i", xb, xb)
            else:
                np.negative(s, out=s)
            cand_s = np.concatenate([best_s, s], axis=1)
            cand_i = np.concatenate(
                [best_i, np.broadcast_to(np.arange(a, a + len(xb)), s.shape)], axis=1
            )
            if cand_s.shape[1] > k:
                part = np.argpartition(cand_s, k - 1, axis=1)[:, :k]
                cand_s = np.take_along_axis(cand_s, part, axis=1)
                cand_i = np.take_along_axis(cand_i, part, axis=1)
            best_s, best_i = cand_s, cand_i
            done += 1
            if progress is not None:
                progress(done, steps)
        order = np.argsort(best_s, axis=1, kind="stable")
        top = np.take_along_axis(best_i, order, axis=1)
        if top.shape[1] < k:
            top = np.concatenate([top, np.full((len(q), k - top.shape[1]), -1)], axis=1)
        out[qa : qa + query_block] = top
    return out


# ------------------------------------------------------------------------ datasets


def _save_npy_atomic(path: Path, arr: NDArray[Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _ground_truth(
    base: Any, queries: NDArray[np.float32], k: int, metric: str, path: Path
) -> tuple[str, float]:
    """Compute and cache exact ground truth at ``path`` unless it is cached already."""
    if path.exists():
        log(f"ground truth: cached {path}")
        return "cached", 0.0
    log(f"ground truth: exact brute force, {len(queries)} queries x {base.shape[0]} rows ...")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            log(f"  ground truth {100 * done // total}%")

    t0 = time.perf_counter()
    gt = exact_topk(base, queries, k, metric, progress=progress)
    secs = time.perf_counter() - t0
    _save_npy_atomic(path, gt)
    log(f"ground truth: {secs:.1f} s, cached in {path}")
    return "computed", secs


def prepare_generated(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    n, dim, nq = args.n, args.dim, args.nq
    ncl = args.nclusters or max(1, n // POINTS_PER_CLUSTER)
    key = f"clustered-n{n}-d{dim}-q{nq}-c{ncl}-s{args.separation:g}-seed{args.seed}"
    base_path = cache / f"{key}.base.npy"
    queries_path = cache / f"{key}.queries.npy"
    gen_s = 0.0
    if base_path.exists() and queries_path.exists():
        log(f"data: cached {base_path}")
    else:
        log(f"data: generating {n} x {dim} clustered vectors ({ncl} clusters) ...")
        t0 = time.perf_counter()
        x, q = clustered(n, dim, nq=nq, nclusters=ncl, seed=args.seed, separation=args.separation)
        _save_npy_atomic(base_path, x)
        _save_npy_atomic(queries_path, q)
        del x
        gen_s = time.perf_counter() - t0
        log(f"data: {gen_s:.1f} s")
    metric = args.metric or "l2"
    base = np.load(base_path, mmap_mode="r")
    queries = np.load(queries_path)
    gt_path = cache / f"{key}.gt-{metric}-k{args.k}.npy"
    gt_source, gt_s = _ground_truth(base, queries, args.k, metric, gt_path)
    del base
    return {
        "name": f"clustered {n}x{dim}",
        "source": "generated",
        "generator": {
            "function": "diskivf.demo.clustered",
            "nclusters": ncl,
            "separation": args.separation,
            "seed": args.seed,
            "seconds": gen_s,
        },
        "base_path": str(base_path),
        "base_dataset": None,
        "n": n,
        "dim": dim,
        "nq": nq,
        "k": args.k,
        "metric": metric,
        "queries_path": str(queries_path),
        "gt_path": str(gt_path),
        "gt_source": gt_source,
        "gt_seconds": gt_s,
    }


def _is_hdf5(path: str) -> bool:
    return Path(path).suffix.lower() in HDF5_SUFFIXES


def _file_key(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, str) and os.path.exists(p):
            st = os.stat(p)
            p = f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns}"
        h.update(repr(p).encode())
    return h.hexdigest()[:12]


def _hdf5_metric(path: str) -> str | None:
    h5py = _quiet_import("h5py")
    if h5py is None:
        return None
    with h5py.File(path, "r") as f:
        dist = f.attrs.get("distance")
    if isinstance(dist, bytes):
        dist = dist.decode()
    return {"euclidean": "l2", "angular": "cosine", "dot": "ip", "ip": "ip"}.get(str(dist))


def prepare_file(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    data = str(args.data)
    h5 = _is_hdf5(data)
    base_dataset = "train" if h5 else None
    base = open_vectors(data, dataset=base_dataset)
    if len(base.shape) != 2:
        raise BenchError(f"{data}: expected 2-D vectors but found shape {base.shape}")
    total, dim = int(base.shape[0]), int(base.shape[1])
    metric = args.metric or (_hdf5_metric(data) if h5 else None) or "l2"
    holdout = 0
    if args.queries:
        qsrc: Any = open_vectors(args.queries, dataset="test" if _is_hdf5(args.queries) else None)
        qdesc = str(args.queries)
    elif h5:
        qsrc = open_vectors(data, dataset="test")
        qdesc = f"{data}:test"
    else:
        holdout = min(args.nq, total // 2)
        qsrc = base[total - holdout :]
        qdesc = f"last {holdout} rows of {data} (held out of the base)"
    n = total - holdout
    if args.n is not None:
        n = min(n, args.n)
    nq = min(args.nq, int(qsrc.shape[0]))
    if nq < 1 or n < args.nlist:
        raise BenchError(f"{data}: need at least nlist={args.nlist} rows and 1 query")
    if qsrc.shape[1] != dim:
        raise BenchError(f"queries have dimension {qsrc.shape[1]} but the base has {dim}")
    key = f"{Path(data).stem}-{_file_key(data, args.queries, n, nq, holdout)}"
    queries = np.array(qsrc[:nq], dtype=np.float32)
    queries_path = cache / f"{key}.queries.npy"
    _save_npy_atomic(queries_path, queries)
    gt_path = cache / f"{key}.gt-{metric}-k{args.k}.npy"
    given = None
    if args.gt:
        given, gdesc = open_vectors(args.gt), str(args.gt)
    elif h5 and not args.queries:
        given, gdesc = open_vectors(data, dataset="neighbors"), f"{data}:neighbors"
    gt_source, gt_s = "computed", 0.0
    if given is not None and n < total - holdout:
        log(f"ground truth: ignoring {gdesc}, which covers all {total} rows, not the first {n}")
        given = None
    if given is not None and (given.shape[0] < nq or given.shape[1] < args.k):
        log(f"ground truth: ignoring {gdesc} of shape {given.shape}: need ({nq}, >= {args.k})")
        given = None
    if given is not None:
        # Rows first, then columns: a VectorSource promises only row slicing.
        _save_npy_atomic(gt_path, np.asarray(given[:nq][:, : args.k], dtype=np.int64))
        gt_source = f"given ({gdesc})"
    else:
        gt_source, gt_s = _ground_truth(base[:n], queries, args.k, metric, gt_path)
    return {
        "name": Path(data).name,
        "source": data,
        "queries_source": qdesc,
        "base_path": str(Path(data).resolve()),
        "base_dataset": base_dataset,
        "n": n,
        "dim": dim,
        "nq": nq,
        "k": args.k,
        "metric": metric,
        "queries_path": str(queries_path),
        "gt_path": str(gt_path),
        "gt_source": gt_source,
        "gt_seconds": gt_s,
    }


def open_base(ds: dict[str, Any]) -> Any:
    """The dataset's base rows in a worker: a memory map where possible, else an array."""
    src = open_vectors(ds["base_path"], dataset=ds["base_dataset"])
    rows = src[: ds["n"]]
    if isinstance(rows, np.ndarray):
        return rows
    return np.asarray(rows, dtype=np.float32)  # h5py reads on slicing


def train_rows(n: int, nlist: int, seed: int) -> NDArray[np.int64]:
    """Sorted row numbers of the training sample shared by every engine."""
    size = nlist * TRAIN_POINTS_PER_LIST
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def touch(x: Any, block: int = 1 << 16) -> None:
    """Read every row once so that file pages are in the page cache before timing."""
    for a in range(0, x.shape[0], block):
        np.asarray(x[a : a + block]).sum()


# ------------------------------------------------------------------------ workers


def worker_machine(task: dict[str, Any]) -> dict[str, Any]:
    """Single-thread reference figures (the parent runs this with BLAS limited to 1 thread)."""
    out: dict[str, Any] = {}
    m = int(task["gemm_size"])
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, m), dtype=np.float32)
    b = rng.standard_normal((m, m), dtype=np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    out["sgemm_gflops_1t"] = 2 * m**3 / best / 1e9
    nbytes = int(task["bandwidth_bytes"])
    x = rng.standard_normal(nbytes // 4, dtype=np.float32)
    y = np.empty_like(x)
    np.copyto(y, x)
    out["read_gbps_1t"] = nbytes / min(_timed(lambda: x.sum()) for _ in range(3)) / 1e9
    out["copy_gbps_1t"] = 2 * nbytes / min(_timed(lambda: np.copyto(y, x)) for _ in range(3)) / 1e9
    mat = x.reshape(-1, 128)
    v = rng.standard_normal(128, dtype=np.float32)
    out["sgemv_gbps_1t"] = nbytes / min(_timed(lambda: mat @ v) for _ in range(3)) / 1e9
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _imbalance(sizes: NDArray[Any]) -> float:
    """FAISS's imbalance factor: 1.0 for equal lists, larger when a few lists dominate."""
    s = sizes.astype(np.float64)
    tot = s.sum()
    return float(len(s) * (s * s).sum() / (tot * tot)) if tot else float("nan")


def worker_build_diskivf(task: dict[str, Any]) -> dict[str, Any]:
    ds = task["dataset"]
    base = open_base(ds)
    sample = np.asarray(base[train_rows(ds["n"], task["nlist"], task["seed"])], np.float32)
    touch(base)
    train_s: list[float] = []
    add_s: list[float] = []
    info: Any = None
    for r in range(task["build_repeats"]):
        with open_index(
            task["path"], mode="w", dim=ds["dim"], nlist=task["nlist"], metric=ds["metric"]
        ) as index:
            t0 = time.perf_counter()
            info = index.train(sample, seed=task["seed"])
            t1 = time.perf_counter()
            index.add(base)
            t2 = time.perf_counter()
            sizes = index.list_sizes()
            ntotal = index.ntotal
        train_s.append(t1 - t0)
        add_s.append(t2 - t1)
        log(
            f"  diskivf build {r + 1}/{task['build_repeats']}: train {t1 - t0:.2f} s, "
            f"add {t2 - t1:.2f} s"
        )
    files = files_under(task["path"])
    return {
        "train_s_runs": train_s,
        "add_s_runs": add_s,
        "train_points": len(sample),
        "kmeans_iterations": getattr(info, "niter", None),
        "ntotal": ntotal,
        "index_bytes": disk_bytes(files),
        "index_files": len(files),
        "imbalance": _imbalance(sizes),
    }


def _faiss_metric(faiss: Any, metric: str) -> Any:
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def worker_build_faiss(task: dict[str, Any]) -> dict[str, Any]:
    # Any: faiss's SWIG objects carry attributes its stubs (when installed) do not list.
    faiss: Any = importlib.import_module("faiss")

    ds = task["dataset"]
    metric = ds["metric"]
    x = np.array(open_base(ds), dtype=np.float32, order="C")  # FAISS holds its rows in memory
    if metric == "cosine":
        faiss.normalize_L2(x)
    sample = np.ascontiguousarray(x[train_rows(ds["n"], task["nlist"], task["seed"])])
    dim, nlist = ds["dim"], task["nlist"]
    train_s: list[float] = []
    add_s: list[float] = []
    index: Any = None
    for r in range(task["build_repeats"]):
        quantizer = faiss.IndexFlatL2(dim) if metric == "l2" else faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, _faiss_metric(faiss, metric))
        index.own_fields = True
        quantizer.this.disown()
        index.cp.seed = task["seed"]
        t0 = time.perf_counter()
        index.train(sample)
        t1 = time.perf_counter()
        index.add(x)
        t2 = time.perf_counter()
        train_s.append(t1 - t0)
        add_s.append(t2 - t1)
        log(
            f"  faiss build {r + 1}/{task['build_repeats']}: train {t1 - t0:.2f} s, "
            f"add {t2 - t1:.2f} s"
        )
    sizes = np.array([index.invlists.list_size(i) for i in range(nlist)])
    faiss.write_index(index, task["mem_path"])
    # The on-disk variant: the same trained index with its lists merged into an
    # OnDiskInvertedLists file (what faiss.contrib.ondisk.merge_ondisk does).
    for p in (task["disk_path"], task["disk_data_path"]):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    t0 = time.perf_counter()
    invlists = faiss.OnDiskInvertedLists(nlist, index.code_size, task["disk_data_path"])
    vec = faiss.InvertedListsPtrVector()
    vec.push_back(index.invlists)
    invlists.merge_from_multiple(vec.data(), vec.size(), False)
    index.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(index, task["disk_path"])
    convert_s = time.perf_counter() - t0
    return {
        "train_s_runs": train_s,
        "add_s_runs": add_s,
        "train_points": len(sample),
        "kmeans_iterations": int(index.cp.niter),
        "ntotal": int(index.ntotal),
        "omp_threads": int(faiss.omp_get_max_threads()),
        "mem_index_bytes": os.path.getsize(task["mem_path"]),
        "disk_index_bytes": disk_bytes([task["disk_path"], task["disk_data_path"]]),
        "ondisk_convert_s": convert_s,
        "imbalance": _imbalance(sizes),
    }


class Engine:
    """What the search benchmark needs from an engine."""

    name = ""
    itemsize = 4
    stats_free = False  # counting the work costs nothing: the stats run can be a timed run
    cold_capable = True
    threads_mode = ""
    index: Any  # the engine's open index (None once closed); open() sets it

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def splits(self) -> int | None:
        """Single queries split over threads so far, where the engine tells."""
        return None

    def files(self) -> list[str]:
        raise NotImplementedError

    def threads(self, t: int) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def searcher(self, k: int, nprobe: int, t: int) -> Callable[[NDArray[np.float32]], Any]:
        """A callable ``f(queries) -> ids`` with everything but the queries bound."""
        raise NotImplementedError

    def search_stats(
        self, q: NDArray[np.float32], k: int, nprobe: int, t: int
    ) -> tuple[NDArray[np.int64], int | None, int | None]:
        """``(ids, vectors_scanned, bytes_touched)`` of one batch."""
        raise NotImplementedError


def record_splits(workers: Any, choose: Callable[[Any, int], bool] | None = None) -> list[bool]:
    """Make ``workers.should_split`` (diskivf's ``Workers`` class) append each choice to the
    list returned; ``choose(self, nbytes)``, when given, makes the choice instead."""
    decide = workers.should_split if choose is None else choose
    chosen: list[bool] = []

    def counted(self: Any, nbytes: int) -> bool:
        chosen.append(bool(decide(self, nbytes)))
        return chosen[-1]

    workers.should_split = counted
    return chosen


class DiskivfEngine(Engine):
    name = "diskivf"

    def __init__(self, path: str, *, limit_blas: bool = False) -> None:
        self.path = path
        self.open()
        params = inspect.signature(self.index.search).parameters
        self.has_threads = "threads" in params
        self.has_stats = "stats" in params
        self.itemsize = int(self.index.dtype.itemsize)
        self.limit_blas = limit_blas or not self.has_threads
        self.controller: Any = None
        if self.limit_blas:
            tpc = optional_import("threadpoolctl", "diskivf runs with BLAS's default threads")
            self.controller = tpc.ThreadpoolController() if tpc is not None else None
        # Count the split choices of threads=2 single queries (diskivf._threads, where the
        # version has it), to tell a pass where splits did not pay from one not split.
        self._splits: list[bool] | None = None
        try:
            workers: Any = importlib.import_module("diskivf._threads").Workers
        except (ImportError, AttributeError):
            workers = None
        if getattr(workers, "should_split", None) is not None:
            self._splits = record_splits(workers)
        modes = ["search(threads=t)"] if self.has_threads else []
        if self.limit_blas:
            modes.append("BLAS limit" if self.controller is not None else "BLAS unlimited")
        self.threads_mode = " + ".join(modes)

    def open(self) -> None:
        self.index = open_index(self.path, "r")

    def close(self) -> None:
        self.index.close()
        self.index = None
        gc.collect()  # the list maps are released when their arrays are collected

    def files(self) -> list[str]:
        return files_under(self.path)

    def splits(self) -> int | None:
        return None if self._splits is None else sum(self._splits)

    def threads(self, t: int) -> contextlib.AbstractContextManager[Any]:
        if not self.limit_blas or self.controller is None:
            return contextlib.nullcontext()
        return self.controller.limit(limits=t, user_api="blas")  # type: ignore[no-any-return]

    def searcher(self, k: int, nprobe: int, t: int) -> Callable[[NDArray[np.float32]], Any]:
        search = self.index.search
        if self.has_threads:
            return lambda q: search(q, k, nprobe=nprobe, threads=t).ids
        return lambda q: search(q, k, nprobe=nprobe).ids

    def search_stats(
        self, q: NDArray[np.float32], k: int, nprobe: int, t: int
    ) -> tuple[NDArray[np.int64], int | None, int | None]:
        if not self.has_stats:
            return self.searcher(k, nprobe, t)(q), None, None
        kw: dict[str, Any] = {"threads": t} if self.has_threads else {}
        res, st = self.index.search(q, k, nprobe=nprobe, stats=True, **kw)
        return (
            res.ids,
            getattr(st, "vectors_scanned", None),
            getattr(st, "bytes_touched", None),
        )


class FaissEngine(Engine):
    def __init__(self, name: str, paths: list[str], prefetch_threads: int | None = None) -> None:
        """``prefetch_threads`` sets the on-disk lists' ``prefetch_nthread`` (None: FAISS's
        default)."""
        self.faiss: Any = importlib.import_module("faiss")  # Any: as in worker_build_faiss
        self.name = name
        self.paths = paths
        self.prefetch_threads = prefetch_threads
        self.cold_capable = name == "faiss-disk"
        self.stats_free = True
        self.threads_mode = "omp_set_num_threads"
        self.index: Any = None
        self.ivf: Any = None
        self.open()

    def open(self) -> None:
        self.index = self.faiss.read_index(self.paths[0])
        self.ivf = self.faiss.extract_index_ivf(self.index)
        if self.name == "faiss-disk":
            # Every search starts up to prefetch_nthread threads, one per probed list, each
            # reading its list; they run besides the OpenMP threads, so the report names them.
            lists = self.faiss.downcast_InvertedLists(self.ivf.invlists)
            if self.prefetch_threads is not None:
                lists.prefetch_nthread = self.prefetch_threads
            self.threads_mode = (
                f"omp_set_num_threads + up to {lists.prefetch_nthread} prefetch threads"
            )

    def close(self) -> None:
        self.index = self.ivf = None
        gc.collect()

    def files(self) -> list[str]:
        return list(self.paths)

    @contextlib.contextmanager
    def _omp(self, t: int) -> Iterator[None]:
        old = self.faiss.omp_get_max_threads()
        self.faiss.omp_set_num_threads(t)
        try:
            yield
        finally:
            self.faiss.omp_set_num_threads(old)

    def threads(self, t: int) -> contextlib.AbstractContextManager[Any]:
        return self._omp(t)

    def searcher(self, k: int, nprobe: int, t: int) -> Callable[[NDArray[np.float32]], Any]:
        self.ivf.nprobe = nprobe
        search = self.index.search
        return lambda q: search(q, k)[1]

    def search_stats(
        self, q: NDArray[np.float32], k: int, nprobe: int, t: int
    ) -> tuple[NDArray[np.int64], int | None, int | None]:
        stats = self.faiss.cvar.indexIVF_stats
        stats.reset()
        ids = self.searcher(k, nprobe, t)(q)
        return ids, int(stats.ndis), None


def _run_singles(fn: Callable[[Any], Any], singles: Sequence[Any]) -> tuple[list[float], Any]:
    lat = []
    found = []
    clock = time.perf_counter
    for qi in singles:
        t0 = clock()
        ids = fn(qi)
        lat.append(clock() - t0)
        found.append(ids)
    return lat, np.concatenate(found) if found else None


def _warm_rows(
    engine: Engine, q: NDArray[np.float32], gt: NDArray[np.int64], task: dict[str, Any], t: int
) -> list[dict[str, Any]]:
    k, repeats = task["k"], task["repeats"]
    singles = [q[i : i + 1] for i in range(min(task["single"], len(q)))]
    nq, dim = len(q), q.shape[1]
    rows = []
    # Warm-up: a few hundred queries at the largest nprobe map and touch most lists. Then
    # one single query: a process's first one can carry one-time costs of its own (diskivf
    # loads numba for its compiled single-query scan then), which are logged, not timed.
    warm = engine.searcher(k, max(task["nprobes"]), t)
    warm(q[:WARMUP_QUERIES])
    t0 = time.perf_counter()
    warm(q[:1])
    log(f"  {engine.name} t={t}: warm-up single query {1e3 * (time.perf_counter() - t0):.1f} ms")
    for p in task["nprobes"]:
        t0 = time.perf_counter()
        ids, scanned, touched = engine.search_stats(q, k, p, t)
        stats_s = time.perf_counter() - t0
        recall = recall_at_k(ids, gt)
        fn = engine.searcher(k, p, t)
        # FAISS counts its work whether asked or not, so that run is a timed run as well.
        batch = [nq / stats_s] if engine.stats_free else []
        batch += [nq / _timed(functools.partial(fn, q)) for _ in range(repeats - len(batch))]
        lat: list[float] = []
        sqps = []
        found = None
        r0 = storage_read_bytes()
        s0 = engine.splits()
        for _ in range(repeats):
            run, found = _run_singles(fn, singles)
            lat += run
            sqps.append(len(run) / sum(run))
        r1 = storage_read_bytes()
        s1 = engine.splits()
        bpq = scanned * dim * engine.itemsize / nq if scanned is not None else None
        row = {
            "engine": engine.name,
            "threads": t,
            "nprobe": p,
            "recall": recall,
            "recall_single": recall_at_k(found, gt[: len(singles)]) if found is not None else None,
            "vectors_per_query": scanned / nq if scanned is not None else None,
            "bytes_per_query": bpq,
            "touched_bytes_per_query": touched / nq if touched is not None else None,
            "batch_qps": median(batch),
            "batch_qps_runs": batch,
            "single_qps": median(sqps),
            "single_qps_runs": sqps,
            "single_p50_ms": percentile_ms(lat, 50),
            "single_p99_ms": percentile_ms(lat, 99),
            "single_split_share": _share(s0, s1, len(lat)),
            # Reads from storage during warm passes mean the page cache lost index pages
            # (memory pressure, proactive reclaim): they explain outliers in p99.
            "single_warm_read_bytes": None if r0 is None or r1 is None else r1 - r0,
            "batch_scan_gbps": bpq * median(batch) / 1e9 if bpq is not None else None,
            "single_scan_gbps": bpq * median(sqps) / 1e9 if bpq is not None else None,
            "cold": None,
        }
        rows.append(row)
        split = row["single_split_share"]
        log(
            f"  {engine.name} t={t} nprobe={p}: recall {recall:.3f}, batch {row['batch_qps']:.0f}"
            f" QPS, single {row['single_qps']:.0f} QPS"
            + (f" ({split:.0%} split)" if split is not None and t > 1 else "")
        )
    return rows


def _share(before: int | None, after: int | None, queries: int) -> float | None:
    """Share of ``queries`` split between two readings of :meth:`Engine.splits`."""
    if before is None or after is None or not queries:
        return None
    return (after - before) / queries


def _cold_open(engine: Engine, prefetch: bool = False) -> tuple[float | None, float]:
    engine.close()
    files = engine.files()
    evict(files)
    resident = resident_fraction(files)
    t0 = time.perf_counter()
    engine.open()
    if prefetch and hasattr(engine.index, "prefetch"):
        # diskivf's setting for readers whose cache is evicted under them: madvise(WILLNEED)
        # every probed list on every search, not only newly mapped ones (the default).
        engine.index.prefetch = True
    return resident, time.perf_counter() - t0


def _cold(
    engine: Engine, q: NDArray[np.float32], task: dict[str, Any], t: int, p: int
) -> dict[str, Any]:
    k = task["k"]
    singles = [q[i : i + 1] for i in range(min(task["single"], len(q)))]
    qps, first, lat, reads, opens, resid = [], [], [], [], [], []
    s0 = engine.splits()
    for _ in range(task["repeats"]):
        r0 = storage_read_bytes()
        resident, open_s = _cold_open(engine, task.get("cold_prefetch_all", False))
        run, _ = _run_singles(engine.searcher(k, p, t), singles)
        r1 = storage_read_bytes()
        qps.append(len(run) / sum(run))
        first.append(run[0])
        lat += run
        opens.append(open_s)
        resid.append(resident)
        if r0 is not None and r1 is not None:
            reads.append(r1 - r0)
    s1 = engine.splits()
    r0 = storage_read_bytes()
    resident, _ = _cold_open(engine, task.get("cold_prefetch_all", False))
    fn = engine.searcher(k, p, t)
    qb = q[: len(singles)]  # the same queries as the single-query passes, as one batch
    batch_s = _timed(lambda: fn(qb))
    r1 = storage_read_bytes()
    if hasattr(engine.index, "prefetch"):
        engine.index.prefetch = False  # warm passes run with the default
    known = [x for x in resid if x is not None]
    return {
        "single_qps": median(qps),
        "single_qps_runs": qps,
        "single_p50_ms": percentile_ms(lat, 50),
        "single_p99_ms": percentile_ms(lat, 99),
        "single_split_share": _share(s0, s1, len(lat)),
        "first_ms": median(first) * 1e3,
        "open_ms": median(opens) * 1e3,
        "single_read_bytes": median(reads) if reads else None,
        "resident_after_evict": max(known) if known else None,
        "batch_qps": len(qb) / batch_s,
        "batch_read_bytes": r1 - r0 if r0 is not None and r1 is not None else None,
    }


def open_engine(name: str, paths: list[str], task: dict[str, Any]) -> Engine:
    """Engine ``name`` ("diskivf", "faiss-mem" or "faiss-disk") opened on its index files,
    with the options of ``task`` (``limit_blas``, ``faiss_disk_prefetch_threads``)."""
    if name == "diskivf":
        return DiskivfEngine(paths[0], limit_blas=task["limit_blas"])
    return FaissEngine(name, paths, task.get("faiss_disk_prefetch_threads"))


def worker_search(task: dict[str, Any]) -> dict[str, Any]:
    baseline = proc_status().get("RssAnon")
    q = np.load(task["queries_path"]).astype(np.float32)
    gt = np.load(task["gt_path"])[:, : task["k"]]
    name = task["engine"]
    engine = open_engine(name, task["paths"], task)
    if isinstance(engine, FaissEngine) and task["metric"] == "cosine":
        engine.faiss.normalize_L2(q)
    opened = proc_status().get("RssAnon")
    rows = []
    for t in task["threads"]:
        with engine.threads(t):
            trows = _warm_rows(engine, q, gt, task, t)
            if task["cold"] and engine.cold_capable:
                for row in trows:
                    row["cold"] = _cold(engine, q, task, t, row["nprobe"])
                    c = row["cold"]
                    split = c["single_split_share"]
                    log(
                        f"  {name} t={t} nprobe={row['nprobe']} cold: single "
                        f"{c['single_qps']:.0f} QPS, batch {c['batch_qps']:.0f} QPS"
                        + (f" ({split:.0%} split)" if split is not None and t > 1 else "")
                    )
        rows += trows
    engine.close()
    return {
        "rows": rows,
        "threads_mode": engine.threads_mode,
        "anon_at_start_bytes": baseline,
        "anon_after_open_bytes": opened,
    }


def balanced_orders(n: int) -> list[tuple[int, ...]]:
    """Orders of ``n`` engines, one per query, to be used in turn: run end to end and from
    the last back to the first, every engine follows every other one exactly once and none
    follows itself (for ``n > 1``).

    A plain rotation (0 1 2, 1 2 0, 2 0 1, ...) lets engine 0 follow engine 2 twice as often
    as engine 1 does; an engine whose search leaves work behind (FAISS's on-disk prefetch
    threads) would then slow one engine more than another. The cycle is ``n - 1`` orders
    long, found by a depth-first search that takes a few microseconds for the engines here.
    """
    if n < 1:
        raise ValueError(f"expected at least one engine, got {n}")
    total = n * (n - 1)  # one visit per ordered pair of distinct engines

    def extend(seq: list[int], used: set[tuple[int, int]]) -> list[int] | None:
        if len(seq) == total:
            return seq if (seq[-1], seq[0]) not in used else None
        taken = set(seq[len(seq) - len(seq) % n :])  # engines already in this query's order
        for e in range(n):  # engines, not vectors
            if e in taken or (seq[-1], e) in used:
                continue
            used.add((seq[-1], e))
            found = extend([*seq, e], used)
            used.discard((seq[-1], e))
            if found is not None:
                return found
        return None

    seq = [0] if n == 1 else extend([0], set())
    if seq is None:  # pragma: no cover - one exists for every n > 1 (an Eulerian circuit)
        raise BenchError(f"no balanced order of {n} engines found")
    return [tuple(seq[i : i + n]) for i in range(0, len(seq), n)]


def worker_interleaved(task: dict[str, Any]) -> dict[str, Any]:
    """Single queries of every engine in one process, the engines' order changing from query
    to query (:func:`balanced_orders`), so that the machine's drift falls on all of them
    alike and each follows every other one equally often."""
    q = np.load(task["queries_path"]).astype(np.float32)
    engines = [open_engine(e, task["paths"][e], task) for e in task["engines"]]
    queries = {e.name: q for e in engines}
    faiss_engines = [e for e in engines if isinstance(e, FaissEngine)]
    if task["metric"] == "cosine" and faiss_engines:
        qn = q.copy()
        faiss_engines[0].faiss.normalize_L2(qn)
        queries.update({e.name: qn for e in faiss_engines})
    k, nq = task["k"], min(task["single"], len(q))
    clock = time.perf_counter
    orders = balanced_orders(len(engines))
    rows = []
    for t in task["threads"]:
        with contextlib.ExitStack() as stack:
            for e in engines:
                stack.enter_context(e.threads(t))
            for e in engines:  # as in _warm_rows: a batch, then one single query
                warm = e.searcher(k, max(task["nprobes"]), t)
                warm(queries[e.name][:WARMUP_QUERIES])
                warm(queries[e.name][:1])
            for p in task["nprobes"]:
                fns = [e.searcher(k, p, t) for e in engines]
                lat: list[list[float]] = [[] for _ in engines]
                # after[a][b]: engine a's times on queries that came right after engine b's
                after: list[list[list[float]]] = [[[] for _ in engines] for _ in engines]
                prev = None
                for i in range(nq):
                    for at in orders[i % len(orders)]:
                        qi = queries[engines[at].name][i : i + 1]
                        t0 = clock()
                        fns[at](qi)
                        dt = clock() - t0
                        lat[at].append(dt)
                        if prev is not None and prev != at:  # only one engine: itself
                            after[at][prev].append(dt)
                        prev = at
                for a, (e, run) in enumerate(zip(engines, lat, strict=True)):
                    row = {
                        "engine": e.name,
                        "threads": t,
                        "nprobe": p,
                        "single_qps_runs": [len(run) / sum(run)],
                        "single_p50_ms": percentile_ms(run, 50),
                        "single_p99_ms": percentile_ms(run, 99),
                    }
                    for b, other in enumerate(engines):
                        if after[a][b]:
                            row[f"after_{other.name}_qps_runs"] = [
                                len(after[a][b]) / sum(after[a][b])
                            ]
                    rows.append(row)
    for e in engines:
        e.close()
    return {"rows": rows}


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "machine": worker_machine,
    "build-diskivf": worker_build_diskivf,
    "build-faiss": worker_build_faiss,
    "search": worker_search,
    "interleaved": worker_interleaved,
}


def worker_main(argv: Sequence[str]) -> int:
    role, task_path, result_path = argv
    task = json.loads(Path(task_path).read_text())
    result = WORKERS[role](task)
    result["vmhwm_bytes"] = proc_status().get("VmHWM")
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    return 0


def _stdout_fd() -> int | None:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def run_worker(
    role: str,
    task: dict[str, Any],
    work: Path,
    *,
    tag: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a worker child; return its result plus sampled peak RSS / anonymous RSS."""
    tag = tag or role
    task_path, result_path = work / f"{tag}.task.json", work / f"{tag}.result.json"
    task_path.write_text(json.dumps(task, indent=1))
    with contextlib.suppress(FileNotFoundError):
        result_path.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", role]
    cmd += [str(task_path), str(result_path)]
    child_env = dict(os.environ)
    child_env.update(env or {})
    # FAISS and other C code print to stdout; keep stdout for our tables.
    proc = subprocess.Popen(cmd, stdout=_stdout_fd(), env=child_env)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        st = proc_status(proc.pid)
        peak_rss = max(peak_rss, st.get("VmRSS", 0))
        peak_anon = max(peak_anon, st.get("RssAnon", 0))
        time.sleep(0.005)
    if proc.returncode != 0 or not result_path.exists():
        raise BenchError(f"worker {tag!r} failed with exit code {proc.returncode} (see above)")
    result: dict[str, Any] = json.loads(result_path.read_text())
    result["peak_rss_bytes"] = max(peak_rss, result.get("vmhwm_bytes") or 0)
    result["peak_anon_bytes"] = peak_anon or None
    return result


# ------------------------------------------------------------------------ machine context


def machine_context(work: Path, *, small: bool) -> dict[str, Any]:
    """Versions, CPU, BLAS and reference GEMM / memory-bandwidth figures (smaller if small)."""
    ctx: dict[str, Any] = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "diskivf": diskivf.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "DISKIVF_JIT": os.environ.get("DISKIVF_JIT"),
        "numba": _installed_version("numba"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                ctx["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ctx["mem_total_gb"] = int(line.split()[1]) / (1 << 20)
    tpc = optional_import("threadpoolctl", "no BLAS details in the machine context")
    if tpc is not None:
        ctx["threadpoolctl"] = tpc.__version__
        ctx["blas"] = [
            {
                key: info.get(key)
                for key in (
                    "internal_api",
                    "version",
                    "architecture",
                    "num_threads",
                    "threading_layer",
                    "filepath",
                )
            }
            for info in tpc.threadpool_info()
            if info.get("user_api") == "blas"
        ]
    else:
        ctx["blas"] = None
    # All-threads SGEMM here (numpy's default threads), single-thread figures in a child with
    # BLAS pinned to one thread by environment.
    m = 1024 if small else 2048
    a = np.random.default_rng(0).standard_normal((m, m), dtype=np.float32)
    a @ a
    ctx["sgemm_gflops_all"] = 2 * m**3 / min(_timed(lambda: a @ a) for _ in range(3)) / 1e9
    one = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    res = run_worker(
        "machine",
        {"gemm_size": m, "bandwidth_bytes": (64 if small else 256) * MB},
        work,
        env=one,
    )
    for key in ("sgemm_gflops_1t", "read_gbps_1t", "copy_gbps_1t", "sgemv_gbps_1t"):
        ctx[key] = res[key]
    return ctx


def print_machine(ctx: dict[str, Any]) -> None:
    print("== machine")
    print(
        f"cpu: {ctx.get('cpu_model', '?')}, cpu_count {ctx['cpu_count']} "
        f"(affinity {ctx['cpu_affinity']}), memory {ctx.get('mem_total_gb', 0):.1f} GB"
    )
    print(
        f"python {ctx['python']}, numpy {ctx['numpy']}, diskivf {ctx['diskivf']}"
        + (f", faiss {ctx['faiss']}" if ctx.get("faiss") else "")
    )
    print(
        f"OPENBLAS_CORETYPE={ctx['OPENBLAS_CORETYPE']} "
        f"OPENBLAS_NUM_THREADS={ctx['OPENBLAS_NUM_THREADS']} "
        f"OMP_NUM_THREADS={ctx['OMP_NUM_THREADS']}"
    )
    # diskivf's single queries run its compiled scan when numba is installed (diskivf._jit).
    if ctx.get("numba") and ctx.get("DISKIVF_JIT") != "0":
        print(f"diskivf single-query scan: compiled (numba {ctx['numba']})")
    else:
        why = "DISKIVF_JIT=0" if ctx.get("numba") else "numba not installed"
        print(f"diskivf single-query scan: numpy's ({why})")
    if ctx["blas"] is None:
        print("blas: unknown (threadpoolctl not installed)")
    for b in ctx["blas"] or []:
        print(
            f"blas: {b['internal_api']} {b['version']} architecture={b['architecture']} "
            f"threads={b['num_threads']} ({b['threading_layer']}) "
            f"{Path(b['filepath'] or '').name}"
        )
    print(
        f"sgemm: {ctx['sgemm_gflops_1t']:.1f} GFLOP/s 1 thread, "
        f"{ctx['sgemm_gflops_all']:.1f} GFLOP/s all threads; memory (1 thread): "
        f"read {ctx['read_gbps_1t']:.1f} GB/s, copy {ctx['copy_gbps_1t']:.1f} GB/s, "
        f"sgemv {ctx['sgemv_gbps_1t']:.1f} GB/s"
    )


# ------------------------------------------------------------------------ reporting


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            if abs(v) >= 100:
                return f"{v:.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _mb(x: float | None) -> float | None:
    return None if x is None else x / MB


def print_build(build: dict[str, Any]) -> None:
    rows = []
    for eng, b in build.items():
        rows.append(
            [
                eng,
                b["train_s"],
                b["add_s"],
                b["train_s"] + b["add_s"],
                b.get("ondisk_convert_s"),
                b["train_points"],
                b["kmeans_iterations"],
                b["imbalance"],
                _mb(b["peak_rss_bytes"]),
                _mb(b["peak_anon_bytes"]),
                _mb(b["index_bytes"]),
            ]
        )
    print(
        table(
            [
                "engine",
                "train s",
                "add s",
                "train+add s",
                "to-disk s",
                "train pts",
                "iters",
                "imbalance",
                "peak RSS MB",
                "peak anon MB",
                "index MB",
            ],
            rows,
        )
    )


def print_search(rows: list[dict[str, Any]], k: int) -> None:
    print(
        table(
            [
                "engine",
                "thr",
                "nprobe",
                f"recall@{k}",
                "batch QPS",
                "1q QPS",
                "p50 ms",
                "p99 ms",
                "vec/q",
                "MB/q",
                "batch GB/s",
                "1q GB/s",
                "1q disk MB",
            ],
            [
                [
                    r["engine"],
                    r["threads"],
                    r["nprobe"],
                    r["recall"],
                    r["batch_qps"],
                    r["single_qps"],
                    r["single_p50_ms"],
                    r["single_p99_ms"],
                    r["vectors_per_query"],
                    _mb(r["bytes_per_query"]),
                    r["batch_scan_gbps"],
                    r["single_scan_gbps"],
                    _mb(r.get("single_warm_read_bytes")),
                ]
                for r in rows
            ],
        )
    )


def print_cold(rows: list[dict[str, Any]]) -> None:
    cold = [r for r in rows if r["cold"]]
    if not cold:
        return
    print(
        table(
            [
                "engine",
                "thr",
                "nprobe",
                "cold 1q QPS",
                "p50 ms",
                "p99 ms",
                "first ms",
                "open ms",
                "disk MB/pass",
                "resident%",
                "cold batch QPS",
                "batch disk MB",
            ],
            [
                [
                    r["engine"],
                    r["threads"],
                    r["nprobe"],
                    c["single_qps"],
                    c["single_p50_ms"],
                    c["single_p99_ms"],
                    c["first_ms"],
                    c["open_ms"],
                    _mb(c["single_read_bytes"]),
                    None if c["resident_after_evict"] is None else 100 * c["resident_after_evict"],
                    c["batch_qps"],
                    _mb(c["batch_read_bytes"]),
                ]
                for r in cold
                for c in [r["cold"]]
            ],
        )
    )


def print_interleaved(rows: list[dict[str, Any]]) -> None:
    shown = [r for r in rows if r.get("interleaved")]
    engines = [e for e in ENGINES if any(r["engine"] == e for r in shown)]
    # QPS over the queries that came right after each other engine's (blank for itself).
    after = [f"after_{e}_qps" for e in engines] if len(engines) > 1 else []
    print(
        table(
            ["engine", "thr", "nprobe", "1q QPS", "p50 ms", "p99 ms", "separate 1q QPS"]
            + [f"after {e}" for e in engines if after],
            [
                [
                    r["engine"],
                    r["threads"],
                    r["nprobe"],
                    r["interleaved"]["single_qps"],
                    r["interleaved"]["single_p50_ms"],
                    r["interleaved"]["single_p99_ms"],
                    r["single_qps"],
                ]
                + [r["interleaved"].get(key) for key in after]
                for r in shown
            ],
        )
    )


def _row(rows: list[dict[str, Any]], engine: str, t: int, p: int) -> dict[str, Any] | None:
    for r in rows:
        if r["engine"] == engine and r["threads"] == t and r["nprobe"] == p:
            return r
    return None


def operating_nprobe(rows: list[dict[str, Any]], engines: Sequence[str]) -> int | None:
    """Smallest nprobe at which every engine in ``engines`` reaches the recall target."""
    ok: dict[int, bool] = {}
    for r in rows:
        if r["engine"] in engines:
            ok[r["nprobe"]] = ok.get(r["nprobe"], True) and r["recall"] >= RECALL_TARGET
    passing = [p for p, good in sorted(ok.items()) if good]
    return passing[0] if passing else None


def _target(
    name: str, value: float | None, op: str, bound: float, detail: str, unit: str = "x"
) -> dict[str, Any]:
    if value is None or math.isnan(value):
        status = "N/A"
    elif op == ">=":
        status = "PASS" if value >= bound else "MISS"
    elif op == "<=":
        status = "PASS" if value <= bound else "MISS"
    else:
        status = "PASS" if value < bound else "MISS"
    return {
        "name": name,
        "value": value,
        "op": op,
        "bound": bound,
        "unit": unit,
        "status": status,
        "detail": detail,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _paired(a: Sequence[float] | None, b: Sequence[float] | None) -> list[float]:
    """Ratios ``a[i] / b[i]`` of two engines' timed runs, or none if they do not pair up.

    Both engines' runs are listed in round order, one (or ``--repeats``) per round, and the
    rounds alternate the engines, so run ``i`` of each was timed minutes apart: on a shared
    machine whose speed drifts over a run, these ratios show how much of a target's margin
    is the machine's. Runs of unequal count (an engine dropped mid-run) do not pair.
    """
    if not a or not b or len(a) != len(b) or not all(b):
        return []
    return [x / y for x, y in zip(a, b, strict=True)]


def _with_rounds(target: dict[str, Any], ratios: list[float]) -> dict[str, Any]:
    """``target`` with the per-round ``ratios`` (:func:`_paired`) and their range in its detail."""
    target["per_round"] = ratios
    if ratios:
        target["detail"] += f"; per round {min(ratios):.2f}-{max(ratios):.2f}x"
    return target


def evaluate_targets(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets as ratios with PASS / MISS / N/A."""
    rows = results["search"]
    build = results["build"]
    engines = sorted({r["engine"] for r in rows})
    have_faiss = "faiss-mem" in engines
    compared = ["diskivf", "faiss-mem"] if have_faiss else ["diskivf"]
    p = operating_nprobe(rows, compared)
    own = {e: operating_nprobe(rows, [e]) for e in engines}
    threads = sorted({r["threads"] for r in rows})
    prefetch = results.get("config", {}).get("faiss_disk_prefetch_threads")
    targets = []
    na = "no nprobe reaches recall >= 0.90" if p is None else ""
    for t in [t for t in threads if t in (1, 2)] or threads[:1]:
        d = _row(rows, "diskivf", t, p) if p is not None else None
        fm = _row(rows, "faiss-mem", t, p) if p is not None else None
        fd = _row(rows, "faiss-disk", t, p) if p is not None else None
        suffix = f"{t} thread{'s' if t > 1 else ''}, nprobe={p}"

        def get(r: dict[str, Any] | None, key: str, sub: str | None = None) -> float | None:
            if r is None:
                return None
            v = r[sub][key] if sub and r.get(sub) else (None if sub else r[key])
            return None if v is None else float(v)

        def runs(r: dict[str, Any] | None, key: str, sub: str | None) -> list[float] | None:
            src = r[sub] if r is not None and sub else r
            return None if src is None else src.get(f"{key}_runs")

        def det(a: float | None, b: float | None, other: str) -> str:
            if na or a is None or b is None:
                return na or f"{other} not measured"
            told = prefetch if other == "faiss-disk" else None
            # The targets are set against FAISS's defaults: a changed one is named.
            setting = "" if told is None else f" (prefetch_nthread={told}, not FAISS's default)"
            return f"diskivf {a:.0f} / {other} {b:.0f} QPS{setting}"

        pairs = [
            ("batch QPS vs FAISS in memory", "batch_qps", None, fm, "faiss-mem", 1.5),
            ("single-query QPS vs FAISS in memory", "single_qps", None, fm, "faiss-mem", 0.7),
            ("single-query QPS vs FAISS on disk", "single_qps", None, fd, "faiss-disk", 2.0),
            (
                "cold single-query QPS vs FAISS on disk cold",
                "single_qps",
                "cold",
                fd,
                "faiss-disk",
                1.0,
            ),
        ]
        if any(r.get("interleaved") for r in rows):
            # The same two ratios from the pass that runs the engines in one process, query by
            # query: the machine's drift between the engines' processes drops out.
            one = "interleaved in one process"
            pairs += [
                (
                    f"single-query QPS vs FAISS in memory, {one}",
                    "single_qps",
                    "interleaved",
                    fm,
                    "faiss-mem",
                    0.7,
                ),
                (
                    f"single-query QPS vs FAISS on disk, {one}",
                    "single_qps",
                    "interleaved",
                    fd,
                    "faiss-disk",
                    2.0,
                ),
            ]
        for label, key, sub, other, oname, bound in pairs:
            a, b = get(d, key, sub), get(other, key, sub)
            target = _target(f"{label} ({suffix})", _ratio(a, b), ">=", bound, det(a, b, oname))
            targets.append(_with_rounds(target, _paired(runs(d, key, sub), runs(other, key, sub))))
    d_build, f_build = build.get("diskivf"), build.get("faiss")
    if d_build and f_build:
        a = d_build["train_s"] + d_build["add_s"]
        b = f_build["train_s"] + f_build["add_s"]
        target = _target(
            "train + add time vs FAISS", a / b, "<=", 1.0, f"diskivf {a:.2f} s / faiss {b:.2f} s"
        )
        totals = [
            [t + s for t, s in zip(e.get("train_s_runs", []), e.get("add_s_runs", []), strict=True)]
            for e in (d_build, f_build)
        ]
        targets.append(_with_rounds(target, _paired(*totals)))  # builds alternate too
    else:
        targets.append(_target("train + add time vs FAISS", None, "<=", 1.0, "faiss not run"))
    mem = results["memory"].get("diskivf", {})
    anon = _mb(mem.get("peak_anon_bytes"))
    ds = results["dataset"]
    scale = f"{ds['n']} x {ds['dim']}"
    note = "" if ds["n"] >= 1_000_000 else " (the target is set at 1M x 128)"
    targets.append(
        _target(
            f"diskivf search peak anonymous RSS, {scale}{note}",
            anon,
            "<",
            300.0,
            "sampled RssAnon of the search process",
            unit=" MB",
        )
    )
    return {
        "nprobe": p,
        "nprobe_per_engine": own,
        "recall_target": RECALL_TARGET,
        "targets": targets,
    }


def print_targets(summary: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    p = summary["nprobe"]
    own = ", ".join(f"{e} {v}" for e, v in summary["nprobe_per_engine"].items())
    print(
        f"operating point: nprobe={p} (smallest reaching recall >= {RECALL_TARGET:.2f} for "
        f"every engine compared; per engine: {own})"
    )
    if p is not None:
        recalls = sorted({(r["engine"], r["recall"]) for r in rows if r["nprobe"] == p})
        print("recall there: " + ", ".join(f"{e} {v:.3f}" for e, v in recalls))
    for t in summary["targets"]:
        v = t["value"]
        shown = "-" if v is None else (f"{v:.2f}{t['unit']}")
        print(
            f"[{t['status']:>4}] {t['name']}: {shown} (target {t['op']} {t['bound']:g}"
            f"{t['unit']}; {t['detail']})"
        )


def plot(results: dict[str, Any], path: Path) -> str | None:
    mpl = optional_import("matplotlib", "skipping the recall-vs-QPS plot")
    if mpl is None:
        return None
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["search"]
    panels: list[tuple[str, str | None, str]] = [
        ("batch_qps", None, "batch (all queries in one call)"),
        ("single_qps", None, "single query, warm"),
    ]
    if any(r["cold"] for r in rows):
        panels.append(("single_qps", "cold", "single query, cold"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False)
    colors = {"diskivf": "tab:blue", "faiss-mem": "tab:orange", "faiss-disk": "tab:green"}
    styles = ["-", "--", ":", "-."]
    threads = sorted({r["threads"] for r in rows})
    for ax, (key, sub, title) in zip(axes[0], panels, strict=True):
        for eng in ENGINES:
            for ti, t in enumerate(threads):
                sel = sorted(
                    (
                        r
                        for r in rows
                        if r["engine"] == eng and r["threads"] == t and (sub is None or r[sub])
                    ),
                    key=lambda r: r["nprobe"],
                )
                if not sel:
                    continue
                xs = [r["recall"] for r in sel]
                ys = [(r[sub] if sub else r)[key] for r in sel]
                ax.plot(
                    xs,
                    ys,
                    styles[ti % len(styles)],
                    marker="o",
                    ms=3,
                    color=colors[eng],
                    label=f"{eng}, {t} thr",
                )
                if eng == "diskivf" and ti == 0:
                    for r, x, y in zip(sel, xs, ys, strict=True):
                        ax.annotate(
                            str(r["nprobe"]),
                            (x, y),
                            fontsize=7,
                            textcoords="offset points",
                            xytext=(3, 3),
                        )
        ax.axvline(RECALL_TARGET, color="grey", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel(f"recall@{results['dataset']['k']}")
        ax.set_ylabel("queries per second")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ds = results["dataset"]
    fig.suptitle(
        f"{ds['name']}, {ds['metric']}, nlist={results['config']['nlist']} (labels: nprobe)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------ orchestration


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return sorted(set(vals))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark diskivf against FAISS IndexIVFFlat (in memory and on disk).",
        epilog="Defaults are for the full run; --quick changes those not given explicitly.",
    )
    d = DEFAULTS
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run: 100k x 64, nlist 256, nprobe 1,4,16,64, repeats 1, rounds 1",
    )
    ap.add_argument("--n", type=int, help=f"base vectors (generated: {d['n']}; file: all)")
    ap.add_argument("--dim", type=int, help=f"dimension of generated data ({d['dim']})")
    ap.add_argument("--nlist", type=int, help=f"inverted lists ({d['nlist']})")
    ap.add_argument("--nq", type=int, help=f"queries ({d['nq']})")
    ap.add_argument("--k", type=int, help=f"neighbours per query, recall@k ({d['k']})")
    ap.add_argument("--nprobe", help=f"comma-separated nprobe values ({d['nprobe']})")
    ap.add_argument("--threads", help=f"comma-separated thread counts ({d['threads']})")
    ap.add_argument(
        "--repeats", type=int, help=f"timed runs per measurement and round ({d['repeats']})"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        help="rounds of the search phase; each runs every engine once, in rotating order, and "
        f"results are medians over all rounds ({d['rounds']})",
    )
    ap.add_argument(
        "--build-repeats",
        type=int,
        help="builds per engine, alternating engines (default: --rounds)",
    )
    ap.add_argument("--single", type=int, help=f"queries in single-query loops ({d['single']})")
    ap.add_argument(
        "--metric",
        choices=["l2", "ip", "cosine"],
        help="metric (default l2, or the HDF5 file's 'distance' attribute)",
    )
    ap.add_argument(
        "--data",
        help="base vectors: .npy, .fvecs, .bvecs, .fbin or HDF5 "
        "(ann-benchmarks train/test/neighbors)",
    )
    ap.add_argument(
        "--queries",
        help="query vectors file (default: HDF5 'test', or the last "
        "--nq rows of --data held out of the base)",
    )
    ap.add_argument("--gt", help="ground-truth ids (.ivecs/.ibin/.npy, nq x >= k)")
    ap.add_argument("--separation", type=float, help=f"cluster separation ({d['separation']})")
    ap.add_argument("--nclusters", type=int, help=f"clusters (default n / {POINTS_PER_CLUSTER})")
    ap.add_argument("--seed", type=int, default=0, help="data, sample and k-means seed (0)")
    ap.add_argument("--out", default="bench-out", help="output directory (./bench-out)")
    ap.add_argument("--no-faiss", action="store_true", help="benchmark diskivf only")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache passes")
    ap.add_argument(
        "--no-interleaved",
        action="store_true",
        help="skip the single-query passes that run every engine in one process, query by query",
    )
    ap.add_argument(
        "--interleave",
        metavar="ENGINES",
        help="comma-separated engines of the interleaved single-query pass (default: every "
        "engine benchmarked); diskivf,faiss-mem leaves out FAISS's on-disk lists, whose "
        "prefetch threads slow what runs after them in the process",
    )
    ap.add_argument(
        "--cold-prefetch-all",
        action="store_true",
        help="cold passes with diskivf's index.prefetch = True (madvise WILLNEED of every "
        "probed list on every search; the default advises newly mapped lists only)",
    )
    ap.add_argument(
        "--faiss-disk-prefetch-threads",
        type=int,
        metavar="N",
        help="set prefetch_nthread of FAISS's on-disk lists, the threads each search starts "
        "to read its probed lists (default: FAISS's, 32); the targets are set against the "
        "default, so a run with this option says so beside them",
    )
    ap.add_argument(
        "--limit-blas",
        action="store_true",
        help="also hold numpy's BLAS to t threads around diskivf searches (threadpoolctl), "
        "even when search() takes threads=",
    )
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, val in preset.items():
        if key == "n" and args.data:
            continue
        if getattr(args, key) is None:
            setattr(args, key, val)
    try:
        args.nprobe = _int_list(args.nprobe)
        args.threads = _int_list(args.threads)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    for key in ("nlist", "nq", "k", "repeats", "rounds", "build_repeats", "single", "dim"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.n is not None and args.n < args.nlist:
        ap.error(f"--n must be at least --nlist ({args.nlist})")
    if args.faiss_disk_prefetch_threads is not None and args.faiss_disk_prefetch_threads < 0:
        ap.error(
            f"--faiss-disk-prefetch-threads must be >= 0, got {args.faiss_disk_prefetch_threads}"
        )
    if (args.queries or args.gt) and not args.data:
        ap.error("--queries and --gt need --data")
    if args.interleave is not None:
        args.interleave = [e.strip() for e in args.interleave.split(",") if e.strip()]
        unknown = [e for e in args.interleave if e not in ENGINES]
        if unknown or not args.interleave:
            ap.error(
                f"--interleave expects engines among {', '.join(ENGINES)}, "
                f"got {', '.join(unknown) or 'none'}"
            )
    return args


def merge_runs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of one measurement from several rounds (a search row of one engine, threads and
    nprobe) or several builds (one engine's build), merged into one.

    Every ``*_runs`` list (throughputs, build times) is concatenated and its median reported,
    so it is a median over every timed run; other numbers (latency percentiles, scan rates,
    bytes) are medians of the per-round values, and equal ones are kept as they are.
    """
    out = dict(rows[0])
    for key, value in rows[0].items():
        if key in ("engine", "threads", "nprobe"):
            continue
        if key.endswith("_runs"):
            out[key] = [x for r in rows for x in r[key]]
        elif key in ("cold", "interleaved"):
            subs = [r[key] for r in rows if r.get(key)]
            out[key] = merge_runs(subs) if subs else None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            vals = [r[key] for r in rows if r.get(key) is not None]
            # Equal values (counts, sizes) stay as they are rather than becoming floats.
            out[key] = None if not vals else vals[0] if len(set(vals)) == 1 else median(vals)
    for key in list(out):
        if key.endswith("_runs") and out[key]:
            out[key[: -len("_runs")]] = median(out[key])
    return out


def merge_rounds(per_round: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Search rows of all rounds, one row per (engine, threads, nprobe)."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for rows in per_round:
        for row in rows:
            groups.setdefault((row["engine"], row["threads"], row["nprobe"]), []).append(row)
    return [merge_runs(rows) for rows in groups.values()]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    cache, work = out / "cache", out / "work"
    for d in (out, cache, work):
        d.mkdir(parents=True, exist_ok=True)

    phases: dict[str, float] = {}
    ticks: dict[str, list[int]] = {}  # per phase: the CPU counters spent, summed over rounds

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), cpu_ticks()
        try:
            yield
        finally:
            phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0  # rounds add up
            spent = ticks_since(c0)
            if spent is not None:
                ticks[name] = [a + b for a, b in zip(ticks.get(name, [0] * 8), spent, strict=True)]

    faiss = None
    if not args.no_faiss:
        faiss = optional_import("faiss", "benchmarking diskivf only")
    with phase("data"):
        ds = prepare_file(args, cache) if args.data else prepare_generated(args, cache)
    if args.nlist > ds["n"]:
        raise BenchError(f"nlist={args.nlist} exceeds the {ds['n']} base vectors")
    if args.build_repeats is None:
        args.build_repeats = args.rounds
    with phase("machine"):
        ctx = machine_context(work, small=args.quick or ds["n"] * ds["dim"] < 1 << 24)
    if faiss is not None:
        ctx["faiss"] = faiss.__version__
    print_machine(ctx)
    config = dict(vars(args))
    print(
        f"\n== dataset: {ds['name']}, n={ds['n']} dim={ds['dim']} nq={ds['nq']} "
        f"k={ds['k']} metric={ds['metric']}, ground truth {ds['gt_source']}"
    )
    print(
        f"nlist={args.nlist} nprobe={args.nprobe} threads={args.threads} "
        f"repeats={args.repeats} rounds={args.rounds} build_repeats={args.build_repeats} "
        f"single={args.single}"
    )

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "config": config,
        "machine": ctx,
        "dataset": ds,
        "build": {},
        "memory": {},
        "search": [],
        "threads_mode": {},
        "errors": [],
        "phases_s": phases,
    }
    paths = {
        "diskivf": [str(out / "diskivf.index")],
        "faiss-mem": [str(out / "faiss-ivf.index")],
        "faiss-disk": [str(out / "faiss-ondisk.index"), str(out / "faiss-ondisk.ivfdata")],
    }
    common = {
        "dataset": ds,
        "nlist": args.nlist,
        "seed": args.seed,
        "build_repeats": 1,
    }
    faiss_task = {
        **common,
        "mem_path": paths["faiss-mem"][0],
        "disk_path": paths["faiss-disk"][0],
        "disk_data_path": paths["faiss-disk"][1],
    }

    # Builds alternate between engines, so a slow spell of this shared machine lands on both
    # rather than on whichever engine happened to run then.
    builds: dict[str, list[dict[str, Any]]] = {"diskivf": [], "faiss": []}
    # Every diskivf build gets a fresh directory, and the spares are deleted only after the
    # last build. Deleting an index right before building the next made the next build pay for
    # it: on ext4 without a journal (this machine's root file system) a file creation scans the
    # inodes deleted in the last minutes, which python tools/bench_writes.py shows per file.
    build_dirs = [out / f"diskivf.build{r}.index" for r in range(args.build_repeats)]
    for r in range(args.build_repeats):
        # Every build starts with nothing left to write back: FAISS's build writes 1 GB of
        # index files without syncing them, and their writeback (and the discards of the
        # files they replace) would otherwise share the device with the next diskivf add's
        # fsync. Untimed; the engines' own timings are unchanged.
        os.sync()
        log(f"build {r + 1}/{args.build_repeats}: diskivf ...")
        with phase("build diskivf"):
            builds["diskivf"].append(
                run_worker("build-diskivf", {**common, "path": str(build_dirs[r])}, work)
            )
        if faiss is not None:
            log(f"build {r + 1}/{args.build_repeats}: faiss ...")
            os.sync()
            try:
                with phase("build faiss"):
                    builds["faiss"].append(run_worker("build-faiss", faiss_task, work))
            except BenchError as exc:
                log(f"faiss build failed, continuing with diskivf only: {exc}")
                results["errors"].append(str(exc))
                faiss = None
    shutil.rmtree(paths["diskivf"][0], ignore_errors=True)
    os.replace(build_dirs[-1], paths["diskivf"][0])
    for spare in build_dirs[:-1]:
        shutil.rmtree(spare, ignore_errors=True)
    results["build"]["diskivf"] = merge_runs(builds["diskivf"])
    if faiss is not None:
        b = merge_runs(builds["faiss"])
        b["index_bytes"] = b["mem_index_bytes"]
        results["build"]["faiss"] = b

    engines = ["diskivf"] + (["faiss-mem", "faiss-disk"] if faiss is not None else [])
    interleaved = [e for e in engines if args.interleave is None or e in args.interleave]
    if args.interleave is not None and not args.no_interleaved:
        missing = [e for e in args.interleave if e not in engines]
        if missing:
            log(f"--interleave: {', '.join(missing)} not benchmarked, left out")
    per_round: list[list[dict[str, Any]]] = []
    for r in range(args.rounds):
        rows: list[dict[str, Any]] = []
        # Rotate the order too: the first engine of a round may inherit a cooler page cache.
        for eng in engines[r % len(engines) :] + engines[: r % len(engines)]:
            log(f"search round {r + 1}/{args.rounds}: {eng} ...")
            task = {
                "engine": eng,
                "paths": paths[eng],
                "queries_path": ds["queries_path"],
                "gt_path": ds["gt_path"],
                "k": args.k,
                "metric": ds["metric"],
                "nprobes": args.nprobe,
                "threads": args.threads,
                "repeats": args.repeats,
                "single": args.single,
                "cold": not args.no_cold,
                "cold_prefetch_all": args.cold_prefetch_all,
                "limit_blas": args.limit_blas,
                "faiss_disk_prefetch_threads": args.faiss_disk_prefetch_threads,
            }
            try:
                with phase(f"search {eng}"):
                    res = run_worker("search", task, work, tag=f"search-{eng}")
            except BenchError as exc:
                if eng == "diskivf":
                    raise
                log(f"{eng} search failed: {exc}")
                results["errors"].append(str(exc))
                engines.remove(eng)
                continue
            rows += res["rows"]
            results["threads_mode"][eng] = res["threads_mode"]
            mem = results["memory"].setdefault(eng, {})
            for key in (
                "peak_rss_bytes",
                "peak_anon_bytes",
                "anon_at_start_bytes",
                "anon_after_open_bytes",
            ):
                if res[key] is not None:
                    mem[key] = max(mem.get(key) or 0, res[key])
                else:
                    mem.setdefault(key, None)
        if not args.no_interleaved and interleaved:
            log(
                f"search round {r + 1}/{args.rounds}: single queries of {', '.join(interleaved)} interleaved ..."
            )
            task = {
                "engines": interleaved,
                "paths": {e: paths[e] for e in interleaved},
                "queries_path": ds["queries_path"],
                "k": args.k,
                "metric": ds["metric"],
                "nprobes": args.nprobe,
                "threads": args.threads,
                "single": args.single,
                "limit_blas": args.limit_blas,
                "faiss_disk_prefetch_threads": args.faiss_disk_prefetch_threads,
            }
            with phase("search interleaved"):
                found = run_worker("interleaved", task, work)["rows"]
            by_key = {(x["engine"], x["threads"], x["nprobe"]): x for x in found}
            for row in rows:
                got = by_key.get((row["engine"], row["threads"], row["nprobe"]))
                row["interleaved"] = (
                    None
                    if got is None
                    else {k: v for k, v in got.items() if k not in ("engine", "threads", "nprobe")}
                )
        per_round.append(rows)
    results["search"] = merge_rounds(per_round)

    order = {e: i for i, e in enumerate(ENGINES)}
    results["search"].sort(key=lambda r: (order[r["engine"]], r["threads"], r["nprobe"]))
    summary = evaluate_targets(results)
    results["summary"] = summary

    print("\n== build (medians)")
    print_build(results["build"])
    print(f"\n== search, warm (medians of {args.repeats * args.rounds}: {args.rounds} rounds)")
    print_search(results["search"], args.k)
    if not args.no_cold:
        print(f"\n== search, cold (first {min(args.single, ds['nq'])} queries after eviction)")
        print_cold(results["search"])
    if any(r.get("interleaved") for r in results["search"]):
        print(
            f"\n== single queries, engines interleaved query by query in one process "
            f"(medians of {args.rounds} rounds)"
        )
        print_interleaved(results["search"])
    print("\n== search process memory")
    print(
        table(
            [
                "engine",
                "peak RSS MB",
                "peak anon MB",
                "anon at start MB",
                "anon after open MB",
                "threads via",
            ],
            [
                [
                    e,
                    _mb(m["peak_rss_bytes"]),
                    _mb(m["peak_anon_bytes"]),
                    _mb(m["anon_at_start_bytes"]),
                    _mb(m["anon_after_open_bytes"]),
                    results["threads_mode"].get(e),
                ]
                for e, m in results["memory"].items()
            ],
        )
    )
    print("\n== targets (issue 4)")
    print_targets(summary, results["search"])

    results["wall_s"] = time.perf_counter() - t_start
    png = plot(results, out / "recall_qps.png")
    results["plot"] = png
    steal = {k: steal_share(ticks[k]) if k in ticks else None for k in phases}
    results["phases_steal"] = steal
    json_path = out / "results.json"
    json_path.write_text(json.dumps(results, indent=1, default=str))
    took = ", ".join(
        f"{k} {v:.0f} s" + (f" (steal {steal[k]:.0%})" if steal[k] is not None else "")
        for k, v in phases.items()
    )
    print(f"\nwall time {results['wall_s']:.0f} s ({took})")
    print(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(1)
