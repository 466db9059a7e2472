"""What a list costs the first time a process touches it: mapping vs reading.

Usage: python tools/bench_map.py INDEX_DIR [--lists 512]

For lists of an existing index whose files are in the page cache, times (per list, median of
3 passes over fresh maps) np.memmap creation alone, memmap creation plus one pass over the rows
(the page-table work of a first touch), the same with MAP_POPULATE, diskivf's own list map
(libc's mmap with MAP_POPULATE, which keeps no file descriptor) plus one pass, and os.pread of
the same bytes into a reused buffer. On a virtual machine the first touch of a mapped page-cache page
can cost far more than copying it, which bounds cold and first-query latency of any mmap-based
index.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import diskivf
from diskivf.format import list_file_names, read_commit
from diskivf.segments import _map


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index")
    ap.add_argument("--lists", type=int, default=512)
    args = ap.parse_args()
    root = Path(args.index)
    with diskivf.open(root) as ix:
        dim, dtype, meta = ix.dim, ix.dtype, ix.metadata
    # Committed rows and file generations, as stored (list_sizes() would exclude removed rows).
    rec = read_commit(root, meta.nlist, meta.index_uuid)
    counts, gens = rec.list_counts, rec.list_gens
    lists = np.flatnonzero(counts).tolist()[: args.lists]
    rowbytes = dim * dtype.itemsize
    buf = bytearray(int(counts.max()) * rowbytes)

    def path(i: int) -> Path:
        return root / list_file_names(i, int(gens[i]))[0]

    def memmap_only(i: int) -> None:
        np.memmap(path(i), dtype=dtype, mode="r", shape=(int(counts[i]), dim))

    def memmap_touch(i: int) -> None:
        a = np.memmap(path(i), dtype=dtype, mode="r", shape=(int(counts[i]), dim))
        np.add.reduce(a.view(np.ndarray), axis=0)

    def populate_touch(i: int) -> None:
        fd = os.open(path(i), os.O_RDONLY)
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mm = mmap.mmap(fd, int(counts[i]) * rowbytes, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        a = np.frombuffer(mm, dtype=dtype).reshape(-1, dim)
        np.add.reduce(a, axis=0)
        del a
        mm.close()

    def diskivf_touch(i: int) -> None:
        a = _map(path(i), dtype, (int(counts[i]), dim))  # libc mmap + MAP_POPULATE, no fd kept
        np.add.reduce(a.view(np.ndarray), axis=0)

    def pread(i: int) -> None:
        fd = os.open(path(i), os.O_RDONLY)
        try:
            n = os.preadv(fd, [memoryview(buf)[: int(counts[i]) * rowbytes]], 0)
        finally:
            os.close(fd)
        a = np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize).reshape(-1, dim)
        np.add.reduce(a, axis=0)

    for i in lists:  # make sure the files are in the page cache
        pread(i)
    cases: list[tuple[str, Callable[[int], None]]] = [
        ("np.memmap creation", memmap_only),
        ("np.memmap + first pass", memmap_touch),
        ("mmap MAP_POPULATE + first pass", populate_touch),
        ("diskivf's list map + first pass", diskivf_touch),
        ("pread into a buffer + pass", pread),
    ]
    mean_mb = float(counts[lists].mean()) * rowbytes / 2**20
    print(f"{len(lists)} lists, mean {mean_mb:.2f} MiB each, page cache warm")
    for name, fn in cases:
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            for i in lists:
                fn(i)
            runs.append((time.perf_counter() - t) / len(lists))
        us = statistics.median(runs) * 1e6
        print(f"{name:34s} {us:8.1f} us/list  {mean_mb / 2**10 / (us / 1e6):6.2f} GiB/s")


if __name__ == "__main__":
    main()
