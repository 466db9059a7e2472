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

# Every name of the public API is importable from the package itself; the submodules
# ``build`` and ``io`` are loaded here too, so ``diskivf.build.build`` and
# ``diskivf.io.open_vectors`` work after a plain ``import diskivf``.
from diskivf import build, errors, io
from diskivf.index import Index, Mode, SearchResult, SearchStats, VerifyReport
from diskivf.index import open_index as open
from diskivf.inspect import IndexInfo, VerifyResult, info, verify
from diskivf.merge import merge_indexes
from diskivf.parallel import build_parallel
from diskivf.sharded import ShardedIndex

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
    "build",
    "build_parallel",
    "errors",
    "info",
    "io",
    "merge_indexes",
    "open",
    "verify",
]
