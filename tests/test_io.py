"""Tests for diskivf.io: round trips, zero-copy mapping, hostile files, batching, HDF5."""

from __future__ import annotations

import importlib
import os
import pickle
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diskivf.errors import FormatError, MissingDependencyError
from diskivf.io import (
    BIN_SUFFIXES,
    VECS_SUFFIXES,
    iter_batches,
    open_vectors,
    read_bin,
    read_hdf5,
    read_ids,
    read_npy,
    read_vecs,
    write_bin,
    write_vecs,
)

try:
    h5py: Any = importlib.import_module("h5py")
except ImportError:
    h5py = None


def _sample(dtype: np.dtype[Any], n: int = 7, dim: int = 5, seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        return rng.standard_normal((n, dim)).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(n, dim), endpoint=True).astype(dtype)


def _fvecs_bytes(rows: list[tuple[int, list[float]]]) -> bytes:
    """Hand-build an .fvecs file whose dim fields may lie."""
    out = b""
    for dim, values in rows:
        out += struct.pack("<i", dim) + np.asarray(values, dtype="<f4").tobytes()
    return out


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", sorted(VECS_SUFFIXES))
def test_vecs_round_trip_is_a_strided_read_only_memmap(tmp_path: Path, suffix: str) -> None:
    dtype = VECS_SUFFIXES[suffix]
    x = _sample(dtype)
    path = tmp_path / f"x{suffix}"
    write_vecs(path, x)
    assert path.stat().st_size == 7 * (4 + 5 * dtype.itemsize)

    got = read_vecs(path)
    assert isinstance(got, np.memmap)
    assert got.shape == (7, 5)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, x)
    # A view over whole records (dim prefix skipped), not a compacted copy.
    assert got.strides == (4 + 5 * dtype.itemsize, dtype.itemsize)
    assert not got.flags.c_contiguous
    assert not got.flags.writeable
    np.testing.assert_array_equal(open_vectors(path), x)


@pytest.mark.parametrize("suffix", sorted(BIN_SUFFIXES))
def test_bin_round_trip_is_a_read_only_memmap(tmp_path: Path, suffix: str) -> None:
    dtype = BIN_SUFFIXES[suffix]
    x = _sample(dtype)
    path = tmp_path / f"x{suffix}"
    write_bin(path, x)
    assert path.read_bytes()[:8] == struct.pack("<II", 7, 5)

    got = read_bin(path)
    assert isinstance(got, np.memmap)
    assert got.shape == (7, 5)
    assert got.dtype == dtype
    assert got.flags.c_contiguous
    assert not got.flags.writeable
    assert got.offset == 8
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(open_vectors(path), x)


def test_bin_with_zero_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.fbin"
    write_bin(path, np.zeros((0, 3), dtype=np.float32))
    got = read_bin(path)
    assert got.shape == (0, 3)
    assert list(iter_batches(got, 4)) == []


@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<i8", "u1", "<f2"])
def test_npy_round_trip_keeps_the_file_dtype(tmp_path: Path, dtype: str) -> None:
    x = _sample(np.dtype(dtype))
    path = tmp_path / "x.npy"
    np.save(path, x)
    got = read_npy(path)
    assert isinstance(got, np.memmap)
    assert got.dtype == np.dtype(dtype)
    assert got.shape == x.shape
    assert not got.flags.writeable
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(open_vectors(path), x)


def test_npy_fortran_order_and_format_v2(tmp_path: Path) -> None:
    x = np.asfortranarray(_sample(np.dtype("<f4")))
    path = tmp_path / "x.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, x, version=(2, 0))
    got = read_npy(path)
    assert got.flags.f_contiguous
    np.testing.assert_array_equal(got, x)


def test_big_endian_input_is_written_little_endian(tmp_path: Path) -> None:
    x = _sample(np.dtype(">f4"))
    write_vecs(tmp_path / "x.fvecs", x)
    write_bin(tmp_path / "x.fbin", x)
    for got in (read_vecs(tmp_path / "x.fvecs"), read_bin(tmp_path / "x.fbin")):
        assert got.dtype == np.dtype("<f4")
        np.testing.assert_array_equal(got, x)
    raw = (tmp_path / "x.fbin").read_bytes()[8:12]
    assert raw == x[0, 0].astype("<f4").tobytes()


def test_open_vectors_suffix_is_case_insensitive(tmp_path: Path) -> None:
    x = _sample(np.dtype("<f4"))
    write_vecs(tmp_path / "x.fvecs", x)
    (tmp_path / "x.fvecs").rename(tmp_path / "X.FVECS")
    np.testing.assert_array_equal(open_vectors(tmp_path / "X.FVECS"), x)


def test_overwriting_a_mapped_file_leaves_the_old_mapping_intact(tmp_path: Path) -> None:
    path = tmp_path / "x.fbin"
    old = _sample(np.dtype("<f4"), seed=1)
    write_bin(path, old)
    mapped = read_bin(path)
    write_bin(path, _sample(np.dtype("<f4"), n=2, seed=2))
    np.testing.assert_array_equal(mapped, old)  # renamed over, never truncated in place
    assert read_bin(path).shape == (2, 5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.fbin"]  # no temp files left


def test_importing_io_does_not_import_h5py() -> None:
    code = "import sys, diskivf.io; print('h5py' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_opening_a_50mb_file_does_not_load_it(tmp_path: Path) -> None:
    dim, rows_per_block, blocks = 128, 1000, 100  # 100_000 rows * 516 bytes ~ 52 MB
    block = np.empty(rows_per_block, dtype=[("dim", "<i4"), ("vec", "<f4", (dim,))])
    block["dim"] = dim
    block["vec"] = 1.5
    path = tmp_path / "big.fvecs"
    with open(path, "wb") as f:
        f.writelines(block.tobytes() for _ in range(blocks))
    del block

    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    x = read_vecs(path)  # verify_dims=True reads every record, in bounded chunks
    grown = rss() - before
    assert x.shape == (rows_per_block * blocks, dim)
    assert float(x[-1, -1]) == 1.5
    assert grown < 20 << 20, f"RSS grew by {grown} bytes"


# --- hostile and malformed files -------------------------------------------------------------


def test_truncated_fvecs(tmp_path: Path) -> None:
    path = tmp_path / "x.fvecs"
    write_vecs(path, _sample(np.dtype("<f4")))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FormatError, match=r"multiple of the record size 24 .* truncated"):
        read_vecs(path)


def test_fvecs_with_a_lying_dim_field_same_size(tmp_path: Path) -> None:
    path = tmp_path / "x.fvecs"
    path.write_bytes(_fvecs_bytes([(2, [1, 2]), (2, [3, 4]), (3, [5, 6])]))
    with pytest.raises(FormatError, match=r"dim 2 \(the dim of row 0\), but row 2 has dim 3"):
        read_vecs(path)
    # The opt-out skips the full scan and trusts the first dim.
    assert read_vecs(path, verify_dims=False).shape == (3, 2)


def test_fvecs_with_rows_of_different_dims(tmp_path: Path) -> None:
    path = tmp_path / "x.fvecs"
    path.write_bytes(_fvecs_bytes([(2, [1, 2]), (3, [3, 4, 5])]))
    with pytest.raises(FormatError, match=r"but row 1 has dim 3"):
        read_vecs(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"expected at least one \.fvecs record .* has 0 bytes"),
        (b"\x02\x00", r"has 2 bytes"),
        (struct.pack("<i", 0), r"positive dim in the first record, but found 0"),
        (struct.pack("<i", -5) + b"\0" * 16, r"positive dim .* found -5"),
        (struct.pack("<i", 2**31 - 1), r"says dim 2147483647, so a record needs 8589934592 bytes"),
        (struct.pack("<i", 3) + b"\0" * 8, r"a record needs 16 bytes, but the file has only 12"),
    ],
)
def test_fvecs_bad_first_record(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.fvecs"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        read_vecs(path)


def test_fvecs_record_too_large_for_numpy(tmp_path: Path) -> None:
    path = tmp_path / "x.fvecs"
    dim = 2**29  # 4 + 4 * 2**29 bytes per record, just over numpy's C-int dtype size limit
    with open(path, "wb") as f:
        f.write(struct.pack("<i", dim))
        f.truncate(4 + 4 * dim)  # sparse: no 2 GB actually written
    with pytest.raises(FormatError, match=r"at most 2147483647 bytes, but dim 536870912"):
        read_vecs(path)


def test_fbin_header_lying_about_n(tmp_path: Path) -> None:
    path = tmp_path / "x.fbin"
    path.write_bytes(struct.pack("<II", 5, 3) + np.zeros((4, 3), "<f4").tobytes())
    with pytest.raises(
        FormatError, match=r"header says n=5, dim=3 .* should be .* = 68 bytes, but it has 56"
    ):
        read_bin(path)


def test_fbin_with_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.u8bin"
    path.write_bytes(struct.pack("<II", 1, 3) + b"\1\2\3\4")
    with pytest.raises(FormatError, match=r"= 11 bytes, but it has 12 bytes"):
        read_bin(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\1\0\0\0", r"8-byte header .* has 4 bytes"),
        (struct.pack("<II", 3, 0), r"positive dim in the header, but found 0 \(n=3\)"),
        # n * dim * 4 overflows 32 and 64 bits; Python ints do not.
        (struct.pack("<II", 2**32 - 1, 2**32 - 1), r"should be .* bytes, but it has 8 bytes"),
    ],
)
def test_fbin_bad_header(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.fbin"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=message):
        read_bin(path)


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text("1 2 3\n")
    with pytest.raises(FormatError, match=r"one of the suffixes \.npy, .*but found suffix '\.txt'"):
        open_vectors(path)
    with pytest.raises(FormatError, match=r"but found '\.txt'"):
        read_vecs(path)
    with pytest.raises(FormatError, match=r"but found '\.txt'"):
        read_bin(path)


def test_npy_holding_pickled_objects_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.array([[1, "a"], [None, 2.0]], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match=r"numeric dtype, but found object .* pickled"):
        read_npy(path)


def test_plain_pickle_named_npy_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    path.write_bytes(pickle.dumps([[1.0, 2.0]]))
    with pytest.raises(FormatError, match=r"expected a \.npy file starting with"):
        read_npy(path)


def test_3d_npy_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(FormatError, match=r"expected a 2-D array, but found shape \(2, 3, 4\)"):
        read_npy(path)


@pytest.mark.parametrize("dtype", ["c8", "?", "U3", "f4,f4", "M8[s]"])
def test_non_numeric_npy_is_rejected(tmp_path: Path, dtype: str) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((2, 3), dtype=dtype))
    with pytest.raises(FormatError, match=r"expected an integer or floating-point dtype"):
        read_npy(path)


def test_truncated_npy(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((10, 4), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(FormatError, match=r"needing 288 bytes, but the file has only 287"):
        read_npy(path)


def test_npy_with_unknown_version(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros((1, 1), dtype=np.float32))
    raw = bytearray(path.read_bytes())
    raw[6] = 9
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match=r"version 1\.0, 2\.0 or 3\.0, but found 9\.0"):
        read_npy(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{'descr': os.system('x'), }", r"the \.npy header is malformed"),
        (b"{'descr': '<f4', 'shape': (1,", r"the \.npy header is malformed"),
        (
            b"{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2), }",
            r"non-negative dimensions, but found shape \(-1, 2\)",
        ),
    ],
)
def test_npy_with_garbage_header(tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "x.npy"
    header = header.ljust(117) + b"\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header)
    with pytest.raises(FormatError, match=message):
        read_npy(path)


@pytest.mark.parametrize("name", ["x.npy", "x.fvecs", "x.bvecs", "x.fbin", "x.ibin"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(FileNotFoundError, match=str(path).replace("\\", "\\\\")):
        open_vectors(path)


def test_dataset_argument_only_for_hdf5(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset='train' only applies to HDF5"):
        open_vectors(tmp_path / "x.fvecs", dataset="train")


# --- ids -------------------------------------------------------------------------------------


def test_read_ids_from_each_format(tmp_path: Path) -> None:
    ids = np.arange(10, 20, dtype=np.int64)
    np.save(tmp_path / "a.npy", ids)
    np.save(tmp_path / "b.npy", ids.astype(np.int32).reshape(-1, 1))
    write_vecs(tmp_path / "c.ivecs", ids.reshape(-1, 1))
    write_bin(tmp_path / "d.ibin", ids.reshape(-1, 1))
    for name in ["a.npy", "b.npy", "c.ivecs", "d.ibin"]:
        got = read_ids(tmp_path / name)
        assert isinstance(got, np.memmap), name
        assert got.shape == (10,), name
        assert got.dtype.kind == "i", name
        np.testing.assert_array_equal(got, ids)
        batches = [b for _, b in iter_batches(got, 4, dtype=np.int64)]
        assert all(b.dtype == np.int64 for b in batches)
        np.testing.assert_array_equal(np.concatenate(batches), ids)


def test_read_ids_rejects_bad_inputs(tmp_path: Path) -> None:
    write_vecs(tmp_path / "two.ivecs", np.zeros((3, 2), dtype=np.int32))
    with pytest.raises(FormatError, match=r"one id per row .* found shape \(3, 2\)"):
        read_ids(tmp_path / "two.ivecs")
    np.save(tmp_path / "float.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(FormatError, match=r"expected an integer dtype, but found float32"):
        read_ids(tmp_path / "float.npy")
    np.save(tmp_path / "3d.npy", np.zeros((3, 1, 1), dtype=np.int64))
    with pytest.raises(FormatError, match=r"expected a 1-D or 2-D array"):
        read_ids(tmp_path / "3d.npy")
    with pytest.raises(
        FormatError, match=r"suffix \.npy, \.ivecs or \.ibin, but found suffix '\.fvecs'"
    ):
        read_ids(tmp_path / "x.fvecs")


def test_iter_batches_refuses_to_wrap_ids(tmp_path: Path) -> None:
    np.save(tmp_path / "u.npy", np.array([1, 2**63 + 5], dtype=np.uint64))
    ids = read_ids(tmp_path / "u.npy")
    with pytest.raises(ValueError, match=r"rows 0\.\.1: expected values in .* found values in"):
        list(iter_batches(ids, 8, dtype=np.int64))
    with pytest.raises(ValueError, match=r"expected integer input"):
        list(iter_batches(np.zeros(3, dtype=np.float32), 2, dtype=np.int64))


# --- iter_batches ----------------------------------------------------------------------------


def test_iter_batches_covers_every_row_once(tmp_path: Path) -> None:
    x = _sample(np.dtype("u1"), n=10, dim=3)
    write_vecs(tmp_path / "x.bvecs", x)
    mapped = read_vecs(tmp_path / "x.bvecs")
    batches = list(iter_batches(mapped, 4))
    assert [start for start, _ in batches] == [0, 4, 8]
    assert [len(b) for _, b in batches] == [4, 4, 2]
    for _, batch in batches:
        assert batch.dtype == np.float32
        assert batch.flags.c_contiguous
        assert batch.flags.writeable
        assert not np.shares_memory(batch, mapped)
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), x.astype(np.float32))


def test_iter_batches_copies_even_when_no_conversion_is_needed() -> None:
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    batches = list(iter_batches(x, 6))
    assert len(batches) == 1
    assert not np.shares_memory(batches[0][1], x)
    np.testing.assert_array_equal(batches[0][1], x)


def test_iter_batches_validates_arguments() -> None:
    x = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, but got 0"):
        list(iter_batches(x, 0))
    with pytest.raises(TypeError, match=r"batch_size must be an integer, but got bool"):
        list(iter_batches(x, True))
    with pytest.raises(TypeError, match=r"batch_size must be an integer, but got float"):
        list(iter_batches(x, 2.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"1-D or 2-D array, but got shape \(1, 3, 2\)"):
        list(iter_batches(x[None], 2))


# --- writers ---------------------------------------------------------------------------------


def test_writers_reject_lossy_or_malformed_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"expected integer values for int32, but got float64"):
        write_vecs(tmp_path / "x.ivecs", np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"expected values in \[0, 255\] .* found values in"):
        write_vecs(tmp_path / "x.bvecs", np.array([[0, 300]]))
    with pytest.raises(ValueError, match=r"expected values in \[-128, 127\]"):
        write_bin(tmp_path / "x.i8bin", np.array([[-129, 0]]))
    with pytest.raises(ValueError, match=r"2-D array \(n, dim\), but got shape \(3,\)"):
        write_bin(tmp_path / "x.fbin", np.ones(3))
    with pytest.raises(ValueError, match=r"n >= 1 rows"):
        write_vecs(tmp_path / "x.fvecs", np.ones((0, 3)))
    with pytest.raises(ValueError, match=r"1 <= dim"):
        write_bin(tmp_path / "x.fbin", np.ones((3, 0)))
    with pytest.raises(ValueError, match=r"numeric values, but got dtype <U1"):
        write_bin(tmp_path / "x.fbin", np.array([["a"]]))
    with pytest.raises(FormatError, match=r"but found '\.npy'"):
        write_vecs(tmp_path / "x.npy", np.ones((1, 1)))
    with pytest.raises(FormatError, match=r"but found '\.fvecs'"):
        write_bin(tmp_path / "x.fvecs", np.ones((1, 1)))
    assert list(tmp_path.iterdir()) == []


# --- HDF5 ------------------------------------------------------------------------------------


def test_hdf5_without_h5py_raises_missing_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.hdf5"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)  # makes `import h5py` fail
    with pytest.raises(MissingDependencyError, match=r'pip install "diskivf\[hdf5\]"'):
        open_vectors(path)
    with pytest.raises(ImportError):  # also catchable as the builtin
        read_hdf5(path, "test")


def test_hdf5_ann_benchmarks_layout(tmp_path: Path) -> None:
    path = tmp_path / "glove.hdf5"
    if h5py is None:
        path.write_bytes(b"")
        with pytest.raises(MissingDependencyError, match=r"h5py"):
            open_vectors(path)
        return
    train = _sample(np.dtype("<f4"), n=9, dim=4)
    test = _sample(np.dtype("<f4"), n=2, dim=4, seed=1)
    neighbors = np.arange(6, dtype=np.int32).reshape(2, 3)
    with h5py.File(path, "w") as f:
        f["train"] = train
        f["test"] = test
        f["neighbors"] = neighbors
        f["distances"] = neighbors.astype(np.float32)
        f["cube"] = np.zeros((2, 2, 2), dtype=np.float32)
        f["names"] = np.array([[b"a"]])
        f.create_group("extra")

    ds: Any = open_vectors(path)
    assert isinstance(ds, h5py.Dataset)
    assert ds.shape == (9, 4)
    batches = list(iter_batches(ds, 4))
    assert [s for s, _ in batches] == [0, 4, 8]
    assert all(b.dtype == np.float32 and b.flags.c_contiguous for _, b in batches)
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), train)
    ds.file.close()

    ds = open_vectors(path, dataset="test")
    np.testing.assert_array_equal(ds[:], test)
    ds.file.close()
    ds = read_hdf5(path, "neighbors")
    assert ds.dtype == np.int32
    np.testing.assert_array_equal(ds[:], neighbors)
    ds.file.close()

    with pytest.raises(FormatError, match=r"dataset named 'base', but found only \['cube'"):
        read_hdf5(path, "base")
    with pytest.raises(FormatError, match=r"'extra' to be a dataset, but it is a group"):
        read_hdf5(path, "extra")
    with pytest.raises(FormatError, match=r"'cube' to be 2-D, but found shape \(2, 2, 2\)"):
        read_hdf5(path, "cube")
    with pytest.raises(FormatError, match=r"'names' to have an integer or floating-point"):
        read_hdf5(path, "names")

    not_hdf5 = tmp_path / "fake.h5"
    not_hdf5.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(FormatError, match=r"expected an HDF5 file, but h5py cannot open it"):
        open_vectors(not_hdf5)
    with pytest.raises(FileNotFoundError, match=r"missing\.h5"):
        open_vectors(tmp_path / "missing.h5")


# --- properties ------------------------------------------------------------------------------

_shapes = st.tuples(st.integers(1, 20), st.integers(1, 9))
_floats = st.floats(width=32, allow_nan=False)


def _check_round_trip(
    data: st.DataObject,
    shape: tuple[int, int],
    suffix: str,
    suffixes: Mapping[str, np.dtype[Any]],
    write: Callable[[str, Any], None],
    read: Callable[[str], Any],
) -> None:
    dtype = suffixes[suffix]
    elements = _floats if dtype.kind == "f" else None
    x = data.draw(hnp.arrays(dtype, shape, elements=elements))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"x{suffix}")
        write(path, x)
        got = read(path)
        assert got.shape == x.shape
        assert got.dtype == dtype
        np.testing.assert_array_equal(got, x)
        del got


@settings(max_examples=40, deadline=None)
@given(data=st.data(), shape=_shapes, suffix=st.sampled_from(sorted(VECS_SUFFIXES)))
def test_vecs_round_trip_property(data: st.DataObject, shape: tuple[int, int], suffix: str) -> None:
    _check_round_trip(data, shape, suffix, VECS_SUFFIXES, write_vecs, read_vecs)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(0, 20), st.integers(1, 9)),
    suffix=st.sampled_from(sorted(BIN_SUFFIXES)),
)
def test_bin_round_trip_property(data: st.DataObject, shape: tuple[int, int], suffix: str) -> None:
    _check_round_trip(data, shape, suffix, BIN_SUFFIXES, write_bin, read_bin)
