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
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.cfs_quota_us").write_text(quota + "\n")
    (d / "cpu.cfs_period_us").write_text(period + "\n")


def _limit(root: Path, v2: str = "/", v1: str = "/") -> int | None:
    """cgroup_cpu_limit under ``root`` for a process in groups ``v2`` and ``v1`` (cpu)."""
    proc = root / "proc-self-cgroup"
    proc.write_text(f"12:memory:/elsewhere\n4:cpuacct:/elsewhere\n3:cpu:{v1}\n0::{v2}\n")
    return _cpu.cgroup_cpu_limit(str(root / "fs"), str(proc))


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
    (tmp_path / "fs").mkdir()
    (tmp_path / "fs" / "cpu.max").write_text(cpu_max + "\n")
    assert _limit(tmp_path) == expect


@pytest.mark.parametrize("sub", ["cpu", "cpu,cpuacct", "cpuacct,cpu"])
def test_cgroup_v1_quota_where_distributions_mount_it(tmp_path: Path, sub: str) -> None:
    _cgroup_v1(tmp_path / "fs", sub, "300000")
    assert _limit(tmp_path) == 3


def test_cgroup_v1_without_quota_or_period(tmp_path: Path) -> None:
    _cgroup_v1(tmp_path / "fs", "cpu", "-1")
    assert _limit(tmp_path) is None
    (tmp_path / "fs" / "cpu" / "cpu.cfs_period_us").unlink()
    (tmp_path / "fs" / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert _limit(tmp_path) is None  # a quota without its period


def test_cgroup_v2_file_wins_and_no_files_mean_no_quota(tmp_path: Path) -> None:
    assert _limit(tmp_path) is None
    assert _cpu.cgroup_cpu_limit(str(tmp_path), str(tmp_path / "no-proc")) is None
    _cgroup_v1(tmp_path / "fs", "cpu", "400000")
    (tmp_path / "fs" / "cpu.max").write_text("100000 100000\n")
    assert _limit(tmp_path) == 1
    (tmp_path / "fs" / "cpu.max").write_bytes(b"9" * 4096)  # a read is bounded: no number read
    assert _limit(tmp_path) is None


def test_the_process_group_and_its_ancestors_are_read(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    leaf = fs / "system.slice" / "job.service"
    leaf.mkdir(parents=True)
    (leaf / "cpu.max").write_text("300000 100000\n")
    assert _limit(tmp_path, v2="/system.slice/job.service") == 3
    # A parent's smaller quota binds its children too.
    (fs / "system.slice" / "cpu.max").write_text("100000 100000\n")
    assert _limit(tmp_path, v2="/system.slice/job.service") == 1
    # A group that is not below the mount (a container shown its host path) reads the mount
    # point, the container's own group.
    assert _limit(tmp_path, v2="/docker/0123abcd") is None
    (fs / "cpu.max").write_text("200000 100000\n")
    assert _limit(tmp_path, v2="/docker/0123abcd") == 2
    # Never a path out of the mount.
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert _limit(tmp_path, v2="/../..") == 2


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("0::/a/b\n", ("/a/b", None)),
        ("3:cpu,cpuacct:/x\n2:cpuset:/y\n", (None, "/x")),
        ("3:cpuacct,cpu:/x\n0::/\n", ("/", "/x")),
        ("4:cpuacct:/x\n1:name=systemd:/z\n", (None, None)),
        ("garbage\n::\n", (None, None)),
    ],
)
def test_own_groups_from_proc_self_cgroup(text: str, expect: tuple[str | None, str | None]) -> None:
    assert _cpu._own_groups(text) == expect


def test_cgroup_v1_group_of_the_cpu_controller(tmp_path: Path) -> None:
    fs = tmp_path / "fs"
    _cgroup_v1(fs, "cpu,cpuacct/batch", "200000")
    _cgroup_v1(fs, "cpu,cpuacct", "-1")
    assert _limit(tmp_path, v1="/batch") == 2
    assert _limit(tmp_path, v1="/") is None


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
