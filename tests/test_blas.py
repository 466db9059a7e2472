"""``diskivf._blas``: BLAS held to one thread inside a region, whichever thread enters it."""

from __future__ import annotations

import threading

import threadpoolctl  # the test extra installs it

from diskivf import _blas


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
