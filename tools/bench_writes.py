"""What the file system charges ``Index.add``: file creation, appends and the commit's fsync.

Usage::

    python tools/bench_writes.py [--dir DIR] [--files 2048] [--rounds 16] [--chunk 16384]
                                 [--pause 0.1] [--repeats 3]

``Index.add`` of a large batch appends a slice to every list file per batch (a ``.vec`` and an
``.ids`` file per list), then fsyncs all of them at the commit. This replays that pattern
through :class:`diskivf.segments.ListWriter`: ``--files`` files, ``--rounds`` rounds of one
``--chunk``-byte append per file with a ``--pause`` standing in for the next batch's
assignment, then one ``sync()``; each repeat in a fresh directory under ``--dir``, deleted
before the next (as a rebuild deletes the old index). It prints per repeat and as medians:

* ``create us``: microseconds per file creation (the first round's opens). Some file systems
  make this slow: ext4 without a journal scans the inodes deleted in the last minutes, so a
  machine that just deleted an index pays for it at the next build.
* ``write s``: the appends (pauses excluded), ``sync s``: the final fsync of every file,
  ``total s``: both.

Run it on the file system the index will live on: tmpfs, SSDs and cloud volumes differ a lot.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from diskivf import segments
except ModuleNotFoundError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(REPO))
    from diskivf import segments


def one_run(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Append and sync once under ``root``; return the phase times."""
    writer = segments.ListWriter(root, durable=True)
    chunk = b"\x5a" * args.chunk
    names = [f"lists/{i:07d}.0.vec" for i in range(args.files)]
    write_s = create_s = 0.0
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for name in names:
            writer.write(name, r * args.chunk, chunk)
        dt = time.perf_counter() - t0
        write_s += dt
        if r == 0:
            create_s = dt
        time.sleep(args.pause)
    t0 = time.perf_counter()
    writer.sync()
    sync_s = time.perf_counter() - t0
    writer.close()
    # The first round's time is nearly all file creation: its writes are 1/rounds of the rest.
    per_write = (write_s - create_s) / max(1, args.rounds - 1)
    return {
        "create us": max(0.0, create_s - per_write) / args.files * 1e6,
        "write s": write_s,
        "sync s": sync_s,
        "total s": write_s + sync_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to write, created if missing (default: temp dir)",
    )
    ap.add_argument("--files", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16384, help="bytes per append")
    ap.add_argument("--pause", type=float, default=0.1, help="seconds between rounds")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    mib = args.files * args.rounds * args.chunk / 2**20
    print(
        f"{args.files} files x {args.rounds} appends of {args.chunk} B ({mib:.0f} MiB), "
        f"{args.pause} s pause per round, {args.repeats} repeats"
    )
    runs: list[dict[str, float]] = []
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-writes-", dir=args.dir))
    try:
        for rep in range(args.repeats):
            root = scratch / f"run-{rep}"
            root.mkdir()
            runs.append(one_run(root, args))
            shutil.rmtree(root)
            print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        "  median:   "
        + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0])
    )


if __name__ == "__main__":
    main()
