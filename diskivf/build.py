"""Offline build jobs: train and fill an index from a big input file with bounded memory.

:func:`build` is what ``diskivf build`` runs. It streams the input (any format
:func:`diskivf.io.open_vectors` reads, as a memory map) in batches, commits after every batch,
and can resume a killed build from its last commit.

How a resumed build knows where to continue
-------------------------------------------
A build adds input rows in order and never removes any, and every batch is one atomic commit
(one :meth:`diskivf.Index.add` call). So the committed row count ``ntotal`` of the index *is*
the number of input rows done: rows ``0 .. ntotal - 1`` are in the index and the build continues
at row ``ntotal``. Before continuing, :func:`build` checks that the index and the input agree:

* same ``dim``, ``nlist``, ``metric``, dtype (and ``nprobe`` if given), and the training
  ``seed`` and sample size recorded in the index;
* ``ntotal <= n`` (the input is not shorter than what was committed);
* the commit record's ``next_id`` (one past the largest id ever added) equals ``ntotal`` with
  default ids (ids are row numbers), or ``max(ids[:ntotal]) + 1`` with an ids file;
* the last committed input row is stored, with its id, in one of its two nearest lists.

A mismatch raises ``ValueError`` instead of silently mixing two inputs.

Why the result equals an uninterrupted build
--------------------------------------------
The training sample depends only on ``(n, train_size, seed)`` and k-means is seeded, so a build
that was killed before its training finished retrains to the same centroids. Each list's files
hold its rows in input order whatever the batch boundaries are, and an interrupted batch only
left bytes past the committed prefix, which the next append overwrites with the same rows. The
list files therefore end byte-identical and searches return identical results; only the index
uuid and the commit ``generation`` (one per batch) differ.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from diskivf import format as fmt
from diskivf.errors import IndexExistsError
from diskivf.index import Index, open_index
from diskivf.io import VectorSource, open_vectors, read_ids, release_rows
from diskivf.segments import ListReader

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "BuildReport",
    "ProgressArg",
    "build",
    "sample_rows",
    "train_index",
]

DEFAULT_BATCH_SIZE: Final = 65536
#: Training points per list when ``train_size`` is not given (FAISS's max_points_per_centroid).
POINTS_PER_LIST: Final = 256
# Rows gathered per step while reading the training sample: bounds the transient copy.
_SAMPLE_CHUNK: Final = 65536
# Input bytes spanned by one gather of training rows; the mapped pages are dropped after each.
_SAMPLE_WINDOW_BYTES: Final = 32 << 20
_ID_CHUNK: Final = 1 << 20
_DTYPES: Final = {"float32": "<f4", "float16": "<f2"}

ProgressFn = Callable[[int, int], None]
#: ``False``: silent. ``True``: bars on stderr when it is a terminal. ``"always"``: bars even
#: when it is not. A callable receives ``(rows_done, rows_total)`` after every commit.
ProgressArg = bool | Literal["always"] | ProgressFn
PathOrSource = str | os.PathLike[str] | VectorSource


@dataclass(frozen=True)
class BuildReport:
    """What one :func:`build` call did.

    Attributes
    ----------
    path : str
        The index directory.
    n, dim : int
        Input rows and dimension.
    nlist : int
        Lists of the index.
    rows_before : int
        Rows already committed when the call started (non-zero only when resuming).
    rows_added : int
        Rows this call added; ``rows_before + rows_added == n`` on success.
    commits : int
        Batches committed by this call.
    trained : bool
        Whether this call trained the centroids (False when resuming a trained index).
    train_size : int
        Training sample size.
    generation : int
        Commit generation of the index at the end.
    train_s, add_s : float
        Seconds spent sampling plus training, and adding.
    """

    path: str
    n: int
    dim: int
    nlist: int
    rows_before: int
    rows_added: int
    commits: int
    trained: bool
    train_size: int
    generation: int
    train_s: float
    add_s: float

    def summary(self) -> str:
        """One line for humans: what was built, from where, how fast."""
        rate = self.rows_added / self.add_s if self.add_s > 0 else 0.0
        resumed = f", resumed at row {self.rows_before:,}" if self.rows_before else ""
        train = f"train {self.train_s:.2f} s, " if self.trained else ""
        return (
            f"built {self.path}: {self.n:,} x {self.dim} vectors in {self.nlist} lists"
            f"{resumed} ({train}add {self.add_s:.2f} s, {rate:,.0f} vec/s, "
            f"{self.commits} commit{'' if self.commits == 1 else 's'}, "
            f"generation {self.generation})"
        )


@dataclass(frozen=True)
class _Spec:
    """A build's validated parameters: what the output index is created with, and what a
    resumed index must have been built with."""

    dim: int
    nlist: int
    metric: str
    dtype: str
    nprobe: int | None
    seed: int
    train_size: int


def sample_rows(n: int, m: int, seed: int) -> NDArray[np.int64]:
    """``m`` distinct row numbers in ``[0, n)``, drawn uniformly, sorted ascending.

    Memory is ``O(m)`` whatever ``n`` is (``numpy``'s ``choice(replace=False)`` may build a
    permutation of all ``n`` rows). Deterministic for ``(n, m, seed)``.

    Parameters
    ----------
    n
        Population size.
    m
        Sample size; ``m >= n`` returns every row.
    seed
        Any integer (negative ones included).

    Returns
    -------
    ndarray of int64
        Sorted row numbers, so that a memory map is read in one forward pass.

    Raises
    ------
    ValueError
        ``n`` or ``m`` is negative.

    Examples
    --------
    >>> sample_rows(10, 3, seed=0).tolist() == sample_rows(10, 3, seed=0).tolist()
    True
    >>> len(set(sample_rows(1000, 100, seed=1).tolist()))
    100
    """
    if n < 0 or m < 0:
        raise ValueError(f"expected n >= 0 and m >= 0 but got n={n}, m={m}")
    if m >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed % (1 << 128))
    if 2 * m > n:  # dense: a permutation of n < 2m rows is O(m)
        return np.sort(rng.permutation(n)[:m]).astype(np.int64)
    # Draw with replacement until m distinct rows are found, then keep a uniform m-subset of
    # them. By symmetry every m-subset of [0, n) is equally likely.
    picked = np.empty(0, np.int64)
    while len(picked) < m:
        need = m - len(picked)
        picked = np.union1d(picked, rng.integers(0, n, size=need + need // 8 + 16))
    if len(picked) > m:
        picked = picked[np.sort(rng.choice(len(picked), size=m, replace=False))]
    return picked.astype(np.int64)


def _drop_pages(x: Any) -> None:
    """Unmap the resident pages of a read-only file mapping from this process.

    Pages of a shared file mapping that were read stay mapped, and count in the resident set
    size, until the kernel needs the memory. Dropping them after each batch keeps the RSS of a
    streaming build flat; the data stays in the page cache, and a later access simply faults
    it in again. A no-op for anything but a numpy memmap (h5py reads through its own cache).
    """
    if isinstance(x, np.memmap):
        release_rows(x, 0, x.shape[0])


def _open_input(source: PathOrSource, dataset: str | None) -> tuple[VectorSource, str]:
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        return open_vectors(name, dataset=dataset), name
    if dataset is not None:
        raise ValueError("dataset applies only when the input is a file path")
    return source, f"<{type(source).__name__}>"


def _open_ids(ids: PathOrSource | None, n: int) -> tuple[Any, str] | None:
    if ids is None:
        return None
    if isinstance(ids, str | os.PathLike):
        arr: Any = read_ids(ids)
        name = os.fspath(ids)
    else:
        arr, name = ids, f"<{type(ids).__name__}>"
    shape = tuple(arr.shape)
    if len(shape) != 1 or shape[0] != n:
        raise ValueError(f"{name}: expected {n} ids (one per input row) but got shape {shape}")
    if np.dtype(arr.dtype).kind not in "iu":
        raise ValueError(f"{name}: expected integer ids but got dtype {arr.dtype}")
    return arr, name


def _check_all_ids(ids: Any, name: str) -> None:
    """Check every id as :func:`_id_batch` will, reading ``_ID_CHUNK`` ids at a time.

    Run before the output is created: a bad id found only when its batch comes up would leave
    a trained, partly filled index that a plain retry refuses to overwrite.

    Raises
    ------
    ValueError
        An id is negative or does not fit int64 (the message names its row).
    """
    n = int(ids.shape[0])
    for a in range(0, n, _ID_CHUNK):
        _id_batch(ids, name, a, min(n, a + _ID_CHUNK))
        _drop_pages(ids)


def _id_batch(ids: Any, name: str, a: int, b: int) -> NDArray[np.int64]:
    raw = np.asarray(ids[a:b])
    if raw.size and raw.dtype.kind == "u" and int(raw.max()) > np.iinfo(np.int64).max:
        bad = a + int(np.argmax(raw))
        raise ValueError(f"{name}: id {int(raw.max())} at row {bad} does not fit int64")
    out = raw.astype(np.int64)
    if out.size and int(out.min()) < 0:
        bad = a + int(np.flatnonzero(out < 0)[0])
        raise ValueError(f"{name}: expected non-negative ids but row {bad} has id {out[bad - a]}")
    return out


def _check_rows(xb: NDArray[np.float32], metric: str, name: str, a: int) -> None:
    """Reject bad rows with their absolute row number (Index.add would count from the batch)."""
    finite = np.isfinite(xb).all(axis=1)
    if not finite.all():
        raise ValueError(
            f"{name}: row {a + int(np.flatnonzero(~finite)[0])} contains NaN or infinity "
            "(after conversion to float32)"
        )
    if metric == "cosine":
        zero = np.flatnonzero(~np.any(xb, axis=1))
        if zero.size:
            raise ValueError(
                f"{name}: row {a + int(zero[0])} is a zero vector, which the cosine metric "
                "cannot index"
            )


def _bars(progress: ProgressArg) -> bool:
    """Whether progress bars are drawn (a callable gets its own calls instead)."""
    return progress == "always" or (progress is True and sys.stderr.isatty())


def _progress(progress: ProgressArg, label: str) -> ProgressFn | None:
    if not _bars(progress):
        return None
    from diskivf.progress import bar

    return bar(label, force=progress == "always")


def _sample_chunks(rows: NDArray[np.int64], window: int, chunk: int) -> list[tuple[int, int]]:
    """Split sorted ``rows`` into ``[a, b)`` runs that each lie in one ``window`` of input rows
    and hold at most ``chunk`` rows."""
    if not len(rows):
        return []
    top = int(rows[-1]) + 1
    cuts = np.searchsorted(rows, np.arange(0, top + window, window)).tolist()
    out = []
    for lo, hi in itertools.pairwise(cuts):
        out += [(a, min(hi, a + chunk)) for a in range(lo, hi, chunk)]
    return out


def _read_sample(
    x: VectorSource, name: str, rows: NDArray[np.int64], report: ProgressFn | None
) -> NDArray[np.float32]:
    """Gather ``x[rows]`` (sorted) as float32 with bounded memory.

    Rows are gathered one window of the input at a time and the window's mapped pages dropped
    afterwards: the kernel maps pages around each one read (fault-around), so a sparse gather
    over the whole file at once would map most of it.
    """
    dim = int(x.shape[1])
    out = np.empty((len(rows), dim), np.float32)
    rowbytes = max(1, dim * np.dtype(x.dtype).itemsize)
    window = max(1, _SAMPLE_WINDOW_BYTES // rowbytes)
    dense = len(rows) == int(x.shape[0])
    if report is not None:
        report(0, len(rows))  # start the clock before the first chunk, so the rate is honest
    for a, b in _sample_chunks(rows, window, _SAMPLE_CHUNK):
        # Contiguous slices when every row is taken; otherwise a sorted gather, which reads
        # only the pages holding chosen rows (h5py also accepts increasing index lists).
        part = x[a:b] if dense else x[rows[a:b]]  # type: ignore[index]
        with np.errstate(over="ignore"):  # out-of-range values become inf, reported below
            out[a:b] = np.asarray(part, dtype=np.float32)
        del part
        finite = np.isfinite(out[a:b]).all(axis=1)
        if not finite.all():
            row = int(rows[a + int(np.flatnonzero(~finite)[0])])
            raise ValueError(
                f"{name}: row {row} contains NaN or infinity (after conversion to float32)"
            )
        _drop_pages(x)
        if report is not None:
            report(b, len(rows))
    if report is not None:
        report(-1, len(rows))
    return out


def _check_existing(index: Index, spec: _Spec) -> None:
    meta = index.metadata
    want = {
        "dim": spec.dim,
        "nlist": spec.nlist,
        "metric": spec.metric,
        "dtype": _DTYPES[spec.dtype],
    }
    have = {"dim": meta.dim, "nlist": meta.nlist, "metric": meta.metric, "dtype": meta.vector_dtype}
    if spec.nprobe is not None:
        # Stored capped at nlist (diskivf.open does so), like every nprobe above nlist.
        want["nprobe"], have["nprobe"] = min(spec.nprobe, spec.nlist), meta.nprobe
    if meta.training is not None:
        want["seed"], have["seed"] = spec.seed, meta.training.seed
        want["train_size"], have["train_size"] = spec.train_size, meta.training.npoints
    diff = [f"{k}={have[k]!r} (this build: {want[k]!r})" for k in want if want[k] != have[k]]
    if diff:
        raise ValueError(
            f"cannot resume {str(index.path)!r}: it was built with "
            + ", ".join(diff)
            + "; resume with the original parameters, or build into a new directory"
        )


def _max_id(ids: Any, stop: int) -> int:
    best = -1
    for a in range(0, stop, _ID_CHUNK):
        part = np.asarray(ids[a : min(stop, a + _ID_CHUNK)])
        if part.size:
            best = max(best, int(part.max()))
        _drop_pages(ids)
    return best


def _check_resume_point(
    index: Index,
    x: VectorSource,
    xname: str,
    ids: tuple[Any, str] | None,
    done: int,
) -> None:
    """Check that the committed rows are this input's first ``done`` rows (see module doc)."""
    where = str(index.path)
    if done == 0:
        return
    meta = index.metadata
    rec = fmt.read_commit(index.path, meta.nlist, meta.index_uuid)
    expect = done if ids is None else _max_id(ids[0], done) + 1
    if rec.next_id != expect:
        source = "row numbers" if ids is None else f"the ids in {ids[1]}"
        raise ValueError(
            f"cannot resume {where!r}: its largest id is {rec.next_id - 1} but {source} give "
            f"{expect - 1} for the {done:,} committed rows; was it built with other ids?"
        )
    row = done - 1
    want_id = row if ids is None else int(np.asarray(ids[0][row : row + 1])[0])
    v = np.asarray(x[row : row + 1], dtype=np.float32)
    if meta.metric == "cosine":
        v = v / np.float32(max(float(np.linalg.norm(v)), 1e-30))
    # Compare with a tolerance: the stored row went through the index's own normalisation and
    # dtype rounding, which may differ from ours in the last bits.
    want = v[0].astype(meta.vector_dtype).astype(np.float32)
    atol = 1e-3 * max(1.0, float(np.abs(want).max(initial=0.0)))
    c = index.centroids
    score = ((c - v) ** 2).sum(axis=1) if meta.metric == "l2" else -(c @ v[0])
    reader = ListReader(index.path, meta.dim, meta.vector_dtype)
    # The two nearest lists: a near-tie may round either way between two implementations.
    for list_id in np.argsort(score, kind="stable")[:2].tolist():
        view = reader.get(list_id, int(rec.list_counts[list_id]), int(rec.list_gens[list_id]))
        if view is None:
            continue
        hits = np.flatnonzero(view.ids == want_id)
        for h in hits.tolist():
            if np.allclose(np.asarray(view.vectors[h], np.float32), want, rtol=1e-3, atol=atol):
                return
    raise ValueError(
        f"cannot resume {where!r}: row {row} of {xname} (id {want_id}) is not in the index "
        "although the index holds that many rows; it was built from another input"
    )


def _check_params(
    x: VectorSource,
    xname: str,
    *,
    nlist: int,
    metric: str,
    dtype: str,
    batch_size: int,
    train_size: int | None,
) -> tuple[int, int, int]:
    """Validate build parameters against the input's header; return ``(n, dim, train_size)``.

    Shared (through :func:`_open_job`) by :func:`build` and
    :func:`diskivf.parallel.build_parallel`, so that both accept and reject exactly the same
    parameters.
    """
    if metric not in fmt.METRICS:
        raise ValueError(f"expected metric to be one of {list(fmt.METRICS)} but got {metric!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"expected dtype to be one of {list(_DTYPES)} but got {dtype!r}")
    shape = tuple(x.shape)
    if len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"{xname}: expected a 2-D (n, dim) input but got shape {shape}")
    n, dim = int(shape[0]), int(shape[1])
    if isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1:
        raise ValueError(f"expected nlist to be a positive integer but got {nlist!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected batch_size to be a positive integer but got {batch_size!r}")
    m = min(n, POINTS_PER_LIST * nlist) if train_size is None else min(n, int(train_size))
    if n < nlist:
        raise ValueError(f"{xname} has {n} rows, fewer than nlist={nlist}: use a smaller nlist")
    if m < nlist:
        raise ValueError(f"expected train_size >= nlist={nlist} but got {train_size}")
    return n, dim, m


def _open_job(
    input: PathOrSource,
    ids: PathOrSource | None,
    *,
    dataset: str | None,
    nlist: int,
    metric: str,
    dtype: str,
    nprobe: int | None,
    seed: int,
    batch_size: int,
    train_size: int | None,
) -> tuple[VectorSource, str, int, tuple[Any, str] | None, _Spec]:
    """Open and validate a build's input and ids; return ``(x, xname, n, id_src, spec)``.

    The first step of :func:`build` and :func:`diskivf.parallel.build_parallel`, before the
    output exists: every id is read and checked here, once, in bounded chunks.
    """
    x, xname = _open_input(input, dataset)
    n, dim, m = _check_params(
        x,
        xname,
        nlist=nlist,
        metric=metric,
        dtype=dtype,
        batch_size=batch_size,
        train_size=train_size,
    )
    id_src = _open_ids(ids, n)
    if id_src is not None:
        _check_all_ids(*id_src)
    return x, xname, n, id_src, _Spec(dim, nlist, metric, dtype, nprobe, seed, m)


def _open_output(path: Path, spec: _Spec, *, resume: bool, durable: bool) -> Index:
    """Create the output index, or open it for writing when resuming."""
    creation: dict[str, Any] = {
        "dim": spec.dim,
        "nlist": spec.nlist,
        "metric": spec.metric,
        "dtype": spec.dtype,
        "nprobe": spec.nprobe,
    }
    is_index = (path / fmt.META_NAME).is_file()
    if is_index and not resume:
        raise IndexExistsError(
            f"{str(path)!r} already holds an index; pass --resume (resume=True) to continue an "
            "interrupted build, or choose another output"
        )
    if is_index:
        return open_index(path, mode="r+", durable=durable)
    if resume:
        return open_index(path, mode="a", durable=durable, **creation)
    try:
        return open_index(path, mode="w-", durable=durable, **creation)
    except IndexExistsError:
        raise IndexExistsError(
            f"{str(path)!r} already exists and is not an index; choose another output"
        ) from None


def train_index(
    index: Index,
    x: VectorSource,
    xname: str,
    *,
    m: int,
    seed: int,
    niter: int,
    progress: ProgressArg = False,
) -> None:
    """Train ``index`` on ``m`` rows of ``x`` sampled with ``seed``, as every build does.

    The one training step of :func:`build` and :func:`diskivf.parallel.build_parallel`: the
    sample depends only on ``(len(x), m, seed)`` and k-means is seeded, so both builders
    produce the same centroids from the same input and parameters.

    Raises
    ------
    ValueError
        A sampled row holds NaN or infinity.
    OSError
        Reading the input or writing the metadata failed.
    """
    n, nlist = int(x.shape[0]), index.nlist
    rows = sample_rows(n, m, seed)
    sample = _read_sample(x, xname, rows, _progress(progress, "sample"))
    del rows
    if _bars(progress):
        sys.stderr.write(f"training k-means: {m:,} points into {nlist} lists...\n")
    index.train(sample, niter=niter, seed=seed, max_points_per_centroid=math.ceil(m / nlist))


def _check_and_train(
    index: Index,
    x: VectorSource,
    xname: str,
    spec: _Spec,
    *,
    niter: int,
    progress: ProgressArg,
) -> bool:
    """Check that ``index`` was built with ``spec`` (the resume check common to both builders),
    then train it unless it is trained; return whether this call trained it."""
    _check_existing(index, spec)
    if index.is_trained:
        return False
    train_index(index, x, xname, m=spec.train_size, seed=spec.seed, niter=niter, progress=progress)
    return True


def build(
    input: PathOrSource,
    out: str | os.PathLike[str],
    *,
    nlist: int,
    metric: str = "l2",
    ids: PathOrSource | None = None,
    dataset: str | None = None,
    train_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    nprobe: int | None = None,
    dtype: str = "float32",
    seed: int = 0,
    niter: int = 10,
    resume: bool = False,
    durable: bool = True,
    progress: ProgressArg = False,
) -> BuildReport:
    """Build an index at ``out`` from the vectors in ``input``, committing every batch.

    Parameters
    ----------
    input
        A vector file (``.npy``, ``.fvecs``, ``.bvecs``, ``.ivecs``, ``.fbin``, ``.u8bin``,
        ``.i8bin``, ``.ibin``, ``.hdf5``/``.h5``; see :mod:`diskivf.io`), or an array-like with
        ``shape``, ``dtype`` and row slicing (a numpy array or memmap, an ``h5py.Dataset``).
        It is memory-mapped and read one batch at a time, never loaded whole.
    out
        Index directory to create (or to resume, with ``resume=True``).
    nlist
        Number of lists; see :func:`diskivf.open`. About ``sqrt(n)`` to ``16 * sqrt(n)``.
    metric
        ``"l2"``, ``"ip"`` or ``"cosine"``.
    ids
        An ids file (``.npy``, ``.ivecs``, ``.ibin``; see :func:`diskivf.io.read_ids`) or a 1-D
        integer array, one non-negative id per input row. Default: the row numbers.
    dataset
        HDF5 inputs only: the dataset to read (default ``"train"``).
    train_size
        Rows sampled uniformly for k-means; default ``256 * nlist``, capped at ``n``. Only
        these rows are read, and they are held in memory as float32 (``4 * dim`` bytes each).
        Must be at least ``nlist``.
    batch_size
        Rows per batch and per commit. Peak memory grows with it, not with ``n``: about
        ``batch_size * dim * 24`` bytes plus a score block per assignment thread (see
        :meth:`Index.add <diskivf.index.Index.add>`), since the next batch
        is read and assigned while one commits. Each commit costs a few fsyncs, so very small
        batches are slow; a killed build loses at most one.
    nprobe
        Default lists probed per search, stored in the index (default ``nlist / 32``).
    dtype
        Stored vector dtype, ``"float32"`` or ``"float16"``.
    seed
        Seed of the training sample and of k-means: the same input and seed build the same
        index.
    niter
        Maximum k-means iterations.
    resume
        Continue the build in ``out`` from its last committed batch (see the module docstring);
        start a new one if ``out`` holds no index yet. Without it, an existing ``out`` is an
        error.
    durable
        fsync every commit (default). ``False`` is faster; a power loss may then lose commits,
        which ``resume`` redoes.
    progress
        ``False`` (silent), ``True`` (progress bars on stderr when it is a terminal),
        ``"always"`` (bars even when it is not), or ``callable(rows_done, rows_total)``
        called after every commit, counting rows committed before a resume as done.

    Returns
    -------
    BuildReport
        What was done; ``report.summary()`` is a one-line description.

    Raises
    ------
    FileNotFoundError
        ``input`` or ``ids`` does not exist.
    diskivf.errors.FormatError
        ``input`` or ``ids`` is malformed, or ``out`` is a damaged index.
    diskivf.errors.IndexExistsError
        ``out`` exists and ``resume`` is False, or it holds something that is not an index.
    diskivf.errors.LockedError
        Another writer (another build) holds ``out``.
    ValueError
        Invalid parameters; ids of the wrong length, dtype or sign, or that do not fit int64
        (every id is checked before ``out`` is created, so nothing is created); input rows with
        NaN or infinity (rows committed before the failing batch stay in the index: fix the
        input and resume); on resume, an index that was built with other parameters or from
        another input, or from which rows were removed.
    OSError
        Reading the input or writing the index failed; the index keeps its last commit.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> np.save(os.path.join(d, "x.npy"), np.random.default_rng(0).random((500, 8), np.float32))
    >>> r = build(os.path.join(d, "x.npy"), os.path.join(d, "x.index"), nlist=4, batch_size=200)
    >>> r.rows_added, r.commits
    (500, 3)
    >>> build(os.path.join(d, "x.npy"), os.path.join(d, "x.index"), nlist=4,
    ...       resume=True).rows_added
    0
    """
    x, xname, n, id_src, spec = _open_job(
        input,
        ids,
        dataset=dataset,
        nlist=nlist,
        metric=metric,
        dtype=dtype,
        nprobe=nprobe,
        seed=seed,
        batch_size=batch_size,
        train_size=train_size,
    )
    path = Path(os.fspath(out))
    index = _open_output(path, spec, resume=resume, durable=durable)

    with index:
        if index.nremoved:
            raise ValueError(
                f"cannot resume {str(path)!r}: {index.nremoved:,} of its rows were removed, so "
                "its size no longer tells how many input rows were added; build anew"
            )
        if index.ntotal > n:
            raise ValueError(
                f"cannot resume {str(path)!r}: it holds {index.ntotal:,} vectors but {xname} has "
                f"only {n:,} rows; is it the same input?"
            )
        t0 = time.perf_counter()
        trained = _check_and_train(index, x, xname, spec, niter=niter, progress=progress)
        t1 = time.perf_counter()
        done = index.ntotal
        _check_resume_point(index, x, xname, id_src, done)
        _drop_pages(x)
        before, commits = done, 0
        callback = progress if callable(progress) else None
        bar = _progress(progress, "add")
        if bar is not None:
            bar(0, n - before)
        metric, centroids = index.metric, index.centroids

        def prepare(a: int) -> tuple[int, NDArray[Any], NDArray[np.int64], NDArray[Any]]:
            """Read, check, convert and assign rows a.. (runs while the previous batch commits)."""
            b = min(n, a + batch_size)
            xb = np.ascontiguousarray(x[a:b], dtype=np.float32)
            _check_rows(xb, metric, xname, a)
            bids = (
                np.arange(a, b, dtype=np.int64)
                if id_src is None
                else _id_batch(id_src[0], id_src[1], a, b)
            )
            xb, stored = index._prepare_batch(xb, a)
            return b, stored, bids, index._assign(xb, centroids)

        # Each batch is still its own commit, in order, with the bytes Index.add would write;
        # only its reading and assignment overlap the previous batch's writes and fsyncs.
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="diskivf-build") as ahead:
                nxt = ahead.submit(prepare, done) if done < n else None
                while nxt is not None:
                    b, stored, bids, labels = nxt.result()
                    nxt = ahead.submit(prepare, b) if b < n else None
                    try:
                        index._commit_assigned(stored, bids, labels)
                    except BaseException:
                        if nxt is not None:
                            nxt.cancel()
                        raise
                    del stored, labels
                    _drop_pages(x)
                    if id_src is not None:
                        _drop_pages(id_src[0])
                    commits += 1
                    if callback is not None:
                        callback(b, n)
                    if bar is not None:
                        bar(b - before, n - before)
        finally:
            if bar is not None:
                bar(-1, n - before)
        # This build finished what an interrupted parallel one began: its shards are obsolete.
        shutil.rmtree(path / fmt.WORK_DIR_NAME, ignore_errors=True)
        t2 = time.perf_counter()
        return BuildReport(
            path=str(path),
            n=n,
            dim=spec.dim,
            nlist=nlist,
            rows_before=before,
            rows_added=index.ntotal - before,
            commits=commits,
            trained=trained,
            train_size=spec.train_size,
            generation=index.generation,
            train_s=t1 - t0,
            add_s=t2 - t1,
        )
