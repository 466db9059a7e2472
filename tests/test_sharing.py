"""One handle shared by threads or inherited by a forked child: writes are serialised, a
child cannot write through its parent's writer, and the search pool survives both."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import diskivf
from diskivf import _threads, errors

DIM, NLIST = 8, 4


def _data(n: int = 3000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def test_concurrent_adds_on_one_handle_are_serialised(tmp_path: Path) -> None:
    x = _data()
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x[:1000])
        start = threading.Barrier(2)

        def add(a: int) -> None:
            start.wait()
            ix.add(x[a : a + 1000], ids=np.arange(a, a + 1000))

        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(add, a) for a in (1000, 2000)]:
                f.result(60)  # re-raises what the thread raised
        assert ix.ntotal == 3000
        assert ix.generation == 3
    with diskivf.open(tmp_path / "i") as r:
        assert r.verify().ok
        _, ids = r.search(x, k=1, nprobe=NLIST)
        np.testing.assert_array_equal(ids[:, 0], np.arange(3000))


def test_forked_child_cannot_write_through_the_parents_handle(tmp_path: Path) -> None:
    x = _data()
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x[:1000])
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: searching works, writing is refused
            code = 1
            try:
                ix.search(x[:3], k=1, nprobe=NLIST)
                ix.add(x[1000:2000])
            except errors.ReadOnlyError as exc:
                code = 0 if "forked child" in str(exc) else 2
            except Exception:  # noqa: BLE001 - any other outcome is a failure code
                code = 3
            os.write(write, bytes([code]))
            os._exit(0)
        os.close(write)
        status = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
        assert status == bytes([0])
        ix.add(x[1000:2000])  # the parent goes on
        assert ix.ntotal == 2000
    with diskivf.open(tmp_path / "i") as r:
        assert r.verify().ok
        assert r.ntotal == 2000


def _search_in_child(args: tuple[str, np.ndarray]) -> list[int]:
    return _SHARED[0].search(args[1], k=1, nprobe=NLIST, threads=2).ids[:, 0].tolist()


_SHARED: list[diskivf.Index] = []


def test_forked_child_searches_after_the_parent_used_the_pool(tmp_path: Path) -> None:
    x = _data()
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x)
    with diskivf.open(tmp_path / "i") as r:
        want = r.search(x[:300], k=1, nprobe=NLIST, threads=2).ids[:, 0].tolist()  # pool made
        _SHARED[:] = [r]
        try:
            with multiprocessing.get_context("fork").Pool(1) as pool:
                got = pool.apply_async(_search_in_child, ((str(tmp_path), x[:300]),)).get(60)
        finally:
            _SHARED.clear()
        assert got == want


def test_threads_asking_for_pools_of_other_sizes_never_find_one_shut_down(tmp_path: Path) -> None:
    x = _data()
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as ix:
        ix.train(x)
        ix.add(x)
    q = x[:300]

    def run(r: diskivf.Index, t: int, want: np.ndarray) -> None:
        for _ in range(3):
            np.testing.assert_array_equal(r.search(q, k=3, nprobe=NLIST, threads=t).ids, want)

    for _ in range(10):
        # A fresh handle each round: its pool is made, then grown, while the threads race.
        with diskivf.open(tmp_path / "i") as r, ThreadPoolExecutor(4) as callers:
            want = r.search(q, k=3, nprobe=NLIST, threads=1).ids
            for f in [callers.submit(run, r, t, want) for t in (2, 3, 5, 8)]:
                f.result(60)


@pytest.mark.parametrize("scale", [1e-25, 1e-22, 1e15])
def test_cosine_scale_does_not_matter(tmp_path: Path, scale: float) -> None:
    x = _data(200)
    tiny = (x.astype(np.float64) * scale).astype(np.float32)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=2, metric="cosine") as ix:
        ix.train(tiny)
        ix.add(tiny)
        d, ids = ix.search(tiny[:5], k=1, nprobe=2)
    np.testing.assert_array_equal(ids[:, 0], np.arange(5))
    np.testing.assert_allclose(d[:, 0], 1.0, rtol=1e-5)


def test_refresh_waits_for_searches_of_other_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh while another thread's search is mapping lists of the old snapshot must
    neither mix the two snapshots nor leave an old list cached as current."""
    from diskivf import search as scan

    x = _data(2000)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as w:
        w.train(x)
        w.add(x[:1000])
        r = diskivf.open(tmp_path / "i")
        w.add(x[1000:])  # not yet in r's snapshot
    inside = threading.Event()
    norms = scan.sqnorms

    def slow_norms(v: np.ndarray) -> np.ndarray:
        if threading.current_thread().name.startswith("slow"):
            inside.set()
            threading.Event().wait(0.3)  # the search is mid-way through its lists
        return norms(v)

    monkeypatch.setattr(scan, "sqnorms", slow_norms)
    with r, ThreadPoolExecutor(1, thread_name_prefix="slow") as pool:
        old = pool.submit(lambda: r.search(x[:1000], k=1, nprobe=NLIST, threads=1))
        assert inside.wait(10)
        assert r.refresh()
        _, before = old.result(60)
        np.testing.assert_array_equal(before[:, 0], np.arange(1000))  # one snapshot
        _, ids = r.search(x, k=1, nprobe=NLIST, threads=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(2000))  # no old list left as current


def test_a_writer_dropped_without_close_releases_its_lock(tmp_path: Path) -> None:
    import gc

    x = _data(500)
    with diskivf.open(tmp_path / "i", mode="w-", dim=DIM, nlist=NLIST) as w:
        w.train(x)

    def forget() -> None:
        w = diskivf.open(tmp_path / "i", "r+")
        w.add(x)
        del w
        gc.collect()  # the handle is gone here, never closed

    with pytest.warns(ResourceWarning, match="was not closed"):
        forget()
    with diskivf.open(tmp_path / "i", "r+") as again:  # not LockedError
        assert again.ntotal == 500


def _built(root: Path, n: int, nlist: int = NLIST) -> np.ndarray:
    """An index at ``root`` holding ``_data(n)`` (ids 0..n-1); returns the rows."""
    x = _data(n)
    with diskivf.open(root, mode="w-", dim=DIM, nlist=nlist) as w:
        w.train(x)
        w.add(x)
    return x


def _list_maps(root: Path) -> int:
    """Maps of this process onto list files of the index at ``root``."""
    lists = str((root / "lists").resolve())
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if lists in line)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_reader_keeps_at_most_its_budget_of_lists_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diskivf import index as index_mod

    x = _built(tmp_path / "i", 4000, nlist=32)

    monkeypatch.setattr(index_mod, "map_budget", lambda: 4)
    with diskivf.open(tmp_path / "i") as r:
        for q in x[:200]:  # single queries probing many different lists over time
            r.search(q, k=3, nprobe=2, threads=1)
        # Two maps per list kept, and the read-ahead advice not yet given holds the maps of
        # the lists it was given (up to two per call, the one running and those waiting).
        in_flight = 2 * 2 * (_threads._BACKGROUND_WAITING + 1)
        assert 0 < _list_maps(tmp_path / "i") <= 2 * 4 + in_flight
        r._workers.shutdown()  # once the advice is given, only the budget's maps remain
        assert 0 < _list_maps(tmp_path / "i") <= 2 * 4
        _, ids = r.search(x[:50], k=1, nprobe=32)
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))


def test_mapped_lists_hold_no_file_descriptors(tmp_path: Path) -> None:
    x = _built(tmp_path / "i", 4000, nlist=64)
    base = _open_fds()
    r = diskivf.open(tmp_path / "i")
    r.search(x[:100], k=3, nprobe=64)
    assert _list_maps(tmp_path / "i") >= 2 * 60  # (nearly) every list is mapped...
    assert _open_fds() - base <= 2  # ...and none holds a descriptor
    r.close()
    del r
    assert _list_maps(tmp_path / "i") == 0  # unmapped with the handle's arrays


def test_a_search_may_probe_more_lists_than_the_descriptor_limit(
    tmp_path: Path, child_env: dict[str, str]
) -> None:
    """With Python's mmap each mapped list held two descriptors: nprobe 300 needed 600 and
    failed with EMFILE under the common soft limit of 1024 (here lowered to 128)."""
    x = _built(tmp_path / "i", 12000, nlist=300)
    code = (
        "import resource, sys, numpy as np, diskivf\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "x = np.load(sys.argv[2])\n"
        "with diskivf.open(sys.argv[1]) as ix:\n"
        "    one = ix.search(x[0], k=5, nprobe=300).ids\n"
        "    many = ix.search(x[:40], k=5, nprobe=300).ids\n"
        "np.save(sys.argv[3], np.concatenate([one, many]))\n"
    )
    np.save(tmp_path / "x.npy", x)
    subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "i"),
            str(tmp_path / "x.npy"),
            str(tmp_path / "ids.npy"),
        ],
        env=child_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    got = np.load(tmp_path / "ids.npy")
    queries = np.concatenate([x[:1], x[:40]])
    d = ((queries[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    exact = np.argsort(d, axis=1, kind="stable")[:, :5]  # every list probed: exact search
    np.testing.assert_array_equal(got[:, 0], exact[:, 0])
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(exact, axis=1))


def test_list_maps_cannot_be_made_writeable(tmp_path: Path) -> None:
    from diskivf.segments import ListReader

    _built(tmp_path / "i", 500)
    view = ListReader(tmp_path / "i", DIM, "<f4").get(0, 1, 0)
    assert view is not None
    for arr in view:
        with pytest.raises(ValueError, match="WRITEABLE"):
            arr.flags.writeable = True
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 0


def test_without_libc_mmap_lists_are_mapped_by_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where libc's mmap cannot be loaded, Python's serves, at two descriptors per list."""
    import mmap
    import resource

    from diskivf import segments

    x = _built(tmp_path / "i", 4000, nlist=32)
    monkeypatch.setattr(segments, "_LIBC", None)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert segments.map_budget() == (1 << 16 if soft == resource.RLIM_INFINITY else soft // 4)
    base = _open_fds()
    with diskivf.open(tmp_path / "i") as r:
        _, ids = r.search(x[:50], k=1, nprobe=32)
        assert _open_fds() - base >= 2 * 30  # Python's maps each keep a descriptor
        assert r._maps
        assert all(isinstance(v.vectors._mmap, mmap.mmap) for v in r._maps.values())
    np.testing.assert_array_equal(ids[:, 0], np.arange(50))


def test_running_out_of_maps_names_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctypes
    import errno

    from diskivf import segments

    x = _built(tmp_path / "i", 1000)
    assert segments._LIBC is not None

    def no_more_maps(*args: object) -> int | None:
        ctypes.set_errno(errno.ENOMEM)
        return segments._MAP_FAILED

    monkeypatch.setattr(segments, "_LIBC", segments._LIBC._replace(mmap=no_more_maps))
    with diskivf.open(tmp_path / "i") as r, pytest.raises(OSError, match=r"vm\.max_map_count"):
        r.search(x[0], k=3)
