"""Write-behind: ``ListWriter.start_writeback`` hands written pages to the disk between batches.

It must hand over each whole page written once, never a page that is still being appended to,
never anything before enough bytes have gathered or for a writer that is not durable, and it
must not change a byte of the index or fail an add when the kernel refuses.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

import diskivf
from diskivf import segments
from diskivf.demo import clustered
from diskivf.segments import ListWriter

PAGE = mmap.PAGESIZE

Call = tuple[str, int, int, int]  # file (by its path), offset, bytes, flags


def record_calls(
    monkeypatch: pytest.MonkeyPatch, fail: bool = False, *, threshold: int = 0
) -> list[Call]:
    """Replace ``sync_file_range`` by a recorder (which calls the real one where it exists,
    or fails with EIO when ``fail``) and set the write-behind threshold."""
    real = segments._SYNC_FILE_RANGE
    calls: list[Call] = []

    def fake(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), offset, nbytes, flags))
        if fail:
            raise OSError(errno.EIO, "injected")
        return 0 if real is None else int(real(fd, offset, nbytes, flags))

    monkeypatch.setattr(segments, "_SYNC_FILE_RANGE", fake)
    monkeypatch.setattr(segments, "_WRITEBACK_MIN_BYTES", threshold)
    return calls


def ranges_by_file(calls: list[Call]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for path, offset, nbytes, _ in calls:
        out.setdefault(Path(path).name, []).append((offset, offset + nbytes))
    return out


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_whole_pages_are_handed_over_once_and_the_last_partial_page_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch)
    w = ListWriter(tmp_path)
    w.write("lists/a", 0, b"a" * (PAGE + 100))
    w.write("lists/b", 0, b"b" * 50)
    w.start_writeback()
    w.write("lists/a", PAGE + 100, b"a" * (2 * PAGE - 90))  # a now ends at 3 * PAGE + 10
    w.write("lists/b", 50, b"b" * (2 * PAGE - 50))  # b ends on a page boundary
    w.start_writeback()
    w.start_writeback()  # nothing new: no call
    w.sync()
    w.close()
    assert {flags for *_, flags in calls} == {2}  # SYNC_FILE_RANGE_WRITE alone: no wait
    assert ranges_by_file(calls) == {
        "a": [(0, PAGE), (PAGE, 3 * PAGE)],  # the page holding byte 3 * PAGE is left to fsync
        "b": [(0, 2 * PAGE)],
    }


def test_an_overwrite_from_an_earlier_offset_is_handed_over_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A retried add rewrites a torn tail from the committed end: those pages changed again.
    calls = record_calls(monkeypatch)
    w = ListWriter(tmp_path)
    w.write("lists/a", 0, b"a" * (4 * PAGE))
    w.start_writeback()
    w.write("lists/a", PAGE + 8, b"c" * (2 * PAGE))
    w.start_writeback()
    w.sync()
    w.close()
    assert ranges_by_file(calls) == {"a": [(0, 4 * PAGE), (PAGE, 3 * PAGE)]}


@pytest.mark.parametrize(
    ("durable", "threshold"), [(False, 0), (True, 3 * PAGE)], ids=["not-durable", "below-threshold"]
)
def test_nothing_is_handed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool, threshold: int
) -> None:
    calls = record_calls(monkeypatch, threshold=threshold)
    w = ListWriter(tmp_path, durable=durable)
    w.write("lists/a", 0, b"a" * (2 * PAGE))
    w.start_writeback()
    w.sync()
    w.start_writeback()  # the sync wrote everything: nothing left to hand over
    w.close()
    assert calls == []


def test_a_sync_waits_for_the_background_thread_and_close_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch)
    fds = open_fds()
    w = ListWriter(tmp_path)
    for i in range(20):
        w.write(f"lists/{i}", 0, bytes(PAGE))
    w.start_writeback()
    w.sync()
    assert len(calls) == 20  # all handed over before the sync returned
    w.close()
    assert open_fds() == fds  # the writer's descriptors and their duplicates are closed
    assert not any(t.name.startswith("diskivf-writeback") for t in threading.enumerate())


def build(path: Path, x: np.ndarray, batch_size: int) -> None:
    with diskivf.open(path, mode="w", dim=x.shape[1], nlist=16) as index:
        index.train(x)
        index.add(x, batch_size=batch_size)


def list_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "lists").iterdir())}


@pytest.mark.parametrize("fail", [False, True], ids=["kernel-accepts", "kernel-refuses"])
def test_an_add_with_write_behind_stores_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: bool
) -> None:
    x = clustered(6000, 24, seed=3)[0]
    monkeypatch.setattr(segments, "_SYNC_FILE_RANGE", None)
    build(tmp_path / "plain", x, 1000)
    calls = record_calls(monkeypatch, fail)
    fds = open_fds()
    build(tmp_path / "behind", x, 1000)
    assert open_fds() == fds
    assert calls  # 6 batches of 96 KB of vectors in 16 lists: whole pages to hand over
    assert list_bytes(tmp_path / "behind") == list_bytes(tmp_path / "plain")
    sizes = {name: len(data) for name, data in list_bytes(tmp_path / "behind").items()}
    for name, ranges in ranges_by_file(calls).items():
        assert all(a % PAGE == 0 and b % PAGE == 0 and b <= sizes[name] for a, b in ranges)
        assert all(b1 <= a2 for (_, b1), (a2, _) in itertools.pairwise(ranges))
    with diskivf.open(tmp_path / "behind") as index:
        assert index.verify().ok
        assert index.ntotal == len(x)


def test_a_writer_forked_mid_writeback_starts_its_own_thread_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = record_calls(monkeypatch)
    recorder = segments._SYNC_FILE_RANGE
    held, release = threading.Event(), threading.Event()

    def slow(fd: int, offset: int, nbytes: int, flags: int) -> int:
        if os.getpid() == parent:  # the parent's thread waits until the child exists
            held.set()
            release.wait(10)
        return int(recorder(fd, offset, nbytes, flags))

    parent = os.getpid()
    monkeypatch.setattr(segments, "_SYNC_FILE_RANGE", slow)
    w = ListWriter(tmp_path)
    w.write("lists/a", 0, bytes(PAGE))
    w.start_writeback()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        signal.alarm(20)  # waiting on the parent's thread would hang: fail instead
        try:
            w.write("lists/c", 0, bytes(PAGE))
            w.start_writeback()
            w.sync()
            code = 0 if [Path(c[0]).name for c in calls] == ["c"] else 2  # by its own thread
        finally:
            os._exit(code)
    release.set()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    w.sync()
    w.close()
    assert [Path(c[0]).name for c in calls] == ["a"]  # the child's went to its own copy
