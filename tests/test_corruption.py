"""Corruption is detected and hostile files are rejected, never silently served.

- truncation of every file at many offsets, exhaustive single-bit flips over the metadata and
  commit files of a tiny index, bit flips in list files found by ``verify()``;
- the committed hostile files of ``tests/attacks/`` (see its README) plus a generated matrix:
  wrong types and missing values for every key, unknown versions, lying lengths, huge claims;
  each must raise a ``FormatError`` without a big allocation;
- no path is ever taken from file contents.
"""

from __future__ import annotations

import builtins
import importlib.util
import io
import os
import re
import shutil
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import diskivf
from diskivf import format as fmt
from diskivf import segments
from diskivf.errors import CorruptIndexError, FormatError, UnsupportedVersionError

REPO = Path(__file__).resolve().parents[1]
ATTACKS_DIR = Path(__file__).resolve().parent / "attacks"
MODES: tuple[diskivf.Mode, ...] = ("r", "r+")
# Opening a tiny index allocates a few hundred kilobytes; a hostile file must not push it far.
MAX_PEAK_BYTES = 4 << 20


def _load_make_attacks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_attacks", REPO / "tools" / "make_attacks.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_attacks"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ma = _load_make_attacks()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny index written by the library: dim 4, nlist 3, 12 rows, trained. Never modify."""
    root = tmp_path_factory.mktemp("corruption") / "tiny.index"
    x = np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32)
    with diskivf.open(root, "w-", dim=4, nlist=3) as index:
        index.train(x, niter=3)
        index.add(x[:12])
        assert np.all(index.list_sizes() > 0)
    return root


@pytest.fixture
def tiny_copy(tiny: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy.index"
    shutil.copytree(tiny, dst)
    return dst


@pytest.fixture
def base_copy(tmp_path: Path) -> Path:
    """A copy of the deterministic base index of ``tests/attacks``."""
    dst = tmp_path / "base.index"
    ma.write_base(dst)
    return dst


def open_peak(root: Path, mode: diskivf.Mode = "r") -> tuple[FormatError | None, int]:
    """Open (and close) the index; return (the FormatError raised or None, peak traced bytes)."""
    tracemalloc.start()
    try:
        diskivf.open(root, mode).close()
    except FormatError as exc:  # anything else propagates and fails the test
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return None, peak


def assert_rejected(
    root: Path,
    error: type[FormatError] = FormatError,
    match: str | None = None,
    max_peak: int = MAX_PEAK_BYTES,
) -> FormatError:
    """Opening ``root`` (modes "r" and "r+") raises ``error`` with a small memory peak."""
    raised: list[FormatError] = []
    for mode in MODES:
        exc, peak = open_peak(root, mode)
        assert isinstance(exc, error), f"mode {mode!r}: expected {error.__name__}, got {exc!r}"
        if match is not None:
            assert re.search(match, str(exc)), f"{str(exc)!r} does not match {match!r}"
        assert peak < max_peak, f"{exc!r}: peak allocation {peak} bytes"
        raised.append(exc)
    return raised[0]


# --------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [fmt.META_NAME, fmt.COMMIT_NAME])
def test_truncation_at_every_offset(tiny_copy: Path, name: str) -> None:
    path = tiny_copy / name
    whole = path.read_bytes()
    for size in range(len(whole)):
        path.write_bytes(whole[:size])
        for mode in MODES:
            with pytest.raises(FormatError):
                diskivf.open(tiny_copy, mode).close()
    path.write_bytes(whole)
    diskivf.open(tiny_copy, "r+").close()


def test_list_file_shorter_than_count(tiny_copy: Path) -> None:
    with diskivf.open(tiny_copy) as index:
        counts = index.list_sizes().tolist()
    for lid, count in enumerate(counts):
        for name, need in zip(fmt.list_file_names(lid, 0), (count * 16, count * 8), strict=True):
            path = tiny_copy / name
            whole = path.read_bytes()
            assert len(whole) == need
            for size in [0, 1, *range(7, need, 7), need - 1]:
                path.write_bytes(whole[:size])
                for mode in MODES:
                    with pytest.raises(CorruptIndexError, match=f"list {lid} .*{name}"):
                        diskivf.open(tiny_copy, mode).close()
            path.write_bytes(whole + b"torn tail")  # longer than committed: fine
            with diskivf.open(tiny_copy) as index:
                assert index.verify().ok
            path.write_bytes(whole)


@pytest.mark.parametrize("victim", [fmt.COMMIT_NAME, "lists/0000001.0.ids", fmt.LISTS_DIR])
def test_missing_file(tiny_copy: Path, victim: str) -> None:
    path = tiny_copy / victim
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    assert_rejected(tiny_copy, FormatError, "missing|no commit")


def test_missing_meta_is_not_an_index(tiny_copy: Path) -> None:
    (tiny_copy / fmt.META_NAME).unlink()
    assert_rejected(tiny_copy, FormatError, "not a diskivf index")


def test_huge_sparse_files_are_not_read(tiny_copy: Path) -> None:
    """Oversized commit records are rejected by their size before being read; a 1 GiB meta
    file is read only up to the header cap (all sparse files, so the test costs nothing)."""
    commit = tiny_copy / fmt.COMMIT_NAME
    good = commit.read_bytes()
    for size in (fmt.PREAMBLE.size + fmt.MAX_COMMIT_BODY + 1, 1 << 30):
        os.truncate(commit, size)
        assert_rejected(tiny_copy, CorruptIndexError, "over the limit")
    commit.write_bytes(good)
    meta = tiny_copy / fmt.META_NAME
    meta.write_bytes(b"")
    os.truncate(meta, 1 << 30)
    assert_rejected(tiny_copy, FormatError, "not a diskivf index")


# --------------------------------------------------------------------------------------------
# bit flips
# --------------------------------------------------------------------------------------------


def _decode(name: str, data: bytes, meta: fmt.Metadata) -> None:
    if name == fmt.META_NAME:
        fmt.decode_meta(data)
    else:
        fmt.decode_commit(data, meta.nlist, meta.index_uuid)


@pytest.mark.parametrize("name", [fmt.META_NAME, fmt.COMMIT_NAME])
def test_every_single_bit_flip_is_detected(tiny_copy: Path, name: str) -> None:
    """Exhaustive: no flipped bit anywhere in the file (preamble, header, padding, centroids,
    commit arrays) is silently accepted. Every flip goes through the decoder; every eighth one
    (and all of the preamble) also through a real open of the damaged file."""
    meta = fmt.read_meta(tiny_copy)
    path = tiny_copy / name
    whole = path.read_bytes()
    _decode(name, whole, meta)  # the undamaged file decodes
    accepted = []
    kinds: dict[str, int] = {}
    opened = 0
    for bit in range(len(whole) * 8):
        damaged = bytearray(whole)
        damaged[bit // 8] ^= 1 << (bit % 8)
        try:
            _decode(name, bytes(damaged), meta)
        except FormatError as exc:
            kinds[type(exc).__name__] = kinds.get(type(exc).__name__, 0) + 1
        else:
            accepted.append(bit)
        if bit % 8 == bit // 8 % 8 or bit < fmt.PREAMBLE.size * 8:
            path.write_bytes(damaged)
            with pytest.raises(FormatError):
                diskivf.open(tiny_copy).close()
            opened += 1
    path.write_bytes(whole)
    assert not accepted, f"{len(accepted)} bit flips accepted, at bytes {accepted[:8]}..."
    assert sum(kinds.values()) == len(whole) * 8
    assert kinds.get("CorruptIndexError", 0) > len(whole) * 7  # almost all are checksum errors
    assert opened >= len(whole)


def test_verify_names_the_damaged_list(tiny_copy: Path) -> None:
    """Every flipped bit in a committed list prefix is reported by verify(), naming exactly
    that list and file; flips past the committed prefix are not damage."""
    with diskivf.open(tiny_copy) as index:
        counts = index.list_sizes().tolist()
        assert index.verify().ok
        flips = 0
        for lid, count in enumerate(counts):
            for name, nbytes in zip(
                fmt.list_file_names(lid, 0), (count * 16, count * 8), strict=True
            ):
                path = tiny_copy / name
                whole = path.read_bytes()
                # every byte once (bits in rotation), and all bits of the first and last
                bits = [8 * i + i % 8 for i in range(nbytes)]
                bits += [*range(8), *range(8 * nbytes - 8, 8 * nbytes)]
                for bit in bits:
                    damaged = bytearray(whole)
                    damaged[bit // 8] ^= 1 << (bit % 8)
                    path.write_bytes(damaged)
                    report = index.verify()
                    assert not report.ok
                    assert len(report.problems) == 1, report.problems
                    assert report.problems[0].startswith(f"list {lid}: {name} checksum"), (
                        report.problems
                    )
                    flips += 1
                path.write_bytes(whole + b"\xff" * 8)
                assert index.verify().ok
                path.write_bytes(whole)
        assert flips == sum(counts) * 24 + 16 * 2 * np.count_nonzero(counts)


def test_search_refuses_a_negative_stored_id(tiny_copy: Path) -> None:
    """A damaged id file must not turn into a hit whose id -1 reads as padding."""
    with diskivf.open(tiny_copy) as index:
        lid = int(np.flatnonzero(index.list_sizes())[0])
        dim, nlist = index.dim, index.nlist
    path = tiny_copy / fmt.list_file_names(lid, 0)[1]
    damaged = bytearray(path.read_bytes())
    damaged[:8] = np.int64(-1).tobytes()
    path.write_bytes(bytes(damaged))
    with diskivf.open(tiny_copy) as index:
        with pytest.raises(CorruptIndexError, match=rf"list {lid} of .* holds a negative id"):
            index.search(np.zeros(dim, np.float32), k=3, nprobe=nlist)
        assert not index.verify().ok


def test_verify_reports_metadata_damage_after_open(tiny_copy: Path) -> None:
    with diskivf.open(tiny_copy) as index:
        for name in (fmt.META_NAME, fmt.COMMIT_NAME):
            path = tiny_copy / name
            whole = path.read_bytes()
            damaged = bytearray(whole)
            damaged[len(whole) // 2] ^= 0x10
            path.write_bytes(damaged)
            report = index.verify()
            assert len(report.problems) == 1
            assert report.problems[0].startswith(f"{name}: corrupt")
            path.write_bytes(whole)
        assert index.verify().ok


# --------------------------------------------------------------------------------------------
# the committed attack files
# --------------------------------------------------------------------------------------------


def test_attack_folder_matches_generator() -> None:
    """Every catalogued attack is committed and listed in the README; nothing else is there."""
    names = {a.name for a in ma.ATTACKS}
    assert len(names) == len(ma.ATTACKS)
    on_disk = {p.name for p in ATTACKS_DIR.iterdir()} - {"README.md", "base"}
    assert on_disk == names
    readme = (ATTACKS_DIR / "README.md").read_text()
    for a in ma.ATTACKS:
        assert f"- `{a.name}`: {a.error.__name__} - " in readme
        assert (ATTACKS_DIR / a.name).stat().st_size < 16 << 10  # small files only


def test_attack_base_is_valid(tmp_path: Path) -> None:
    """The committed base index opens and verifies, so each attack fails for its own reason."""
    root = tmp_path / "base"
    shutil.copytree(ATTACKS_DIR / "base", root)
    with diskivf.open(root, "r+") as index:
        assert index.verify().ok
        assert index.ntotal == ma.BASE_NLIST * ma.BASE_ROWS
        vecs, ids = ma.base_rows(1)
        assert index.search(vecs, k=1, nprobe=2).ids.ravel().tolist() == ids.tolist()


@pytest.mark.parametrize("attack", ma.ATTACKS, ids=lambda a: a.name)
def test_committed_attack_is_rejected(tmp_path: Path, attack: Any) -> None:
    root = tmp_path / "attacked"
    shutil.copytree(ATTACKS_DIR / "base", root)
    (root / attack.target).write_bytes((ATTACKS_DIR / attack.name).read_bytes())
    exc = assert_rejected(root, attack.error, attack.match)
    assert type(exc) is attack.error
    if attack.target == fmt.META_NAME:  # rejected by the metadata itself, before the commit
        with pytest.raises(attack.error):
            fmt.read_meta(root)


# --------------------------------------------------------------------------------------------
# generated hostile variants
# --------------------------------------------------------------------------------------------

WRONG_VALUES: list[Any] = [
    None,
    True,
    -1,
    1.5,
    "x",
    b"x",
    [],
    [1, 2],
    {},
    {"a": 1},
    (1 << 64) - 1,
]
# (key, repr(value)) pairs from WRONG_VALUES that are in fact valid for the metadata
VALID_META = {("created_by", "'x'"), ("training", "{}"), ("required_features", "[]")}
VALID_META |= {("trained", "True")}  # the base header is trained
OPTIONAL_META = {"created_by", "training"}
META_KEYS = sorted([*ma.meta_header(), "centroids_offset"])


def _meta_variants() -> Iterator[Any]:
    for key in META_KEYS:
        for value in WRONG_VALUES:
            if (key, repr(value)) not in VALID_META:
                yield pytest.param(key, value, id=f"{key}={value!r}")


def _commit_variants() -> Iterator[Any]:
    for key in sorted(ma.commit_header()):
        for value in WRONG_VALUES:
            yield pytest.param(key, value, id=f"{key}={value!r}")


@pytest.mark.parametrize(("key", "value"), list(_meta_variants()))
def test_meta_key_with_wrong_value(base_copy: Path, key: str, value: Any) -> None:
    header = ma.meta_header()
    header[key] = value
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    assert_rejected(base_copy, CorruptIndexError)


@pytest.mark.parametrize("key", META_KEYS)
def test_meta_key_missing(base_copy: Path, key: str) -> None:
    header = ma.meta_header()
    header.pop(key, None)
    if key == "centroids_offset":  # meta_bytes would put it back: lay the file out by hand
        data = ma.meta_bytes({}, body=ma._body(header))
        data += b"\0" * (-len(data) % fmt.ARRAY_ALIGN) + ma.C()
    else:
        data = ma.meta_bytes(header, centroids=ma.C())
    (base_copy / fmt.META_NAME).write_bytes(data)
    if key in OPTIONAL_META:
        diskivf.open(base_copy).close()
    else:
        assert_rejected(base_copy, CorruptIndexError, f"missing required key '{key}'")


@pytest.mark.parametrize(("key", "value"), list(_commit_variants()))
def test_commit_key_with_wrong_value(base_copy: Path, key: str, value: Any) -> None:
    header = ma.commit_header()
    header[key] = value
    (base_copy / fmt.COMMIT_NAME).write_bytes(ma.commit_bytes(header))
    assert_rejected(base_copy, CorruptIndexError)


@pytest.mark.parametrize("key", sorted(ma.commit_header()))
def test_commit_key_missing(base_copy: Path, key: str) -> None:
    (base_copy / fmt.COMMIT_NAME).write_bytes(ma.commit_bytes(ma._without(ma.commit_header(), key)))
    assert_rejected(base_copy, CorruptIndexError, f"missing required key '{key}'")


@pytest.mark.parametrize("major", [0, 2, 3, 255])
@pytest.mark.parametrize("name", [fmt.META_NAME, fmt.COMMIT_NAME])
def test_unknown_major_version(base_copy: Path, name: str, major: int) -> None:
    if name == fmt.META_NAME:
        data = ma.meta_bytes(ma.meta_header(), centroids=ma.C(), major=major)
    else:
        data = ma.commit_bytes(ma.commit_header(), major=major)
    (base_copy / name).write_bytes(data)
    exc = assert_rejected(base_copy, UnsupportedVersionError, f"version {major}\\.0")
    assert ("newer diskivf may read this" in str(exc)) == (major > fmt.FORMAT_MAJOR)


@pytest.mark.parametrize("minor", [1, 255])
@pytest.mark.parametrize("name", [fmt.META_NAME, fmt.COMMIT_NAME])
def test_newer_minor_with_new_keys_is_read(base_copy: Path, name: str, minor: int) -> None:
    """Negative control: a newer minor may add optional keys, and a 1.0 reader reads it."""
    if name == fmt.META_NAME:
        header = {**ma.meta_header(), "new_key": [1, 2], "x_vendor": "y"}
        data = ma.meta_bytes(header, centroids=ma.C(), minor=minor)
    else:
        data = ma.commit_bytes({**ma.commit_header(), "tombstones": b""}, minor=minor)
    (base_copy / name).write_bytes(data)
    with diskivf.open(base_copy) as index:
        assert index.verify().ok


def test_vendor_keys_are_allowed_in_1_0(base_copy: Path) -> None:
    """Negative control: ``x_`` keys are ignorable extensions even in the reader's minor."""
    header = {**ma.meta_header(), "x_comment": "hello"}
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    with diskivf.open(base_copy) as index:
        assert index.metadata.extra == {"x_comment": "hello"}


def test_regenerated_base_header_is_accepted(base_copy: Path) -> None:
    """Negative control for the builders: the unmodified header round-trips."""
    data = ma.meta_bytes(ma.meta_header(), centroids=ma.C())
    assert data == (base_copy / fmt.META_NAME).read_bytes()
    assert ma.commit_bytes(ma.commit_header()) == (base_copy / fmt.COMMIT_NAME).read_bytes()
    diskivf.open(base_copy, "r+").close()


HUGE_CLAIMS = {
    "array32": b"\xdd\xff\xff\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "str32": b"\xdb\xff\xff\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "ext32": b"\xc9\xff\xff\xff\xff\x01",
    "array16-nested": b"\xdc\xff\xff" + b"\xdc\xff\xff" * 100,
    "str-over-limit": b"\xdb\x00\x01\x00\x01" + b"a" * 65537,
    "nesting-3000": b"\x91" * 3000 + b"\xc0",
}


@pytest.mark.parametrize("claim", sorted(HUGE_CLAIMS))
@pytest.mark.parametrize("name", [fmt.META_NAME, fmt.COMMIT_NAME])
def test_huge_msgpack_claims(base_copy: Path, name: str, claim: str) -> None:
    """Containers claiming billions of items or bytes in a small file: rejected, no allocation."""
    body = b"\x82\xa3dim\x04\xa7x_claim" + HUGE_CLAIMS[claim]
    build = ma.meta_bytes if name == fmt.META_NAME else ma.commit_bytes
    data = build({}, body=body)
    (base_copy / name).write_bytes(data)
    assert_rejected(base_copy, CorruptIndexError, "not valid msgpack")


# One byte of msgpack can cost ~60 bytes of Python objects: bodies of many tiny items, up to
# the size limit of each file (1 MiB of metadata header; commit records may be far larger).
AMPLIFIERS = {
    "empty-arrays": b"\xdc\x27\x10" + b"\x90" * 10_000,
    "empty-maps": b"\xdc\x27\x10" + b"\x80" * 10_000,
    "short-strings": b"\xdc\x27\x10" + b"\xa2ab" * 10_000,
    "small-ints": b"\xdc\x27\x10" + b"\xcd\x12\x34" * 10_000,
}


@pytest.mark.parametrize("amplifier", sorted(AMPLIFIERS))
@pytest.mark.parametrize(("name", "nbytes"), [(fmt.META_NAME, 1 << 20), (fmt.COMMIT_NAME, 8 << 20)])
def test_tiny_item_amplification(base_copy: Path, name: str, nbytes: int, amplifier: str) -> None:
    """A header of a million one-byte items (each a Python object) is rejected early: memory
    stays near the file's own size (read once, header copied once), never ~60 times it."""
    unit = AMPLIFIERS[amplifier]
    n = (nbytes - 64) // len(unit)
    body = b"\x81\xa5x_pad\xdc" + n.to_bytes(2, "big") + unit * n
    build = ma.meta_bytes if name == fmt.META_NAME else ma.commit_bytes
    (base_copy / name).write_bytes(build({}, body=body))
    assert_rejected(base_copy, CorruptIndexError, "not valid msgpack", 2 * nbytes + (4 << 20))


@pytest.mark.parametrize(
    ("dim", "nlist"), [(65536, 1 << 20), (1, 1 << 20), (65536, 1), (4, 1 << 20)]
)
def test_huge_dimensions_claimed_by_a_small_file(base_copy: Path, dim: int, nlist: int) -> None:
    header = {**ma.meta_header(), "dim": dim, "nlist": nlist}
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    assert_rejected(base_copy, CorruptIndexError, "truncated")


@pytest.mark.parametrize(
    "header_len", [0, 1, 5, 40, 1 << 16, (1 << 20) + 1, (1 << 31) - 1, (1 << 32) - 1]
)
@pytest.mark.parametrize("name", [fmt.META_NAME, fmt.COMMIT_NAME])
def test_lying_header_len(base_copy: Path, name: str, header_len: int) -> None:
    """header_len shorter or longer than the msgpack map, with a matching checksum."""
    if name == fmt.META_NAME:
        data = ma.meta_bytes(ma.meta_header(), centroids=ma.C(), header_len=header_len)
    else:
        data = ma.commit_bytes(ma.commit_header(), header_len=header_len)
    (base_copy / name).write_bytes(data)
    assert_rejected(base_copy, CorruptIndexError)


# --------------------------------------------------------------------------------------------
# paths never come from file contents
# --------------------------------------------------------------------------------------------


class PathSpy:
    """Records every path the process opens or stats (files of Python modules excepted)."""

    def __init__(self, mp: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        for owner, name in [
            (builtins, "open"),
            (io, "open"),
            (os, "open"),
            (os, "stat"),
            (os, "lstat"),
            (os, "scandir"),
            (os, "listdir"),
        ]:
            mp.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], str | bytes | os.PathLike):
                path = os.fsdecode(args[0])
                if not path.endswith((".py", ".pyc", ".so")):
                    self.paths.append(path)
            return real(*args, **kwargs)

        return call

    def outside(self, root: Path) -> list[str]:
        """Recorded paths neither inside ``root`` nor one of its ancestors (which resolving
        ``root`` itself stats), nor the read-ahead setting in sysfs of ``root``'s device,
        which is named by the directory's device number, never by anything in its files."""
        top = Path(os.path.abspath(root))
        sysfs = {Path(os.path.abspath(p)) for p in segments.readahead_files(root.stat().st_dev)}
        paths = [Path(os.path.abspath(p)) for p in self.paths]
        return [
            str(p)
            for p in paths
            if not (p.is_relative_to(top) or top.is_relative_to(p) or p in sysfs)
        ]


def test_reader_touches_only_files_inside_the_index(tiny_copy: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        spy = PathSpy(mp)
        with diskivf.open(tiny_copy) as index:
            index.search(np.zeros((2, 4), np.float32), k=3, nprobe=3)
            index.refresh()
            assert index.verify().ok
        with diskivf.open(tiny_copy, "r+") as index:
            index.add(np.ones((3, 4), np.float32))
    assert spy.paths, "the spy saw nothing"
    assert not spy.outside(tiny_copy)


@pytest.mark.parametrize("gen", [1, 7, 1 << 31, (1 << 32) - 1])
def test_list_generation_only_names_a_file_inside_lists(base_copy: Path, gen: int) -> None:
    """``list_gens`` are integers: a huge or unexpected one names a missing file in lists/."""
    header = ma.commit_header()
    header["list_gens"] = np.array([gen, 0], "<u4").tobytes()
    (base_copy / fmt.COMMIT_NAME).write_bytes(ma.commit_bytes(header))
    with pytest.MonkeyPatch.context() as mp:
        spy = PathSpy(mp)
        assert_rejected(base_copy, CorruptIndexError, rf"lists/0000000\.{gen}\.vec is missing")
    assert not spy.outside(base_copy)


@pytest.mark.parametrize("where", ["x_ext", "training"])
def test_non_str_map_key_at_any_depth_is_corrupt(base_copy: Path, where: str) -> None:
    """format_spec §1: every map key is a str, also inside x_ values and the training map."""
    header = ma.meta_header()
    if where == "training":
        header["training"] = {"seed": 0, 5: 1}
    else:
        header["x_ext"] = {1: 2}
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    assert_rejected(base_copy, CorruptIndexError, "not valid msgpack")
    # str keys at every depth, unknown ones included: accepted
    header["training"] = {"seed": 0, "x_more": {"a": 1}}
    header["x_ext"] = {"nested": {"ok": [1, 2]}}
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    diskivf.open(base_copy).close()


def test_uuid_and_strings_never_become_paths(base_copy: Path) -> None:
    """String fields that look like paths are validated (or ignored), never used as names."""
    header = {**ma.meta_header(), "created_by": "../../../../tmp/evil", "x_path": "/etc/passwd"}
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    with pytest.MonkeyPatch.context() as mp:
        spy = PathSpy(mp)
        with diskivf.open(base_copy) as index:
            assert index.verify().ok
    assert not spy.outside(base_copy)
    header["index_uuid"] = "../" * 10 + "etc"
    (base_copy / fmt.META_NAME).write_bytes(ma.meta_bytes(header, centroids=ma.C()))
    assert_rejected(base_copy, CorruptIndexError, "index_uuid")
