"""The search worker pool: caller participation and the timed choice to split a query."""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from diskivf import _threads
from diskivf._threads import Workers

MB8 = 8 << 20


def _choices(w: Workers, nbytes: int, n: int) -> list[bool]:
    return [w.should_split(nbytes) for _ in range(n)]


def test_small_queries_never_split() -> None:
    w = Workers()
    assert not any(_choices(w, _threads._SPLIT_FLOOR_BYTES - 1, 40))
    assert w._classes == {}  # nothing to time either


def _time(w: Workers, nbytes: int, split: bool, seconds: float, n: int = 3) -> None:
    for _ in range(n):
        w.record(nbytes, split, seconds)


def test_one_thread_then_split_are_timed_first_then_the_faster_wins() -> None:
    w = Workers()
    assert w.should_split(MB8) is False  # untimed: one thread first
    _time(w, MB8, False, 0.010)
    assert w.should_split(MB8) is True  # one thread timed: now splits
    _time(w, MB8, True, 0.007, n=2)
    assert w.should_split(MB8) is True  # two split timings are not enough to judge
    w.record(MB8, True, 0.007)
    every, burst = _threads._EXPLORE_EVERY, _threads._EXPLORE_BURST
    picks = _choices(w, MB8, 2 * every)
    # 0.7x the time: splits, except a burst of queries in a row every so many queries of the
    # class (3 were asked before, so the class's count is i + 4).
    tried = [i for i, p in enumerate(picks) if not p]
    assert tried == [i for i in range(2 * every) if (i + 4) % every >= every - burst]
    assert len(tried) == 2 * burst


def test_a_split_must_be_clearly_faster() -> None:
    w = Workers()
    w.should_split(MB8)
    _time(w, MB8, False, 0.010)
    _time(w, MB8, True, 0.0095)  # 5% faster: within the spread of single timings
    picks = _choices(w, MB8, 2 * _threads._EXPLORE_EVERY)
    assert picks.count(True) == 2 * _threads._EXPLORE_BURST  # only the tries split


def test_choice_follows_the_machine_when_splits_turn_slow() -> None:
    w = Workers()
    w.should_split(MB8)
    _time(w, MB8, False, 0.010)
    _time(w, MB8, True, 0.007)
    assert w.should_split(MB8)
    _time(w, MB8, True, 0.015, n=5)  # a slow spell: a majority of recent splits took 15 ms
    picks = _choices(w, MB8, _threads._EXPLORE_EVERY)
    assert picks.count(True) == _threads._EXPLORE_BURST  # only the tries split
    # Other sizes keep their own timings: 32 MB queries have none yet.
    assert w.should_split(4 * MB8) is False
    _time(w, 4 * MB8, False, 0.040)
    assert w.should_split(4 * MB8) is True


def test_record_of_an_untimed_size_is_ignored() -> None:
    w = Workers()
    w.record(MB8, True, 0.001)
    assert w._classes == {}


def test_runner_times_each_split_and_runs_a_lone_chunk_inline() -> None:
    w = Workers()
    run = w.runner(2)
    main = threading.get_ident()
    assert run(lambda c: threading.get_ident() == main, [[0]]) == [True]
    assert w.delay_us() is None  # no hand-off, nothing to time
    assert w._pool is None
    took = {True: threading.Event(), False: threading.Event()}  # by the caller / the worker

    def chunk(c: list[int]) -> tuple[list[int], bool]:
        on_main = threading.get_ident() == main
        took[on_main].set()
        assert took[not on_main].wait(5)  # a chunk ends once the other thread has one too
        return c, on_main

    out = run(chunk, [[0, 1], [2], [3]])
    assert [c for c, _ in out] == [[0, 1], [2], [3]]  # every chunk once, in order
    assert {on_main for _, on_main in out} == {True, False}
    delay = w.delay_us()
    assert delay is not None
    assert 0 < delay < 5e6
    assert w._size == 1  # the caller is the second thread
    w.shutdown()
    assert w._pool is None


def test_a_late_worker_leaves_its_chunks_to_the_caller() -> None:
    # The worker is busy (as a parked virtual CPU is slow to wake): the caller does every
    # chunk and returns without waiting for it; the worker, once free, finds nothing left.
    w = Workers()
    run = w.runner(2)
    release = threading.Event()
    w._get(1).submit(release.wait, 10)
    main = threading.get_ident()
    try:
        out = run(lambda c: (c[0], threading.get_ident() == main), [[0], [1], [2], [3]])
    finally:
        release.set()
    assert out == [(0, True), (1, True), (2, True), (3, True)]
    w.shutdown()
    assert w.delay_us() is None  # the worker never took a chunk


def _until(cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("timed out")
        time.sleep(0.001)


def test_background_calls_run_in_order_off_the_caller_and_survive_errors() -> None:
    w = Workers()
    done: list[tuple[int, int]] = []
    ran = threading.Event()

    def fail(_: int) -> None:
        raise RuntimeError("advice refused")

    w.background(fail, 0)  # dropped: advice that fails costs only speed
    w.background(lambda _: ran.set(), 0)
    assert ran.wait(10)  # the thread outlived the error
    for i in range(3):  # no more than wait at once: none is dropped
        w.background(lambda i: done.append((i, threading.get_ident())), i)
    _until(lambda: len(done) == 3)
    assert [i for i, _ in done] == [0, 1, 2]
    assert len({t for _, t in done}) == 1
    assert threading.get_ident() not in {t for _, t in done}
    w.shutdown()
    w.background(lambda i: done.append((i, threading.get_ident())), 3)  # a new thread
    _until(lambda: len(done) == 4)
    w.shutdown()


def _busy(bg: _threads._Background) -> threading.Event:
    """Occupy ``bg``'s thread until the returned event is set."""
    started, gate = threading.Event(), threading.Event()
    bg.submit(lambda _: (started.set(), gate.wait(10)), None)
    assert started.wait(10)
    return gate


def test_background_drops_the_oldest_waiting_calls_when_searches_outpace_it() -> None:
    bg = _threads._Background()
    gate = _busy(bg)
    done: list[int] = []
    n = _threads._BACKGROUND_WAITING
    for i in range(n + 2):
        bg.submit(done.append, i)
    gate.set()
    _until(lambda: len(done) == n)
    bg.stop()
    assert done == list(range(2, n + 2))  # the newest, in order: what they hold is released


def test_background_stop_waits_for_the_calls_made() -> None:
    bg = _threads._Background()
    gate = _busy(bg)
    done: list[int] = []
    bg.submit(done.append, 1)
    stopper = threading.Thread(target=bg.stop)
    stopper.start()
    time.sleep(0.05)
    assert stopper.is_alive()  # waiting for the running call and the one after it
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert not bg._thread.is_alive()
    assert done == [1]


def test_background_thread_ends_when_its_owner_is_dropped_unclosed() -> None:
    w = Workers()
    ran = threading.Event()
    w.background(lambda _: ran.set(), None)
    assert ran.wait(10)
    assert w._background is not None
    thread = w._background._thread
    del w  # an index that is never closed
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_background_starts_afresh_in_a_forked_child() -> None:
    w = Workers()
    w.background(int, 0)  # the parent's thread exists, idle
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 2
        try:
            done: list[int] = []
            w.background(done.append, 1)
            w.shutdown()
            code = 0 if done == [1] else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child's background call never ran")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    w.shutdown()
