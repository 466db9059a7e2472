"""Generate the golden format fixtures and the worked example of ``format_spec.md``.

Golden fixtures are committed once per format version under ``tests/data/v1/`` and must keep
opening forever; this script refuses to overwrite them unless given ``--force``, so they are
never regenerated silently. Each fixture is an index directory named
``{metric}_{dim}d_{nlist}l`` (with ``_f16`` appended for float16 storage, then ``_removed`` or
``_compacted`` for the fixtures whose history includes removals), left exactly as the library
wrote it, plus two files beside it:

``NAME.expected.npz``
    ``queries``, ``k`` and the results of ``search(queries, k, nprobe=nlist)`` (``*_all``),
    ``nprobe=nprobe_small`` (``*_small``) and ``k=k_pad`` with ``nprobe=nlist`` (``*_pad``,
    which holds every live vector plus padding); ``removed_ids``, the ids that were removed and
    must never be returned.
``NAME.contents.npz``
    The committed ``vectors`` (stored dtype), ``ids`` and ``list_ids`` in list order, with
    ``removed`` marking the rows that the commit record's tombstones remove; the ``centroids``,
    ``list_gens`` and the commit ``generation``.

Every fixture is written by two ``add`` commits. ``_removed`` then removes the nearest
neighbours of three queries and upserts one id, so its commit record holds tombstones.
``_compacted`` removes rows from some lists, compacts (those lists move to file generation 1 and
their generation-0 files are deleted), adds more rows and removes one more, a tombstone against
a generation-1 file.

The data come from seeded generators, but the index uuid is random, so a regenerated fixture
differs from the committed one in its uuid and checksums.

The worked example (Appendix A of the specification) is fully deterministic: fixed vectors,
fixed centroids and a fixed uuid, written through :mod:`diskivf.format`'s encoders and then
filled with :meth:`diskivf.Index.add`. :func:`example_markdown` renders its hex dumps; a test
compares them with the specification.

Usage::

    python tools/make_fixtures.py [--out DIR] [--force]   # golden fixtures
    python tools/make_fixtures.py --example DIR            # worked example + its dumps
    python tools/make_fixtures.py --update-spec            # rewrite Appendices A and B
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
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
    import diskivf
from diskivf import format as fmt
from diskivf.segments import ListReader

DEFAULT_OUT = REPO / "tests" / "data" / "v1"


@dataclass(frozen=True)
class FixtureSpec:
    """One golden fixture: its index parameters and how much data it holds."""

    metric: str
    dim: int
    nlist: int
    dtype: str = "float32"
    n: int = 40
    seed: int = 0
    history: str = ""  # "", "removed" or "compacted": see build_fixture

    @property
    def name(self) -> str:
        """Directory name; tests parse the parameters back from it."""
        suffix = "_f16" if self.dtype == "float16" else ""
        if self.history:
            suffix += f"_{self.history}"
        return f"{self.metric}_{self.dim}d_{self.nlist}l{suffix}"


FIXTURES = (
    FixtureSpec("l2", 4, 2, n=24, seed=1),
    FixtureSpec("ip", 8, 4, seed=2),
    FixtureSpec("cosine", 8, 4, seed=3),
    FixtureSpec("l2", 8, 4, dtype="float16", seed=4),
    FixtureSpec("l2", 8, 4, seed=5, history="removed"),
    FixtureSpec("cosine", 8, 4, seed=6, history="compacted"),
)
K = 5
NPROBE_SMALL = 1


def _data(spec: FixtureSpec) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Clustered vectors and queries (five near stored vectors, one random)."""
    rng = np.random.default_rng(spec.seed)
    centers = rng.uniform(-4, 4, (spec.nlist, spec.dim))
    labels = rng.integers(0, spec.nlist, spec.n)
    x = (centers[labels] + 0.5 * rng.standard_normal((spec.n, spec.dim))).astype(np.float32)
    near = x[rng.choice(spec.n, 5, replace=False)] + 0.1 * rng.standard_normal((5, spec.dim))
    queries = np.concatenate([near, rng.uniform(-4, 4, (1, spec.dim))]).astype(np.float32)
    return x, queries


def _stored(root: Path) -> dict[str, NDArray[Any]]:
    """Committed vectors, ids, list ids and removed flags of the index at ``root``, in list order."""
    meta = fmt.read_meta(root)
    rec = fmt.read_commit(root, meta.nlist, meta.index_uuid)
    reader = ListReader(root, meta.dim, meta.vector_dtype)
    vecs = [np.zeros((0, meta.dim), meta.vector_dtype)]
    ids = [np.zeros(0, np.int64)]
    lists = [np.zeros(0, np.int64)]
    removed = [np.zeros(0, bool)]
    dead_lists, dead_rows = rec.tombstones >> fmt.ROW_BITS, rec.tombstones % (1 << fmt.ROW_BITS)
    for list_id in range(meta.nlist):
        view = reader.get(list_id, int(rec.list_counts[list_id]), int(rec.list_gens[list_id]))
        if view is not None:
            vecs.append(np.array(view.vectors))
            ids.append(np.array(view.ids, dtype=np.int64))
            lists.append(np.full(len(view.ids), list_id, np.int64))
            removed.append(np.isin(np.arange(len(view.ids)), dead_rows[dead_lists == list_id]))
    if meta.centroids is None:
        raise RuntimeError(f"{root} is not trained")
    return {
        "vectors": np.concatenate(vecs),
        "ids": np.concatenate(ids),
        "list_ids": np.concatenate(lists),
        "removed": np.concatenate(removed),
        "centroids": meta.centroids,
        "list_gens": rec.list_gens.astype(np.int64),
        "generation": np.array(rec.generation, np.int64),  # 0-d, as savez stores it
    }


def _nearest(index: diskivf.Index, queries: NDArray[np.float32]) -> list[int]:
    """The exact nearest live id of each query."""
    return [int(i) for i in index.search(queries, 1, nprobe=index.nlist).ids[:, 0]]


def _apply_history(
    spec: FixtureSpec, index: diskivf.Index, x: NDArray[np.float32], q: NDArray[np.float32]
) -> list[int]:
    """Write the removals (and more) of ``spec.history`` with the writer ``index``.

    Returns the removed ids, none of which is live afterwards. Rows are removed where they
    matter: each is the nearest neighbour of a query, so a reader ignoring tombstones fails.
    """
    if spec.history == "removed":
        gone = sorted(set(_nearest(index, q[:3])))
        index.remove(gone)
        index.upsert(q[3:4] + 0.01, ids=[1])  # id 1: its old row is tombstoned, a new row added
        return gone
    if spec.history != "compacted":
        raise ValueError(f"unknown fixture history {spec.history!r}")
    gone = sorted(set(_nearest(index, q[:2])))
    index.remove(gone)
    index.compact()
    index.add(x[: spec.n // 4] + 0.25, ids=2000 + np.arange(spec.n // 4))
    # One more tombstone, against a compacted (generation 1) list: the nearest such live row.
    c = _stored(index.path)
    live = {int(i) for i in c["ids"][~c["removed"]]}
    order = index.search(q[:1], index.ntotal, nprobe=index.nlist).ids[0]
    gen1 = {int(i) for i in c["ids"][c["list_gens"][c["list_ids"]] == 1]}
    unique = {i for i in live if np.count_nonzero(c["ids"] == i) == 1}
    last = next(int(i) for i in order if int(i) in gen1 & unique)
    index.remove([last])
    return [*gone, last]


def _check_history(spec: FixtureSpec, root: Path, removed_ids: list[int]) -> None:
    """Raise RuntimeError unless the fixture holds the state its history promises."""
    c = _stored(root)
    if set(removed_ids) & set(c["ids"][~c["removed"]].tolist()):
        raise RuntimeError(f"{spec.name}: a removed id is still live")
    if spec.history and not c["removed"].any():
        raise RuntimeError(f"{spec.name}: no tombstones")
    if spec.history == "compacted":
        gens = c["list_gens"]
        dead_gens = gens[c["list_ids"][c["removed"]]]
        if not ((gens == 0).any() and (gens == 1).any() and (dead_gens == 1).any()):
            raise RuntimeError(f"{spec.name}: want lists at generations 0 and 1, tombstones in 1")
        for list_id in np.flatnonzero(gens == 1).tolist():
            if any((root / name).exists() for name in fmt.list_file_names(list_id, 0)):
                raise RuntimeError(f"{spec.name}: compaction left list {list_id}'s old files")


def _brute_force_ids(
    metric: str, x: NDArray[Any], ids: NDArray[np.int64], q: NDArray[np.float32], k: int
) -> NDArray[np.int64]:
    """Exact top-k ids in float64, the independent check of every fixture's expected ids."""
    xf, qf = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        qf = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    cost = ((qf[:, None, :] - xf[None, :, :]) ** 2).sum(-1) if metric == "l2" else -(qf @ xf.T)
    order = np.lexsort((np.broadcast_to(ids, cost.shape), cost), axis=-1)[:, :k]
    return ids[order]


def build_fixture(spec: FixtureSpec, out: Path) -> Path:
    """Write fixture ``spec`` into ``out``; return the index directory.

    Raises
    ------
    RuntimeError
        If the library's exhaustive search disagrees with brute force on the new fixture.
    """
    root = out / spec.name
    x, queries = _data(spec)
    half = spec.n // 2
    removed_ids: list[int] = []
    with diskivf.open(
        root, mode="w-", dim=spec.dim, nlist=spec.nlist, metric=spec.metric, dtype=spec.dtype
    ) as index:
        index.train(x, seed=spec.seed)
        index.add(x[:half])  # default ids 0, 1, ...
        index.add(x[half:], ids=1000 + 3 * np.arange(spec.n - half))  # a second commit
        if spec.history:
            removed_ids = _apply_history(spec, index, x, queries)
    _check_history(spec, root, removed_ids)
    contents = _stored(root)
    live = ~contents["removed"]
    results: dict[str, Any] = {}
    with diskivf.open(root) as index:
        k_pad = index.ntotal + 2
        for tag, k, nprobe in (
            ("all", K, spec.nlist),
            ("small", K, NPROBE_SMALL),
            ("pad", k_pad, spec.nlist),
        ):
            d, i = index.search(queries, k, nprobe=nprobe)
            results[f"distances_{tag}"], results[f"ids_{tag}"] = d, i
    vectors, ids = contents["vectors"], contents["ids"]
    want = _brute_force_ids(spec.metric, vectors[live], ids[live], queries, K)
    if not np.array_equal(results["ids_all"], want):
        raise RuntimeError(f"{spec.name}: exhaustive search disagrees with brute force")
    if spec.history and np.array_equal(
        _brute_force_ids(spec.metric, vectors, ids, queries, K), want
    ):
        raise RuntimeError(f"{spec.name}: ignoring the tombstones would not change the results")
    np.savez_compressed(
        out / f"{spec.name}.expected.npz",
        queries=queries,
        k=np.int64(K),
        nprobe_small=np.int64(NPROBE_SMALL),
        k_pad=np.int64(k_pad),
        removed_ids=np.array(removed_ids, np.int64),
        **results,
    )
    np.savez_compressed(out / f"{spec.name}.contents.npz", **contents)  # type: ignore[arg-type]
    return root


def make_fixtures(out: Path, *, force: bool = False) -> list[Path]:
    """Write every fixture of :data:`FIXTURES` into ``out``; return the index directories.

    Raises
    ------
    FileExistsError
        A fixture already exists and ``force`` is false.
    """
    targets = [
        out / f"{spec.name}{suffix}"
        for spec in FIXTURES
        for suffix in ("", ".expected.npz", ".contents.npz")
    ]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(
            f"{existing[0]} exists: golden fixtures are never regenerated silently "
            "(pass --force to overwrite them, and say why in the commit)"
        )
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return [build_fixture(spec, out) for spec in FIXTURES]


# --------------------------------------------------------------------------------------------
# the worked example of format_spec.md, Appendix A
# --------------------------------------------------------------------------------------------

EXAMPLE_UUID = "0123456789abcdef0123456789abcdef"
EXAMPLE_CREATED_BY = "diskivf 0.1.0"  # fixed, so the dumps do not change with the version
EXAMPLE_CENTROIDS = np.array([[0.25, 0.25, 0.25, 0.25], [4, 4, 4, 4]], np.float32)
EXAMPLE_VECTORS = np.array(
    [[1, 0, 0, 0], [4, 4, 4, 3], [0, 1, 0, 0], [0, 0, 1, 0], [4, 4, 4, 5], [0, 0, 0, 1]],
    np.float32,
)
EXAMPLE_TRAINING = fmt.TrainingInfo(npoints=6, niter=1, nsplit=0, seed=0, objective=(5.0,))
EXAMPLE_QUERY = np.array([0.5, 0.25, 0.125, 0.0], np.float32)
EXAMPLE_FILES = ("meta.diskivf", "commit.msgpack", "lists/0000000.0.vec", "lists/0000000.0.ids")
EXAMPLE_REMOVED = (3, 4)  # list 0 row 2 and list 1 row 1: tombstones 2 and 1 << 40 | 1


def make_example(root: Path) -> Path:
    """Create the worked example index (dim 4, nlist 2, l2, six vectors) at ``root``.

    The index is created by the library, then its metadata and empty commit record are
    replaced through :mod:`diskivf.format` with a fixed uuid and fixed centroids, and the
    vectors are added by the library, so every byte is deterministic.
    """
    with diskivf.open(root, mode="w-", dim=4, nlist=2, metric="l2", nprobe=1):
        pass
    meta = fmt.Metadata(
        dim=4,
        nlist=2,
        metric="l2",
        vector_dtype="<f4",
        nprobe=1,
        index_uuid=EXAMPLE_UUID,
        centroids=EXAMPLE_CENTROIDS,
        training=EXAMPLE_TRAINING,
        created_by=EXAMPLE_CREATED_BY,
    )
    empty = fmt.CommitRecord.empty(2, EXAMPLE_UUID)
    fmt.atomic_write(root / fmt.COMMIT_NAME, fmt.encode_commit(empty))
    fmt.atomic_write(root / fmt.META_NAME, fmt.encode_meta(meta))
    with diskivf.open(root, mode="r+") as index:
        index.add(EXAMPLE_VECTORS)
    return root


def hexdump(data: bytes) -> str:
    """``xxd``-style dump: offset, eight 2-byte hex groups, printable ASCII."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        groups = " ".join(chunk[i : i + 2].hex() for i in range(0, len(chunk), 2))
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{off:08x}: {groups:<39}  {text}")
    return "\n".join(lines)


_COMMIT_DTYPES = {"list_counts": "<i8", "list_gens": "<u4", "vec_crc32": "<u4", "ids_crc32": "<u4"}
_COMMIT_DTYPES["tombstones"] = "<i8"
_FIXED = {0xC0: "nil", 0xC2: "false", 0xC3: "true", 0xCA: "float 32", 0xCB: "float 64"}
_FIXED |= {0xC4: "bin 8", 0xC5: "bin 16", 0xC6: "bin 32", 0xD9: "str 8", 0xDA: "str 16"}
_FIXED |= {0xCC: "uint 8", 0xCD: "uint 16", 0xCE: "uint 32", 0xCF: "uint 64"}
_FIXED |= {0xD0: "int 8", 0xD1: "int 16", 0xD2: "int 32", 0xD3: "int 64"}
_FIXED |= {0xDC: "array 16", 0xDE: "map 16"}


def _encoding(first: int) -> str:
    """The msgpack format family named by an encoding's first byte (msgpack spec names)."""
    for lo, hi, name in (
        (0x00, 0x7F, "positive fixint"),
        (0x80, 0x8F, "fixmap"),
        (0x90, 0x9F, "fixarray"),
        (0xA0, 0xBF, "fixstr"),
        (0xE0, 0xFF, "negative fixint"),
    ):
        if lo <= first <= hi:
            return name
    return _FIXED.get(first, "other")


def _show(key: str, value: Any) -> str:
    if isinstance(value, bytes):
        dtype = _COMMIT_DTYPES[key]
        array = np.frombuffer(value, dtype)
        shown = (
            f"`{value.hex()}` = {dtype} `{array.tolist()}`" if value else f"empty = {dtype} `[]`"
        )
        if key == "tombstones" and array.size:
            pairs = [(int(t) >> fmt.ROW_BITS, int(t) % (1 << fmt.ROW_BITS)) for t in array]
            shown += f" = (list_id, row) `{pairs}`"
        return shown
    if key.endswith("crc32"):
        return f"`{value!r}` = `0x{value:08x}`"
    return f"`{value!r}`"


def _key_table(buf: bytes) -> str:
    """Markdown table locating each top-level msgpack key/value pair of a diskivf file."""
    hlen = fmt.PREAMBLE.unpack_from(buf)[4]
    body = buf[fmt.PREAMBLE.size : fmt.PREAMBLE.size + hlen]
    h = header_of(buf)
    if msgpack.packb(h, use_bin_type=True) != body:
        raise RuntimeError("the header does not re-encode to the same bytes")
    pairs = [(msgpack.packb(k), msgpack.packb(v, use_bin_type=True)) for k, v in h.items()]
    off = fmt.PREAMBLE.size + len(body) - sum(len(a) + len(b) for a, b in pairs)
    head = f"{_encoding(body[0])} `{body[0]:02x}`"
    rows = [
        "| offset | bytes (key + value) | key | value encoding | value |",
        "| --- | --- | --- | --- | --- |",
        f"| {fmt.PREAMBLE.size} | {off - fmt.PREAMBLE.size} | (map header) | {head} | {len(h)} keys |",
    ]
    for (key, value), (kb, vb) in zip(h.items(), pairs, strict=True):
        enc = f"{_encoding(vb[0])} `{vb[0]:02x}`"
        rows.append(f"| {off} | {len(kb)} + {len(vb)} | `{key}` | {enc} | {_show(key, value)} |")
        off += len(kb) + len(vb)
    return "\n".join(rows)


def _preamble_table(buf: bytes) -> str:
    """Markdown table of the 20-byte preamble of a diskivf file."""
    magic, major, minor, reserved, hlen, crc = fmt.PREAMBLE.unpack_from(buf)
    fields = [
        (0, 8, "magic", f"`{magic!r}`"),
        (8, 1, "major", str(major)),
        (9, 1, "minor", str(minor)),
        (10, 2, "reserved", str(reserved)),
        (12, 4, "header_len", f"{hlen}: the msgpack map is bytes 20..{20 + hlen - 1}"),
        (16, 4, "header_crc32", f"`0x{crc:08x}` = CRC32 of bytes 0..15, then 20..{19 + hlen}"),
    ]
    rows = ["| offset | bytes | field | value |", "| --- | --- | --- | --- |"]
    for off, size, name, value in fields:
        raw = " ".join(f"{b:02x}" for b in buf[off : off + size])
        rows.append(f"| {off} | `{raw}` | {name} | {value} |")
    return "\n".join(rows)


def _meta_tail_table(buf: bytes) -> str:
    """Markdown table of the padding and centroids that follow the metadata header."""
    hend = fmt.PREAMBLE.size + fmt.PREAMBLE.unpack_from(buf)[4]
    h = header_of(buf)
    offset, nlist, dim = h["centroids_offset"], h["nlist"], h["dim"]
    centroids = np.frombuffer(buf[offset:], "<f4").reshape(nlist, dim)
    shown = f"`<f4` ({nlist}, {dim}): `{centroids.tolist()}`"
    return "\n".join(
        [
            "| offset | bytes | field | value |",
            "| --- | --- | --- | --- |",
            f"| {hend} | {offset - hend} | padding | zeros up to align64({hend}) = {offset} |",
            f"| {offset} | {centroids.nbytes} | centroids | {shown} |",
        ]
    )


def header_of(buf: bytes) -> dict[str, Any]:
    """The msgpack header map of a diskivf file (no validation: the example is ours)."""
    hlen = fmt.PREAMBLE.unpack_from(buf)[4]
    h: dict[str, Any] = msgpack.unpackb(buf[fmt.PREAMBLE.size : fmt.PREAMBLE.size + hlen])
    return h


def _search_markdown(root: Path, cases: tuple[tuple[int, int], ...]) -> list[str]:
    """The example query's results at ``root`` for each ``(k, nprobe)``."""
    parts = []
    with diskivf.open(root) as index:
        for k, nprobe in cases:
            d, i = index.search(EXAMPLE_QUERY, k, nprobe=nprobe)
            parts.append(
                f"`search({EXAMPLE_QUERY.tolist()}, k={k}, nprobe={nprobe})`:\n\n"
                f"```text\nids       {i[0].tolist()}\ndistances {d[0].tolist()}\n```"
            )
    return parts


def _removed_markdown(root: Path) -> list[str]:
    """Dump and tables of the example's commit record after ``remove(EXAMPLE_REMOVED)``."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "removed.index"
        shutil.copytree(root, copy)
        with diskivf.open(copy, mode="r+") as index:
            index.remove(list(EXAMPLE_REMOVED))
        data = (copy / fmt.COMMIT_NAME).read_bytes()
        parts = [
            f"### Removing ids {list(EXAMPLE_REMOVED)}: `commit.msgpack` ({len(data)} bytes)",
            f"```text\n{hexdump(data)}\n```",
            _preamble_table(data),
            _key_table(data),
        ]
        return parts + _search_markdown(copy, ((8, 2),))


def example_markdown(root: Path) -> str:
    """The generated part of Appendix A: dumps and field tables of the example at ``root``.

    The last section removes two ids from a copy of the example (``root`` is not changed).
    """
    meta = (root / fmt.META_NAME).read_bytes()
    dim = header_of(meta)["dim"]
    parts = []
    for name in EXAMPLE_FILES:
        data = (root / name).read_bytes()
        parts.append(f"### `{name}` ({len(data)} bytes)")
        parts.append(f"```text\n{hexdump(data)}\n```")
        if name in (fmt.META_NAME, fmt.COMMIT_NAME):
            parts += [_preamble_table(data), _key_table(data)]
        if name == fmt.META_NAME:
            parts.append(_meta_tail_table(data))
        elif name.endswith(".vec"):
            rows = np.frombuffer(data, "<f4").reshape(-1, dim)
            parts.append(f"{len(rows)} rows of `<f4` ({len(rows)}, {dim}): `{rows.tolist()}`")
        elif name.endswith(".ids"):
            parts.append(f"{len(data) // 8} ids `<i8`: `{np.frombuffer(data, '<i8').tolist()}`")
    parts.append("### Searching the example")
    parts += _search_markdown(root, ((3, 1), (8, 2)))
    parts += _removed_markdown(root)
    return "\n\n".join(parts) + "\n"


SPEC = REPO / "format_spec.md"
READER = REPO / "tools" / "read_minimal.py"
APPENDIX_A = (
    "<!-- BEGIN GENERATED: python tools/make_fixtures.py --example DIR -->",
    "<!-- END GENERATED -->",
)
APPENDIX_B = ("<!-- BEGIN tools/read_minimal.py -->", "<!-- END tools/read_minimal.py -->")
READER_MARKERS = (
    "# --- begin format_spec.md appendix B ---",
    "# --- end format_spec.md appendix B ---",
)


def between(text: str, markers: tuple[str, str]) -> str:
    """The text between two marker lines, without the markers' own lines.

    Raises
    ------
    ValueError
        A marker is missing.
    """
    begin, end = markers
    start = text.index(begin + "\n") + len(begin) + 1
    return text[start : text.index(end, start)]


def reader_core() -> str:
    """The part of ``tools/read_minimal.py`` that Appendix B reproduces."""
    return between(READER.read_text(), READER_MARKERS).strip("\n") + "\n"


def update_spec() -> None:
    """Rewrite the generated blocks of Appendices A and B in ``format_spec.md``."""
    text = SPEC.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        example = example_markdown(make_example(Path(tmp) / "example.index"))
    for markers, new in (
        (APPENDIX_A, "\n" + example + "\n"),
        (APPENDIX_B, "\n```python\n" + reader_core() + "```\n\n"),
    ):
        old = between(text, markers)
        start = text.index(markers[0]) + len(markers[0]) + 1
        text = text[:start] + new + text[start + len(old) :]
    SPEC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixture directory")
    parser.add_argument("--force", action="store_true", help="overwrite existing fixtures")
    parser.add_argument(
        "--example", type=Path, metavar="DIR", help="write the worked example to DIR instead"
    )
    parser.add_argument(
        "--update-spec",
        action="store_true",
        help="regenerate Appendices A and B of format_spec.md instead",
    )
    args = parser.parse_args(argv)
    if args.update_spec:
        update_spec()
        return 0
    if args.example is not None:
        print(example_markdown(make_example(args.example)), end="")
        return 0
    try:
        made = make_fixtures(args.out, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for root in made:
        npz = [root.parent / f"{root.name}.{kind}.npz" for kind in ("expected", "contents")]
        size = sum(p.stat().st_size for p in [*npz, *root.rglob("*")] if p.is_file())
        print(f"wrote {root} ({size} bytes with its .npz files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
