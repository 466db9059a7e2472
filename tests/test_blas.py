"""``diskivf._blas``: BLAS held to one thread inside a region, whichever thread enters it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import threadpoolctl  # the test extra installs it

import diskivf
from diskivf import _blas, kmeans
from diskivf.demo import clustered


def _in_thread(fn: object) -> None:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            failures.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if failures:
        raise failures[0]


def test_a_worker_thread_region_limits_blas_after_the_main_thread_set_it() -> None:
    # threadpoolctl 3.8 ignores every thread but the first that set OpenBLAS's count; Index.add
    # assigns on a worker thread, usually after train or search set the count on the main one.
    assert _blas.can_limit()
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert _blas.current_threads() == 2
        with _blas.blas_threads(1):
            assert _blas.current_threads() == 1
        assert _blas.current_threads() == 2
        seen: list[int | None] = []

        def region() -> None:
            with _blas.blas_threads(1):
                seen.append(_blas.current_threads())
            seen.append(_blas.current_threads())

        _in_thread(region)
        assert seen == [1, 2]
    # and the caller's own limits still work afterwards, from the main thread
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert _blas.current_threads() == 1


def test_add_after_train_assigns_with_blas_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The case the threadpoolctl 3.8 behaviour broke: train enters a region on the main
    # thread, then add's assignment enters its regions on a worker thread.
    x, _ = clustered(4000, 16, nclusters=40)
    seen: list[int | None] = []
    row_sqnorms = kmeans._row_sqnorms

    def spy(a: Any) -> Any:  # called in every assignment block, inside its BLAS region
        seen.append(_blas.current_threads())
        return row_sqnorms(a)

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        with diskivf.open(tmp_path / "i", mode="w", dim=16, nlist=8) as index:
            index.train(x)
            monkeypatch.setattr(kmeans, "_row_sqnorms", spy)
            index.add(x, batch_size=1000)
            monkeypatch.undo()
        assert seen
        assert set(seen) == {1}
        assert _blas.current_threads() == 2  # and restored afterwards


def test_regions_set_openblas_through_its_own_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    # numpy's wheels bundle OpenBLAS on pthreads: regions call its C functions directly
    # (a few us a region, several times less than threadpoolctl's methods): a single query's cost.
    ctl = threadpoolctl.ThreadpoolController().select(user_api="blas")
    # numpy's own: scipy's OpenBLAS may be loaded too (numba imports scipy), which numpy's
    # products never call.
    openblas = [
        c
        for c in ctl.lib_controllers
        if c.internal_api == "openblas" and "numpy" in Path(c.filepath).parts[-2]
    ]
    assert openblas
    assert {c.threading_layer for c in openblas} == {"pthreads"}

    def refuse(self: Any, n: int) -> None:
        raise AssertionError("threadpoolctl's set_num_threads was called")

    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        monkeypatch.setattr(type(openblas[0]), "set_num_threads", refuse)
        with _blas.blas_threads(1):
            assert _blas.current_threads() == 1
            assert openblas[0].num_threads == 1  # what threadpoolctl reads agrees
        assert openblas[0].num_threads == 2
        monkeypatch.undo()
