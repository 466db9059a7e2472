"""A search pages in only the probed lists: page-cache residency measured with mincore(2)."""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import mmap
import os
import threading
from pathlib import Path

import numpy as np
import pytest

import diskivf
from diskivf.segments import _LIBC

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mapping it does not read it)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _LIBC is not None
        addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(addr, size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        _LIBC.munmap(addr, size)
        return sum(b & 1 for b in vec)
    finally:
        os.close(fd)


def evict(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _small_index(tmp_path: Path, seed: int) -> tuple[Path, np.ndarray]:
    """An index of 4000 random 16-d vectors in 16 lists, and the vectors."""
    x = np.random.default_rng(seed).standard_normal((4000, 16)).astype(np.float32)
    path = tmp_path / "i"
    with diskivf.open(path, mode="w-", dim=16, nlist=16) as ix:
        ix.train(x)
        ix.add(x)
    return path, x


@pytest.mark.parametrize("prefetch", [False, True])
def test_cold_search_reads_only_the_probed_list(tmp_path: Path, prefetch: bool) -> None:
    rng = np.random.default_rng(0)
    nlist, dim = 32, 64
    x = rng.standard_normal((32 * 2000, dim)).astype(np.float32)
    path = tmp_path / "i"
    with diskivf.open(path, mode="w-", dim=dim, nlist=nlist) as ix:
        ix.train(x[:8000])
        ix.add(x)
    evict(path)
    lists = sorted((path / "lists").glob("*.vec"))
    if sum(resident_pages(f) for f in lists) > len(lists):
        pytest.fail("could not evict the index from the page cache (fadvise had no effect)")
    with diskivf.open(path) as ix:
        ix.prefetch = prefetch
        opened = sum(resident_pages(f) for f in lists)
        probe = int(np.argmin(((ix.centroids - x[0]) ** 2).sum(1)))
        _, st = ix.search(x[0], k=10, nprobe=1, stats=True)
    resident = {f.name: resident_pages(f) for f in lists}
    probed = f"{probe:07d}.0.vec"
    assert opened == 0  # opening maps nothing and reads no list
    assert resident[probed] * mmap.PAGESIZE >= st.bytes_touched * 0.9 * dim * 4 / (dim * 4 + 8)
    others = sum(v for k, v in resident.items() if k != probed)
    assert others == 0, f"lists other than the probed one were read: {others} pages"


def test_prefetch_advises_every_probed_list_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prefetch`` reaches the maps: a map type without ``madvise`` would be skipped silently."""
    from diskivf import segments

    path, x = _small_index(tmp_path, seed=0)
    advised: list[int] = []
    threads: set[int] = set()
    real = segments._FileMap.willneed

    def record(self: segments._FileMap, piece: int) -> None:
        advised.append(piece)
        threads.add(threading.get_ident())
        real(self, piece)

    monkeypatch.setattr(segments._FileMap, "willneed", record)
    with diskivf.open(path) as ix:
        ix.prefetch = True
        ix.search(x[0], k=5, nprobe=4)
        ix.search(x[0], k=5, nprobe=4)
        piece = ix._reader.advice_piece
    # Closing waited for the advice, which ran off the searching thread.
    assert advised == [piece] * 2 * 2 * 4  # two searches, two files, four lists
    assert threading.get_ident() not in threads
    assert len(threads) == 1


def test_prefetch_advises_all_of_a_list_in_pieces_the_kernel_reads_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One WILLNEED reads no more than the device's read-ahead: a list is advised in pieces
    of at most the reader's piece size that together cover every byte of each file."""
    from diskivf import segments

    assert segments._LIBC is not None
    real = segments._LIBC.madvise
    calls: list[tuple[int, int, int]] = []

    def record(addr: int, length: int, option: int) -> int:
        calls.append((addr, length, option))
        return int(real(addr, length, option))

    monkeypatch.setattr(segments, "_LIBC", segments._LIBC._replace(madvise=record))
    x = np.random.default_rng(3).standard_normal((3000, 64)).astype(np.float32)
    path = tmp_path / "i"
    with diskivf.open(path, mode="w-", dim=64, nlist=2) as ix:
        ix.train(x)
        ix.add(x)
    with diskivf.open(path) as ix:
        piece = 4 * mmap.PAGESIZE
        ix._reader.advice_piece = piece
        ix.search(x[0], k=5, nprobe=2)  # both lists mapped for the first time: advised
        views = [ix._maps[lid] for lid in range(2)]
    assert {c[2] for c in calls} == {mmap.MADV_WILLNEED}
    assert max(c[1] for c in calls) <= piece
    assert min(v.vectors.nbytes for v in views) > 2 * piece  # several pieces each
    for arr in (a for v in views for a in v):
        base = arr.__array_interface__["data"][0]
        mine = sorted((a, n) for a, n, _ in calls if base <= a < base + arr.nbytes)
        assert [a for a, _ in mine] == list(range(base, base + arr.nbytes, piece))
        assert sum(n for _, n in mine) == arr.nbytes


@pytest.mark.parametrize(
    ("sysfs", "expected"),
    [
        ("8192\n", 8 << 20),
        ("64\n", 128 << 10),
        ("0\n", 128 << 10),
        (None, 128 << 10),
        ("1030\n", (1030 << 10) // mmap.PAGESIZE * mmap.PAGESIZE),  # whole pages only
    ],
)
def test_advice_piece_is_the_devices_read_ahead_but_at_least_128_kib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sysfs: str | None, expected: int
) -> None:
    from diskivf import segments

    opened: list[str] = []

    def fake_open(where: str, mode: str) -> object:
        opened.append(where)
        if sysfs is None or not where.endswith("read_ahead_kb"):
            raise FileNotFoundError(where)
        return io.BytesIO(sysfs.encode())

    monkeypatch.setattr(segments, "open", fake_open, raising=False)
    assert segments.advice_piece(tmp_path) == expected
    dev = tmp_path.stat().st_dev
    assert opened[0] == f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    assert segments.advice_piece(tmp_path / "missing") == 128 << 10


def test_lists_a_search_maps_first_are_scanned_after_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list mapped for the first time is likely being read in: it is fetched last, so the
    reads overlap the scan of the lists already mapped. The result does not change."""
    path, x = _small_index(tmp_path, seed=1)
    with diskivf.open(path) as ix:
        near = np.argsort(((ix.centroids - x[0]) ** 2).sum(1)).tolist()
        ix.search(x[0], k=5, nprobe=2)  # maps the two nearest lists
        fetched: list[int] = []
        real = ix._fetch_many
        monkeypatch.setattr(ix, "_fetch_many", lambda ids: fetched.extend(ids) or real(ids))
        first = ix.search(x[0], k=5, nprobe=5)
        assert sorted(fetched[:2]) == sorted(near[:2])
        assert sorted(fetched[2:]) == sorted(near[2:5])
        fetched.clear()
        again = ix.search(x[0], k=5, nprobe=5)  # every probed list mapped now
        assert sorted(fetched) == sorted(near[:5])
    np.testing.assert_array_equal(first.ids, again.ids)
    np.testing.assert_array_equal(first.distances, again.distances)
