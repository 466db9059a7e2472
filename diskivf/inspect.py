"""Read-only inspection of an index: :func:`info`, :func:`verify` and :func:`decode_header`.

These back ``diskivf info`` and ``diskivf verify`` and are public for Python users. None of them
takes the writer lock or writes anything, so they are safe on an index that a build is filling.

* :func:`info` reads only the metadata file and the commit record (and ``stat``\\ s the files to
  report their size): it never opens, maps or reads an inverted list, so it costs the same on a
  1 TB index as on a tiny one.
* :func:`verify` reads every committed byte and checks it against the checksums of the commit
  record, reporting each problem with the file, the list and what is wrong. An index written by
  a newer format version is reported as unsupported, never as damaged (format_spec §3).
* Both report the work directory of an unfinished :func:`~diskivf.parallel.build_parallel`
  (``.parallel-build.tmp``): such an index holds a valid commit, often of no rows at all, so it
  would otherwise look like a healthy empty index. The work directory is only listed for its
  size: no symlink is followed and no file in it is opened.
* :func:`decode_header` decodes the preamble and msgpack header of one metadata or commit file as
  far as its bytes allow, for forensics on a damaged file that the normal readers reject.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import numpy as np
from numpy.typing import NDArray

from diskivf import format as fmt
from diskivf.errors import (
    CorruptIndexError,
    FormatError,
    IndexNotFoundError,
    UnsupportedVersionError,
)
from diskivf.segments import Problem, verify_lists

__all__ = [
    "INFO_SCHEMA",
    "HeaderDump",
    "IndexInfo",
    "ListDetail",
    "ListSizeStats",
    "Problem",
    "VerifyResult",
    "decode_header",
    "imbalance_factor",
    "info",
    "verify",
]

#: Value of the ``"schema"`` key of :meth:`IndexInfo.to_dict`. Within ``diskivf.info/1`` keys
#: are only ever added, never renamed, removed or retyped.
INFO_SCHEMA: Final = "diskivf.info/1"
_HIST_BINS: Final = 10
_HIST_WIDTH: Final = 32
# A forensic dump shows at most this many leading values of each array-valued key.
_DUMP_HEAD: Final = 8
_CRC_CHUNK: Final = 1 << 22
# Sizing a parallel build's work directory looks at no more than this many entries (it holds
# about four files per shard, 64 shards by default), so an odd tree cannot make info slow.
_WORK_DIR_MAX_ENTRIES: Final = 1 << 20
_COMMIT_ARRAYS: Final = {
    "list_counts": "<i8",
    "list_gens": "<u4",
    "vec_crc32": "<u4",
    "ids_crc32": "<u4",
    "tombstones": "<i8",
}


def imbalance_factor(counts: NDArray[np.integer[Any]] | list[int]) -> float | None:
    """FAISS's imbalance factor of list sizes ``c``: ``nlist * sum(c**2) / sum(c)**2``.

    1.0 for perfectly equal lists; the expected cost of a search relative to balanced lists when
    queries follow the data distribution. ``None`` when every list is empty.

    Examples
    --------
    >>> imbalance_factor([5, 5, 5, 5])
    1.0
    >>> imbalance_factor([20, 0, 0, 0])
    4.0
    """
    c = np.asarray(counts, dtype=np.float64)
    total = float(c.sum())
    if total == 0:
        return None
    return float(len(c) * float((c * c).sum()) / (total * total))


def _describe_work_dir(nbytes: int, rows: int | None) -> str:
    """What the work directory of a parallel build (``nbytes`` in its files) means for an index
    whose commit holds ``rows`` rows (``None``: unknown)."""
    where = f"{fmt.WORK_DIR_NAME}, {_fmt_bytes(nbytes)}"
    if rows == 0:
        # build_parallel commits once, at its very end: until then the index holds no row.
        return (
            f"unfinished parallel build ({where}): none of its rows is committed yet; unless a "
            "build is still running, finish it with build_parallel(..., resume=True) or "
            "diskivf build --workers N --resume"
        )
    if rows is None:
        return f"work directory of an unfinished parallel build present ({where})"
    return (
        f"work directory of an unfinished parallel build left behind ({where}): the committed "
        "rows do not use it; unless a build is still running, it can be deleted"
    )


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------------------- info


@dataclass(frozen=True)
class ListSizeStats:
    """Distribution of the committed list sizes.

    Attributes
    ----------
    min, max : int
        Smallest and largest list.
    median, mean : float
        Median and mean list size.
    empty : int
        Lists holding no vector.
    imbalance_factor : float or None
        See :func:`imbalance_factor`; ``None`` when the index is empty.
    histogram : tuple of (lo, hi, count)
        ``count`` lists have a size in ``[lo, hi]`` (inclusive); at most 10 bins.
    """

    min: int
    median: float
    max: int
    mean: float
    empty: int
    imbalance_factor: float | None
    histogram: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_counts(cls, counts: NDArray[np.int64]) -> ListSizeStats:
        """Summarise a ``(nlist,)`` array of list sizes."""
        lo, hi = int(counts.min()), int(counts.max())
        nbins = min(_HIST_BINS, hi - lo + 1)
        edges = np.linspace(lo, hi + 1, nbins + 1)
        hist, _ = np.histogram(counts, bins=edges)
        bins = []
        for i, count in enumerate(hist.tolist()):
            a = int(np.ceil(edges[i]))
            b = int(np.ceil(edges[i + 1])) - 1
            bins.append((a, max(a, b), int(count)))
        return cls(
            min=lo,
            median=float(np.median(counts)),
            max=hi,
            mean=float(counts.mean()),
            empty=int(np.count_nonzero(counts == 0)),
            imbalance_factor=imbalance_factor(counts),
            histogram=tuple(bins),
        )


@dataclass(frozen=True)
class ListDetail:
    """One list's committed size and the size of its files (``info(path, lists=True)``).

    Attributes
    ----------
    list_id, count, file_generation : int
        The list, its committed vectors, and the generation in its file names.
    vec_bytes, ids_bytes : int
        Committed bytes of its vector and id files.
    vec_file_bytes, ids_file_bytes : int or None
        Their actual sizes; larger than committed after an interrupted append, ``None`` when the
        file is missing.
    """

    list_id: int
    count: int
    file_generation: int
    vec_bytes: int
    ids_bytes: int
    vec_file_bytes: int | None
    ids_file_bytes: int | None


@dataclass(frozen=True, repr=False)
class IndexInfo:
    """What :func:`info` reports about an index. ``str()`` gives the text ``diskivf info`` prints.

    :meth:`to_dict` gives the stable JSON form; its schema is documented there.

    ``training`` is ``None`` both for an untrained index and for one whose centroids were
    installed by :meth:`~diskivf.Index.set_centroids` without training details (shards and
    merged indexes); ``trained`` tells them apart. ``unfinished_build`` is True while the work
    directory of a parallel build (``.parallel-build.tmp``) exists in the index: the build is
    running, or failed or was killed before it finished; ``work_dir_bytes`` is its size.
    """

    path: str
    format_version: tuple[int, int]
    created_by: str
    index_uuid: str
    dim: int
    metric: str
    vector_dtype: str
    id_dtype: str
    centroid_dtype: str
    nlist: int
    nprobe: int
    trained: bool
    ntotal: int
    removed: int
    next_id: int
    generation: int
    bytes_on_disk: int
    list_bytes_committed: int
    list_sizes: ListSizeStats
    training: fmt.TrainingInfo | None
    vectors_per_query: float
    bytes_per_query: float
    lists: tuple[ListDetail, ...] | None = None
    unfinished_build: bool = False
    work_dir_bytes: int | None = None

    def __repr__(self) -> str:
        imb = self.list_sizes.imbalance_factor
        return (
            f"IndexInfo(path={self.path!r}, format={self.format_version[0]}."
            f"{self.format_version[1]}, dim={self.dim}, metric={self.metric!r}, "
            f"dtype={self.vector_dtype!r}, nlist={self.nlist}, nprobe={self.nprobe}, "
            f"ntotal={self.ntotal}, generation={self.generation}, "
            f"bytes_on_disk={self.bytes_on_disk}, list_sizes={self.list_sizes.min}/"
            f"{self.list_sizes.median:g}/{self.list_sizes.max} (min/median/max), "
            f"imbalance={'n/a' if imb is None else f'{imb:.3f}'}"
            + (", unfinished_build=True)" if self.unfinished_build else ")")
        )

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form (schema ``diskivf.info/1``), as ``diskivf info --json``.

        Keys and types (``null`` where stated); new keys may be added, none are removed:

        ========================  =================  ============================================
        key                       type               meaning
        ========================  =================  ============================================
        schema                    str                ``"diskivf.info/1"``
        path                      str                index directory as given
        format_version            str                ``"MAJOR.MINOR"`` of the metadata file
        created_by                str                writer, e.g. ``"diskivf 0.1.0"``
        index_uuid                str                32 hex digits
        dim                       int                vector dimension
        metric                    str                ``"l2"``, ``"ip"`` or ``"cosine"``
        vector_dtype              str                stored vectors, ``"<f4"`` or ``"<f2"``
        id_dtype                  str                ``"<i8"``
        centroid_dtype            str                ``"<f4"``
        nlist                     int                lists
        nprobe                    int                default lists probed per query
        trained                   bool               centroids present (trained, or set
                                                     with ``Index.set_centroids``)
        ntotal                    int                live vectors (committed, not removed)
        removed                   int                removed rows awaiting compaction
        next_id                   int                one past the largest id ever added
        generation                int                commit generation
        bytes_on_disk             int                sum of the sizes of the files in the
                                                     directory, ``lists/`` and the work
                                                     directory of a parallel build
        list_bytes_committed      int                committed rows x ``(dim * itemsize + 8)``
        list_sizes                object             committed rows per list (removed ones
                                                     included: a search scans them):
                                                     min, max, empty (int); median, mean
                                                     (float); imbalance_factor (float|null);
                                                     histogram: list of {lo, hi, count} (int)
        training                  object|null        npoints, niter, nsplit, seed (int);
                                                     objective (list of float, per iteration);
                                                     final_objective (float|null). null when
                                                     not trained, or when the centroids were
                                                     set directly without training details
                                                     (``trained`` is then true)
        per_query                 object             nprobe (int); vectors_scanned,
                                                     bytes_scanned (float, estimates)
        lists                     list|null          with ``--lists``: per list list_id, count,
                                                     file_generation, vec_bytes, ids_bytes (int),
                                                     vec_file_bytes, ids_file_bytes (int|null)
        unfinished_build          bool               the work directory of a parallel build
                                                     (``.parallel-build.tmp``) exists: a build
                                                     is running, or failed before it finished
        work_dir_bytes            int|null           size of the files in that directory
                                                     (included in bytes_on_disk); null when
                                                     there is none
        ========================  =================  ============================================
        """
        t = self.training
        s = self.list_sizes
        return {
            "schema": INFO_SCHEMA,
            "path": self.path,
            "format_version": f"{self.format_version[0]}.{self.format_version[1]}",
            "created_by": self.created_by,
            "index_uuid": self.index_uuid,
            "dim": self.dim,
            "metric": self.metric,
            "vector_dtype": self.vector_dtype,
            "id_dtype": self.id_dtype,
            "centroid_dtype": self.centroid_dtype,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "trained": self.trained,
            "ntotal": self.ntotal,
            "removed": self.removed,
            "next_id": self.next_id,
            "generation": self.generation,
            "bytes_on_disk": self.bytes_on_disk,
            "list_bytes_committed": self.list_bytes_committed,
            "list_sizes": {
                "min": s.min,
                "median": s.median,
                "max": s.max,
                "mean": s.mean,
                "empty": s.empty,
                "imbalance_factor": s.imbalance_factor,
                "histogram": [{"lo": a, "hi": b, "count": c} for a, b, c in s.histogram],
            },
            "training": None
            if t is None
            else {
                "npoints": t.npoints,
                "niter": t.niter,
                "nsplit": t.nsplit,
                "seed": t.seed,
                "objective": list(t.objective),
                "final_objective": t.objective[-1] if t.objective else None,
            },
            "per_query": {
                "nprobe": self.nprobe,
                "vectors_scanned": self.vectors_per_query,
                "bytes_scanned": self.bytes_per_query,
            },
            "lists": None
            if self.lists is None
            else [
                {
                    "list_id": d.list_id,
                    "count": d.count,
                    "file_generation": d.file_generation,
                    "vec_bytes": d.vec_bytes,
                    "ids_bytes": d.ids_bytes,
                    "vec_file_bytes": d.vec_file_bytes,
                    "ids_file_bytes": d.ids_file_bytes,
                }
                for d in self.lists
            ],
            "unfinished_build": self.unfinished_build,
            "work_dir_bytes": self.work_dir_bytes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """The human-readable report printed by ``diskivf info``."""
        s = self.list_sizes
        imb = "n/a (empty)" if s.imbalance_factor is None else f"{s.imbalance_factor:.3f}"
        lines = [
            f"index            {self.path}",
            (
                f"format           {self.format_version[0]}.{self.format_version[1]} "
                f"(written by {self.created_by or 'unknown'}), uuid {self.index_uuid}"
            ),
            (
                f"vectors          dim {self.dim}, metric {self.metric}, dtype {self.vector_dtype}, "
                f"ids {self.id_dtype}, centroids {self.centroid_dtype}"
            ),
            (
                f"lists            nlist {self.nlist}, default nprobe {self.nprobe}, "
                f"trained {'yes' if self.trained else 'no'}"
            ),
            (
                f"contents         ntotal {self.ntotal:,}"
                + (f" (+{self.removed:,} removed, awaiting compaction)" if self.removed else "")
                + f", next id {self.next_id:,}, commit generation {self.generation}"
            ),
            *([f"build            {self._build_state()}"] if self.unfinished_build else []),
            (
                f"size             {_fmt_bytes(self.bytes_on_disk)} on disk "
                f"({self.bytes_on_disk:,} bytes"
                + (
                    ""
                    if self.work_dir_bytes is None
                    else f", {_fmt_bytes(self.work_dir_bytes)} of them in {fmt.WORK_DIR_NAME}"
                )
                + f"; committed list data {_fmt_bytes(self.list_bytes_committed)})"
            ),
            (
                f"list sizes       min {s.min:,}, median {s.median:,g}, max {s.max:,}, "
                f"mean {s.mean:,.1f}, empty {s.empty:,}, imbalance factor {imb}"
            ),
        ]
        top = max((c for _, _, c in s.histogram), default=0)
        width = max(len(f"{b:,}") for _, b, _ in s.histogram) if s.histogram else 1
        for a, b, c in s.histogram:
            bar = "#" * (round(_HIST_WIDTH * c / top) if top else 0)
            if c and not bar:
                bar = "."
            lines.append(f"  {a:>{width},} - {b:>{width},} | {bar:<{_HIST_WIDTH}} {c:,}")
        t = self.training
        if t is None and self.trained:
            lines.append("training         not recorded (centroids set directly)")
        elif t is None:
            lines.append("training         none (not trained)")
        else:
            obj = (
                f", objective {t.objective[0]:.6g} -> {t.objective[-1]:.6g}" if t.objective else ""
            )
            lines.append(
                f"training         {t.npoints:,} points, {t.niter} iterations, "
                f"{t.nsplit} empty-cluster splits, seed {t.seed}{obj}"
            )
        lines.append(
            f"per query        ~{self.vectors_per_query:,.0f} vectors, "
            f"~{_fmt_bytes(self.bytes_per_query)} scanned at nprobe {self.nprobe} (estimate)"
        )
        if self.lists is not None:
            lines.append("list     count    gen   vec bytes (file)          ids bytes (file)")
            for d in self.lists:
                vf = "missing" if d.vec_file_bytes is None else f"{d.vec_file_bytes:,}"
                idf = "missing" if d.ids_file_bytes is None else f"{d.ids_file_bytes:,}"
                lines.append(
                    f"{d.list_id:<7}  {d.count:<7,}  {d.file_generation:<4}  "
                    f"{d.vec_bytes:>11,} ({vf:>11})  {d.ids_bytes:>11,} ({idf:>11})"
                )
        return "\n".join(lines)

    def _build_state(self) -> str:
        """The report's ``build`` line: what the work directory of a parallel build means."""
        return _describe_work_dir(self.work_dir_bytes or 0, self.list_sizes.max)


def _index_dir(path: str | os.PathLike[str]) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise IndexNotFoundError(f"no diskivf index at {str(p)!r}")
    if not p.is_dir():
        raise FormatError(f"not a diskivf index: {str(p)!r} is not a directory")
    if not (p / fmt.META_NAME).exists():
        raise FormatError(f"not a diskivf index: {str(p)!r} has no {fmt.META_NAME}")
    return p


def _file_sizes(root: Path) -> tuple[int, dict[str, int]]:
    """Total size of the regular files under ``root`` and the sizes in ``lists/`` by name.

    Only ``stat``: no file is opened.
    """
    total = 0
    lists: dict[str, int] = {}
    with os.scandir(root) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    lists_dir = root / fmt.LISTS_DIR
    if lists_dir.is_dir():
        with os.scandir(lists_dir) as it:
            for entry in it:
                if entry.is_file(follow_symlinks=False):
                    size = entry.stat(follow_symlinks=False).st_size
                    lists[entry.name] = size
                    total += size
    return total, lists


def _work_dir_bytes(root: Path) -> int | None:
    """Size of the regular files in ``root``'s parallel-build work directory; None if absent.

    Only ``lstat`` and directory listings, never following a symlink and never opening a file,
    over at most ``_WORK_DIR_MAX_ENTRIES`` entries (the size is then a lower bound). Entries
    that vanish or cannot be listed meanwhile (a build may be running) are skipped.
    """
    work = root / fmt.WORK_DIR_NAME
    try:
        st = os.lstat(work)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total = 0
    seen = 0
    pending = [str(work)]
    while pending and seen < _WORK_DIR_MAX_ENTRIES:
        # A directory or file removed or renamed by a running build, or unreadable, is skipped.
        with contextlib.suppress(OSError), os.scandir(pending.pop()) as it:
            for entry in it:
                seen += 1
                if seen > _WORK_DIR_MAX_ENTRIES:
                    break
                with contextlib.suppress(OSError):
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
    return total


def _read_both(root: Path) -> tuple[fmt.Metadata, fmt.CommitRecord]:
    meta = fmt.read_meta(root)
    try:
        rec = fmt.read_commit(root, meta.nlist, meta.index_uuid)
    except FileNotFoundError:
        raise CorruptIndexError(
            f"corrupt: {str(root)!r} has {fmt.META_NAME} but no {fmt.COMMIT_NAME}"
        ) from None
    return meta, rec


def info(path: str | os.PathLike[str], *, lists: bool = False) -> IndexInfo:
    """Describe the index at ``path`` from its metadata and commit record alone.

    Reads ``meta.diskivf`` (header and centroids, whose checksums are checked) and
    ``commit.msgpack``, and ``stat``\\ s the files for their sizes. No inverted list is opened,
    mapped or read, whatever ``lists`` is. The work directory of an unfinished parallel build
    (``.parallel-build.tmp``) is reported (``unfinished_build``) and its files' sizes counted in
    ``bytes_on_disk``; none of its files is opened and no symlink in it is followed.

    Parameters
    ----------
    path
        Index directory.
    lists
        Also report every list's committed size and actual file sizes (:class:`ListDetail`);
        ``nlist`` entries.

    Returns
    -------
    IndexInfo
        ``print(info(path))`` shows the report; ``info(path).to_dict()`` is the JSON form.

    Raises
    ------
    IndexNotFoundError
        Nothing exists at ``path``.
    FormatError
        ``path`` is not an index, or its metadata or commit record is damaged (subclasses
        :class:`~diskivf.errors.CorruptIndexError`, :class:`~diskivf.errors.UnsupportedVersionError`);
        :func:`decode_header` decodes what is left.

    Notes
    -----
    ``vectors_per_query`` estimates the vectors one query scans at the default ``nprobe``,
    assuming queries follow the data (a list is probed with probability proportional to its
    size): ``min(rows, nprobe * rows / nlist * imbalance_factor)`` where ``rows`` counts the
    committed rows, removed ones included (a search scans them until :meth:`Index.compact`).
    ``bytes_per_query`` is that times ``dim * itemsize + 8`` (vector and id). The coarse step
    reads the in-memory centroids, not the disk.

    Examples
    --------
    >>> import numpy as np, diskivf, tempfile, os
    >>> from diskivf.inspect import info
    >>> d = os.path.join(tempfile.mkdtemp(), "i.index")
    >>> x = np.random.default_rng(0).standard_normal((400, 8)).astype(np.float32)
    >>> with diskivf.open(d, mode="w-", dim=8, nlist=4) as index:
    ...     _ = index.train(x)
    ...     _ = index.add(x)
    >>> r = info(d)
    >>> r.ntotal, r.nlist, r.to_dict()["schema"]
    (400, 4, 'diskivf.info/1')
    """
    root = _index_dir(path)
    meta, rec = _read_both(root)
    total, sizes = _file_sizes(root)
    work_bytes = _work_dir_bytes(root)
    counts = rec.list_counts
    itemsize = np.dtype(meta.vector_dtype).itemsize
    rowbytes = meta.dim * itemsize + np.dtype(fmt.ID_DTYPE).itemsize
    stats = ListSizeStats.from_counts(counts)
    rows = int(counts.sum())  # removed rows included: a search still scans them
    imb = stats.imbalance_factor or 0.0
    per_query = min(float(rows), meta.nprobe * rows / meta.nlist * imb)
    details = None
    if lists:
        per_list = []
        for list_id in range(meta.nlist):
            count, gen = int(counts[list_id]), int(rec.list_gens[list_id])
            vname, iname = (n.rsplit("/", 1)[1] for n in fmt.list_file_names(list_id, gen))
            per_list.append(
                ListDetail(
                    list_id,
                    count,
                    gen,
                    count * meta.dim * itemsize,
                    count * 8,
                    sizes.get(vname),
                    sizes.get(iname),
                )
            )
        details = tuple(per_list)
    return IndexInfo(
        path=str(path),
        format_version=meta.version,
        created_by=meta.created_by,
        index_uuid=meta.index_uuid,
        dim=meta.dim,
        metric=meta.metric,
        vector_dtype=meta.vector_dtype,
        id_dtype=fmt.ID_DTYPE,
        centroid_dtype=fmt.CENTROID_DTYPE,
        nlist=meta.nlist,
        nprobe=meta.nprobe,
        trained=meta.trained,
        ntotal=rec.ntotal,
        removed=len(getattr(rec, "tombstones", ())),
        next_id=rec.next_id,
        generation=rec.generation,
        bytes_on_disk=total + (work_bytes or 0),
        list_bytes_committed=rows * rowbytes,
        list_sizes=stats,
        training=meta.training,
        vectors_per_query=per_query,
        bytes_per_query=per_query * rowbytes,
        lists=details,
        unfinished_build=work_bytes is not None,
        work_dir_bytes=work_bytes,
    )


# -------------------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`; ``ok`` is True when nothing is wrong (``status == "ok"``).

    ``status`` keeps apart the three outcomes of format_spec §3: ``"ok"`` (every checksum and
    size matched), ``"damaged"`` (``problems`` says what is wrong) and ``"unsupported"`` (a
    file was written by a newer diskivf, or needs a feature this one lacks: nothing was judged
    damaged, and the lists were not checked). An unfinished parallel build leaves a valid
    commit, so it does not change the status: ``unfinished_build`` and a note report it.

    Attributes
    ----------
    path : str
        The index directory.
    generation : int or None
        Commit generation checked (``None`` when the commit record is unreadable).
    lists_checked : int
        Non-empty lists whose files were checksummed.
    bytes_checked : int
        Committed list bytes read.
    problems : tuple of Problem
        Everything found wrong, in file order.
    notes : tuple of str
        Harmless observations (files of older list generations, interrupted appends, the work
        directory of an unfinished parallel build).
    unsupported : str or None
        Why the index cannot be read by this diskivf (file, then reason), e.g.
        ``"meta.diskivf: written by a newer diskivf (format 2.0; ...); upgrade diskivf to read
        it"``; ``None`` when its format is supported.
    unfinished_build : bool
        The work directory of a parallel build (``.parallel-build.tmp``) exists: a build is
        running, or failed or was killed before it finished (see :attr:`notes`).
    """

    path: str
    generation: int | None
    lists_checked: int
    bytes_checked: int
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()
    unsupported: str | None = None
    unfinished_build: bool = False

    @property
    def status(self) -> str:
        """``"unsupported"``, ``"damaged"`` (some problem) or ``"ok"``."""
        if self.unsupported is not None:
            return "unsupported"
        return "damaged" if self.problems else "ok"

    @property
    def ok(self) -> bool:
        """True when ``status`` is ``"ok"``: every checksum and size matched.

        An unfinished parallel build leaves the index at a valid commit: it does not make this
        False (see :attr:`unfinished_build`).
        """
        return self.status == "ok"

    def to_text(self) -> str:
        """The report printed by ``diskivf verify``: a status line, then one line per problem."""
        if self.unsupported is not None:
            head = f"unsupported: {self.path}: {self.unsupported}; the lists were not checked"
            return "\n".join([head, *(f"  {p}" for p in self.problems)])
        gen = "?" if self.generation is None else str(self.generation)
        status = "DAMAGED" if self.problems else "ok"
        if self.unfinished_build:
            status += " (unfinished parallel build present)"
        head = (
            f"{status}: {self.path}: generation {gen}, "
            f"{self.lists_checked:,} lists and {self.bytes_checked:,} bytes checked"
        )
        if self.problems:
            head += f", {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        return "\n".join([head, *(f"  {p}" for p in self.problems)])

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, as ``diskivf verify --json``.

        Keys: ``ok`` (bool), ``status`` (``"ok"``, ``"damaged"`` or ``"unsupported"``),
        ``path`` (str), ``generation`` (int|null), ``lists_checked``, ``bytes_checked`` (int),
        ``problems`` (list of {file, list_id, message}), ``notes`` (list of str),
        ``unsupported`` (str|null: why, when ``status`` is ``"unsupported"``) and
        ``unfinished_build`` (bool).
        """
        return {
            "ok": self.ok,
            "status": self.status,
            "path": self.path,
            "generation": self.generation,
            "lists_checked": self.lists_checked,
            "bytes_checked": self.bytes_checked,
            "problems": [
                {"file": p.file, "list_id": p.list_id, "message": p.message} for p in self.problems
            ],
            "notes": list(self.notes),
            "unsupported": self.unsupported,
            "unfinished_build": self.unfinished_build,
        }


def _meta_fallback(root: Path) -> tuple[int, str, str, int] | None:
    """(nlist, uuid, vector_dtype, dim) from a metadata file damaged past its header.

    Only a header whose checksum still matches is trusted: a flipped bit in ``dim`` would
    otherwise make every list look truncated.
    """
    dump = decode_header(root / fmt.META_NAME)
    if dump.crc_ok is not True:
        return None
    h = dump.header
    nlist, uuid, dtype, dim = (h.get(k) for k in ("nlist", "index_uuid", "vector_dtype", "dim"))
    if (
        isinstance(nlist, int)
        and isinstance(dim, int)
        and 1 <= nlist <= fmt.MAX_NLIST
        and 1 <= dim <= fmt.MAX_DIM
        and isinstance(uuid, str)
        and isinstance(dtype, str)
        and dtype in fmt.VECTOR_DTYPES
    ):
        return nlist, uuid, dtype, dim
    return None


def _unsupported_reason(file: Path, exc: FormatError, notes: list[str]) -> str | None:
    """``"<file>: <why>"`` when ``exc`` means that this diskivf cannot read ``file``, else None.

    A newer major version or an unknown required feature is unsupported; anything else,
    major version 0 included (never written: a damaged or foreign file), is damage. A note is
    added to ``notes`` when the header checksum, computed as this format computes it, does not
    match: a newer format may compute it otherwise, or the version field itself may be hit.
    """
    if not isinstance(exc, UnsupportedVersionError):
        return None
    dump = decode_header(file)
    if dump.unsupported is None:
        return None
    if dump.crc_ok is False:
        notes.append(
            f"the header checksum of {file.name} does not match as format {fmt.FORMAT_MAJOR}.x "
            "computes it: unless a newer diskivf wrote it, its version field is damaged"
        )
    return f"{file.name}: {dump.unsupported}"


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check every checksum and size of the index at ``path``; report what is wrong.

    Checks the metadata file (preamble, header CRC, every field, centroid CRC), the commit
    record, and for every non-empty list that both its files exist, hold at least the committed
    prefix, and that the CRC32 of that prefix matches the commit record. When the metadata file
    is damaged but its header still decodes (say, only the centroids are hit), the lists are
    checked with what it says. Cost: one sequential read of the committed data.

    A file written by a newer major format version, or needing a ``required_features`` entry
    this library lacks, makes the result ``"unsupported"`` rather than damaged (format_spec §3),
    and nothing is checked with the dim and nlist such a file claims. The work directory of an
    unfinished parallel build is reported in ``unfinished_build`` and a note; it is not damage
    (the index holds its last commit), so ``ok`` stays True when everything committed checks.

    Parameters
    ----------
    path
        Index directory.

    Returns
    -------
    VerifyResult
        ``ok`` and ``status``, and one :class:`Problem` per finding (file, list, message).

    Raises
    ------
    IndexNotFoundError
        Nothing exists at ``path``.
    FormatError
        ``path`` is not a directory or has neither a metadata file nor a commit record.
    OSError
        A file could not be read for another reason than damage (permissions...).

    Examples
    --------
    >>> import numpy as np, diskivf, tempfile, os
    >>> from diskivf.inspect import verify
    >>> d = os.path.join(tempfile.mkdtemp(), "v.index")
    >>> x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    >>> with diskivf.open(d, mode="w-", dim=4, nlist=2) as index:
    ...     _ = index.train(x)
    ...     _ = index.add(x)
    >>> verify(d).ok
    True
    """
    root = Path(os.fspath(path))
    if not root.exists():
        raise IndexNotFoundError(f"no diskivf index at {str(root)!r}")
    if not root.is_dir():
        raise FormatError(f"not a diskivf index: {str(root)!r} is not a directory")
    if not (root / fmt.META_NAME).exists() and not (root / fmt.COMMIT_NAME).exists():
        raise FormatError(
            f"not a diskivf index: {str(root)!r} has neither {fmt.META_NAME} nor {fmt.COMMIT_NAME}"
        )
    problems: list[Problem] = []
    notes: list[str] = []
    work_bytes = _work_dir_bytes(root)

    def result(
        rec: fmt.CommitRecord | None,
        lists_checked: int = 0,
        bytes_checked: int = 0,
        unsupported: str | None = None,
    ) -> VerifyResult:
        if work_bytes is not None:
            rows = None if rec is None else int(rec.list_counts.sum())
            notes.insert(0, _describe_work_dir(work_bytes, rows))
        return VerifyResult(
            str(path),
            None if rec is None else rec.generation,
            lists_checked,
            bytes_checked,
            tuple(problems),
            tuple(notes),
            unsupported,
            work_bytes is not None,
        )

    try:
        meta = fmt.read_meta(root)
        nlist, uuid, dim, vdtype = meta.nlist, meta.index_uuid, meta.dim, meta.vector_dtype
    except FileNotFoundError:
        problems.append(Problem(fmt.META_NAME, None, "missing"))
        return result(None)
    except FormatError as exc:
        # A newer format is not damage, and its dim and nlist may not mean what 1.x says.
        why = _unsupported_reason(root / fmt.META_NAME, exc, notes)
        if why is not None:
            return result(None, unsupported=why)
        problems.append(Problem(fmt.META_NAME, None, str(exc)))
        fallback = _meta_fallback(root)
        if fallback is None:
            notes.append("the metadata header is unreadable: lists were not checked")
            return result(None)
        nlist, uuid, vdtype, dim = fallback
        notes.append("lists checked with the metadata header's dim, nlist and dtype")

    try:
        rec = fmt.read_commit(root, nlist, uuid)
    except FileNotFoundError:
        problems.append(Problem(fmt.COMMIT_NAME, None, "missing"))
        return result(None)
    except FormatError as exc:
        why = _unsupported_reason(root / fmt.COMMIT_NAME, exc, notes)
        if why is not None:
            return result(None, unsupported=why)
        problems.append(Problem(fmt.COMMIT_NAME, None, str(exc)))
        notes.append("the commit record is unreadable: lists were not checked")
        return result(None)

    _, sizes = _file_sizes(root)
    lists = verify_lists(root, rec, dim, np.dtype(vdtype).itemsize, sizes)
    problems += lists.problems
    if lists.torn:
        notes.append(
            f"{lists.torn} list file(s) hold bytes past their committed prefix (left by an interrupted "
            "append; readers ignore them and the next append overwrites them)"
        )
    stale = sorted(set(sizes) - lists.files)
    if stale:
        notes.append(
            f"{len(stale)} file(s) in {fmt.LISTS_DIR}/ not referenced by the commit record "
            f"(e.g. {stale[0]}); readers ignore them"
        )
    return result(rec, lists.lists_checked, lists.bytes_checked)


# ------------------------------------------------------------------------------ decode_header


@dataclass(frozen=True)
class HeaderDump:
    """Everything :func:`decode_header` could recover from one metadata or commit file.

    Attributes
    ----------
    file : str
        The file decoded.
    size : int
        Its size in bytes.
    kind : str
        ``"meta"``, ``"commit"`` (from the magic, else from the file name) or ``"unknown"``.
    magic : str
        The first 8 bytes, hex.
    magic_ok : bool
        Whether they are the magic of ``kind``.
    version : tuple of int or None
        ``(major, minor)`` from the preamble.
    reserved, header_len, header_crc32 : int or None
        The other preamble fields as stored.
    crc_ok : bool or None
        Whether the stored header CRC matches the bytes (``None`` if they are not all there).
    header : dict
        The msgpack map's entries, as far as they decode; binary values (the commit record's
        per-list arrays) are summarised as ``{"dtype", "length", "head", ...}`` dicts.
    complete : bool
        Whether the whole map decoded.
    centroids : dict or None
        For a metadata file: offset, expected and available bytes, and whether the CRC matches.
    problems : tuple of str
        Every anomaly found, in file order. Empty for a valid file.
    unsupported : str or None
        Why this diskivf cannot read the file although it may be intact: a newer major format
        version (then ``problems`` also holds what a 1.x decoder finds, which may not apply),
        or a ``required_features`` entry it lacks. ``None`` otherwise.
    """

    file: str
    size: int
    kind: str
    magic: str
    magic_ok: bool
    version: tuple[int, int] | None
    reserved: int | None
    header_len: int | None
    header_crc32: int | None
    crc_ok: bool | None
    header: Mapping[str, Any]
    complete: bool
    centroids: Mapping[str, Any] | None
    problems: tuple[str, ...]
    unsupported: str | None = None

    @property
    def status(self) -> str:
        """``"unsupported"`` (see :attr:`unsupported`), ``"damaged"`` (some problem) or ``"ok"``."""
        if self.unsupported is not None:
            return "unsupported"
        return "damaged" if self.problems else "ok"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``diskivf info --header --json``)."""
        return {
            "status": self.status,
            "file": self.file,
            "size": self.size,
            "kind": self.kind,
            "magic": self.magic,
            "magic_ok": self.magic_ok,
            "version": None if self.version is None else list(self.version),
            "reserved": self.reserved,
            "header_len": self.header_len,
            "header_crc32": self.header_crc32,
            "crc_ok": self.crc_ok,
            "header": dict(self.header),
            "complete": self.complete,
            "centroids": None if self.centroids is None else dict(self.centroids),
            "problems": list(self.problems),
            "unsupported": self.unsupported,
        }

    def to_text(self) -> str:
        """A human-readable dump: preamble, then one line per header key, then problems."""
        ver = "?" if self.version is None else f"{self.version[0]}.{self.version[1]}"
        crc = {True: "ok", False: "MISMATCH", None: "not checkable"}[self.crc_ok]
        hcrc = "?" if self.header_crc32 is None else f"{self.header_crc32:08x}"
        lines = [
            f"file         {self.file} ({self.size:,} bytes, {self.kind})",
            f"magic        {self.magic} ({'ok' if self.magic_ok else 'WRONG'})",
            f"version      {ver}, reserved {self.reserved}, header_len {self.header_len}",
            f"header crc32 {hcrc} ({crc})",
            f"header       {len(self.header)} keys decoded"
            + ("" if self.complete else " (INCOMPLETE)"),
        ]
        for key, value in self.header.items():
            lines.append(f"  {key}: {json.dumps(value, default=str)}")
        if self.centroids is not None:
            lines.append(f"centroids    {json.dumps(dict(self.centroids))}")
        if self.unsupported is not None:
            lines.append(f"unsupported  {self.unsupported}")
        if self.problems:
            lines.append("problems")
            lines.extend(f"  - {p}" for p in self.problems)
        else:
            lines.append("problems     none")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _jsonable(key: str, value: Any) -> Any:
    """Make a decoded msgpack value printable; summarise binary arrays."""
    if isinstance(value, bytes):
        dtype = _COMMIT_ARRAYS.get(key)
        if dtype is not None and len(value) % np.dtype(dtype).itemsize == 0:
            arr = np.frombuffer(value, dtype=dtype)
            out: dict[str, Any] = {
                "dtype": dtype,
                "length": int(arr.size),
                "head": arr[:_DUMP_HEAD].tolist(),
            }
            if key == "list_counts" and arr.size:
                out.update(sum=int(arr.sum()), min=int(arr.min()), max=int(arr.max()))
            return out
        return {"bytes": len(value), "hex_head": value[:32].hex()}
    if isinstance(value, dict):
        return {str(k): _jsonable(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable("", v) for v in value]
    if isinstance(value, float | int | str | bool) or value is None:
        return value
    return repr(value)


def _header_crc(preamble: bytes, body: bytes) -> int:
    """The header CRC as :mod:`diskivf.format` computes it (over preamble and body if it says so)."""
    fn: Callable[[bytes, bytes], int] | None = getattr(fmt, "_header_crc", None)
    return fn(preamble, body) if fn is not None else fmt.crc32(body)


def decode_header(path: str | os.PathLike[str]) -> HeaderDump:
    """Decode the preamble and msgpack header of a metadata or commit file, as far as possible.

    Unlike the normal readers, which stop at the first error, this keeps going: it reports the
    preamble fields as stored, checks the CRC, decodes the msgpack map entry by entry until the
    bytes run out or stop making sense (so a truncated file still shows its first keys), and for
    a metadata file checks the extent and CRC of the centroids. Finally the normal validating
    decoder runs, and its verdict is the last problem if it rejects the file.

    Parameters
    ----------
    path
        A ``meta.diskivf`` or ``commit.msgpack`` file (at most the header's size limit plus the
        centroids is read). The kind is taken from the magic, or else from the file name.

    Returns
    -------
    HeaderDump
        ``problems`` is empty for a valid file; ``status`` tells damage from a file of a format
        this diskivf cannot read.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    IsADirectoryError
        ``path`` is a directory: pass one of its files.
    OSError
        ``path`` cannot be read.
    """
    p = Path(os.fspath(path))
    problems: list[str] = []
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = f.read(min(size, fmt.PREAMBLE.size + fmt.MAX_COMMIT_BODY))
    magic = buf[:8]
    if magic == fmt.META_MAGIC:
        kind = "meta"
    elif magic == fmt.COMMIT_MAGIC:
        kind = "commit"
    else:
        kind = {fmt.META_NAME: "meta", fmt.COMMIT_NAME: "commit"}.get(p.name, "unknown")
        problems.append(
            f"magic is {magic.hex()}, not the diskivf "
            + {"meta": "metadata", "commit": "commit record"}.get(kind, "metadata or commit")
            + " magic"
        )
    magic_ok = magic in (fmt.META_MAGIC, fmt.COMMIT_MAGIC)
    version = reserved = hlen = hcrc = None
    unsupported: str | None = None
    crc_ok: bool | None = None
    header: dict[str, Any] = {}
    complete = False
    centroids: dict[str, Any] | None = None
    body = b""
    if len(buf) < fmt.PREAMBLE.size:
        problems.append(
            f"file has {len(buf)} bytes, shorter than the {fmt.PREAMBLE.size}-byte preamble"
        )
    else:
        _, major, minor, reserved, hlen, hcrc = fmt.PREAMBLE.unpack_from(buf)
        version = (major, minor)
        if major != fmt.FORMAT_MAJOR:
            problems.append(
                f"format major version {major} (this library reads {fmt.FORMAT_MAJOR}.x)"
            )
        if major > fmt.FORMAT_MAJOR and magic_ok:  # major 0 was never written: damage
            unsupported = (
                f"written by a newer diskivf (format {major}.{minor}; this diskivf reads "
                f"{fmt.FORMAT_MAJOR}.x); upgrade diskivf to read it"
            )
        if reserved != 0:
            problems.append(f"reserved preamble field is {reserved}, not 0")
        avail = len(buf) - fmt.PREAMBLE.size
        if hlen > avail:
            problems.append(
                f"header_len {hlen:,} runs past the end of the file ({avail:,} bytes after the "
                "preamble); decoding what is there"
            )
        body = buf[fmt.PREAMBLE.size : fmt.PREAMBLE.size + min(hlen, avail)]
        if hlen <= avail:
            crc_ok = _header_crc(buf[: fmt.PREAMBLE.size], body) == hcrc
            if not crc_ok:
                problems.append(f"header checksum mismatch (stored {hcrc:08x})")
        header, complete, msg = _decode_map(body)
        if msg:
            problems.append(msg)
        if kind == "commit" and hlen <= avail and len(buf) > fmt.PREAMBLE.size + hlen:
            problems.append(
                f"{len(buf) - fmt.PREAMBLE.size - hlen} trailing bytes after the header"
            )
        if kind == "meta":
            centroids = _check_centroids(p, header, fmt.PREAMBLE.size + len(body), size, problems)
    if not problems:
        verdict = _validate(p, buf, size, kind, header)
        if verdict is not None:
            problems.append(f"rejected by the reader: {verdict}")
        if isinstance(verdict, UnsupportedVersionError):
            unsupported = _missing_features(header.get("required_features")) or str(verdict)
    return HeaderDump(
        file=str(p),
        size=size,
        kind=kind,
        magic=magic.hex(),
        magic_ok=magic_ok,
        version=version,
        reserved=reserved,
        header_len=hlen,
        header_crc32=hcrc,
        crc_ok=crc_ok,
        header={str(k): _jsonable(str(k), v) for k, v in header.items()},
        complete=complete,
        centroids=centroids,
        problems=tuple(problems),
        unsupported=unsupported,
    )


def _missing_features(value: Any) -> str:
    """Why a ``required_features`` value makes a file unreadable here ('' if it does not)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return ""
    unknown = sorted(set(value) - fmt.KNOWN_FEATURES)
    if not unknown:
        return ""
    return (
        f"needs format features {unknown} that this diskivf does not implement; upgrade "
        "diskivf to read it"
    )


def _decode_map(body: bytes) -> tuple[dict[str, Any], bool, str]:
    """Decode a msgpack map entry by entry; return (entries, complete, problem or "")."""
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=False,
        max_buffer_size=max(len(body), 1),
        max_array_len=100_000,
        max_map_len=10_000,
        max_ext_len=0,
    )
    unpacker.feed(body)
    out: dict[str, Any] = {}
    try:
        n = unpacker.read_map_header()
    except msgpack.OutOfData:
        return out, False, "the msgpack header is empty or cut before its first byte"
    except Exception as exc:  # noqa: BLE001 - any decoder complaint is a finding, not a crash
        return out, False, f"the msgpack header is not a map ({exc})"
    for i in range(n):
        try:
            key = unpacker.unpack()
            value = unpacker.unpack()
        except msgpack.OutOfData:
            return out, False, f"the msgpack map is cut after {i} of its {n} entries"
        except Exception as exc:  # noqa: BLE001
            return out, False, f"msgpack entry {i} of {n} does not decode ({exc})"
        out[str(key)] = value
    rest = len(body) - unpacker.tell()
    if rest:
        return out, True, f"{rest} bytes follow the msgpack map inside header_len"
    return out, True, ""


def _check_centroids(
    p: Path, header: Mapping[str, Any], hend: int, size: int, problems: list[str]
) -> dict[str, Any] | None:
    nlist, dim = header.get("nlist"), header.get("dim")
    offset, crc = header.get("centroids_offset"), header.get("centroids_crc32")
    if header.get("trained") is not True:
        return None
    if not (
        isinstance(nlist, int)
        and isinstance(dim, int)
        and isinstance(offset, int)
        and isinstance(crc, int)
        and min(nlist, dim, offset, crc) >= 0
    ):
        problems.append("trained, but nlist, dim, centroids_offset or centroids_crc32 is unusable")
        return None
    nbytes = nlist * dim * 4
    avail = max(0, min(nbytes, size - offset))
    out: dict[str, Any] = {"offset": offset, "bytes": nbytes, "available": avail, "crc_ok": None}
    if offset < hend:
        problems.append(f"centroids_offset {offset} lies inside the header (ends at {hend})")
        return out
    if avail < nbytes:
        problems.append(
            f"centroids truncated: {nbytes:,} bytes needed at offset {offset:,}, {avail:,} present"
        )
        return out
    got = 0
    with open(p, "rb") as f:  # chunked: centroids may be large
        for start in range(offset, offset + nbytes, _CRC_CHUNK):
            got = fmt.crc32(
                os.pread(f.fileno(), min(_CRC_CHUNK, offset + nbytes - start), start), got
            )
    out["crc_ok"] = got == crc
    if not out["crc_ok"]:
        problems.append(f"centroids checksum mismatch (stored {crc:08x}, found {got:08x})")
    return out


def _validate(
    p: Path, buf: bytes, size: int, kind: str, header: Mapping[str, Any]
) -> Exception | None:
    """Run the library's own validating decoder; return its complaint or None."""
    try:
        if kind == "meta":
            with open(p, "rb") as f:

                def read(offset: int, nbytes: int) -> bytes:
                    return os.pread(f.fileno(), nbytes, offset)

                fmt.decode_meta(buf, size, read)
        elif kind == "commit":
            raw = header.get("list_counts")
            uuid = header.get("index_uuid")
            if not isinstance(raw, bytes) or not isinstance(uuid, str):
                return FormatError("no list_counts or index_uuid to validate against")
            fmt.decode_commit(buf, len(raw) // 8, uuid)
    except (FormatError, struct.error, ValueError) as exc:
        return exc
    return None
