"""The CPU's last-level cache size, read from a sysfs-like directory."""

from __future__ import annotations

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
