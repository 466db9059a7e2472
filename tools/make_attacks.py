"""Generate ``tests/attacks/``: a tiny valid index and small hostile files diskivf must reject.

Like safetensors' ``attacks/`` folder, every file here is a concrete input that once could (or
plausibly might) have fooled a reader: lying lengths, huge claimed sizes, wrong types, unknown
versions, deep msgpack. They are committed so that they keep being rejected forever, and this
script refuses to overwrite them unless given ``--force``.

Layout of the output directory::

    base/                     a valid deterministic index: dim 4, nlist 2, 3 rows per list
    meta_<name>.diskivf       replaces base/meta.diskivf
    commit_<name>.msgpack     replaces base/commit.msgpack
    README.md                 one line per file: the expected error and why

``tests/test_corruption.py`` copies ``base/``, swaps in each hostile file, opens the index and
checks the error class and message. The builders below (:func:`meta_bytes`,
:func:`commit_bytes`...) are also used by that test to generate many more variants in memory.

Usage::

    python tools/make_attacks.py [--out tests/attacks] [--force]
"""

from __future__ import annotations

import argparse
import io
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

REPO = Path(__file__).resolve().parents[1]
try:
    import diskivf
except ModuleNotFoundError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))
    import diskivf  # noqa: F401  (makes a source checkout importable)
from diskivf import format as fmt
from diskivf.errors import CorruptIndexError, FormatError, UnsupportedVersionError

DEFAULT_OUT = REPO / "tests" / "attacks"

BASE_UUID = "0123456789abcdef0123456789abcdef"
BASE_DIM = 4
BASE_NLIST = 2
BASE_ROWS = 3  # per list


# --------------------------------------------------------------------------------------------
# the base index
# --------------------------------------------------------------------------------------------


def base_centroids() -> NDArray[np.float32]:
    """The base index's centroids: list 0 near the origin, list 1 near (10, 10, 10, 10)."""
    return np.array([[0.0] * BASE_DIM, [10.0] * BASE_DIM], np.float32)


def base_rows(list_id: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The committed rows of one base list: ``(vectors, ids)``."""
    ids = np.arange(BASE_ROWS, dtype=np.int64) + list_id * BASE_ROWS
    vecs = base_centroids()[list_id] + np.arange(BASE_ROWS * BASE_DIM, dtype=np.float32).reshape(
        BASE_ROWS, BASE_DIM
    ) / np.float32(8)
    return vecs.astype(np.float32), ids


def base_meta() -> fmt.Metadata:
    """The base index's metadata (trained, fixed uuid, no training info)."""
    return fmt.Metadata(
        dim=BASE_DIM,
        nlist=BASE_NLIST,
        metric="l2",
        vector_dtype="<f4",
        nprobe=1,
        index_uuid=BASE_UUID,
        centroids=base_centroids(),
        created_by="tools/make_attacks.py",
    )


def base_commit() -> fmt.CommitRecord:
    """The base index's commit record: generation 1, three rows in each list."""
    counts = np.full(BASE_NLIST, BASE_ROWS, np.int64)
    vcrc = np.zeros(BASE_NLIST, np.uint32)
    icrc = np.zeros(BASE_NLIST, np.uint32)
    for lid in range(BASE_NLIST):
        v, i = base_rows(lid)
        vcrc[lid] = zlib.crc32(v.astype("<f4").tobytes())
        icrc[lid] = zlib.crc32(i.astype("<i8").tobytes())
    return fmt.CommitRecord(
        generation=1,
        index_uuid=BASE_UUID,
        next_id=BASE_NLIST * BASE_ROWS,
        list_counts=counts,
        list_gens=np.zeros(BASE_NLIST, np.uint32),
        vec_crc32=vcrc,
        ids_crc32=icrc,
    )


def write_base(root: Path) -> None:
    """Write the valid base index into the (new or empty) directory ``root``."""
    (root / fmt.LISTS_DIR).mkdir(parents=True, exist_ok=True)
    (root / fmt.META_NAME).write_bytes(fmt.encode_meta(base_meta()))
    (root / fmt.COMMIT_NAME).write_bytes(fmt.encode_commit(base_commit()))
    for lid in range(BASE_NLIST):
        v, i = base_rows(lid)
        vname, iname = fmt.list_file_names(lid, 0)
        (root / vname).write_bytes(v.astype("<f4").tobytes())
        (root / iname).write_bytes(i.astype("<i8").tobytes())


# --------------------------------------------------------------------------------------------
# builders: any header, any preamble, correct checksums unless told otherwise
# --------------------------------------------------------------------------------------------


def _body(header: Any) -> bytes:
    return bytes(msgpack.packb(header, use_bin_type=True))


def preamble(
    magic: bytes,
    body: bytes,
    *,
    major: int = fmt.FORMAT_MAJOR,
    minor: int = fmt.FORMAT_MINOR,
    reserved: int = 0,
    header_len: int | None = None,
    crc: int | None = None,
) -> bytes:
    """A preamble for ``body``; the checksum is the correct one for the fields given."""
    hlen = len(body) if header_len is None else header_len
    head = fmt.PREAMBLE.pack(magic, major, minor, reserved, hlen, 0)
    if crc is None:
        # the format's rule, reused rather than restated: hostile files carry valid checksums
        crc = fmt._header_crc(head, body[:hlen])
    return fmt.PREAMBLE.pack(magic, major, minor, reserved, hlen, crc)


def meta_header(*, trained: bool = True) -> dict[str, Any]:
    """The base metadata header as a mutable dict (without ``centroids_offset``)."""
    body = fmt.encode_meta(base_meta())
    hlen = struct.unpack_from("<I", body, 12)[0]
    header: dict[str, Any] = msgpack.unpackb(body[fmt.PREAMBLE.size : fmt.PREAMBLE.size + hlen])
    header.pop("centroids_offset", None)
    if not trained:
        header["trained"] = False
        header.pop("centroids_crc32", None)
    return header


def meta_bytes(
    header: dict[str, Any],
    *,
    centroids: bytes | None = None,
    body: bytes | None = None,
    pad: bytes | None = None,
    **preamble_fields: Any,
) -> bytes:
    """``meta.diskivf`` bytes for ``header`` (or a raw msgpack ``body``).

    When ``centroids`` is given and ``header`` has no ``centroids_offset``, the offset is set to
    the aligned end of the header exactly as the writer does it, so that the file is rejected
    for the attack's own reason and not for a misplaced offset. ``pad`` replaces the zero
    padding between header and centroids.
    """
    if body is None:
        header = dict(header)
        if centroids is not None and "centroids_offset" not in header:
            header["centroids_offset"] = 0
            while True:
                body = _body(header)
                offset = -(-(fmt.PREAMBLE.size + len(body)) // fmt.ARRAY_ALIGN) * fmt.ARRAY_ALIGN
                if header["centroids_offset"] == offset:
                    break
                header["centroids_offset"] = offset
        body = _body(header)
    out = preamble(fmt.META_MAGIC, body, **preamble_fields) + body
    if centroids is not None:
        gap = -len(out) % fmt.ARRAY_ALIGN
        out += (b"\0" * gap if pad is None else pad[:gap].ljust(gap, b"\0")) + centroids
    return out


def base_centroid_bytes() -> bytes:
    """The base centroids as stored."""
    return base_centroids().astype("<f4").tobytes()


def commit_header() -> dict[str, Any]:
    """The base commit record as a mutable dict (arrays as raw little-endian bytes)."""
    buf = fmt.encode_commit(base_commit())
    return dict(msgpack.unpackb(buf[fmt.PREAMBLE.size :]))


def commit_bytes(
    header: dict[str, Any], *, body: bytes | None = None, **preamble_fields: Any
) -> bytes:
    """``commit.msgpack`` bytes for ``header`` (or a raw msgpack ``body``)."""
    body = _body(header) if body is None else body
    return preamble(fmt.COMMIT_MAGIC, body, **preamble_fields) + body


def _with(h: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(h)
    out.update(changes)
    return out


def _without(h: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in h.items() if k != key}


def _tombstones(*rows: tuple[int, int]) -> bytes:
    """The ``tombstones`` bin for (list_id, row) pairs, in the order given."""
    return np.array([lid << fmt.ROW_BITS | row for lid, row in rows], "<i8").tobytes()


def _npy_bytes() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2), np.float32))
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the catalogue
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One hostile file: where it goes, what open() must raise, and why."""

    name: str  # file name in the attacks directory
    build: Callable[[], bytes]
    error: type[FormatError]
    match: str  # regex the error message must contain
    reason: str

    @property
    def target(self) -> str:
        """The base file this one replaces."""
        return fmt.META_NAME if self.name.startswith("meta_") else fmt.COMMIT_NAME


C = base_centroid_bytes
H = meta_header
CH = commit_header
Corrupt, Unsupported = CorruptIndexError, UnsupportedVersionError


def _build_meta_header_len_long() -> bytes:
    body = _body(H(trained=False))
    return meta_bytes({}, body=body + b"\0" * 8, header_len=len(body) + 8)


def _build_meta_minor_flipped() -> bytes:
    good = bytearray(meta_bytes(H(), centroids=C()))
    good[9] ^= 1
    return bytes(good)


def _build_meta_centroids_nan() -> bytes:
    c = base_centroids()
    c[1, 2] = np.nan
    raw = c.astype("<f4").tobytes()
    return meta_bytes(_with(H(), centroids_crc32=zlib.crc32(raw)), centroids=raw)


ATTACKS: tuple[Attack, ...] = (
    Attack(
        "meta_empty.diskivf",
        lambda: b"",
        FormatError,
        "not a diskivf index",
        "an empty file",
    ),
    Attack(
        "meta_npy.diskivf",
        lambda: _npy_bytes(),
        FormatError,
        "not a diskivf index",
        "a .npy file: another format's magic",
    ),
    Attack(
        "meta_preamble_cut.diskivf",
        lambda: meta_bytes(H(), centroids=C())[:10],
        FormatError,
        "not a diskivf index",
        "10 bytes: magic, then EOF",
    ),
    Attack(
        "meta_major_2.diskivf",
        lambda: meta_bytes(H(), centroids=C(), major=2),
        Unsupported,
        r"version 2\.0.*newer diskivf",
        "a future major version",
    ),
    Attack(
        "meta_major_0.diskivf",
        lambda: meta_bytes(H(), centroids=C(), major=0),
        Unsupported,
        r"version 0\.0",
        "major version 0 never existed",
    ),
    Attack(
        "meta_reserved_set.diskivf",
        lambda: meta_bytes(H(), centroids=C(), reserved=0xBEEF),
        Corrupt,
        "reserved",
        "the reserved u16 is not zero",
    ),
    Attack(
        "meta_header_len_4g.diskivf",
        lambda: meta_bytes(H(), centroids=C(), header_len=0xFFFFFFFF),
        Corrupt,
        "exceeds the limit",
        "header_len = 2**32-1, a 4 GiB claim",
    ),
    Attack(
        "meta_header_len_past_eof.diskivf",
        lambda: meta_bytes(H(), centroids=C(), header_len=100_000),
        Corrupt,
        "runs past the end",
        "header_len under the cap but past EOF",
    ),
    Attack(
        "meta_header_len_short.diskivf",
        lambda: meta_bytes(H(), centroids=C(), header_len=40),
        Corrupt,
        "not valid msgpack",
        "header_len cuts the map short (CRC ok)",
    ),
    Attack(
        "meta_header_len_long.diskivf",
        _build_meta_header_len_long,
        Corrupt,
        "not valid msgpack",
        "header_len swallows padding (CRC ok)",
    ),
    Attack(
        "meta_crc_wrong.diskivf",
        lambda: meta_bytes(H(), centroids=C(), crc=0x12345678),
        Corrupt,
        "checksum",
        "header checksum does not match",
    ),
    Attack(
        "meta_minor_flipped.diskivf",
        _build_meta_minor_flipped,
        Corrupt,
        "checksum",
        "minor version 1 with the checksum of 0",
    ),
    Attack(
        "meta_not_a_map.diskivf",
        lambda: meta_bytes({}, body=_body([1, 2, 3])),
        Corrupt,
        "not a map",
        "the header is a msgpack array",
    ),
    Attack(
        "meta_int_keys.diskivf",
        lambda: meta_bytes({}, body=_body({1: 2})),
        Corrupt,
        "not valid msgpack",
        "map keys are integers (strict_map_key)",
    ),
    Attack(
        "meta_deep_nesting.diskivf",
        lambda: meta_bytes({}, body=b"\x81\xa4x_nn" + b"\x91" * 10_000 + b"\xc0"),
        Corrupt,
        "not valid msgpack",
        "10000 nested one-element arrays",
    ),
    Attack(
        "meta_array_4g_claim.diskivf",
        lambda: meta_bytes({}, body=b"\x81\xa3dim\xdd\xff\xff\xff\xff"),
        Corrupt,
        "not valid msgpack",
        "array32 header claiming 2**32-1 items",
    ),
    Attack(
        "meta_map_4g_claim.diskivf",
        lambda: meta_bytes({}, body=b"\xdf\xff\xff\xff\xff"),
        Corrupt,
        "not valid msgpack",
        "map32 header claiming 2**32-1 pairs",
    ),
    Attack(
        "meta_str_4g_claim.diskivf",
        lambda: meta_bytes({}, body=b"\x81\xa3dim\xdb\xff\xff\xff\xff"),
        Corrupt,
        "not valid msgpack",
        "str32 header claiming 4 GiB",
    ),
    Attack(
        "meta_bin_4g_claim.diskivf",
        lambda: meta_bytes({}, body=b"\x81\xa3dim\xc6\xff\xff\xff\xff"),
        Corrupt,
        "not valid msgpack",
        "bin32 header claiming 4 GiB",
    ),
    Attack(
        "meta_ext_type.diskivf",
        lambda: meta_bytes({}, body=b"\x81\xa3dim\xd4\x05\x00"),
        Corrupt,
        "not valid msgpack",
        "a msgpack ext value (never used by diskivf)",
    ),
    Attack(
        "meta_bad_utf8.diskivf",
        lambda: meta_bytes({}, body=b"\x81\xa3dim\xa2\xff\xfe"),
        Corrupt,
        "not valid msgpack",
        "a str that is not UTF-8",
    ),
    Attack(
        "meta_two_objects.diskivf",
        lambda: meta_bytes({}, body=_body(H(trained=False)) + b"\xc0"),
        Corrupt,
        "not valid msgpack",
        "a valid map followed by a second object",
    ),
    Attack(
        "meta_dim_zero.diskivf",
        lambda: meta_bytes(_with(H(trained=False), dim=0)),
        Corrupt,
        "'dim'",
        "dim = 0",
    ),
    Attack(
        "meta_dim_negative.diskivf",
        lambda: meta_bytes(_with(H(trained=False), dim=-4)),
        Corrupt,
        "'dim'",
        "dim = -4",
    ),
    Attack(
        "meta_dim_2e40.diskivf",
        lambda: meta_bytes(_with(H(trained=False), dim=1 << 40)),
        Corrupt,
        "'dim'",
        "dim = 2**40, over MAX_DIM",
    ),
    Attack(
        "meta_dim_string.diskivf",
        lambda: meta_bytes(_with(H(trained=False), dim="4")),
        Corrupt,
        "'dim'",
        'dim = "4": wrong type',
    ),
    Attack(
        "meta_nlist_2e63.diskivf",
        lambda: meta_bytes(_with(H(trained=False), nlist=(1 << 64) - 1)),
        Corrupt,
        "'nlist'",
        "nlist = 2**64-1",
    ),
    Attack(
        "meta_centroids_256g_claim.diskivf",
        lambda: meta_bytes(_with(H(), dim=65536, nlist=1 << 20), centroids=C()),
        Corrupt,
        "truncated",
        "dim 65536 x nlist 2**20 in a 400-byte file",
    ),
    Attack(
        "meta_centroids_offset_negative.diskivf",
        lambda: meta_bytes(_with(H(), centroids_offset=-64), centroids=C()),
        Corrupt,
        "centroids_offset",
        "centroids_offset = -64",
    ),
    Attack(
        "meta_centroids_offset_misaligned.diskivf",
        lambda: meta_bytes(_with(H(), centroids_offset=100), centroids=C()),
        Corrupt,
        "centroids_offset",
        "offset not the aligned end",
    ),
    Attack(
        "meta_centroids_cut.diskivf",
        lambda: meta_bytes(H(), centroids=C())[:-5],
        Corrupt,
        "truncated",
        "the file ends inside the centroids",
    ),
    Attack(
        "meta_centroids_crc_wrong.diskivf",
        lambda: meta_bytes(_with(H(), centroids_crc32=0), centroids=C()),
        Corrupt,
        "centroids checksum",
        "centroids_crc32 does not match",
    ),
    Attack(
        "meta_centroids_nan.diskivf",
        _build_meta_centroids_nan,
        Corrupt,
        "NaN",
        "a NaN centroid with a correct checksum",
    ),
    Attack(
        "meta_padding_nonzero.diskivf",
        lambda: meta_bytes(H(), centroids=C(), pad=b"\x01" * 64),
        Corrupt,
        "padding",
        "garbage in the padding before the centroids",
    ),
    Attack(
        "meta_required_feature.diskivf",
        lambda: meta_bytes(_with(H(), required_features=["zstd-lists"]), centroids=C()),
        Unsupported,
        "newer diskivf",
        'required_features = ["zstd-lists"]',
    ),
    Attack(
        "meta_unknown_key.diskivf",
        lambda: meta_bytes(_with(H(), evil=1), centroids=C()),
        Corrupt,
        "unknown keys",
        "an unknown key in a 1.0 file (no x_ prefix)",
    ),
    Attack(
        "meta_missing_key.diskivf",
        lambda: meta_bytes(_without(H(), "metric"), centroids=C()),
        Corrupt,
        "'metric'",
        "the required key metric is absent",
    ),
    Attack(
        "meta_metric_unknown.diskivf",
        lambda: meta_bytes(_with(H(), metric="hamming"), centroids=C()),
        Corrupt,
        "'metric'",
        'metric = "hamming"',
    ),
    Attack(
        "meta_dtype_object.diskivf",
        lambda: meta_bytes(_with(H(), vector_dtype="|O"), centroids=C()),
        Corrupt,
        "'vector_dtype'",
        'vector_dtype = "|O": numpy object arrays',
    ),
    Attack(
        "meta_dtype_big_endian.diskivf",
        lambda: meta_bytes(_with(H(), vector_dtype=">f4"), centroids=C()),
        Corrupt,
        "'vector_dtype'",
        'vector_dtype = ">f4"',
    ),
    Attack(
        "meta_uuid_path.diskivf",
        lambda: meta_bytes(_with(H(), index_uuid="../../../../etc/passwd"), centroids=C()),
        Corrupt,
        "index_uuid",
        'index_uuid = "../../../../etc/passwd"',
    ),
    Attack(
        "meta_trained_int.diskivf",
        lambda: meta_bytes(_with(H(), trained=1), centroids=C()),
        Corrupt,
        "'trained'",
        "trained = 1, not a boolean",
    ),
    Attack(
        "meta_nprobe_over_nlist.diskivf",
        lambda: meta_bytes(_with(H(), nprobe=BASE_NLIST + 1), centroids=C()),
        Corrupt,
        "'nprobe'",
        "nprobe = nlist + 1",
    ),
    Attack(
        "commit_empty.msgpack",
        lambda: b"",
        FormatError,
        "not a diskivf index",
        "an empty commit record",
    ),
    Attack(
        "commit_meta_magic.msgpack",
        lambda: fmt.encode_meta(base_meta()),
        FormatError,
        "not a diskivf index",
        "a metadata file in the commit's place",
    ),
    Attack(
        "commit_major_2.msgpack",
        lambda: commit_bytes(CH(), major=2),
        Unsupported,
        "newer diskivf",
        "a future major version",
    ),
    Attack(
        "commit_trailing_bytes.msgpack",
        lambda: commit_bytes(CH()) + b"abc",
        Corrupt,
        "trailing bytes",
        "valid record plus 3 bytes",
    ),
    Attack(
        "commit_header_len_4g.msgpack",
        lambda: commit_bytes(CH(), header_len=0xFFFFFFFF),
        Corrupt,
        "exceeds the limit",
        "header_len = 2**32-1",
    ),
    Attack(
        "commit_other_index.msgpack",
        lambda: commit_bytes(_with(CH(), index_uuid="f" * 32)),
        Corrupt,
        "belongs to index",
        "index_uuid of another index",
    ),
    Attack(
        "commit_counts_negative.msgpack",
        lambda: commit_bytes(_with(CH(), list_counts=np.array([-1, 3], "<i8").tobytes())),
        Corrupt,
        "list_counts",
        "list_counts = [-1, 3]",
    ),
    Attack(
        "commit_counts_2e48.msgpack",
        lambda: commit_bytes(
            _with(CH(), list_counts=np.array([(1 << 48) + 1, 3], "<i8").tobytes())
        ),
        Corrupt,
        "list_counts",
        "a count over 2**48 rows",
    ),
    Attack(
        "commit_counts_sum_2e49.msgpack",
        lambda: commit_bytes(
            _with(CH(), list_counts=np.array([1 << 48, 1 << 48], "<i8").tobytes())
        ),
        Corrupt,
        "ntotal",
        "each count legal, their sum over 2**48",
    ),
    Attack(
        "commit_counts_wrong_length.msgpack",
        lambda: commit_bytes(_with(CH(), list_counts=np.array([3, 3, 3], "<i8").tobytes())),
        Corrupt,
        "list_counts",
        "three counts for two lists",
    ),
    Attack(
        "commit_counts_as_list.msgpack",
        lambda: commit_bytes(_with(CH(), list_counts=[3, 3])),
        Corrupt,
        "list_counts",
        "counts as a msgpack array, not bin",
    ),
    Attack(
        "commit_count_past_eof.msgpack",
        lambda: commit_bytes(_with(CH(), list_counts=np.array([4, 3], "<i8").tobytes())),
        Corrupt,
        "fewer than",
        "list 0 claims 4 rows, its files hold 3",
    ),
    Attack(
        "commit_gen_4g.msgpack",
        lambda: commit_bytes(_with(CH(), list_gens=np.array([0xFFFFFFFF, 0], "<u4").tobytes())),
        Corrupt,
        r"lists/0000000\.4294967295\.vec is missing",
        "list_gens = 2**32-1",
    ),
    Attack(
        "commit_generation_negative.msgpack",
        lambda: commit_bytes(_with(CH(), generation=-1)),
        Corrupt,
        "'generation'",
        "generation = -1",
    ),
    Attack(
        "commit_next_id_2e64.msgpack",
        lambda: commit_bytes(_with(CH(), next_id=(1 << 64) - 1)),
        Corrupt,
        "'next_id'",
        "next_id = 2**64-1, past int64",
    ),
    Attack(
        "commit_bin_4g_claim.msgpack",
        lambda: commit_bytes({}, body=b"\x81\xablist_counts\xc6\xff\xff\xff\xff"),
        Corrupt,
        "not valid msgpack",
        "list_counts as bin32 claiming 4 GiB",
    ),
    Attack(
        "commit_unknown_key.msgpack",
        lambda: commit_bytes(_with(CH(), path="/etc/passwd")),
        Corrupt,
        "unknown keys",
        "an unknown key in a 1.0 record",
    ),
    Attack(
        "commit_tombstone_past_row.msgpack",
        lambda: commit_bytes(_with(CH(), tombstones=_tombstones((0, BASE_ROWS)))),
        Corrupt,
        "tombstone past a committed row",
        "removes row 3 of list 0, which holds rows 0..2",
    ),
    Attack(
        "commit_tombstone_bad_list.msgpack",
        lambda: commit_bytes(_with(CH(), tombstones=_tombstones((BASE_NLIST, 0)))),
        Corrupt,
        "tombstone past a committed row",
        "removes a row of list 2 in a 2-list index",
    ),
    Attack(
        "commit_tombstones_unsorted.msgpack",
        lambda: commit_bytes(_with(CH(), tombstones=_tombstones((1, 0), (0, 1)))),
        Corrupt,
        "not strictly increasing",
        "tombstones out of order",
    ),
    Attack(
        "commit_tombstones_duplicate.msgpack",
        lambda: commit_bytes(_with(CH(), tombstones=_tombstones((0, 1), (0, 1)))),
        Corrupt,
        "not strictly increasing",
        "the same row removed twice (ntotal would go wrong)",
    ),
    Attack(
        "commit_tombstone_negative.msgpack",
        lambda: commit_bytes(_with(CH(), tombstones=np.array([-1], "<i8").tobytes())),
        Corrupt,
        "not strictly increasing|past a committed row",
        "a negative tombstone",
    ),
    Attack(
        "commit_tombstones_ragged.msgpack",
        lambda: commit_bytes(_with(CH(), tombstones=b"\0" * 12)),
        Corrupt,
        "tombstones",
        "12 bytes: not a whole number of <i8",
    ),
)


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def readme() -> str:
    """README.md of the attacks directory: one line per file."""
    lines = [
        "# Hostile files",
        "",
        "Generated by `tools/make_attacks.py` (never edit by hand; regenerate with `--force`).",
        "`base/` is a valid index (dim 4, nlist 2, 3 rows per list); each file below replaces",
        "`base/meta.diskivf` or `base/commit.msgpack`, and opening the result must raise the",
        "named error. `tests/test_corruption.py` checks every one.",
        "",
    ]
    for a in ATTACKS:
        lines.append(f"- `{a.name}`: {a.error.__name__} - {a.reason}")
    return "\n".join(lines) + "\n"


def write_all(out: Path) -> None:
    """Write ``base/``, every attack file and the README into the new directory ``out``."""
    out.mkdir(parents=True)
    write_base(out / "base")
    for a in ATTACKS:
        (out / a.name).write_bytes(a.build())
    (out / "README.md").write_text(readme())


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an existing directory")
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists():
        if not args.force:
            print(f"{out} exists; refusing to overwrite it without --force", file=sys.stderr)
            return 1
        shutil.rmtree(out)
    write_all(out)
    print(f"wrote base/ and {len(ATTACKS)} hostile files to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
