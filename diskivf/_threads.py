"""The search worker pool: made on first use, the caller works too, splits chosen by timing;
and a background thread for the read-ahead advice of lists about to be scanned.

A batch spreads its probed lists over threads whatever the machine. A single query gains from
a second thread only when its scan outlasts the hand-off to a worker and back by a margin, and
on the virtual machine this project is measured on that hand-off varies several-fold from one
hour to the next (waking an idle virtual CPU; see ``tools/bench_single.py``): the same split
of 14 MB of vectors ran 1.17-1.24x as fast as one thread in one hour and 0.83x in another.
No fixed size threshold is right, so :class:`Workers` measures instead. Single queries are
sorted into size classes (powers of two of their vector bytes); per class it keeps the recent
times per byte with and without a split, splits when the median split is clearly faster, and
now and then sends a few queries of a class the other way, so that a choice cannot outlive
the spell it came from. Within a split, threads take chunks as they come free (see
:meth:`Workers.runner`), so a worker that wakes late costs the caller little.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from diskivf.search import Parallel

__all__ = ["Workers"]

_T = TypeVar("_T")

# Below this many bytes of vectors a query always runs on one thread. Forced splits of
# 3.5 MB queries ran 0.47-0.79x as fast as one thread in every hour measured here
# (tools/bench_single.py --always-split), and even trying them now and then cost 7-14%.
_SPLIT_FLOOR_BYTES = 4 << 20
# Of every _EXPLORE_EVERY queries of a size class, _EXPLORE_BURST in a row take the way not
# currently preferred. In a row, because the first split after a pause finds the worker
# parked and times slow: single tries would keep judging splits by their worst case.
_EXPLORE_EVERY = 128
_EXPLORE_BURST = 4
# Recent timings kept per size class and way; a way is judged once it has _MIN_TIMED.
_TIMINGS = 9
_MIN_TIMED = 3
# A split must be this much faster per byte (median against median) to be preferred: single
# timings here spread by 2x, and a wrong split costs more than a missed one.
_SPLIT_MARGIN = 0.9
_DELAY_SAMPLES = 15
# Calls waiting for the background thread, at most. When searches outpace it, the oldest
# waiting advice is dropped: the search that asked for it has moved on, its lists are read on
# first touch anyway, and the views it holds would keep their maps alive past the map budget.
_BACKGROUND_WAITING = 4


class _SizeClass:
    """Recent seconds per byte of one size class: ``timed[0]`` on one thread, ``[1]`` split."""

    __slots__ = ("count", "prefer_split", "timed")

    def __init__(self) -> None:
        self.timed: tuple[deque[float], deque[float]] = (
            deque(maxlen=_TIMINGS),
            deque(maxlen=_TIMINGS),
        )
        self.count = 0
        self.prefer_split = False  # decided when a timing arrives, not on every query

    def add(self, split: bool, per_byte: float) -> None:
        self.timed[split].append(per_byte)
        alone, shared = (statistics.median(t) if t else 0.0 for t in self.timed)
        self.prefer_split = shared < _SPLIT_MARGIN * alone


class _Calls:
    """What the background thread shares with its owner: calls waiting, and the stop flag."""

    __slots__ = ("cond", "stop", "waiting")

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: deque[tuple[Callable[[Any], object], Any]] = deque(maxlen=_BACKGROUND_WAITING)
        self.stop = False

    def put(self, fn: Callable[[_T], object], arg: _T) -> None:
        with self.cond:
            self.waiting.append((fn, arg))  # drops the oldest waiting call when full
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify()


def _serve(calls: _Calls) -> None:
    """The background thread: run waiting calls in order until stopped and none is left."""
    while True:
        with calls.cond:
            while not calls.waiting and not calls.stop:
                calls.cond.wait()
            if not calls.waiting:  # stopped, and nothing left
                return
            fn, arg = calls.waiting.popleft()
        with contextlib.suppress(Exception):  # advice that fails costs only speed
            fn(arg)
        del fn, arg  # not held while waiting: ``arg`` may hold maps


class _Background:
    """One daemon thread running submitted calls in order; see :meth:`Workers.background`."""

    def __init__(self) -> None:
        self._calls = _Calls()
        # The thread holds the shared calls, not this object: an owner dropped without
        # stop() (an index never closed) is collected, and its finalizer ends the thread.
        self._thread = threading.Thread(
            target=_serve, args=(self._calls,), name="diskivf-advice", daemon=True
        )
        self._thread.start()
        weakref.finalize(self, self._calls.close)

    def submit(self, fn: Callable[[_T], object], arg: _T) -> None:
        self._calls.put(fn, arg)

    def stop(self) -> None:
        """Wait for the calls made so far and end the thread."""
        self._calls.close()
        self._thread.join()


class Workers:
    """Thread pool of one index's searches and its split policy; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0
        self._pid = os.getpid()
        self._classes: dict[int, _SizeClass] = {}
        self._delays: deque[float] = deque(maxlen=_DELAY_SAMPLES)  # seconds
        self._background: _Background | None = None

    def runner(self, nthreads: int) -> Parallel:
        """Run chunks on the calling thread and up to ``nthreads - 1`` workers.

        Chunks are taken one at a time from a shared counter, the caller's thread included,
        rather than dealt in advance: a worker woken late (on this virtual machine, a parked
        thread takes from tens of microseconds to milliseconds to run again) leaves its
        chunks to the threads already running instead of holding the caller up until it has
        done them. The caller then waits only for chunks a worker has started. Results come
        in chunk order; an exception from any chunk is raised once no chunk is running.
        """

        def run(fn: Callable[[list[int]], _T], chunks: list[list[int]]) -> list[_T]:
            if len(chunks) <= 1:
                return [fn(c) for c in chunks]
            pool = self._get(nthreads - 1)
            results: list[_T | None] = [None] * len(chunks)
            errors: list[BaseException] = []
            cond = threading.Condition()
            left = iter(range(len(chunks)))  # the next chunk, taken under cond
            running = 0
            t0 = time.perf_counter()

            def take(first: bool) -> int | None:
                nonlocal running
                with cond:
                    i = None if errors else next(left, None)  # none after an exception
                    if i is not None:
                        running += 1
                        if first:
                            self._delays.append(time.perf_counter() - t0)
                    return i

            def work(first: bool) -> None:
                nonlocal running
                i = take(first)
                while i is not None:
                    try:
                        results[i] = fn(chunks[i])
                    except BaseException as exc:  # noqa: BLE001 - raised once none runs
                        errors.append(exc)
                    finally:
                        with cond:
                            running -= 1
                            if not running:
                                cond.notify_all()
                    i = take(False)

            for _ in range(min(nthreads - 1, len(chunks) - 1)):
                pool.submit(work, True)
            try:
                work(False)
            finally:
                # Never return (or raise) while a worker still writes into the caller's
                # buffers; a worker task that starts later finds nothing left to take.
                with cond:
                    while running:
                        cond.wait()
            if errors:
                raise errors[0]
            return results  # type: ignore[return-value]

        return run

    def should_split(self, nbytes: int) -> bool:
        """Whether a single query scanning ``nbytes`` of vectors should be split now."""
        if nbytes < _SPLIT_FLOOR_BYTES:
            return False
        cls = self._classes.get(nbytes.bit_length())
        if cls is None:
            cls = self._classes.setdefault(nbytes.bit_length(), _SizeClass())
        cls.count += 1
        one, split = cls.timed
        if len(one) < _MIN_TIMED or len(split) < _MIN_TIMED:
            return len(one) >= _MIN_TIMED  # time one thread first, then splits
        return cls.prefer_split != (cls.count % _EXPLORE_EVERY >= _EXPLORE_EVERY - _EXPLORE_BURST)

    def record(self, nbytes: int, split: bool, seconds: float) -> None:
        """Time taken by a single query of ``nbytes`` of vectors, split or not."""
        cls = self._classes.get(nbytes.bit_length())
        if cls is not None and nbytes > 0:
            cls.add(split, seconds / nbytes)

    def delay_us(self) -> float | None:
        """Median delay before a worker took its first chunk, over recent splits in which it
        took one (microseconds)."""
        recent = list(self._delays)
        return statistics.median(recent) * 1e6 if recent else None

    def background(self, fn: Callable[[_T], object], arg: _T) -> None:
        """Run ``fn(arg)`` on a thread of its own and return without waiting for it.

        For advice to the kernel (read-ahead of the lists a search is about to scan): its
        system calls allocate the page cache and queue the reads, time the search's thread
        would otherwise spend before its first product. Calls run
        one at a time in the order made. A call is dropped unrun when
        ``_BACKGROUND_WAITING`` newer ones wait, and what it raises is dropped: it must be
        advice whose absence costs only speed.
        """
        with self._lock:
            self._forked()
            if self._background is None:
                self._background = _Background()
            self._background.submit(fn, arg)

    def _forked(self) -> None:
        """Forget the threads of a parent process (hold ``_lock``).

        A forked child inherits the pools but none of their threads: submitting to one would
        wait forever. It starts afresh (the parent's pools are not ours).
        """
        if os.getpid() != self._pid:
            self._pool, self._size, self._pid = None, 0, os.getpid()
            self._background = None

    def _get(self, size: int) -> ThreadPoolExecutor:
        with self._lock:
            self._forked()
            if self._pool is None or self._size < size:
                # The smaller pool is dropped, not shut down: another thread may have taken it
                # a moment ago and still be submitting to it. Its idle threads exit once it is
                # garbage collected.
                self._pool = ThreadPoolExecutor(size, thread_name_prefix="diskivf")
                self._size = size
            return self._pool

    def shutdown(self) -> None:
        """Wait for running chunks and advice and stop the threads; a later use starts anew."""
        with self._lock:
            pool, self._pool, self._size = self._pool, None, 0
            background, self._background = self._background, None
        if background is not None:
            background.stop()
        if pool is not None:
            pool.shutdown(wait=True)
