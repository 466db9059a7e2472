"""The ``diskivf`` command line (argparse); ``python -m diskivf`` runs the same."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diskivf.errors import DiskIVFError

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from diskivf.demo import run_demo

    r = run_demo(n=args.n, dim=args.dim, nlist=args.nlist, nprobe=args.nprobe, path=args.out)
    print(f"built {r.n} x {r.dim} vectors into {r.nlist} lists "
          f"(train {r.train_s:.2f} s, add {r.add_s:.2f} s, {r.index_bytes / 2**20:.1f} MiB)")
    print(f"recall@10 at nprobe={r.nprobe}: {r.recall_at_10:.4f} (exact brute force as truth)")
    print(f"QPS: {r.qps_batch:,.0f} batch, {r.qps_single:,.0f} single-query")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="diskivf", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="build and search an index on generated data",
        epilog="example: diskivf demo --n 200000 --dim 64",
    )
    demo.add_argument("--n", type=int, default=200_000, help="vectors to generate")
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--nlist", type=int, default=512)
    demo.add_argument("--nprobe", type=int, default=16)
    demo.add_argument("--out", default=None, help="keep the index here (default: temp dir)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (0 ok, 1 failure, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (DiskIVFError, OSError, ValueError) as exc:
        if args.debug:
            raise
        print(f"diskivf: error: {exc}", file=sys.stderr)
        return 1
