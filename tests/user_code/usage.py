"""Documented calls as a user writes them, type-checked by tests/test_typing.py (mypy --strict
against the installed package and its py.typed). Importing it (pytest's doctest collection
does) runs nothing."""

from __future__ import annotations

import numpy as np

import diskivf


def use(path: str) -> None:
    q = np.zeros((2, 8), np.float32)
    with diskivf.open(path, mode="w-", dim=8, nlist=4) as index:
        index.train(q)
        ids = index.add(q, ids=np.arange(2))
        index.remove(ids[:1])
    with diskivf.open(path) as index:
        r1: diskivf.SearchResult = index.search(q, k=5, threads=2)
        r2, st = index.search(q, k=5, nprobe=4, stats=True, threads=1)
        flag: bool = True
        r3 = index.search(q, stats=flag)
        d, i = index.search(q[0])
        print(r1.ids, r2.distances, st.vectors_scanned, r3, d, i)
    info: diskivf.IndexInfo = diskivf.info(path)
    check: diskivf.VerifyResult = diskivf.verify(path)
    print(info.ntotal, check.ok)
