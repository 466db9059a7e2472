"""Search several indexes that share centroids as one: :class:`ShardedIndex`.

A collection too large for one index (or one machine) can be split into shards, indexes with
the same centroids (equal :func:`diskivf.format.trained_hash`), each holding part of the
vectors. Their lists line up, so every shard probes the same lists for a query; each returns
its top ``k`` by (cost, id), and the merge keeps the best ``k`` of those by (cost, id). The
result is that of one index holding the union of the shards, up to float32 near-ties: a
vector in the union's top ``k`` is in its own shard's top ``k``, and ties are broken by id in
both.

The shards are merged on their search costs (before the squared query norm is added for l2),
as one index sorts its candidates. The costs are float32 products whose last bits depend on
the kernel and on the other rows of a list, so candidates within float32 rounding of each
other may come in another order than one index would give them.

With a Dask ``distributed.Client``, each shard is searched by a task on a worker (optionally a
given worker per shard, where its files are local); the worker keeps the shard open between
searches.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from diskivf import format as fmt
from diskivf import search as scan
from diskivf.errors import DiskIVFError, MissingDependencyError, NotTrainedError
from diskivf.index import (
    Index,
    SearchResult,
    _check_int,
    finish_distances,
    open_index,
    prepare_queries,
)

__all__ = ["ShardInfo", "ShardedIndex"]


@dataclass(frozen=True)
class ShardInfo:
    """What a :class:`ShardedIndex` knows of one shard."""

    path: str
    dim: int
    nlist: int
    metric: str
    nprobe: int
    trained_hash: str
    ntotal: int


def _info(index: Index) -> ShardInfo:
    meta = index.metadata
    if not meta.trained:
        raise NotTrainedError(f"shard {index.path} is not trained")
    return ShardInfo(
        str(index.path),
        meta.dim,
        meta.nlist,
        meta.metric,
        meta.nprobe,
        fmt.trained_hash(meta),
        index.ntotal,
    )


def _costs(
    index: Index, queries: ArrayLike, k: int, nprobe: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    _, cost, ids, _ = index._search_costs(queries, k, nprobe, None)
    return cost, ids


# Shards opened by this worker process (Dask fan-out), kept open between searches.
_WORKER_SHARDS: dict[str, Index] = {}
_WORKER_LOCK = threading.Lock()


def _worker_shard(path: str) -> Index:
    with _WORKER_LOCK:
        index = _WORKER_SHARDS.get(path)
        if index is not None:
            try:
                index.refresh()
            except (DiskIVFError, OSError):
                # Replaced (mode "w") or deleted since this worker opened it: open it afresh,
                # so that an error, if any, is about the index as it is now.
                del _WORKER_SHARDS[path]
                index.close()
            else:
                return index
        index = _WORKER_SHARDS[path] = open_index(path)
        return index


def remote_info(path: str) -> ShardInfo:
    """Task run on a Dask worker: open (or refresh) the shard at ``path`` and describe it."""
    return _info(_worker_shard(path))


def remote_costs(
    path: str, queries: NDArray[Any], k: int, nprobe: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Task run on a Dask worker: top-``k`` costs and ids of ``queries`` in one shard."""
    return _costs(_worker_shard(path), queries, k, nprobe)


class ShardedIndex:
    """Read-only search over indexes that share centroids; open with :meth:`open`.

    ``D, I = sharded.search(queries, k=10, nprobe=16)`` returns what one index holding the
    vectors of every shard would return (see the module docstring).
    """

    def __init__(
        self,
        keys: list[str],
        infos: list[ShardInfo],
        indexes: list[Index] | None,
        client: Any,
        workers: Mapping[str, str] | None,
    ) -> None:
        self._keys = keys  # the paths as given: what tasks open, and what ``workers`` names
        self._infos = infos
        self._indexes = indexes
        self._client = client
        self._workers = dict(workers or {})
        self._closed = False

    @classmethod
    def open(
        cls,
        paths: Sequence[str | os.PathLike[str]],
        *,
        client: Any = None,
        workers: Mapping[str, str] | None = None,
    ) -> ShardedIndex:
        """Open the shards at ``paths`` read-only.

        Parameters
        ----------
        paths
            Index directories that share centroids (equal trained hashes), at least one.
        client
            A Dask ``distributed.Client``: each search then runs one task per shard on the
            cluster, and the shards are opened by the workers (the paths must be valid there,
            not necessarily here). None: open and search them in this process.
        workers
            With ``client``: shard path -> worker address, to search each shard on the worker
            that holds its files. Shards not named may run on any worker.

        Returns
        -------
        ShardedIndex
            Use it as a context manager, or call :meth:`close`.

        Raises
        ------
        ValueError
            No paths, or shards trained with other centroids (different ``dim``, ``nlist``,
            metric, dtype or centroid values).
        diskivf.errors.NotTrainedError
            A shard is not trained.
        diskivf.errors.IndexNotFoundError, diskivf.errors.FormatError
            A path is not a valid index.
        diskivf.errors.MissingDependencyError
            ``client`` is given but ``dask.distributed`` is not installed.
        """
        norm = [os.path.abspath(os.fspath(p)) if client is None else os.fspath(p) for p in paths]
        if not norm:
            raise ValueError("expected at least one shard")
        indexes: list[Index] | None = None
        if client is None:
            indexes = []
            try:
                for p in norm:
                    indexes.append(open_index(p))
                infos = [_info(ix) for ix in indexes]
            except BaseException:
                for ix in indexes:
                    ix.close()
                raise
        else:
            _need_distributed()
            infos = [f.result() for f in [_submit(client, workers, remote_info, p) for p in norm]]
        for info in infos[1:]:
            if info.trained_hash != infos[0].trained_hash:
                if indexes is not None:
                    for ix in indexes:
                        ix.close()
                raise ValueError(
                    f"shard {info.path} does not share the centroids of {infos[0].path} (their "
                    "trained hashes differ): only indexes trained with the same centroids can "
                    "be searched together"
                )
        return cls(norm, infos, indexes, client, workers)

    # ------------------------------------------------------------------ properties

    @property
    def paths(self) -> tuple[str, ...]:
        """The shards' directories, in order."""
        return tuple(info.path for info in self._infos)

    @property
    def nshards(self) -> int:
        """Number of shards."""
        return len(self._infos)

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return self._infos[0].dim

    @property
    def nlist(self) -> int:
        """Lists of every shard."""
        return self._infos[0].nlist

    @property
    def metric(self) -> str:
        """``"l2"``, ``"ip"`` or ``"cosine"``."""
        return self._infos[0].metric

    @property
    def nprobe(self) -> int:
        """Default lists probed per search: the first shard's."""
        return self._infos[0].nprobe

    @property
    def ntotal(self) -> int:
        """Vectors in all shards (as of opening or the last :meth:`refresh`)."""
        if self._indexes is not None:
            return sum(ix.ntotal for ix in self._indexes)
        return sum(info.ntotal for info in self._infos)

    def __repr__(self) -> str:
        return (
            f"<diskivf.ShardedIndex {self.nshards} shards dim={self.dim} nlist={self.nlist} "
            f"metric={self.metric!r} ntotal={self.ntotal}>"
        )

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ShardedIndex:  # noqa: PYI034 - final class; Self needs 3.11
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the shards opened in this process. Idempotent (workers keep theirs open)."""
        if self._closed:
            return
        self._closed = True
        for ix in self._indexes or []:
            ix.close()

    def refresh(self) -> bool:
        """Move every shard to its newest commit; return True if any changed.

        Raises
        ------
        diskivf.errors.FormatError
            A shard's newest commit record is damaged.
        """
        self._check_open()
        if self._indexes is not None:
            moved = [ix.refresh() for ix in self._indexes]  # every one: no short cut
            return any(moved)
        infos = [
            f.result()
            for f in [_submit(self._client, self._workers, remote_info, p) for p in self._keys]
        ]
        changed = infos != self._infos
        self._infos = infos
        return changed

    # ------------------------------------------------------------------ searching

    def search(self, queries: ArrayLike, k: int = 10, *, nprobe: int | None = None) -> SearchResult:
        """Find the ``k`` nearest vectors of each query over all shards.

        Parameters
        ----------
        queries
            ``(n, dim)`` or ``(dim,)`` array-like.
        k
            Neighbours per query (>= 1); padded with id ``-1`` and distance ``+inf`` (l2) or
            ``-inf`` (ip, cosine) when the probed lists of all shards hold fewer.
        nprobe
            Lists probed per query in every shard. Default: the first shard's stored value.

        Returns
        -------
        SearchResult
            ``(distances, ids)``, each ``(n, k)``, ordered as :meth:`diskivf.Index.search`
            orders them, ties broken by id.

        Raises
        ------
        ValueError
            Wrong shape or dimension, non-finite queries, ``k < 1`` or ``nprobe < 1``.
        """
        self._check_open()
        k = _check_int(k, "k", 1)
        nprobe = self.nprobe if nprobe is None else _check_int(nprobe, "nprobe", 1)
        q = prepare_queries(queries, self.dim, self.metric)
        parts: list[tuple[NDArray[np.float32], NDArray[np.int64]]]
        if self._indexes is not None:
            parts = [_costs(ix, queries, k, nprobe) for ix in self._indexes]
        else:
            raw = np.asarray(queries)  # each worker prepares them exactly as one index would
            futures = [
                _submit(self._client, self._workers, remote_costs, p, raw, k, nprobe)
                for p in self._keys
            ]
            parts = [f.result() for f in futures]
        cost = np.concatenate([c for c, _ in parts], axis=1)
        ids = np.concatenate([i for _, i in parts], axis=1)
        cost, ids = scan.finalize(cost, ids, k)
        cost = np.ascontiguousarray(cost, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        finish_distances(self.metric, q, cost, ids)
        return SearchResult(cost, ids)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the sharded index is closed")


def _need_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            'searching shards through a Dask client needs dask.distributed: pip install "diskivf[dask]"'
        ) from None


def _submit(client: Any, workers: Mapping[str, str] | None, fn: Any, path: str, *args: Any) -> Any:
    where = (workers or {}).get(path)
    if where is None:
        return client.submit(fn, path, *args, pure=False)
    return client.submit(fn, path, *args, pure=False, workers=[where], allow_other_workers=False)
