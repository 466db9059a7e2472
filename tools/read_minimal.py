"""A minimal diskivf reader using only numpy and msgpack: Appendix B of ``format_spec.md``.

It exists to prove that the specification is enough to read an index without the library: it
does not import ``diskivf``. It loads every live vector (committed and not removed by a
tombstone) and runs an exhaustive search, so its results equal
``index.search(queries, k, nprobe=index.nlist)`` up to floating-point rounding and the order of
exact ties.

Usage::

    python tools/read_minimal.py INDEX_DIR QUERIES.npy K

prints the ids of the ``K`` nearest neighbours of each query, one line per query. The code
between the two marker comments is copied verbatim into the specification; a test keeps both
identical, so change them together.
"""

# The code below is copied verbatim into format_spec.md, where it reads as plain numpy: these
# codes are off for the file rather than cluttering the specification with casts and ignores.
# mypy: disable-error-code="type-arg, no-any-return, assignment"

# --- begin format_spec.md appendix B ---
import struct
import zlib
from pathlib import Path

import msgpack
import numpy as np


def unpack(path: str, magic: bytes) -> dict:
    """Check the 20-byte preamble of a diskivf 1.x file and return its msgpack map."""
    buf = Path(path).read_bytes()
    tag, major, _minor, _reserved, hlen, crc = struct.unpack_from("<8sBBHII", buf)
    crc_ok = zlib.crc32(buf[:16] + buf[20 : 20 + hlen]) == crc  # bytes 16..19 hold the CRC
    if tag != magic or major != 1 or not crc_ok:
        raise ValueError(f"{path}: not a diskivf 1.x file, or corrupt")
    return msgpack.unpackb(buf[20 : 20 + hlen])


def search(root: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive top-k over every live (committed, not removed) vector: (distances, ids)."""
    h = unpack(f"{root}/meta.diskivf", b"\x93DISKIVF")
    c = unpack(f"{root}/commit.msgpack", b"\x93DIVFCMT")
    if h["required_features"]:
        raise ValueError(f"unsupported required features {h['required_features']}")
    dim, dtype = h["dim"], np.dtype(h["vector_dtype"])
    counts, gens = np.frombuffer(c["list_counts"], "<i8"), np.frombuffer(c["list_gens"], "<u4")
    dead = np.frombuffer(c["tombstones"], "<i8")  # removed rows, each list_id << 40 | row
    xs, ids = [np.zeros((0, dim), dtype)], [np.zeros(0, "<i8")]
    for i in np.flatnonzero(counts):  # only the committed prefix of each list file
        stem, n = f"{root}/lists/{i:07d}.{gens[i]}", int(counts[i])
        live = np.setdiff1d(np.arange(n), dead[dead >> 40 == i] % 2**40)  # skip removed rows
        xs.append(np.fromfile(stem + ".vec", dtype, n * dim).reshape(n, dim)[live])
        ids.append(np.fromfile(stem + ".ids", "<i8", n)[live])
    x, ids = np.concatenate(xs).astype(np.float32), np.concatenate(ids).astype(np.int64)
    q = np.atleast_2d(np.asarray(queries, np.float32))
    if h["metric"] == "cosine":  # stored vectors are unit-norm already
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = q / np.where(norms == 0, 1, norms)
    cost = -(q @ x.T)  # smaller is better; ip and cosine report -cost
    if h["metric"] == "l2":
        cost = 2 * cost + (x * x).sum(1) + (q * q).sum(1)[:, None]
    order = np.lexsort((np.broadcast_to(ids, cost.shape), cost))[:, :k]  # ties: smaller id
    pad = ((0, 0), (0, k - order.shape[1]))  # fewer than k vectors: pad with +inf and -1
    dist = np.pad(np.take_along_axis(cost, order, 1), pad, constant_values=np.inf)
    dist = np.maximum(dist, 0) if h["metric"] == "l2" else -dist
    return dist.astype(np.float32), np.pad(ids[order], pad, constant_values=-1)


# --- end format_spec.md appendix B ---


def main(argv: list[str]) -> int:
    """Command-line entry point; returns the process exit status."""
    usage = "usage: python tools/read_minimal.py INDEX_DIR QUERIES.npy K"
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(usage)
        return 0
    if len(argv) != 4:
        raise SystemExit(usage)
    _, ids = search(argv[1], np.load(argv[2]), int(argv[3]))
    for row in ids:
        print(" ".join(str(i) for i in row.tolist()))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv))
