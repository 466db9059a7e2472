"""Shared test helpers: child-process environment, a direct reader of committed rows, and
one Dask cluster for the whole session (starting one costs seconds)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import diskivf
from diskivf import _jit
from diskivf import format as fmt
from diskivf.segments import ListReader

CommittedRows = Callable[[Path], tuple[NDArray[np.int64], NDArray[np.generic]]]


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment for ``sys.executable -c`` children, so they import this same diskivf."""
    env = dict(os.environ)
    src = str(Path(diskivf.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _read_committed_rows(path: Path) -> tuple[NDArray[np.int64], NDArray[np.generic]]:
    meta = fmt.read_meta(path)
    rec = fmt.read_commit(path, meta.nlist, meta.index_uuid)
    reader = ListReader(path, meta.dim, meta.vector_dtype)
    ids: list[NDArray[np.int64]] = [np.zeros(0, np.int64)]
    vecs: list[NDArray[np.generic]] = [np.zeros((0, meta.dim), meta.vector_dtype)]
    for lid in range(meta.nlist):
        view = reader.get(lid, int(rec.list_counts[lid]), int(rec.list_gens[lid]))
        if view is not None:
            ids.append(np.array(view.ids))
            vecs.append(np.array(view.vectors))
    all_ids, all_vecs = np.concatenate(ids), np.concatenate(vecs)
    order = np.argsort(all_ids, kind="stable")
    return all_ids[order], all_vecs[order]


@pytest.fixture(scope="session")
def committed_rows() -> CommittedRows:
    """``committed_rows(path) -> (ids, vectors)``: every committed row sorted by id.

    Reads the files through :mod:`diskivf.format` and :mod:`diskivf.segments` directly, so a
    check built on it does not depend on :meth:`diskivf.Index.search`.
    """
    return _read_committed_rows


@pytest.fixture(scope="session")
def dask_client() -> Iterator[Any]:
    """A 2-worker, process-based Dask cluster (the test extra installs it: never skipped)."""
    distributed = importlib.import_module("distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _einsum_vecdot(a: Any, b: Any, out: Any = None) -> Any:
    return np.einsum("...j,...j->...", a, b, out=out)


@pytest.fixture
def row_kernel(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """numpy 2's ``vecdot``, or on numpy 1, which has none, an einsum with its results: a
    stand-in for tests of when search picks its row kernel, so that they run on both. Single
    queries take numpy's path meanwhile: the compiled scan (numba's, when installed) has no
    row kernel to pick."""
    monkeypatch.setattr(_jit, "scan_topk", lambda: None)
    return getattr(np, "vecdot", _einsum_vecdot)
