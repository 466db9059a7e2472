"""Tests for diskivf.format: golden bytes, round trips and every rejection of a hostile file.

Files are built here from the specification (``format_spec.md``), not from the encoder, where
that matters: the preamble and its CRC are packed with :mod:`struct` and :mod:`zlib` directly,
so a change to the encoder that disagrees with the specification fails these tests.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diskivf import format as fmt
from diskivf.errors import CorruptIndexError, FormatError, UnsupportedVersionError

UUID = "0123456789abcdef0123456789abcdef"
OTHER_UUID = "fedcba9876543210fedcba9876543210"
CENTROIDS = np.array([[0.25, 0.25, 0.25, 0.25], [4, 4, 4, 4]], np.float32)
TRAINING = fmt.TrainingInfo(npoints=6, niter=1, nsplit=0, seed=0, objective=(5.0,))

# The metadata file of Appendix A of format_spec.md: dim 4, nlist 2, l2, two centroids.
GOLDEN_META = bytes.fromhex(
    # preamble: magic, major 1, minor 0, reserved 0, header_len 279, header_crc32
    "934449534b495646" + "01" + "00" + "0000" + "17010000" + "71f57748"
    # msgpack map with 14 keys, key by key
    "8e"
    "a364696d04"  # dim: 4
    "a56e6c69737402"  # nlist: 2
    "a66d6574726963a26c32"  # metric: "l2"
    "ac766563746f725f6474797065a33c6634"  # vector_dtype: "<f4"
    "a869645f6474797065a33c6938"  # id_dtype: "<i8"
    "ae63656e74726f69645f6474797065a33c6634"  # centroid_dtype: "<f4"
    "a66e70726f626501"  # nprobe: 1
    "aa696e6465785f75756964d920"  # index_uuid: str 8 of 32 bytes
    "3031323334353637383961626364656630313233343536373839616263646566"
    "a7747261696e6564c3"  # trained: true
    "b172657175697265645f666561747572657390"  # required_features: []
    "aa637265617465645f6279ad6469736b69766620302e312e30"  # created_by: "diskivf 0.1.0"
    "a8747261696e696e6785"  # training: map of 5
    "a76e706f696e747306a56e6974657201a66e73706c697400a47365656400"  # npoints niter nsplit seed
    "a96f626a65637469766591cb4014000000000000"  # objective: [5.0] as float 64
    "af63656e74726f6964735f6372633332ce21f64d30"  # centroids_crc32: uint 32
    "b063656e74726f6964735f6f6666736574cd0140"  # centroids_offset: uint 16 = 320
    # zero padding from 299 to 320, then centroids <f4 (2, 4) C order
     + "00" * 21 + "0000803e" * 4 + "00008040" * 4
)

# The commit record of Appendix A: generation 1, next_id 6, lists of 4 and 2 rows.
GOLDEN_COMMIT = bytes.fromhex(
    "9344495646434d54" + "01" + "00" + "0000" + "aa000000" + "1c63892c"
    "88"
    "aa67656e65726174696f6e01"  # generation: 1
    "aa696e6465785f75756964d920"  # index_uuid
    "3031323334353637383961626364656630313233343536373839616263646566"
    "a76e6578745f696406"  # next_id: 6
    "ab6c6973745f636f756e7473c410"
    "04000000000000000200000000000000"  # list_counts <i8
    "a96c6973745f67656e73c408"
    "0000000000000000"  # list_gens <u4
    "a97665635f6372633332c408"
    "01b514a01b08e673"  # vec_crc32 <u4
    "a96964735f6372633332c408"
    "342319a13ed499c6"  # ids_crc32 <u4
    "aa746f6d6273746f6e6573c400"  # tombstones: empty bin 8
)

# The same index after remove([3, 4]) (Appendix A): generation 2, id 3 is list 0 row 2 and
# id 4 is list 1 row 1; nothing but the generation and the tombstones changes.
GOLDEN_COMMIT_REMOVED = bytes.fromhex(
    "9344495646434d54" + "01" + "00" + "0000" + "ba000000" + "7ec2a97e"
    "88"
    "aa67656e65726174696f6e02"  # generation: 2
    "aa696e6465785f75756964d920"  # index_uuid
    "3031323334353637383961626364656630313233343536373839616263646566"
    "a76e6578745f696406"  # next_id: 6
    "ab6c6973745f636f756e7473c410"
    "04000000000000000200000000000000"  # list_counts <i8
    "a96c6973745f67656e73c408"
    "0000000000000000"  # list_gens <u4
    "a97665635f6372633332c408"
    "01b514a01b08e673"  # vec_crc32 <u4
    "a96964735f6372633332c408"
    "342319a13ed499c6"  # ids_crc32 <u4
    "aa746f6d6273746f6e6573c410"  # tombstones: bin 8 of 16 bytes, <i8 little-endian
    "0200000000000000"  # 0 << 40 | 2
    "0100000000010000"  # 1 << 40 | 1
)


DELETE: Any = object()  # a header value that removes the key


def golden_meta() -> fmt.Metadata:
    return fmt.Metadata(
        dim=4,
        nlist=2,
        metric="l2",
        vector_dtype="<f4",
        nprobe=1,
        index_uuid=UUID,
        centroids=CENTROIDS,
        training=TRAINING,
        created_by="diskivf 0.1.0",
    )


def golden_commit() -> fmt.CommitRecord:
    return fmt.CommitRecord(
        generation=1,
        index_uuid=UUID,
        next_id=6,
        list_counts=np.array([4, 2], np.int64),
        list_gens=np.zeros(2, np.uint32),
        vec_crc32=np.array([0xA014B501, 0x73E6081B], np.uint32),
        ids_crc32=np.array([0xA1192334, 0xC699D43E], np.uint32),
        tombstones=np.zeros(0, np.int64),
    )


def golden_commit_removed() -> fmt.CommitRecord:
    return dataclasses.replace(
        golden_commit(), generation=2, tombstones=np.array([2, 1 << 40 | 1], np.int64)
    )


# --------------------------------------------------------------------------------------------
# building files from the specification
# --------------------------------------------------------------------------------------------


def preamble(
    magic: bytes, body: bytes, *, major: int = 1, minor: int = 0, reserved: int = 0
) -> bytes:
    """The 20-byte preamble; the CRC covers bytes 0..15 and then the msgpack bytes."""
    head = struct.pack("<8sBBHI", magic, major, minor, reserved, len(body))
    return head + struct.pack("<I", zlib.crc32(head + body))


def header_of(buf: bytes) -> dict[str, Any]:
    hlen = struct.unpack_from("<I", buf, 12)[0]
    h: dict[str, Any] = msgpack.unpackb(buf[20 : 20 + hlen], raw=False)
    return h


def align64(n: int) -> int:
    return -(-n // 64) * 64


def meta_file(
    h: dict[str, Any],
    centroids: bytes | None = None,
    *,
    fix_offset: bool = True,
    major: int = 1,
    minor: int = 0,
) -> bytes:
    """A metadata file with header ``h``; with ``centroids``, padded and appended after it.

    With ``fix_offset``, an integer ``centroids_offset`` is set to the aligned header end.
    """
    h = dict(h)
    if fix_offset and type(h.get("centroids_offset")) is int:
        while True:
            offset = align64(20 + len(msgpack.packb(h, use_bin_type=True)))
            if h["centroids_offset"] == offset:
                break
            h["centroids_offset"] = offset
    body = bytes(msgpack.packb(h, use_bin_type=True))
    out = preamble(fmt.META_MAGIC, body, major=major, minor=minor) + body
    if centroids is not None:
        out += b"\0" * (align64(len(out)) - len(out)) + centroids
    return out


def golden_header() -> dict[str, Any]:
    return header_of(GOLDEN_META)


def meta_with(**changes: Any) -> bytes:
    """The golden metadata file with header keys changed (``DELETE`` removes a key)."""
    h = golden_header()
    for key, value in changes.items():
        if value is DELETE:
            h.pop(key, None)
        else:
            h[key] = value
    return meta_file(h, CENTROIDS.tobytes())


def commit_with(minor: int = 0, /, **changes: Any) -> bytes:
    """The golden commit record with keys changed (``DELETE`` removes a key)."""
    h = header_of(GOLDEN_COMMIT)
    for key, value in changes.items():
        if value is DELETE:
            h.pop(key, None)
        else:
            h[key] = value
    body = bytes(msgpack.packb(h, use_bin_type=True))
    return preamble(fmt.COMMIT_MAGIC, body, minor=minor) + body


def assert_meta_equal(a: fmt.Metadata, b: fmt.Metadata) -> None:
    assert dataclasses.replace(a, centroids=None) == dataclasses.replace(b, centroids=None)
    if a.centroids is None or b.centroids is None:
        assert a.centroids is None
        assert b.centroids is None
    else:
        assert a.centroids.dtype == b.centroids.dtype == np.float32
        assert a.centroids.tobytes() == b.centroids.tobytes()


def assert_commit_equal(a: fmt.CommitRecord, b: fmt.CommitRecord) -> None:
    assert (a.generation, a.index_uuid, a.next_id, a.version) == (
        b.generation,
        b.index_uuid,
        b.next_id,
        b.version,
    )
    for name in ("list_counts", "list_gens", "vec_crc32", "ids_crc32", "tombstones"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        assert x.dtype.isnative
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# golden bytes
# --------------------------------------------------------------------------------------------


def test_preamble_layout() -> None:
    assert fmt.PREAMBLE.format == "<8sBBHII"
    assert fmt.PREAMBLE.size == 20
    assert fmt.META_MAGIC == b"\x93DISKIVF"
    assert fmt.COMMIT_MAGIC == b"\x93DIVFCMT"
    assert (fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR) == (1, 0)
    assert fmt.ARRAY_ALIGN == 64


def test_golden_meta_bytes() -> None:
    assert fmt.encode_meta(golden_meta()) == GOLDEN_META


def test_golden_meta_decodes() -> None:
    assert len(GOLDEN_META) == 352
    assert_meta_equal(fmt.decode_meta(GOLDEN_META), golden_meta())


def test_header_len_counts_only_msgpack_bytes() -> None:
    buf = fmt.encode_meta(golden_meta())
    hlen = struct.unpack_from("<I", buf, 12)[0]
    # No ExtraData: the padding is not part of header_len.
    h = msgpack.unpackb(buf[20 : 20 + hlen], raw=False)
    assert h["centroids_offset"] == align64(20 + hlen) == 320
    assert buf[20 + hlen : 320] == b"\0" * (320 - 20 - hlen)
    assert np.frombuffer(buf[320:], "<f4").reshape(2, 4).tolist() == CENTROIDS.tolist()


def test_untrained_meta_is_preamble_and_header_only() -> None:
    meta = dataclasses.replace(golden_meta(), centroids=None, training=None)
    buf = fmt.encode_meta(meta)
    hlen = struct.unpack_from("<I", buf, 12)[0]
    assert len(buf) == 20 + hlen
    h = header_of(buf)
    assert h["trained"] is False
    assert "centroids_offset" not in h
    assert "centroids_crc32" not in h
    assert_meta_equal(fmt.decode_meta(buf), meta)


def test_golden_commit_bytes() -> None:
    assert fmt.encode_commit(golden_commit()) == GOLDEN_COMMIT


def test_golden_commit_decodes() -> None:
    rec = fmt.decode_commit(GOLDEN_COMMIT, 2, UUID)
    assert_commit_equal(rec, golden_commit())
    assert rec.ntotal == 6
    assert rec.tombstones.size == 0


def test_golden_commit_with_tombstones_bytes() -> None:
    assert fmt.encode_commit(golden_commit_removed()) == GOLDEN_COMMIT_REMOVED
    assert len(GOLDEN_COMMIT_REMOVED) == 206


def test_golden_commit_with_tombstones_decodes() -> None:
    rec = fmt.decode_commit(GOLDEN_COMMIT_REMOVED, 2, UUID)
    assert_commit_equal(rec, golden_commit_removed())
    assert rec.ntotal == 6 - 2  # committed rows minus tombstones
    assert (rec.tombstones >> fmt.ROW_BITS).tolist() == [0, 1]
    assert (rec.tombstones & ((1 << fmt.ROW_BITS) - 1)).tolist() == [2, 1]


def test_tombstone_packing_constants() -> None:
    assert fmt.ROW_BITS == 40
    assert fmt.MAX_TOMBSTONES == 2**22
    assert fmt.MAX_COMMIT_BODY == 64 << 20
    # The largest tombstone (last list, largest row) still fits a non-negative int64.
    assert (fmt.MAX_NLIST - 1) << fmt.ROW_BITS | ((1 << fmt.ROW_BITS) - 1) < 2**63


def test_encoders_write_little_endian_from_big_endian_input() -> None:
    meta = dataclasses.replace(golden_meta(), centroids=CENTROIDS.astype(">f4"))
    assert fmt.encode_meta(meta) == GOLDEN_META
    rec = golden_commit()
    big = dataclasses.replace(
        rec,
        list_counts=rec.list_counts.astype(">i8"),
        list_gens=rec.list_gens.astype(">u4"),
        vec_crc32=rec.vec_crc32.astype(">u4"),
        ids_crc32=rec.ids_crc32.astype(">u4"),
    )
    assert fmt.encode_commit(big) == GOLDEN_COMMIT
    removed = golden_commit_removed()
    big = dataclasses.replace(removed, tombstones=removed.tombstones.astype(">i8"))
    assert fmt.encode_commit(big) == GOLDEN_COMMIT_REMOVED


def test_encode_meta_rejects_centroids_of_wrong_shape() -> None:
    meta = dataclasses.replace(golden_meta(), centroids=CENTROIDS.T)
    with pytest.raises(ValueError, match=r"expected centroids of shape \(2, 4\) but got \(4, 2\)"):
        fmt.encode_meta(meta)


def test_list_file_names() -> None:
    assert fmt.list_file_names(0, 0) == ("lists/0000000.0.vec", "lists/0000000.0.ids")
    assert fmt.list_file_names(12, 3) == ("lists/0000012.3.vec", "lists/0000012.3.ids")
    last = fmt.list_file_names(fmt.MAX_NLIST - 1, 2**32 - 1)
    assert last == ("lists/1048575.4294967295.vec", "lists/1048575.4294967295.ids")


# --------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------

_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_uuids = st.uuids().map(lambda u: u.hex)


@st.composite
def metadatas(draw: st.DrawFn) -> fmt.Metadata:
    trained = draw(st.booleans())
    if trained:  # keep the centroids small
        nlist, dim = draw(st.integers(1, 16)), draw(st.integers(1, 16))
        centroids = draw(hnp.arrays(np.float32, (nlist, dim), elements=_f32))
    else:
        nlist, dim = draw(st.integers(1, fmt.MAX_NLIST)), draw(st.integers(1, fmt.MAX_DIM))
        centroids = None
    big = 1 << 62
    training = draw(
        st.none()
        | st.builds(
            fmt.TrainingInfo,
            npoints=st.integers(0, big),
            niter=st.integers(0, 1 << 20),
            nsplit=st.integers(0, big),
            seed=st.integers(-big, big),
            objective=st.lists(st.floats(allow_nan=False), max_size=30).map(tuple),
        )
    )
    return fmt.Metadata(
        dim=dim,
        nlist=nlist,
        metric=draw(st.sampled_from(fmt.METRICS)),
        vector_dtype=draw(st.sampled_from(fmt.VECTOR_DTYPES)),
        nprobe=draw(st.integers(1, nlist)),
        index_uuid=draw(_uuids),
        centroids=centroids,
        training=training,
        created_by=draw(st.text(max_size=40)),
    )


@given(metadatas())
def test_meta_round_trip(meta: fmt.Metadata) -> None:
    buf = fmt.encode_meta(meta)
    if meta.centroids is not None:  # the centroids end the file, at a 64-aligned offset
        assert (len(buf) - meta.centroids.nbytes) % 64 == 0
    assert_meta_equal(fmt.decode_meta(buf), meta)


@st.composite
def tombstones_for(draw: st.DrawFn, counts: np.ndarray) -> np.ndarray:
    """Sorted unique packed (list_id, row) of committed rows; rows below 2**40."""
    nonempty = np.flatnonzero(counts).tolist()
    if not nonempty:
        return np.zeros(0, np.int64)
    rows = st.sampled_from(nonempty).flatmap(
        lambda i: st.integers(0, min(int(counts[i]), 1 << fmt.ROW_BITS) - 1).map(
            lambda r: i << fmt.ROW_BITS | r
        )
    )
    return np.array(sorted(set(draw(st.lists(rows, max_size=40)))), np.int64)


@st.composite
def commits(draw: st.DrawFn) -> tuple[int, fmt.CommitRecord]:
    nlist = draw(st.integers(1, 64))
    u32 = hnp.arrays(np.uint32, nlist, elements=st.integers(0, 2**32 - 1))
    counts = draw(hnp.arrays(np.int64, nlist, elements=st.integers(0, (1 << 48) // nlist)))
    return nlist, fmt.CommitRecord(
        generation=draw(st.integers(0, 1 << 62)),
        index_uuid=draw(_uuids),
        next_id=draw(st.integers(0, 1 << 63)),
        list_counts=counts,
        list_gens=draw(u32),
        vec_crc32=draw(u32),
        ids_crc32=draw(u32),
        tombstones=draw(tombstones_for(counts)),
    )


@given(commits())
def test_commit_round_trip(case: tuple[int, fmt.CommitRecord]) -> None:
    nlist, rec = case
    buf = fmt.encode_commit(rec)
    decoded = fmt.decode_commit(buf, nlist, rec.index_uuid)
    assert_commit_equal(decoded, rec)
    assert decoded.ntotal == int(rec.list_counts.sum()) - len(rec.tombstones)
    # The tombstones are the raw <i8 bytes of the record, as the specification says.
    assert header_of(buf)["tombstones"] == rec.tombstones.astype("<i8").tobytes()


def test_meta_round_trip_at_the_limits() -> None:
    meta = fmt.Metadata(
        dim=fmt.MAX_DIM,
        nlist=fmt.MAX_NLIST,
        metric="cosine",
        vector_dtype="<f2",
        nprobe=fmt.MAX_NLIST,
        index_uuid=UUID,
    )
    assert_meta_equal(fmt.decode_meta(fmt.encode_meta(meta)), meta)


def test_commit_round_trip_at_max_nlist() -> None:
    rec = fmt.CommitRecord.empty(fmt.MAX_NLIST, UUID)
    buf = fmt.encode_commit(rec)
    assert_commit_equal(fmt.decode_commit(buf, fmt.MAX_NLIST, UUID), rec)


def test_read_meta_and_commit_from_files(tmp_path: Path) -> None:
    (tmp_path / fmt.META_NAME).write_bytes(GOLDEN_META)
    (tmp_path / fmt.COMMIT_NAME).write_bytes(GOLDEN_COMMIT)
    assert_meta_equal(fmt.read_meta(tmp_path), golden_meta())
    assert_commit_equal(fmt.read_commit(tmp_path, 2, UUID), golden_commit())


def test_read_meta_reads_large_centroids_past_the_header_buffer(tmp_path: Path) -> None:
    # 2 MiB of centroids: more than read_meta's first read, so they come through pread.
    c = np.random.default_rng(0).standard_normal((1024, 512)).astype(np.float32)
    meta = dataclasses.replace(golden_meta(), dim=512, nlist=1024, centroids=c, training=None)
    (tmp_path / fmt.META_NAME).write_bytes(fmt.encode_meta(meta))
    assert_meta_equal(fmt.read_meta(tmp_path), meta)


def test_read_missing_files_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        fmt.read_meta(tmp_path)
    with pytest.raises(FileNotFoundError):
        fmt.read_commit(tmp_path, 2, UUID)


# --------------------------------------------------------------------------------------------
# preamble rejections (both files)
# --------------------------------------------------------------------------------------------


def decode_meta(buf: bytes) -> fmt.Metadata:
    return fmt.decode_meta(buf)


def decode_commit(buf: bytes) -> fmt.CommitRecord:
    return fmt.decode_commit(buf, 2, UUID)


FILES = [
    pytest.param(GOLDEN_META, fmt.META_MAGIC, decode_meta, fmt.MAX_META_HEADER, id="meta"),
    pytest.param(GOLDEN_COMMIT, fmt.COMMIT_MAGIC, decode_commit, fmt.MAX_COMMIT_BODY, id="commit"),
]


def repack(buf: bytes, **fields: int) -> bytes:
    """``buf`` with preamble fields changed (the CRC recomputed unless ``crc`` is given)."""
    magic, major, minor, reserved, hlen, _ = fmt.PREAMBLE.unpack_from(buf)
    values = {"major": major, "minor": minor, "reserved": reserved, "hlen": hlen} | fields
    head = struct.pack(
        "<8sBBHI", magic, values["major"], values["minor"], values["reserved"], values["hlen"]
    )
    new_crc = fields.get("crc", zlib.crc32(head + buf[20 : 20 + hlen]))
    return head + struct.pack("<I", new_crc) + buf[20:]


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x93DISKIV",
        b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}" + b" " * 64,
        b"PK\x03\x04" + b"\0" * 60,
        b"\x93DISKIVF"[:7] + b"G" + b"\0" * 40,
    ],
)
def test_not_a_diskivf_file(good: bytes, magic: bytes, decode: Any, cap: int, bad: bytes) -> None:
    with pytest.raises(FormatError, match=r"^not a diskivf index") as info:
        decode(bad)
    assert not isinstance(info.value, CorruptIndexError)


def test_magic_of_the_other_file_is_rejected() -> None:
    with pytest.raises(FormatError, match=r"not a diskivf index: meta\.diskivf"):
        fmt.decode_meta(GOLDEN_COMMIT)
    with pytest.raises(FormatError, match=r"not a diskivf index: commit\.msgpack"):
        fmt.decode_commit(GOLDEN_META, 2, UUID)


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
@pytest.mark.parametrize("major", [2, 3, 255])
def test_newer_major_is_unsupported(
    good: bytes, magic: bytes, decode: Any, cap: int, major: int
) -> None:
    with pytest.raises(UnsupportedVersionError, match="newer diskivf may read this"):
        decode(repack(good, major=major))
    # A new major may change everything after the version bytes, even the checksum.
    with pytest.raises(UnsupportedVersionError, match=rf"format version {major}\.0"):
        decode(repack(good, major=major, crc=0))


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
def test_major_zero_is_corrupt_or_foreign(good: bytes, magic: bytes, decode: Any, cap: int) -> None:
    with pytest.raises(UnsupportedVersionError, match="corrupt or foreign"):
        decode(repack(good, major=0))


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
def test_reserved_must_be_zero(good: bytes, magic: bytes, decode: Any, cap: int) -> None:
    with pytest.raises(CorruptIndexError, match="reserved field is 1, not 0"):
        decode(repack(good, reserved=1))


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
def test_header_len_over_cap(good: bytes, magic: bytes, decode: Any, cap: int) -> None:
    with pytest.raises(CorruptIndexError, match=f"header length {cap + 1} exceeds the limit"):
        decode(repack(good, hlen=cap + 1))
    with pytest.raises(CorruptIndexError, match="exceeds the limit"):
        decode(repack(good, hlen=2**32 - 1))


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
def test_header_len_past_end_of_file(good: bytes, magic: bytes, decode: Any, cap: int) -> None:
    hlen = struct.unpack_from("<I", good, 12)[0]
    with pytest.raises(CorruptIndexError, match="runs past the end of the file"):
        decode(repack(good[: 20 + hlen], hlen=hlen + 1))
    with pytest.raises(CorruptIndexError, match="runs past the end of the file"):
        decode(good[: 20 + hlen - 1])


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
@pytest.mark.parametrize("where", [9, 12, 16, 19, 20, 40, -1])
def test_header_checksum_mismatch(
    good: bytes, magic: bytes, decode: Any, cap: int, where: int
) -> None:
    # Bytes 9 (minor), 12 (header_len), 16..19 (the CRC) and the msgpack bytes are covered.
    hlen = struct.unpack_from("<I", good, 12)[0]
    pos = 20 + hlen - 1 if where == -1 else where
    bad = bytearray(good)
    if where == 12:  # a shorter header_len still inside the file
        bad[12:16] = struct.pack("<I", hlen - 1)
    else:
        bad[pos] ^= 0x01
    with pytest.raises(CorruptIndexError, match="header checksum mismatch"):
        decode(bytes(bad))


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x81\xa3dim", id="truncated"),
        pytest.param(msgpack.packb({"dim": 4}) + b"\x00", id="extra-data"),
        pytest.param(msgpack.packb({1: 2}), id="int-key"),
        pytest.param(msgpack.packb({"x_e": msgpack.ExtType(1, b"x")}), id="ext-type"),
        pytest.param(msgpack.packb({"x_a": [0] * 10_001}), id="array-over-limit"),
        pytest.param(msgpack.packb({f"x_{i}": 0 for i in range(1025)}), id="map-over-limit"),
        pytest.param(msgpack.packb({"x_s": "a" * 65_537}), id="str-over-limit"),
        pytest.param(b"\x91" * 5000 + b"\x90", id="deep-nesting"),
    ],
)
def test_header_is_not_valid_msgpack(
    good: bytes, magic: bytes, decode: Any, cap: int, body: bytes
) -> None:
    with pytest.raises(CorruptIndexError, match="header is not valid msgpack"):
        decode(preamble(magic, body) + body)


@pytest.mark.parametrize(("good", "magic", "decode", "cap"), FILES)
@pytest.mark.parametrize("value", [[1, 2], "dim", 7, None])
def test_header_is_not_a_map(
    good: bytes, magic: bytes, decode: Any, cap: int, value: object
) -> None:
    body = msgpack.packb(value)
    with pytest.raises(CorruptIndexError, match=r"header is a \w+, not a map"):
        decode(preamble(magic, body) + body)


# --------------------------------------------------------------------------------------------
# metadata rejections
# --------------------------------------------------------------------------------------------

REQUIRED_META_KEYS = [
    "dim",
    "nlist",
    "metric",
    "vector_dtype",
    "id_dtype",
    "centroid_dtype",
    "nprobe",
    "index_uuid",
    "trained",
    "required_features",
    "centroids_offset",
    "centroids_crc32",
]


@pytest.mark.parametrize("key", REQUIRED_META_KEYS)
def test_meta_missing_required_key(key: str) -> None:
    with pytest.raises(CorruptIndexError, match=f"missing required key '{key}'"):
        fmt.decode_meta(meta_with(**{key: DELETE}))


def test_meta_optional_keys_may_be_absent() -> None:
    meta = fmt.decode_meta(meta_with(created_by=DELETE, training=DELETE))
    assert meta.created_by == ""
    assert meta.training is None


def _int_cases(key: str, lo: int, hi: int) -> list[Any]:
    return [
        pytest.param(key, str(lo), "must be an integer, got str", id=f"{key}-str"),
        pytest.param(key, True, "must be an integer, got bool", id=f"{key}-bool"),
        pytest.param(key, float(lo), "must be an integer, got float", id=f"{key}-float"),
        pytest.param(key, [lo], "must be an integer, got list", id=f"{key}-list"),
        pytest.param(key, lo - 1, re.escape(f"={lo - 1} is outside [{lo}, {hi}]"), id=f"{key}-lo"),
        pytest.param(key, hi + 1, re.escape(f"={hi + 1} is outside [{lo}, {hi}]"), id=f"{key}-hi"),
    ]


def _str_cases(key: str, values: list[Any]) -> list[Any]:
    return [
        pytest.param(key, v, f"'{key}' must be one of", id=f"{key}-{v!r}".replace(" ", ""))
        for v in values
    ]


META_BAD_VALUES = [
    *_int_cases("dim", 1, fmt.MAX_DIM),
    *_int_cases("nlist", 1, fmt.MAX_NLIST),
    *_int_cases("nprobe", 1, 2),  # at most nlist
    *_str_cases("metric", ["cos", "L2", "", 2, b"l2", None, ["l2"]]),
    *_str_cases("vector_dtype", [">f4", "<f8", "float32", "f4", b"<f4", 4]),
    *_str_cases("id_dtype", ["<i4", ">i8", "<u8", 8]),
    *_str_cases("centroid_dtype", ["<f2", ">f4", "<f8", 4]),
    *[
        pytest.param("index_uuid", v, "'index_uuid' is not 32 hex digits", id=f"uuid-{i}")
        for i, v in enumerate(
            [UUID.upper(), UUID[:-1], UUID + "0", UUID[:-1] + "g", "", 12, UUID.encode()]
        )
    ],
    pytest.param("trained", 1, "'trained' must be a boolean", id="trained-int"),
    pytest.param("trained", "true", "'trained' must be a boolean", id="trained-str"),
    pytest.param("created_by", 5, "'created_by' must be a string", id="created_by-int"),
    pytest.param("created_by", b"x", "'created_by' must be a string", id="created_by-bin"),
    pytest.param("training", [], "'training' must be a map", id="training-list"),
    pytest.param("training", "x", "'training' must be a map", id="training-str"),
    pytest.param("required_features", "f", "must be a string list", id="features-str"),
    pytest.param("required_features", [1], "must be a string list", id="features-int"),
    pytest.param("required_features", {"a": 1}, "must be a string list", id="features-map"),
    pytest.param("centroids_offset", "320", "must be an integer, got str", id="offset-str"),
    pytest.param("centroids_crc32", "1", "must be an integer, got str", id="crc-str"),
    pytest.param("centroids_crc32", -1, re.escape("is outside [0, 4294967295]"), id="crc-neg"),
    pytest.param("centroids_crc32", 2**32, re.escape("is outside [0, 4294967295]"), id="crc-big"),
]


@pytest.mark.parametrize(("key", "value", "match"), META_BAD_VALUES)
def test_meta_rejects_bad_value(key: str, value: Any, match: str) -> None:
    with pytest.raises(CorruptIndexError, match=match):
        fmt.decode_meta(meta_with(**{key: value}))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        *_int_cases("npoints", 0, 1 << 62),
        *_int_cases("niter", 0, 1 << 20),
        *_int_cases("nsplit", 0, 1 << 62),
        pytest.param("seed", -(1 << 62) - 1, "is outside", id="seed-lo"),
        pytest.param("seed", (1 << 62) + 1, "is outside", id="seed-hi"),
        pytest.param("seed", 0.5, "must be an integer", id="seed-float"),
        pytest.param("objective", "x", "must be a list of numbers", id="obj-str"),
        pytest.param("objective", [1.0, "a"], "must be a list of numbers", id="obj-item-str"),
        pytest.param("objective", [True], "must be a list of numbers", id="obj-item-bool"),
        pytest.param("objective", [[1.0]], "must be a list of numbers", id="obj-nested"),
    ],
)
def test_meta_rejects_bad_training_value(key: str, value: Any, match: str) -> None:
    training = golden_header()["training"] | {key: value}
    with pytest.raises(CorruptIndexError, match=f"training key '{key}'.*{match}"):
        fmt.decode_meta(meta_with(training=training))


def test_meta_training_keys_default_when_absent() -> None:
    meta = fmt.decode_meta(meta_with(training={}))
    assert meta.training == fmt.TrainingInfo(npoints=0, niter=0, nsplit=0, seed=0, objective=())


def test_meta_training_objective_accepts_integers() -> None:
    meta = fmt.decode_meta(meta_with(training={"objective": [3, 2.5]}))
    assert meta.training is not None
    assert meta.training.objective == (3.0, 2.5)


@pytest.mark.parametrize("features", [["foo"], ["zstd", "pq"], [""]])
def test_meta_unknown_required_feature_is_unsupported(features: list[str]) -> None:
    with pytest.raises(UnsupportedVersionError, match="newer diskivf may read this"):
        fmt.decode_meta(meta_with(required_features=features))


def test_meta_unknown_key_in_same_minor_is_corrupt() -> None:
    with pytest.raises(CorruptIndexError, match=re.escape("unknown keys ['foo', 'zzz']")):
        fmt.decode_meta(meta_with(foo=1, zzz="a"))


def test_meta_ignores_x_keys() -> None:
    meta = fmt.decode_meta(meta_with(x_note="hello", x_n=[1, 2]))
    assert dict(meta.extra) == {"x_note": "hello", "x_n": [1, 2]}
    assert_meta_equal(dataclasses.replace(meta, extra={}), golden_meta())


def test_meta_newer_minor_may_add_unknown_keys() -> None:
    h = golden_header() | {"new_key": {"a": 1}}
    meta = fmt.decode_meta(meta_file(h, CENTROIDS.tobytes(), minor=1))
    assert meta.version == (1, 1)
    assert dict(meta.extra) == {"new_key": {"a": 1}}
    assert meta.centroids is not None


def test_meta_newer_minor_still_validates_known_keys() -> None:
    h = golden_header() | {"new_key": 1, "dim": 0}
    with pytest.raises(CorruptIndexError, match="'dim'=0 is outside"):
        fmt.decode_meta(meta_file(h, CENTROIDS.tobytes(), minor=7))


def test_untrained_meta_ignores_centroid_keys() -> None:
    h = golden_header() | {"trained": False}
    meta = fmt.decode_meta(meta_file(h))  # no centroids follow the header
    assert meta.centroids is None
    assert not meta.trained


@pytest.mark.parametrize("delta", [-64, -1, 1, 64])
def test_meta_centroids_offset_wrong(delta: int) -> None:
    h = golden_header()
    h["centroids_offset"] = 320 + delta
    with pytest.raises(CorruptIndexError, match="is not the 64-aligned end of the header"):
        fmt.decode_meta(meta_file(h, CENTROIDS.tobytes(), fix_offset=False))


def test_meta_centroids_offset_out_of_range() -> None:
    h = golden_header()
    h["centroids_offset"] = -1
    with pytest.raises(CorruptIndexError, match=re.escape("'centroids_offset'=-1 is outside")):
        fmt.decode_meta(meta_file(h, CENTROIDS.tobytes(), fix_offset=False))


@pytest.mark.parametrize("cut", [1, 4, 32, 33])
def test_meta_truncated_centroids(cut: int) -> None:
    with pytest.raises(CorruptIndexError, match="is truncated"):
        fmt.decode_meta(GOLDEN_META[:-cut])


def test_meta_truncated_centroids_with_reader() -> None:
    head = GOLDEN_META[:300]
    with pytest.raises(CorruptIndexError, match="truncated before its centroids"):
        fmt.decode_meta(head, len(GOLDEN_META))
    with pytest.raises(CorruptIndexError, match="truncated before its centroids"):
        fmt.decode_meta(head, len(GOLDEN_META), lambda off, n: GOLDEN_META[off : off + n - 1])
    meta = fmt.decode_meta(head, len(GOLDEN_META), lambda off, n: GOLDEN_META[off : off + n])
    assert_meta_equal(meta, golden_meta())


def test_meta_bytes_after_the_centroids_are_ignored() -> None:
    assert_meta_equal(fmt.decode_meta(GOLDEN_META + b"\x01" * 7), golden_meta())


@pytest.mark.parametrize("pos", [299, 310, 319])
def test_meta_nonzero_padding(pos: int) -> None:
    bad = bytearray(GOLDEN_META)
    bad[pos] = 1
    with pytest.raises(CorruptIndexError, match=r"padding bytes 299\.\.320 .* are not zero"):
        fmt.decode_meta(bytes(bad))


@pytest.mark.parametrize("pos", [320, 335, 351])
def test_meta_centroids_checksum_mismatch(pos: int) -> None:
    bad = bytearray(GOLDEN_META)
    bad[pos] ^= 0x80
    with pytest.raises(CorruptIndexError, match="centroids checksum mismatch"):
        fmt.decode_meta(bytes(bad))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_meta_non_finite_centroids(value: float) -> None:
    c = CENTROIDS.copy()
    c[1, 2] = value
    buf = meta_with(centroids_crc32=zlib.crc32(c.tobytes()))
    buf = buf[:320] + c.tobytes()
    with pytest.raises(CorruptIndexError, match="centroids contain NaN or infinity"):
        fmt.decode_meta(buf)


def test_meta_centroid_extent_is_checked_before_reading() -> None:
    # A header claiming the largest legal extent over a tiny file fails on the size check,
    # before any read of nlist * dim * 4 bytes is attempted.
    h = golden_header() | {"dim": fmt.MAX_DIM, "nlist": fmt.MAX_NLIST}

    def read(offset: int, nbytes: int) -> bytes:
        raise AssertionError("read() called for an extent past the end of the file")

    with pytest.raises(CorruptIndexError, match="is truncated: centroids need bytes"):
        fmt.decode_meta(meta_file(h, CENTROIDS.tobytes()), None, read)


# --------------------------------------------------------------------------------------------
# commit record rejections
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "generation",
        "index_uuid",
        "next_id",
        "list_counts",
        "list_gens",
        "vec_crc32",
        "ids_crc32",
        "tombstones",
    ],
)
def test_commit_missing_required_key(key: str) -> None:
    with pytest.raises(CorruptIndexError, match=f"commit.msgpack is missing required key '{key}'"):
        decode_commit(commit_with(**{key: DELETE}))


def test_commit_of_another_index() -> None:
    with pytest.raises(CorruptIndexError, match=f"belongs to index {UUID}, but .* {OTHER_UUID}"):
        fmt.decode_commit(GOLDEN_COMMIT, 2, OTHER_UUID)


@pytest.mark.parametrize(
    ("key", "dtype"),
    [("list_counts", "<i8"), ("list_gens", "<u4"), ("vec_crc32", "<u4"), ("ids_crc32", "<u4")],
)
def test_commit_list_arrays_of_wrong_length(key: str, dtype: str) -> None:
    itemsize = np.dtype(dtype).itemsize
    for nbytes in (0, itemsize, 3 * itemsize, 2 * itemsize + 1):
        bad = commit_with(**{key: b"\0" * nbytes})
        with pytest.raises(
            CorruptIndexError, match=f"'{key}' must be 2 x {dtype} .*, got {nbytes} bytes"
        ):
            decode_commit(bad)
    with pytest.raises(CorruptIndexError, match=r"'list_counts' must be 3 x <i8 \(24 bytes\)"):
        fmt.decode_commit(GOLDEN_COMMIT, 3, UUID)  # the record of a 2-list index


@pytest.mark.parametrize("key", ["list_counts", "list_gens", "vec_crc32", "ids_crc32"])
@pytest.mark.parametrize("value", [[0, 0], "\0" * 16, 0])
def test_commit_list_arrays_must_be_bin(key: str, value: Any) -> None:
    with pytest.raises(CorruptIndexError, match=f"'{key}' must be 2 x .*, got (list|str|int)$"):
        decode_commit(commit_with(**{key: value}))


@pytest.mark.parametrize(
    "counts",
    [[-1, 0], [0, 2**48 + 1], [2**63 - 1, 0]],
)
def test_commit_counts_out_of_range(counts: list[int]) -> None:
    bad = commit_with(list_counts=np.array(counts, "<i8").tobytes())
    with pytest.raises(
        CorruptIndexError, match=re.escape("list_counts has values outside [0, 2**48]")
    ):
        decode_commit(bad)


def test_commit_ntotal_over_limit() -> None:
    bad = commit_with(list_counts=np.array([2**47 + 1, 2**47], "<i8").tobytes())
    with pytest.raises(CorruptIndexError, match=re.escape("exceeds 2**48")):
        decode_commit(bad)
    ok = commit_with(list_counts=np.array([2**47, 2**47], "<i8").tobytes())
    assert decode_commit(ok).ntotal == 2**48


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        *_int_cases("generation", 0, 1 << 62),
        *_int_cases("next_id", 0, 1 << 63),
        pytest.param("index_uuid", UUID.upper(), "not 32 hex digits", id="uuid-upper"),
        pytest.param("index_uuid", 5, "not 32 hex digits", id="uuid-int"),
    ],
)
def test_commit_rejects_bad_value(key: str, value: Any, match: str) -> None:
    with pytest.raises(CorruptIndexError, match=match):
        decode_commit(commit_with(**{key: value}))


def _tomb(*values: int) -> bytes:
    return np.array(values, "<i8").tobytes()


_NOT_I8 = "'tombstones' must be <i8 bytes"
_NOT_INCREASING = "tombstones are not strictly increasing"
_PAST = "has a tombstone past a committed row"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        pytest.param([], _NOT_I8, id="list"),
        pytest.param([2], _NOT_I8, id="int-list"),
        pytest.param(2, _NOT_I8, id="int"),
        pytest.param(None, _NOT_I8, id="nil"),
        pytest.param("\0" * 8, _NOT_I8, id="str"),
        pytest.param(b"\0" * 7, _NOT_I8, id="length-7"),
        pytest.param(_tomb(2) + b"\0", _NOT_I8, id="length-9"),
        pytest.param(_tomb(3, 2), _NOT_INCREASING, id="decreasing"),
        pytest.param(_tomb(0, 3, 1 << 40, 2), _NOT_INCREASING, id="decreasing-later"),
        pytest.param(_tomb(2, 2), _NOT_INCREASING, id="duplicate"),
        pytest.param(_tomb(1 << 40 | 1, 1 << 40 | 1), _NOT_INCREASING, id="duplicate-list-1"),
        pytest.param(_tomb(-1), _NOT_INCREASING, id="negative"),
        pytest.param(_tomb(-(1 << 40), 2), _NOT_INCREASING, id="negative-list"),
        pytest.param(_tomb(2 << 40), _PAST, id="list-id-nlist"),
        pytest.param(_tomb(0, (1 << 20) << 40), _PAST, id="list-id-huge"),
        pytest.param(_tomb(4), _PAST, id="row-count-list-0"),
        pytest.param(_tomb(1 << 40 | 2), _PAST, id="row-count-list-1"),
        pytest.param(_tomb(0, 1, (1 << 40) - 1), _PAST, id="row-max"),
        pytest.param(_tomb(2, 3, 1 << 40 | 5), _PAST, id="row-past-after-valid"),
    ],
)
def test_commit_rejects_bad_tombstones(value: Any, match: str) -> None:
    with pytest.raises(CorruptIndexError, match=re.escape(match)):
        decode_commit(commit_with(tombstones=value))


def test_commit_tombstones_of_an_empty_list() -> None:
    # A tombstone must name a committed row: list 1 with no rows has none to remove.
    bad = commit_with(list_counts=np.array([4, 0], "<i8").tobytes(), tombstones=_tomb(1, 1 << 40))
    with pytest.raises(CorruptIndexError, match=re.escape(_PAST)):
        decode_commit(bad)


@pytest.mark.parametrize(
    "values",
    [[0], [3], [1 << 40], [1 << 40 | 1], [0, 1, 2, 3, 1 << 40, 1 << 40 | 1]],
)
def test_commit_accepts_tombstones_at_the_bounds(values: list[int]) -> None:
    rec = decode_commit(commit_with(tombstones=_tomb(*values)))
    assert rec.tombstones.tolist() == values
    assert rec.tombstones.dtype == np.int64
    assert rec.tombstones.dtype.isnative
    assert rec.ntotal == 6 - len(values)


def test_commit_tombstones_over_the_limit() -> None:
    # One more than 2**22 values (32 MiB + 8 bytes): rejected on the count, before any parsing.
    counts = np.array([fmt.MAX_TOMBSTONES + 1, 0], "<i8").tobytes()
    too_many = np.arange(fmt.MAX_TOMBSTONES + 1, dtype="<i8").tobytes()
    with pytest.raises(
        CorruptIndexError, match=f"has {fmt.MAX_TOMBSTONES + 1} tombstones, over {2**22}"
    ):
        decode_commit(commit_with(list_counts=counts, tombstones=too_many))


def test_commit_tombstones_at_the_limit_round_trip(tmp_path: Path) -> None:
    # 2**22 tombstones fit the record, and read_commit's size limit, at the smallest nlist.
    rec = dataclasses.replace(
        golden_commit(),
        list_counts=np.array([fmt.MAX_TOMBSTONES, 2], np.int64),
        tombstones=np.arange(fmt.MAX_TOMBSTONES, dtype=np.int64),
    )
    (tmp_path / fmt.COMMIT_NAME).write_bytes(fmt.encode_commit(rec))
    back = fmt.read_commit(tmp_path, 2, UUID)
    assert_commit_equal(back, rec)
    assert back.ntotal == 2


def test_commit_trailing_bytes() -> None:
    with pytest.raises(CorruptIndexError, match="has 1 trailing bytes"):
        decode_commit(GOLDEN_COMMIT + b"\0")


def test_commit_unknown_keys() -> None:
    with pytest.raises(CorruptIndexError, match=re.escape("commit.msgpack has unknown keys ['a']")):
        decode_commit(commit_with(a=1))
    assert decode_commit(commit_with(x_a=1)).generation == 1
    rec = decode_commit(commit_with(1, a=1))
    assert rec.version == (1, 1)


def test_read_commit_rejects_oversized_file_before_reading(tmp_path: Path) -> None:
    path = tmp_path / fmt.COMMIT_NAME
    with open(path, "wb") as f:
        f.write(GOLDEN_COMMIT)
        f.truncate(fmt.PREAMBLE.size + fmt.MAX_COMMIT_BODY + 1)  # sparse: nothing is written
    with pytest.raises(CorruptIndexError, match=r"commit\.msgpack is \d+ bytes, over the limit"):
        fmt.read_commit(tmp_path, 2, UUID)


@pytest.mark.parametrize("nlist", [2, 1000, fmt.MAX_NLIST])
def test_read_commit_size_limit_formula(tmp_path: Path, nlist: int) -> None:
    # §10: 20 + min(64 MiB, 20 * nlist + 8 * 2**22 + 1 MiB) bytes; one more is rejected unread.
    limit = 20 + min(64 << 20, 20 * nlist + 8 * 2**22 + (1 << 20))
    path = tmp_path / fmt.COMMIT_NAME
    with open(path, "wb") as f:
        f.truncate(limit + 1)
    with pytest.raises(CorruptIndexError, match=f"is {limit + 1} bytes, over the limit of {limit}"):
        fmt.read_commit(tmp_path, nlist, UUID)
    with open(path, "wb") as f:
        f.truncate(limit)  # at the limit: read, then rejected for its contents
    with pytest.raises(FormatError, match="not a diskivf index"):
        fmt.read_commit(tmp_path, nlist, UUID)


# --------------------------------------------------------------------------------------------
# atomic_write
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("durable", [True, False])
def test_atomic_write_creates_and_replaces(tmp_path: Path, durable: bool) -> None:
    path = tmp_path / "commit.msgpack"
    fmt.atomic_write(path, b"first", durable=durable)
    assert path.read_bytes() == b"first"
    fmt.atomic_write(path, b"second, longer", durable=durable)
    assert path.read_bytes() == b"second, longer"
    fmt.atomic_write(path, b"", durable=durable)
    assert path.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commit.msgpack"]


def test_atomic_write_never_truncates_the_old_file(tmp_path: Path) -> None:
    # A reader holding the old file open or mapped keeps its bytes (safetensors #764).
    path = tmp_path / "meta.diskivf"
    fmt.atomic_write(path, b"A" * 4096)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        fmt.atomic_write(path, b"B" * 10)
        assert m[:] == b"A" * 4096
        f.seek(0)
        assert f.read() == b"A" * 4096
    assert path.read_bytes() == b"B" * 10


def test_atomic_write_temp_name_and_cleanup_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "commit.msgpack"
    fmt.atomic_write(path, b"old")
    seen: list[str] = []

    def failing_replace(src: Any, dst: Any) -> None:
        seen.append(Path(src).name)
        assert Path(src).read_bytes() == b"new"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        fmt.atomic_write(path, b"new")
    assert seen == [f".commit.msgpack.{os.getpid()}.tmp"]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commit.msgpack"]


def test_atomic_write_cleans_up_after_a_failed_write(tmp_path: Path) -> None:
    path = tmp_path / "commit.msgpack"
    fmt.atomic_write(path, b"old")
    with pytest.raises(TypeError):
        fmt.atomic_write(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["commit.msgpack"]


# ------------------------------------------------------------------ checksum


@given(chunks=st.lists(st.binary(max_size=1 << 17), max_size=4), start=st.binary(max_size=64))
def test_crc32_continues_like_zlib(chunks: list[bytes], start: bytes) -> None:
    # Whichever implementation fmt.crc32 uses, running CRCs over any split are zlib's.
    running = fmt.crc32(start)
    for chunk in chunks:
        running = fmt.crc32(memoryview(chunk), running)
    assert running == zlib.crc32(start + b"".join(chunks))


def test_crc32_uses_isal_when_installed_and_zlib_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(100_000)
    monkeypatch.setattr(fmt, "_crc32_impl", None)
    try:
        from isal import isal_zlib
    except ImportError:
        want: Any = zlib.crc32
    else:
        want = isal_zlib.crc32
    assert fmt.crc32(data) == zlib.crc32(data)
    assert fmt._crc32_impl is want
    # Without isal (an import that fails), the same values come from zlib.
    monkeypatch.setattr(fmt, "_crc32_impl", None)
    monkeypatch.setitem(sys.modules, "isal", None)
    assert fmt.crc32(data, 12345) == zlib.crc32(data, 12345)
    assert fmt._crc32_impl is zlib.crc32
