"""Tests for the ``diskivf`` command line, through ``main(argv)`` and through real subprocesses."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from diskivf import cli
from diskivf import format as fmt
from diskivf.cli import main
from diskivf.demo import clustered
from diskivf.index import Index, open_index
from diskivf.inspect import info
from diskivf.io import write_bin, write_vecs

try:
    h5py: Any = importlib.import_module("h5py")
except ImportError:  # the HDF5 tests then check the "install diskivf[hdf5]" error instead
    h5py = None

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
SUBCOMMANDS = ("build", "search", "info", "verify", "demo")


def run(
    *argv: str, script: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m diskivf ARGV`` (or ``python -c SCRIPT ARGV``) in a fresh process."""
    head = ["-m", "diskivf"] if script is None else ["-c", script]
    return subprocess.run(
        [sys.executable, *head, *argv],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        check=False,
    )


def cli_run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("diskivf: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def build_small(tmp_path: Path, n: int, name: str) -> Path:
    """``diskivf build`` of ``n`` random 4-d vectors into ``tmp_path / name`` (nlist 4, l2)."""
    x = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    idx = tmp_path / name
    assert (
        main(
            [
                "build",
                str(tmp_path / "x.npy"),
                str(idx),
                "--nlist",
                "4",
                "--metric",
                "l2",
                "--quiet",
            ]
        )
        == 0
    )
    return idx


def exact_l2(x: NDArray[np.float32], q: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Brute-force top-k by squared L2 in float64 (the test's own ground truth)."""
    d = (
        (q.astype(np.float64) ** 2).sum(1)[:, None]
        - 2 * q.astype(np.float64) @ x.T.astype(np.float64)
        + (x.astype(np.float64) ** 2).sum(1)[None, :]
    )
    return np.argsort(d, axis=1, kind="stable")[:, :k].astype(np.int64)


def recall(found: NDArray[np.int64], truth: NDArray[np.int64]) -> float:
    k = int(truth.shape[1])
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True))
    return float(hits / (k * len(truth)))


def list_files(index_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((index_dir / fmt.LISTS_DIR).iterdir())}


@pytest.fixture(scope="module")
def data() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    return clustered(4000, 16, nq=60, nclusters=40, seed=11)


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, data: tuple[NDArray[np.float32], NDArray[np.float32]]
) -> Path:
    """An index of ``data`` (nlist 16, l2), with base.fvecs, queries.fvecs and gt.ivecs beside it."""
    d = tmp_path_factory.mktemp("built")
    x, q = data
    write_vecs(d / "base.fvecs", x)
    write_vecs(d / "queries.fvecs", q)
    write_vecs(d / "gt.ivecs", exact_l2(x, q, 20).astype(np.int32))
    code = main(
        [
            "build",
            str(d / "base.fvecs"),
            str(d / "x.index"),
            "--nlist",
            "16",
            "--metric",
            "l2",
            "--batch-size",
            "1000",
            "--quiet",
        ]
    )
    assert code == 0
    return d


# ----------------------------------------------------------------------------------- build


def _fixture_file(tmp: Path, suffix: str, n: int, dim: int) -> NDArray[Any]:
    rng = np.random.default_rng(5)
    if suffix in (".bvecs", ".u8bin"):
        x: NDArray[Any] = rng.integers(0, 256, (n, dim)).astype(np.uint8)
    elif suffix == ".i8bin":
        x = rng.integers(-128, 128, (n, dim)).astype(np.int8)
    elif suffix == ".ivecs":
        x = rng.integers(-1000, 1000, (n, dim)).astype(np.int32)
    else:
        x = rng.standard_normal((n, dim)).astype(np.float32)
    path = tmp / f"base{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    elif suffix in (".fvecs", ".bvecs", ".ivecs"):
        write_vecs(path, x)
    elif suffix == ".hdf5" and h5py is None:
        path.write_bytes(b"")
    elif suffix == ".hdf5":
        with h5py.File(path, "w") as f:
            f["train"] = x
            f["test"] = x[:7] + 0.5
    else:
        write_bin(path, x)
    return x


@pytest.mark.parametrize(
    "suffix", [".npy", ".fvecs", ".bvecs", ".ivecs", ".fbin", ".u8bin", ".i8bin", ".hdf5"]
)
def test_build_from_each_input_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    n, dim = 1200, 8
    x = _fixture_file(tmp_path, suffix, n, dim)
    out = tmp_path / "x.index"
    code, stdout, err = cli_run(
        capsys,
        "build",
        str(tmp_path / f"base{suffix}"),
        str(out),
        "--nlist",
        "8",
        "--metric",
        "l2",
        "--batch-size",
        "500",
        "--train-size",
        "600",
    )
    if suffix == ".hdf5" and h5py is None:
        assert code == 1
        assert_one_line_error(err, 'pip install "diskivf[hdf5]"')
        return
    assert (code, err) == (0, "")
    assert re.match(r"built .*x\.index: 1,200 x 8 vectors in 8 lists \(train .* 3 commits", stdout)
    with open_index(out) as ix:
        assert (ix.ntotal, ix.dim, ix.generation) == (n, dim, 3)
        assert ix.metadata.training is not None
        assert ix.metadata.training.npoints == 600
        d, i = ix.search(x[[0, 1, 599, 1199]].astype(np.float32), k=1, nprobe=8)
    assert i.ravel().tolist() == [0, 1, 599, 1199]
    np.testing.assert_allclose(d.ravel(), 0, atol=1e-3)


def test_build_hdf5_dataset_and_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fixture_file(tmp_path, ".hdf5", 300, 4)
    ids = np.arange(7, dtype=np.int64) * 100 + 5
    write_vecs(tmp_path / "ids.ivecs", ids[:, None].astype(np.int32))
    code, _, err = cli_run(
        capsys,
        "build",
        str(tmp_path / "base.hdf5"),
        str(tmp_path / "t.index"),
        "--nlist",
        "2",
        "--metric",
        "ip",
        "--dataset",
        "test",
        "--ids",
        str(tmp_path / "ids.ivecs"),
        "--quiet",
    )
    if h5py is None:
        assert code == 1
        assert_one_line_error(err, "needs h5py")
        return
    assert (code, err) == (0, "")
    with open_index(tmp_path / "t.index") as ix:
        assert ix.ntotal == 7
        assert ix.metric == "ip"
        assert sorted(ix.search(np.ones(4, np.float32), k=7, nprobe=2).ids.ravel().tolist()) == (
            ids.tolist()
        )


def test_build_progress_quiet_and_tty_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(0).standard_normal((3000, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    base = ["build", str(tmp_path / "x.npy"), "--nlist", "4", "--metric", "l2"]
    # stderr is not a terminal under pytest: no progress unless forced
    code, out, err = cli_run(capsys, *base[:2], str(tmp_path / "a.index"), *base[2:])
    assert (code, err) == (0, "")
    assert out.startswith("built ")
    code, out, err = cli_run(capsys, *base[:2], str(tmp_path / "b.index"), *base[2:], "--progress")
    assert code == 0
    assert "add" in err
    assert "3.00k/3.00k" in err or "3000/3000" in err
    code, out, err = cli_run(capsys, *base[:2], str(tmp_path / "c.index"), *base[2:], "--quiet")
    assert (code, out, err) == (0, "", "")
    code, out, err = cli_run(capsys, *base[:2], str(tmp_path / "c.index"), *base[2:], "--resume")
    assert code == 0
    assert "already complete" in out
    # --quiet and --progress contradict each other: a usage error
    assert main([*base[:2], str(tmp_path / "d.index"), *base[2:], "--quiet", "--progress"]) == 2


def test_build_metric_defaults_to_l2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "m.index"
    code, _, err = cli_run(capsys, "build", str(tmp_path / "x.npy"), str(out), "--nlist", "2")
    assert (code, err) == (0, "")
    with open_index(out) as ix:
        assert ix.metric == "l2"
    code, help_text, _ = cli_run(capsys, "build", "--help")
    assert code == 0
    assert "default l2" in " ".join(help_text.split())


def test_build_checks_every_id_before_creating_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(0).standard_normal((1200, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ids = np.arange(1200, dtype=np.int64)
    ids[-1] = -1  # found only at the last batch by a streaming check
    np.save(tmp_path / "ids.npy", ids)
    out = tmp_path / "i.index"
    argv = ["build", str(tmp_path / "x.npy"), str(out), "--nlist", "4", "--batch-size", "300"]
    code, stdout, err = cli_run(capsys, *argv, "--ids", str(tmp_path / "ids.npy"))
    assert (code, stdout) == (1, "")
    assert_one_line_error(err, "ids.npy", "row 1199 has id -1")
    assert not out.exists()
    ids[-1] = 1199
    np.save(tmp_path / "ids.npy", ids)
    code, _, err = cli_run(capsys, *argv, "--ids", str(tmp_path / "ids.npy"), "--quiet")
    assert (code, err) == (0, "")  # the retry needs no --resume: nothing was left behind


# ---------------------------------------------------------------------------------- search


def test_search_gt_recall_matches_brute_force(
    built: Path,
    tmp_path: Path,
    data: tuple[NDArray[np.float32], NDArray[np.float32]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    x, q = data
    truth = exact_l2(x, q, 10)
    idx, qf, gt = str(built / "x.index"), str(built / "queries.fvecs"), str(built / "gt.ivecs")
    code, out, err = cli_run(
        capsys,
        "search",
        idx,
        qf,
        "-k",
        "10",
        "--nprobe",
        "2",
        "--gt",
        gt,
        "--out",
        str(tmp_path / "r.npz"),
    )
    assert (code, err) == (0, "")
    m = re.search(r"recall@10 ([0-9.]+), 60 queries, k=10, nprobe=2: .* QPS [0-9,]+", out)
    assert m, out
    with np.load(tmp_path / "r.npz") as r:
        ids, dist = r["ids"], r["distances"]
        assert int(r["k"]) == 10
        assert int(r["nprobe"]) == 2
    assert ids.shape == dist.shape == (60, 10)
    assert ids.dtype == np.int64
    assert dist.dtype == np.float32
    assert float(m.group(1)) == pytest.approx(recall(ids, truth), abs=5e-5)
    assert 0.3 < recall(ids, truth) < 1.0  # two of 16 lists: approximate, not exact
    # every list probed: exact search
    code, out, _ = cli_run(capsys, "search", idx, qf, "-k", "10", "--nprobe", "16", "--gt", gt)
    assert code == 0
    assert "recall@10 1.0000" in out


def test_search_prints_a_table(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_run(
        capsys, "search", str(built / "x.index"), str(built / "queries.fvecs"), "-k", "3"
    )
    assert code == 0
    lines = out.splitlines()
    assert [ln.split(":")[0] for ln in lines[:10]] == [f"query {i}" for i in range(10)]
    assert re.fullmatch(
        r"query 0: \d+ \([0-9.e+-]+\), \d+ \([0-9.e+-]+\), \d+ \([0-9.e+-]+\)", lines[0]
    )
    assert lines[10].startswith("... 50 more queries")
    assert "nprobe=1" in lines[11]  # the index's default: 16 / 32 rounded, at least 1


def test_search_hdf5_queries_and_neighbors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, q = clustered(2000, 8, nq=25, nclusters=20, seed=1)
    if h5py is None:
        np.save(tmp_path / "x.npy", x)
        (tmp_path / "ann.hdf5").write_bytes(b"")
        idx = str(tmp_path / "a.index")
        assert main(["build", str(tmp_path / "x.npy"), idx, "--nlist", "8", "--metric", "l2",
                     "--quiet"]) == 0  # fmt: skip
        code, _, err = cli_run(capsys, "search", idx, str(tmp_path / "ann.hdf5"))
        assert code == 1
        assert_one_line_error(err, "needs h5py")
        return
    with h5py.File(tmp_path / "ann.hdf5", "w") as f:
        f["train"] = x
        f["test"] = q
        f["neighbors"] = exact_l2(x, q, 100).astype(np.int32)
        f["distances"] = np.zeros((25, 100), np.float32)
    h5 = str(tmp_path / "ann.hdf5")
    assert (
        main(["build", h5, str(tmp_path / "a.index"), "--nlist", "8", "--metric", "l2", "--quiet"])
        == 0
    )
    capsys.readouterr()
    code, out, err = cli_run(
        capsys,
        "search",
        str(tmp_path / "a.index"),
        h5,
        "-k",
        "10",
        "--nprobe",
        "8",
        "--gt",
        h5,
        "--out",
        str(tmp_path / "r.npz"),
    )
    assert (code, err) == (0, "")
    assert "recall@10 1.0000, 25 queries" in out


def test_search_errors(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = str(built / "x.index")
    write_vecs(tmp_path / "q32.fvecs", np.zeros((3, 32), np.float32))
    code, _, err = cli_run(capsys, "search", idx, str(tmp_path / "q32.fvecs"))
    assert code == 1
    assert_one_line_error(err, "q32.fvecs", "dimension 16", "dimension 32")
    write_vecs(tmp_path / "gt_short.ivecs", np.zeros((60, 5), np.int32))
    code, _, err = cli_run(
        capsys,
        "search",
        idx,
        str(built / "queries.fvecs"),
        "-k",
        "10",
        "--gt",
        str(tmp_path / "gt_short.ivecs"),
    )
    assert code == 1
    assert_one_line_error(err, "recall@10 needs 10", "has 5")
    write_vecs(tmp_path / "gt_rows.ivecs", np.zeros((7, 10), np.int32))
    code, _, err = cli_run(
        capsys, "search", idx, str(built / "queries.fvecs"), "--gt", str(tmp_path / "gt_rows.ivecs")
    )
    assert code == 1
    assert_one_line_error(err, "60 queries")
    code, _, err = cli_run(
        capsys, "search", str(tmp_path / "nothing"), str(built / "queries.fvecs")
    )
    assert code == 1
    assert_one_line_error(err, "no diskivf index")
    code, _, err = cli_run(capsys, "search", idx, str(tmp_path / "missing.fvecs"))
    assert code == 1
    assert_one_line_error(err, "missing.fvecs")


# ------------------------------------------------------------------------------ info, verify


def test_info_text_json_lists(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = str(built / "x.index")
    code, out, _ = cli_run(capsys, "info", idx)
    assert code == 0
    for needle in (
        "format",
        "dim 16",
        "metric l2",
        "nlist 16",
        "default nprobe 1",
        "ntotal 4,000",
        "commit generation 4",
        "on disk",
        "imbalance factor",
        "training",
        "iterations",
        "objective",
        "per query",
        " | ",
    ):
        assert needle in out, needle
    code, out, _ = cli_run(capsys, "info", idx, "--json")
    assert code == 0
    d = json.loads(out)
    assert d["schema"] == "diskivf.info/1"
    expected: dict[str, type] = {
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
    assert {k: type(v) for k, v in d.items()} == expected
    assert (d["dim"], d["nlist"], d["ntotal"], d["generation"]) == (16, 16, 4000, 4)
    assert d["list_sizes"]["imbalance_factor"] >= 1.0
    code, out, _ = cli_run(capsys, "info", idx, "--json", "--lists")
    lists = json.loads(out)["lists"]
    assert [r["list_id"] for r in lists] == list(range(16))
    assert sum(r["count"] for r in lists) == 4000
    code, out, _ = cli_run(capsys, "info", idx, "--lists")
    assert code == 0
    assert len([ln for ln in out.splitlines() if re.match(r"^\d+ ", ln)]) == 16


def test_info_header_forensics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = build_small(tmp_path, 500, "h.index")
    code, out, err = cli_run(capsys, "info", str(idx), "--header")
    assert (code, err) == (0, "")
    assert out.count("problems     none") == 2
    raw = bytearray((idx / fmt.META_NAME).read_bytes())
    raw[fmt.PREAMBLE.size + 3] ^= 0x20  # inside the msgpack header
    (idx / fmt.META_NAME).write_bytes(bytes(raw))
    # plain info refuses, with a hint
    code, _, err = cli_run(capsys, "info", str(idx))
    assert code == 1
    assert_one_line_error(err, "checksum mismatch", "--header")
    code, out, err = cli_run(capsys, "info", str(idx), "--header")
    assert code == 1
    assert "header checksum mismatch" in out
    assert "nlist: 4" in out  # decoded anyway
    assert_one_line_error(err, "damaged: meta.diskivf")
    code, out, _ = cli_run(capsys, "info", str(idx / fmt.COMMIT_NAME), "--header", "--json")
    assert code == 0
    dumps = json.loads(out)
    assert [d["kind"] for d in dumps] == ["commit"]
    assert dumps[0]["header"]["list_counts"]["sum"] == 500


def test_info_help_points_at_the_readme_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_run(capsys, "info", "--help")
    assert code == 0
    assert "docs/cli.md" not in out
    assert "documented in README.md" in out
    section = re.search(r"\(section '([^']+)'\)", " ".join(out.split()))
    assert section is not None
    readme = (REPO / "README.md").read_text(encoding="utf-8").replace("`", "")
    assert f"### {section.group(1)}\n" in readme
    assert "--json schema diskivf.info/1" in readme


def test_info_header_with_lists_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    idx = build_small(tmp_path, 300, "hl.index")
    code, out, err = cli_run(capsys, "info", str(idx), "--header", "--lists")
    assert (code, out) == (2, "")
    assert "--lists: not allowed with argument --header" in err
    code, _, err = cli_run(capsys, "info", str(idx), "--lists", "--header", "--json")
    assert code == 2


def test_verify_clean_and_damaged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    idx = build_small(tmp_path, 800, "v.index")
    code, out, err = cli_run(capsys, "verify", str(idx))
    assert (code, err) == (0, "")
    assert out.startswith("ok: ")
    with open_index(idx) as ix:
        lid = int(np.flatnonzero(ix.list_sizes())[-1])
        rec = fmt.read_commit(idx, ix.nlist, ix.metadata.index_uuid)
    vec = fmt.list_file_names(lid, int(rec.list_gens[lid]))[0]
    raw = bytearray((idx / vec).read_bytes())
    raw[17] ^= 0x01
    (idx / vec).write_bytes(bytes(raw))
    code, out, err = cli_run(capsys, "verify", str(idx))
    assert code == 1
    assert out.startswith("DAMAGED: ")
    assert f"{vec} (list {lid}): checksum mismatch" in out
    assert_one_line_error(err, "index is damaged", vec, f"list {lid}")
    code, out, _ = cli_run(capsys, "verify", str(idx), "--json")
    assert code == 1
    d = json.loads(out)
    assert d["ok"] is False
    assert d["problems"][0]["list_id"] == lid
    assert d["problems"][0]["file"] == vec


# ------------------------------------------------------------------------- real processes


def test_subprocess_end_to_end(tmp_path: Path) -> None:
    x, q = clustered(3000, 8, nq=20, nclusters=20, seed=4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "gt.npy", exact_l2(x, q, 10))
    idx = str(tmp_path / "s.index")
    p = run(
        "build",
        str(tmp_path / "x.npy"),
        idx,
        "--nlist",
        "8",
        "--metric",
        "l2",
        "--batch-size",
        "1000",
    )
    assert (p.returncode, p.stderr) == (0, "")  # stderr is a pipe: no progress bars
    assert p.stdout.startswith("built ")
    p = run(
        "search",
        idx,
        str(tmp_path / "q.npy"),
        "-k",
        "10",
        "--nprobe",
        "8",
        "--gt",
        str(tmp_path / "gt.npy"),
    )
    assert p.returncode == 0
    assert "recall@10 1.0000, 20 queries" in p.stdout
    p = run("info", idx, "--json")
    assert p.returncode == 0
    assert json.loads(p.stdout) == info(idx).to_dict()
    p = run("verify", idx)
    assert (p.returncode, p.stderr) == (0, "")
    p = run("info", str(tmp_path / "missing.index"))
    assert p.returncode == 1
    assert_one_line_error(p.stderr, "no diskivf index")
    p = run("build", str(tmp_path / "x.npy"), idx)
    assert p.returncode == 2
    assert "required" in p.stderr


KILL_MID_WRITE = """
import os, signal, sys
from diskivf.segments import ListWriter
real = ListWriter.write
calls = [0]
limit = int(sys.argv[1])
def write(self, name, offset, data):
    calls[0] += 1
    if calls[0] == limit:
        view = memoryview(data).cast("B")
        real(self, name, offset, view[: len(view) // 2])  # half of this append reaches the file
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, name, offset, data)
ListWriter.write = write
from diskivf.cli import main
sys.exit(main(sys.argv[2:]))
"""

SLOW_ADD = """
import sys, time
from diskivf.index import Index
real = Index.add
def add(self, *a, **k):
    out = real(self, *a, **k)
    time.sleep(0.15)
    return out
Index.add = add
from diskivf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def resume_input(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path, NDArray[np.float32]]:
    d = tmp_path_factory.mktemp("resume")
    x, q = clustered(6000, 8, nq=30, nclusters=30, seed=8)
    write_bin(d / "x.fbin", x)
    ref = d / "ref.index"
    assert (
        main(
            [
                "build",
                str(d / "x.fbin"),
                str(ref),
                "--nlist",
                "8",
                "--metric",
                "l2",
                "--batch-size",
                "500",
                "--seed",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    return d / "x.fbin", ref, q


def _assert_same_index(out: Path, ref: Path, q: NDArray[np.float32]) -> None:
    assert list_files(out) == list_files(ref)
    with open_index(out) as a, open_index(ref) as b:
        assert a.ntotal == b.ntotal == 6000
        ra, rb = a.search(q, k=10, nprobe=3), b.search(q, k=10, nprobe=3)
    np.testing.assert_array_equal(ra.ids, rb.ids)
    np.testing.assert_array_equal(ra.distances, rb.distances)
    assert run("verify", str(out)).returncode == 0


def _resume_build_args(src: Path, out: Path) -> list[str]:
    """The build that the kill -9 resume tests interrupt (it matches ``resume_input``'s)."""
    flags = ["--nlist", "8", "--metric", "l2", "--batch-size", "500", "--seed", "3", "--quiet"]
    return ["build", str(src), str(out), *flags]


def test_resume_after_kill_9_mid_append(
    tmp_path: Path, resume_input: tuple[Path, Path, NDArray[np.float32]]
) -> None:
    src, ref, q = resume_input
    out = tmp_path / "k.index"
    args = _resume_build_args(src, out)
    p = run("50", *args, script=KILL_MID_WRITE)  # batches write 16 list files: dies in the 4th
    assert p.returncode == -signal.SIGKILL, p.stderr
    committed = info(out)
    assert committed.ntotal == 1500
    assert committed.generation == 3
    sizes = {f.name: f.stat().st_size for f in (out / fmt.LISTS_DIR).iterdir()}
    assert sum(sizes.values()) > committed.list_bytes_committed  # a torn, uncommitted tail
    p = run(*args, "--resume")
    assert (p.returncode, p.stderr) == (0, "")
    _assert_same_index(out, ref, q)


def test_resume_after_external_kill_9(
    tmp_path: Path, resume_input: tuple[Path, Path, NDArray[np.float32]]
) -> None:
    src, ref, q = resume_input
    out = tmp_path / "e.index"
    args = _resume_build_args(src, out)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_ADD, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (out / fmt.META_NAME).exists() and (out / fmt.COMMIT_NAME).exists():
                try:
                    if info(out).generation >= 2:
                        break
                except (OSError, ValueError):
                    pass  # a file being replaced right now
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = info(out).ntotal
    assert 0 < done < 6000
    p = run(*args, "--resume")
    assert (p.returncode, p.stderr) == (0, "")
    _assert_same_index(out, ref, q)


# ---------------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("missing.npy", None, "missing.npy"),
        ("garbage.npy", b"not numpy at all", "garbage.npy"),
        ("short.fvecs", b"\x08\x00\x00\x00" + b"\x00" * 10, "short.fvecs"),
        ("bad.fbin", b"\x05\x00\x00\x00\x02\x00\x00\x00" + b"\x00" * 7, "bad.fbin"),
        ("data.csv", b"1,2,3\n", "suffix"),
        ("bad.hdf5", b"not hdf5", "bad.hdf5" if h5py is not None else "needs h5py"),
    ],
)
def test_unreadable_inputs_fail_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes | None,
    needle: str,
) -> None:
    if content is not None:
        (tmp_path / name).write_bytes(content)
    code, out, err = cli_run(
        capsys,
        "build",
        str(tmp_path / name),
        str(tmp_path / "o.index"),
        "--nlist",
        "2",
        "--metric",
        "l2",
    )
    assert code == 1
    assert out == ""
    assert_one_line_error(err, needle)
    assert not (tmp_path / "o.index").exists()


def test_other_failures_fail_with_one_line(
    built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = str(built / "base.fvecs")
    code, _, err = cli_run(
        capsys, "build", base, str(built / "x.index"), "--nlist", "16", "--metric", "l2"
    )
    assert code == 1
    assert_one_line_error(err, "already holds an index", "--resume")
    code, _, err = cli_run(
        capsys, "build", base, str(tmp_path / "y.index"), "--nlist", "9999", "--metric", "l2"
    )
    assert code == 1
    assert_one_line_error(err, "fewer than nlist=9999")
    np.save(tmp_path / "ids.npy", np.arange(3))
    code, _, err = cli_run(
        capsys,
        "build",
        base,
        str(tmp_path / "z.index"),
        "--nlist",
        "4",
        "--metric",
        "l2",
        "--ids",
        str(tmp_path / "ids.npy"),
    )
    assert code == 1
    assert_one_line_error(err, "expected 4000 ids")
    for cmd in ("info", "verify"):
        code, _, err = cli_run(capsys, cmd, str(tmp_path / "nothing"))
        assert code == 1
        assert_one_line_error(err, "no diskivf index")
        code, _, err = cli_run(capsys, cmd, str(tmp_path))
        assert code == 1
        assert_one_line_error(err, "not a diskivf index")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["build", "x.npy", "o"],
        ["build", "x.npy", "o", "--nlist", "4", "--metric", "manhattan"],
        ["build", "x.npy", "o", "--nlist", "four", "--metric", "l2"],
        ["build", "x.npy", "o", "--nlist", "4", "--metric", "l2", "--batch-size", "0"],
        ["search", "i"],
        ["search", "i", "q.npy", "-k", "0"],
        ["info"],
        ["verify", "a", "b"],
        ["merge", "o", "a", "b", "--id-offsets", "abc"],
        ["merge", "o", "a", "b", "--id-offsets", "0,x"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli_run(capsys, *argv)
    assert code == 2
    assert "usage: diskivf" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_run(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out
    assert f"diskivf {command} " in out.split("examples:")[1]
    code, out, _ = cli_run(capsys, "--help")
    assert code == 0
    assert all(c in out for c in SUBCOMMANDS)


def test_merge_id_offsets_usage_error_names_the_value(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = cli_run(capsys, "merge", "o", "a", "--id-offsets", "abc")
    assert (code, out) == (2, "")
    assert "argument --id-offsets: expected 'auto' or comma-separated integers, got 'abc'" in err


def test_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_run(capsys, "--help")
    assert code == 0
    codes = " ".join(out.split("exit codes:")[1].split())
    for entry in ("0 success", "1 failure", "2 usage error", "130 interrupted"):
        assert entry in codes, entry
    assert "130 interrupted" in (cli.__doc__ or "")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    argv = [
        "build",
        str(tmp_path / "missing.npy"),
        str(tmp_path / "o"),
        "--nlist",
        "2",
        "--metric",
        "l2",
    ]
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", *argv])
    p = run(*argv, "--debug")
    assert p.returncode == 1
    assert "Traceback" in p.stderr
    p = run(*argv)
    assert p.returncode == 1
    assert_one_line_error(p.stderr, "missing.npy")


def test_internal_errors_and_interrupts(
    built: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def bug(args: Any) -> int:
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "_cmd_info", bug)
    code, _, err = cli_run(capsys, "info", str(built / "x.index"))
    assert code == 1
    assert_one_line_error(err, "internal error (TypeError: unsupported operand)", "--debug")

    def interrupt(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    import diskivf.build

    monkeypatch.setattr(diskivf.build, "build", interrupt)
    code, _, err = cli_run(capsys, "build", "x.npy", "o", "--nlist", "2", "--metric", "l2")
    assert code == 130
    assert "--resume" in err


def test_python_m_matches_main(built: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_run(capsys, "info", str(built / "x.index"), "--json")
    p = run("info", str(built / "x.index"), "--json")
    assert (p.returncode, p.stdout) == (code, out)


def test_demo_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli_run(
        capsys, "demo", "--n", "2000", "--dim", "8", "--nlist", "8", "--nprobe", "8"
    )
    assert code == 0
    assert "recall@10 at nprobe=8: 1.0000" in out


def test_demo_times_single_queries_after_their_one_time_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A process's first single query loads numba's compiled scan (0.4-0.6 s), which would
    # dwarf the demo's 200 timed queries. A fake clock ticks once per reading, and the
    # load, simulated, takes 1,000 ticks: only outside the timed loop is the rate 200.
    from diskivf import _jit, demo

    clock = [0.0]
    kernel = _jit.scan_topk()

    def tick() -> float:
        clock[0] += 1.0
        return clock[0]

    def slow_first_load() -> _jit.ScanTopK | None:
        monkeypatch.setattr(_jit, "scan_topk", lambda: kernel)
        clock[0] += 1000.0
        return kernel

    monkeypatch.setattr(demo.time, "perf_counter", tick)
    monkeypatch.setattr(_jit, "scan_topk", slow_first_load)
    report = demo.run_demo(n=2000, dim=8, nlist=8, nq=50, nprobe=4)
    assert report.qps_single == 200.0


def test_demo_caps_the_default_nprobe_at_nlist(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli_run(capsys, "demo", "--n", "500", "--dim", "4", "--nlist", "8")
    assert (code, err) == (0, "")
    assert "recall@10 at nprobe=8: " in out
    code, out, err = cli_run(
        capsys, "demo", "--n", "500", "--dim", "4", "--nlist", "4", "--nprobe", "100"
    )
    assert (code, err) == (0, "")
    assert "recall@10 at nprobe=4: 1.0000" in out  # every list probed, as search does
    code, help_text, _ = cli_run(capsys, "demo", "--help")
    assert "capped at --nlist" in " ".join(help_text.split())


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` (or ``path`` itself if it is a file) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


def test_demo_refuses_an_existing_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = build_small(tmp_path, 300, "keep.index")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    plain = tmp_path / "file.bin"
    plain.write_bytes(b"\x00data")
    demo = ["demo", "--n", "300", "--dim", "4", "--nlist", "4"]
    for target in (index, other, plain):
        before = _tree(target)
        code, out, err = cli_run(capsys, *demo, "--out", str(target))
        assert (code, out) == (1, "")
        assert_one_line_error(err, str(target), "already exists" if target is plain else "empty")
        assert _tree(target) == before
    with open_index(index) as ix:
        assert ix.ntotal == 300
    code, help_text, _ = cli_run(capsys, "demo", "--help")
    assert "never overwritten" in " ".join(help_text.split())


def test_demo_out_accepts_a_new_path_or_an_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new.index", empty):
        code, _, err = cli_run(
            capsys, "demo", "--n", "300", "--dim", "4", "--nlist", "4", "--out", str(target)
        )
        assert (code, err) == (0, "")
        with open_index(target) as ix:
            assert (ix.ntotal, ix.nlist, ix.nprobe) == (300, 4, 4)


def test_demo_failure_removes_only_what_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Index, "add", full)
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (tmp_path / "new.index", empty):
        code, _, err = cli_run(
            capsys, "demo", "--n", "300", "--dim", "4", "--nlist", "4", "--out", str(target)
        )
        assert code == 1
        assert_one_line_error(err, "No space left on device")
    assert not (tmp_path / "new.index").exists()
    assert list(empty.iterdir()) == []  # the directory the user made stays, empty again
    code, _, err = cli_run(capsys, "demo", "--n", "3", "--nlist", "4", "--out", str(tmp_path / "x"))
    assert code == 1
    assert_one_line_error(err, "expected nlist <= n", "nlist=4, n=3")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------ verify, info: unfinished builds, newer formats


def test_verify_and_info_report_an_unfinished_parallel_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from diskivf import parallel

    def killed(*args: Any, **kwargs: Any) -> None:
        raise OSError("worker killed")

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((400, 4), np.float32))
    out = tmp_path / "p.index"
    monkeypatch.setattr(parallel, "commit_merged", killed)  # as if killed before its commit
    with pytest.raises(OSError, match="worker killed"):
        parallel.build_parallel(tmp_path / "x.npy", out, nlist=4, batch_size=100)
    monkeypatch.undo()
    assert (out / parallel.WORK_DIR_NAME).is_dir()
    # The committed index is intact, so verify exits 0, but it does not look healthy and empty.
    code, text, err = cli_run(capsys, "verify", str(out))
    assert (code, err) == (0, "")
    assert text.startswith(f"ok (unfinished parallel build present): {out}: generation 0")
    assert "  note: unfinished parallel build (.parallel-build.tmp, " in text
    code, text, _ = cli_run(capsys, "verify", str(out), "--json")
    d = json.loads(text)
    assert (code, d["ok"], d["status"], d["unfinished_build"]) == (0, True, "ok", True)
    assert any("diskivf build --workers N --resume" in n for n in d["notes"])
    code, text, _ = cli_run(capsys, "info", str(out))
    assert code == 0
    assert "\nbuild            unfinished parallel build (.parallel-build.tmp, " in text
    code, text, _ = cli_run(capsys, "info", str(out), "--json")
    d = json.loads(text)
    assert d["unfinished_build"] is True
    assert d["work_dir_bytes"] > 0


@pytest.mark.parametrize(
    ("attack", "file"),
    [
        ("meta_major_2.diskivf", fmt.META_NAME),
        ("meta_required_feature.diskivf", fmt.META_NAME),
        ("commit_major_2.msgpack", fmt.COMMIT_NAME),
    ],
)
def test_verify_and_info_header_call_a_newer_format_unsupported_not_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], attack: str, file: str
) -> None:
    import shutil

    attacks = REPO / "tests" / "attacks"
    idx = tmp_path / "new.index"
    shutil.copytree(attacks / "base", idx)
    shutil.copyfile(attacks / attack, idx / file)
    code, out, err = cli_run(capsys, "verify", str(idx))
    assert code == 1
    assert out.startswith(f"unsupported: {idx}: {file}: ")
    assert_one_line_error(err, "unsupported: ", file, "upgrade diskivf to read it")
    assert "damaged" not in (out + err).lower()
    code, out, _ = cli_run(capsys, "verify", str(idx), "--json")
    d = json.loads(out)
    assert (code, d["ok"], d["status"], d["problems"]) == (1, False, "unsupported", [])
    assert d["unsupported"].startswith(f"{file}: ")
    code, out, err = cli_run(capsys, "info", str(idx), "--header")
    assert code == 1
    assert_one_line_error(err, f"unsupported: {file}: ", "upgrade diskivf to read it")
    assert "damaged" not in err
    code, out, _ = cli_run(capsys, "info", str(idx), "--header", "--json")
    statuses = {Path(h["file"]).name: h["status"] for h in json.loads(out)}
    assert code == 1
    assert statuses[file] == "unsupported"
    assert set(statuses.values()) == {"ok", "unsupported"}


def test_info_header_names_both_unsupported_and_damaged_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    attacks = REPO / "tests" / "attacks"
    idx = tmp_path / "mixed.index"
    shutil.copytree(attacks / "base", idx)
    shutil.copyfile(attacks / "meta_major_2.diskivf", idx / fmt.META_NAME)
    shutil.copyfile(attacks / "commit_trailing_bytes.msgpack", idx / fmt.COMMIT_NAME)
    code, _, err = cli_run(capsys, "info", str(idx), "--header")
    assert code == 1
    assert_one_line_error(
        err, f"unsupported: {fmt.META_NAME}: written by a newer diskivf", "; damaged: commit"
    )
