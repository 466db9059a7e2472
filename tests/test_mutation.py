"""remove / upsert / compact: exactness against a model, crash safety, readers during compaction."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import diskivf
from diskivf import errors

DIM = 4
NLIST = 3


def _index(path: Path, x: np.ndarray) -> diskivf.Index:
    ix = diskivf.open(path, mode="w-", dim=x.shape[1], nlist=NLIST)
    ix.train(x)
    return ix


def _files(path: Path) -> set[str]:
    return {p.name for p in (path / "lists").iterdir()}


def test_remove_hides_ids_and_counts(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((200, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        gen = ix.generation
        assert ix.remove([3, 5, 5, 999_999]) == 2  # repeats once, absent ids not counted
        assert ix.generation == gen + 1
        assert ix.ntotal == 198
        assert ix.nremoved == 2
        assert ix.list_sizes().sum() == 198
        _, i = ix.search(x[3], k=200, nprobe=NLIST)
        assert 3 not in i
        assert 5 not in i
        assert (i[0, :198] >= 0).all()
        assert (i[0, 198:] == -1).all()
        assert ix.remove([3]) == 0  # already removed: nothing to do, no commit
        assert ix.generation == gen + 1
    with diskivf.open(tmp_path / "i") as r:
        assert r.ntotal == 198
        assert 5 not in r.search(x[5], k=5, nprobe=NLIST).ids


def test_remove_all_copies_of_a_duplicate_id(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as ix:
        ix.add(x[:2], ids=[7, 7])
        assert ix.remove(np.array([7])) == 2
        assert ix.ntotal == 0


def test_removed_id_can_be_added_again(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((50, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        ix.remove([10])
        ix.add(x[10:11] + 1, ids=[10])
        d, i = ix.search(x[10] + 1, k=1, nprobe=NLIST)
        assert i[0, 0] == 10
        assert d[0, 0] == pytest.approx(0, abs=1e-5)


def test_upsert_replaces_and_adds_atomically(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((100, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        gen = ix.generation
        new = -x[:3] * 10  # far away: likely another list
        assert ix.upsert(new, ids=[0, 1, 500]).tolist() == [0, 1, 500]
        assert ix.generation == gen + 1
        assert ix.ntotal == 101
        d, i = ix.search(new[0], k=1, nprobe=NLIST)
        assert i[0, 0] == 0
        assert d[0, 0] == pytest.approx(0, abs=1e-3)
        _, i = ix.search(x[0], k=3, nprobe=NLIST)
        assert 0 not in i[0]  # the old vector of id 0 is gone
        with pytest.raises(ValueError, match="distinct ids"):
            ix.upsert(x[:2], ids=[4, 4])
        with pytest.raises(ValueError, match="ids of shape"):
            ix.upsert(x[:2], ids=[4])
        assert ix.generation == gen + 1


def test_compact_reclaims_bytes_and_keeps_results(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, DIM)).astype(np.float32)
    q = rng.standard_normal((20, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        ix.remove(np.arange(0, 3000, 3))
        before = ix.search(q, k=10, nprobe=NLIST)
        size = sum(p.stat().st_size for p in (tmp_path / "i" / "lists").iterdir())
        freed = ix.compact()
        assert freed == 1000 * (DIM * 4 + 8)
        after_size = sum(p.stat().st_size for p in (tmp_path / "i" / "lists").iterdir())
        assert size - after_size == freed
        assert ix.nremoved == 0
        assert ix.ntotal == 2000
        after = ix.search(q, k=10, nprobe=NLIST)
        np.testing.assert_array_equal(after.ids, before.ids)
        assert all(".1." in name for name in _files(tmp_path / "i"))
        assert ix.verify().ok
        assert ix.compact() == 0
        assert ix.remove([1]) == 1  # the id map is rebuilt after compaction moved rows
    with diskivf.open(tmp_path / "i") as r:
        assert r.ntotal == 1999
        np.testing.assert_array_equal(r.search(q, k=10, nprobe=NLIST).ids[:, :5], after.ids[:, :5])


@pytest.mark.parametrize("suffix", [".vec", ".ids"])
def test_compact_refuses_a_list_that_fails_its_checksum(tmp_path: Path, suffix: str) -> None:
    """Compaction copies a list with fresh checksums and deletes the old files: a damaged
    list would come out verifying, its evidence gone. It refuses before writing anything."""
    x = np.random.default_rng(7).standard_normal((900, DIM)).astype(np.float32)
    lists = tmp_path / "i" / "lists"
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        ix.remove(np.arange(0, 900, 2))  # every list holds removed rows
        damaged = max(lists.glob(f"*.0{suffix}"))
        raw = bytearray(damaged.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        damaged.write_bytes(bytes(raw))
        before = _files(tmp_path / "i")
        generation = ix.generation
        lid = int(damaged.name[:7])
        with pytest.raises(errors.CorruptIndexError, match=f"list {lid} file lists/{damaged.name}"):
            ix.compact()
        assert _files(tmp_path / "i") == before  # nothing written, nothing deleted
        assert ix.generation == generation
        assert ix.nremoved == 450
        (problem,) = ix.verify().problems
        assert f"lists/{damaged.name}" in problem
        ix.add(x[:10])  # the writer is not poisoned


def test_compact_deletes_files_no_commit_names(tmp_path: Path) -> None:
    """Files a killed compaction left (a generation never committed, or one no longer
    named) go with the next compaction, whether or not it has rows to remove."""
    x = np.random.default_rng(6).standard_normal((900, DIM)).astype(np.float32)
    lists = tmp_path / "i" / "lists"
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        named = _files(tmp_path / "i")
        assert named
        strays = ["0000000.1.vec", "0000000.1.ids", "0000001.7.ids"]  # never committed
        keep = ["0000099.1.vec", "notes.txt", ".0000000.1.vec.abc.tmp"]  # not list files of ours
        for name in strays + keep:
            (lists / name).write_bytes(b"x" * 64)
        assert ix.compact() == 0  # nothing removed: only the sweep
        assert {p.name for p in lists.iterdir()} == {Path(n).name for n in named} | set(keep)
        ix.remove(np.arange(0, 900, 2))
        (lists / "0000002.0.ids.bak").write_bytes(b"")  # not a list-file name
        (lists / "0000001.5.vec").write_bytes(b"x")  # killed compaction, another generation
        assert ix.compact() > 0
        left = {p.name for p in lists.iterdir()} - set(keep) - {"0000002.0.ids.bak"}
        assert left
        assert all(".1." in name for name in left)  # only the committed generation stays
        assert ix.verify().ok


def test_reader_survives_compaction_of_its_snapshot(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((600, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as w:
        w.add(x)
        with diskivf.open(tmp_path / "i") as r:
            r.search(x[0], k=5, nprobe=1)  # maps one list only
            gen = r.generation
            w.remove(np.arange(300))
            w.compact()  # deletes every file of r's snapshot
            _, i = r.search(x[:50], k=5, nprobe=NLIST)  # unmapped lists: moves to newest
            assert r.generation > gen
            assert (i >= 300).all()
            assert r.ntotal == 300


def test_reader_keeps_removed_ids_until_refresh(tmp_path: Path) -> None:
    x = np.random.default_rng(6).standard_normal((100, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as w:
        w.add(x)
        with diskivf.open(tmp_path / "i") as r:
            w.remove([42])
            assert 42 in r.search(x[42], k=1, nprobe=NLIST).ids  # its snapshot predates it
            r.refresh()
            assert 42 not in r.search(x[42], k=1, nprobe=NLIST).ids


def test_remove_rejects_bad_ids(tmp_path: Path) -> None:
    x = np.random.default_rng(7).standard_normal((20, DIM)).astype(np.float32)
    with _index(tmp_path / "i", x) as ix:
        ix.add(x)
        with pytest.raises(ValueError, match="integer ids"):
            ix.remove([1.5])
        with pytest.raises(ValueError, match="shape"):
            ix.remove([[1, 2]])
        assert ix.remove([]) == 0
        assert ix.ntotal == 20
    with diskivf.open(tmp_path / "i") as r, pytest.raises(errors.ReadOnlyError):
        r.remove([1])


# ---------------------------------------------------------------- crash during compaction

_COMPACT_WORKER = """
import sys, numpy as np, diskivf
path = sys.argv[1]
with diskivf.open(path, mode="r+") as ix:
    print("ready", flush=True)
    ix.compact()
print("done", flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02, 0.05])
def test_kill_during_compact_leaves_old_or_new_state(tmp_path: Path, delay: float) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40000, 16)).astype(np.float32)
    path = tmp_path / "i"
    with diskivf.open(path, mode="w-", dim=16, nlist=64) as ix:
        ix.train(x[:5000])
        ix.add(x)
        ix.remove(np.arange(0, 40000, 2))
    proc = subprocess.Popen(
        [sys.executable, "-c", _COMPACT_WORKER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with diskivf.open(path) as r:
        assert r.ntotal == 20000
        assert r.nremoved in (0, 20000)  # old state (tombstones) or new (compacted)
        assert r.verify().ok
        _, i = r.search(x[:64:2], k=1, nprobe=64)
        assert (i[:, 0] != np.arange(0, 64, 2)).all()  # removed ids stay removed
        _, i = r.search(x[1:64:2], k=1, nprobe=64)
        np.testing.assert_array_equal(i[:, 0], np.arange(1, 64, 2))
    with diskivf.open(path, mode="r+") as w:  # a later compaction finishes the job
        w.compact()
        assert w.nremoved == 0
        assert w.verify().ok


# ---------------------------------------------------------------- reader process during compaction

_READER = """
import sys, numpy as np, diskivf
path, removed_upto = sys.argv[1], int(sys.argv[2])
q = np.load(sys.argv[3])
bad = 0
with diskivf.open(path) as r:
    for step in range(300):
        d, i = r.search(q, k=10, nprobe=16)
        if r.generation >= 2 and (i[(i >= 0)] < removed_upto).any():
            bad += 1
        if step % 10 == 0:
            r.refresh()
print(bad, r.generation, flush=True)
"""


def test_reader_process_searching_through_compaction(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((20000, 16)).astype(np.float32)
    np.save(tmp_path / "q.npy", x[:20])
    path = tmp_path / "i"
    w = diskivf.open(path, mode="w-", dim=16, nlist=16)
    w.train(x[:4000])
    w.add(x)  # generation 1
    reader = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path), "5000", str(tmp_path / "q.npy")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    w.remove(np.arange(5000))  # generation 2: removed from here on
    for _ in range(3):
        w.compact()
        w.add(x[5000:5100] + 100, ids=np.arange(30000, 30100))
        w.remove(np.arange(30000, 30100))
    w.close()
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err
    bad, _gen = map(int, out.split())
    assert bad == 0


# ---------------------------------------------------------------- stateful model


class MutationMachine(RuleBasedStateMachine):
    """add / remove / upsert / compact / reopen against a dict model searched exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskivf-mut-"))
        self.path = self.dir / "i"
        rng = np.random.default_rng(0)
        self.ix = _index(self.path, rng.integers(-3, 4, (30, DIM)).astype(np.float32))
        self.model: list[tuple[int, np.ndarray]] = []
        self.next = 0

    def teardown(self) -> None:
        self.ix.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    vec = st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM)

    @rule(rows=st.lists(vec, min_size=1, max_size=6))
    def add(self, rows: list[list[int]]) -> None:
        x = np.array(rows, np.float32)
        ids = self.ix.add(x)
        self.model += [(int(i), v) for i, v in zip(ids, x, strict=True)]

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        present = sorted({i for i, _ in self.model})
        victims = data.draw(st.lists(st.sampled_from(present), max_size=3))
        victims.append(10_000_000)  # an absent id
        expect = sum(1 for i, _ in self.model if i in victims)
        assert self.ix.remove(victims) == expect
        self.model = [(i, v) for i, v in self.model if i not in victims]

    @rule(data=st.data(), rows=st.lists(vec, min_size=1, max_size=3))
    def upsert(self, data: st.DataObject, rows: list[list[int]]) -> None:
        pool = sorted({i for i, _ in self.model} | {5000, 5001, 5002})
        ids = data.draw(
            st.lists(st.sampled_from(pool), min_size=len(rows), max_size=len(rows), unique=True)
        )
        x = np.array(rows, np.float32)
        self.ix.upsert(x, ids=ids)
        self.model = [(i, v) for i, v in self.model if i not in ids]
        self.model += [(i, v) for i, v in zip(ids, x, strict=True)]

    @rule()
    def compact(self) -> None:
        self.ix.compact()

    @rule()
    def reopen(self) -> None:
        self.ix.close()
        self.ix = diskivf.open(self.path, mode="r+")

    @precondition(lambda self: self.model)
    @rule(q=vec, k=st.integers(1, 6))
    def search(self, q: list[int], k: int) -> None:
        qv = np.array(q, np.float32)
        ids = np.array([i for i, _ in self.model])
        vecs = np.array([v for _, v in self.model])
        cost = ((vecs - qv) ** 2).sum(1)
        order = np.lexsort((ids, cost))[:k]
        for queries in (qv, np.vstack([qv, qv])):  # single-query and batch paths
            d, i = self.ix.search(queries, k=k, nprobe=NLIST)
            kk = min(k, len(ids))
            np.testing.assert_array_equal(i[0, :kk], ids[order])
            np.testing.assert_allclose(d[0, :kk], cost[order], atol=1e-4)
            assert (i[0, kk:] == -1).all()

    @invariant()
    def sizes(self) -> None:
        assert self.ix.ntotal == len(self.model)
        assert self.ix.list_sizes().sum() == len(self.model)


TestMutationMachine = MutationMachine.TestCase
TestMutationMachine.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
