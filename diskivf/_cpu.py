"""What search needs to know about the CPU it runs on: the size of its last-level cache.

Read once, at import, from Linux's sysfs (bounded reads of a few small files whose paths are
fixed here); elsewhere, or where sysfs does not say, a common size stands in.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LAST_LEVEL_CACHE_BYTES"]

_DEFAULT_CACHE_BYTES: Final = 32 << 20  # one CCD of an AMD EPYC, a mid-range Xeon's L3
_CACHE_DIR: Final = "/sys/devices/system/cpu/cpu0/cache"
_MAX_INDEXES: Final = 8  # index0..index3 on current CPUs
_SYSFS_READ_BYTES: Final = 32  # one short line of sysfs


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(_SYSFS_READ_BYTES).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def parse_size(text: str) -> int | None:
    """Bytes of a sysfs cache size such as ``"32768K"``, ``"1M"`` or ``"512"``; None if it is
    not one."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if text[-1:].upper() in units else text
    if not digits.isdigit():
        return None
    return int(digits) * scale


def last_level_cache_bytes(cache_dir: str = _CACHE_DIR) -> int:
    """Size of the largest data or unified cache that CPU 0 reports (its last level), or
    32 MiB where that cannot be read."""
    best = 0
    for i in range(_MAX_INDEXES):
        where = f"{cache_dir}/index{i}"
        kind = _read(f"{where}/type")
        if kind is None:
            break
        size = _read(f"{where}/size")
        if kind in ("Data", "Unified") and size is not None:
            best = max(best, parse_size(size) or 0)
    return best or _DEFAULT_CACHE_BYTES


# Read at import, like segments' map limit: opening and searching an index then read no file
# outside it but its device's read-ahead setting.
LAST_LEVEL_CACHE_BYTES: Final = last_level_cache_bytes()
