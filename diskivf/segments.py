"""Inverted-list storage: append rows to list files and map committed prefixes read-only.

Each list ``i`` is two append-only files, ``lists/{i:07d}.{gen}.vec`` (raw little-endian rows)
and ``.ids`` (raw ``<i8``). Only the prefix that a commit record publishes is ever read; bytes
past it are the remains of an interrupted append and are overwritten by the next one. Nothing
here truncates or rewrites a committed byte, so a reader that mapped a prefix never sees it change
and never takes SIGBUS.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import resource
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

from diskivf.errors import CorruptIndexError
from diskivf.format import ID_DTYPE, LISTS_DIR, CommitRecord, crc32, fsync_dir, list_file_names

__all__ = [
    "ListCheck",
    "ListReader",
    "ListView",
    "ListWriter",
    "Problem",
    "check_list_files",
    "crc_prefix",
    "verify_lists",
]

_CRC_CHUNK = 1 << 22


class ListView(NamedTuple):
    """The committed rows of one list, as zero-copy read-only views."""

    vectors: NDArray[np.generic]  # (count, dim), the index's vector dtype
    ids: NDArray[np.int64]  # (count,)


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Libc(NamedTuple):
    mmap: Any
    munmap: Any
    madvise: Any


def _load_libc() -> _Libc | None:
    """libc's ``mmap``, ``munmap`` and ``madvise`` through ctypes; None where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fns = _Libc(libc.mmap, libc.munmap, libc.madvise)
    except (OSError, AttributeError):  # pragma: no cover - every POSIX libc has them
        return None
    # off_t is a C long for the plain ``mmap`` symbol on LP64 and 32-bit glibc alike.
    fns.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    fns.mmap.restype = ctypes.c_void_p
    fns.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fns.munmap.restype = ctypes.c_int
    fns.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fns.madvise.restype = ctypes.c_int
    return fns


_LIBC = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


class _FileMap:
    """A read-only shared map of a file's first ``nbytes`` that holds no file descriptor.

    Python's ``mmap.mmap`` keeps a duplicate of the descriptor for as long as the map lives
    (``trackfd=False`` arrived only in Python 3.13), so a reader probing a few hundred lists
    at once ran out of descriptors under the common soft limit of 1024. libc's ``mmap`` needs
    the descriptor only for the call. numpy reads the map through ``__array_interface__`` as
    read-only memory (an array over it cannot be made writeable) and keeps this object as
    the arrays' base, so the map is unmapped only when the last array over it is gone.
    """

    __slots__ = ("__array_interface__", "_addr", "_libc", "_nbytes")

    def __init__(
        self,
        libc: _Libc,
        fd: int,
        nbytes: int,
        flags: int,
        dtype: np.dtype[np.generic],
        shape: tuple[int, ...],
    ) -> None:
        # Held for __del__ and madvise, which may run while the interpreter shuts down.
        self._libc = libc
        self._addr = 0  # what __del__ sees if the map below fails
        self._nbytes = nbytes
        addr = libc.mmap(None, nbytes, mmap.PROT_READ, flags, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            hint = ""
            if err == errno.ENOMEM:
                # Almost always the per-process map count: each probed list is two maps.
                hint = (
                    f"; the process may have reached vm.max_map_count ({_MAX_MAP_COUNT} maps, "
                    "two per mapped list): search with a smaller nprobe or raise that limit"
                )
            raise OSError(err, f"mmap of {nbytes} bytes failed: {os.strerror(err)}{hint}")
        self._addr = addr
        self.__array_interface__ = {
            "shape": shape,
            "typestr": dtype.str,
            "data": (addr, True),  # read-only
            "version": 3,
        }

    def willneed(self, piece: int) -> None:
        """``madvise(MADV_WILLNEED)`` the whole map in pieces of ``piece`` bytes (a multiple
        of the page size), stopping at the first the kernel refuses.

        The loop over pieces lives here, not in :meth:`ListReader.prefetch` over a ranged
        ``madvise`` method, so that a piece costs one foreign call and no Python method call:
        with ``prefetch = True`` every probed list is advised on every search.
        """
        if not self._addr:
            return
        fn, end = self._libc.madvise, self._addr + self._nbytes
        for start in range(self._addr, end, piece):  # pieces of a list, not rows
            if fn(start, min(piece, end - start), mmap.MADV_WILLNEED):
                return

    def __del__(self) -> None:
        if self._addr:
            self._libc.munmap(self._addr, self._nbytes)
            self._addr = 0


def _map(
    path: Path, dtype: np.dtype[np.generic], shape: tuple[int, ...], populate: bool = True
) -> NDArray[np.generic]:
    """Map exactly ``shape`` rows of ``path`` read-only, as an ``np.memmap``.

    Only the requested extent is mapped, never the torn tail past the committed prefix.
    Made with libc's ``mmap`` (:class:`_FileMap`), so that a mapped list holds no file
    descriptor, and MAP_POPULATE fills the page tables in one call instead of one fault per
    page; ``np.memmap(...)`` also cost ~90 us of Python-level setup per file
    (tools/bench_map.py). ``populate=False`` skips MAP_POPULATE (which reads a cold file
    synchronously) for callers that prefetch many lists asynchronously first.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        mm: Any
        if _LIBC is not None:
            mm = _FileMap(_LIBC, fd, nbytes, flags, dtype, shape)
            mapped: Any = np.asarray(mm).view(np.memmap)
        else:
            mm = mmap.mmap(fd, nbytes, flags=flags, prot=mmap.PROT_READ)
            mapped = np.ndarray.__new__(np.memmap, shape, dtype=dtype, buffer=mm)
    finally:
        os.close(fd)
    # The attributes np.memmap.__new__ would set, so the result behaves as one.
    mapped._mmap, mapped.offset, mapped.mode, mapped.filename = mm, 0, "r", os.fspath(path)
    return mapped  # type: ignore[no-any-return]


# One MADV_WILLNEED reads at most max(read_ahead_kb, max_sectors_kb) of the range and drops
# the rest (force_page_cache_ra in mm/readahead.c): 128 KiB of read-ahead is a common
# default, so a list advised in one call would be read in only so far. Lists are advised in
# pieces of the device's read-ahead size, and at least this.
_MIN_ADVICE_PIECE: Final = 128 << 10
_SYSFS_READ_BYTES: Final = 32  # a sysfs number and its newline


def readahead_files(dev: int) -> tuple[str, ...]:
    """The sysfs files that may give the read-ahead size of device ``dev`` (an ``st_dev``),
    in the order :func:`advice_piece` tries them; the only files outside an index that
    opening it reads."""
    name = f"{os.major(dev)}:{os.minor(dev)}"
    # A whole disk, LVM or NFS has a backing device named by its number; a partition's
    # read-ahead is its disk's.
    return (
        f"/sys/class/bdi/{name}/read_ahead_kb",
        f"/sys/dev/block/{name}/queue/read_ahead_kb",
        f"/sys/dev/block/{name}/../queue/read_ahead_kb",
    )


def advice_piece(root: Path) -> int:
    """Bytes per ``MADV_WILLNEED`` call that the kernel reads in full for files under ``root``:
    the read-ahead size of the device holding it (``read_ahead_kb`` of its backing device
    or block queue in sysfs), but at least 128 KiB; 128 KiB where sysfs does not tell."""
    try:
        dev = root.stat().st_dev
    except OSError:
        return _MIN_ADVICE_PIECE
    for where in readahead_files(dev):
        try:
            with open(where, "rb") as f:
                kib = int(f.read(_SYSFS_READ_BYTES))
        except (OSError, ValueError):
            continue
        # Whole pages: madvise refuses a range that starts inside one.
        return max(_MIN_ADVICE_PIECE, (kib << 10) // mmap.PAGESIZE * mmap.PAGESIZE)
    return _MIN_ADVICE_PIECE


class ListReader:
    """Maps committed list prefixes read-only.

    Parameters
    ----------
    root
        Index directory.
    dim, vector_dtype
        Row shape and on-disk dtype string (``"<f4"``...).
    """

    def __init__(self, root: Path, dim: int, vector_dtype: str) -> None:
        self.root = root
        self.dim = dim
        self.dtype: np.dtype[np.generic] = np.dtype(vector_dtype)
        self.maps_created = 0  # counting hook: tests prove a search maps only probed lists
        self.advice_piece = advice_piece(root)

    def prefetch(self, view: ListView) -> None:
        """Ask the kernel to start reading all of ``view`` now (``MADV_WILLNEED``), without
        waiting for it. A map that refuses the advice is read on first touch instead."""
        piece = self.advice_piece
        for arr in view:
            mm = getattr(arr, "_mmap", None)
            if isinstance(mm, _FileMap):
                mm.willneed(piece)
            elif mm is not None:  # mmap.mmap, where libc's mmap is not available
                nbytes = arr.nbytes
                for start in range(0, nbytes, piece):  # pieces of a list, not rows
                    try:
                        mm.madvise(mmap.MADV_WILLNEED, start, min(piece, nbytes - start))
                    except (AttributeError, OSError, ValueError):
                        break

    def prefetch_all(self, views: list[ListView]) -> None:
        """:meth:`prefetch` each of ``views`` in turn."""
        for view in views:  # lists, not rows
            self.prefetch(view)

    def get(self, list_id: int, count: int, gen: int, *, populate: bool = True) -> ListView | None:
        """Map list ``list_id``'s first ``count`` rows (file generation ``gen``); None if empty.

        Raises
        ------
        CorruptIndexError
            A list file is missing or shorter than the committed count.
        """
        if count == 0:
            return None
        vec_name, ids_name = list_file_names(list_id, gen)
        vec_path, ids_path = self.root / vec_name, self.root / ids_name
        need_vec = count * self.dim * self.dtype.itemsize
        for path, need in ((vec_path, need_vec), (ids_path, count * 8)):
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptIndexError(
                    f"corrupt: list {list_id} has {count} committed rows but {path.name} is missing"
                ) from None
            if size < need:
                raise CorruptIndexError(
                    f"corrupt: list {list_id} file {path.name} has {size} bytes, "
                    f"fewer than the {need} its {count} committed rows need"
                )
        self.maps_created += 1
        try:
            return ListView(
                _map(vec_path, self.dtype, (count, self.dim), populate),
                _map(ids_path, np.dtype(ID_DTYPE), (count,), populate),  # type: ignore[arg-type]
            )
        except FileNotFoundError:  # deleted between stat and map (a compaction)
            raise CorruptIndexError(
                f"corrupt: list {list_id} has {count} committed rows but its files are missing"
            ) from None


def check_list_files(root: Path, rec: CommitRecord, dim: int, itemsize: int) -> None:
    """Check that every non-empty list's files are at least as long as its committed prefix.

    This is the cheap open-time check (one ``stat`` per file); :func:`crc_prefix` is the full one.

    Raises
    ------
    CorruptIndexError
        Naming the first list whose file is missing or short.
    """
    sizes: dict[str, int] = {}
    lists_dir = root / LISTS_DIR
    if lists_dir.is_dir():
        with os.scandir(lists_dir) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    sizes[entry.name] = entry.stat(follow_symlinks=False).st_size
    rowbytes = dim * itemsize
    for list_id in np.flatnonzero(rec.list_counts).tolist():
        count = int(rec.list_counts[list_id])
        for name, need in zip(
            list_file_names(list_id, int(rec.list_gens[list_id])),
            (count * rowbytes, count * 8),
            strict=True,
        ):
            base = name.rsplit("/", 1)[1]
            size = sizes.get(base)
            if size is None:
                raise CorruptIndexError(
                    f"corrupt: list {list_id} has {count} committed rows but {name} is missing"
                )
            if size < need:
                raise CorruptIndexError(
                    f"corrupt: list {list_id} file {name} has {size} bytes, fewer than the "
                    f"{need} its {count} committed rows need"
                )


def crc_prefix(path: Path, nbytes: int) -> int:
    """CRC32 of the first ``nbytes`` of ``path``, read in bounded chunks.

    Raises
    ------
    CorruptIndexError
        The file is shorter than ``nbytes``.
    """
    crc = 0
    with open(path, "rb") as f:
        left = nbytes
        while left:
            chunk = f.read(min(left, _CRC_CHUNK))
            if not chunk:
                raise CorruptIndexError(f"corrupt: {path.name} is shorter than {nbytes} bytes")
            crc = crc32(chunk, crc)
            left -= len(chunk)
    return crc


_SYNC_THREADS = 16


def _fd_budget() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(16, min(4096, soft // 4))


def map_budget() -> int:
    """Lists a reader may keep mapped between searches.

    Each list is two maps. Made by :class:`_FileMap` they hold no descriptor, and the bound
    is the kernel's count of maps per process (``vm.max_map_count``, 65530 by default), a
    quarter of which goes to lists kept between searches; a search maps all the lists it
    probes on top. Where ``mmap.mmap`` has to be used, each map holds a descriptor and a
    quarter of the soft ``RLIMIT_NOFILE`` goes to them instead.
    """
    if _LIBC is not None:
        return max(16, _MAX_MAP_COUNT // 8)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    return max(16, soft // 4)


def _max_map_count() -> int:
    """``vm.max_map_count`` (Linux), or its default where it cannot be read."""
    try:
        with open("/proc/sys/vm/max_map_count", "rb") as f:
            return int(f.read(32))
    except (OSError, ValueError):
        return 65530


# Read once, at import: opening an index then reads no file outside it but the read-ahead
# setting of its device (readahead_files).
_MAX_MAP_COUNT = _max_map_count()


class ListWriter:
    """Appends rows past the committed prefix of list files, then makes them durable.

    One writer exists per open index. Appends go to ``pwrite`` at an explicit offset, so a torn
    tail from a crashed writer is simply overwritten. :meth:`sync` fsyncs every file written
    since the last sync (and the lists directory when files were created), which the commit
    protocol requires before publishing a commit record.

    Parameters
    ----------
    root
        Index directory.
    durable
        When False, :meth:`sync` skips fsync: much faster, but a power loss may then lose
        batches that were reported committed (a process crash still cannot).
    """

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._dirty: set[str] = set()
        # True at first: list files left by a writer that crashed may have directory entries
        # that never reached the disk, so the first sync fsyncs the directories as well.
        self._created = True
        self._max_fds = _fd_budget()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is not None:
            self._fds.move_to_end(name)
            return fd
        if len(self._fds) >= self._max_fds:
            old, old_fd = self._fds.popitem(last=False)
            # fsync before close so a write-back error is reported to us, not lost.
            try:
                if self.durable and old in self._dirty:
                    os.fsync(old_fd)
                    self._dirty.discard(old)
            finally:
                os.close(old_fd)
        path = self.root / name
        try:
            fd = os.open(path, os.O_WRONLY)
        except FileNotFoundError:
            (self.root / LISTS_DIR).mkdir(exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            self._created = True
        self._fds[name] = fd
        return fd

    def write(self, name: str, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at byte ``offset`` of ``name`` (relative to the index root).

        Raises
        ------
        OSError
            Any write failure (``ENOSPC``...), including a short write.
        """
        fd = self._fd(name)
        view = memoryview(data).cast("B")
        self._dirty.add(name)
        while view:
            n = os.pwrite(fd, view, offset)
            if n <= 0:  # pragma: no cover - pwrite raises rather than returning 0 on Linux
                raise OSError(errno.EIO, f"short write to {name}")
            view = view[n:]
            offset += n

    def sync(self) -> None:
        """fsync every file written since the last sync, then the directory if it changed.

        Raises
        ------
        OSError
            An fsync failed; the caller must treat the writer as poisoned.
        """
        if self.durable:
            names = sorted(self._dirty)
            if len(names) <= 2:
                for name in names:
                    self._sync_one(name)
            else:
                # Devices complete concurrent flushes far faster than a serial chain of them
                # (measured ~10x on virtual disks); fsync releases the GIL.
                with ThreadPoolExecutor(min(_SYNC_THREADS, len(names))) as pool:
                    for _ in pool.map(self._sync_one, names):
                        pass
            if self._created:
                if (self.root / LISTS_DIR).is_dir():
                    fsync_dir(self.root / LISTS_DIR)
                fsync_dir(self.root)
        self._dirty.clear()
        self._created = False

    def _sync_one(self, name: str) -> None:
        fd = self._fds.get(name)
        if fd is not None:
            os.fsync(fd)
            return
        fd = os.open(self.root / name, os.O_WRONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_files(self, names: list[str]) -> None:
        """fsync the given files (relative to the root), the lists directory and the root.

        Used by ``flush()`` after commits made with ``durable=False``.

        Raises
        ------
        OSError
            An fsync failed.
        """
        for name in names:
            fd = os.open(self.root / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if (self.root / LISTS_DIR).is_dir():
            fsync_dir(self.root / LISTS_DIR)
        fsync_dir(self.root)

    def forget(self, names: list[str]) -> None:
        """Close the descriptors of ``names`` (files about to be deleted), without syncing."""
        for name in names:
            fd = self._fds.pop(name, None)
            self._dirty.discard(name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def close(self) -> None:
        """Close every file descriptor (without syncing). Idempotent."""
        while self._fds:
            _, fd = self._fds.popitem()
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dirty.clear()


@dataclass(frozen=True)
class Problem:
    """One thing a verification found wrong.

    Attributes
    ----------
    file : str
        The damaged file, relative to the index directory (``"lists/0000003.0.vec"``).
    list_id : int or None
        The inverted list the file belongs to; ``None`` for the metadata and commit files.
    message : str
        What is wrong, with expected and found values.
    """

    file: str
    list_id: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.list_id is None else f"{self.file} (list {self.list_id})"
        return f"{where}: {self.message}"


@dataclass
class ListCheck:
    """What :func:`verify_lists` found.

    Attributes
    ----------
    problems : list of Problem
        One per damaged list file, in list order.
    lists_checked : int
        Non-empty lists whose files were checked.
    bytes_checked : int
        Committed list bytes read and checksummed.
    torn : int
        Intact list files holding bytes past their committed prefix (an interrupted append).
    files : set of str
        Base names (in ``lists/``) of every list file the commit record references.
    """

    problems: list[Problem] = field(default_factory=list)
    lists_checked: int = 0
    bytes_checked: int = 0
    torn: int = 0
    files: set[str] = field(default_factory=set)


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def verify_lists(
    root: Path,
    rec: CommitRecord,
    dim: int,
    itemsize: int,
    sizes: Mapping[str, int] | None = None,
) -> ListCheck:
    """Check every committed byte of every list against the commit record's CRC32s.

    The one per-list check behind :meth:`diskivf.Index.verify` and :func:`diskivf.verify`: for
    every non-empty list, both its files exist, hold at least the committed prefix, and the
    CRC32 of that prefix matches the commit record.

    Parameters
    ----------
    root
        Index directory.
    rec
        The commit record to check against.
    dim, itemsize
        Row dimension and vector item size.
    sizes
        Sizes of the files in ``lists/`` by base name, if already listed; by default each
        list file is ``stat``-ed.

    Returns
    -------
    ListCheck
        Its ``problems`` are empty when every list is intact.
    """
    out = ListCheck()
    rowbytes = dim * itemsize
    for list_id in np.flatnonzero(rec.list_counts).tolist():
        count = int(rec.list_counts[list_id])
        names = list_file_names(list_id, int(rec.list_gens[list_id]))
        crcs = (int(rec.vec_crc32[list_id]), int(rec.ids_crc32[list_id]))
        out.lists_checked += 1
        for name, need, want in zip(names, (count * rowbytes, count * 8), crcs, strict=True):
            base = name.rsplit("/", 1)[1]
            out.files.add(base)
            size = _size(root / name) if sizes is None else sizes.get(base)
            missing = Problem(name, list_id, f"missing (the commit record has {count} rows)")
            if size is None:
                out.problems.append(missing)
                continue
            if size < need:
                out.problems.append(
                    Problem(
                        name,
                        list_id,
                        f"truncated: {size:,} bytes, but its {count:,} committed rows need "
                        f"{need:,}",
                    )
                )
                continue
            try:
                got = crc_prefix(root / name, need)
            except FileNotFoundError:  # removed since it was listed
                out.problems.append(missing)
                continue
            except CorruptIndexError:  # shrank since it was listed
                out.problems.append(Problem(name, list_id, f"shorter than {need:,} bytes"))
                continue
            out.bytes_checked += need
            if got != want:
                out.problems.append(
                    Problem(
                        name,
                        list_id,
                        f"checksum mismatch over its {count:,} committed rows ({need:,} bytes): "
                        f"expected crc32 {want:08x}, found {got:08x}",
                    )
                )
            elif size > need:
                out.torn += 1
    return out
