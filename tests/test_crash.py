"""Crash safety: kill -9 of a writer, simulated failures at every step of the commit protocol,
and simulated power loss (unsynced data dropped or garbled).

The invariant under test (ARCHITECTURE.md section 3): after a crash at any instant the index
opens and holds exactly the batches whose ``add`` returned, plus possibly the one in flight,
entirely or not at all.

Batches are recognisable: batch ``b`` has ids ``b * 1000 + 0..n_b-1`` and vectors computed from
the ids, so "a whole prefix of the batches" is checked row by row.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import diskivf
from diskivf import format as fmt
from diskivf import segments
from diskivf.errors import PoisonedError
from diskivf.segments import ListWriter

DIM = 8
NLIST = 4


def vectors_for(ids: NDArray[np.int64], dim: int) -> NDArray[np.float32]:
    """Deterministic rows computed from ids with integer arithmetic (same bits everywhere)."""
    h = (ids[:, None] * 2654435761 + np.arange(dim) * 40503 + 12345) % 65521
    return h.astype(np.float32) / np.float32(65521) - np.float32(0.5)


def batch_ids(b: int) -> NDArray[np.int64]:
    """Ids of batch ``b``: ``b * 1000`` onwards, 20 to 80 rows depending on ``b``."""
    return b * 1000 + np.arange(20 + (b * 37) % 61, dtype=np.int64)


def batch(b: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """``(vectors, ids)`` of batch ``b``."""
    ids = batch_ids(b)
    return vectors_for(ids, DIM), ids


def check_prefix(ids: NDArray[np.int64], vectors: NDArray[Any]) -> int:
    """Assert that sorted ``ids``/``vectors`` are exactly batches ``0..j``; return ``j + 1``."""
    nb = int(ids.max()) // 1000 + 1 if ids.size else 0
    expected = np.concatenate([np.zeros(0, np.int64), *(batch_ids(b) for b in range(nb))])
    if not np.array_equal(ids, expected):
        present = sorted(set((ids // 1000).tolist()))
        raise AssertionError(
            f"committed rows are not a whole prefix of batches: {ids.size} rows from batches "
            f"{present[:10]}... but batches 0..{nb - 1} hold {expected.size} rows"
        )
    np.testing.assert_array_equal(vectors, vectors_for(ids, vectors.shape[1]))
    return nb


def assert_batches(root: Path, batches: list[int], committed_rows: Any) -> None:
    """The index at ``root`` holds exactly ``batches`` (rows and vectors), and verifies."""
    ids, vecs = committed_rows(root)
    want = np.sort(np.concatenate([np.zeros(0, np.int64), *(batch_ids(b) for b in batches)]))
    assert ids.tolist() == want.tolist(), f"expected batches {batches}"
    np.testing.assert_array_equal(vecs, vectors_for(ids, DIM))
    with diskivf.open(root, "r") as index:
        assert index.ntotal == want.size
        report = index.verify()
        assert report.ok, report.problems


def new_index(root: Path, *, durable: bool = True, batches: int = 0) -> None:
    """Create and train an index at ``root`` and add batches ``0..batches-1``."""
    sample = vectors_for(np.arange(400, dtype=np.int64) * 7919, DIM)
    with diskivf.open(root, "w-", dim=DIM, nlist=NLIST, durable=durable) as index:
        index.train(sample, seed=1)
        for b in range(batches):
            index.add(*batch(b))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained index holding batch 0 in every list (generation 1); copy it, never modify."""
    root = tmp_path_factory.mktemp("crash") / "template.index"
    sample = vectors_for(np.arange(400, dtype=np.int64) * 7919, DIM)
    with diskivf.open(root, "w-", dim=DIM, nlist=NLIST) as index:
        index.train(sample, seed=1)
        # a batch with rows in every list, so that later batches append to existing files
        index.add(*batch(0))
        assert np.all(index.list_sizes() > 0)
        assert index.generation == 1
    return root


@pytest.fixture
def index_copy(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template index."""
    dst = tmp_path / "copy.index"
    shutil.copytree(template, dst)
    return dst


# --------------------------------------------------------------------------------------------
# kill -9 of a writer subprocess
# --------------------------------------------------------------------------------------------

WRITER = f"""
from __future__ import annotations
import sys
import numpy as np
from numpy.typing import NDArray
import diskivf

{inspect.getsource(vectors_for)}
{inspect.getsource(batch_ids)}

path, durable, seed, b = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(seed)
with diskivf.open(path, "r+", durable=durable) as index:
    assert index.generation == b, (index.generation, b)
    print("ready", flush=True)
    while True:
        ids = batch_ids(b)
        index.add(vectors_for(ids, index.dim), ids, batch_size=int(rng.integers(8, 64)))
        print(b, flush=True)  # after add() returned: this batch must survive any crash
        b += 1
"""


def run_kill_trials(
    tmp_path: Path,
    env: dict[str, str],
    committed_rows: Any,
    *,
    trials: int,
    per_index: int,
    max_delay: float,
    seed: int,
) -> Counter[str]:
    """Kill a writer subprocess at a random moment ``trials`` times; check every reopen.

    A fresh index is started every ``per_index`` trials (so that kills also hit the creation
    of list files); otherwise each trial continues the index the previous kill left behind.
    """
    rng = np.random.default_rng(seed)
    stats: Counter[str] = Counter()
    path = tmp_path / "none"
    nb = 0
    for trial in range(trials):
        if trial % per_index == 0:
            path = tmp_path / f"kill{trial}.index"
            new_index(path)
            nb = 0
        durable = trial % 2 == 0
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(int(durable)), str(trial), str(nb)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            ready = proc.stdout.readline()
            assert ready == "ready\n", proc.stderr.read()
            time.sleep(float(rng.uniform(0.0, max_delay)))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            out, err = proc.stdout.read(), proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL, f"writer died on its own:\n{err}"
        # only complete lines: a line cut by the kill does not count as reported
        returned = [int(line) for line in out.split("\n")[:-1]]
        last = returned[-1] if returned else nb - 1
        assert returned == list(range(nb, last + 1))

        ids, vecs = committed_rows(path)
        committed = check_prefix(ids, vecs)
        context = f"trial {trial}: returned {nb}..{last}, committed {committed} batches"
        # every batch whose add() returned is there, plus at most the one in flight
        assert last + 1 <= committed <= last + 2, context
        for mode in ("r", "r+"):
            with diskivf.open(path, mode) as index:
                assert index.generation == committed, context
                assert index.ntotal == ids.size, context
                if mode == "r":
                    report = index.verify()
                    assert report.ok, (context, report.problems)
        stats["trials"] += 1
        stats["torn tails left behind"] += _has_torn_tail(path)
        stats["batches returned"] += len(returned)
        stats["in-flight batch committed"] += committed == last + 2
        stats["killed before the first add returned"] += not returned
        nb = committed
    return stats


def _has_torn_tail(root: Path) -> bool:
    """Whether some list file holds bytes past its committed prefix (an append was cut)."""
    meta = fmt.read_meta(root)
    rec = fmt.read_commit(root, meta.nlist, meta.index_uuid)
    for lid in range(meta.nlist):
        count = int(rec.list_counts[lid])
        vec, ids = (root / name for name in fmt.list_file_names(lid, int(rec.list_gens[lid])))
        if vec.exists() and vec.stat().st_size > count * meta.dim * 4:
            return True
        if ids.exists() and ids.stat().st_size > count * 8:
            return True
    return False


def test_kill9_writer_few_trials(
    tmp_path: Path, child_env: dict[str, str], committed_rows: Any
) -> None:
    stats = run_kill_trials(
        tmp_path, child_env, committed_rows, trials=6, per_index=6, max_delay=0.15, seed=1
    )
    assert stats["trials"] == 6
    assert stats["batches returned"] > 0  # the kills did land during a run of adds


@pytest.mark.slow
def test_kill9_writer_many_trials(
    tmp_path: Path, child_env: dict[str, str], committed_rows: Any
) -> None:
    t0 = time.perf_counter()
    stats = run_kill_trials(
        tmp_path, child_env, committed_rows, trials=120, per_index=30, max_delay=0.25, seed=2
    )
    assert stats["trials"] == 120
    print(f"\nkill -9 trials: {dict(stats)} in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------------------------
# a failure injected at every system call of the commit protocol
# --------------------------------------------------------------------------------------------


def _fd_name(fd: int, root: Path) -> str:
    try:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return f"fd {fd}"
    try:
        return str(target.relative_to(root.resolve())) or "."
    except ValueError:
        return str(target)


class SyscallFaults:
    """Wraps ``os.pwrite``, ``os.fsync`` and ``os.replace``: records every call in ``trace``
    and raises ``exc()`` at call number ``fail_at``, before the call or (``after``) once it
    has taken effect."""

    def __init__(
        self,
        mp: pytest.MonkeyPatch,
        root: Path,
        *,
        fail_at: int | None = None,
        after: bool = False,
        exc: Callable[[], BaseException] = lambda: OSError(errno.EIO, "injected I/O error"),
    ) -> None:
        self.root = root
        self.fail_at = fail_at
        self.after = after
        self.exc = exc
        self.trace: list[str] = []
        self._lock = threading.Lock()  # list files may be fsynced from several threads
        for name in ("pwrite", "fsync", "replace"):
            mp.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _describe(self, name: str, args: tuple[Any, ...]) -> str:
        if name == "replace":
            return f"replace {Path(args[0]).name} -> {Path(args[1]).name}"
        return f"{name} {_fd_name(args[0], self.root)}"

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                step = len(self.trace)
                self.trace.append(self._describe(name, args))
            if step == self.fail_at and not self.after:
                raise self.exc()
            out = real(*args, **kwargs)
            if step == self.fail_at and self.after:
                raise self.exc()
            return out

        return call


def _trace_of_add(root: Path, durable: bool) -> list[str]:
    """The system calls one add of batch 1 makes (on a throwaway copy of ``root``)."""
    scratch = root.with_name(root.name + ".dry")
    shutil.copytree(root, scratch)
    with pytest.MonkeyPatch.context() as mp, diskivf.open(scratch, "r+", durable=durable) as ix:
        faults = SyscallFaults(mp, scratch)
        ix.add(*batch(1))
    shutil.rmtree(scratch)
    return faults.trace


def _commit_replace_step(trace: list[str]) -> int:
    steps = [i for i, s in enumerate(trace) if s.startswith("replace") and fmt.COMMIT_NAME in s]
    assert len(steps) == 1, trace
    return steps[0]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "not-durable"])
@pytest.mark.parametrize("after", [False, True], ids=["before-step", "after-step"])
def test_io_error_at_every_protocol_step(
    index_copy: Path, committed_rows: Any, durable: bool, after: bool
) -> None:
    """An OSError at any write/fsync/replace leaves the disk at the old commit (or the new one
    once the replace took effect), poisons the writer, and a reopened writer carries on."""
    trace = _trace_of_add(index_copy, durable)
    replace = _commit_replace_step(trace)
    if durable:  # the protocol's order: data written and fsynced, then the record published
        first_fsync = next(i for i, s in enumerate(trace) if s.startswith("fsync"))
        assert all(s.startswith("pwrite") for s in trace[:first_fsync]), trace
        tmp = trace[replace].split()[1]  # "replace TMP -> commit.msgpack"
        assert trace[replace - 1] == f"fsync {tmp}", trace  # the new record's bytes first
        assert trace[replace + 1 :] == ["fsync ."], trace
    base = index_copy.with_name("base.index")
    index_copy.rename(base)
    for step, what in enumerate(trace):
        root = index_copy.with_name(f"step{step}.index")
        shutil.copytree(base, root)
        published = step > replace or (step == replace and after)
        expect = [0, 1] if published else [0]
        context = f"failure {'after' if after else 'at'} step {step} ({what}) of {trace}"
        with diskivf.open(root, "r+", durable=durable) as index:
            with pytest.MonkeyPatch.context() as mp:
                SyscallFaults(mp, root, fail_at=step, after=after)
                with pytest.raises(OSError, match="injected") as info:
                    index.add(*batch(1))
                assert not isinstance(info.value, PoisonedError), context
            # readers (no lock needed) see the old commit, or the new one once replaced
            assert_batches(root, expect, committed_rows)
            with pytest.raises(PoisonedError, match="reopen"):
                index.add(*batch(2))
            with pytest.raises(PoisonedError):
                index.flush()
        with diskivf.open(root, "r+", durable=durable) as index:
            assert index.generation == len(expect), context
            index.add(*batch(3))
        assert_batches(root, [*expect, 3], committed_rows)
        shutil.rmtree(root)


def test_interrupt_at_every_protocol_step(index_copy: Path, committed_rows: Any) -> None:
    """A KeyboardInterrupt anywhere in add(): the next add either refuses (poisoned) or
    continues from what is on disk; it never overwrites rows a reader already saw committed."""
    trace = _trace_of_add(index_copy, True)
    replace = _commit_replace_step(trace)
    base = index_copy.with_name("base.index")
    index_copy.rename(base)
    outcomes: Counter[str] = Counter()
    for step, what in enumerate(trace):
        root = index_copy.with_name(f"step{step}.index")
        shutil.copytree(base, root)
        expect = [0, 1] if step > replace else [0]
        context = f"interrupt at step {step} ({what})"
        with diskivf.open(root, "r+") as index:
            with pytest.MonkeyPatch.context() as mp:
                SyscallFaults(mp, root, fail_at=step, exc=KeyboardInterrupt)
                with pytest.raises(KeyboardInterrupt):
                    index.add(*batch(1))
            assert_batches(root, expect, committed_rows)
            try:
                index.add(*batch(2))
            except PoisonedError:
                outcomes["poisoned"] += 1
            else:
                outcomes["continued"] += 1
                expect.append(2)
            assert_batches(root, expect, committed_rows)
        with diskivf.open(root, "r+") as index:
            assert index.generation == len(expect), context
        shutil.rmtree(root)
    # interrupted while publishing -> poisoned; while writing list data -> may continue
    assert outcomes["continued"] >= 1, outcomes
    assert outcomes["poisoned"] >= 1, outcomes


def _fail_on_call(real: Callable[..., Any], n: int, exc: OSError) -> Callable[..., Any]:
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise exc
        return real(*args, **kwargs)

    return wrapper


NAMED_STEPS = [
    # (target object, attribute, failing call number, errno, new commit published?)
    pytest.param(ListWriter, "write", 1, errno.ENOSPC, False, id="ListWriter.write#1-ENOSPC"),
    pytest.param(ListWriter, "write", 3, errno.ENOSPC, False, id="ListWriter.write#3-ENOSPC"),
    pytest.param(ListWriter, "sync", 1, errno.EIO, False, id="ListWriter.sync-EIO"),
    pytest.param(os, "fsync", 1, errno.EIO, False, id="os.fsync#1-EIO"),
    pytest.param(os, "fsync", 5, errno.EIO, False, id="os.fsync#5-EIO"),
    pytest.param(fmt, "atomic_write", 1, errno.ENOSPC, False, id="format.atomic_write-ENOSPC"),
    pytest.param(os, "replace", 1, errno.EIO, False, id="os.replace-EIO"),
    pytest.param(fmt, "fsync_dir", 1, errno.EIO, True, id="format.fsync_dir-EIO"),
]


@pytest.mark.parametrize(("target", "attr", "n", "code", "published"), NAMED_STEPS)
def test_injected_failure_in_named_step(
    index_copy: Path,
    committed_rows: Any,
    target: Any,
    attr: str,
    n: int,
    code: int,
    published: bool,
) -> None:
    """ENOSPC / EIO from one named step of add(): the error surfaces with its errno, the index
    stays at its last commit, the writer is poisoned, and a reopened writer works."""
    with diskivf.open(index_copy, "r+") as index:
        with pytest.MonkeyPatch.context() as mp:
            exc = OSError(code, os.strerror(code))
            mp.setattr(target, attr, _fail_on_call(getattr(target, attr), n, exc))
            with pytest.raises(OSError, match=os.strerror(code)) as info:
                index.add(*batch(1))
        assert info.value.errno == code
        assert index.generation == 1  # the writer's snapshot stays at its last known commit
        expect = [0, 1] if published else [0]
        assert_batches(index_copy, expect, committed_rows)
        with pytest.raises(PoisonedError, match=os.strerror(code)):
            index.add(*batch(2))
    with diskivf.open(index_copy, "r+") as index:
        index.add(*batch(2))
    assert_batches(index_copy, [*expect, 2], committed_rows)


def test_failed_train_poisons_and_keeps_untrained(tmp_path: Path) -> None:
    root = tmp_path / "t.index"
    sample = vectors_for(np.arange(100, dtype=np.int64), DIM)
    with diskivf.open(root, "w-", dim=DIM, nlist=NLIST) as index:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "fsync", _fail_on_call(os.fsync, 1, OSError(errno.EIO, "fsync")))
            with pytest.raises(OSError, match="fsync"):
                index.train(sample)
        with pytest.raises(PoisonedError):
            index.train(sample)
    with diskivf.open(root, "r+") as index:
        assert not index.is_trained
        index.train(sample)
        index.add(*batch(0))
        assert index.verify().ok


def test_flush_failure_poisons(tmp_path: Path) -> None:
    root = tmp_path / "f.index"
    new_index(root, durable=False)
    with diskivf.open(root, "r+", durable=False) as index:
        index.add(*batch(0))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "fsync", _fail_on_call(os.fsync, 1, OSError(errno.EIO, "fsync")))
            with pytest.raises(OSError, match="fsync"):
                index.flush()
        with pytest.raises(PoisonedError):
            index.add(*batch(1))
    with diskivf.open(root, "r+") as index:
        assert index.generation == 1


# --------------------------------------------------------------------------------------------
# simulated power loss
# --------------------------------------------------------------------------------------------


class PowerLossModel:
    """Tracks what a power cut would keep: only fsynced file data and directory entries.

    ``os.pwrite`` data stays "unsynced" until its file is fsynced; a created file or directory
    stays "undurable" until its parent directory is fsynced; a replaced commit record is only
    pending until the index directory is fsynced (and is lost entirely if its temporary file
    was never fsynced). Before every pwrite/fsync/replace it calls ``on_step``; :meth:`image`
    builds the directory a power cut at that instant could leave behind: unsynced ranges
    garbled or dropped, undurable entries gone.
    """

    TRACKED = ("open", "mkdir", "pwrite", "fsync", "replace")

    def __init__(self, mp: pytest.MonkeyPatch, root: Path) -> None:
        self.root = root.resolve()
        self.unsynced: dict[Path, list[tuple[int, int]]] = {}
        self.undurable: set[Path] = set()
        self.synced_tmp: set[Path] = set()
        self.durable_commit = (root / fmt.COMMIT_NAME).read_bytes()
        self.pending_commit: bytes | None = None
        self.on_step: Callable[[], None] = lambda: None
        self.steps = 0
        # List files may be fsynced from several threads: calls inside the index are
        # linearised under this lock. Calls outside it (building and checking images) are not
        # modelled, so they never wait for it.
        self._lock = threading.RLock()
        for name in self.TRACKED:
            mp.setattr(os, name, self._wrap(name, getattr(os, name)))

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Hold every modelled call of other threads back (while images are checked)."""
        with self._lock:
            yield

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if name in ("pwrite", "fsync"):
                path = Path(os.readlink(f"/proc/self/fd/{args[0]}"))
            else:  # open and mkdir name their path first, replace its destination second
                path = Path(os.path.realpath(args[1] if name == "replace" else args[0]))
            if not path.is_relative_to(self.root):
                return real(*args, **kwargs)
            with self._lock:
                created = self._before(name, path, args, kwargs)
            out = real(*args, **kwargs)
            if created:
                with self._lock:
                    self.undurable.add(path)
            return out

        return call

    def _before(self, name: str, path: Path, args: tuple[Any, ...], kwargs: Any) -> bool:
        """Cut the power just before this call, then account for it; True if it creates
        ``path``."""
        if name in ("pwrite", "fsync", "replace"):
            self.steps += 1
            self.on_step()
        if name in ("open", "mkdir"):
            flags = args[1] if len(args) > 1 else kwargs.get("flags", 0)
            return (name == "mkdir" or bool(flags & os.O_CREAT)) and not path.exists()
        if name == "fsync":
            self._fsync(path)
        elif name == "pwrite":
            start = args[2]
            self.unsynced.setdefault(path, []).append((start, start + len(args[1])))
        elif name == "replace" and path.name == fmt.COMMIT_NAME:
            src = Path(os.path.realpath(args[0]))
            # a temporary file that was never fsynced may be empty after a power cut
            self.pending_commit = src.read_bytes() if src in self.synced_tmp else b""
            self.synced_tmp.discard(src)
        return False

    def _fsync(self, path: Path) -> None:
        if path.is_dir():
            self.undurable = {p for p in self.undurable if p.parent != path}
            if path == self.root and self.pending_commit is not None:
                self.durable_commit, self.pending_commit = self.pending_commit, None
        else:
            self.unsynced.pop(path, None)
            self.synced_tmp.add(path)

    def commits(self) -> list[bytes]:
        """The commit records a power cut now could leave: the durable one, or the pending."""
        pending = [] if self.pending_commit is None else [self.pending_commit]
        return [self.durable_commit, *pending]

    def image(self, dst: Path, commit: bytes, rng: np.random.Generator, garble: bool) -> None:
        """Write what a power cut now could leave behind into the new directory ``dst``."""
        shutil.copytree(self.root, dst)
        for path in sorted(self.undurable, key=lambda p: len(p.parts), reverse=True):
            mirrored = dst / path.relative_to(self.root)
            if mirrored.is_dir():
                shutil.rmtree(mirrored)
            else:
                mirrored.unlink(missing_ok=True)
        for path, ranges in self.unsynced.items():
            mirrored = dst / path.relative_to(self.root)
            if not mirrored.exists():
                continue
            with open(mirrored, "r+b") as f:
                if garble:
                    for a, b in ranges:
                        f.seek(a)
                        f.write(rng.integers(0, 256, b - a, dtype=np.uint8).tobytes())
                else:
                    f.truncate(min(a for a, _ in ranges))
        (dst / fmt.COMMIT_NAME).write_bytes(commit)


@pytest.mark.parametrize("fd_budget", [None, 3], ids=["fds-kept", "fds-evicted"])
def test_power_loss_at_every_step(
    tmp_path: Path, committed_rows: Any, fd_budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut the power before every write/fsync/replace of three adds (the first one creates
    the list files): the surviving directory always opens at a whole commit that includes
    every add that had returned, verifies, and accepts more adds.

    With a budget of 3 descriptors the writer closes list files in the middle of every add
    (an index with more lists than its share of ``RLIMIT_NOFILE``), fsyncing each one it
    wrote before closing it: the commit's own sync then no longer covers those files.
    """
    root = tmp_path / "p.index"
    new_index(root)
    evictions = 0
    if fd_budget is not None:
        monkeypatch.setattr(segments, "_fd_budget", lambda: fd_budget)
        real_close = os.close
        own_lists = str(root.resolve() / "lists") + os.sep

        def counting_close(fd: int) -> None:
            nonlocal evictions
            if os.readlink(f"/proc/self/fd/{fd}").startswith(own_lists):
                evictions += 1
            real_close(fd)

        monkeypatch.setattr(os, "close", counting_close)
    rng = np.random.default_rng(5)
    images: list[tuple[Path, int]] = []  # (image, adds that had returned when it was cut)
    returned = 0
    generations: Counter[int] = Counter()

    def cut_power() -> None:
        for commit in model.commits():
            dst = tmp_path / f"image{len(images) + generations.total()}"
            model.image(dst, commit, rng, garble=(len(images) + generations.total()) % 2 == 0)
            images.append((dst, returned))

    def check_images() -> None:
        for path, done in images:
            with diskivf.open(path, "r") as index:
                generation = index.generation
                report = index.verify()
            assert report.ok, (path.name, report.problems)
            assert done <= generation <= done + 1, f"{path.name}: a returned add() was lost"
            assert_batches(path, list(range(generation)), committed_rows)
            with diskivf.open(path, "r+", durable=False) as index:  # (no need to fsync here)
                index.add(*batch(50))
            assert_batches(path, [*range(generation), 50], committed_rows)
            generations[generation] += 1
            shutil.rmtree(path)
        images.clear()

    with pytest.MonkeyPatch.context() as mp:
        model = PowerLossModel(mp, root)
        model.on_step = cut_power
        with diskivf.open(root, "r+") as index:
            for b in range(3):
                index.add(*batch(b))
                returned += 1
                # add() returned: its commit record is durable, whatever is cut next
                assert model.pending_commit is None
                with model.frozen():
                    cut_power()
                    check_images()
            if fd_budget is not None:  # files were closed mid-add, before the index was
                assert evictions > 0
    assert model.steps > 20
    assert set(generations) == {0, 1, 2, 3}, generations


def test_garbage_past_committed_prefix_is_ignored_and_overwritten(
    index_copy: Path, committed_rows: Any
) -> None:
    """Torn tails (unsynced appends that partly reached the disk) and garbage list files of
    empty lists: readers ignore them, verify() passes, and the next add overwrites them."""
    rng = np.random.default_rng(3)
    lists = index_copy / fmt.LISTS_DIR
    for path in sorted(lists.iterdir()):
        with open(path, "ab") as f:
            f.write(rng.integers(0, 256, int(rng.integers(1, 500)), dtype=np.uint8).tobytes())
    assert_batches(index_copy, [0], committed_rows)
    with diskivf.open(index_copy, "r+") as index:
        index.add(*batch(1))
    assert_batches(index_copy, [0, 1], committed_rows)


def test_dropped_tail_after_commit(index_copy: Path, committed_rows: Any) -> None:
    """Uncommitted bytes lost entirely (files cut back to the committed prefix): still fine."""
    with diskivf.open(index_copy, "r+") as index, pytest.MonkeyPatch.context() as mp:
        err = OSError(errno.EIO, "injected")
        mp.setattr(ListWriter, "sync", _fail_on_call(ListWriter.sync, 1, err))
        with pytest.raises(OSError, match="injected"):
            index.add(*batch(1))  # rows of batch 1 written past the prefix, never published
    with diskivf.open(index_copy, "r") as index:
        sizes = index.list_sizes()
    grown = 0
    for lid, count in enumerate(sizes.tolist()):
        vec, ids = fmt.list_file_names(lid, 0)
        grown += (index_copy / vec).stat().st_size > count * DIM * 4  # unpublished rows
        os.truncate(index_copy / vec, count * DIM * 4)
        os.truncate(index_copy / ids, count * 8)
    assert grown > 0
    assert_batches(index_copy, [0], committed_rows)
    with diskivf.open(index_copy, "r+") as index:
        index.add(*batch(1))
    assert_batches(index_copy, [0, 1], committed_rows)


def test_garbled_uncommitted_tail_then_continue(index_copy: Path, committed_rows: Any) -> None:
    """A writer dies mid-batch (ENOSPC on its third write), the partial rows are then garbled
    on disk; a new writer appends over them and only committed data is ever visible."""
    with diskivf.open(index_copy, "r+") as index:
        with pytest.MonkeyPatch.context() as mp:
            err = OSError(errno.ENOSPC, "No space left on device")
            mp.setattr(ListWriter, "write", _fail_on_call(ListWriter.write, 3, err))
            with pytest.raises(OSError, match="No space"):
                index.add(*batch(1))
        sizes = index.list_sizes()
    rng = np.random.default_rng(4)
    for lid, count in enumerate(sizes.tolist()):
        starts = (count * DIM * 4, count * 8)
        for name, start in zip(fmt.list_file_names(lid, 0), starts, strict=True):
            path = index_copy / name
            tail = path.stat().st_size - start
            with open(path, "r+b") as f:
                f.seek(start)
                f.write(rng.integers(0, 256, max(tail, 64), dtype=np.uint8).tobytes())
    assert_batches(index_copy, [0], committed_rows)
    for b in (1, 2):
        with diskivf.open(index_copy, "r+") as index:
            index.add(*batch(b))
        assert_batches(index_copy, list(range(b + 1)), committed_rows)
