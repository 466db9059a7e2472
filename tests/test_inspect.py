"""Tests for diskivf.inspect: info (never touching the lists), verify, decode_header."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from diskivf import format as fmt
from diskivf import inspect as inspect_mod
from diskivf import parallel, segments
from diskivf.demo import clustered
from diskivf.errors import CorruptIndexError, FormatError, IndexNotFoundError
from diskivf.index import open_index
from diskivf.inspect import (
    INFO_SCHEMA,
    IndexInfo,
    decode_header,
    imbalance_factor,
    info,
    verify,
)

REPO = Path(__file__).resolve().parents[1]
ATTACKS = REPO / "tests" / "attacks"
WORK = parallel.WORK_DIR_NAME
N, DIM, NLIST = 3000, 8, 12


def make_index(path: Path, n: int = N, *, nlist: int = NLIST, batches: int = 3) -> Path:
    x, _ = clustered(n, DIM, nclusters=30, seed=2)
    with open_index(path, mode="w-", dim=DIM, nlist=nlist, nprobe=3) as ix:
        ix.train(x, seed=4)
        for part in np.array_split(x, batches):
            ix.add(part)
    return path


@pytest.fixture
def index(tmp_path: Path) -> Path:
    return make_index(tmp_path / "i.index")


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def first_list(index: Path) -> tuple[int, str, str]:
    with open_index(index) as ix:
        rec = fmt.read_commit(index, ix.nlist, ix.metadata.index_uuid)
    lid = int(np.flatnonzero(rec.list_counts)[0])
    vec, ids = fmt.list_file_names(lid, int(rec.list_gens[lid]))
    return lid, vec, ids


# ------------------------------------------------------------------------------------ info


def test_imbalance_factor_matches_faiss_definition() -> None:
    c = np.array([3, 0, 7, 10])
    assert imbalance_factor(c) == pytest.approx(4 * (9 + 49 + 100) / 400)
    assert imbalance_factor([1, 1]) == 1.0
    assert imbalance_factor([0, 0, 0]) is None


def test_info_reports_what_the_index_says(index: Path) -> None:
    r = info(index)
    with open_index(index) as ix:
        counts = ix.list_sizes()
        meta = ix.metadata
        assert (r.dim, r.nlist, r.metric, r.nprobe) == (ix.dim, ix.nlist, ix.metric, 3)
        assert (r.ntotal, r.generation) == (N, 3)
    assert r.format_version == (fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR)
    assert (r.vector_dtype, r.id_dtype, r.centroid_dtype) == ("<f4", "<i8", "<f4")
    assert r.trained
    assert r.next_id == N
    assert r.index_uuid == meta.index_uuid
    assert r.created_by.startswith("diskivf ")
    assert r.training == meta.training
    assert r.training is not None
    assert r.training.seed == 4
    total = sum(p.stat().st_size for p in index.rglob("*") if p.is_file())
    assert r.bytes_on_disk == total
    assert r.list_bytes_committed == N * (DIM * 4 + 8)
    s = r.list_sizes
    assert (s.min, s.max, s.empty) == (counts.min(), counts.max(), int((counts == 0).sum()))
    assert s.median == float(np.median(counts))
    assert s.mean == pytest.approx(N / NLIST)
    assert s.imbalance_factor == pytest.approx(NLIST * (counts**2).sum() / N**2)
    assert sum(c for _, _, c in s.histogram) == NLIST
    assert s.histogram[0][0] == s.min
    assert s.histogram[-1][1] == s.max
    for (_, hi, _), (lo, _, _) in zip(s.histogram, s.histogram[1:], strict=False):
        assert lo == hi + 1
    assert s.imbalance_factor is not None
    assert r.vectors_per_query == pytest.approx(3 * N / NLIST * s.imbalance_factor)
    assert r.bytes_per_query == pytest.approx(r.vectors_per_query * (DIM * 4 + 8))
    assert r.lists is None


def test_info_with_removed_rows(index: Path) -> None:
    with open_index(index, mode="r+") as ix:
        assert ix.remove(np.arange(0, 300)) == 300
        live = ix.list_sizes()
    r = info(index)
    assert r.ntotal == N - 300
    assert r.removed == 300
    assert r.to_dict()["removed"] == 300
    assert "+300 removed" in str(r)
    # list sizes count the rows a search scans: removed ones too, until compaction
    assert r.list_bytes_committed == N * (DIM * 4 + 8)
    assert r.list_sizes.max >= int(live.max())
    assert verify(index).ok


def test_info_histogram_bins_count_correctly() -> None:
    from diskivf.inspect import ListSizeStats

    counts = np.array([0, 0, 1, 5, 9, 9, 100], np.int64)
    s = ListSizeStats.from_counts(counts)
    for lo, hi, c in s.histogram:
        assert c == int(((counts >= lo) & (counts <= hi)).sum())
    one = ListSizeStats.from_counts(np.array([4, 4, 4], np.int64))
    assert one.histogram == ((4, 4, 3),)


INFO_TYPES: dict[str, Any] = {
    "schema": str,
    "path": str,
    "format_version": str,
    "created_by": str,
    "index_uuid": str,
    "dim": int,
    "metric": str,
    "vector_dtype": str,
    "id_dtype": str,
    "centroid_dtype": str,
    "nlist": int,
    "nprobe": int,
    "trained": bool,
    "ntotal": int,
    "removed": int,
    "next_id": int,
    "generation": int,
    "bytes_on_disk": int,
    "list_bytes_committed": int,
    "list_sizes": dict,
    "training": dict,
    "per_query": dict,
    "lists": type(None),
    "unfinished_build": bool,
    "work_dir_bytes": type(None),
}


def check_info_schema(d: dict[str, Any], *, lists: bool = False) -> None:
    """The documented schema of ``diskivf.info/1`` (shared with test_cli)."""
    assert set(d) == set(INFO_TYPES)
    for key, typ in INFO_TYPES.items():
        want = list if (key == "lists" and lists) else typ
        assert type(d[key]) is want, (key, d[key])
    assert d["schema"] == INFO_SCHEMA == "diskivf.info/1"
    assert d["format_version"] == f"{fmt.FORMAT_MAJOR}.{fmt.FORMAT_MINOR}"
    ls = d["list_sizes"]
    assert set(ls) == {"min", "median", "max", "mean", "empty", "imbalance_factor", "histogram"}
    assert all(type(ls[k]) is int for k in ("min", "max", "empty"))
    assert all(type(ls[k]) is float for k in ("median", "mean", "imbalance_factor"))
    assert all(set(b) == {"lo", "hi", "count"} for b in ls["histogram"])
    assert all(type(v) is int for b in ls["histogram"] for v in b.values())
    t = d["training"]
    assert set(t) == {"npoints", "niter", "nsplit", "seed", "objective", "final_objective"}
    assert all(type(t[k]) is int for k in ("npoints", "niter", "nsplit", "seed"))
    assert all(type(v) is float for v in t["objective"])
    assert t["final_objective"] == t["objective"][-1]
    pq = d["per_query"]
    assert set(pq) == {"nprobe", "vectors_scanned", "bytes_scanned"}
    assert type(pq["nprobe"]) is int
    assert type(pq["vectors_scanned"]) is float
    assert type(pq["bytes_scanned"]) is float
    if lists:
        keys = {"list_id", "count", "file_generation", "vec_bytes", "ids_bytes"}
        for row in d["lists"]:
            assert set(row) == keys | {"vec_file_bytes", "ids_file_bytes"}
            assert all(type(row[k]) is int for k in keys)


def test_to_dict_schema_and_json_round_trip(index: Path) -> None:
    r = info(index)
    d = r.to_dict()
    check_info_schema(d)
    assert json.loads(r.to_json()) == d
    assert json.loads(json.dumps(d)) == d


def test_info_lists(index: Path) -> None:
    r = info(index, lists=True)
    assert r.lists is not None
    assert len(r.lists) == NLIST
    with open_index(index) as ix:
        counts = ix.list_sizes()
    for d in r.lists:
        assert d.count == counts[d.list_id]
        assert d.vec_bytes == d.count * DIM * 4
        assert d.ids_bytes == d.count * 8
        if d.count:
            assert d.vec_file_bytes == d.vec_bytes
            assert d.ids_file_bytes == d.ids_bytes
    check_info_schema(r.to_dict(), lists=True)


def test_repr_is_one_readable_line(index: Path) -> None:
    r = info(index)
    text = repr(r)
    assert "\n" not in text
    assert text.startswith("IndexInfo(path=")
    for part in ("dim=8", "metric='l2'", "nlist=12", f"ntotal={N}", "generation=3", "imbalance="):
        assert part in text
    assert "array(" not in text
    assert str(r) == r.to_text()
    assert "imbalance factor" in str(r)
    assert "#" in str(r)  # the histogram


def test_info_on_untrained_and_empty_indexes(tmp_path: Path) -> None:
    with open_index(tmp_path / "u.index", mode="w-", dim=4, nlist=3):
        pass
    r = info(tmp_path / "u.index")
    assert not r.trained
    assert r.training is None
    assert r.ntotal == 0
    assert r.list_sizes.imbalance_factor is None
    assert r.vectors_per_query == 0.0
    d = r.to_dict()
    assert d["training"] is None
    assert d["list_sizes"]["imbalance_factor"] is None
    assert "not trained" in str(r)
    assert "n/a" in repr(r)


def test_info_errors(tmp_path: Path, index: Path) -> None:
    with pytest.raises(IndexNotFoundError):
        info(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match="not a diskivf index"):
        info(tmp_path / "plain")
    flip_byte(index / fmt.META_NAME, 30)
    with pytest.raises(CorruptIndexError):
        info(index)


def test_info_does_not_read_lists_in_process(index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> Any:
        raise AssertionError("info touched an inverted list")

    monkeypatch.setattr(segments.ListReader, "get", boom)
    monkeypatch.setattr(segments, "crc_prefix", boom)
    monkeypatch.setattr(np, "memmap", boom)
    opened: list[str] = []
    real_open = open

    def spy_open(file: Any, *a: Any, **k: Any) -> Any:
        opened.append(os.fspath(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", spy_open)
    r = info(index, lists=True)
    assert r.ntotal == N
    assert opened  # the spy works: meta and commit were opened
    assert not [p for p in opened if f"{os.sep}{fmt.LISTS_DIR}{os.sep}" in p]


AUDIT = """
import sys
touched = []
def hook(event, args):
    if event in ("open", "mmap.__new__", "os.open") and args and isinstance(args[0], (str, bytes)):
        p = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if "/lists/" in p:
            touched.append(p)
sys.addaudithook(hook)
from diskivf.cli import main
code = main(sys.argv[1:])
print("TOUCHED", len(touched), file=sys.stderr)
sys.exit(code)
"""


def run_audited(*argv: str) -> tuple[int, str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run(
        [sys.executable, "-c", AUDIT, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    touched = [line for line in p.stderr.splitlines() if line.startswith("TOUCHED")]
    assert touched, p.stderr
    return p.returncode, touched[0]


def test_info_never_opens_a_list_file_audited(index: Path) -> None:
    # A Python audit hook sees every open() of the process, numpy's memmap included.
    assert run_audited("info", str(index), "--json") == (0, "TOUCHED 0")
    assert run_audited("info", str(index), "--lists") == (0, "TOUCHED 0")
    # ...and the same hook does see verify reading the lists, so the check can fail.
    code, touched = run_audited("verify", str(index))
    assert code == 0
    assert touched != "TOUCHED 0"


# ---------------------------------------------------------------------------------- verify


def test_verify_clean(index: Path) -> None:
    r = verify(index)
    assert r.ok
    assert r.problems == ()
    assert r.generation == 3
    assert r.lists_checked == NLIST - info(index).list_sizes.empty
    assert r.bytes_checked == N * (DIM * 4 + 8)
    assert r.to_text().startswith("ok: ")
    assert r.to_dict()["ok"] is True


@pytest.mark.parametrize("which", ["vec", "ids"])
def test_verify_flipped_byte_names_file_and_list(index: Path, which: str) -> None:
    lid, vec, ids = first_list(index)
    name = vec if which == "vec" else ids
    flip_byte(index / name, 5)
    r = verify(index)
    assert not r.ok
    assert len(r.problems) == 1
    p = r.problems[0]
    assert (p.file, p.list_id) == (name, lid)
    assert "checksum mismatch" in p.message
    assert f"list {lid}" in str(p)
    assert name in r.to_text()
    assert r.to_text().startswith("DAMAGED")


def test_verify_truncated_and_missing_list_files(index: Path) -> None:
    lid, vec, ids = first_list(index)
    size = (index / vec).stat().st_size
    os.truncate(index / vec, size - 3)
    (index / ids).unlink()
    r = verify(index)
    found = {(p.file, p.list_id): p.message for p in r.problems}
    assert set(found) == {(vec, lid), (ids, lid)}
    assert found[(vec, lid)].startswith("truncated")
    assert found[(ids, lid)].startswith("missing")


def test_verify_torn_tail_is_only_a_note(index: Path) -> None:
    _, vec, _ = first_list(index)
    with open(index / vec, "ab") as f:
        f.write(b"\xff" * 13)
    r = verify(index)
    assert r.ok
    assert any("past their committed prefix" in n for n in r.notes)


def test_verify_damaged_commit_record(index: Path) -> None:
    flip_byte(index / fmt.COMMIT_NAME, 40)
    r = verify(index)
    assert not r.ok
    assert r.generation is None
    assert [p.file for p in r.problems] == [fmt.COMMIT_NAME]
    assert r.problems[0].list_id is None


def test_verify_damaged_centroids_still_checks_lists(index: Path) -> None:
    lid, vec, _ = first_list(index)
    size = (index / fmt.META_NAME).stat().st_size
    flip_byte(index / fmt.META_NAME, size - 2)  # in the centroids, not the header
    flip_byte(index / vec, 0)
    r = verify(index)
    assert [(p.file, p.list_id) for p in r.problems] == [(fmt.META_NAME, None), (vec, lid)]
    assert "centroids" in r.problems[0].message
    assert r.generation == 3


def test_verify_unreadable_meta_header(index: Path) -> None:
    flip_byte(index / fmt.META_NAME, 25)  # the value of "dim" in the msgpack header
    r = verify(index)
    assert [p.file for p in r.problems] == [fmt.META_NAME]
    assert "checksum mismatch" in r.problems[0].message
    assert r.lists_checked == 0  # a header failing its CRC is not trusted to check lists
    assert any("lists were not checked" in n for n in r.notes)


def test_verify_errors(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError):
        verify(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="neither"):
        verify(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(FormatError, match="not a directory"):
        verify(tmp_path / "f")


def test_verify_missing_meta(index: Path) -> None:
    (index / fmt.META_NAME).unlink()
    r = verify(index)
    assert [(p.file, p.message) for p in r.problems] == [(fmt.META_NAME, "missing")]


# --------------------------------------------------------------------------- decode_header


def test_decode_clean_files(index: Path) -> None:
    m = decode_header(index / fmt.META_NAME)
    assert m.kind == "meta"
    assert m.magic_ok
    assert m.crc_ok is True
    assert m.complete
    assert m.problems == ()
    assert m.header["dim"] == DIM
    assert m.header["nlist"] == NLIST
    assert m.centroids is not None
    assert m.centroids["crc_ok"] is True
    c = decode_header(index / fmt.COMMIT_NAME)
    assert c.kind == "commit"
    assert c.problems == ()
    assert c.header["generation"] == 3
    counts = c.header["list_counts"]
    assert counts["length"] == NLIST
    assert counts["sum"] == N
    json.dumps(m.to_dict())
    json.dumps(c.to_dict())
    assert "problems     none" in m.to_text()


def test_decode_truncated_meta_shows_the_first_keys(index: Path, tmp_path: Path) -> None:
    raw = (index / fmt.META_NAME).read_bytes()
    cut = tmp_path / fmt.META_NAME
    cut.write_bytes(raw[: fmt.PREAMBLE.size + 60])
    d = decode_header(cut)
    assert not d.complete
    assert d.crc_ok is None
    assert d.header["dim"] == DIM  # the first keys survive
    assert "nlist" in d.header
    assert any("runs past the end" in p for p in d.problems)
    assert any("cut after" in p for p in d.problems)


def test_decode_flipped_header_byte_reports_crc_and_still_decodes(index: Path) -> None:
    raw = bytearray((index / fmt.META_NAME).read_bytes())
    body = raw[fmt.PREAMBLE.size :]
    pos = fmt.PREAMBLE.size + body.index(b"metric") + 7  # inside the value "l2"
    raw[pos] ^= 0x01
    (index / fmt.META_NAME).write_bytes(bytes(raw))
    d = decode_header(index / fmt.META_NAME)
    assert d.crc_ok is False
    assert any("checksum mismatch" in p for p in d.problems)
    assert d.complete
    assert d.header["dim"] == DIM
    assert d.header["metric"] != "l2"


def test_decode_bad_magic_and_lying_length(index: Path) -> None:
    raw = bytearray((index / fmt.COMMIT_NAME).read_bytes())
    raw[0:8] = b"GARBAGE!"
    struct.pack_into("<I", raw, 12, 10**9)  # header_len
    (index / fmt.COMMIT_NAME).write_bytes(bytes(raw))
    d = decode_header(index / fmt.COMMIT_NAME)
    assert d.kind == "commit"  # from the file name
    assert not d.magic_ok
    assert d.header_len == 10**9
    assert d.header["generation"] == 3  # decoded anyway
    assert any("magic" in p for p in d.problems)
    assert any("runs past the end" in p for p in d.problems)


def test_decode_damaged_centroids(index: Path) -> None:
    size = (index / fmt.META_NAME).stat().st_size
    flip_byte(index / fmt.META_NAME, size - 1)
    d = decode_header(index / fmt.META_NAME)
    assert d.crc_ok is True
    assert d.centroids is not None
    assert d.centroids["crc_ok"] is False
    assert any("centroids checksum mismatch" in p for p in d.problems)
    os.truncate(index / fmt.META_NAME, size - 100)
    d = decode_header(index / fmt.META_NAME)
    assert any("centroids truncated" in p for p in d.problems)


def test_decode_tiny_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    d = decode_header(tmp_path / "a")
    assert d.kind == "unknown"
    assert d.version is None
    assert any("shorter than the 20-byte preamble" in p for p in d.problems)
    (tmp_path / "b").write_bytes(
        fmt.META_MAGIC + b"\x01\x00\x00\x00" + struct.pack("<II", 4, 0) + b"\x93\x01\x02\x03"
    )
    d = decode_header(tmp_path / "b")
    assert d.kind == "meta"
    assert any("not a map" in p for p in d.problems)
    with pytest.raises(FileNotFoundError):
        decode_header(tmp_path / "missing")


def test_decode_reports_the_readers_verdict_on_a_well_formed_but_invalid_file(
    tmp_path: Path,
) -> None:
    from diskivf.inspect import _header_crc

    header = {
        "dim": 4, "nlist": 2, "metric": "l2", "vector_dtype": "<f4", "id_dtype": "<i8",
        "centroid_dtype": "<f4", "nprobe": 5, "index_uuid": "0" * 32, "trained": False,
        "required_features": [], "created_by": "test",
    }  # fmt: skip
    body = msgpack.packb(header, use_bin_type=True)
    head = fmt.PREAMBLE.pack(fmt.META_MAGIC, fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR, 0, len(body), 0)
    crc = _header_crc(head, body)
    head = fmt.PREAMBLE.pack(fmt.META_MAGIC, fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR, 0, len(body), crc)
    (tmp_path / fmt.META_NAME).write_bytes(head + body)  # nprobe 5 > nlist 2, but CRC is fine
    d = decode_header(tmp_path / fmt.META_NAME)
    assert d.crc_ok is True
    assert d.complete
    assert len(d.problems) == 1
    assert d.problems[0].startswith("rejected by the reader")
    assert "nprobe" in d.problems[0]


def test_info_result_is_frozen(index: Path) -> None:
    r: IndexInfo = info(index)
    with pytest.raises(AttributeError):
        r.ntotal = 5  # type: ignore[misc]


# ------------------------------------------------------------------- unfinished parallel build


def file_bytes(root: Path) -> int:
    """What ``du --apparent-size`` counts for the regular files under ``root``."""
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.fixture
def unfinished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A parallel build that failed after its merge, before its only commit (as if killed)."""
    x = np.random.default_rng(3).standard_normal((600, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "p.index"

    def killed(*args: Any, **kwargs: Any) -> None:
        raise OSError("worker killed")

    with monkeypatch.context() as m:
        m.setattr(parallel, "commit_merged", killed)
        with pytest.raises(OSError, match="worker killed"):
            parallel.build_parallel(
                tmp_path / "x.npy", out, nlist=4, batch_size=100, rows_per_task=200
            )
    assert (out / WORK / "shards").is_dir()
    return out


def test_info_reports_an_unfinished_parallel_build(unfinished: Path) -> None:
    r = info(unfinished)
    assert (r.ntotal, r.generation, r.trained) == (0, 0, True)
    assert r.unfinished_build
    assert r.work_dir_bytes == file_bytes(unfinished / WORK) > 0
    assert r.bytes_on_disk == file_bytes(unfinished)  # du and info agree
    text = r.to_text()
    (line,) = [t for t in text.splitlines() if t.startswith("build ")]
    assert "unfinished parallel build (.parallel-build.tmp, " in line
    assert "build_parallel(..., resume=True)" in line
    assert "diskivf build --workers N --resume" in line
    assert f"of them in {WORK}" in text
    assert repr(r).endswith(", unfinished_build=True)")
    d = r.to_dict()
    assert (d["unfinished_build"], d["work_dir_bytes"]) == (True, r.work_dir_bytes)
    assert json.loads(r.to_json()) == d


def test_info_of_a_finished_index_has_no_build_line(index: Path) -> None:
    r = info(index)
    assert (r.unfinished_build, r.work_dir_bytes) == (False, None)
    assert not any(t.startswith("build ") for t in r.to_text().splitlines())
    assert "unfinished" not in repr(r)
    assert verify(index).unfinished_build is False


def test_verify_notes_an_unfinished_parallel_build_but_finds_no_damage(unfinished: Path) -> None:
    r = verify(unfinished)
    assert (r.ok, r.status, r.problems, r.generation) == (True, "ok", (), 0)
    assert r.unfinished_build
    assert r.to_text().startswith(f"ok (unfinished parallel build present): {unfinished}: ")
    assert "unfinished parallel build (.parallel-build.tmp, " in r.notes[0]
    assert "resume" in r.notes[0]
    d = r.to_dict()
    assert (d["status"], d["unfinished_build"], d["notes"]) == ("ok", True, list(r.notes))


def test_work_dir_files_are_never_opened_audited(unfinished: Path) -> None:
    audit = AUDIT.replace('"/lists/"', f'"/{WORK}/"')
    for argv in (["info", str(unfinished)], ["verify", str(unfinished)]):
        p = subprocess.run(
            [sys.executable, "-c", audit, *argv],
            capture_output=True,
            text=True,
            env=dict(
                os.environ,
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            ),
            timeout=60,
            check=False,
        )
        assert (p.returncode, p.stderr.splitlines()[-1]) == (0, "TOUCHED 0"), p.stderr
        assert "unfinished parallel build" in p.stdout


def test_work_dir_beside_committed_rows_is_reported_as_left_behind(index: Path) -> None:
    # A build killed between its commit and the removal of its work directory.
    (index / WORK / "shards" / "000000").mkdir(parents=True)
    (index / WORK / "shards" / "000000" / "rows.vec").write_bytes(b"\0" * 1000)
    r = info(index)
    assert (r.unfinished_build, r.work_dir_bytes) == (True, 1000)
    assert "left behind (.parallel-build.tmp, 1,000 B): the committed rows do not use it" in str(r)
    v = verify(index)
    assert v.ok
    assert v.unfinished_build
    assert "can be deleted" in v.notes[0]


def test_work_dir_sizing_follows_no_symlink_and_is_bounded(
    index: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"\0" * 100_000)
    work = index / WORK
    (work / "a" / "b").mkdir(parents=True)
    (work / "a" / "b" / "f").write_bytes(b"\0" * 10)
    (work / "g").write_bytes(b"\0" * 5)
    (work / "file-link").symlink_to(outside / "big")
    (work / "dir-link").symlink_to(outside)
    (work / "loop").symlink_to(work)
    base = info(index).bytes_on_disk - 15
    assert info(index).work_dir_bytes == 15
    assert verify(index).ok
    monkeypatch.setattr(inspect_mod, "_WORK_DIR_MAX_ENTRIES", 2)
    assert info(index).work_dir_bytes in (0, 5, 10)  # at most 2 entries looked at
    monkeypatch.undo()
    shutil.rmtree(work)
    work.symlink_to(outside)  # the work directory itself is a symlink: not followed
    r = info(index)
    assert (r.unfinished_build, r.work_dir_bytes, r.bytes_on_disk) == (True, 0, base)


# --------------------------------------------------------------------- unsupported versions


def attacked(tmp_path: Path, attack: str) -> Path:
    """A copy of ``tests/attacks/base`` with one of its files replaced by ``attack``."""
    root = tmp_path / "a.index"
    shutil.copytree(ATTACKS / "base", root)
    target = fmt.META_NAME if attack.startswith("meta_") else fmt.COMMIT_NAME
    shutil.copyfile(ATTACKS / attack, root / target)
    return root


@pytest.mark.parametrize(
    ("attack", "file", "why"),
    [
        ("meta_major_2.diskivf", fmt.META_NAME, "written by a newer diskivf (format 2.0; "),
        ("meta_required_feature.diskivf", fmt.META_NAME, "needs format features ['zstd-lists']"),
        ("commit_major_2.msgpack", fmt.COMMIT_NAME, "written by a newer diskivf (format 2.0; "),
    ],
)
def test_verify_reports_a_newer_format_as_unsupported_not_damaged(
    tmp_path: Path, attack: str, file: str, why: str
) -> None:
    root = attacked(tmp_path, attack)
    for name in (root / fmt.LISTS_DIR).iterdir():
        os.truncate(name, 1)  # lists a 1.x reading would call damaged: they must not be read
    r = verify(root)
    assert (r.status, r.ok, r.problems) == ("unsupported", False, ())
    assert (r.lists_checked, r.bytes_checked) == (0, 0)
    assert r.unsupported is not None
    assert r.unsupported.startswith(f"{file}: {why}")
    assert r.unsupported.endswith("; upgrade diskivf to read it")
    assert r.to_text().startswith(f"unsupported: {root}: {file}: ")
    assert "DAMAGED" not in r.to_text()
    d = r.to_dict()
    assert (d["status"], d["ok"], d["unsupported"]) == ("unsupported", False, r.unsupported)


def test_verify_major_0_and_a_hit_version_byte_are_told_apart(tmp_path: Path) -> None:
    r = verify(attacked(tmp_path, "meta_major_0.diskivf"))  # never written: damage
    assert (r.status, r.unsupported) == ("damaged", None)
    assert "corrupt or foreign" in r.problems[0].message
    root = tmp_path / "flipped.index"
    shutil.copytree(ATTACKS / "base", root)
    raw = bytearray((root / fmt.META_NAME).read_bytes())
    raw[8] = 3  # the major version, checksum left as it was
    (root / fmt.META_NAME).write_bytes(bytes(raw))
    r = verify(root)
    assert r.status == "unsupported"
    assert any(
        "unless a newer diskivf wrote it, its version field is damaged" in n for n in r.notes
    )


def test_decode_header_tells_unsupported_from_damaged(tmp_path: Path) -> None:
    for attack, file in [
        ("meta_major_2.diskivf", fmt.META_NAME),
        ("meta_required_feature.diskivf", fmt.META_NAME),
        ("commit_major_2.msgpack", fmt.COMMIT_NAME),
    ]:
        d = decode_header(attacked(tmp_path / attack, attack) / file)
        assert d.status == "unsupported"
        assert d.unsupported is not None
        assert "upgrade diskivf" in d.unsupported
        assert d.to_dict()["status"] == "unsupported"
        assert f"unsupported  {d.unsupported}" in d.to_text()
    d = decode_header(attacked(tmp_path / "m0", "meta_major_0.diskivf") / fmt.META_NAME)
    assert (d.status, d.unsupported) == ("damaged", None)
    d = decode_header(ATTACKS / "base" / fmt.META_NAME)
    assert (d.status, d.to_dict()["unsupported"]) == ("ok", None)


# ------------------------------------------------------------------------- set_centroids


def test_info_of_centroids_set_directly_is_consistent(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with open_index(tmp_path / "s.index", mode="w-", dim=4, nlist=3) as ix:
        ix.set_centroids(rng.standard_normal((3, 4)).astype(np.float32))
        ix.add(rng.standard_normal((30, 4)).astype(np.float32))
    r = info(tmp_path / "s.index")
    assert (r.trained, r.training) == (True, None)
    assert r.to_dict()["training"] is None
    lines = r.to_text().splitlines()
    assert "trained yes" in lines[3]
    assert "training         not recorded (centroids set directly)" in lines
    assert "not trained" not in r.to_text()


HOSTILE_FILES = sorted(p.name for p in ATTACKS.iterdir() if p.is_file() and p.suffix != ".md")


@pytest.mark.parametrize("attack", HOSTILE_FILES)
def test_every_hostile_file_is_a_finding_of_the_inspection_tools(
    attack: str, tmp_path: Path
) -> None:
    # Every file that opening refuses (tests/attacks/README.md), put in place of its file in
    # a valid index: the header dump names damage or an unsupported format, or, where the
    # file is only wrong against the rest of the index (another index's uuid, counts past
    # the list files' ends), verify() does. Neither raises, and both reports are JSON-able.
    idx = attacked(tmp_path, attack)
    d = decode_header(idx / (fmt.META_NAME if attack.startswith("meta_") else fmt.COMMIT_NAME))
    assert d.kind in ("meta", "commit")
    json.dumps(d.to_dict())
    assert d.to_text()
    v = verify(idx)
    json.dumps(v.to_dict())
    assert v.status in ("damaged", "unsupported"), v.to_text()
    if d.status == "ok":
        assert v.problems, v.to_text()  # damage the file alone cannot show
