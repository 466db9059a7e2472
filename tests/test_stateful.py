"""Hypothesis state machine: add / reopen / refresh / search against a brute-force model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import diskivf

DIM = 4
NLIST = 3


class IndexMachine(RuleBasedStateMachine):
    """The index must behave like a plain list of (id, vector) searched exhaustively."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="diskivf-state-"))
        self.path = self.dir / "i"
        self.index = diskivf.open(self.path, mode="w-", dim=DIM, nlist=NLIST)
        rng = np.random.default_rng(0)
        self.index.train(rng.integers(-3, 4, (30, DIM)).astype(np.float32))
        self.vectors = np.zeros((0, DIM), np.float32)
        self.ids = np.zeros(0, np.int64)
        self.reader = diskivf.open(self.path)
        self.reader_n = 0

    def teardown(self) -> None:
        self.index.close()
        self.reader.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(
        rows=st.lists(st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM), max_size=12),
        explicit=st.booleans(),
    )
    def add(self, rows: list[list[int]], explicit: bool) -> None:
        x = np.array(rows, np.float32).reshape(-1, DIM)
        if explicit:
            ids = np.arange(len(x), dtype=np.int64) * 7 + 1000 + len(self.ids) * 7
            got = self.index.add(x, ids=ids)
        else:
            got = self.index.add(x)
            start = max(int(self.ids.max()) + 1, 0) if len(self.ids) else 0
            ids = np.arange(start, start + len(x))
        np.testing.assert_array_equal(got, ids)
        self.vectors = np.vstack([self.vectors, x])
        self.ids = np.concatenate([self.ids, ids])

    @rule()
    def reopen(self) -> None:
        self.index.close()
        self.index = diskivf.open(self.path, mode="r+")

    @rule()
    def refresh_reader(self) -> None:
        self.reader.refresh()
        self.reader_n = len(self.ids)

    @precondition(lambda self: len(self.ids) > 0)
    @rule(q=st.lists(st.integers(-3, 3), min_size=DIM, max_size=DIM), k=st.integers(1, 8))
    def search(self, q: list[int], k: int) -> None:
        qv = np.array(q, np.float32)
        for ix, n in ((self.index, len(self.ids)), (self.reader, self.reader_n)):
            d, i = ix.search(qv, k=k, nprobe=NLIST)
            cost = ((self.vectors[:n] - qv) ** 2).sum(1)
            order = np.lexsort((self.ids[:n], cost))[:k]
            kk = min(k, n)
            np.testing.assert_array_equal(i[0, :kk], self.ids[:n][order])
            np.testing.assert_allclose(d[0, :kk], cost[order], atol=1e-4)
            assert (i[0, kk:] == -1).all()

    @invariant()
    def counts_match(self) -> None:
        assert self.index.ntotal == len(self.ids)
        assert self.reader.ntotal == self.reader_n


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
