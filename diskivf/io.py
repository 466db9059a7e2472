"""Read (and, for fixtures, write) the vector files users hand to diskivf.

This module's single responsibility is turning a user's input file into a row-sliceable,
memory-mapped array without ever loading the whole file. Every reader validates the file's
header against its size before mapping it, because input files are untrusted: a lying header
must raise :class:`diskivf.errors.FormatError` (a ``ValueError``) naming the file, what was
expected and what was found, never an obscure ``mmap`` error or a silent short read.

Formats
-------
All multi-byte values in every format below are little-endian; readers use explicit dtypes
(``"<f4"``, ``"<i4"``) so results are correct on big-endian hosts too.

``.npy``
    NumPy's own format: magic ``b"\\x93NUMPY"``, version, header length, a Python-literal header
    (``descr``, ``fortran_order``, ``shape``), then the raw array. The dtype (including byte
    order) is in the header. Object (pickled) dtypes are rejected.
``.fvecs`` / ``.ivecs`` / ``.bvecs`` (TEXMEX, used by SIFT1M/GIST1M/BIGANN)
    No header. ``n`` records back to back, each an ``int32`` ``dim`` followed by ``dim``
    values: ``float32`` (``.fvecs``), ``int32`` (``.ivecs``) or ``uint8`` (``.bvecs``). A record
    is ``4 + dim * itemsize`` bytes, so ``n = file_size / record_size``; every record repeats
    the same ``dim``.
``.fbin`` / ``.u8bin`` / ``.i8bin`` / ``.ibin`` (big-ann-benchmarks)
    An 8-byte header ``uint32 n, uint32 dim``, then ``n * dim`` values in row-major order:
    ``float32``, ``uint8``, ``int8`` or ``int32`` respectively. The file is exactly
    ``8 + n * dim * itemsize`` bytes.
``.hdf5`` / ``.h5`` (ann-benchmarks)
    An HDF5 file with 2-D datasets ``train`` (base vectors), ``test`` (queries), ``neighbors``
    (``int32`` ground-truth ids) and ``distances``. Needs the optional ``h5py`` dependency
    (``pip install "diskivf[hdf5]"``), imported only when an HDF5 file is opened.

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> from diskivf.io import iter_batches, open_vectors, write_vecs
>>> with tempfile.TemporaryDirectory() as d:
...     path = os.path.join(d, "base.fvecs")
...     write_vecs(path, np.arange(6, dtype=np.float32).reshape(3, 2))
...     x = open_vectors(path)
...     print(x.shape, x.dtype)
...     print([(start, batch.shape) for start, batch in iter_batches(x, 2)])
...     del x
(3, 2) float32
[(0, (2, 2)), (2, (1, 2))]
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import mmap
import os
import secrets
import struct
import tokenize
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from diskivf.errors import FormatError, MissingDependencyError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "BIN_SUFFIXES",
    "HDF5_SUFFIXES",
    "VECS_SUFFIXES",
    "VectorSource",
    "iter_batches",
    "open_vectors",
    "read_bin",
    "read_hdf5",
    "read_ids",
    "read_npy",
    "read_vecs",
    "release_rows",
    "write_bin",
    "write_vecs",
]

Memmap: TypeAlias = "np.memmap[Any, np.dtype[Any]]"

#: Value dtype of each TEXMEX suffix.
VECS_SUFFIXES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
)
#: Value dtype of each big-ann-benchmarks suffix.
BIN_SUFFIXES: Mapping[str, np.dtype[Any]] = MappingProxyType(
    {
        ".fbin": np.dtype("<f4"),
        ".u8bin": np.dtype("u1"),
        ".i8bin": np.dtype("i1"),
        ".ibin": np.dtype("<i4"),
    }
)
HDF5_SUFFIXES: frozenset[str] = frozenset({".hdf5", ".h5"})

_NUMERIC_KINDS = "fiu"
_INTEGER_KINDS = "iu"
_BIN_HEADER = struct.Struct("<II")
_UINT32_MAX = 2**32 - 1
_INT32_MAX = 2**31 - 1
# Chunk size for the reads that validate or write files: large enough to stream at disk speed,
# small enough that validating a 100 GB file costs a few MB of memory.
_CHUNK_BYTES = 4 << 20


class VectorSource(Protocol):
    """What :func:`open_vectors` returns and :func:`iter_batches` accepts.

    NumPy arrays, read-only ``np.memmap`` objects and ``h5py.Dataset`` objects all qualify:
    they have a ``shape``, a ``dtype``, and return a NumPy array when sliced by rows.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def __getitem__(self, key: slice, /) -> Any: ...


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _suffix_dtype(path: str, table: Mapping[str, np.dtype[Any]]) -> tuple[str, np.dtype[Any]]:
    """Return ``path``'s suffix and its value dtype in ``table``, or raise ``FormatError``."""
    suffix = _suffix(path)
    if suffix not in table:
        raise FormatError(
            f"{path}: expected one of the suffixes {', '.join(table)}, but found {suffix!r}"
        )
    return suffix, table[suffix]


def _existing_file_size(path: str) -> int:
    """Return the size of ``path``, raising ``FileNotFoundError`` naming it if it is missing."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None


def _supported_suffixes() -> str:
    suffixes = [".npy", *VECS_SUFFIXES, *BIN_SUFFIXES, *sorted(HDF5_SUFFIXES)]
    return ", ".join(suffixes)


# np.memmap modes whose pages may be dropped from the process: read-only and shared maps,
# whose data stays in the page cache. Never "c" (copy-on-write): dropping its pages would
# discard the caller's private changes.
_RELEASABLE_MODES = ("r", "r+", "w+")


def _rows_within_stride(x: np.ndarray) -> bool:
    """Whether row ``i`` of ``x`` lies in bytes ``[i * strides[0], (i + 1) * strides[0])``."""
    if x.ndim == 0 or x.strides[0] <= 0:
        return False
    inner = x.itemsize
    for n, stride in zip(x.shape[1:], x.strides[1:], strict=True):
        if stride < 0:
            return False
        inner += (n - 1) * stride if n else 0
    return inner <= x.strides[0]


def release_rows(x: Any, start: int, stop: int) -> None:
    """Unmap rows ``start:stop`` of a memory-mapped array from this process, once consumed.

    A streaming consumer (``Index.add`` of a memmap larger than RAM) would otherwise keep
    every page it read mapped, and counted in its resident set, until the kernel needs the
    memory. The pages stay in the page cache; reading them again just faults them back in.
    Only whole pages inside the rows' bytes are released, only for read-only or shared
    :class:`numpy.memmap` arrays whose rows each lie within their row stride (C order, or a
    column view such as the vectors of an ``.fvecs`` file); anything else is left alone.
    """
    mm = getattr(x, "_mmap", None) if isinstance(x, np.memmap) else None
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if (
        not isinstance(mm, mmap.mmap)
        or advice is None
        or getattr(x, "mode", None) not in _RELEASABLE_MODES
        or not _rows_within_stride(x)
        or stop <= start
    ):
        return
    with contextlib.suppress(OSError, ValueError, TypeError):  # a closed or odd map: keep it
        base = np.frombuffer(mm, np.uint8).ctypes.data
        row = x.strides[0]
        lo = x.ctypes.data - base + start * row
        hi = x.ctypes.data - base + stop * row
        page = mmap.PAGESIZE
        first, last = -(-lo // page) * page, hi // page * page
        if 0 <= first < last <= len(mm):
            mm.madvise(advice, first, last - first)


def open_vectors(path: str | os.PathLike[str], *, dataset: str | None = None) -> VectorSource:
    """Open a file of vectors as a read-only, row-sliceable ``(n, dim)`` array.

    The reader is chosen by the file suffix (case-insensitive); see the module docstring for
    the byte layout of each format. Nothing is loaded into memory: slice rows, or use
    :func:`iter_batches`, to read them.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy``, ``.fvecs``, ``.bvecs``, ``.ivecs``, ``.fbin``, ``.u8bin``, ``.i8bin``,
        ``.ibin``, ``.hdf5`` or ``.h5`` file.
    dataset : str, optional
        For HDF5 files only: the dataset to open. Defaults to ``"train"`` (the base vectors
        in the ann-benchmarks layout); use ``"test"`` for its queries.

    Returns
    -------
    VectorSource
        A read-only ``np.memmap`` of shape ``(n, dim)`` with the file's own dtype, or an
        ``h5py.Dataset`` for HDF5 files. For TEXMEX files the memmap is a strided view that
        skips each row's ``dim`` prefix, so it is not C-contiguous.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    diskivf.errors.FormatError
        If the suffix is not one of the above, or the file is malformed (see the ``read_*``
        function for that format).
    diskivf.errors.MissingDependencyError
        If the file is HDF5 and ``h5py`` is not installed.
    ValueError
        If ``dataset`` is given for a file that is not HDF5.
    """
    p = os.fspath(path)
    suffix = _suffix(p)
    if suffix in HDF5_SUFFIXES:
        h5_dataset: VectorSource = read_hdf5(p, "train" if dataset is None else dataset)
        return h5_dataset
    if dataset is not None:
        raise ValueError(
            f"{p}: dataset={dataset!r} only applies to HDF5 files (.hdf5, .h5), "
            f"but the suffix is {suffix!r}"
        )
    if suffix == ".npy":
        return read_npy(p)
    if suffix in VECS_SUFFIXES:
        return read_vecs(p)
    if suffix in BIN_SUFFIXES:
        return read_bin(p)
    raise FormatError(
        f"{p}: expected a vector file with one of the suffixes {_supported_suffixes()}, "
        f"but found suffix {suffix!r}"
    )


def read_npy(path: str | os.PathLike[str]) -> Memmap:
    """Memory-map a 2-D numeric ``.npy`` file read-only.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file (format version 1.0, 2.0 or 3.0) holding a 2-D array of a signed or
        unsigned integer or floating-point dtype, in either byte order. A Fortran-order array
        is accepted, but its rows are scattered across the file, so reading it by rows is slow.

    Returns
    -------
    numpy.memmap
        Read-only, shape ``(n, dim)``, with the dtype recorded in the file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    diskivf.errors.FormatError
        If the file is not a ``.npy`` file, has an unsupported version or an oversized header,
        holds Python objects (pickles are never loaded), a non-numeric dtype or not exactly two
        dimensions, or is shorter than its header says.
    """
    return _read_npy(os.fspath(path), kinds=_NUMERIC_KINDS, ndims=(2,))


def _read_npy(path: str, *, kinds: str, ndims: tuple[int, ...]) -> Memmap:
    size = _existing_file_size(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError as exc:
            raise FormatError(
                f"{path}: expected a .npy file starting with b'\\x93NUMPY', but it does not ({exc})"
            ) from exc
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise FormatError(
                f"{path}: expected .npy format version 1.0, 2.0 or 3.0, "
                f"but found {version[0]}.{version[1]}"
            )
        # 3.0 differs from 2.0 only by a UTF-8 header, which matters only for non-ASCII
        # field names, and structured dtypes are rejected below anyway.
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        try:
            # Caps the header at numpy's default 10000 bytes before parsing it.
            shape, fortran_order, dtype = read_header(f)
        except (ValueError, SyntaxError, TypeError, tokenize.TokenError) as exc:
            raise FormatError(f"{path}: the .npy header is malformed ({exc})") from exc
        data_offset = f.tell()
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise FormatError(
            f"{path}: expected a numeric dtype, but found {dtype} which holds pickled Python "
            f"objects; diskivf never loads pickles"
        )
    if dtype.kind not in kinds:
        expected = "an integer" if kinds == _INTEGER_KINDS else "an integer or floating-point"
        raise FormatError(f"{path}: expected {expected} dtype, but found {dtype}")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in ndims:
        expected_nd = " or ".join(f"{nd}-D" for nd in ndims)
        raise FormatError(
            f"{path}: expected a {expected_nd} array, but found shape {shape} ({len(shape)}-D)"
        )
    if any(s < 0 for s in shape):
        raise FormatError(f"{path}: expected non-negative dimensions, but found shape {shape}")
    needed = data_offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size < needed:
        raise FormatError(
            f"{path}: the header describes a {shape} {dtype} array needing {needed} bytes, "
            f"but the file has only {size} bytes (truncated)"
        )
    return np.memmap(
        path,
        dtype=dtype,
        mode="r",
        offset=data_offset,
        shape=shape,
        order="F" if fortran_order else "C",
    )


def _vecs_record_dtype(value_dtype: np.dtype[Any], dim: int) -> np.dtype[Any]:
    return np.dtype([("dim", "<i4"), ("vec", value_dtype, (dim,))])


def _check_dims(path: str, record: np.dtype[Any], dim: int, n: int) -> None:
    """Raise ``FormatError`` naming the first of ``n`` records whose dim is not ``dim``.

    Reads the file in bounded chunks with ordinary reads rather than through a mapping, so the
    pages do not count towards this process's resident memory.
    """
    rows_per_chunk = max(1, _CHUNK_BYTES // record.itemsize)
    with open(path, "rb") as f:
        for start in range(0, n, rows_per_chunk):
            count = min(rows_per_chunk, n - start)
            dims = np.frombuffer(f.read(count * record.itemsize), dtype=record, count=count)["dim"]
            bad = np.flatnonzero(dims != dim)
            if bad.size:
                raise FormatError(
                    f"{path}: expected every record to have dim {dim} (the dim of row 0), "
                    f"but row {start + int(bad[0])} has dim {int(dims[bad[0]])}"
                )


def read_vecs(path: str | os.PathLike[str], *, verify_dims: bool = True) -> Memmap:
    """Memory-map a TEXMEX ``.fvecs``, ``.ivecs`` or ``.bvecs`` file read-only.

    The whole file is mapped as an array of ``(int32 dim, dim values)`` records and the
    ``dim`` column is sliced off, so the result is a strided view of the mapping: no copy.

    Parameters
    ----------
    path : str or os.PathLike
        The file; its suffix selects the value type (``float32``, ``int32`` or ``uint8``).
    verify_dims : bool, default True
        Check that every record repeats the dim of the first one. This reads the whole file
        once (in 4 MiB chunks, so memory stays bounded), which costs I/O time on very large
        files; with ``False`` only the first dim and the file size are checked, so a corrupt
        record can go unnoticed and yield garbage rows.

    Returns
    -------
    numpy.memmap
        Read-only, shape ``(n, dim)``, dtype ``<f4``, ``<i4`` or ``u1``; not C-contiguous.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    diskivf.errors.FormatError
        If the suffix is not a TEXMEX one, the file is empty or shorter than one record, the
        first dim is not positive or makes records over ``2**31 - 1`` bytes, the file size is not a whole number of records (truncated,
        or rows of different dims), or (with ``verify_dims``) a later record has another dim.
    """
    p = os.fspath(path)
    suffix, value_dtype = _suffix_dtype(p, VECS_SUFFIXES)
    size = _existing_file_size(p)
    if size < 4:
        raise FormatError(
            f"{p}: expected at least one {suffix} record (a 4-byte dim, then the values), "
            f"but the file has {size} bytes"
        )
    with open(p, "rb") as f:
        (dim,) = struct.unpack("<i", f.read(4))
    if dim <= 0:
        raise FormatError(f"{p}: expected a positive dim in the first record, but found {dim}")
    record_size = 4 + dim * value_dtype.itemsize
    if record_size > size:
        raise FormatError(
            f"{p}: the first record says dim {dim}, so a record needs {record_size} bytes, "
            f"but the file has only {size} bytes (truncated, or not a {suffix} file)"
        )
    if record_size > _INT32_MAX:
        # numpy dtypes (and so the record view) cannot be larger than a C int.
        raise FormatError(
            f"{p}: expected records of at most {_INT32_MAX} bytes, but dim {dim} in the first "
            f"record makes them {record_size} bytes"
        )
    record = _vecs_record_dtype(value_dtype, dim)
    n, remainder = divmod(size, record.itemsize)
    if remainder:
        # Tell "rows of different dims" from plain truncation when it is cheap to do so.
        _check_dims(p, record, dim, min(n, _CHUNK_BYTES // record.itemsize))
        raise FormatError(
            f"{p}: expected the file size to be a multiple of the record size "
            f"{record.itemsize} (4 + {dim} * {value_dtype.itemsize} bytes, dim {dim} from row 0), "
            f"but found {size} bytes = {n} records + {remainder} bytes; "
            f"the file is truncated or its rows have different dims"
        )
    if verify_dims:
        _check_dims(p, record, dim, n)
    records = np.memmap(p, dtype=record, mode="r", shape=(n,))
    # A field of a memmap is itself a memmap sharing the mapping (numpy propagates ``_mmap``).
    return cast("Memmap", records["vec"])


def read_bin(path: str | os.PathLike[str]) -> Memmap:
    """Memory-map a big-ann-benchmarks ``.fbin``, ``.u8bin``, ``.i8bin`` or ``.ibin`` file.

    Parameters
    ----------
    path : str or os.PathLike
        The file; its suffix selects the value type (``float32``, ``uint8``, ``int8`` or
        ``int32``).

    Returns
    -------
    numpy.memmap
        Read-only, C-contiguous, shape ``(n, dim)`` as given by the header. ``n`` may be 0.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    diskivf.errors.FormatError
        If the suffix is not one of the above, the file is shorter than the 8-byte header, the
        header's dim is 0, or the file size is not exactly ``8 + n * dim * itemsize``.
    """
    p = os.fspath(path)
    _, dtype = _suffix_dtype(p, BIN_SUFFIXES)
    size = _existing_file_size(p)
    if size < _BIN_HEADER.size:
        raise FormatError(
            f"{p}: expected an 8-byte header (uint32 n, uint32 dim), but the file has {size} bytes"
        )
    with open(p, "rb") as f:
        n, dim = _BIN_HEADER.unpack(f.read(_BIN_HEADER.size))
    if dim == 0:
        raise FormatError(f"{p}: expected a positive dim in the header, but found 0 (n={n})")
    expected = _BIN_HEADER.size + n * dim * dtype.itemsize
    if size != expected:
        raise FormatError(
            f"{p}: the header says n={n}, dim={dim} ({dtype}), so the file should be "
            f"8 + {n} * {dim} * {dtype.itemsize} = {expected} bytes, but it has {size} bytes"
        )
    return np.memmap(p, dtype=dtype, mode="r", offset=_BIN_HEADER.size, shape=(n, dim))


def _import_h5py() -> Any:
    try:
        return importlib.import_module("h5py")
    except ImportError as exc:
        raise MissingDependencyError(
            'reading HDF5 files needs h5py, which is not installed; run: pip install "diskivf[hdf5]"'
        ) from exc


def read_hdf5(path: str | os.PathLike[str], dataset: str = "train") -> Any:
    """Open one 2-D dataset of an HDF5 file (ann-benchmarks layout) read-only.

    ``h5py`` is imported here, not when :mod:`diskivf.io` is imported.

    Parameters
    ----------
    path : str or os.PathLike
        The HDF5 file.
    dataset : str, default "train"
        Name (or path inside the file) of the dataset: in ann-benchmarks files ``"train"`` holds
        the base vectors, ``"test"`` the queries, ``"neighbors"`` the ground-truth ids and
        ``"distances"`` their distances.

    Returns
    -------
    h5py.Dataset
        Read lazily: slicing it reads only those rows. The file stays open as long as the
        dataset is referenced; call ``ds.file.close()`` to release it sooner.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    diskivf.errors.MissingDependencyError
        If ``h5py`` is not installed.
    diskivf.errors.FormatError
        If the file is not HDF5, has no such dataset (the message lists the top-level names),
        the name refers to a group, or the dataset is not 2-D with an integer or
        floating-point dtype.
    """
    h5py = _import_h5py()
    p = os.fspath(path)
    _existing_file_size(p)
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise FormatError(f"{p}: expected an HDF5 file, but h5py cannot open it ({exc})") from exc
    try:
        return _checked_hdf5_dataset(h5py, f, p, dataset)
    except BaseException:
        f.close()
        raise


def _checked_hdf5_dataset(h5py: Any, f: Any, path: str, dataset: str) -> Any:
    obj = f.get(dataset)
    if obj is None:
        raise FormatError(
            f"{path}: expected a dataset named {dataset!r}, but found only {sorted(f.keys())}"
        )
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(f"{path}: expected {dataset!r} to be a dataset, but it is a group")
    if obj.ndim != 2:
        raise FormatError(
            f"{path}: expected dataset {dataset!r} to be 2-D, but found shape {obj.shape}"
        )
    if obj.dtype.kind not in _NUMERIC_KINDS:
        raise FormatError(
            f"{path}: expected dataset {dataset!r} to have an integer or floating-point dtype, "
            f"but found {obj.dtype}"
        )
    return obj


def read_ids(path: str | os.PathLike[str]) -> Memmap:
    """Memory-map a file of integer ids as a read-only 1-D array.

    The ids keep the file's integer dtype (for example ``int32`` from ``.ivecs``); nothing is
    cast here, because casting would load the whole file. Convert in bounded batches instead,
    e.g. ``for start, batch in iter_batches(ids, 65536, dtype=np.int64)``, which also rejects
    values that do not fit.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.npy`` file holding a 1-D integer array or a 2-D one with a single column, an
        ``.ivecs`` file whose records all have dim 1, or an ``.ibin`` file with dim 1.

    Returns
    -------
    numpy.memmap
        Read-only, shape ``(n,)``, integer dtype. For ``.ivecs``, 2-D ``.npy`` and ``.ibin``
        inputs it is a (possibly strided) view of the mapping.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    diskivf.errors.FormatError
        If the suffix is not ``.npy``, ``.ivecs`` or ``.ibin``, the file is malformed (see
        :func:`read_npy`, :func:`read_vecs`, :func:`read_bin`), the dtype is not an integer one,
        or there is more than one id per row.
    """
    p = os.fspath(path)
    suffix = _suffix(p)
    readers: dict[str, Callable[[str], Memmap]] = {
        ".npy": lambda q: _read_npy(q, kinds=_INTEGER_KINDS, ndims=(1, 2)),
        ".ivecs": read_vecs,
        ".ibin": read_bin,
    }
    if suffix not in readers:
        raise FormatError(
            f"{p}: expected an ids file with suffix .npy, .ivecs or .ibin, "
            f"but found suffix {suffix!r}"
        )
    ids = readers[suffix](p)
    if ids.ndim == 2:
        if ids.shape[1] != 1:
            raise FormatError(
                f"{p}: expected one id per row (shape (n,) or (n, 1)), but found shape {ids.shape}"
            )
        return cast("Memmap", ids[:, 0])
    return ids


def _out_of_range(arr: np.ndarray[Any, Any], target: np.dtype[Any]) -> tuple[str, str] | None:
    """``(target's range, arr's range)`` as ``"[lo, hi]"`` texts if integer ``arr`` holds values
    that do not fit integer ``target``, else None."""
    if arr.size == 0 or np.can_cast(arr.dtype, target):
        return None
    info = np.iinfo(target)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < info.min or hi > info.max:
        return f"[{info.min}, {info.max}]", f"[{lo}, {hi}]"
    return None


def _check_batch_cast(rows: np.ndarray[Any, Any], target: np.dtype[Any], start: int) -> None:
    """Refuse integer conversions that would silently wrap around or truncate."""
    if target.kind not in _INTEGER_KINDS:
        return
    if rows.dtype.kind not in _INTEGER_KINDS + "b":
        raise ValueError(f"expected integer input to convert to {target}, but got {rows.dtype}")
    bad = _out_of_range(rows, target)
    if bad is not None:
        raise ValueError(
            f"rows {start}..{start + len(rows) - 1}: expected values in {bad[0]} "
            f"to convert to {target}, but found values in {bad[1]}"
        )


def iter_batches(
    x: VectorSource, batch_size: int, *, dtype: npt.DTypeLike = np.float32
) -> Iterator[tuple[int, np.ndarray[Any, Any]]]:
    """Yield consecutive row batches of ``x`` as fresh C-contiguous arrays.

    Memory stays bounded by ``batch_size`` rows however large ``x`` is, because only one
    batch is materialised at a time (the mapping's pages stay in the reclaimable page cache).

    Parameters
    ----------
    x : VectorSource
        A 1-D or 2-D numpy array, ``np.memmap`` or ``h5py.Dataset``.
    batch_size : int
        Rows per batch (the last batch may be shorter). Larger batches amortise per-call
        overhead; smaller ones bound memory more tightly.
    dtype : data-type, default numpy.float32
        Dtype of the yielded batches, in native byte order. Integer targets (for ids) accept
        only integer input and raise rather than wrap around on out-of-range values.

    Yields
    ------
    start : int
        Index of the batch's first row in ``x``.
    batch : numpy.ndarray
        A writable copy of ``x[start:start + batch_size]``, never a view of ``x``.

    Raises
    ------
    TypeError
        If ``batch_size`` is not an integer.
    ValueError
        If ``batch_size < 1``, ``x`` is not 1-D or 2-D, or (integer ``dtype``) a batch is not
        integer or holds values outside the target range.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an integer, but got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, but got {batch_size}")
    shape = tuple(x.shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"expected a 1-D or 2-D array, but got shape {shape}")
    target = np.dtype(dtype).newbyteorder("=")
    n = int(shape[0])
    # A numpy slice is a view of x (possibly of a read-only mapping), so it must be copied;
    # other sources (h5py) already return a fresh array, so only convert if needed.
    copy_needed = isinstance(x, np.ndarray)
    for start in range(0, n, int(batch_size)):
        rows = np.asarray(x[start : start + int(batch_size)])
        _check_batch_cast(rows, target, start)
        if copy_needed:
            batch = np.array(rows, dtype=target, order="C", copy=True)
        else:
            batch = np.ascontiguousarray(rows, dtype=target)
        yield start, batch


def _as_2d_for_writing(path: str, x: npt.ArrayLike, target: np.dtype[Any]) -> np.ndarray[Any, Any]:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D array (n, dim), but got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{path}: expected numeric values, but got dtype {arr.dtype}")
    if target.kind in _INTEGER_KINDS:
        if arr.dtype.kind == "f":
            raise ValueError(
                f"{path}: expected integer values for {target}, but got {arr.dtype}; "
                f"round and cast explicitly"
            )
        bad = _out_of_range(arr, target)
        if bad is not None:
            raise ValueError(
                f"{path}: expected values in {bad[0]} for {target}, but found values in {bad[1]}"
            )
    return arr


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[IO[bytes]]:
    """Write to a temporary file beside ``path``, then rename it over ``path``.

    Renaming instead of truncating means a process that still has the old file mapped keeps
    seeing the old bytes rather than zeros or SIGBUS.
    """
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _write_chunked(
    path: str,
    arr: np.ndarray[Any, Any],
    row_bytes: int,
    encode: Callable[[np.ndarray[Any, Any]], bytes],
    *,
    header: bytes = b"",
) -> None:
    """Atomically write ``header``, then ``encode(rows)`` for bounded chunks of ``arr``'s rows."""
    rows_per_chunk = max(1, _CHUNK_BYTES // row_bytes)
    with _atomic_output(path) as f:
        f.write(header)
        for start in range(0, len(arr), rows_per_chunk):
            f.write(encode(arr[start : start + rows_per_chunk]))


def write_vecs(path: str | os.PathLike[str], x: npt.ArrayLike) -> None:
    """Write a 2-D array as a TEXMEX ``.fvecs``, ``.ivecs`` or ``.bvecs`` file.

    Meant for test fixtures, query sets and ground-truth files: ``x`` must fit in memory, but
    the file is written in bounded chunks. The file appears atomically (temp file + rename),
    and is not fsynced.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its suffix selects the value type (``float32``, ``int32``, ``uint8``).
        An existing file is replaced.
    x : array_like
        Shape ``(n, dim)`` with ``n >= 1`` (an empty file could not record ``dim``) and
        ``dim >= 1``. Any byte order; values are written little-endian.

    Raises
    ------
    diskivf.errors.FormatError
        If the suffix is not ``.fvecs``, ``.ivecs`` or ``.bvecs``.
    ValueError
        If ``x`` is not 2-D and numeric, ``n`` or ``dim`` is 0, a record would exceed
        ``2**31 - 1`` bytes, or values do not fit an integer target (floats are never rounded silently).
    """
    p = os.fspath(path)
    _, value_dtype = _suffix_dtype(p, VECS_SUFFIXES)
    arr = _as_2d_for_writing(p, x, value_dtype)
    n, dim = arr.shape
    max_dim = (_INT32_MAX - 4) // value_dtype.itemsize  # numpy's record size limit
    if n == 0 or dim == 0 or dim > max_dim:
        raise ValueError(
            f"{p}: expected n >= 1 rows and 1 <= dim <= {max_dim}, but got shape {arr.shape}"
        )
    record = _vecs_record_dtype(value_dtype, dim)

    def encode(part: np.ndarray[Any, Any]) -> bytes:
        chunk = np.empty(len(part), dtype=record)
        chunk["dim"] = dim
        chunk["vec"] = part
        return chunk.tobytes()

    _write_chunked(p, arr, record.itemsize, encode)


def write_bin(path: str | os.PathLike[str], x: npt.ArrayLike) -> None:
    """Write a 2-D array as a big-ann-benchmarks ``.fbin``, ``.u8bin``, ``.i8bin`` or ``.ibin``.

    Meant for test fixtures, query sets and ground-truth files: ``x`` must fit in memory, but
    the file is written in bounded chunks. The file appears atomically (temp file + rename),
    and is not fsynced.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; its suffix selects the value type. An existing file is replaced.
    x : array_like
        Shape ``(n, dim)`` with ``n >= 0`` and ``dim >= 1``, both below ``2**32``. Any byte
        order; values are written little-endian.

    Raises
    ------
    diskivf.errors.FormatError
        If the suffix is not one of the four above.
    ValueError
        If ``x`` is not 2-D and numeric, ``dim`` is 0, ``n`` or ``dim`` does not fit a uint32,
        or values do not fit an integer target (floats are never rounded silently).
    """
    p = os.fspath(path)
    _, dtype = _suffix_dtype(p, BIN_SUFFIXES)
    arr = _as_2d_for_writing(p, x, dtype)
    n, dim = arr.shape
    if dim == 0 or n > _UINT32_MAX or dim > _UINT32_MAX:
        raise ValueError(
            f"{p}: expected n <= {_UINT32_MAX} and 1 <= dim <= {_UINT32_MAX}, "
            f"but got shape {arr.shape}"
        )
    _write_chunked(
        p,
        arr,
        dim * dtype.itemsize,
        lambda part: np.ascontiguousarray(part, dtype=dtype).tobytes(),
        header=_BIN_HEADER.pack(n, dim),
    )
