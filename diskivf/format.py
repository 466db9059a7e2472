"""The on-disk format: the only module that knows byte layouts and file names.

Everything here is normative in ``format_spec.md``; change one only together with the other.
The module encodes and decodes the metadata file (``meta.diskivf``) and the commit record
(``commit.msgpack``), validates every decoded field through small ``parse_*`` functions before
anything is allocated from it, and provides the atomic replace used to publish both files.

Files are untrusted input: lengths are capped and checked against the file size before reading,
msgpack is unpacked with size limits, and no path is ever taken from file contents.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import msgpack
import numpy as np
from numpy.typing import NDArray

from diskivf.errors import CorruptIndexError, FormatError, UnsupportedVersionError

__all__ = [
    "ARRAY_ALIGN",
    "COMMIT_MAGIC",
    "COMMIT_NAME",
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "ID_DTYPE",
    "LISTS_DIR",
    "LOCK_NAME",
    "MAX_DIM",
    "MAX_NLIST",
    "MAX_TOMBSTONES",
    "META_MAGIC",
    "META_NAME",
    "METRICS",
    "ROW_BITS",
    "SHARD_FILES",
    "SHARD_MAGIC",
    "SHARD_MANIFEST_NAME",
    "VECTOR_DTYPES",
    "CommitRecord",
    "Metadata",
    "Metric",
    "ShardManifest",
    "TrainingInfo",
    "atomic_write",
    "check_list_crc",
    "crc32",
    "decode_commit",
    "decode_meta",
    "decode_shard_manifest",
    "encode_commit",
    "encode_meta",
    "encode_shard_manifest",
    "encode_shard_offsets",
    "fsync_dir",
    "list_file_names",
    "read_commit",
    "read_meta",
    "read_shard_offsets",
    "trained_hash",
]

Metric = Literal["l2", "ip", "cosine"]
METRICS: Final = ("l2", "ip", "cosine")

FORMAT_MAJOR: Final = 1
FORMAT_MINOR: Final = 0

META_NAME: Final = "meta.diskivf"
COMMIT_NAME: Final = "commit.msgpack"
LOCK_NAME: Final = "LOCK"
LISTS_DIR: Final = "lists"
#: Work directory of a parallel build inside the index it builds (format_spec §4: a ``.tmp``
#: name, so never part of the index); removed when the build, or any build resuming it, ends.
WORK_DIR_NAME: Final = ".parallel-build.tmp"

META_MAGIC: Final = b"\x93DISKIVF"
COMMIT_MAGIC: Final = b"\x93DIVFCMT"
# magic, u8 major, u8 minor, u16 reserved, u32 header_len, u32 header_crc32 (all little-endian);
# header_crc32 is the CRC32 of the preamble's first 16 bytes followed by the header bytes.
PREAMBLE: Final = struct.Struct("<8sBBHII")
ARRAY_ALIGN: Final = 64

MAX_DIM: Final = 65536
MAX_NLIST: Final = 1 << 20
# A metadata header holds no arrays, so a megabyte is generous; the commit record carries
# three nlist-long arrays (8 + 4 + 4 + 4 bytes per list), at most ~21 MB at MAX_NLIST.
MAX_META_HEADER: Final = 1 << 20
MAX_TOMBSTONES: Final = 1 << 22
MAX_COMMIT_BODY: Final = 64 << 20
# A tombstone packs (list_id, row) into one int64: list_id << ROW_BITS | row.
ROW_BITS: Final = 40

VECTOR_DTYPES: Final = ("<f4", "<f2")
ID_DTYPE: Final = "<i8"
CENTROID_DTYPE: Final = "<f4"
KNOWN_FEATURES: Final[frozenset[str]] = frozenset()

_UUID_RE: Final = re.compile(r"[0-9a-f]{32}")
_MAX_OBJECTIVE_LEN: Final = 10_000
_MAX_ITEMS: Final = 1 << 15  # elements + map entries + containers in one msgpack header


def _align(n: int) -> int:
    return (n + ARRAY_ALIGN - 1) // ARRAY_ALIGN * ARRAY_ALIGN


# --------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingInfo:
    """How the centroids were trained (informational; not needed to search)."""

    npoints: int
    niter: int
    nsplit: int
    seed: int
    objective: tuple[float, ...]


@dataclass(frozen=True)
class Metadata:
    """Decoded ``meta.diskivf`` header plus the centroids (``None`` until trained)."""

    dim: int
    nlist: int
    metric: Metric
    vector_dtype: str
    nprobe: int
    index_uuid: str
    centroids: NDArray[np.float32] | None = None
    training: TrainingInfo | None = None
    created_by: str = ""
    version: tuple[int, int] = (FORMAT_MAJOR, FORMAT_MINOR)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> bool:
        """Whether centroids are present."""
        return self.centroids is not None


@dataclass(frozen=True)
class CommitRecord:
    """Decoded ``commit.msgpack``: which prefix of every list is committed.

    ``list_counts[i]`` rows of list ``i`` are committed; bytes past them are garbage from an
    interrupted append. ``list_gens[i]`` names the file generation of list ``i`` (compaction
    writes a new generation rather than rewriting a file a reader may have mapped).
    ``tombstones`` are removed rows, sorted, each ``list_id << ROW_BITS | row``.
    """

    generation: int
    index_uuid: str
    next_id: int
    list_counts: NDArray[np.int64]
    list_gens: NDArray[np.uint32]
    vec_crc32: NDArray[np.uint32]
    ids_crc32: NDArray[np.uint32]
    tombstones: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    version: tuple[int, int] = (FORMAT_MAJOR, FORMAT_MINOR)

    @property
    def ntotal(self) -> int:
        """Live vectors: committed rows over all lists minus removed rows."""
        return int(self.list_counts.sum()) - len(self.tombstones)

    @classmethod
    def empty(cls, nlist: int, index_uuid: str) -> CommitRecord:
        """The record of a freshly created index: generation 0, every list empty."""
        return cls(
            generation=0,
            index_uuid=index_uuid,
            next_id=0,
            list_counts=np.zeros(nlist, np.int64),
            list_gens=np.zeros(nlist, np.uint32),
            vec_crc32=np.zeros(nlist, np.uint32),
            ids_crc32=np.zeros(nlist, np.uint32),
        )


def list_file_names(list_id: int, gen: int) -> tuple[str, str]:
    """Relative paths of list ``list_id``'s vector and id files at file generation ``gen``.

    Names derive from two validated integers only, so file contents can never steer a path.
    """
    stem = f"{LISTS_DIR}/{list_id:07d}.{gen}"
    return stem + ".vec", stem + ".ids"


# --------------------------------------------------------------------------------------------
# checksum
# --------------------------------------------------------------------------------------------

_crc32_impl: Callable[[Any, int], int] | None = None


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """zlib's CRC-32 of ``data``, continued from the CRC ``value`` of the bytes before it.

    Every checksum of the format is this one. ISA-L's implementation (the optional ``isal``
    package: ``pip install "diskivf[fast]"``) computes the same values with carry-less
    multiplication, 4-6x faster than zlib 1.2's table method, which at 1-1.7 GB/s is a fifth
    of the CPU time of an add's writes (``tools/bench_add.py``); it is used when installed.
    """
    global _crc32_impl
    if _crc32_impl is None:
        try:
            from isal import isal_zlib  # optional: loaded on first use, not at import

            _crc32_impl = isal_zlib.crc32
        except ImportError:
            _crc32_impl = zlib.crc32
    return _crc32_impl(data, value)


def check_list_crc(name: str, list_id: int, found: int, expected: int) -> None:
    """Raise unless ``found``, the CRC-32 of a list file's committed prefix, is ``expected``,
    the commit record's.

    What rewrites a list (compaction, a merge) checks the bytes it copies: it computes the
    copy's checksums afresh, which would otherwise turn damage into a list that verifies.

    Raises
    ------
    CorruptIndexError
        The checksums differ.
    """
    if found != expected:
        raise CorruptIndexError(
            f"corrupt: list {list_id} file {name} does not match the commit record's checksum "
            f"(expected crc32 {expected:08x}, found {found:08x}); verify() names every damaged "
            "file"
        )


# --------------------------------------------------------------------------------------------
# preamble (shared by both files)
# --------------------------------------------------------------------------------------------


def _header_crc(preamble: bytes, body: bytes) -> int:
    # The checksum covers the preamble's first 16 bytes (magic, version, reserved, header_len)
    # as well as the msgpack bytes: otherwise a flipped bit in the minor version would read as
    # a valid newer-minor file and be silently accepted.
    return crc32(body, crc32(preamble[: PREAMBLE.size - 4]))


def _pack_preamble(
    magic: bytes, body: bytes, *, major: int = FORMAT_MAJOR, minor: int = FORMAT_MINOR
) -> bytes:
    head = PREAMBLE.pack(magic, major, minor, 0, len(body), 0)
    return PREAMBLE.pack(magic, major, minor, 0, len(body), _header_crc(head, body))


def _read_preamble(
    buf: bytes, magic: bytes, what: str, max_len: int
) -> tuple[tuple[int, int], bytes]:
    """Check magic/version/length/CRC of ``buf`` and return (version, msgpack bytes)."""
    if len(buf) < PREAMBLE.size or buf[: len(magic)] != magic:
        raise FormatError(f"not a diskivf index: {what} does not start with the diskivf magic")
    _, major, minor, reserved, hlen, hcrc = PREAMBLE.unpack_from(buf)
    if major != FORMAT_MAJOR:
        hint = "newer diskivf may read this" if major > FORMAT_MAJOR else "corrupt or foreign"
        raise UnsupportedVersionError(
            f"{what} was written by format version {major}.{minor} "
            f"(this library reads up to {FORMAT_MAJOR}.{FORMAT_MINOR}); {hint}"
        )
    if reserved != 0:
        raise CorruptIndexError(f"corrupt: {what} preamble reserved field is {reserved}, not 0")
    if hlen > max_len:
        raise CorruptIndexError(
            f"corrupt: {what} header length {hlen} exceeds the limit of {max_len} bytes"
        )
    if PREAMBLE.size + hlen > len(buf):
        raise CorruptIndexError(
            f"corrupt: {what} header length {hlen} runs past the end of the file ({len(buf)} bytes)"
        )
    body = bytes(buf[PREAMBLE.size : PREAMBLE.size + hlen])
    if _header_crc(buf[: PREAMBLE.size], body) != hcrc:
        raise CorruptIndexError(f"corrupt: {what} header checksum mismatch")
    return (major, minor), body


def _unpack(body: bytes, what: str) -> dict[str, Any]:
    items = 0

    def count(container: Any) -> Any:
        # One byte of msgpack (an empty array, a short string) can cost 60 bytes of Python
        # objects, so the byte limits alone would let a 32 MB record allocate gigabytes. Cap the
        # items (array elements, map pairs and containers) of the whole header instead: a
        # legitimate one holds at most an objective list plus a few dozen keys.
        nonlocal items
        items += len(container) + 1
        if items > _MAX_ITEMS:
            raise ValueError(f"more than {_MAX_ITEMS} array elements and map entries")
        return container

    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            # Keep hostile nesting shallow and containers small: nothing legitimate is deep.
            max_array_len=_MAX_OBJECTIVE_LEN,
            max_map_len=1024,
            max_str_len=1 << 16,
            max_bin_len=MAX_COMMIT_BODY,
            max_ext_len=0,
            list_hook=count,
            object_hook=count,
        )
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise CorruptIndexError(f"corrupt: {what} header is not valid msgpack ({exc})") from exc
    if not isinstance(obj, dict):
        raise CorruptIndexError(f"corrupt: {what} header is a {type(obj).__name__}, not a map")
    if not all(isinstance(key, str) for key in obj):
        raise CorruptIndexError(f"corrupt: {what} header has a map key that is not a string")
    return obj


# --------------------------------------------------------------------------------------------
# parse_* validators: each checks one field and names it in the error
# --------------------------------------------------------------------------------------------


def _get(h: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in h:
        raise CorruptIndexError(f"corrupt: {what} is missing required key {key!r}")
    return h[key]


def parse_int(value: Any, key: str, lo: int, hi: int, what: str = "header") -> int:
    """Return ``value`` if it is an int (not bool) in ``[lo, hi]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CorruptIndexError(
            f"corrupt: {what} key {key!r} must be an integer, got {type(value).__name__}"
        )
    if not lo <= value <= hi:
        raise CorruptIndexError(f"corrupt: {what} key {key!r}={value} is outside [{lo}, {hi}]")
    return value


def parse_str(value: Any, key: str, allowed: tuple[str, ...], what: str = "header") -> str:
    """Return ``value`` if it is one of ``allowed`` strings, else raise."""
    if not isinstance(value, str) or value not in allowed:
        raise CorruptIndexError(
            f"corrupt: {what} key {key!r} must be one of {list(allowed)}, got {value!r}"
        )
    return value


def parse_uuid(value: Any, what: str = "header") -> str:
    """Return ``value`` if it is 32 lowercase hex digits, else raise."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value):
        raise CorruptIndexError(f"corrupt: {what} key 'index_uuid' is not 32 hex digits")
    return value


def parse_required_features(value: Any) -> None:
    """Reject a file that needs a feature this reader does not implement (zarr must_understand)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CorruptIndexError("corrupt: header key 'required_features' must be a string list")
    unknown = sorted(set(value) - KNOWN_FEATURES)
    if unknown:
        raise UnsupportedVersionError(
            f"index requires features {unknown} that this library does not implement; "
            "newer diskivf may read this"
        )


def parse_training(value: Any) -> TrainingInfo:
    """Validate the optional ``training`` map."""
    if not isinstance(value, dict):
        raise CorruptIndexError("corrupt: header key 'training' must be a map")
    big = 1 << 62
    objective = value.get("objective", [])
    if not isinstance(objective, list) or not all(
        isinstance(v, float | int) and not isinstance(v, bool) for v in objective
    ):
        raise CorruptIndexError("corrupt: training key 'objective' must be a list of numbers")
    return TrainingInfo(
        npoints=parse_int(value.get("npoints", 0), "npoints", 0, big, "training"),
        niter=parse_int(value.get("niter", 0), "niter", 0, 1 << 20, "training"),
        nsplit=parse_int(value.get("nsplit", 0), "nsplit", 0, big, "training"),
        seed=parse_int(value.get("seed", 0), "seed", -big, big, "training"),
        objective=tuple(float(v) for v in objective),
    )


_META_KEYS: Final = frozenset(
    {
        "dim",
        "nlist",
        "metric",
        "vector_dtype",
        "id_dtype",
        "centroid_dtype",
        "nprobe",
        "index_uuid",
        "trained",
        "centroids_offset",
        "centroids_crc32",
        "training",
        "required_features",
        "created_by",
    }
)


def _check_unknown_keys(h: Mapping[str, Any], known: frozenset[str], minor: int, what: str) -> None:
    # A newer minor may add optional keys we do not know; in our own minor every key is known,
    # so an unknown one means damage or a foreign writer.
    if minor > FORMAT_MINOR:
        return
    unknown = sorted(k for k in h if k not in known and not k.startswith("x_"))
    if unknown:
        raise CorruptIndexError(f"corrupt: {what} has unknown keys {unknown}")


# --------------------------------------------------------------------------------------------
# metadata file
# --------------------------------------------------------------------------------------------


def encode_meta(meta: Metadata) -> bytes:
    """Serialise ``meta`` (header and centroids) into the bytes of ``meta.diskivf``.

    Raises
    ------
    ValueError
        If the centroids do not have shape ``(nlist, dim)``.
    """
    header: dict[str, Any] = {
        "dim": meta.dim,
        "nlist": meta.nlist,
        "metric": meta.metric,
        "vector_dtype": meta.vector_dtype,
        "id_dtype": ID_DTYPE,
        "centroid_dtype": CENTROID_DTYPE,
        "nprobe": meta.nprobe,
        "index_uuid": meta.index_uuid,
        "trained": meta.centroids is not None,
        "required_features": [],
        "created_by": meta.created_by,
    }
    # Keys this version does not interpret (x_* or from a newer minor) survive a rewrite.
    header.update({k: v for k, v in meta.extra.items() if k not in header})
    if meta.training is not None:
        t = meta.training
        header["training"] = {
            "npoints": t.npoints,
            "niter": t.niter,
            "nsplit": t.nsplit,
            "seed": t.seed,
            "objective": [float(v) for v in t.objective],
        }
    cbytes = b""
    if meta.centroids is not None:
        c = np.ascontiguousarray(meta.centroids, dtype=CENTROID_DTYPE)
        if c.shape != (meta.nlist, meta.dim):
            raise ValueError(
                f"expected centroids of shape ({meta.nlist}, {meta.dim}) but got {c.shape}"
            )
        cbytes = c.tobytes()
        header["centroids_crc32"] = crc32(cbytes)
        # The offset depends on the header length, which depends on the offset's own encoding;
        # iterate until the encoded length stops changing (at most a couple of rounds).
        header["centroids_offset"] = 0
        while True:
            body: bytes = msgpack.packb(header, use_bin_type=True)
            offset = _align(PREAMBLE.size + len(body))
            if header["centroids_offset"] == offset:
                break
            header["centroids_offset"] = offset
    body = bytes(msgpack.packb(header, use_bin_type=True))
    out = _pack_preamble(META_MAGIC, body) + body
    if cbytes:
        out += b"\0" * (_align(len(out)) - len(out)) + cbytes
    # Never write what a reader would reject (over-long objective, oversized strings...).
    try:
        decode_meta(out)
    except FormatError as exc:
        raise ValueError(f"metadata cannot be encoded within the format's limits: {exc}") from exc
    return out


def decode_meta(
    buf: bytes,
    file_size: int | None = None,
    read: Callable[[int, int], bytes] | None = None,
) -> Metadata:
    """Parse and validate the bytes of ``meta.diskivf``.

    Parameters
    ----------
    buf
        The file's bytes: the whole file, or at least preamble and header when ``read`` is given.
    file_size
        The real size of the file, if ``buf`` may be a prefix; defaults to ``len(buf)``.
    read
        ``read(offset, nbytes)`` returns those bytes of the file; used for the centroids when
        ``buf`` does not hold them, only after their extent was validated against ``file_size``.

    Raises
    ------
    FormatError
        Not a diskivf metadata file.
    UnsupportedVersionError
        Another major version, or a required feature this library lacks.
    CorruptIndexError
        Any field fails validation, or a checksum does not match.
    """
    what = META_NAME
    (major, minor), body = _read_preamble(buf, META_MAGIC, what, MAX_META_HEADER)
    h = _unpack(body, what)
    # Features first: a file needing something we lack is "newer", not "corrupt".
    parse_required_features(_get(h, "required_features", what))
    _check_unknown_keys(h, _META_KEYS, minor, what)
    dim = parse_int(_get(h, "dim", what), "dim", 1, MAX_DIM)
    nlist = parse_int(_get(h, "nlist", what), "nlist", 1, MAX_NLIST)
    metric = parse_str(_get(h, "metric", what), "metric", METRICS)
    vector_dtype = parse_str(_get(h, "vector_dtype", what), "vector_dtype", VECTOR_DTYPES)
    parse_str(_get(h, "id_dtype", what), "id_dtype", (ID_DTYPE,))
    parse_str(_get(h, "centroid_dtype", what), "centroid_dtype", (CENTROID_DTYPE,))
    nprobe = parse_int(_get(h, "nprobe", what), "nprobe", 1, nlist)
    uuid = parse_uuid(_get(h, "index_uuid", what))
    trained = _get(h, "trained", what)
    if not isinstance(trained, bool):
        raise CorruptIndexError("corrupt: header key 'trained' must be a boolean")
    created_by = h.get("created_by", "")
    if not isinstance(created_by, str):
        raise CorruptIndexError("corrupt: header key 'created_by' must be a string")
    training = parse_training(h["training"]) if "training" in h else None

    centroids = None
    if trained:
        size = len(buf) if file_size is None else file_size
        nbytes = nlist * dim * 4  # both bounded above, so no overflow in Python or in numpy
        offset = parse_int(_get(h, "centroids_offset", what), "centroids_offset", 0, 1 << 40)
        if offset != _align(PREAMBLE.size + len(body)):
            raise CorruptIndexError(
                f"corrupt: centroids_offset {offset} is not the 64-aligned end of the header "
                f"({_align(PREAMBLE.size + len(body))})"
            )
        if offset + nbytes > size:
            raise CorruptIndexError(
                f"corrupt: {what} is truncated: centroids need bytes {offset}..{offset + nbytes} "
                f"but the file has {size}"
            )
        crc = parse_int(_get(h, "centroids_crc32", what), "centroids_crc32", 0, 0xFFFFFFFF)
        # The padding is covered by no checksum, so it must be zero: a flipped bit anywhere in
        # the file is then detected.
        hend = PREAMBLE.size + len(body)
        if offset + nbytes <= len(buf):
            raw = buf[hend : offset + nbytes]
        elif read is not None:
            raw = read(hend, offset + nbytes - hend)
        else:
            raise CorruptIndexError(f"corrupt: {what} is truncated before its centroids")
        if len(raw) != offset + nbytes - hend:
            raise CorruptIndexError(f"corrupt: {what} is truncated before its centroids")
        view = memoryview(raw)
        if any(view[: offset - hend]):
            raise CorruptIndexError(
                f"corrupt: {what} padding bytes {hend}..{offset} before the centroids are not zero"
            )
        cview = view[offset - hend :]  # a view: no copy of possibly large centroids
        if crc32(cview) != crc:
            raise CorruptIndexError(f"corrupt: {what} centroids checksum mismatch")
        centroids = np.frombuffer(cview, dtype=CENTROID_DTYPE).reshape(nlist, dim)
        centroids = centroids.astype(np.float32)  # native order, writable, owns its memory
        if not np.isfinite(centroids).all():
            raise CorruptIndexError(f"corrupt: {what} centroids contain NaN or infinity")
    extra = {k: v for k, v in h.items() if k not in _META_KEYS}
    return Metadata(
        dim=dim,
        nlist=nlist,
        metric=metric,  # type: ignore[arg-type]  # parse_str checked membership in METRICS
        vector_dtype=vector_dtype,
        nprobe=nprobe,
        index_uuid=uuid,
        centroids=centroids,
        training=training,
        created_by=created_by,
        version=(major, minor),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# commit record
# --------------------------------------------------------------------------------------------

_COMMIT_KEYS: Final = frozenset(
    {
        "generation",
        "index_uuid",
        "next_id",
        "list_counts",
        "list_gens",
        "vec_crc32",
        "ids_crc32",
        "tombstones",
    }
)
_MAX_ROWS: Final = 1 << 48


def parse_tombstones(raw: Any, counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Validate the ``tombstones`` bin: strictly increasing, each naming a committed row."""
    if not isinstance(raw, bytes) or len(raw) % 8:
        raise CorruptIndexError(f"corrupt: {COMMIT_NAME} key 'tombstones' must be <i8 bytes")
    if len(raw) // 8 > MAX_TOMBSTONES:
        raise CorruptIndexError(
            f"corrupt: {COMMIT_NAME} has {len(raw) // 8} tombstones, over {MAX_TOMBSTONES}"
        )
    t = np.frombuffer(raw, "<i8").astype(np.int64)
    if t.size == 0:
        return t
    lists, rows = t >> ROW_BITS, t & ((1 << ROW_BITS) - 1)
    if t[0] < 0 or (t.size > 1 and not (np.diff(t) > 0).all()):
        raise CorruptIndexError(
            f"corrupt: {COMMIT_NAME} tombstones are not strictly increasing non-negative values"
        )
    if lists[-1] >= counts.size or (rows >= counts[lists]).any():
        raise CorruptIndexError(f"corrupt: {COMMIT_NAME} has a tombstone past a committed row")
    return t


def encode_commit(rec: CommitRecord) -> bytes:
    """Serialise a commit record into the bytes of ``commit.msgpack``."""
    body: bytes = msgpack.packb(
        {
            "generation": rec.generation,
            "index_uuid": rec.index_uuid,
            "next_id": rec.next_id,
            "list_counts": np.asarray(rec.list_counts, "<i8").tobytes(),
            "list_gens": np.asarray(rec.list_gens, "<u4").tobytes(),
            "vec_crc32": np.asarray(rec.vec_crc32, "<u4").tobytes(),
            "ids_crc32": np.asarray(rec.ids_crc32, "<u4").tobytes(),
            "tombstones": np.asarray(rec.tombstones, "<i8").tobytes(),
        },
        use_bin_type=True,
    )
    return _pack_preamble(COMMIT_MAGIC, body) + body


def _parse_array(h: Mapping[str, Any], key: str, dtype: str, nlist: int) -> NDArray[Any]:
    raw = _get(h, key, COMMIT_NAME)
    itemsize = np.dtype(dtype).itemsize
    if not isinstance(raw, bytes) or len(raw) != nlist * itemsize:
        got = f"{len(raw)} bytes" if isinstance(raw, bytes) else type(raw).__name__
        raise CorruptIndexError(
            f"corrupt: {COMMIT_NAME} key {key!r} must be {nlist} x {dtype} "
            f"({nlist * itemsize} bytes), got {got}"
        )
    return np.frombuffer(raw, dtype=dtype).astype(np.dtype(dtype).newbyteorder("="))


def decode_commit(buf: bytes, nlist: int, index_uuid: str) -> CommitRecord:
    """Parse and validate the bytes of ``commit.msgpack`` for an index of ``nlist`` lists.

    Raises
    ------
    FormatError
        Not a diskivf commit record.
    UnsupportedVersionError
        Another major version.
    CorruptIndexError
        A field fails validation, the checksum does not match, or the record belongs to another
        index (``index_uuid`` differs from the metadata's).
    """
    what = COMMIT_NAME
    (major, minor), body = _read_preamble(buf, COMMIT_MAGIC, what, MAX_COMMIT_BODY)
    if len(buf) != PREAMBLE.size + len(body):
        raise CorruptIndexError(
            f"corrupt: {what} has {len(buf) - PREAMBLE.size - len(body)} trailing bytes"
        )
    h = _unpack(body, what)
    _check_unknown_keys(h, _COMMIT_KEYS, minor, what)
    generation = parse_int(_get(h, "generation", what), "generation", 0, 1 << 62, what)
    uuid = parse_uuid(_get(h, "index_uuid", what), what)
    if uuid != index_uuid:
        raise CorruptIndexError(
            f"corrupt: {what} belongs to index {uuid}, but {META_NAME} is index {index_uuid}"
        )
    next_id = parse_int(_get(h, "next_id", what), "next_id", 0, 1 << 63, what)
    counts = _parse_array(h, "list_counts", "<i8", nlist).astype(np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > _MAX_ROWS):
        raise CorruptIndexError(f"corrupt: {what} list_counts has values outside [0, 2**48]")
    if int(counts.sum()) > _MAX_ROWS:
        raise CorruptIndexError(f"corrupt: {what} ntotal {int(counts.sum())} exceeds 2**48")
    gens = _parse_array(h, "list_gens", "<u4", nlist).astype(np.uint32)
    tombstones = parse_tombstones(_get(h, "tombstones", what), counts)
    return CommitRecord(
        generation=generation,
        index_uuid=uuid,
        next_id=next_id,
        list_counts=counts,
        list_gens=gens,
        vec_crc32=_parse_array(h, "vec_crc32", "<u4", nlist).astype(np.uint32),
        ids_crc32=_parse_array(h, "ids_crc32", "<u4", nlist).astype(np.uint32),
        tombstones=tombstones,
        version=(major, minor),
    )


# --------------------------------------------------------------------------------------------
# bounded file reads and atomic replace
# --------------------------------------------------------------------------------------------


def read_meta(root: Path) -> Metadata:
    """Read and validate ``root/meta.diskivf``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    FormatError
        See :func:`decode_meta`.
    """
    with open(root / META_NAME, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(min(size, PREAMBLE.size + MAX_META_HEADER))

        def read(offset: int, nbytes: int) -> bytes:
            return os.pread(f.fileno(), nbytes, offset)

        return decode_meta(head, size, read)


def read_commit(root: Path, nlist: int, index_uuid: str) -> CommitRecord:
    """Read and validate ``root/commit.msgpack``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    FormatError
        See :func:`decode_commit`.
    """
    # A valid record holds 20 bytes per list, 8 per tombstone and a few small keys; check the
    # size before reading, so that a huge hostile file is rejected without being read.
    limit = PREAMBLE.size + min(MAX_COMMIT_BODY, 20 * nlist + 8 * MAX_TOMBSTONES + MAX_META_HEADER)
    with open(root / COMMIT_NAME, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CorruptIndexError(
                f"corrupt: {COMMIT_NAME} is {size} bytes, over the limit of {limit} for "
                f"{nlist} lists"
            )
        buf = f.read(size)
    return decode_commit(buf, nlist, index_uuid)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and file creations in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never a mix.

    Writes a temporary file in the same directory, fsyncs it, ``os.replace``s it over ``path``
    and fsyncs the directory. The old file is never truncated, so a reader that has it open or
    mapped keeps its bytes.

    Raises
    ------
    OSError
        Any write or fsync failure; the temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------
# trained hash and build shards (diskivf.parallel)
# --------------------------------------------------------------------------------------------
# A shard is a temporary build artefact, not part of an index: a directory holding the rows a
# task assigned, grouped by list, in three files. Only the build that wrote it reads it.

SHARD_MAGIC: Final = b"\x93DIVFSHD"
SHARD_MANIFEST_NAME: Final = "shard.msgpack"
#: Rows grouped by list (raw rows, as in list files), their ``<i8`` ids, and the ``nlist + 1``
#: cumulative ``<i8`` row offsets of the lists: list ``i`` is rows ``offsets[i]:offsets[i+1]``.
SHARD_FILES: Final = ("rows.vec", "rows.ids", "offsets.i8")
_SHARD_KEYS: Final = frozenset(
    {
        "start",
        "stop",
        "nlist",
        "dim",
        "vector_dtype",
        "trained_hash",
        "max_id",
        "source_tag",
        "run",
        "durable",
    }
)
_MAX_RUN_CHARS: Final = 64
_HASH_RE: Final = re.compile(r"[0-9a-f]{64}")


def trained_hash(meta: Metadata) -> str:
    """SHA-256 (hex) of what decides where a vector is stored and how: ``dim``, ``nlist``,
    metric, vector dtype and the centroid bytes.

    Indexes (and build shards) with equal hashes can be merged and searched together.

    Raises
    ------
    ValueError
        ``meta`` has no centroids.
    """
    if meta.centroids is None:
        raise ValueError("an untrained index has no trained hash")
    h = hashlib.sha256(
        f"diskivf-trained/1 {meta.dim} {meta.nlist} {meta.metric} {meta.vector_dtype}\n".encode()
    )
    h.update(np.ascontiguousarray(meta.centroids, dtype=CENTROID_DTYPE).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ShardManifest:
    """Decoded ``shard.msgpack``: input rows ``[start, stop)`` assigned with centroids of
    ``trained_hash``; ``max_id`` is the largest id in the shard (-1 when it is empty);
    ``source_tag`` identifies the input file version (size and modification time); ``run``
    names the build run that wrote the shard, and ``durable`` says whether it fsynced the
    shard before publishing it (False for a manifest written before these keys existed)."""

    start: int
    stop: int
    nlist: int
    dim: int
    vector_dtype: str
    trained_hash: str
    max_id: int
    source_tag: str = ""
    run: str = ""
    durable: bool = False


def encode_shard_manifest(m: ShardManifest) -> bytes:
    """Serialise a shard manifest into the bytes of ``shard.msgpack``."""
    body: bytes = msgpack.packb(
        {
            "start": m.start,
            "stop": m.stop,
            "nlist": m.nlist,
            "dim": m.dim,
            "vector_dtype": m.vector_dtype,
            "trained_hash": m.trained_hash,
            "max_id": m.max_id,
            "source_tag": m.source_tag,
            "run": m.run,
            "durable": m.durable,
        },
        use_bin_type=True,
    )
    return _pack_preamble(SHARD_MAGIC, body) + body


def decode_shard_manifest(buf: bytes) -> ShardManifest:
    """Parse and validate the bytes of ``shard.msgpack``.

    Raises
    ------
    FormatError
        Not a shard manifest.
    UnsupportedVersionError
        Another major version.
    CorruptIndexError
        A field fails validation or the checksum does not match.
    """
    what = SHARD_MANIFEST_NAME
    (_, minor), body = _read_preamble(buf, SHARD_MAGIC, what, MAX_META_HEADER)
    h = _unpack(body, what)
    _check_unknown_keys(h, _SHARD_KEYS, minor, what)
    start = parse_int(_get(h, "start", what), "start", 0, _MAX_ROWS, what)
    stop = parse_int(_get(h, "stop", what), "stop", start, _MAX_ROWS, what)
    digest = _get(h, "trained_hash", what)
    if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
        raise CorruptIndexError(f"corrupt: {what} key 'trained_hash' is not 64 hex digits")
    tag = _get(h, "source_tag", what)
    if not isinstance(tag, str):
        raise CorruptIndexError(f"corrupt: {what} key 'source_tag' is not a string")
    run = h.get("run", "")
    if not isinstance(run, str) or len(run) > _MAX_RUN_CHARS:
        raise CorruptIndexError(
            f"corrupt: {what} key 'run' is not a string of at most {_MAX_RUN_CHARS} characters"
        )
    durable = h.get("durable", False)
    if not isinstance(durable, bool):
        raise CorruptIndexError(f"corrupt: {what} key 'durable' is not a boolean")
    return ShardManifest(
        start=start,
        stop=stop,
        nlist=parse_int(_get(h, "nlist", what), "nlist", 1, MAX_NLIST, what),
        dim=parse_int(_get(h, "dim", what), "dim", 1, MAX_DIM, what),
        vector_dtype=parse_str(_get(h, "vector_dtype", what), "vector_dtype", VECTOR_DTYPES, what),
        trained_hash=digest,
        max_id=parse_int(_get(h, "max_id", what), "max_id", -1, (1 << 63) - 1, what),
        source_tag=tag,
        run=run,
        durable=durable,
    )


def encode_shard_offsets(counts: NDArray[np.int64]) -> bytes:
    """The bytes of ``offsets.i8`` for per-list row ``counts``."""
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype("<i8").tobytes()


def read_shard_offsets(path: Path, nlist: int, rows: int, lo: int, hi: int) -> NDArray[np.int64]:
    """Read offsets ``lo..hi`` (inclusive) of the ``offsets.i8`` file of a shard.

    Raises
    ------
    ValueError
        ``lo`` and ``hi`` are not ``0 <= lo <= hi <= nlist``.
    OSError
        The file cannot be read (``FileNotFoundError`` when it is missing).
    CorruptIndexError
        The file has the wrong size, or the offsets are not non-decreasing within
        ``[0, rows]`` (with ``offsets[0] == 0`` and ``offsets[nlist] == rows``).
    """
    if not 0 <= lo <= hi <= nlist:
        raise ValueError(f"expected 0 <= lo <= hi <= {nlist} but got lo={lo}, hi={hi}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != (nlist + 1) * 8:
            raise CorruptIndexError(
                f"corrupt: {path} has {size} bytes, not the {(nlist + 1) * 8} of {nlist + 1} "
                "offsets"
            )
        raw = os.pread(f.fileno(), (hi - lo + 1) * 8, lo * 8)
    off = np.frombuffer(raw, "<i8").astype(np.int64)
    bad = (
        len(off) != hi - lo + 1
        or bool((np.diff(off) < 0).any())
        or int(off[0]) < 0
        or int(off[-1]) > rows
        or (lo == 0 and int(off[0]) != 0)
        or (hi == nlist and int(off[-1]) != rows)
    )
    if bad:
        raise CorruptIndexError(f"corrupt: {path} does not hold increasing offsets of {rows} rows")
    return off
