"""diskivf: an on-disk IVF index for approximate nearest-neighbour search.

The whole public API::

    diskivf.open(path, mode="r", *, dim=, nlist=, metric=, dtype=, nprobe=, durable=) -> Index
    Index.train(sample) / .add(vectors, ids=None) / .search(queries, k=10, nprobe=None)
    Index.refresh() / .verify() / .flush() / .close() / .list_sizes()
    Index.ntotal / .dim / .nlist / .metric / .nprobe / .generation / .is_trained
    Index.remove(ids) / .upsert(vectors, ids) / .compact() / .nremoved
    diskivf.info(path) -> IndexInfo / diskivf.verify(path) -> VerifyResult
    diskivf.build.build(input, out, *, nlist, ...) -> offline build from a file, resumable
    diskivf.build_parallel(source, out, *, nlist, executor=None, ...) -> same index, any Executor
    diskivf.merge_indexes(out, inputs, *, id_offsets=None) / diskivf.ShardedIndex.open(paths)
    SearchResult(distances, ids), SearchStats, VerifyReport, diskivf.errors, __version__
"""

from __future__ import annotations

from diskivf import errors
from diskivf.index import Index, Mode, SearchResult, SearchStats, VerifyReport
from diskivf.index import open_index as open

__version__ = "0.1.0"

__all__ = [
    "Index",
    "IndexInfo",
    "Mode",
    "SearchResult",
    "SearchStats",
    "ShardedIndex",
    "VerifyReport",
    "VerifyResult",
    "__version__",
    "build_parallel",
    "errors",
    "info",
    "merge_indexes",
    "open",
    "verify",
]
