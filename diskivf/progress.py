"""Progress reporting for long builds: tqdm when installed, a plain stderr line otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["bar"]


def bar(label: str, *, force: bool = False) -> Callable[[int, int], None]:
    """Return ``report(done, total)``; ``done == -1`` closes the bar.

    Uses tqdm when it is installed, otherwise rewrites one stderr line with rate and ETA at most
    ten times a second. Silent when stderr is not a terminal, unless ``force``.
    """
    if not force and not sys.stderr.isatty():
        return lambda done, total: None
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain(label)
    state: dict[str, tqdm[None]] = {}

    def report(done: int, total: int) -> None:
        t = state.get("t")
        if done < 0:
            if t is not None:
                t.close()
            return
        if t is None:
            t = state["t"] = tqdm(total=total, desc=label, unit="vec", unit_scale=True)
        t.update(done - t.n)

    return report


def _plain(label: str) -> Callable[[int, int], None]:
    start = time.monotonic()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < 0:
            sys.stderr.write("\n")
            return
        if now - last[0] < 0.1 and done < total:
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        sys.stderr.write(f"\r{label}: {done}/{total} ({rate:,.0f} vec/s, ETA {eta:,.0f} s)  ")
        sys.stderr.flush()

    return report
