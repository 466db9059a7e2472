"""The facade: open modes, the writer lock, train / add / search / commit, snapshots.

This is the only module that combines storage (:mod:`diskivf.format`, :mod:`diskivf.segments`)
with the algorithms (:mod:`diskivf.kmeans`, :mod:`diskivf.search`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import math
import os
import re
import shutil
import threading
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast, get_args, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from diskivf import _jit, kmeans
from diskivf import format as fmt
from diskivf import search as scan
from diskivf._blas import blas_threads
from diskivf._cpu import LAST_LEVEL_CACHE_BYTES, usable_cpus
from diskivf._threads import Workers
from diskivf.errors import (
    AlreadyTrainedError,
    CorruptIndexError,
    DiskIVFError,
    FormatError,
    IndexExistsError,
    IndexNotFoundError,
    IndexReplacedError,
    LockedError,
    NotTrainedError,
    PoisonedError,
    ReadOnlyError,
    UnsupportedVersionError,
)
from diskivf.io import release_rows
from diskivf.segments import (
    ListReader,
    ListView,
    ListWriter,
    check_list_files,
    map_budget,
    verify_lists,
)

__all__ = ["Index", "Mode", "SearchResult", "SearchStats", "VerifyReport", "open_index"]

Mode = Literal["r", "r+", "a", "w", "w-"]
_MODES: Final = get_args(Mode)
_DTYPES: Final = {"float32": "<f4", "float16": "<f2"}

# Bounds on transient memory; see the docstrings of add() and search().
_ADD_BATCH: Final = 65536
_SEARCH_CHUNK_CANDIDATES: Final = 1 << 21  # queries x nprobe x k per chunk
_SEARCH_CHUNK_COARSE: Final = 1 << 21  # queries x nlist coarse scores per chunk
_ASSIGN_BLOCK_FLOATS: Final = 1 << 20  # rows x nlist scores per assignment block
_NORM_CACHE_BYTES: Final = 256 << 20
# Below this estimated GIL-free time per list visit a batch runs on one thread (_worth_threads).
# python tools/bench_batch_threads.py, forced 2-thread batches against one thread: 0.64-1.01x
# (all but one below 0.96x) wherever the estimate was 8-19 us, 0.97-1.21x at 22-39 us,
# 1.37-1.42x at 43-118 us (100k x 64 with 200 and 1000 queries, 1M x 128 with 1000). At 10 us,
# batches of 10-19 us had gone to threads.
_THREAD_MIN_VISIT_US: Final = 20.0

ProgressFn = Callable[[int, int], None]


class SearchResult(NamedTuple):
    """Result of :meth:`Index.search`; unpacks as ``D, I = index.search(...)``.

    Attributes
    ----------
    distances : ndarray of float32, shape (n, k)
        ``"l2"``: squared Euclidean distance, ascending. ``"ip"``: inner product, descending.
        ``"cosine"``: cosine similarity, descending. Padding is ``+inf`` (l2) or ``-inf``.
    ids : ndarray of int64, shape (n, k)
        Ids of the neighbours; ``-1`` where the probed lists held fewer than ``k`` vectors.
    """

    distances: NDArray[np.float32]
    ids: NDArray[np.int64]


class SearchStats(NamedTuple):
    """I/O accounting of one :meth:`Index.search` call (``stats=True``).

    Attributes
    ----------
    nqueries : int
        Queries in the call.
    lists_probed : int
        (query, list) pairs probed, empty lists included: ``nqueries * nprobe``.
    lists_read : int
        Distinct non-empty lists read (each once per call, however many queries probe it).
    vectors_scanned : int
        (query, vector) pairs scored.
    bytes_touched : int
        Bytes of vectors and ids in the lists read.
    """

    nqueries: int
    lists_probed: int
    lists_read: int
    vectors_scanned: int
    bytes_touched: int


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`Index.verify`: ``ok`` is True when ``problems`` is empty."""

    generation: int
    lists_checked: int
    bytes_checked: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every checksum and size matched."""
        return not self.problems


class _StaleSnapshotError(Exception):
    """A list file of this reader's snapshot was deleted by a newer commit (compaction)."""


@dataclass
class _Pending:
    """The next commit record under construction: copies of the current one's arrays."""

    counts: NDArray[np.int64]
    gens: NDArray[np.uint32]
    vcrc: NDArray[np.uint32]
    icrc: NDArray[np.uint32]
    tombstones: NDArray[np.int64]
    next_id: int
    new_ids: list[NDArray[np.int64]] = field(default_factory=list)
    new_rows: list[NDArray[np.int64]] = field(default_factory=list)

    @classmethod
    def start(cls, rec: fmt.CommitRecord) -> _Pending:
        return cls(
            rec.list_counts.copy(),
            rec.list_gens.copy(),
            rec.vec_crc32.copy(),
            rec.ids_crc32.copy(),
            rec.tombstones.copy(),
            rec.next_id,
        )

    def remove_rows(self, rows: NDArray[np.int64]) -> None:
        merged = np.union1d(self.tombstones, rows)
        if merged.size > fmt.MAX_TOMBSTONES:
            raise ValueError(
                f"expected at most {fmt.MAX_TOMBSTONES} removed rows outstanding but this would "
                f"make {merged.size}; call compact() first"
            )
        self.tombstones = merged.astype(np.int64)


class _IdMap:
    """id -> packed (list, row) positions: a sorted base plus runs appended since."""

    def __init__(self, ids: list[NDArray[np.int64]], rows: list[NDArray[np.int64]]) -> None:
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        all_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        self.ids, self.rows = all_ids[order], all_rows[order]
        self.extra_ids: list[NDArray[np.int64]] = []
        self.extra_rows: list[NDArray[np.int64]] = []
        self.extra_size = 0

    def extend(self, ids: NDArray[np.int64], rows: NDArray[np.int64]) -> None:
        self.extra_ids.append(ids)
        self.extra_rows.append(rows)
        self.extra_size += len(ids)
        if self.extra_size > max(1 << 16, len(self.ids) // 8):  # merge: keep lookups O(log n)
            self.__init__([self.ids, *self.extra_ids], [self.rows, *self.extra_rows])  # type: ignore[misc]

    def lookup(self, want: NDArray[np.int64]) -> NDArray[np.int64]:
        """Every row holding one of the sorted unique ids ``want``."""
        lo = np.searchsorted(self.ids, want, side="left")
        hi = np.searchsorted(self.ids, want, side="right")
        lens = hi - lo
        total = int(lens.sum())
        # Expand the [lo, hi) ranges without a Python loop over ids.
        idx = np.repeat(lo - np.cumsum(lens) + lens, lens) + np.arange(total)
        found = [self.rows[idx]]
        for ids, rows in zip(self.extra_ids, self.extra_rows, strict=True):
            found.append(rows[np.isin(ids, want)])
        return np.concatenate(found)


def _drop_removed(rows: NDArray[np.int64], tombstones: NDArray[np.int64]) -> NDArray[np.int64]:
    """``rows`` minus those already tombstoned, sorted and unique."""
    return np.setdiff1d(rows, tombstones, assume_unique=False)


def _split_by_list(tombstones: NDArray[np.int64]) -> dict[int, NDArray[np.int64]]:
    """Sorted packed tombstones -> {list_id: removed row numbers}."""
    if tombstones.size == 0:
        return {}
    lists = tombstones >> fmt.ROW_BITS
    rows = tombstones & ((1 << fmt.ROW_BITS) - 1)
    cuts = np.flatnonzero(np.diff(lists)) + 1
    return {
        int(lists[a]): rows[a:b] for a, b in itertools.pairwise([0, *cuts.tolist(), len(lists)])
    }


def _default_threads(nqueries: int) -> int:
    if nqueries < 64:
        return 1
    return min(8, usable_cpus())


def _default_nprobe(nlist: int) -> int:
    # About 3% of the lists reaches recall@10 ~0.9 on clustered data in our benchmarks.
    return max(1, min(nlist, round(nlist / 32)))


def _as_float_matrix(x: ArrayLike, dim: int, what: str) -> NDArray[Any]:
    """Validate shape and dtype of user vectors without copying; 1-D becomes one row."""
    arr = x if isinstance(x, np.ndarray) else np.asarray(x)
    given = arr.shape
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"expected {what} of shape (n, {dim}) or ({dim},) but got {given}")
    if arr.shape[1] != dim:
        raise ValueError(
            f"expected {what} of dimension {dim} but got dimension {arr.shape[1]} (shape {given})"
        )
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise ValueError(f"expected numeric {what} but got dtype {arr.dtype}")
    return arr


# Squared norms below this keep every cost (|x|^2 - 2 x.q + |q|^2) finite in float32, so an
# infinite cost can only mean a removed row.
_MAX_SQNORM: Final = 1e36


def _check_vectors(x: NDArray[np.float32], what: str, row0: int = 0) -> None:
    """Reject NaN, infinity and squared norms of ``_MAX_SQNORM`` or more, naming the first row.

    One pass computes the squared norms, which are NaN or infinite whenever a value is; the
    rows are only examined further, to name the error, when that pass finds one.
    """
    if x.shape[0] == 1:
        # A single query: one float64 dot, which cannot overflow (and so cannot warn), costs
        # a third of the einsum and reduction below on the single-query path.
        row = x[0].astype(np.float64)
        if float(row @ row) < _MAX_SQNORM:  # False for NaN too
            return
        ok = np.array([False])
    else:
        sq = np.einsum("ij,ij->i", x, x)  # silent on overflow, unlike vecdot
        ok = sq < _MAX_SQNORM  # False for NaN too
        if ok.all():
            return
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0]) + row0
        raise ValueError(f"{what} contain NaN or infinity (first at row {bad})")
    raise ValueError(
        f"{what} must have squared norms below {_MAX_SQNORM:g} (float32 range) but row "
        f"{row0 + int(np.flatnonzero(~ok)[0])} does not"
    )


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"expected {name} to be an integer but got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"expected {name} {rng} but got {value}")
    return int(value)


def prepare_queries(queries: ArrayLike, dim: int, metric: str) -> NDArray[np.float32]:
    """Validate queries and convert them as every search does: C-order float32 rows, unit
    norm for the cosine metric. A 1-D query becomes one row.

    Raises
    ------
    ValueError
        Wrong shape or dimension, a non-numeric dtype, NaN, infinity or a huge norm.
    """
    q = _as_float_matrix(queries, dim, "queries")
    q = np.array(q, dtype=np.float32, order="C")
    if q.shape[0] == 1:
        # A single query: its float64 squared norm serves both the check and, for cosine,
        # the scaling. The array calls of the general path cost 60-70 us more when a scan
        # has just flushed the CPU's caches, as it has between single queries.
        row = q[0].astype(np.float64)
        sq = float(row @ row)  # float64 cannot overflow here, so it cannot warn either
        if not sq < _MAX_SQNORM:  # NaN too
            _check_vectors(q, "queries")  # names the error
        if metric == "cosine":
            if sq == 0.0:  # float32 values square to nonzero float64 unless all are zero
                _refuse_zero_rows(q, "search for", 0)
            q[0] = row / math.sqrt(sq)  # float64 division, as normalize_rows does
        return q
    _check_vectors(q, "queries")
    if metric == "cosine":
        _refuse_zero_rows(q, "search for", 0)
        scan.normalize_rows(q)
    return q


def _refuse_zero_rows(x: NDArray[np.float32], verb: str, row0: int) -> None:
    """A zero vector has no direction, so the cosine metric can neither store nor search it."""
    zero = np.flatnonzero(~np.any(x, axis=1))
    if zero.size:
        raise ValueError(f"the cosine metric cannot {verb} a zero vector (row {row0 + zero[0]})")


def finish_distances(
    metric: str, q: NDArray[np.float32], cost: NDArray[np.float32], ids: NDArray[np.int64]
) -> None:
    """Turn the search costs of prepared queries ``q`` into distances, in place.

    l2: ``cost + ||q||^2``, clipped at 0; ip and cosine: ``-cost``. Clipping can make
    neighbours that rounding had ordered by cost equal at 0; those rows are re-sorted by
    ``(distance, id)``, in place with ``ids``, so that equal distances list ids ascending.
    """
    if metric != "l2":
        np.negative(cost, out=cost)
        return
    if q.shape[0] == 1:
        cost += np.dot(q[0], q[0])
        if cost[0, 0] >= 0:  # one row: its first cost alone decides
            return
    else:
        cost += np.einsum("ij,ij->i", q, q)[:, None]
    # Rows ascend, so a row holds a negative cost iff its first one is: one column to check.
    first = cost[:, 0]  # k >= 1
    if not (first < 0).any():
        return
    clipped = np.flatnonzero(first < 0)
    np.maximum(cost, 0, out=cost)
    for r in clipped.tolist():  # rows, not vectors: only queries with exact duplicates stored
        order = np.lexsort((ids[r], cost[r]))
        cost[r], ids[r] = cost[r, order], ids[r, order]


_F = TypeVar("_F", bound=Callable[..., Any])


class _SnapshotGate:
    """Searches share a handle's snapshot; a swap (refresh, a commit) waits for them to end.

    Without it, a search running while another thread refreshed the handle read lists of two
    snapshots (a row both before and after an upsert, or neither) and could cache a list of
    the old snapshot as current. Swaps go first once waiting, so searches cannot starve them.
    ``with gate:`` is a search (kept to two plain-lock sections: it is on the single-query
    path); ``with gate.swap():`` a swap.
    """

    def __init__(self) -> None:
        # Searches take the plain lock (a C-level ``with``; the condition's own ``__enter__``
        # is a Python call) and wake waiters only when a swap waits for them.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._searches = 0
        self._swapping = False

    def __enter__(self) -> None:
        with self._lock:
            while self._swapping:
                self._cond.wait()
            self._searches += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._searches -= 1
            if self._swapping and not self._searches:
                self._cond.notify_all()

    @contextlib.contextmanager
    def swap(self) -> Iterator[None]:
        with self._cond:
            while self._swapping:
                self._cond.wait()
            self._swapping = True
            while self._searches:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._swapping = False
                self._cond.notify_all()


def _release_abandoned(path: Path, writer: ListWriter | None, lock_fd: int | None) -> None:
    """Finalizer of a handle garbage-collected without :meth:`Index.close`: its descriptors
    (and so the writer lock) would otherwise stay open until the process exits."""
    warnings.warn(
        f"diskivf index {str(path)!r} was not closed; use it as a context manager or call close()",
        ResourceWarning,
        stacklevel=2,
    )
    if writer is not None:
        writer.close()
    if lock_fd is not None:
        with contextlib.suppress(OSError):
            os.close(lock_fd)


def _serialised(method: _F) -> _F:
    """Run a writing method under the handle's write lock: two threads writing through one
    handle would otherwise stage rows past the same pending list ends and lose one batch."""

    @functools.wraps(method)
    def locked(self: Index, *args: Any, **kwargs: Any) -> Any:
        with self._write_lock:
            return method(self, *args, **kwargs)

    return cast(_F, locked)


class Index:
    """An on-disk IVF index. Create or open one with :func:`diskivf.open`.

    Every :meth:`add` is one atomic commit: after a crash the index holds exactly the batches
    whose ``add`` returned (and possibly the one in flight, whole or not at all). Readers see the
    snapshot committed when they opened (or last called :meth:`refresh`).

    Threads: searches may run on several threads through one handle; each runs on one
    snapshot, since :meth:`refresh` (and a commit through a writer handle) waits for searches
    in progress before it swaps the snapshot. Writes through one handle (add, remove, upsert,
    compact, train...) are serialised by a lock. After ``os.fork`` a child may search through
    an inherited handle but not write through it. A writer handle dropped without
    :meth:`close` releases its lock when garbage collected, with a ``ResourceWarning``.

    Maps: every mapped list is two maps (vectors and ids), which hold no file descriptor. A
    handle keeps at most an eighth of ``vm.max_map_count`` worth of lists mapped between
    searches (8191 by default); one search maps all the lists it probes at once, so nprobe
    is bounded by the kernel's map count (about 32,000 lists by default), not by
    ``RLIMIT_NOFILE``.
    """

    def __init__(
        self,
        path: Path,
        mode: Mode,
        meta: fmt.Metadata,
        commit: fmt.CommitRecord,
        lock_fd: int | None,
        durable: bool,
    ) -> None:
        self._path = path
        self._mode: Mode = mode
        self._meta = meta
        self._commit = commit
        self._lock_fd = lock_fd
        self._reader = ListReader(path, meta.dim, meta.vector_dtype)
        self._writer = ListWriter(path, durable=durable) if lock_fd is not None else None
        self._durable = durable
        self._poisoned: str | None = None
        self._closed = False
        self._write_lock = threading.RLock()
        self._map_budget = map_budget()  # lists kept mapped between searches
        self._streamed_for: tuple[fmt.CommitRecord, bool] | None = None
        # Writers only: a reader's maps and descriptors go with its arrays when collected.
        # Holds the writer and the lock descriptor, not the handle, so it cannot keep it alive.
        self._finalizer: weakref.finalize[Any, Any] | None = None
        if lock_fd is not None:
            self._finalizer = weakref.finalize(
                self, _release_abandoned, path, self._writer, lock_fd
            )
            self._finalizer.atexit = False  # at exit the process releases everything anyway
        self._gate = _SnapshotGate()
        self._pid = os.getpid()  # a forked child must not write through its parent's handle
        # (count, gen, view) per list, bounded by the bytes of cached norms; _live (set with
        # each snapshot) holds the entries valid for it, so the hot path indexes a list.
        self._cache: OrderedDict[int, tuple[tuple[int, int, int], scan.ScanList]] = OrderedDict()
        self._idmap: _IdMap | None = None
        self._maps: dict[int, ListView] = {}
        self._maps_gen: dict[int, int] = {}
        self._prefetch = False
        self._workers = Workers()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        self._set_centroids()

    # ---------------------------------------------------------------- properties

    @property
    def _commit(self) -> fmt.CommitRecord:
        return self._snapshot

    @_commit.setter
    def _commit(self, rec: fmt.CommitRecord) -> None:
        # A new snapshot may change any list's count: views are re-validated on next use.
        self._snapshot = rec
        # Per list: its view once validated for this snapshot (else None), and its rows as
        # Python ints, so that a single query finds both for its probed lists by indexing.
        self._live: list[scan.ScanList | None] = [None] * len(rec.list_counts)
        self._counts: list[int] = rec.list_counts.tolist()
        self._removed = _split_by_list(rec.tombstones)

    @property
    def path(self) -> Path:
        """Directory of the index."""
        return self._path

    @property
    def mode(self) -> Mode:
        """The mode the index was opened with."""
        return self._mode

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._meta.dim

    @property
    def nlist(self) -> int:
        """Number of inverted lists (k-means cells)."""
        return self._meta.nlist

    @property
    def metric(self) -> fmt.Metric:
        """``"l2"``, ``"ip"`` or ``"cosine"``."""
        return self._meta.metric

    @property
    def nprobe(self) -> int:
        """Default number of lists a search probes (stored in the index)."""
        return self._meta.nprobe

    @property
    def dtype(self) -> np.dtype[Any]:
        """On-disk dtype of the stored vectors."""
        return np.dtype(self._meta.vector_dtype)

    @property
    def ntotal(self) -> int:
        """Vectors in the current snapshot."""
        return self._commit.ntotal

    @property
    def generation(self) -> int:
        """Commit generation of the current snapshot (0 for a new index, +1 per commit)."""
        return self._commit.generation

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`train` has run."""
        return self._meta.trained

    @property
    def readonly(self) -> bool:
        """True when opened with mode ``"r"``."""
        return self._writer is None

    @property
    def prefetch(self) -> bool:
        """Whether every search advises the kernel to read all its probed lists at once.

        ``False`` (default) advises only lists this handle has not mapped yet, whose first
        read is the likely cold one. ``True`` advises every probed list on every search,
        for long-running readers whose page cache may be evicted under them. The advice is
        given on a background thread; the search scores lists already read in meanwhile.

        Raises
        ------
        TypeError
            Set to anything but a bool.
        """
        return self._prefetch

    @prefetch.setter
    def prefetch(self, value: bool) -> None:
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"expected prefetch to be a bool but got {type(value).__name__}")
        self._prefetch = bool(value)

    @property
    def centroids(self) -> NDArray[np.float32]:
        """A copy of the ``(nlist, dim)`` centroids.

        Raises
        ------
        NotTrainedError
            The index has not been trained.
        """
        return self._need_centroids().copy()

    @property
    def metadata(self) -> fmt.Metadata:
        """The decoded metadata header (read-only dataclass)."""
        return self._meta

    def list_sizes(self) -> NDArray[np.int64]:
        """Live (committed, not removed) vectors per list, shape ``(nlist,)``."""
        sizes = self._commit.list_counts.copy()
        np.subtract.at(sizes, self._commit.tombstones >> fmt.ROW_BITS, 1)
        return sizes

    @property
    def nremoved(self) -> int:
        """Removed rows whose bytes :meth:`compact` would reclaim."""
        return len(self._commit.tombstones)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"mode={self._mode!r}"
        return (
            f"<diskivf.Index {str(self._path)!r} {state} dim={self.dim} nlist={self.nlist} "
            f"metric={self.metric!r} ntotal={self.ntotal} generation={self.generation}>"
        )

    # ---------------------------------------------------------------- lifecycle

    def __enter__(self) -> Index:  # noqa: PYI034 - Index is final; Self needs Python 3.11
        self._check_open()  # a closed handle would leave the with-block nothing to use
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the writer lock and file descriptors and drop cached list maps. Idempotent.

        Every committed batch is already on disk, so closing writes nothing. Arrays returned by
        earlier calls stay valid. numpy offers no API to unmap a memmap: a mapping is released
        when the last array referring to it is garbage collected, not by ``close()``.
        """
        with self._write_lock:  # a write in progress on another thread finishes first
            if self._closed:
                return
            self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._writer is not None:
            self._writer.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
        self._workers.shutdown()
        with self._cache_lock:
            self._cache.clear()
            self._live = [None] * len(self._live)
            self._maps.clear()
            self._cache_bytes = 0

    def refresh(self) -> bool:
        """Move to the newest committed snapshot; return True if it changed.

        Writers are always at their own newest commit; this is for readers. Searches of other
        threads through this handle finish on the old snapshot first (see :class:`Index`).

        Raises
        ------
        FormatError
            The newest commit record (or metadata) is damaged.
        """
        self._check_open()
        changed = False
        meta = self._meta if self._meta.trained else fmt.read_meta(self._path)
        rec = _read_checked_commit(self._path, meta)
        with self._gate.swap():  # searches of other threads finish on the old snapshot
            if meta is not self._meta and meta.trained:
                self._meta = meta
                self._set_centroids()
                changed = True
            if rec.generation != self._commit.generation:
                self._commit = rec
                changed = True
        return changed

    @_serialised
    def flush(self) -> None:
        """Make every committed batch durable now.

        With ``durable=True`` (the default) each commit is already fsynced and this does
        nothing. With ``durable=False`` it fsyncs the list files, the commit record and the
        directory, after which a power loss can no longer lose what was committed.

        Raises
        ------
        ReadOnlyError
            The index was opened with mode ``"r"``.
        PoisonedError
            An earlier write failed.
        """
        writer = self._need_writer()
        if self._durable:
            return
        rec = self._commit
        names = [
            name
            for list_id in np.flatnonzero(rec.list_counts).tolist()
            for name in fmt.list_file_names(list_id, int(rec.list_gens[list_id]))
        ]
        try:
            writer.sync_files([*names, fmt.COMMIT_NAME, fmt.META_NAME])
        except OSError as exc:
            self._poison(exc)
            raise

    # ---------------------------------------------------------------- training

    @_serialised
    def train(
        self,
        sample: ArrayLike,
        *,
        niter: int = 10,
        seed: int = 0,
        max_points_per_centroid: int = 256,
    ) -> fmt.TrainingInfo:
        """Learn the ``nlist`` centroids with k-means and write them to the metadata file.

        Parameters
        ----------
        sample
            ``(n, dim)`` training vectors, ``n >= nlist``; a memory map is read only at the
            sampled rows. A few tens of points per list are enough for good lists; more costs
            time linearly.
        niter
            Lloyd iterations (at most; stops early on convergence). 10 is FAISS's default for
            IVF training; 20 takes twice as long and gives better lists: on clustered data
            (300k x 128, nlist 512) recall@10 at nprobe 4/8/16 rose from 0.920/0.947/0.974
            to 0.947/0.969/0.984.
        seed
            Seed for sub-sampling and initialisation: the same sample and seed give the same
            centroids.
        max_points_per_centroid
            Sub-sample to at most ``nlist * max_points_per_centroid`` points (FAISS's default
            256), which bounds training time whatever the sample size.

        Returns
        -------
        TrainingInfo
            Points used, iterations, empty-cluster splits and the objective per iteration.

        Raises
        ------
        AlreadyTrainedError
            The index already has centroids.
        ValueError
            Wrong shape or dimension, non-finite values, or fewer than ``nlist`` points.
        ReadOnlyError, PoisonedError
            Not writable.
        """
        self._need_writer()
        if self._meta.trained:
            raise AlreadyTrainedError(
                f"index {str(self._path)!r} is already trained; create a new index to retrain"
            )
        x = _as_float_matrix(sample, self.dim, "training vectors")
        if x.shape[0] < self.nlist:
            raise ValueError(
                f"expected at least nlist={self.nlist} training vectors but got {x.shape[0]}"
            )
        niter = _check_int(niter, "niter", 1, 10_000)
        seed = _check_int(seed, "seed", -(1 << 62), 1 << 62)
        res = kmeans.train(
            x,
            self.nlist,
            niter=niter,
            seed=seed,
            max_points_per_centroid=_check_int(
                max_points_per_centroid, "max_points_per_centroid", 1
            ),
            spherical=self.metric == "cosine",
        )
        info = fmt.TrainingInfo(res.npoints, res.niter, res.nsplit, seed, res.objective)
        self._write_centroids(res.centroids, info)
        return info

    @_serialised
    def set_centroids(
        self, centroids: ArrayLike, *, training: fmt.TrainingInfo | None = None
    ) -> None:
        """Install centroids trained elsewhere instead of calling :meth:`train`.

        Indexes that share centroids (the same values, ``dim``, ``nlist``, metric and dtype)
        can be searched together with :class:`diskivf.sharded.ShardedIndex` and merged with
        ``diskivf merge``: copy them from a trained index with
        ``new.set_centroids(old.centroids, training=old.metadata.training)``.

        Parameters
        ----------
        centroids
            ``(nlist, dim)`` finite values, stored as float32. For the cosine metric they
            should have unit norm (as :meth:`train` makes them).
        training
            How they were trained (informational), or None.

        Raises
        ------
        AlreadyTrainedError
            The index already has centroids.
        ValueError
            Wrong shape, a non-numeric dtype, NaN or infinity.
        ReadOnlyError, PoisonedError
            Not writable.
        OSError
            Writing the metadata failed (the writer becomes poisoned).
        """
        self._need_writer()
        if self._meta.trained:
            raise AlreadyTrainedError(
                f"index {str(self._path)!r} is already trained; create a new index to retrain"
            )
        c = np.asarray(centroids)
        if c.shape != (self.nlist, self.dim):
            raise ValueError(
                f"expected centroids of shape ({self.nlist}, {self.dim}) but got {c.shape}"
            )
        if c.dtype.kind not in "fiu":
            raise ValueError(f"expected numeric centroids but got dtype {c.dtype}")
        finite = np.isfinite(c).all(axis=1)
        if not finite.all():
            raise ValueError(
                f"expected finite centroids but row {int(np.flatnonzero(~finite)[0])} has NaN "
                "or infinity"
            )
        self._write_centroids(c, training)

    def _write_centroids(self, centroids: ArrayLike, info: fmt.TrainingInfo | None) -> None:
        meta = fmt.Metadata(
            dim=self.dim,
            nlist=self.nlist,
            metric=self.metric,
            vector_dtype=self._meta.vector_dtype,
            nprobe=self._meta.nprobe,
            index_uuid=self._meta.index_uuid,
            centroids=np.ascontiguousarray(centroids, dtype=np.float32),
            training=info,
            created_by=self._meta.created_by,
        )
        try:
            fmt.atomic_write(
                self._path / fmt.META_NAME, fmt.encode_meta(meta), durable=self._durable
            )
        except OSError as exc:
            self._poison(exc)
            raise
        with self._gate.swap():
            self._meta = meta
            self._set_centroids()

    # ---------------------------------------------------------------- adding

    @_serialised
    def add(
        self,
        vectors: ArrayLike,
        ids: ArrayLike | None = None,
        *,
        batch_size: int = _ADD_BATCH,
        progress: bool | ProgressFn = False,
    ) -> NDArray[np.int64]:
        """Add vectors, assigned to their nearest list, in one atomic commit.

        Parameters
        ----------
        vectors
            ``(n, dim)`` or ``(dim,)`` array-like of any real dtype or byte order; cast to the
            index dtype. A memory-mapped array larger than RAM is consumed ``batch_size`` rows at
            a time: memory stays bounded by the batch, not by ``n``. The pages of a read-only or
            shared :class:`numpy.memmap` are unmapped from the process once their batch is
            copied (they stay in the page cache), so its resident set stays bounded too; a
            copy-on-write one (mode ``"c"``) is left as it is.
        ids
            ``n`` non-negative integer ids; default ``next_id, next_id + 1, ...`` where
            ``next_id`` is one past the largest id ever added (0 for a new index). Duplicate ids
            are allowed and returned as separate results.
        batch_size
            Rows converted and assigned per step. One batch is assigned while the previous one
            is written, so transient memory is about ``batch_size * dim * 20`` bytes (float32),
            plus one score block per assignment thread (``max(256, 2**20 // nlist) x nlist``
            float32: 4 MiB up to nlist 4096). Larger batches amortise per-list write calls.
        progress
            ``True`` for a progress bar on stderr, or ``callable(done_rows, total_rows)``.

        Returns
        -------
        ndarray of int64
            The ids of the added vectors, in input order.

        Raises
        ------
        ValueError
            Wrong shape, dimension or dtype; NaN or infinity; ids of the wrong length, dtype or
            sign; a zero vector under the cosine metric. The index is unchanged. Adding zero rows
            is valid and commits nothing.
        NotTrainedError
            :meth:`train` has not run.
        ReadOnlyError
            Opened with mode ``"r"``.
        PoisonedError
            An earlier write failed; reopen the index.
        OSError
            Writing or syncing failed (disk full...). The index on disk stays at its last
            commit and this writer becomes poisoned.
        """
        writer = self._need_writer()
        self._need_centroids()
        x = _as_float_matrix(vectors, self.dim, "vectors")
        batch_size = _check_int(batch_size, "batch_size", 1)
        id_arr = self._check_ids(ids, x.shape[0])
        if x.shape[0] == 0:  # nothing to publish: no commit, readers see no new generation
            return np.empty(0, np.int64)
        pending = _Pending.start(self._commit)
        report = _progress_fn(progress, "add")
        try:
            out = self._stage_vectors(writer, pending, x, id_arr, batch_size, report)
            self._commit_pending(writer, pending)
        except OSError as exc:
            self._poison(exc)
            raise
        finally:
            if report is not None:
                report(-1, x.shape[0])
        return out

    @_serialised
    def remove(self, ids: ArrayLike) -> int:
        """Remove every vector whose id is in ``ids``, in one atomic commit.

        Removed vectors never appear in results from this commit on, and ``ntotal`` drops.
        Their bytes stay on disk (as tombstones in the commit record) until :meth:`compact`.

        Parameters
        ----------
        ids
            Integer ids; absent ids are ignored (and not counted), repeats count once.

        Returns
        -------
        int
            Rows removed (more than ``len(ids)`` if an id was added several times).

        Raises
        ------
        ValueError
            ``ids`` is not a 1-D integer array-like, or too many tombstones would be outstanding
            (compact first). The index is unchanged.
        ReadOnlyError, PoisonedError, OSError
            As for :meth:`add`.

        Notes
        -----
        Lookups use an id -> (list, row) map kept in memory by the writer (16 bytes per
        vector), built on the first ``remove``/``upsert`` of a session by reading the id files
        once (8 bytes per vector), then kept current by ``add``. Each call then costs
        ``O(r log n)`` for ``r`` ids, not a pass over the index. The alternative, tombstoning
        ids rather than rows, would need no map but could not tell a removed vector from a
        later one re-added under the same id.
        """
        writer = self._need_writer()
        want = self._check_ids(ids, None)
        if want is None:  # pragma: no cover - ids=None is rejected by _check_ids
            return 0
        rows = self._id_map().lookup(np.unique(np.asarray(want, np.int64)))
        rows = _drop_removed(rows, self._commit.tombstones)
        if rows.size == 0:
            return 0
        pending = _Pending.start(self._commit)
        pending.remove_rows(rows)
        try:
            self._commit_pending(writer, pending)
        except OSError as exc:
            self._poison(exc)
            raise
        return int(rows.size)

    @_serialised
    def upsert(
        self, vectors: ArrayLike, ids: ArrayLike, *, batch_size: int = _ADD_BATCH
    ) -> NDArray[np.int64]:
        """Replace the vectors of existing ids and add the others, in one atomic commit.

        Every stored row with one of the ``ids`` is removed (even if the id was added more than
        once) and one new row per id is added; the new vector may land in a different list.
        Readers see either the old vectors or the new ones, never both or neither.

        Parameters
        ----------
        vectors
            ``(n, dim)`` array-like, as for :meth:`add`.
        ids
            ``n`` distinct non-negative integer ids.
        batch_size
            As for :meth:`add`.

        Returns
        -------
        ndarray of int64
            ``ids``, in input order.

        Raises
        ------
        ValueError
            As for :meth:`add`, or repeated ids within ``ids``. The index is unchanged. Zero
            rows are valid and commit nothing.
        NotTrainedError, ReadOnlyError, PoisonedError, OSError
            As for :meth:`add`.
        """
        writer = self._need_writer()
        self._need_centroids()
        x = _as_float_matrix(vectors, self.dim, "vectors")
        batch_size = _check_int(batch_size, "batch_size", 1)
        id_arr = self._check_ids(ids, x.shape[0])
        if id_arr is None:  # pragma: no cover - a required argument
            raise TypeError("upsert needs ids")
        uniq = np.unique(np.asarray(id_arr, np.int64))
        if uniq.size != x.shape[0]:
            raise ValueError(f"expected distinct ids but got {x.shape[0] - uniq.size} repeats")
        if uniq.size and uniq[0] < 0:
            raise ValueError(f"expected non-negative ids but got {uniq[0]}")
        if uniq.size == 0:  # as for add: nothing to publish, no commit
            return np.empty(0, np.int64)
        rows = _drop_removed(self._id_map().lookup(uniq), self._commit.tombstones)
        pending = _Pending.start(self._commit)
        pending.remove_rows(rows)
        try:
            out = self._stage_vectors(writer, pending, x, id_arr, batch_size, None)
            self._commit_pending(writer, pending)
        except OSError as exc:
            self._poison(exc)
            raise
        return out

    @_serialised
    def compact(self) -> int:
        """Rewrite the lists that hold removed rows, reclaiming their bytes; return bytes freed.

        Each such list is copied without its removed rows into new files (the next file
        generation), the new files are published with a new commit record, and only then are
        the old files deleted. Crash-safe like every commit: a crash leaves the old or the new
        state. Readers holding an older snapshot keep the lists they already mapped (POSIX keeps
        a deleted file's pages while mapped); a reader that next needs a deleted file moves to
        the newest snapshot on its own (see :meth:`search`). On systems where an open or mapped
        file cannot be deleted, the deletion would have to wait; diskivf supports POSIX only.

        Every call, even with nothing removed, also deletes list files of generations the
        commit record does not name: those a compaction killed before its commit, or before
        its deletions, left behind (format_spec §9.5). Readers ignore such files.

        Raises
        ------
        ReadOnlyError, PoisonedError, OSError
            As for :meth:`add`.
        CorruptIndexError
            A list to rewrite does not match its checksums (or its files are shorter than
            committed); nothing is written.
        """
        writer = self._need_writer()
        rec = self._commit
        removed = _split_by_list(rec.tombstones)
        pending = _Pending.start(rec)
        rowbytes = self.dim * self.dtype.itemsize
        old_files: list[str] = []
        freed = 0
        views = {
            lid: self._reader.get(lid, int(rec.list_counts[lid]), int(rec.list_gens[lid]))
            for lid in removed
        }
        # The copies get fresh checksums and the old files are deleted: check the old bytes
        # first, all before anything is written, or damage would become a list that verifies.
        for lid, view in views.items():
            if view is not None:
                vname, iname = fmt.list_file_names(lid, int(rec.list_gens[lid]))
                vcrc = fmt.crc32(view.vectors.data.cast("B"))
                fmt.check_list_crc(vname, lid, vcrc, int(rec.vec_crc32[lid]))
                icrc = fmt.crc32(view.ids.data.cast("B"))
                fmt.check_list_crc(iname, lid, icrc, int(rec.ids_crc32[lid]))
        try:
            for lid, rows in removed.items():
                count, gen = int(rec.list_counts[lid]), int(rec.list_gens[lid])
                view = views[lid]
                if view is None:  # pragma: no cover - a tombstone implies a non-empty list
                    continue
                keep = np.ones(count, bool)
                keep[rows] = False
                vec = view.vectors[keep].tobytes()
                ids = view.ids[keep].tobytes()
                new_gen = gen + 1
                if new_gen > 0xFFFFFFFF:
                    raise ValueError(f"list {lid} has reached the last file generation")
                vname, iname = fmt.list_file_names(lid, new_gen)
                writer.write(vname, 0, vec)
                writer.write(iname, 0, ids)
                pending.counts[lid] = len(ids) // 8
                pending.gens[lid] = new_gen
                pending.vcrc[lid] = fmt.crc32(vec)
                pending.icrc[lid] = fmt.crc32(ids)
                old_files += fmt.list_file_names(lid, gen)
                freed += len(rows) * (rowbytes + 8)
            if not removed:
                self._delete_list_files(writer, [])
                return 0
            pending.tombstones = np.zeros(0, np.int64)
            self._commit_pending(writer, pending)
        except OSError as exc:
            self._poison(exc)
            raise
        self._idmap = None  # rows moved: rebuild on next use
        self._delete_list_files(writer, old_files)
        return freed

    def _delete_list_files(self, writer: ListWriter, names: list[str]) -> None:
        """Delete ``names`` and every other list file of a generation the commit does not name
        (left by a compaction killed before its commit or before its deletions)."""
        names = list(
            dict.fromkeys(names + _unreferenced_list_files(self._path, self._commit.list_gens))
        )
        writer.forget(names)  # an open descriptor would keep the space allocated
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                (self._path / name).unlink()

    @_serialised
    def adopt_lists(
        self,
        counts: ArrayLike,
        vec_crc32: ArrayLike,
        ids_crc32: ArrayLike,
        *,
        next_id: int,
    ) -> None:
        """Publish list files written by other processes as the rows of this empty index.

        For offline builders (:mod:`diskivf.parallel`): workers write each non-empty list
        ``i`` as the files ``fmt.list_file_names(i, 0)`` (fsynced when the index is durable),
        and the holder of this writer publishes them all in one commit. The checksums are
        recorded as given; :meth:`verify` checks them against the bytes.

        Parameters
        ----------
        counts
            ``(nlist,)`` rows per list; the files of list ``i`` must hold at least
            ``counts[i]`` rows.
        vec_crc32, ids_crc32
            ``(nlist,)`` CRC32 of the first ``counts[i]`` rows of each file.
        next_id
            One past the largest id in the files (the default id of the next :meth:`add`).

        Raises
        ------
        ValueError
            The index already holds rows, or an argument has the wrong shape or range.
        CorruptIndexError
            A list file is missing or shorter than its count; nothing is published.
        NotTrainedError, ReadOnlyError, PoisonedError
            As for :meth:`add`.
        OSError
            Syncing or publishing failed (the writer becomes poisoned).
        """
        writer = self._need_writer()
        self._need_centroids()
        rec = self._commit
        if rec.list_counts.any() or rec.tombstones.size or rec.list_gens.any():
            raise ValueError(
                f"adopt_lists needs an empty index, but {str(self._path)!r} holds rows"
            )
        for name, value, top in (
            ("counts", counts, (1 << 48) - 1),
            ("vec_crc32", vec_crc32, 0xFFFFFFFF),
            ("ids_crc32", ids_crc32, 0xFFFFFFFF),
        ):
            arr = np.asarray(value)
            if arr.shape != (self.nlist,) or arr.dtype.kind not in "iu":
                raise ValueError(
                    f"expected {name} of shape ({self.nlist},) and an integer dtype but got "
                    f"{arr.shape} {arr.dtype}"
                )
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) > top):
                raise ValueError(f"{name} holds values outside [0, {top}]")
        counts_arr = np.asarray(counts).astype(np.int64)
        vcrc = np.asarray(vec_crc32).astype(np.uint32)
        icrc = np.asarray(ids_crc32).astype(np.uint32)
        if counts_arr.size and int(counts_arr.max()) >= 1 << fmt.ROW_BITS:
            raise ValueError(f"a list would exceed 2**{fmt.ROW_BITS} rows")
        next_id = _check_int(next_id, "next_id", 0, (1 << 63) - 1)
        gens = np.zeros(self.nlist, np.uint32)
        pending = _Pending(
            counts_arr, gens, vcrc, icrc, np.zeros(0, np.int64), max(rec.next_id, next_id)
        )
        candidate = fmt.CommitRecord(0, rec.index_uuid, 0, counts_arr, gens, vcrc, icrc)
        check_list_files(self._path, candidate, self.dim, self.dtype.itemsize)
        try:
            if self._durable and (self._path / fmt.LISTS_DIR).is_dir():
                fmt.fsync_dir(self._path / fmt.LISTS_DIR)  # the renames that created the files
            self._commit_pending(writer, pending)
        except OSError as exc:
            self._poison(exc)
            raise

    def _stage_vectors(
        self,
        writer: ListWriter,
        pending: _Pending,
        x: NDArray[Any],
        id_arr: NDArray[Any] | None,
        batch_size: int,
        report: ProgressFn | None,
    ) -> NDArray[np.int64]:
        """Validate, assign and append ``x`` past the pending list ends; return the ids.

        A batch is assigned (GEMMs) while the previous one is written: the writes are kernel
        copies into the page cache, which leave the other core idle. This thread writes,
        then helps assign the next batch, so that the cores stay busy without running more
        threads than cores. Batches are still written in order, so the files are the same.
        """
        centroids = self._need_centroids()
        n = x.shape[0]
        first_id = pending.next_id
        out_ids = np.empty(n, np.int64)
        rowbytes = self.dim * self.dtype.itemsize
        # Without threadpoolctl BLAS cannot be held to one thread: one thread then runs the
        # GEMMs with BLAS's own threads while this one writes.
        workers = kmeans.assign_workers(None, n)
        helps = workers >= 1
        jobs: list[tuple[int, NDArray[Any], NDArray[np.int64], kmeans.BlockAssignment]] = []
        # Buffers reused batch after batch: a fresh batch-sized array is a fresh mmap of
        # untouched pages, whose faults cost a third of filling it. Two for the float32
        # rows, since a batch is prepared while the one before waits to be written.
        rows = min(batch_size, n)
        inputs = [np.empty((rows, self.dim), np.float32) for _ in range(2)]
        scratch = (np.empty((rows, self.dim), self.dtype), np.empty(rows, np.int64))

        def write_oldest() -> None:
            stop, stored, bids, job = jobs[0]
            if helps:
                job.work()
            labels, _ = job.result()
            self._append_grouped(writer, stored, bids, labels, pending, rowbytes, scratch)
            jobs.pop(0)
            if report is not None:
                report(stop, n)

        others = max(1, workers - 1)
        with (
            blas_threads(1 if helps else None),
            ThreadPoolExecutor(others, thread_name_prefix="diskivf-add") as assigner,
        ):
            try:
                for start in range(0, n, batch_size):
                    buffer = inputs[(start // batch_size) % 2]
                    xb, stored = self._prepare_batch(x[start : start + batch_size], start, buffer)
                    stop = start + len(xb)
                    release_rows(x, start, stop)  # copied: keep RSS bounded by the batch
                    if id_arr is None:
                        bids = np.arange(first_id + start, first_id + stop, dtype=np.int64)
                    else:
                        bids = np.asarray(id_arr[start:stop], dtype=np.int64)
                        if bids.size and bids.min() < 0:
                            bad = start + int(np.flatnonzero(bids < 0)[0])
                            raise ValueError(
                                f"expected non-negative ids but got {bids.min()} (row {bad})"
                            )
                    out_ids[start:stop] = bids
                    job = self._assignment(xb, centroids)
                    jobs.append((stop, stored, bids, job))
                    for _ in range(others):
                        assigner.submit(job.work)
                    if len(jobs) > 1:
                        write_oldest()
                while jobs:
                    write_oldest()
            finally:
                # An error or interrupt: the workers finish their current block and stop; the
                # batches not yet written are dropped with the rest of the call.
                for *_, job in jobs:
                    job.cancel()
        return out_ids

    @_serialised
    def _commit_assigned(
        self, stored: NDArray[Any], bids: NDArray[np.int64], labels: NDArray[Any]
    ) -> None:
        """Append one batch that :meth:`_prepare_batch` and :meth:`_assign` have handled, as
        one commit (what :meth:`add` would do with it).

        :func:`diskivf.build.build` uses it to prepare and assign the next batch while this
        one is written and synced. ``bids`` must already be validated non-negative int64.
        """
        writer = self._need_writer()
        pending = _Pending.start(self._commit)
        rowbytes = self.dim * self.dtype.itemsize
        try:
            self._append_grouped(writer, stored, bids, labels, pending, rowbytes)
            self._commit_pending(writer, pending)
        except OSError as exc:
            self._poison(exc)
            raise

    def _prepare_batch(
        self, rows: ArrayLike, start: int, out: NDArray[np.float32] | None = None
    ) -> tuple[NDArray[np.float32], NDArray[Any]]:
        """Validate and convert a batch: (float32 rows to assign, rows as stored).

        With ``out`` (C-contiguous float32 with at least as many rows as the batch), the
        float32 rows are its leading rows, so that successive batches reuse its pages. Also
        used by :mod:`diskivf.parallel`, so that a parallel build stores the same bytes.
        """
        if out is None:
            xb = np.array(rows, dtype=np.float32, order="C")
        else:
            src = np.asarray(rows)
            xb = out[: len(src)]
            np.copyto(xb, src, casting="unsafe")
        _check_vectors(xb, "vectors", start)
        if self.metric == "cosine":
            _refuse_zero_rows(xb, "index", start)
            scan.normalize_rows(xb)
        # Overflow to inf in a narrower dtype is reported below as a ValueError, not a warning.
        with np.errstate(over="ignore"):
            stored = xb.astype(self._meta.vector_dtype, copy=False)
        # Finite float32 rows stay finite unless the index stores a narrower type.
        if stored is not xb and not np.isfinite(stored).all():
            raise ValueError(
                f"vectors overflow the index dtype {self.dtype} (batch at row {start})"
            )
        return xb, stored

    def _commit_pending(self, writer: ListWriter, pending: _Pending) -> None:
        rec = self._commit
        new = fmt.CommitRecord(
            generation=rec.generation + 1,
            index_uuid=rec.index_uuid,
            next_id=pending.next_id,
            list_counts=pending.counts,
            list_gens=pending.gens,
            vec_crc32=pending.vcrc,
            ids_crc32=pending.icrc,
            tombstones=pending.tombstones,
        )
        self._publish(writer, new)
        if self._idmap is not None and pending.new_ids:
            self._idmap.extend(np.concatenate(pending.new_ids), np.concatenate(pending.new_rows))

    def _id_map(self) -> _IdMap:
        if self._idmap is None:
            rec = self._commit
            ids: list[NDArray[np.int64]] = []
            rows: list[NDArray[np.int64]] = []
            for lid in np.flatnonzero(rec.list_counts).tolist():
                view = self._reader.get(lid, int(rec.list_counts[lid]), int(rec.list_gens[lid]))
                if view is not None:
                    ids.append(np.asarray(view.ids, dtype=np.int64))
                    rows.append((lid << fmt.ROW_BITS) + np.arange(len(view.ids), dtype=np.int64))
            self._idmap = _IdMap(ids, rows)
        return self._idmap

    def _check_ids(self, ids: ArrayLike | None, n: int | None) -> NDArray[Any] | None:
        if ids is None:
            if n is None:
                raise TypeError("expected ids but got None")
            if self._commit.next_id + n >= 1 << 63:
                raise ValueError("default ids would overflow int64; pass ids explicitly")
            return None
        arr = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
        if n is None and arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
            want = "(n,)" if n is None else f"({n},)"
            raise ValueError(f"expected ids of shape {want} but got {arr.shape}")
        if arr.size == 0:  # [] is float64 to numpy; an empty list of ids has no dtype to check
            return arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"expected integer ids but got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8:
            top = int(arr.max())
            if top >= 1 << 63:
                raise ValueError(f"expected ids below 2**63 (int64) but got {top}")
            arr = arr.astype(np.int64)
        return arr

    def _assignment(
        self, xb: NDArray[np.float32], centroids: NDArray[np.float32]
    ) -> kmeans.BlockAssignment:
        """The assignment of a prepared batch, as blocks that any thread may take."""
        block = max(256, _ASSIGN_BLOCK_FLOATS // self.nlist)
        spherical = self.metric != "l2"
        return kmeans.BlockAssignment(xb, centroids, self._csq, spherical, block, refine=True)

    def _assign(self, xb: NDArray[np.float32], centroids: NDArray[np.float32]) -> NDArray[Any]:
        return self._assignment(xb, centroids).run()[0]

    def _append_grouped(
        self,
        writer: ListWriter,
        stored: NDArray[Any],
        bids: NDArray[np.int64],
        labels: NDArray[Any],
        pending: _Pending,
        rowbytes: int,
        scratch: tuple[NDArray[Any], NDArray[np.int64]] | None = None,
    ) -> None:
        """Write one batch, grouped by list, past each list's pending end.

        ``scratch``, arrays of the stored dtype and int64 with at least as many rows as the
        batch, receives the grouped rows, so that successive batches reuse its pages.
        """
        runs, (vec_sorted, ids_sorted) = kmeans.group_by_label(
            labels, self.nlist, stored, bids, out=scratch
        )
        if not runs:
            return
        lids, starts, stops = (np.array(v, np.int64) for v in zip(*runs, strict=True))
        before = pending.counts[lids]
        after = before + (stops - starts)
        if after.max() >= 1 << fmt.ROW_BITS:
            lid = int(lids[np.argmax(after)])
            raise ValueError(f"list {lid} would exceed 2**{fmt.ROW_BITS} rows")
        pending.next_id = max(pending.next_id, int(bids.max()) + 1)
        if self._idmap is not None:  # the only user of the new rows' positions
            first_row = (lids << fmt.ROW_BITS) + before - starts
            pending.new_ids.append(ids_sorted.astype(np.int64))  # a copy: scratch is reused
            pending.new_rows.append(np.repeat(first_row, stops - starts) + np.arange(len(bids)))
        # One memoryview per batch, sliced per list; plain ints in the loop: the loop runs
        # once per list and batch, and numpy scalars cost more than the rest of its body.
        vec_sorted = vec_sorted.astype(self._meta.vector_dtype, copy=False)
        ids_sorted = ids_sorted.astype("<i8", copy=False)
        vec = vec_sorted.data.cast("B")
        ids = ids_sorted.data.cast("B")
        vcrc, icrc = pending.vcrc[lids].tolist(), pending.icrc[lids].tolist()
        gens = pending.gens[lids].tolist()
        for i, (lid, a, b) in enumerate(runs):
            vname, iname = fmt.list_file_names(lid, gens[i])
            c = int(before[i])
            vbytes, ibytes = vec[a * rowbytes : b * rowbytes], ids[a * 8 : b * 8]
            writer.write(vname, c * rowbytes, vbytes)
            writer.write(iname, c * 8, ibytes)
            vcrc[i] = fmt.crc32(vbytes, vcrc[i])
            icrc[i] = fmt.crc32(ibytes, icrc[i])
        pending.vcrc[lids], pending.icrc[lids], pending.counts[lids] = vcrc, icrc, after

    def _publish(self, writer: ListWriter, new: fmt.CommitRecord) -> None:
        """Commit protocol steps 2-3: list data durable, then atomically replace the record."""
        try:
            writer.sync()
            fmt.atomic_write(
                self._path / fmt.COMMIT_NAME, fmt.encode_commit(new), durable=self._durable
            )
        except BaseException as exc:
            # Whatever interrupted the publish (an I/O error, KeyboardInterrupt...), the record
            # on disk may already be the new one; continuing from the old in-memory snapshot
            # would then overwrite rows that readers see as committed.
            self._poison(exc)
            raise
        with self._gate.swap():
            self._commit = new

    # ---------------------------------------------------------------- searching

    @overload
    def search(
        self,
        queries: ArrayLike,
        k: int = ...,
        *,
        nprobe: int | None = ...,
        stats: Literal[False] = ...,
        threads: int | None = ...,
    ) -> SearchResult: ...

    @overload
    def search(
        self,
        queries: ArrayLike,
        k: int = ...,
        *,
        nprobe: int | None = ...,
        stats: Literal[True],
        threads: int | None = ...,
    ) -> tuple[SearchResult, SearchStats]: ...

    @overload
    def search(
        self,
        queries: ArrayLike,
        k: int = ...,
        *,
        nprobe: int | None = ...,
        stats: bool,
        threads: int | None = ...,
    ) -> SearchResult | tuple[SearchResult, SearchStats]: ...

    def search(
        self,
        queries: ArrayLike,
        k: int = 10,
        *,
        nprobe: int | None = None,
        stats: bool = False,
        threads: int | None = None,
    ) -> SearchResult | tuple[SearchResult, SearchStats]:
        """Find the ``k`` nearest stored vectors of each query among ``nprobe`` lists.

        Parameters
        ----------
        queries
            ``(n, dim)`` or ``(dim,)`` array-like; a 1-D query gives results of shape ``(1, k)``.
        k
            Neighbours per query (>= 1). Where the probed lists hold fewer, results are padded
            with id ``-1`` and distance ``+inf`` (l2) or ``-inf`` (ip, cosine).
        nprobe
            Lists scanned per query (>= 1; values above ``nlist`` mean all lists). Cost and
            recall both grow with it. Default: the value stored in the index.
        stats
            Also return a :class:`SearchStats` with the lists, vectors and bytes touched.
        threads
            Threads to use at most, the calling one included (the probed lists are split among
            them; BLAS is held to one thread meanwhile, through threadpoolctl when installed,
            so cores are not oversubscribed; a single query of an index larger than the
            CPU's last-level cache makes no call BLAS would split, and skips that).
            Default: for batches of 64 queries or more, every CPU this process may use (its
            affinity mask, capped by its cgroup's CPU quota; at most 8), else 1. A batch
            whose lists are too small for threads to pay (under ~20 us of numpy work per list)
            runs on the calling thread alone. A single query of 4 MiB of vectors or more is
            split over the threads when splits of its size have been timed faster than one
            thread on this index lately (4 such queries in 128 try the other way). The
            results never depend on it. Not counted: one background thread that asks the
            kernel to read in lists about to be scanned for the first time (see
            :attr:`prefetch`); it scores nothing.

        Returns
        -------
        SearchResult
            ``(distances, ids)``, each ``(n, k)``; see :class:`SearchResult` for the order and
            meaning per metric. With ``stats=True``, a ``(SearchResult, SearchStats)`` tuple.

        Raises
        ------
        ValueError
            Wrong shape or dimension, non-finite queries, ``k < 1`` or ``nprobe < 1``.
        NotTrainedError
            The index has not been trained.
        CorruptIndexError
            A probed list's files are damaged in a way a search can see (shorter than
            committed, a negative id); :meth:`verify` checks every byte.

        Notes
        -----
        Queries are processed in chunks so that ``chunk * nprobe * k`` stays near 2M candidates
        and ``chunk * nlist`` near 2M coarse scores (about 25 MB of working memory each, besides
        the results); each probed list is read once per chunk and scored against all the
        chunk's queries that probe it with one matrix product.

        l2 distances come from ``||x||^2 - 2 x.q + ||q||^2`` in float32, as in FAISS, so they
        carry a rounding error of about ``1e-7 * (||x||^2 + ||q||^2)``: neighbours closer
        together than that may come in either order, and a query searched alone (one
        matrix-vector kernel) or in a batch (a matrix product) may differ in those last bits.
        So may an index before and after it outgrows the CPU's last-level cache: beyond it
        the lists one query scans are scored row by row (numpy 2's ``vecdot``), which streams
        them from memory faster than a matrix-vector product. With numba installed (the
        ``fast`` extra), a single query of a float32 index is scored and selected in one
        compiled loop instead (``DISKIVF_JIT=0`` turns it off), whose sums differ from
        BLAS's in the same last bits. Exactly equal reported distances are ordered by id.
        """
        q, dist, ids, totals = self._search_costs(queries, k, nprobe, threads)
        finish_distances(self.metric, q, dist, ids)
        result = SearchResult(dist, ids)
        if stats:
            return result, SearchStats(q.shape[0], *totals)
        return result

    def _search_costs(
        self, queries: ArrayLike, k: int, nprobe: int | None, threads: int | None
    ) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64], list[int]]:
        """:meth:`search` before :func:`finish_distances`: prepared queries, top-``k`` costs
        (ascending), ids and stats totals. :mod:`diskivf.sharded` merges shards by cost."""
        self._need_centroids()
        q = prepare_queries(queries, self.dim, self.metric)
        k = _check_int(k, "k", 1)
        nprobe = self.nprobe if nprobe is None else _check_int(nprobe, "nprobe", 1)
        nprobe = min(nprobe, self.nlist)
        n = q.shape[0]
        nthreads = _default_threads(n) if threads is None else _check_int(threads, "threads", 1)
        for _attempt in range(8):
            try:
                with self._gate:
                    streamed = self._streamed()
                    # A single query whose lists are streamed can be scored by numpy's row
                    # kernel alone, centroids included, on any number of threads; with rows
                    # short enough for BLAS's dot, which that kernel calls per row, to stay
                    # on one thread, it makes no BLAS call that could start BLAS's threads.
                    # So it skips the region: setting and restoring the thread counts costs
                    # 17 us when a scan has just flushed the CPU's caches (1.6 us warm).
                    unthreaded = n == 1 and streamed and self.dim <= scan.SERIAL_DOT_MAX_DIM
                    with blas_threads(None if unthreaded else 1):
                        dist, ids, totals = self._search_snapshot(
                            q, k, nprobe, nthreads, streamed, unthreaded
                        )
                break
            except _StaleSnapshotError:
                # A compaction deleted files of this reader's snapshot: move to the newest.
                self.refresh()
        else:  # pragma: no cover - needs eight compactions racing one search
            raise DiskIVFError("the index kept changing under this search; retry")
        return q, dist, ids, totals

    def _search_snapshot(
        self,
        q: NDArray[np.float32],
        k: int,
        nprobe: int,
        nthreads: int,
        streamed: bool,
        unthreaded: bool,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], list[int]]:
        """Costs (not yet distances), ids and stats totals of ``q`` in the current snapshot,
        whose lists are ``streamed`` (:meth:`_streamed`); a single query ``unthreaded``
        scores its centroids with the row kernel too (:func:`diskivf.search.search_one`)."""
        centroids = self._need_centroids()
        n = q.shape[0]
        if n == 1:
            return self._search_one(q[0], centroids, k, nprobe, nthreads, streamed, unthreaded)
        parallel: scan.Parallel | None = None
        chunk = max(
            1,
            min(_SEARCH_CHUNK_CANDIDATES // (nprobe * k), _SEARCH_CHUNK_COARSE // self.nlist),
        )
        dist = np.empty((n, k), np.float32)
        ids = np.empty((n, k), np.int64)
        totals = [0, 0, 0, 0]
        for a in range(0, n, chunk):
            qc = q[a : a + chunk]
            probes = scan.coarse_probes(qc, centroids, self._csq_or_none, nprobe)
            lists = np.unique(probes)
            self._willneed(lists.tolist())
            t = nthreads if nthreads > 1 and self._worth_threads(probes.size, lists) else 1
            if t > 1 and parallel is None:
                parallel = self._parallel(nthreads)
            dist[a : a + chunk], ids[a : a + chunk], st = scan.search_lists(
                qc,
                probes,
                self._fetch,
                k,
                threads=t,
                parallel=parallel if t > 1 else None,
                streamed=streamed,
            )
            totals = [t + v for t, v in zip(totals, st, strict=True)]
        return dist, ids, totals

    def _search_one(
        self,
        q: NDArray[np.float32],
        centroids: NDArray[np.float32],
        k: int,
        nprobe: int,
        t: int,
        streamed: bool,
        unthreaded: bool,
    ) -> tuple[NDArray[np.float32], NDArray[np.int64], list[int]]:
        """One query; with ``t > 1`` threads split or not as the pool's timings say;
        ``unthreaded`` scores the centroids with the row kernel too."""
        # float16 lists convert to float32 per scan, in numpy: the compiled loop reads float32.
        jit = _jit.scan_topk() if self.dtype == np.float32 else None
        if t <= 1:
            dist, ids, st = scan.search_one(
                q,
                centroids,
                self._csq_or_none,
                nprobe,
                self._fetch_many,
                k,
                prefetch=self._willneed,
                streamed=streamed,
                unthreaded=unthreaded,
                jit=jit,
            )
            return dist, ids, list(st)
        chosen: list[tuple[int, bool]] = []

        def split(nbytes: int) -> bool:
            chosen.append((nbytes, self._workers.should_split(nbytes)))
            return chosen[-1][1]

        t0 = time.perf_counter()
        dist, ids, st = scan.search_one(
            q,
            centroids,
            self._csq_or_none,
            nprobe,
            self._fetch_many,
            k,
            prefetch=self._willneed,
            threads=t,
            parallel=self._parallel(t),
            split=split,
            streamed=streamed,
            unthreaded=unthreaded,
            jit=jit,
        )
        if chosen:
            self._workers.record(*chosen[0], time.perf_counter() - t0)
        return dist, ids, list(st)

    def _worth_threads(self, pairs: int, lists: NDArray[np.int64]) -> bool:
        """Whether scoring ``pairs`` (query, list) pairs over ``lists`` gains from threads.

        Each list visit holds the GIL for ~10-20 us of Python and small numpy calls, and on a
        virtual machine every contended hand-over of the GIL can wait for an idle virtual CPU
        to wake. Threads only pay when the work numpy does without the GIL per visit
        (:meth:`_visit_us`) clearly exceeds that: see ``_THREAD_MIN_VISIT_US``.
        """
        return self._visit_us(pairs, lists) >= _THREAD_MIN_VISIT_US

    def _visit_us(self, pairs: int, lists: NDArray[np.int64]) -> float:
        """Estimated GIL-free microseconds per list visit when ``pairs`` (query, list) pairs
        are scored over ``lists``: streaming the list and the matrix product, at 20 GB/s
        and 100 GFLOP/s, the rates of one core here."""
        rows = float(self._commit.list_counts[lists].mean()) if lists.size else 0.0
        row_bytes = self.dim * self.dtype.itemsize
        per_list = pairs / max(1, lists.size)  # queries scoring each list
        return rows * row_bytes / 20e3 + 2 * per_list * rows * self.dim / 100e3

    def _parallel(self, nthreads: int) -> scan.Parallel:
        return self._workers.runner(nthreads)

    def _map_list(
        self, list_id: int, count: int, gen: int, *, populate: bool = True
    ) -> ListView | None:
        view = self._maps.get(list_id)
        if view is not None and len(view.ids) == count and self._maps_gen.get(list_id) == gen:
            return view
        try:
            view = self._reader.get(list_id, count, gen, populate=populate)
        except CorruptIndexError:
            if self._snapshot_is_stale():
                raise _StaleSnapshotError from None
            raise
        if view is not None:
            self._maps[list_id] = view
            self._maps_gen[list_id] = gen
        return view

    def _willneed(self, list_ids: list[int]) -> list[int]:
        """Ask the kernel to read probed lists now, all at once, before they are scanned;
        returns the lists mapped for the first time, the ones likely to be read in now.

        On a cold page cache this turns one synchronous fault-and-readahead chain per list
        into concurrent reads of every probed list; on a warm one it costs ~9 us per list. So
        by default only lists this index has not mapped yet are advised (a first touch is the
        likely cold one); ``prefetch = True`` advises every probed list on every search, for
        long-running readers whose page cache may be evicted under them. The advice runs on
        the index's background thread: given on the search's own thread, its page-cache
        allocation came before the first product, and single queries on an evicted index
        ran 0.78-0.87x as fast at one thread (``python tools/bench_cold.py
        INDEX Q.npy --modes new,inline``).
        """
        every = self._prefetch
        if not every:
            live = self._live
            list_ids = [i for i in list_ids if live[i] is None]
            if not list_ids:
                return list_ids
        rec = self._commit
        fresh = []
        views = []
        for lid in list_ids:
            count = self._counts[lid]
            gen = int(rec.list_gens[lid])
            known = self._maps.get(lid)
            mapped = known is not None and len(known.ids) == count
            if not count or (mapped and not every):
                continue
            # Unpopulated maps: MAP_POPULATE would read each cold list before advising the next.
            view = self._map_list(lid, count, gen, populate=False)
            if view is not None:
                if not mapped:
                    fresh.append(lid)
                views.append(view)
        if views:
            # Off the search's thread: the caller scores resident lists meanwhile, and a list
            # it reaches before its advice is read in by its first fault instead.
            self._workers.background(self._reader.prefetch_all, views)
        return fresh

    def _fetch_many(self, list_ids: list[int]) -> tuple[list[scan.ScanList], list[int]]:
        """:meth:`_fetch` of every non-empty list of ``list_ids``, in order, and their rows
        (a :data:`diskivf.search.FetchMany`).

        Lists already validated for this snapshot are found by indexing, without a call
        each: a single query ran 1.4-2.0% faster at nprobe 1-64 than with one :meth:`_fetch`
        per probe (``python tools/bench_versions.py INDEX --base abd1c6c``).
        """
        live, counts = self._live, self._counts
        nonempty = [i for i in list_ids if counts[i]]
        # A non-empty list always has a view: _fetch returns None only for an empty one.
        views = [live[i] or self._fetch(i) for i in nonempty]
        return cast("list[scan.ScanList]", views), [counts[i] for i in nonempty]

    def _fetch(self, list_id: int) -> scan.ScanList | None:
        """Scan-ready view of a list in the current snapshot; cached with its norms."""
        live = self._live[list_id]
        if live is not None:
            return live
        rec = self._commit
        count, gen = int(rec.list_counts[list_id]), int(rec.list_gens[list_id])
        removed = self._removed.get(list_id)
        # Tombstones of a list only grow until compaction bumps its generation, so their
        # number identifies the set for a given (count, gen).
        key = (count, gen, 0 if removed is None else len(removed))
        hit = self._cache.get(list_id)
        if hit is not None and hit[0] == key:
            self._live[list_id] = hit[1]
            return hit[1]
        view = self._map_list(list_id, count, gen)
        if view is None:
            return None
        # Plain ndarray views of the maps: np.memmap's subclass hooks cost microseconds per
        # slice, which adds up on the single-query path.
        vectors = view.vectors.view(np.ndarray)
        norms = scan.sqnorms(vectors) if self.metric == "l2" else None
        ids = view.ids.view(np.ndarray)
        # Once per mapping, 8 bytes a row beside the norms' pass over the vectors: a negative
        # id read from a damaged file would come out as a hit that looks like padding (-1).
        if ids.size and int(ids.min()) < 0:
            raise CorruptIndexError(
                f"corrupt: list {list_id} of {str(self._path)!r} holds a negative id; "
                "verify() names the damaged file"
            )
        entry = scan.ScanList(vectors, ids, norms, removed)
        with self._cache_lock:
            old = self._cache.pop(list_id, None)
            if old is not None and old[1].sqnorms is not None:
                self._cache_bytes -= old[1].sqnorms.nbytes
            self._cache[list_id] = (key, entry)
            self._live[list_id] = entry
            self._maps[list_id] = view
            if norms is not None:
                self._cache_bytes += norms.nbytes
            while len(self._cache) > 1 and (
                self._cache_bytes > _NORM_CACHE_BYTES or len(self._cache) > self._map_budget
            ):
                lid, (_, ev) = self._cache.popitem(last=False)
                self._live[lid] = None
                self._maps.pop(lid, None)
                if ev.sqnorms is not None:
                    self._cache_bytes -= ev.sqnorms.nbytes
        return entry

    # ---------------------------------------------------------------- checking

    def verify(self) -> VerifyReport:
        """Check every committed byte against the checksums of the current snapshot.

        Re-reads the metadata and commit record from disk (catching damage since opening) and
        computes the CRC32 of every list's committed prefix. Cost: one sequential read of the
        index.

        Returns
        -------
        VerifyReport
            ``ok`` and one line per problem naming the file and list.
        """
        self._check_open()
        problems: list[str] = []
        try:
            meta = fmt.read_meta(self._path)
            if meta.index_uuid != self._meta.index_uuid:
                problems.append(f"{fmt.META_NAME}: belongs to another index")
        except (FormatError, OSError) as exc:
            problems.append(f"{fmt.META_NAME}: {exc}")
        rec = self._commit
        try:
            rec = fmt.read_commit(self._path, self.nlist, self._meta.index_uuid)
        except (FormatError, OSError) as exc:
            problems.append(f"{fmt.COMMIT_NAME}: {exc}")
        lists = verify_lists(self._path, rec, self.dim, self.dtype.itemsize)
        problems += [f"list {p.list_id}: {p.file} {p.message}" for p in lists.problems]
        nonempty = int(np.count_nonzero(rec.list_counts))
        nbytes = int(rec.list_counts.sum()) * (self.dim * self.dtype.itemsize + 8)
        return VerifyReport(rec.generation, nonempty, nbytes, tuple(problems))

    # ---------------------------------------------------------------- helpers

    def _set_centroids(self) -> None:
        c = self._meta.centroids
        self._csq = scan.sqnorms(c) if c is not None else np.zeros(0, np.float32)

    @property
    def _csq_or_none(self) -> NDArray[np.float32] | None:
        return self._csq if self.metric == "l2" else None

    def _streamed(self) -> bool:
        """Whether this snapshot's lists are scored as streamed from memory rather than from
        the CPU's caches (:func:`diskivf.search.streams_rows`), decided once per commit."""
        rec = self._commit
        known = self._streamed_for
        if known is not None and known[0] is rec:
            return known[1]
        vector_bytes = int(rec.list_counts.sum()) * self.dim * self.dtype.itemsize
        streamed = scan.streams_rows(vector_bytes, self.dim, self.dtype, LAST_LEVEL_CACHE_BYTES)
        self._streamed_for = (rec, streamed)
        return streamed

    def _snapshot_is_stale(self) -> bool:
        try:
            rec = fmt.read_commit(self._path, self.nlist, self._meta.index_uuid)
        except (FormatError, OSError):
            return False
        return rec.generation > self._commit.generation

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"index {str(self._path)!r} is closed")

    def _need_centroids(self) -> NDArray[np.float32]:
        self._check_open()
        c = self._meta.centroids
        if c is None:
            raise NotTrainedError(
                f"index {str(self._path)!r} is not trained: call train(sample) first"
            )
        return c

    def _need_writer(self) -> ListWriter:
        self._check_open()
        if self._writer is None:
            raise ReadOnlyError(
                f"index {str(self._path)!r} is open read-only (mode 'r'); open it with mode 'r+'"
            )
        if os.getpid() != self._pid:
            raise ReadOnlyError(
                f"this handle of {str(self._path)!r} was opened for writing by process "
                f"{self._pid}; a forked child may search through it but not write: open the "
                "index in the child once the parent has closed it"
            )
        if self._poisoned is not None:
            raise PoisonedError(
                f"an earlier write failed ({self._poisoned}); the index on disk holds its last "
                "commit: close and reopen it to continue"
            )
        return self._writer

    def _poison(self, exc: BaseException) -> None:
        self._poisoned = f"{type(exc).__name__}: {exc}"
        # Re-read nothing: the on-disk commit is whatever was last published; the in-memory
        # snapshot stays at the last commit this writer knows succeeded.


def _progress_fn(progress: bool | ProgressFn, label: str) -> ProgressFn | None:
    if progress is False or progress is None:
        return None
    if callable(progress):
        fn = progress

        def call(done: int, total: int) -> None:
            if done >= 0:
                fn(done, total)

        return call
    from diskivf.progress import bar

    return bar(label)


# -------------------------------------------------------------------- opening


def _lock(path: Path) -> int:
    fd = os.open(path / fmt.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise LockedError(
                f"index {str(path)!r} is locked by another writer ({path / fmt.LOCK_NAME}); "
                "open it with mode 'r' to read, or close the other writer"
            ) from None
        raise
    return fd


def _is_index(path: Path) -> bool:
    return (path / fmt.META_NAME).is_file()


def _clear_index_dir(path: Path) -> None:
    """Remove a diskivf index's files (mode "w"), never anything that is not ours."""
    for name in (fmt.META_NAME, fmt.COMMIT_NAME):
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()
    shutil.rmtree(path / fmt.LISTS_DIR, ignore_errors=True)
    shutil.rmtree(path / fmt.WORK_DIR_NAME, ignore_errors=True)  # an unfinished parallel build's
    for tmp in path.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


_LIST_FILE_RE: Final = re.compile(r"(\d{7})\.(\d{1,10})\.(?:vec|ids)")


def _unreferenced_list_files(path: Path, gens: NDArray[np.uint32]) -> list[str]:
    """Names (relative to ``path``) of list files at another generation than ``gens`` says.

    Only names of the list-file pattern for lists ``< len(gens)`` are considered (anything
    else in ``lists/`` is not ours to delete); the current generation's files stay even for
    an empty list, since appends go there. One directory listing, no file opened.
    """
    out: list[str] = []
    try:
        names = os.listdir(path / fmt.LISTS_DIR)
    except OSError:
        return out
    for name in names:
        m = _LIST_FILE_RE.fullmatch(name)
        if m is None:
            continue
        lid, gen = int(m.group(1)), int(m.group(2))
        if lid < len(gens) and gen != int(gens[lid]):
            out.append(f"{fmt.LISTS_DIR}/{name}")
    return out


def _check_dir_is_ours(path: Path) -> None:
    if not path.is_dir():
        raise IndexExistsError(
            f"{str(path)!r} exists and is not a directory; refusing to replace it"
        )
    ours = {fmt.META_NAME, fmt.COMMIT_NAME, fmt.LOCK_NAME, fmt.LISTS_DIR}
    foreign = sorted(
        p.name for p in path.iterdir() if p.name not in ours and not p.name.endswith(".tmp")
    )
    if foreign:
        what = "holds" if _is_index(path) else "is not a diskivf index and holds"
        raise IndexExistsError(
            f"{str(path)!r} {what} files that are not diskivf's ({foreign[:3]}); "
            "refusing to overwrite it"
        )


def _new_meta(
    *, dim: int | None, nlist: int | None, metric: str, dtype: str, nprobe: int | None
) -> fmt.Metadata:
    """Validate creation parameters (no I/O, so a rejected open creates nothing)."""
    if dim is None or nlist is None:
        missing = [n for n, v in (("dim", dim), ("nlist", nlist)) if v is None]
        raise TypeError(f"creating an index needs keyword arguments {missing}")
    dim = _check_int(dim, "dim", 1, fmt.MAX_DIM)
    nlist = _check_int(nlist, "nlist", 1, fmt.MAX_NLIST)
    if metric not in fmt.METRICS:
        raise ValueError(f"expected metric to be one of {list(fmt.METRICS)} but got {metric!r}")
    dstr = _parse_dtype(dtype)
    # Above nlist means every list, as in search: the stored default is then nlist.
    nprobe = (
        _default_nprobe(nlist) if nprobe is None else min(_check_int(nprobe, "nprobe", 1), nlist)
    )
    from diskivf import __version__

    return fmt.Metadata(
        dim=dim,
        nlist=nlist,
        metric=metric,  # type: ignore[arg-type]  # checked against METRICS above
        vector_dtype=dstr,
        nprobe=nprobe,
        index_uuid=uuid.uuid4().hex,
        created_by=f"diskivf {__version__}",
    )


def _write_new(path: Path, meta: fmt.Metadata, durable: bool) -> fmt.CommitRecord:
    rec = fmt.CommitRecord.empty(meta.nlist, meta.index_uuid)
    # The commit record first: a directory is an index once meta.diskivf exists, so a crash
    # between the two writes leaves something "w" and "a" may simply overwrite.
    fmt.atomic_write(path / fmt.COMMIT_NAME, fmt.encode_commit(rec), durable=durable)
    fmt.atomic_write(path / fmt.META_NAME, fmt.encode_meta(meta), durable=durable)
    return rec


def _parse_dtype(dtype: Any) -> str:
    """``"float32"``, ``np.float16``, ``"<f4"``... -> the on-disk dtype string."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = ""
    if name not in _DTYPES:
        raise ValueError(f"expected dtype to be one of {list(_DTYPES)} but got {dtype!r}")
    return _DTYPES[name]


def open_index(
    path: str | os.PathLike[str],
    mode: Mode = "r",
    *,
    dim: int | None = None,
    nlist: int | None = None,
    metric: str | None = None,
    dtype: str | None = None,
    nprobe: int | None = None,
    durable: bool = True,
) -> Index:
    """Open or create an on-disk IVF index (a directory).

    Parameters
    ----------
    path
        Index directory.
    mode
        ``"r"``: read only (must exist). ``"r+"``: read/write (must exist). ``"a"``: read/write
        (create if it does not exist). ``"w"``: create (overwrite an existing index; refuses a
        directory that holds anything else). ``"w-"``: create (fail if ``path`` exists, unless
        it is an empty directory). Creating makes missing parent directories too.
    dim, nlist, metric, dtype, nprobe
        Creation parameters, keyword-only; an error with ``"r"``/``"r+"`` and with ``"a"`` on an
        existing index (unless equal to the stored values). ``dim`` and ``nlist`` are required.
        ``nlist`` trades build and coarse-search cost against list length: about
        ``sqrt(n)`` to ``16 * sqrt(n)`` lists for ``n`` vectors is the usual range.
        ``metric``: ``"l2"`` (default), ``"ip"`` or ``"cosine"``. ``dtype``: ``"float32"``
        (default) or ``"float16"`` (half the bytes scanned, ~3 significant digits).
        ``nprobe``: default lists per search, ``nlist / 32`` rounded if not given; values
        above ``nlist`` mean all lists (stored as ``nlist``), as in :meth:`Index.search`.
    durable
        fsync data and commit records on every commit (default). ``False`` is faster but a
        power loss (not a process crash) may lose recent commits; see :meth:`Index.flush`.

    Returns
    -------
    Index
        Use it as a context manager, or call :meth:`Index.close`.

    Raises
    ------
    ValueError
        Invalid mode or creation parameter.
    TypeError
        Creation parameters passed where none are allowed, or missing where required.
    IndexNotFoundError
        Mode ``"r"``/``"r+"`` and nothing at ``path``.
    IndexExistsError
        Mode ``"w-"`` and ``path`` exists (other than as an empty directory); or ``"w"``/``"a"``
        on a file, or on a directory that holds files that are not an index's.
    FormatError
        ``path`` is not a valid diskivf index (see its subclasses for version and corruption).
    LockedError
        A writable mode and another writer holds the index.

    Examples
    --------
    >>> import numpy as np, diskivf, tempfile, os
    >>> d = os.path.join(tempfile.mkdtemp(), "demo.index")
    >>> x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32)
    >>> with diskivf.open(d, mode="w-", dim=8, nlist=4) as index:
    ...     _ = index.train(x)
    ...     ids = index.add(x)
    >>> with diskivf.open(d) as index:
    ...     D, I = index.search(x[:2], k=1, nprobe=4)
    >>> I.ravel().tolist()
    [0, 1]
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)} (got {mode!r})")
    p = Path(os.fspath(path))
    creation = {"dim": dim, "nlist": nlist, "metric": metric, "dtype": dtype, "nprobe": nprobe}
    given = {k: v for k, v in creation.items() if v is not None}
    exists = _is_index(p)

    if mode in ("r", "r+"):
        if given:
            raise TypeError(
                f"creation parameters {sorted(given)} are only valid with modes 'w', 'w-' and 'a' "
                f"(got mode {mode!r})"
            )
        if not p.exists():
            raise IndexNotFoundError(f"no diskivf index at {str(p)!r}")
        if not exists:
            raise FormatError(f"not a diskivf index: {str(p)!r} has no {fmt.META_NAME}")
    # A dangling symlink is something at path too, which creating would trip over.
    present = p.exists() or p.is_symlink()
    if mode == "w-" and present and (exists or not p.is_dir() or any(p.iterdir())):
        raise IndexExistsError(
            f"{str(p)!r} already exists and is not an empty directory (mode 'w-' never overwrites)"
        )

    if mode == "r":
        return _open_existing(p, mode, None, durable)

    create = mode in ("w", "w-") or not exists
    if not create:
        if given:
            _check_matches(p, given)
        lock_fd = _lock(p)
        try:
            return _open_existing(p, mode, lock_fd, durable)
        except BaseException:
            os.close(lock_fd)
            raise

    meta = _new_meta(
        dim=dim, nlist=nlist, metric=metric or "l2", dtype=dtype or "float32", nprobe=nprobe
    )
    if present:
        _check_dir_is_ours(p)
    p.mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(p)
    try:
        if exists:  # mode "w": replace the index we hold the lock of
            _clear_index_dir(p)
            fmt.fsync_dir(p)
        rec = _write_new(p, meta, durable)
        return Index(p, mode, meta, rec, lock_fd, durable)
    except BaseException:
        os.close(lock_fd)
        raise


def _check_matches(p: Path, given: dict[str, Any]) -> None:
    meta = fmt.read_meta(p)
    stored = {
        "dim": meta.dim,
        "nlist": meta.nlist,
        "metric": meta.metric,
        "dtype": meta.vector_dtype,
        "nprobe": meta.nprobe,
    }
    for key, value in given.items():
        want = _parse_dtype(value) if key == "dtype" else value
        if key == "nprobe" and isinstance(value, int):
            want = min(value, meta.nlist)  # stored capped at nlist, as _new_meta does
        if stored[key] != want:
            raise ValueError(
                f"index {str(p)!r} exists with {key}={stored[key]!r}, but {key}={value!r} was "
                "given; mode 'a' opens it as it is (omit creation parameters or use mode 'w')"
            )


def _raise_if_replaced(p: Path, meta: fmt.Metadata) -> None:
    """Raise :class:`IndexReplacedError` if ``p`` now holds another index than ``meta``'s.

    A commit record of another index is what a reader finds after a writer re-created the
    index with mode ``"w"``: not damage, and reopening is the cure.
    """
    try:
        now = fmt.read_meta(p)
    except (OSError, FormatError):
        return  # no valid newer index: the caller's corruption error stands
    if now.index_uuid != meta.index_uuid:
        raise IndexReplacedError(
            f"{str(p)!r} was replaced by a new index (uuid {now.index_uuid}) since this handle "
            f"opened index {meta.index_uuid}; open it again"
        ) from None


def _read_checked_commit(p: Path, meta: fmt.Metadata) -> fmt.CommitRecord:
    """Read the newest commit record and check its list files exist and are long enough.

    A compaction may delete files of the record just read; then a newer record exists and we
    move to it (format_spec §9.7). Missing files with no newer record are corruption.
    """
    itemsize = np.dtype(meta.vector_dtype).itemsize
    for _attempt in range(8):
        try:
            rec = fmt.read_commit(p, meta.nlist, meta.index_uuid)
        except FileNotFoundError:
            raise CorruptIndexError(
                f"corrupt: {str(p)!r} has {fmt.META_NAME} but no {fmt.COMMIT_NAME}"
            ) from None
        except CorruptIndexError:
            _raise_if_replaced(p, meta)
            raise
        try:
            check_list_files(p, rec, meta.dim, itemsize)
        except CorruptIndexError:
            newer = fmt.read_commit(p, meta.nlist, meta.index_uuid)
            if newer.generation == rec.generation:
                raise
            continue
        return rec
    raise DiskIVFError(f"index {str(p)!r} kept changing while being opened; retry")


def _open_existing(p: Path, mode: Mode, lock_fd: int | None, durable: bool) -> Index:
    meta = fmt.read_meta(p)
    rec = _read_checked_commit(p, meta)
    if lock_fd is not None and max(meta.version[1], rec.version[1]) > fmt.FORMAT_MINOR:
        newest = max(meta.version, rec.version)
        raise UnsupportedVersionError(
            f"index {str(p)!r} was written by format version {newest[0]}.{newest[1]} (this "
            f"library writes {fmt.FORMAT_MAJOR}.{fmt.FORMAT_MINOR}); open it read-only, or "
            "use a newer diskivf to modify it"
        )
    return Index(p, mode, meta, rec, lock_fd, durable)
