"""The CPU facts diskivf reads: the last-level cache size (sysfs) and the CPUs a process may use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diskivf import _cpu


def _cache(root: Path, i: int, kind: str, size: str, level: int) -> None:
    d = root / f"index{i}"
    d.mkdir(parents=True)
    (d / "type").write_text(kind + "\n")
    (d / "size").write_text(size + "\n")
    (d / "level").write_text(f"{level}\n")


@pytest.mark.parametrize(
    ("text", "expect"),
    [("32768K", 32 << 20), ("1M", 1 << 20), ("2G", 2 << 30), ("512", 512), ("48k", 48 << 10)],
)
def test_sizes_parse(text: str, expect: int) -> None:
    assert _cpu.parse_size(text) == expect


@pytest.mark.parametrize("text", ["", "K", "-1K", "12.5M", "32768KB", "lots"])
def test_other_text_is_no_size(text: str) -> None:
    assert _cpu.parse_size(text) is None


def test_the_largest_data_or_unified_cache_is_the_last_level(tmp_path: Path) -> None:
    _cache(tmp_path, 0, "Data", "48K", 1)
    _cache(tmp_path, 1, "Instruction", "64M", 1)  # never the data's
    _cache(tmp_path, 2, "Unified", "1024K", 2)
    _cache(tmp_path, 3, "Unified", "32768K", 3)
    assert _cpu.last_level_cache_bytes(str(tmp_path)) == 32 << 20


def test_a_machine_without_sysfs_gets_the_default(tmp_path: Path) -> None:
    assert _cpu.last_level_cache_bytes(str(tmp_path / "missing")) == 32 << 20
    _cache(tmp_path, 0, "Unified", "garbage", 2)
    (tmp_path / "index0" / "size").write_bytes(b"\xff" * 100)  # not text, and too long
    assert _cpu.last_level_cache_bytes(str(tmp_path)) == 32 << 20


def test_this_machine_reports_a_plausible_size() -> None:
    assert 256 << 10 <= _cpu.LAST_LEVEL_CACHE_BYTES <= 4 << 30


def _cgroup_v1(root: Path, sub: str, quota: str, period: str = "100000") -> None:
    d = root / sub
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text(quota + "\n")
    (d / "cpu.cfs_period_us").write_text(period + "\n")


@pytest.mark.parametrize(
    ("cpu_max", "expect"),
    [
        ("200000 100000", 2),
        ("150000 100000", 2),  # 1.5 CPUs: a second thread still gets half a CPU
        ("50000 100000", 1),
        ("1600000 100000", 16),
        ("max 100000", None),  # no quota
        ("garbage", None),
        ("100000", None),
        ("0 100000", None),
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, expect: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) == expect


@pytest.mark.parametrize("sub", ["cpu", "cpu,cpuacct", "cpuacct,cpu"])
def test_cgroup_v1_quota_where_distributions_mount_it(tmp_path: Path, sub: str) -> None:
    _cgroup_v1(tmp_path, sub, "300000")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) == 3


def test_cgroup_v1_without_quota_or_period(tmp_path: Path) -> None:
    _cgroup_v1(tmp_path, "cpu", "-1")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) is None
    (tmp_path / "cpu" / "cpu.cfs_period_us").unlink()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) is None  # a quota without its period


def test_cgroup_v2_file_wins_and_no_files_mean_no_quota(tmp_path: Path) -> None:
    assert _cpu.cgroup_cpu_limit(str(tmp_path / "missing")) is None
    _cgroup_v1(tmp_path, "cpu", "400000")
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_bytes(b"9" * 4096)  # a read is bounded: no number read
    assert _cpu.cgroup_cpu_limit(str(tmp_path)) is None


def test_usable_cpus_is_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    mask = len(os.sched_getaffinity(0))
    monkeypatch.setattr(_cpu, "_CGROUP_CPUS", None)
    assert _cpu.usable_cpus() == mask
    monkeypatch.setattr(_cpu, "_CGROUP_CPUS", 1)
    assert _cpu.usable_cpus() == 1
    monkeypatch.setattr(_cpu, "_CGROUP_CPUS", mask + 5)
    assert _cpu.usable_cpus() == mask


def test_usable_cpus_follows_the_affinity_mask_and_so_does_search() -> None:
    # In a child process moved onto one CPU after start, as taskset or a pool would do:
    # both the count and a batch search's default thread count follow.
    code = (
        "import os; from diskivf import _cpu; from diskivf.index import _default_threads; "
        "print(len(os.sched_getaffinity(0)), _cpu.usable_cpus(), _default_threads(1000)); "
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "print(_cpu.usable_cpus(), _default_threads(1000), _default_threads(10))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    mask, before, threads = map(int, out[0].split())
    assert before == min(mask, _cpu._CGROUP_CPUS or mask)
    assert threads == min(8, before)
    assert out[1].split() == ["1", "1", "1"]


def test_search_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    from diskivf import index as index_module

    monkeypatch.setattr(index_module, "usable_cpus", lambda: 3)
    assert index_module._default_threads(64) == 3
    assert index_module._default_threads(63) == 1  # small batches stay on the calling thread
    monkeypatch.setattr(index_module, "usable_cpus", lambda: 64)
    assert index_module._default_threads(1000) == 8
