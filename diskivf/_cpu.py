"""What diskivf needs to know about the CPUs it runs on: the size of their last-level cache,
and how many of them this process may use at once.

Both are read from Linux's sysfs and cgroup files at import (bounded reads of a few small
files under fixed roots); elsewhere, or where the files do not say, a common cache size stands
in and the process is taken to have no CPU quota.
"""

from __future__ import annotations

import math
import os
from typing import Final

__all__ = ["LAST_LEVEL_CACHE_BYTES", "usable_cpus"]

_DEFAULT_CACHE_BYTES: Final = 32 << 20  # one CCD of an AMD EPYC, a mid-range Xeon's L3
_CACHE_DIR: Final = "/sys/devices/system/cpu/cpu0/cache"
_MAX_INDEXES: Final = 8  # index0..index3 on current CPUs
_SYSFS_READ_BYTES: Final = 32  # one short line of sysfs
_CGROUP_ROOT: Final = "/sys/fs/cgroup"
_PROC_CGROUP: Final = "/proc/self/cgroup"
_PROC_CGROUP_READ_BYTES: Final = 4096  # a line per hierarchy, about a dozen at most
# Where cgroup v1 mounts its cpu controller varies by distribution.
_CGROUP_V1_CPU_DIRS: Final = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: str, limit: int = _SYSFS_READ_BYTES) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("ascii").strip()
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


def _quota_cpus(quota: str, period: str) -> int | None:
    """CPUs a CFS ``quota`` per ``period`` (microseconds) lets run at once, rounded up; None
    for no quota (``max`` in cgroup v2, ``-1`` in v1) or text that is not one."""
    if not (quota.isdigit() and period.isdigit()):
        return None
    q, p = int(quota), int(period)
    if q == 0 or p == 0:
        return None
    return max(1, math.ceil(q / p))


def _own_groups(text: str) -> tuple[str | None, str | None]:
    """This process's cgroup v2 group and cgroup v1 ``cpu`` group, from the text of
    ``/proc/self/cgroup`` (``hierarchy:controllers:path`` lines); None where it has none."""
    v2 = v1 = None
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _up_from(group: str | None) -> list[str]:
    """``group`` and each of its ancestors as paths below a cgroup mount, the group first and
    the mount point itself (``""``) last; the mount point alone for a path that is not a
    plain absolute one."""
    parts = group.split("/") if group is not None and group.startswith("/") else []
    parts = [p for p in parts if p]
    if any(p in (".", "..") for p in parts):
        parts = []
    return ["".join(f"/{p}" for p in parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_cpu_limit(root: str = _CGROUP_ROOT, proc_cgroup: str = _PROC_CGROUP) -> int | None:
    """CPUs the process's control group may keep busy: the smallest ``ceil(quota / period)``
    of its group and the group's ancestors, from cgroup v2's ``cpu.max`` or cgroup v1's
    ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` under ``root``; None where none sets one.

    A container limited to 2 CPUs (``docker run --cpus 2``, a Kubernetes CPU limit) still
    sees every core of its host in ``os.cpu_count()`` and its affinity mask; threads beyond
    its quota only queue for the same CPU time. The group comes from ``proc_cgroup``: a
    container usually sees its own group as ``/``, the mount point; one that sees the host's
    path finds no such directory below its mount and reads the mount point, which is its
    own group. A group on the host (``systemd-run -p CPUQuota=200%``) is read where it is.
    """
    v2, v1 = _own_groups(_read(proc_cgroup, _PROC_CGROUP_READ_BYTES) or "")
    limits: list[int | None] = []
    for group in _up_from(v2):
        text = _read(f"{root}{group}/cpu.max")
        if text is not None:
            fields = text.split()
            limits.append(_quota_cpus(fields[0], fields[1]) if len(fields) == 2 else None)
    if not limits:  # no cgroup v2 cpu controller: v1, mounted under one of its names
        for sub in _CGROUP_V1_CPU_DIRS:
            for group in _up_from(v1):
                quota = _read(f"{root}/{sub}{group}/cpu.cfs_quota_us")
                period = _read(f"{root}/{sub}{group}/cpu.cfs_period_us")
                if quota is not None and period is not None:
                    limits.append(_quota_cpus(quota, period))
    found = [n for n in limits if n is not None]
    return min(found) if found else None


_CGROUP_CPUS: Final = cgroup_cpu_limit()


def usable_cpus() -> int:
    """CPUs this process can run on at once: those its affinity mask allows (all the
    machine's where the OS has none), capped by its control group's CPU quota as read at
    import; at least 1.

    The mask is asked on every call (one system call), since a process may be moved to other
    CPUs after it started (``taskset``, a pool's initializer).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    if _CGROUP_CPUS is not None:
        n = min(n, _CGROUP_CPUS)
    return max(1, n)
