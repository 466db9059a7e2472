"""The ``diskivf`` command line (argparse); ``python -m diskivf`` runs the same.

Subcommands: ``build`` (offline build job, ``--workers N`` for a parallel one), ``merge``,
``search``, ``info``, ``verify`` and ``demo``.
Exit codes: 0 success, 1 failure (one line on stderr; ``--debug`` shows the traceback),
2 usage error, 130 interrupted. ``diskivf verify`` and ``diskivf info --header`` exit 1 when they
find damage or a format too new for this diskivf.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
from numpy.typing import NDArray

from diskivf._cpu import usable_cpus
from diskivf.errors import DiskIVFError, FormatError

if TYPE_CHECKING:
    from diskivf.build import BuildReport
    from diskivf.parallel import ParallelBuildReport

__all__ = ["build_parser", "main"]

_SHOW_QUERIES: Final = 10
_QUERY_BATCH: Final = 16384


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _is_hdf5(path: str) -> bool:
    from diskivf.io import HDF5_SUFFIXES

    return os.path.splitext(path)[1].lower() in HDF5_SUFFIXES


# ------------------------------------------------------------------------------------ commands


def _cmd_demo(args: argparse.Namespace) -> int:
    from diskivf.demo import run_demo

    r = run_demo(n=args.n, dim=args.dim, nlist=args.nlist, nprobe=args.nprobe, path=args.out)
    print(
        f"built {r.n} x {r.dim} vectors into {r.nlist} lists "
        f"(train {r.train_s:.2f} s, add {r.add_s:.2f} s, {r.index_bytes / 2**20:.1f} MiB)"
    )
    print(f"recall@10 at nprobe={r.nprobe}: {r.recall_at_10:.4f} (exact brute force as truth)")
    print(f"QPS: {r.qps_batch:,.0f} batch, {r.qps_single:,.0f} single-query")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from diskivf.build import ProgressArg, build

    progress: ProgressArg = False if args.quiet else ("always" if args.progress else True)
    common: dict[str, Any] = {
        "nlist": args.nlist,
        "metric": args.metric,
        "ids": args.ids,
        "dataset": args.dataset,
        "train_size": args.train_size,
        "batch_size": args.batch_size,
        "nprobe": args.nprobe,
        "dtype": args.dtype,
        "seed": args.seed,
        "niter": args.niter,
        "resume": args.resume,
        "durable": not args.no_fsync,
        "progress": progress,
    }
    report: BuildReport | ParallelBuildReport
    if args.workers > 1:
        from diskivf.parallel import build_parallel, process_executor

        with process_executor(args.workers) as pool:
            report = build_parallel(
                args.input,
                args.out,
                executor=pool,
                blas_threads=max(1, usable_cpus() // args.workers),
                **common,
            )
        complete = report.shards == 0 and not report.trained
    else:
        report = build(args.input, args.out, **common)
        complete = report.rows_added == 0 and report.rows_before == report.n and not report.trained
    if not args.quiet:
        if complete:
            print(f"{report.path}: already complete ({report.n:,} vectors); nothing to do")
        else:
            print(report.summary())
    return 0


def _id_offsets(text: str) -> str | list[int]:
    if text == "auto":
        return text
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        # An argparse type error, so that a malformed value is a usage error (exit 2).
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or comma-separated integers, got {text!r}"
        ) from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from diskivf.merge import merge_indexes
    from diskivf.parallel import process_executor

    pool = process_executor(args.workers) if args.workers > 1 else None
    with pool if pool is not None else contextlib.nullcontext():
        report = merge_indexes(
            args.out,
            args.inputs,
            id_offsets=args.id_offsets,
            allow_duplicate_ids=args.allow_duplicate_ids,
            executor=pool,
            durable=not args.no_fsync,
        )
    if not args.quiet:
        print(report.summary())
    return 0


def _read_queries(path: str, dataset: str | None, dim: int) -> NDArray[np.float32]:
    from diskivf.io import iter_batches, open_vectors

    if dataset is None and _is_hdf5(path):
        dataset = "test"  # ann-benchmarks: "train" is the base, "test" the queries
    q = open_vectors(path, dataset=dataset)
    shape = tuple(q.shape)
    if len(shape) != 2 or shape[1] != dim:
        found = f"dimension {shape[1]}" if len(shape) == 2 else f"shape {shape}"
        raise ValueError(f"{path}: the index has dimension {dim} but the queries have {found}")
    out = np.empty(shape, np.float32)
    for start, batch in iter_batches(q, _QUERY_BATCH):
        out[start : start + len(batch)] = batch
    return out


def _read_truth(path: str, nq: int, k: int) -> NDArray[np.int64]:
    from diskivf.io import open_vectors

    gt = open_vectors(path, dataset="neighbors" if _is_hdf5(path) else None)
    shape = tuple(gt.shape)
    if np.dtype(gt.dtype).kind not in "iu":
        raise ValueError(f"{path}: expected integer neighbour ids but found dtype {gt.dtype}")
    if len(shape) != 2 or shape[0] != nq:
        raise ValueError(
            f"{path}: expected ground truth for {nq} queries (shape ({nq}, >= {k})) "
            f"but found shape {shape}"
        )
    if shape[1] < k:
        raise ValueError(
            f"{path}: recall@{k} needs {k} true neighbours per query but the file has {shape[1]}"
        )
    return np.asarray(gt[:, :k], dtype=np.int64)  # type: ignore[index]


def _cmd_search(args: argparse.Namespace) -> int:
    from diskivf.demo import recall_at_k
    from diskivf.index import open_index

    with open_index(args.index) as index:
        q = _read_queries(args.queries, args.dataset, index.dim)
        truth = _read_truth(args.gt, len(q), args.k) if args.gt else None
        nprobe = index.nprobe if args.nprobe is None else args.nprobe
        index.search(q[: min(len(q), 10)], k=args.k, nprobe=nprobe)  # warm the list maps
        t0 = time.perf_counter()
        distances, ids = index.search(q, k=args.k, nprobe=nprobe)
        elapsed = time.perf_counter() - t0
    qps = len(q) / elapsed if elapsed > 0 else float("inf")
    if args.out:
        with open(args.out, "wb") as f:  # a file object, so numpy does not append ".npz"
            np.savez(f, ids=ids, distances=distances, k=args.k, nprobe=nprobe)
        print(f"wrote ids and distances of {len(q):,} queries (k={args.k}) to {args.out}")
    else:
        shown = min(len(q), _SHOW_QUERIES)
        for row in range(shown):
            pairs = ", ".join(
                f"{int(i)} ({float(d):.4g})"
                for i, d in zip(ids[row], distances[row], strict=True)
                if i >= 0
            )
            print(f"query {row}: {pairs or '(no result)'}")
        if shown < len(q):
            print(f"... {len(q) - shown:,} more queries (use --out FILE.npz to keep all results)")
    line = f"{len(q):,} queries, k={args.k}, nprobe={nprobe}: {elapsed:.3f} s, QPS {qps:,.0f}"
    if truth is not None:
        line = f"recall@{args.k} {recall_at_k(ids, truth):.4f}, " + line
    print(line)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from diskivf import format as fmt
    from diskivf.inspect import decode_header, info

    if args.header:
        p = Path(args.index)
        files = [p / fmt.META_NAME, p / fmt.COMMIT_NAME] if p.is_dir() else [p]
        missing = [f for f in files if not f.exists()]
        if p.is_dir() and len(missing) == len(files):
            raise FileNotFoundError(f"{args.index}: neither {fmt.META_NAME} nor {fmt.COMMIT_NAME}")
        dumps = [decode_header(f) for f in files if f.exists()]
        if args.json:
            print(json.dumps([d.to_dict() for d in dumps], indent=2, default=str))
        else:
            print("\n\n".join(d.to_text() for d in dumps))
        # A file of a newer format is "unsupported", never "damaged" (format_spec §3).
        bad = [Path(d.file).name for d in dumps if d.status == "damaged"]
        bad += [f"{f.name} (missing)" for f in missing]
        newer: dict[str, list[str]] = {}
        for d in dumps:
            if d.unsupported is not None:
                newer.setdefault(d.unsupported, []).append(Path(d.file).name)
        parts = [f"unsupported: {', '.join(names)}: {why}" for why, names in newer.items()]
        parts += [f"damaged: {', '.join(bad)}"] if bad else []
        if parts:
            print(f"diskivf: error: {'; '.join(parts)}", file=sys.stderr)
            return 1
        return 0
    try:
        result = info(args.index, lists=args.lists)
    except FormatError as exc:
        print(
            f"diskivf: error: {_one_line(exc)} (`diskivf info --header {args.index}` decodes "
            "what is left)",
            file=sys.stderr,
        )
        return 1
    print(result.to_json() if args.json else result.to_text())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from diskivf.inspect import verify

    result = verify(args.index)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.to_text())
        for note in result.notes:
            print(f"  note: {note}")
    # Exit 0 means "no damage": an unfinished parallel build (a valid commit) is only a note.
    if result.unsupported is not None:
        print(f"diskivf: error: unsupported: {result.unsupported}", file=sys.stderr)
        return 1
    if not result.ok:
        first = result.problems[0]
        more = f" (and {len(result.problems) - 1} more)" if len(result.problems) > 1 else ""
        print(f"diskivf: error: index is damaged: {first}{more}", file=sys.stderr)
        return 1
    return 0


# -------------------------------------------------------------------------------------- parser


def _examples(*lines: str) -> str:
    return "examples:\n" + textwrap.indent("\n".join(lines), "  ")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error",
    )
    parser = argparse.ArgumentParser(
        prog="diskivf",
        description="An on-disk IVF index for approximate nearest-neighbour search.",
        epilog=_examples(
            "diskivf build base.fvecs my.index --nlist 1024 --metric l2",
            "diskivf search my.index queries.fvecs -k 10 --nprobe 16 --gt gt.ivecs",
            "diskivf info my.index",
            "diskivf verify my.index",
        )
        + "\n\nexit codes: 0 success, 1 failure (or damage found), 2 usage error, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, epilog: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(
            name,
            help=help,
            description=help[0].upper() + help[1:] + ".",
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        p.set_defaults(func=func)
        return p

    b = add(
        "build",
        "build an index from a vector file, committing every batch",
        _examples(
            "diskivf build sift_base.fvecs sift.index --nlist 4096 --metric l2",
            "diskivf build glove-100-angular.hdf5 glove.index --nlist 1024 --metric cosine",
            "diskivf build base.u8bin big.index --nlist 65536 --batch-size 100000 --resume",
            "diskivf build base.fbin big.index --nlist 16384 --metric l2 --workers 8",
        )
        + "\n\ninputs: .npy .fvecs .bvecs .ivecs .fbin .u8bin .i8bin .ibin .hdf5/.h5 (memory-\n"
        "mapped, read one batch at a time). --resume continues a killed build from its last\n"
        "committed batch; the result is the same as an uninterrupted build.",
        _cmd_build,
    )
    b.add_argument("input", metavar="INPUT", help="vector file")
    b.add_argument("out", metavar="OUT", help="index directory to create")
    b.add_argument("--nlist", type=_positive_int, required=True, help="number of lists")
    b.add_argument(
        "--metric",
        choices=("l2", "ip", "cosine"),
        default="l2",
        help="distance metric (default l2)",
    )
    b.add_argument("--ids", metavar="IDS", help="ids file (.npy/.ivecs/.ibin), default row numbers")
    b.add_argument("--dataset", metavar="NAME", help="HDF5 dataset to read (default: train)")
    b.add_argument(
        "--train-size",
        type=_positive_int,
        metavar="M",
        help="rows sampled for k-means (default 256 x nlist, capped at the input size)",
    )
    b.add_argument(
        "--batch-size",
        type=_positive_int,
        default=65536,
        metavar="B",
        help="rows per batch and per commit; bounds memory (default 65536)",
    )
    b.add_argument("--nprobe", type=_positive_int, metavar="P", help="default nprobe to store")
    b.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    b.add_argument("--seed", type=_int, default=0, metavar="S", help="seed (default 0)")
    b.add_argument(
        "--niter", type=_positive_int, default=10, help="k-means iterations (10, as FAISS)"
    )
    b.add_argument("--resume", action="store_true", help="continue an interrupted build")
    b.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes (default 1: the streaming build); N > 1 assigns row ranges in "
        "N processes and merges their shards, with the same result",
    )
    b.add_argument(
        "--no-fsync",
        action="store_true",
        help="skip fsync per commit (faster; a power loss may lose commits, --resume redoes them)",
    )
    loud = b.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help="no progress and no summary")
    loud.add_argument(
        "--progress", action="store_true", help="progress bars even when stderr is not a terminal"
    )

    mg = add(
        "merge",
        "merge indexes that share centroids into a new index",
        _examples(
            "diskivf merge all.index part1.index part2.index",
            "diskivf merge all.index part1.index part2.index --id-offsets auto",
            "diskivf merge all.index a.index b.index --id-offsets 0,1000000",
        )
        + "\n\nThe inputs must have been trained with the same centroids (same trained hash).\n"
        "Each output list holds the live rows of the inputs' lists, in input order; removed\n"
        "rows are dropped. Ids are kept unless --id-offsets shifts them; an id present in two\n"
        "inputs is an error unless --allow-duplicate-ids. 'auto' shifts each input by the\n"
        "total next_id (largest id + 1) of the inputs before it.",
        _cmd_merge,
    )
    mg.add_argument("out", metavar="OUT", help="index directory to create")
    mg.add_argument("inputs", metavar="IN", nargs="+", help="indexes to merge, in order")
    mg.add_argument(
        "--id-offsets",
        metavar="auto|N,N,...",
        type=_id_offsets,
        help="add these offsets to the ids of each input ('auto': cumulative next_id)",
    )
    mg.add_argument(
        "--allow-duplicate-ids",
        action="store_true",
        help="do not refuse ids present in several inputs",
    )
    mg.add_argument("--workers", type=_positive_int, default=1, metavar="N", help="processes")
    mg.add_argument("--no-fsync", action="store_true", help="skip fsync (faster, less durable)")
    mg.add_argument("--quiet", action="store_true", help="no summary")

    s = add(
        "search",
        "search an index with a file of queries",
        _examples(
            "diskivf search sift.index sift_query.fvecs -k 10 --nprobe 16",
            "diskivf search sift.index sift_query.fvecs -k 10 --gt sift_groundtruth.ivecs",
            "diskivf search glove.index glove-100-angular.hdf5 -k 10 --gt glove-100-angular.hdf5",
            "diskivf search sift.index q.npy -k 100 --out results.npz",
        )
        + "\n\nWith --gt (.ivecs/.npy/.ibin, or the 'neighbors' dataset of an HDF5 file) it\n"
        "prints recall@k: the fraction of the true k nearest ids found among the k returned.\n"
        "HDF5 queries are read from the 'test' dataset unless --dataset says otherwise.",
        _cmd_search,
    )
    s.add_argument("index", metavar="INDEX")
    s.add_argument("queries", metavar="QUERIES", help="query vector file")
    s.add_argument("-k", type=_positive_int, default=10, help="neighbours per query (10)")
    s.add_argument("--nprobe", type=_positive_int, help="lists probed (default: the index's)")
    s.add_argument("--out", metavar="FILE.npz", help="write ids and distances here")
    s.add_argument("--gt", metavar="GT", help="ground-truth neighbour ids: print recall@k")
    s.add_argument("--dataset", metavar="NAME", help="HDF5 dataset of the queries (test)")

    i = add(
        "info",
        "describe an index from its metadata (never reads the lists)",
        _examples(
            "diskivf info sift.index",
            "diskivf info sift.index --json",
            "diskivf info sift.index --lists",
            "diskivf info sift.index --header              # forensics on a damaged index",
            "diskivf info sift.index/commit.msgpack --header --json",
        )
        + "\n\n--json output is stable: schema 'diskivf.info/1', documented in README.md\n"
        "(section 'Inspect an index: diskivf info'). --header decodes the files' raw headers\n"
        "instead of the report, so it cannot be combined with --lists.",
        _cmd_info,
    )
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    # --header bypasses the report (and IndexInfo) that --lists adds to: one or the other.
    view = i.add_mutually_exclusive_group()
    view.add_argument("--lists", action="store_true", help="one line per list: sizes and files")
    view.add_argument(
        "--header",
        action="store_true",
        help="decode the preamble and msgpack header of a (damaged) index or file as far as "
        "possible",
    )

    v = add(
        "verify",
        "check every checksum and size of an index",
        _examples("diskivf verify sift.index", "diskivf verify sift.index --json")
        + "\n\nExit status 0 when clean (an unfinished parallel build is a note, not damage), 1 with"
        "\none line per problem (file, list, what is wrong) or when the index needs a newer diskivf.",
        _cmd_verify,
    )
    v.add_argument("index", metavar="INDEX")
    v.add_argument("--json", action="store_true", help="machine-readable output")

    d = add(
        "demo",
        "build and search an index on generated data",
        _examples("diskivf demo --n 200000 --dim 64"),
        _cmd_demo,
    )
    d.add_argument(
        "--n", type=_positive_int, default=200_000, help="vectors to generate (default 200000)"
    )
    d.add_argument("--dim", type=_positive_int, default=64, help="dimension (default 64)")
    d.add_argument("--nlist", type=_positive_int, default=512, help="lists (default 512)")
    d.add_argument(
        "--nprobe",
        type=_positive_int,
        default=16,
        help="lists probed per query (default 16); capped at --nlist, as search does",
    )
    d.add_argument(
        "--out",
        metavar="PATH",
        default=None,
        help="keep the index at PATH, a new path or an empty directory; an existing file or "
        "non-empty directory is refused, never overwritten (default: a temporary directory, "
        "deleted at the end)",
    )
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, DiskIVFError | OSError | ValueError):
        return text
    return f"internal error ({type(exc).__name__}: {text}); rerun with --debug for a traceback"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage, 130 interrupted).

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit code. ``--help`` returns 0 and a usage error 2 (argparse prints the message).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error that argparse already reported
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        hint = " (diskivf build --resume continues from the last commit)"
        print(f"diskivf: interrupted{hint if args.command == 'build' else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our stdout went away (| head): not an error worth a message.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except Exception as exc:
        if getattr(args, "debug", False):  # SUPPRESS: absent unless given, at either level
            raise
        print(f"diskivf: error: {_one_line(exc)}", file=sys.stderr)
        return 1
