"""Scoring a few queries against one list: one matrix product or one matrix-vector per query.

Usage: python tools/bench_kernels.py INDEX_DIR [--lists 300] [--rounds 5]
       [--stream-mb 8,16,...] [--stream-dims 32,64,...] [--stream-queries 200]

A batch search scores each probed list against the queries that probe it. At small nprobe most
lists have only a handful of queries. For m = 1..64 queries this prints the list bytes scored
per second, median over ``--rounds`` passes, each over ``--lists`` random lists of the index
read through memory maps as search reads them (page cache warm, CPU caches cold), with BLAS
held to one thread as search does, for four kernels: one GEMM of the queries against the
transposed list ("GEMM"); one GEMM with the list on the left against the queries as a
contiguous (dim, m) block, its small result transposed back ("GEMM list left"); one GEMV per
query; and numpy's ``einsum`` row kernel per query. ``diskivf.search._costs`` picks its kernel
per query count from this table. A second table compares, for one query, the lists read through
memory maps (as search does) with anonymous copies of them, with the same lists packed into one
large array (which numpy backs with huge pages where the kernel allows), and with a plain copy
and a read of one float per 64-byte line ("lines read": what memory gives one core in this
access pattern when the loads come with no work between them; "+ GEMV" then scores the list
from the core's cache);
and BLAS's matrix-vector product (``np.dot``, which search scores one query with when
threadpoolctl can hold BLAS to one thread) with numpy's own row-by-row kernel
(``np.einsum("ij,j->i")``) and numpy 2's ``np.vecdot`` (BLAS's dot per row), search's kernel
without threadpoolctl, and with ``np.matmul`` and numpy 2.2's ``np.matvec``; with numba
installed, diskivf's compiled single-query scan (``diskivf._jit``: each row scored and
offered to a top-10 heap). When faiss is installed, FAISS's own kernel
(``fvec_inner_products_ny``) scores the same lists from the same sources. The kernels also
score one list over and over from cache ("in cache"): the maps show how much of a gap to
FAISS is the kernel, the cache what each kernel costs with memory out of the way. A third table ("streamed") times GEMV
against ``vecdot`` for one query over 16 random lists out of working sets of ``--stream-mb``
MB with rows of ``--stream-dims`` dimensions: ``diskivf.search.streams_rows`` picks the
faster for an index from the size of its vectors against the CPU's last-level cache.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import diskivf
from diskivf import _jit
from diskivf._blas import blas_threads
from diskivf._cpu import LAST_LEVEL_CACHE_BYTES
from diskivf.format import list_file_names, read_commit

F32 = NDArray[np.float32]


def gemm(x: F32, q: F32) -> F32:
    out: F32 = np.matmul(q, x.T)
    return out


def gemm_list_left(x: F32, q: F32) -> F32:
    # The list as BLAS's left operand against the queries as a contiguous (dim, m) block; the
    # (rows, m) result is transposed into the (m, rows) layout search works in.
    out: F32 = np.ascontiguousarray(np.matmul(x, np.ascontiguousarray(q.T)).T)
    return out


def einsum_per_query(x: F32, q: F32) -> F32:
    out = np.empty((len(q), len(x)), np.float32)
    for i in range(len(q)):
        np.einsum("ij,j->i", x, q[i], out=out[i])
    return out


def gemv_per_query(x: F32, q: F32) -> F32:
    out = np.empty((len(q), len(x)), np.float32)
    for i in range(len(q)):
        np.dot(x, q[i], out=out[i])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--lists", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stream-mb", default="8,16,24,32,48,64,128,512")
    ap.add_argument("--stream-dims", default="32,64,96,128,256,960")
    ap.add_argument("--stream-queries", type=int, default=200)
    args = ap.parse_args()
    root = Path(args.index)
    with diskivf.open(root) as ix:
        dim, dtype, meta = ix.dim, ix.dtype, ix.metadata
    if dtype != np.float32:
        raise SystemExit("this comparison is for float32 indexes")
    rec = read_commit(root, meta.nlist, meta.index_uuid)
    lists = [
        np.fromfile(root / list_file_names(i, int(rec.list_gens[i]))[0], np.float32)[
            : int(rec.list_counts[i]) * dim
        ].reshape(-1, dim)
        for i in np.flatnonzero(rec.list_counts).tolist()
    ]
    # Read through memory maps of the list files, as search reads them.
    maps = [
        np.memmap(root / list_file_names(i, int(rec.list_gens[i]))[0], np.float32, "r")[
            : int(rec.list_counts[i]) * dim
        ]
        .reshape(-1, dim)
        .view(np.ndarray)
        for i in np.flatnonzero(rec.list_counts).tolist()
    ]
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((64, dim)).astype(np.float32)
    kernels: dict[str, Callable[[F32, F32], F32]] = {
        "GEMM": gemm,
        "GEMM list left": gemm_list_left,
        "GEMV per query": gemv_per_query,
        "einsum per query": einsum_per_query,
    }
    print(f"{len(lists)} lists of {root}, {dim}-d float32; GB/s of list data scored")
    print(f"{'queries':>8}" + "".join(f"{name:>18}" for name in kernels))
    with blas_threads(1):
        for x in maps:  # page tables populated, as in an index that searches have warmed
            np.dot(x, queries[0])
        for m in (1, 2, 3, 4, 6, 8, 16, 32, 64):
            rates = {}
            for name, fn in kernels.items():
                runs = []
                for _ in range(args.rounds):
                    picked = rng.permutation(len(lists))[: args.lists]
                    nbytes = sum(lists[i].nbytes for i in picked)
                    t0 = time.perf_counter()
                    for i in picked:
                        fn(maps[i], queries[:m])
                    runs.append(nbytes / (time.perf_counter() - t0) / 1e9)
                rates[name] = statistics.median(runs)
            print(f"{m:>8}" + "".join(f"{rates[name]:>18.1f}" for name in kernels))
        single_query_sources(maps, lists, queries[0], args)
        if hasattr(np, "vecdot"):
            streamed(args)
    print(f"BLAS held to one thread and released (a search's region): {region_us():.1f} us")
    if hasattr(np, "vecdot"):
        dots = {np.dtype(t).name: dot_us(t) for t in (np.float32, np.float64)}
        print(
            "BLAS's dot of 200,000 elements, us with BLAS held to one thread / free "
            "(equal: the dot starts no BLAS threads at that length): "
            + ", ".join(f"{name} {held:.1f} / {free:.1f}" for name, (held, free) in dots.items())
        )


def streamed(args: argparse.Namespace) -> None:
    """GEMV against ``vecdot`` for one query over random lists of a working set of growing
    size, as single queries meet an index of that size: from the CPU's cache while it fits,
    from memory beyond. ``diskivf.search.streams_rows`` picks ``vecdot`` from this table."""
    sizes = [int(v) for v in args.stream_mb.split(",")]
    dims = [int(v) for v in args.stream_dims.split(",")]
    rng = np.random.default_rng(2)
    print(
        "\nstreamed: one query against 16 random lists of 512 KB out of a working set of the "
        "size heading the column (anonymous memory), vecdot's speed over GEMV's (median); "
        f"last-level cache {LAST_LEVEL_CACHE_BYTES >> 20} MiB"
    )
    print(f"{'dim':>5}" + "".join(f"{f'{mb} MB':>9}" for mb in sizes))
    for dim in dims:
        rows = (512 << 10) // (dim * 4)
        q = rng.standard_normal(dim).astype(np.float32)
        cells = []
        for mb in sizes:
            sets = [rng.random((rows, dim), dtype=np.float32) for _ in range(max(1, mb * 2))]
            cells.append(_vecdot_over_gemv(sets, q, args.rounds, args.stream_queries, rng))
            del sets
        print(f"{dim:>5}" + "".join(f"{c:>9.2f}" for c in cells))


def single_query_sources(
    maps: list[F32], lists: list[F32], q: F32, args: argparse.Namespace
) -> None:
    """One query (what a single-query search does per list): the same random lists read from
    the page cache through memory maps, as search does, from anonymous copies, and from one
    large array holding them all; a plain copy of the maps bounds what any kernel can stream
    in this access pattern."""
    dim = len(q)
    # The same lists packed into one large array, for which numpy asks the kernel for
    # transparent huge pages: it differs from the separate copies mainly in TLB reach.
    flat = np.concatenate(lists)
    ends = np.cumsum([len(x) for x in lists]).tolist()
    packed = [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    buf = np.empty(max(len(x) for x in lists), np.float32)
    scratch = np.empty((len(buf), dim), np.float32)

    def gemv(x: F32) -> None:
        np.dot(x, q, out=buf[: len(x)])

    def einsum(x: F32) -> None:
        np.einsum("ij,j->i", x, q, out=buf[: len(x)])

    def vecdot(x: F32) -> None:
        np.vecdot(x, q, out=buf[: len(x)])  # numpy >= 2: BLAS's dot per row

    def copy(x: F32) -> None:
        np.copyto(scratch[: len(x)], x)

    def matmul(x: F32) -> None:
        np.matmul(x, q, out=buf[: len(x)])

    def touch(x: F32) -> None:
        # One float per 64-byte line: loads with no work between them, which the core issues
        # as far ahead as it can. What memory gives one core in this access pattern.
        x.reshape(-1)[:: 64 // x.itemsize].sum()

    def touch_gemv(x: F32) -> None:
        touch(x)  # the list into the core's L2 (a list is under 1 MB), then GEMV from there
        gemv(x)

    hot = [lists[0]] * len(lists)  # one list, in cache after its first pass: compute alone
    cases: list[tuple[str, list[F32], Callable[[F32], None]]] = [
        ("GEMV, maps", maps, gemv),
        ("einsum, maps", maps, einsum),
        ("GEMV, anonymous", lists, gemv),
        ("einsum, anonymous", lists, einsum),
        ("GEMV, one array", packed, gemv),
        ("copy, maps", maps, copy),
        ("matmul, maps", maps, matmul),
        ("lines read, maps", maps, touch),
        ("lines read + GEMV, maps", maps, touch_gemv),
        ("einsum, in cache", hot, einsum),
        ("GEMV, in cache", hot, gemv),
    ]
    if hasattr(np, "vecdot"):
        cases += [
            ("vecdot, maps", maps, vecdot),
            ("vecdot, anonymous", lists, vecdot),
            ("vecdot, in cache", hot, vecdot),
        ]
    if hasattr(np, "matvec"):  # numpy >= 2.2

        def matvec(x: F32) -> None:
            np.matvec(x, q, out=buf[: len(x)])

        cases.append(("matvec, maps", maps, matvec))
    compiled = _jit.scan_topk()
    if compiled is not None:
        row_ids = np.arange(len(buf), dtype=np.int64)
        no_norms = np.empty(0, np.float32)

        def scan_topk(x: F32) -> None:
            # A single query's compiled scan: each row scored and offered to a top-10 heap.
            heap = np.full(10, np.inf, np.float32), np.full(10, _jit.NO_ID, np.int64)
            compiled(x, q, no_norms, row_ids[: len(x)], *heap)

        scan_topk(maps[0])  # compiled (or loaded from numba's cache) before the timing
        cases.append(("compiled scan, maps", maps, scan_topk))
    faiss_kernel = _faiss_kernel(q, buf)
    if faiss_kernel is not None:
        cases += [
            ("FAISS, maps", maps, faiss_kernel),
            ("FAISS, anonymous", lists, faiss_kernel),
            ("FAISS, in cache", hot, faiss_kernel),
        ]
    rates: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    rng = np.random.default_rng(1)
    with blas_threads(1):
        for _ in range(args.rounds):
            picked = rng.permutation(len(lists))[: args.lists]
            for name, source, fn in cases:
                nbytes = sum(source[i].nbytes for i in picked)
                t0 = time.perf_counter()
                for i in picked:
                    fn(source[i])
                rates[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
    print("\none query, the same random lists each round, GB/s (medians):")
    for name, runs in rates.items():
        print(f"{name:>23}: {statistics.median(runs):.1f}")
    print(
        f"anonymous memory in huge pages: {_anon_huge_mb():.0f} MB (one array: {flat.nbytes / 1e6:.0f} MB)"
    )


def _vecdot_over_gemv(
    sets: list[F32], q: F32, rounds: int, nq: int, rng: np.random.Generator
) -> float:
    """Speed of ``vecdot`` over GEMV (median time ratio) for ``nq`` queries of 16 random
    lists of ``sets`` each, the kernels taking turns every round, each on picks of its own
    (on the same picks the second would find the first's lists in cache)."""
    out = np.empty(len(sets[0]), np.float32)
    times: dict[str, list[float]] = {"gemv": [], "vecdot": []}
    for _ in range(rounds):
        for name, runs in times.items():
            picks = rng.integers(0, len(sets), (nq, 16)).tolist()
            t0 = time.perf_counter()
            for p in picks:
                for i in p:
                    if name == "gemv":
                        np.dot(sets[i], q, out=out)
                    else:
                        np.vecdot(sets[i], q, out=out)
            runs.append(time.perf_counter() - t0)
    return statistics.median(times["gemv"]) / statistics.median(times["vecdot"])


def region_us(n: int = 2000, rounds: int = 5) -> float:
    """Median cost of entering and leaving ``blas_threads(1)`` with BLAS at its own thread
    count, as every search does. diskivf finds the BLAS libraries at its first region, which
    here comes before faiss is imported: this times numpy's OpenBLAS alone."""
    runs = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            with blas_threads(1):
                pass
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def dot_us(dtype: type, n: int = 200_000, rounds: int = 200) -> tuple[float, float]:
    """Median microseconds of ``np.vecdot`` over one ``n``-element row with BLAS held to one
    thread and with BLAS's threads free. A single query of an index larger than the cache
    scores rows with this dot and holds no BLAS region
    (``diskivf.search.SERIAL_DOT_MAX_DIM``): that is only right if the dot runs on one
    thread either way for rows that long."""
    rng = np.random.default_rng(3)
    a: NDArray[Any] = rng.standard_normal((1, n)).astype(dtype)
    b: NDArray[Any] = rng.standard_normal(n).astype(dtype)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for held, runs in zip((True, False), times, strict=True):
            with blas_threads(1 if held else None):
                t0 = time.perf_counter()
                np.vecdot(a, b)
                runs.append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e6, statistics.median(times[1]) * 1e6


def _faiss_kernel(q: F32, buf: F32) -> Callable[[F32], None] | None:
    """FAISS's own inner-product kernel (``fvec_inner_products_ny``, what IndexIVFFlat runs per
    list) writing into ``buf``, or None without faiss: the same lists scored by the kernel of
    the peer in the benchmark separate the kernel's share of a gap from the memory's."""
    try:
        # Any: faiss's SWIG functions are not all in its stubs (when installed).
        faiss: Any = importlib.import_module("faiss")
    except ImportError:
        print("faiss is not installed (pip install '.[bench]'): its kernel rows are left out")
        return None
    q_ptr, out_ptr = faiss.swig_ptr(q), faiss.swig_ptr(buf)

    def run(x: F32) -> None:
        faiss.fvec_inner_products_ny(out_ptr, q_ptr, faiss.swig_ptr(x), len(q), len(x))

    return run


def _anon_huge_mb() -> float:
    """``AnonHugePages`` of this process in MB (0 where the kernel does not report it)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


if __name__ == "__main__":
    main()
