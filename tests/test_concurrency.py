"""One writer, many readers, across processes.

- A writer process appends batches while three reader processes loop refresh + search (and
  sometimes reopen or verify): every snapshot a reader sees must hold a whole number of
  batches, all of them, with the right vectors; a snapshot that is not refreshed must keep
  giving the same answers while the writer appends; nobody crashes.
- A second writer, in another process or in the same one, fails at once with ``LockedError``
  naming the lock file; readers take no lock.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import diskivf
from diskivf import format as fmt
from diskivf.errors import LockedError

DIM = 8
NLIST = 8

COMMON = f"""
import json, sys, time
import numpy as np
import diskivf

DIM, NLIST = {DIM}, {NLIST}


def table(nrows):
    # row i is the vector of id i (default ids count from 0)
    return np.random.default_rng(7).standard_normal((nrows, DIM)).astype(np.float32)


def fail(msg):
    raise AssertionError(msg)
"""

WRITER = (
    COMMON
    + """
path, nb, bsz, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
X = table(nb * bsz)
with diskivf.open(path, "r+") as index:
    for b in range(index.generation, nb):
        ids = index.add(X[b * bsz : (b + 1) * bsz], batch_size=int(7 + b % 40))
        if ids.tolist() != list(range(b * bsz, (b + 1) * bsz)):
            fail(f"batch {b} got ids {ids[:3]}...")
        time.sleep(pause)
print("done", flush=True)
"""
)

READER = (
    COMMON
    + """
path, (nb, bsz, seed), timeout = sys.argv[1], map(int, sys.argv[2:5]), float(sys.argv[5])
X = table(nb * bsz)
rng = np.random.default_rng(seed)
stats = {"iterations": 0, "reopens": 0, "verifies": 0, "pinned_checks": 0, "generations": []}


def check(index):
    # one snapshot: a whole number of batches, every row present once with its own vector
    g, n = index.generation, index.ntotal
    if n != g * bsz or int(index.list_sizes().sum()) != n:
        fail(f"generation {g} holds {n} rows, {index.list_sizes().tolist()} per list")
    if n == 0:
        D, I = index.search(X[:2], k=3, nprobe=NLIST)
        if (I != -1).any() or np.isfinite(D).any():
            fail(f"empty snapshot returned {I}")
        return
    q = X[rng.integers(n)]
    D, I = index.search(q, k=n, nprobe=NLIST)
    if sorted(I[0].tolist()) != list(range(n)):
        fail(f"generation {g}: a full scan returned {len(set(I[0].tolist()))} distinct ids")
    exact = ((X[I[0]] - q) ** 2).sum(axis=1)
    if not np.allclose(D[0], exact, rtol=1e-4, atol=1e-3):
        fail(f"generation {g}: distances do not match the stored vectors")
    js = rng.integers(0, n, 4)
    D1, I1 = index.search(X[js], k=1, nprobe=NLIST)
    if I1[:, 0].tolist() != js.tolist():
        fail(f"generation {g}: nearest neighbours of {js} were {I1[:, 0]}")
    D2, I2 = index.search(X[js], k=5)  # the default nprobe: ids of this snapshot or -1
    if ((I2 < -1) | (I2 >= n)).any():
        fail(f"generation {g}: ids beyond the snapshot: {I2.max()}")


def pin():
    # a snapshot kept open and never refreshed, with the answers it gave
    index = diskivf.open(path, "r")
    q = X[rng.integers(0, nb * bsz, 3)]
    k = max(1, min(index.ntotal, 20))
    return index, q, k, index.search(q, k=k, nprobe=NLIST)


index = diskivf.open(path, "r")
pinned = pin()
print("ready", flush=True)
deadline = time.monotonic() + timeout
while True:
    it = stats["iterations"]
    if it % 7 == 6:
        index.close()
        index = diskivf.open(path, "r")
        stats["reopens"] += 1
    else:
        index.refresh()
    check(index)
    if it % 11 == 10:
        report = index.verify()
        if not report.ok:
            fail(f"verify failed while the writer appends: {report.problems}")
        stats["verifies"] += 1
    old, q, k, before = pinned
    after = old.search(q, k=k, nprobe=NLIST)
    if not (np.array_equal(before.ids, after.ids) and np.array_equal(before[0], after[0])):
        fail(f"a pinned snapshot (generation {old.generation}) changed its answers")
    stats["pinned_checks"] += 1
    if it % 10 == 9:
        old.close()
        pinned = pin()
    if not stats["generations"] or stats["generations"][-1] != index.generation:
        stats["generations"].append(index.generation)
    stats["iterations"] += 1
    if index.generation == nb:
        break
    if time.monotonic() > deadline:
        fail(f"timed out at generation {index.generation} of {nb}")
print(json.dumps(stats), flush=True)
"""
)


def _train(root: Path) -> None:
    sample = np.random.default_rng(1).standard_normal((2000, DIM)).astype(np.float32)
    with diskivf.open(root, "w-", dim=DIM, nlist=NLIST) as index:
        index.train(sample, niter=5)


def run_writer_and_readers(
    root: Path, env: dict[str, str], *, nb: int, bsz: int, pause: float, nreaders: int = 3
) -> list[dict[str, Any]]:
    """Start ``nreaders`` reader processes, then one writer; return the readers' stats."""
    _train(root)
    timeout = 120.0
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(root), str(nb), str(bsz), str(i), str(timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        for i in range(nreaders)
    ]
    procs = list(readers)
    try:
        for proc in readers:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line == "ready\n", proc.communicate()[1]
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(nb), str(bsz), str(pause)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        procs.append(writer)
        out, err = writer.communicate(timeout=timeout)
        assert writer.returncode == 0, err
        assert out == "done\n"
        stats = []
        for proc in readers:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"a reader failed:\n{err}"
            stats.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    with diskivf.open(root) as index:
        assert index.ntotal == nb * bsz
        assert index.verify().ok
    return stats


def test_one_writer_three_readers(tmp_path: Path, child_env: dict[str, str]) -> None:
    stats = run_writer_and_readers(tmp_path / "c.index", child_env, nb=40, bsz=40, pause=0.01)
    for s in stats:
        # each reader saw the index grow through several snapshots, all checked
        assert len(s["generations"]) >= 3, s
        assert s["generations"] == sorted(s["generations"]), s
        assert s["generations"][-1] == 40
        assert s["reopens"] >= 1
        assert s["pinned_checks"] == s["iterations"]


@pytest.mark.slow
def test_one_writer_three_readers_long(tmp_path: Path, child_env: dict[str, str]) -> None:
    t0 = time.perf_counter()
    stats = run_writer_and_readers(tmp_path / "c.index", child_env, nb=600, bsz=25, pause=0.0)
    for s in stats:
        assert len(s["generations"]) >= 10, s
        assert s["generations"][-1] == 600
    summary = [{k: (len(v) if k == "generations" else v) for k, v in s.items()} for s in stats]
    print(f"\nreaders: {summary} in {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------------------------
# the writer lock
# --------------------------------------------------------------------------------------------


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    root = tmp_path / "l.index"
    _train(root)
    with diskivf.open(root, "r+") as index:
        index.add(np.ones((5, DIM), np.float32))
    return root


def test_second_writer_in_the_same_process_fails_at_once(trained: Path) -> None:
    with diskivf.open(trained, "r+") as writer:
        for mode, kwargs in [("r+", {}), ("a", {}), ("w", {"dim": DIM, "nlist": NLIST})]:
            t0 = time.perf_counter()
            with pytest.raises(LockedError, match=fmt.LOCK_NAME) as info:
                diskivf.open(trained, mode, **kwargs)  # type: ignore[arg-type]
            assert time.perf_counter() - t0 < 1.0
            assert isinstance(info.value, BlockingIOError)
            assert str(trained / fmt.LOCK_NAME) in str(info.value)
        with diskivf.open(trained, "r") as reader:  # readers need no lock
            assert reader.ntotal == 5
        writer.add(np.zeros((2, DIM), np.float32))
        assert writer.ntotal == 7  # the failed opens did not disturb the writer ("w" included)
    with diskivf.open(trained, "r+") as again:  # closing released the lock
        assert again.ntotal == 7


HOLDER = """
import sys, diskivf
with diskivf.open(sys.argv[1], "r+") as index:
    print("locked", flush=True)
    sys.stdin.readline()
"""

CONTENDER = """
import sys, time, diskivf
from diskivf.errors import LockedError
t0 = time.perf_counter()
try:
    diskivf.open(sys.argv[1], "r+")
except LockedError as exc:
    print(f"LockedError {time.perf_counter() - t0:.3f} {exc}")
else:
    print("opened")
"""


def test_second_writer_in_another_process_fails_at_once(
    trained: Path, child_env: dict[str, str]
) -> None:
    with diskivf.open(trained, "r+"):
        out = subprocess.run(
            [sys.executable, "-c", CONTENDER, str(trained)],
            capture_output=True,
            text=True,
            env=child_env,
            timeout=60,
            check=True,
        ).stdout
    kind, seconds, message = out.split(" ", 2)
    assert kind == "LockedError", out
    assert float(seconds) < 1.0
    assert fmt.LOCK_NAME in message


def test_writer_process_blocks_writers_not_readers(
    trained: Path, child_env: dict[str, str]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(trained)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(LockedError, match=fmt.LOCK_NAME):
            diskivf.open(trained, "r+")
        with diskivf.open(trained, "r") as reader:
            assert reader.ntotal == 5
            assert reader.search(np.ones(DIM, np.float32), k=1).ids[0, 0] >= 0
        holder.communicate("\n", timeout=60)
        assert holder.returncode == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    with diskivf.open(trained, "r+") as index:  # the holder's exit released the lock
        assert index.ntotal == 5


def test_killed_writer_releases_its_lock(trained: Path, child_env: dict[str, str]) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(trained)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    holder.kill()
    holder.communicate()
    with diskivf.open(trained, "r+") as index:
        assert index.ntotal == 5


def test_readers_take_no_lock(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = fcntl.flock

    def spy(*args: Any) -> None:
        calls.append(args)
        real(*args)

    monkeypatch.setattr(fcntl, "flock", spy)
    (trained / fmt.LOCK_NAME).unlink()
    with diskivf.open(trained, "r") as reader:
        reader.search(np.ones(DIM, np.float32), k=2)
        reader.refresh()
        assert reader.verify().ok
    assert calls == []
    assert not (trained / fmt.LOCK_NAME).exists()  # a reader creates nothing either
    with diskivf.open(trained, "r+"):
        assert len(calls) == 1  # the writer does lock
