"""``tools/bench.py`` end to end on tiny datasets: the structure of its output, not timings."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import diskivf
from diskivf.demo import clustered, exact_knn

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "bench.py"
TINY = ["--n", "3000", "--dim", "16", "--nlist", "16", "--nq", "40", "--k", "10"]
TINY += ["--nprobe", "1,4", "--repeats", "1", "--single", "8"]
HAS_FAISS = importlib.util.find_spec("faiss") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
STATUSES = {"PASS", "MISS", "N/A"}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _tool_module(TOOL.name)


def _tool_module(filename: str) -> ModuleType:
    """Import ``tools/filename`` as a module, with ``tools/`` importable meanwhile (the tools
    import each other)."""
    sys.path.insert(0, str(REPO / "tools"))
    try:
        spec = importlib.util.spec_from_file_location(
            f"_tools_{filename[:-3]}", REPO / "tools" / filename
        )
        assert spec is not None
        assert spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "tools"))
    return mod


def _run_tool(
    tool: Path, args: list[str], env: dict[str, str], *, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``tool``; it must succeed, or with ``ok=False`` fail."""
    proc = subprocess.run(
        [sys.executable, str(tool), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        assert proc.returncode != 0
    return proc


def _run(
    args: list[str], out: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = _run_tool(TOOL, [*args, "--out", str(out)], env)
    return proc, json.loads((out / "results.json").read_text())


def _check_rows(rows: list[dict[str, Any]], engines: set[str], threads: list[int]) -> None:
    assert {r["engine"] for r in rows} == engines
    assert len(rows) == len(engines) * len(threads) * 2  # two nprobe values
    for r in rows:
        assert r["threads"] in threads
        assert r["nprobe"] in (1, 4)
        assert 0.0 <= r["recall"] <= 1.0
        for key in ("batch_qps", "single_qps", "single_p50_ms", "single_p99_ms"):
            assert r[key] > 0, key
        assert r["single_p50_ms"] <= r["single_p99_ms"]
        assert r["vectors_per_query"] > 0
        # diskivf says how many single queries it split; tiny ones never are (4 MiB floor).
        assert r["single_split_share"] == (0.0 if r["engine"] == "diskivf" else None)
    # More lists probed: never less work, never lower recall (same centroids, same queries).
    for e in engines:
        for t in threads:
            r1, r4 = (
                next(r for r in rows if (r["engine"], r["threads"], r["nprobe"]) == key)
                for key in ((e, t, 1), (e, t, 4))
            )
            assert r4["vectors_per_query"] >= r1["vectors_per_query"]
            assert r4["recall"] >= r1["recall"]


def test_generated_data_all_engines(tmp_path: Path, child_env: dict[str, str]) -> None:
    out = tmp_path / "out"
    proc, res = _run([*TINY, "--threads", "1,2"], out, child_env)
    engines = {"diskivf", "faiss-mem", "faiss-disk"} if HAS_FAISS else {"diskivf"}
    _check_rows(res["search"], engines, [1, 2])
    assert res["phases_steal"].keys() == res["phases_s"].keys()
    assert all(v is None or 0.0 <= v <= 1.0 for v in res["phases_steal"].values())
    for r in res["search"]:
        if r["engine"] == "faiss-mem":
            assert r["cold"] is None  # nothing to evict
        else:
            cold = r["cold"]
            assert cold["single_qps"] > 0
            assert cold["batch_qps"] > 0
            assert cold["open_ms"] >= 0
            if cold["resident_after_evict"] is not None:
                assert 0.0 <= cold["resident_after_evict"] <= 1.0
    for r in res["search"]:  # the pass with every engine in one process, query by query
        assert r["interleaved"]["single_qps"] > 0
        assert len(r["interleaved"]["single_qps_runs"]) == res["config"]["rounds"]
        assert r["interleaved"]["single_p50_ms"] <= r["interleaved"]["single_p99_ms"]
        # QPS over the queries right after each other engine's, none after itself
        for e in engines:
            after = r["interleaved"].get(f"after_{e}_qps")
            assert (after is None) == (e == r["engine"]), (r["engine"], e)
            assert after is None or after > 0
    diskivf_row = res["search"][0]
    assert diskivf_row["engine"] == "diskivf"
    assert diskivf_row["bytes_per_query"] == pytest.approx(
        diskivf_row["vectors_per_query"] * 16 * 4
    )

    ds = res["dataset"]
    assert (ds["n"], ds["dim"], ds["nq"], ds["k"], ds["metric"]) == (3000, 16, 40, 10, "l2")
    assert ds["gt_source"] == "computed"
    gt = np.load(ds["gt_path"])
    assert gt.shape == (40, 10)
    assert set(res["build"]) == ({"diskivf", "faiss"} if HAS_FAISS else {"diskivf"})
    # Each build went to its own directory; the last one is kept as the index, no spares.
    assert (out / "diskivf.index").is_dir()
    assert not list(out.glob("diskivf.build*"))
    for b in res["build"].values():
        assert b["train_s"] > 0
        assert b["add_s"] > 0
        assert b["ntotal"] == 3000
        assert b["peak_rss_bytes"] > 0
    assert set(res["memory"]) == engines
    assert all(m["peak_anon_bytes"] > 0 for m in res["memory"].values())
    for key in ("cpu_count", "sgemm_gflops_1t", "read_gbps_1t", "blas"):
        assert key in res["machine"]

    summary = res["summary"]
    assert summary["nprobe"] in (None, 1, 4)
    names = [t["name"] for t in summary["targets"]]
    assert sum("batch QPS vs FAISS in memory" in n for n in names) == 2  # 1 and 2 threads
    assert sum("interleaved in one process" in n for n in names) == 4  # in memory, on disk
    assert any("peak anonymous RSS" in n for n in names)
    assert any("train + add" in n for n in names)
    assert {t["status"] for t in summary["targets"]} <= STATUSES
    if not HAS_FAISS:
        assert all(t["status"] == "N/A" for t in summary["targets"] if "FAISS" in t["name"])

    headings = ["== machine", "== build", "== search, warm", "== search, cold", "== targets"]
    for heading in [*headings, "== single queries, engines interleaved"]:
        assert heading in proc.stdout
    assert ("after faiss-disk" in proc.stdout) == HAS_FAISS
    assert ("recall_qps.png" in proc.stdout) == HAS_MPL
    assert (out / "recall_qps.png").exists() == HAS_MPL

    # A second run reuses the cached data and ground truth.
    args = [*TINY, "--threads", "1", "--no-faiss", "--no-cold", "--no-interleaved"]
    proc, again = _run(args, out, child_env)
    assert again["dataset"]["gt_source"] == "cached"
    assert {r["engine"] for r in again["search"]} == {"diskivf"}
    assert all(r["cold"] is None for r in again["search"])
    assert all(r.get("interleaved") is None for r in again["search"])
    assert "interleaved" not in proc.stdout


def test_interleave_names_the_engines_of_the_interleaved_pass(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    args = [*TINY, "--threads", "1", "--no-cold", "--interleave", "diskivf,faiss-disk"]
    args += ["--faiss-disk-prefetch-threads", "1"]
    proc, res = _run(args, tmp_path / "out", child_env)
    interleaved = {r["engine"] for r in res["search"] if r["interleaved"] is not None}
    assert res["config"]["faiss_disk_prefetch_threads"] == 1
    if HAS_FAISS:
        assert {r["engine"] for r in res["search"]} == {"diskivf", "faiss-mem", "faiss-disk"}
        assert interleaved == {"diskivf", "faiss-disk"}
        assert "single queries of diskivf, faiss-disk interleaved" in proc.stderr
        # faiss-mem is searched in its own process but not interleaved: that target is N/A
        lines = [t for t in res["summary"]["targets"] if "interleaved" in t["name"]]
        assert {t["status"] for t in lines if "in memory" in t["name"]} == {"N/A"}
        assert not any("not measured" in t["detail"] for t in lines if "on disk" in t["name"])
        # FAISS's on-disk lists ran with the prefetch threads asked for, and the targets
        # against them say so; those against FAISS in memory do not.
        assert res["threads_mode"]["faiss-disk"].endswith("up to 1 prefetch threads")
        assert res["threads_mode"]["faiss-mem"] == "omp_set_num_threads"
        for t in res["summary"]["targets"]:
            named = "prefetch_nthread=1, not FAISS's default" in t["detail"]
            assert named == ("on disk" in t["name"] and t["status"] != "N/A"), t
    else:
        assert interleaved == {"diskivf"}
        assert "faiss-disk not benchmarked, left out" in proc.stderr


@pytest.mark.parametrize("value", ["diskivf,faiss", ","])
def test_interleave_refuses_unknown_engines(bench: ModuleType, value: str) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--interleave", value])


def test_faiss_disk_prefetch_threads_must_not_be_negative(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.parse_args(["--faiss-disk-prefetch-threads", "0"]).faiss_disk_prefetch_threads == 0
    with pytest.raises(SystemExit):
        bench.parse_args(["--faiss-disk-prefetch-threads", "-1"])
    assert "--faiss-disk-prefetch-threads must be >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_balanced_orders(bench: ModuleType, n: int) -> None:
    """Each order holds every engine once; end to end and round again, every engine follows
    every other one exactly once (a rotation would not: see balanced_orders)."""
    orders = bench.balanced_orders(n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    flat = [e for o in orders for e in o]
    follows = Counter(zip(flat, flat[1:] + flat[:1], strict=True))
    if n == 1:
        assert orders == [(0,)]
    else:
        assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
        assert set(follows.values()) == {1}


def test_balanced_orders_needs_an_engine(bench: ModuleType) -> None:
    with pytest.raises(ValueError, match="at least one engine, got 0"):
        bench.balanced_orders(0)


def test_file_input_without_optional_dependencies(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    """faiss, matplotlib and threadpoolctl missing: diskivf alone, with a message for each."""
    fakes = tmp_path / "fakes"
    for name in ("faiss", "matplotlib", "threadpoolctl"):
        (fakes / name).mkdir(parents=True)
        (fakes / name / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    env = dict(child_env)
    env["PYTHONPATH"] = f"{fakes}:{env.get('PYTHONPATH', '')}"
    x, _ = clustered(2000, 8, nclusters=20, seed=3)
    np.save(tmp_path / "vectors.npy", x)
    args = ["--data", str(tmp_path / "vectors.npy"), "--nq", "30", "--nlist", "8"]
    args += ["--nprobe", "1,4", "--threads", "1", "--repeats", "1", "--single", "5", "--no-cold"]
    proc, res = _run(args, tmp_path / "out", env)
    for name in ("faiss", "matplotlib", "threadpoolctl"):
        assert f"{name} is not installed" in proc.stderr
    _check_rows(res["search"], {"diskivf"}, [1])
    ds = res["dataset"]
    assert (ds["n"], ds["nq"], ds["dim"]) == (1970, 30, 8)  # the last 30 rows are the queries
    gt = np.load(ds["gt_path"])
    np.testing.assert_array_equal(gt, exact_knn(x[:1970], x[1970:], 10))
    assert res["plot"] is None
    assert not (tmp_path / "out" / "recall_qps.png").exists()
    assert res["machine"]["blas"] is None
    assert all(t["status"] == "N/A" for t in res["summary"]["targets"] if "FAISS" in t["name"])


def test_hdf5_ann_benchmarks_layout(tmp_path: Path, child_env: dict[str, str]) -> None:
    h5py = pytest.importorskip("h5py")
    x, q = clustered(1500, 8, nq=20, nclusters=15, seed=4)
    gt = exact_knn(x, q, 10, metric="cosine")
    path = tmp_path / "tiny-8-angular.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["distance"] = "angular"
        f["train"], f["test"], f["neighbors"] = x, q, gt.astype(np.int32)
    args = ["--data", str(path), "--nlist", "8", "--nprobe", "1,4", "--threads", "1"]
    args += ["--repeats", "1", "--single", "5", "--no-cold", "--no-faiss"]
    _, res = _run(args, tmp_path / "out", child_env)
    ds = res["dataset"]
    assert (ds["n"], ds["nq"], ds["metric"]) == (1500, 20, "cosine")
    assert ds["gt_source"].startswith("given")
    _check_rows(res["search"], {"diskivf"}, [1])


def test_steal_share_is_the_stolen_part_of_the_time_spent(bench: ModuleType) -> None:
    # user, nice, system, idle, iowait, irq, softirq, steal
    assert bench.steal_share([60, 0, 10, 20, 0, 0, 0, 10]) == pytest.approx(0.1)
    assert bench.steal_share([0] * 8) is None
    ticks = bench.cpu_ticks()
    assert ticks is None or (len(ticks) == 8 and min(ticks) >= 0)


def test_exact_topk_matches_brute_force(bench: ModuleType) -> None:
    x, q = clustered(3000, 12, nq=25, nclusters=30, seed=5)
    for metric in ("l2", "ip", "cosine"):
        got = bench.exact_topk(x, q, 7, metric, block_rows=500, query_block=10)
        np.testing.assert_array_equal(got, exact_knn(x, q, 7, metric=metric))


def test_operating_point_and_targets(bench: ModuleType) -> None:
    def row(engine: str, t: int, p: int, recall: float, qps: float) -> dict[str, Any]:
        cold = {"single_qps": qps / 2} if engine != "faiss-mem" else None
        out = {
            "engine": engine,
            "threads": t,
            "nprobe": p,
            "recall": recall,
            "batch_qps": qps,
            "single_qps": qps / 10,
            "cold": cold,
        }
        if t == 1:  # three rounds timed, diskivf's faster in some; 2-thread rows carry no runs
            drift = (1.0, 0.5, 2.0) if engine == "diskivf" else (1.0, 1.0, 1.0)
            out["single_qps_runs"] = [qps / 10 * f for f in drift]
        return out

    rows = []
    for t in (1, 2):
        rows += [row("diskivf", t, 4, 0.85, 300.0), row("diskivf", t, 8, 0.93, 200.0)]
        rows += [row("faiss-mem", t, 4, 0.91, 100.0), row("faiss-mem", t, 8, 0.95, 100.0)]
        rows += [row("faiss-disk", t, 4, 0.91, 10.0), row("faiss-disk", t, 8, 0.95, 10.0)]
    results = {
        "search": rows,
        "build": {
            "diskivf": {"train_s": 1.0, "add_s": 1.0, "train_s_runs": [1, 1], "add_s_runs": [1, 2]},
            "faiss": {"train_s": 1.0, "add_s": 0.5, "train_s_runs": [1, 2], "add_s_runs": [1, 1]},
        },
        "memory": {"diskivf": {"peak_anon_bytes": 100 << 20}},
        "dataset": {"n": 1_000_000, "dim": 128},
    }
    summary = bench.evaluate_targets(results)
    assert summary["nprobe"] == 8  # diskivf needs 8; the comparison uses the larger
    assert summary["nprobe_per_engine"] == {"diskivf": 8, "faiss-disk": 4, "faiss-mem": 4}
    by_name = {t["name"]: t for t in summary["targets"]}
    batch = by_name["batch QPS vs FAISS in memory (1 thread, nprobe=8)"]
    assert (batch["value"], batch["status"]) == (2.0, "PASS")
    disk = by_name["single-query QPS vs FAISS on disk (2 threads, nprobe=8)"]
    assert (disk["value"], disk["status"]) == (20.0, "PASS")
    build = by_name["train + add time vs FAISS"]
    assert build["value"] == pytest.approx(2.0 / 1.5)
    assert build["status"] == "MISS"
    # Per-round ratios pair each engine's i-th run, timed in the same round.
    assert build["per_round"] == pytest.approx([2 / 2, 3 / 3])
    assert build["detail"].endswith("; per round 1.00-1.00x")
    single = by_name["single-query QPS vs FAISS on disk (1 thread, nprobe=8)"]
    assert single["per_round"] == pytest.approx([20.0, 10.0, 40.0])
    assert single["detail"] == "diskivf 20 / faiss-disk 1 QPS; per round 10.00-40.00x"
    # A run against FAISS's on-disk lists with fewer prefetch threads than its default names
    # that setting beside those targets.
    results["config"] = {"faiss_disk_prefetch_threads": 0}
    again = {t["name"]: t for t in bench.evaluate_targets(results)["targets"]}
    assert again[single["name"]]["detail"].startswith(
        "diskivf 20 / faiss-disk 1 QPS (prefetch_nthread=0, not FAISS's default)"
    )
    assert again[batch["name"]]["detail"] == batch["detail"]
    # Rows without runs, or runs that do not pair up, give no per-round ratios.
    assert by_name["single-query QPS vs FAISS on disk (2 threads, nprobe=8)"]["per_round"] == []
    assert bench._paired([1.0, 2.0], [1.0]) == []
    assert bench._paired([1.0, 3.0], [2.0, 1.0]) == [0.5, 3.0]
    rss = next(t for t in summary["targets"] if "peak anonymous RSS" in t["name"])
    assert (rss["value"], rss["status"]) == (100.0, "PASS")


def test_bench_writes_reports_each_phase_and_cleans_up(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    scratch = tmp_path / "not" / "yet"  # --dir is created when missing
    args = ["--dir", str(scratch), "--files", "6", "--rounds", "3", "--chunk", "4096"]
    proc = _run_tool(REPO / "tools" / "bench_writes.py", [*args, "--pause", "0"], child_env)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("6 files x 3 appends of 4096 B")
    runs = [ln for ln in lines if ln.strip().startswith(("repeat", "median"))]
    assert len(runs) == 4  # three repeats and the medians
    for ln in runs:
        fields = dict(f.strip().rsplit(" ", 1) for f in ln.split(":", 1)[1].split(", "))
        assert set(fields) == {"create us", "write s", "sync s", "total s"}
        assert all(float(v) >= 0 for v in fields.values())
    assert list(scratch.iterdir()) == []  # every scratch directory removed


def test_bench_add_times_every_phase_and_cleans_up(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    base = tmp_path / "base.npy"
    np.save(base, clustered(3000, 16, nclusters=30)[0])
    scratch = tmp_path / "scratch"  # created by the tool
    args = [str(base), "--nlist", "8", "--rounds", "2", "--dir", str(scratch)]
    lines = _run_tool(REPO / "tools" / "bench_add.py", args, child_env).stdout.splitlines()
    phases = ["prepare", "checksums", "checksums zlib", "assign", "write", "sync", "add"]
    if HAS_FAISS:
        phases += ["faiss assign", "faiss add"]
    timing = re.compile(r"([a-z ]+?) +(\d+\.\d+) s \(cpu (\d+\.\d+)\)")
    rounds = [timing.findall(ln.split(": ", 1)[1]) for ln in lines if ln.startswith("round ")]
    start = lines.index("median:")
    medians = [timing.findall(ln)[0] for ln in lines[start + 1 : start + 1 + len(phases)]]
    assert len(rounds) == 2
    heads = [ln.split(": ", 1)[0] for ln in lines if ln.startswith("round ")]
    assert all(re.fullmatch(r"round \d \(steal (\d+%|n/a)\)", h) for h in heads), heads
    for row in [*rounds, medians]:
        assert [name.strip() for name, _, _ in row] == phases
        assert all(float(wall) >= 0 and float(cpu) >= 0 for _, wall, cpu in row)
    assert any(ln.startswith("diskivf add ") for ln in lines[start:])
    assert list(scratch.iterdir()) == []  # every index built was removed


def _tiny_index(path: Path) -> None:
    """2000 x 16 clustered vectors in 8 lists: the index the single-tool tests time."""
    x, _ = clustered(2000, 16, nclusters=20)
    with diskivf.open(path, mode="w", dim=16, nlist=8) as index:
        index.train(x)
        index.add(x)


def test_bench_cold_times_every_mode_and_thread_count(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    _tiny_index(tmp_path / "i")
    np.save(tmp_path / "q.npy", clustered(30, 16, nclusters=20)[0])
    args = [str(tmp_path / "i"), str(tmp_path / "q.npy"), "--n", "30", "--nprobe", "4"]
    args += ["--rounds", "2", "--threads", "1,2"]
    lines = _run_tool(REPO / "tools" / "bench_cold.py", args, child_env).stdout.splitlines()
    row = re.compile(r"prefetch (\w+)\s+threads (\d): median\s+(\d+) cold QPS \((\d+), (\d+)\)")
    found = [row.fullmatch(ln) for ln in lines]
    assert all(found), lines
    got = [(m[1], int(m[2])) for m in found if m]
    assert got == [(mode, t) for mode in ("off", "new", "all", "inline") for t in (1, 2)]
    gemv = [*args[:-2], "--threads", "1", "--modes", "gemv,new"]
    lines = _run_tool(REPO / "tools" / "bench_cold.py", gemv, child_env).stdout.splitlines()
    assert [m[1] for m in map(row.fullmatch, lines) if m] == ["gemv", "new"]
    for m in found:
        assert m is not None
        runs = sorted(int(v) for v in m.group(4, 5))
        assert 0 < runs[0] <= int(m[3]) <= runs[1]  # the median of two lies between them
    bad = [*args[:2], "--modes", "new,x"]
    proc = _run_tool(REPO / "tools" / "bench_cold.py", bad, child_env, ok=False)
    assert "expected --modes from off, new, all, inline, gemv but got ['x']" in proc.stderr


def test_bench_kernels_prints_its_tables(tmp_path: Path, child_env: dict[str, str]) -> None:
    _tiny_index(tmp_path / "i")
    args = [str(tmp_path / "i"), "--lists", "4", "--rounds", "1", "--stream-mb", "1,2"]
    args += ["--stream-dims", "32,128", "--stream-queries", "3"]
    lines = _run_tool(REPO / "tools" / "bench_kernels.py", args, child_env).stdout.splitlines()
    gemm_rows = [ln.split() for ln in lines if re.fullmatch(r"\s*\d+(\s+\d+\.\d)+", ln)]
    assert [int(row[0]) for row in gemm_rows] == [1, 2, 3, 4, 6, 8, 16, 32, 64]
    assert {len(row) for row in gemm_rows} == {5}  # four kernels
    single = dict(ln.strip().split(": ") for ln in lines if re.match(r"\s*[\w +]+, [\w ]+: ", ln))
    assert {"GEMV, maps", "einsum, maps", "einsum, in cache", "copy, maps"} <= set(single)
    assert {"matmul, maps", "lines read, maps", "lines read + GEMV, maps"} <= set(single)
    faiss_rows = {"FAISS, maps", "FAISS, anonymous", "FAISS, in cache"}
    assert faiss_rows <= set(single) or any("faiss is not installed" in ln for ln in lines)
    # numba is in the test extras; CI's second pass turns the compiled scan off.
    assert ("compiled scan, maps" in single) == (child_env.get("DISKIVF_JIT") != "0")
    assert all(float(v) > 0 for v in single.values())
    assert any(ln.startswith("anonymous memory in huge pages: ") for ln in lines)
    dot = r"BLAS's dot of 200,000 elements, .*: float32 [\d.]+ / [\d.]+, float64 [\d.]+ / [\d.]+$"
    assert any(re.match(dot, ln) for ln in lines) == hasattr(np, "vecdot")
    at = next((i for i, ln in enumerate(lines) if ln.startswith("streamed: ")), None)
    if not hasattr(np, "vecdot"):  # numpy 1: no vecdot, so no table of it against GEMV
        assert at is None
        return
    assert at is not None
    assert re.search(r"last-level cache \d+ MiB$", lines[at])
    assert lines[at + 1].split() == ["dim", "1", "MB", "2", "MB"]
    streamed = [lines[at + 2].split(), lines[at + 3].split()]
    assert [row[0] for row in streamed] == ["32", "128"]
    assert [len(row) for row in streamed] == [3, 3]
    assert all(float(v) > 0 for row in streamed for v in row[1:])


def test_bench_single_compares_one_and_two_threads(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    _tiny_index(tmp_path / "i")
    args = [str(tmp_path / "i"), "--nq", "20", "--nprobe", "1,8", "--rounds", "2"]
    row = re.compile(r"(\s+\d+(\.\d+)?){5}\s+\d+%\s+(\d+%|n/a)")

    def rows(extra: list[str]) -> tuple[list[list[str]], list[str]]:
        tool = REPO / "tools" / "bench_single.py"
        lines = _run_tool(tool, args + extra, child_env).stdout.splitlines()
        rates = r"memory read, GEMV: \d+\.\d GB/s on 1 thread, \d+\.\d on 2"
        assert re.fullmatch(rates, lines[0])
        assert re.fullmatch(r"thread pool round trip: \d+ us \(median\)", lines[1])
        wake = r"waking a worker idle 2 ms: submit \d+ us in the caller, task starts \d+ us after"
        assert re.fullmatch(wake + r" the call \(medians\)", lines[2])
        # 2000 rows over 8 lists: calls of 250 rows.
        per_list = r"memory read, one GEMV per 250 rows of 16 \(this index's mean list\): "
        assert re.fullmatch(per_list + r"\d+\.\d GB/s on 1 thread, \d+\.\d on 2", lines[3])
        return [ln.split() for ln in lines if row.fullmatch(ln)], lines

    found, lines = rows([])
    assert [int(r[0]) for r in found] == [1, 8]
    for _, mb, one, two, ratio, split, steal in found:
        assert steal == "n/a" or 0 <= int(steal.rstrip("%")) <= 100
        assert float(mb) > 0
        assert float(ratio) == pytest.approx(float(two) / float(one), abs=0.01)
        assert split == "0%"  # 128 KB at most: below any split
    # All 8 lists hold the 2000 x 16 float32 vectors: 128 KB per query at nprobe 8.
    assert float(found[1][1]) == pytest.approx(0.13, abs=0.01)
    assert lines[-1] == "worker start delay in splits: no split"
    forced, lines = rows(["--always-split"])
    assert [r[-2] for r in forced] == ["0%", "100%"]  # nprobe 1 reads one list: nothing to split
    assert re.fullmatch(r"worker start delay in splits: \d+ us \(median\)", lines[-1])


def test_bench_query_split_times_the_search_and_its_scan(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    _tiny_index(tmp_path / "i")
    args = [str(tmp_path / "i"), "--nq", "20", "--nprobe", "1,8", "--rounds", "2"]
    for sweep in ("0", "1"):
        tool = REPO / "tools" / "bench_query_split.py"
        lines = _run_tool(tool, [*args, "--sweep-mb", sweep], child_env).stdout.splitlines()
        head = f"20 queries, 2 rounds, one thread, {sweep} MB read before each timed call"
        assert lines[0].endswith(head)
        found = [ln.split() for ln in lines[2:]]
        assert [int(r[0]) for r in found] == [1, 8]
        for _, mb, whole, alone, share, per_round, rate in found:
            assert min(float(whole), float(alone)) > 0
            slack = 0.005 + 0.05 / float(whole) + 0.05 / float(alone)
            assert float(share) == pytest.approx(float(alone) / float(whole), abs=slack)
            lo, hi = (float(v) for v in per_round.split("-"))
            assert 0 < lo <= hi
            # MB/q is printed to 0.01, the times to 0.1 us, the rate from the unrounded ones.
            lo_rate = (float(mb) - 0.005) * 1e3 / (float(alone) + 0.05)
            hi_rate = (float(mb) + 0.005) * 1e3 / (float(alone) - 0.05)
            assert lo_rate - 0.05 <= float(rate) <= hi_rate + 0.05
        # All 8 lists hold the 2000 x 16 float32 vectors: 128 KB per query at nprobe 8.
        assert float(found[1][1]) == pytest.approx(0.13, abs=0.01)
    tool = REPO / "tools" / "bench_query_split.py"
    lines = _run_tool(tool, [*args, "--layouts", "5"], child_env).stdout.splitlines()
    at = lines.index("the row kernel alone over the first 5 queries' lists, us per query (GB/s):")
    layouts = ["maps", "anonymous per list", "adjacent, per list", "adjacent, one call"]
    assert re.split(r"\s{2,}", lines[at + 1].strip()) == ["nprobe", *layouts]
    cells = [re.findall(r"(\d+\.\d) \((\d+\.\d)\)", ln) for ln in lines[at + 2 :]]
    assert [int(ln.split()[0]) for ln in lines[at + 2 :]] == [1, 8]
    assert [len(c) for c in cells] == [4, 4]
    assert all(float(us) > 0 and float(rate) > 0 for c in cells for us, rate in c)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_bench_query_split_scans_what_the_search_scans(tmp_path: Path, metric: str) -> None:
    tool = _tool_module("bench_query_split.py")
    x, q = clustered(2000, 16, nq=10, nclusters=20, seed=3)
    with diskivf.open(tmp_path / "i", mode="w", dim=16, nlist=8, metric=metric) as index:
        index.train(x)
        index.add(x)
        index.remove(np.arange(0, 2000, 7))  # removed rows are scored as search scores them
        scans = [tool.Scan(index, row, 3) for row in q]
        tool.check(index, scans, 3)  # agrees: returns
        scans[4].qv = scans[4].qv * np.float32(0.5)  # scores what the search does not
        with pytest.raises(SystemExit, match="nprobe 3, query 4: the scan gives"):
            tool.check(index, scans, 3)


def test_bench_batch_threads_reports_estimate_and_choice(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    x, q = clustered(4000, 16, nq=400, nclusters=40, seed=12)
    with diskivf.open(tmp_path / "i", mode="w", dim=16, nlist=16) as index:
        index.train(x)
        index.add(x)
    np.save(tmp_path / "q.npy", q)
    args = [str(tmp_path / "i"), str(tmp_path / "q.npy"), "--nprobe", "1,16", "--rounds", "2"]
    for nq, last in (("160", "one"), ("400", "threads")):
        tool = REPO / "tools" / "bench_batch_threads.py"
        lines = _run_tool(tool, [*args, "--nq", nq], child_env).stdout.splitlines()
        assert lines[0] == f"{nq} queries, threshold 20 us"
        found = [ln.split() for ln in lines[2:]]
        assert [int(r[0]) for r in found] == [1, 16]
        for _, visit, one, many, ratio, _default, steal in found:
            assert float(visit) >= 0
            assert min(float(one), float(many)) > 0
            assert float(ratio) == pytest.approx(float(many) / float(one), abs=0.01)
            assert steal == "n/a" or 0 <= int(steal.rstrip("%")) <= 100
        # nprobe 1: each query's one list, ~1 us; nprobe 16: as in test_index's threshold test.
        assert [r[5] for r in found] == ["one", last]


def test_bench_versions_times_two_versions_side_by_side(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    _tiny_index(tmp_path / "i")
    args = [str(tmp_path / "i"), "--base", "HEAD", "--nq", "20", "--nprobe", "1,8", "--rounds", "2"]
    args += ["--rtol", "1e-6"]  # identical versions agree within any tolerance
    lines = _run_tool(REPO / "tools" / "bench_versions.py", args, child_env).stdout.splitlines()
    assert lines[0].endswith("base HEAD, variant working tree")
    found = [ln.split() for ln in lines[2:]]
    assert [int(r[0]) for r in found] == [1, 8]
    for _, base, variant, ratio, per_round in found:
        assert min(float(base), float(variant)) > 0
        # The times are printed to 0.1 us, the ratio from the unrounded ones.
        slack = 0.0005 + 0.05 / float(base) + 0.05 / float(variant)
        assert float(ratio) == pytest.approx(float(variant) / float(base), abs=slack)
        lo, hi = (float(v) for v in per_round.split("-"))
        assert 0 < lo <= hi
    bad = [args[0], "--base", "no-such-revision"]
    proc = _run_tool(REPO / "tools" / "bench_versions.py", bad, child_env, ok=False)
    assert "cannot read diskivf/ at revision 'no-such-revision'" in proc.stderr


def test_bench_policy_times_each_version_in_fresh_processes(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    _tiny_index(tmp_path / "i")
    args = [str(tmp_path / "i"), "--base", "HEAD", "--nq", "20", "--nprobe", "8", "--pairs", "3"]
    lines = _run_tool(REPO / "tools" / "bench_policy.py", args, child_env).stdout.splitlines()
    assert lines[0].endswith("3 pairs; base HEAD, variant working tree")
    pairs = [ln.split() for ln in lines[2:5]]
    assert [int(r[0]) for r in pairs] == [1, 2, 3]
    for _, b1, bt, bsplit, v1, vt, vsplit in pairs:
        assert min(float(x) for x in (b1, bt, v1, vt)) > 0
        assert bsplit == vsplit == "0%"  # 20 KB queries: under the size ever split
    assert lines[5] == "medians over pairs:"
    for line, col in ((lines[6], 1), (lines[7], 4)):
        one = statistics.median(float(r[col]) for r in pairs)
        many = statistics.median(float(r[col + 1]) for r in pairs)
        m = re.fullmatch(
            r"\s+\w+\s+1t\s+(\d+) QPS, 2t\s+(\d+) QPS, split\s+0%, 2t / 1t ([\d.]+) "
            r"\(lowest ([\d.]+)\)",
            line,
        )
        assert m is not None, line
        assert (int(m[1]), int(m[2])) == (round(one), round(many))
        assert 0 < float(m[4]) <= float(m[3])
    ratios = sorted(float(v[5]) / float(b[2]) for b, v in zip(pairs, pairs, strict=True))
    m = re.fullmatch(r"  variant / base at 2 threads: ([\d.]+) \(([\d.]+)-([\d.]+)\)", lines[8])
    assert m is not None, lines[8]
    # From the unrounded QPS: within rounding of the printed ones.
    assert float(m[1]) == pytest.approx(ratios[1], rel=0.01)
    assert float(m[2]) <= float(m[1]) <= float(m[3])
    bad = [args[0], "--base", "no-such-revision", "--pairs", "1"]
    proc = _run_tool(REPO / "tools" / "bench_policy.py", bad, child_env, ok=False)
    assert "cannot read diskivf/ at revision 'no-such-revision'" in proc.stderr
    # A process that fails stops the tool with its error.
    np.save(tmp_path / "q.npy", np.zeros((2, 16), np.float32))
    missing = [str(tmp_path / "none"), *args[1:], "--queries", str(tmp_path / "q.npy")]
    proc = _run_tool(REPO / "tools" / "bench_policy.py", missing, child_env, ok=False)
    assert "a timing process failed" in proc.stderr
    assert "IndexNotFoundError: no diskivf index at" in proc.stderr


def test_bench_versions_loads_a_renamed_copy_and_stops_on_disagreement(tmp_path: Path) -> None:
    tool = _tool_module("bench_versions.py")
    try:
        copy = tool.load_version(None, "diskivf_copy_under_test", tmp_path)
    finally:
        sys.path.remove(str(tmp_path))
    # Its modules import each other under the new name, not the installed package.
    assert copy.index.scan.__name__ == "diskivf_copy_under_test.search"
    assert copy.Index is not diskivf.Index

    class Fixed:
        def __init__(self, first_id: int) -> None:
            self.ids = np.array([[first_id]])

        def search(self, q: np.ndarray, k: int, **_: int) -> diskivf.SearchResult:
            return diskivf.SearchResult(np.zeros((1, 1), np.float32), self.ids)

    q = np.zeros((3, 4), np.float32)
    assert tool.compare(Fixed(0), Fixed(0), q, 1, 1, 1)[0] > 0
    with pytest.raises(SystemExit, match="disagree at nprobe 1"):
        tool.compare(Fixed(0), Fixed(1), q, 1, 1, 1)

    # --sweep-mb: the sweep array is read through before every timed search.
    class Counted(np.ndarray):
        reads = 0

        def sum(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            Counted.reads += 1
            return super().sum(*args, **kwargs)  # type: ignore[call-overload]

    tool.compare(Fixed(0), Fixed(0), q, 1, 1, 2, 0.0, np.ones(8, np.float32).view(Counted))
    assert Counted.reads == 2 * 2 * len(q)  # rounds x versions x queries

    # --rtol: distances within it, and the neighbours wherever rounding cannot reorder them.
    def res(dist: list[float], ids: list[int]) -> diskivf.SearchResult:
        return diskivf.SearchResult(np.array([dist], np.float32), np.array([ids]))

    base = res([1.0, 2.0, 3.0, 3.0], [10, 11, 12, 13])
    rounded = res([1.0, 2.0, 3.0, 3.00001], [10, 11, 12, 13])
    swapped_tie = res([1.0, 2.0, 3.0, 3.00001], [10, 11, 13, 14])  # 12/13 at the k-th place
    other_near = res([1.0, 2.0, 3.0, 3.00001], [10, 99, 12, 13])  # 11 is not near the k-th
    assert tool.agree(base, base, 0.0)
    assert not tool.agree(base, rounded, 0.0)
    assert tool.agree(base, rounded, 1e-5)
    assert tool.agree(base, swapped_tie, 1e-5)
    assert tool.agree(swapped_tie, base, 1e-5)
    assert not tool.agree(base, other_near, 1e-5)
    assert not tool.agree(other_near, base, 1e-5)
    assert not tool.agree(base, res([1.0, 2.0, 3.0, 3.01], [10, 11, 12, 13]), 1e-5)


@pytest.mark.parametrize("tool", ["bench_build", "bench_durability"])
def test_scratch_dir_is_created_and_emptied(
    tmp_path: Path, child_env: dict[str, str], tool: str
) -> None:
    scratch = tmp_path / "not" / "yet"
    if tool == "bench_build":
        base = tmp_path / "base.npy"
        np.save(base, clustered(2000, 8, nclusters=20)[0])
        args = [str(base), "--nlist", "4", "--rounds", "1"]
    else:
        args = ["--dim", "8", "--nlist", "4", "--rows", "200", "--batch-sizes", "100"]
        args += ["--runs", "1"]
    proc = _run_tool(REPO / "tools" / f"{tool}.py", [*args, "--dir", str(scratch)], child_env)
    assert "median" in proc.stdout or "cost" in proc.stdout
    assert list(scratch.iterdir()) == []
