"""Measure the peak memory of ``diskivf build`` from a memory-mapped input at several sizes.

A streaming build must keep its memory bounded by the batch size, not by the input size. This
script writes random float32 ``.npy`` inputs of each requested size, runs ``diskivf build`` on
each in a fresh child process, and reports for every run:

* ``VmHWM``: the kernel's peak resident set size of the child (anonymous + file-backed pages);
* peak ``RssAnon`` and ``RssFile``, sampled every 5 ms by a thread in the child (anonymous memory
  is what the build allocates; file-backed pages are the input's mapped pages);
* the baseline after imports, and the wall time.

Usage::

    python tools/bench_build_memory.py                     # 0.5M and 2M x 64, batch 65536
    python tools/bench_build_memory.py --sizes 500000 2000000 --dim 64 --batch-size 65536
    python tools/bench_build_memory.py --keep-pages        # without dropping mapped pages

``--keep-pages`` disables :func:`diskivf.build._drop_pages`, to show what it saves: without it
the input's pages stay mapped (and counted in RSS) until the kernel needs the memory.
Needs about ``size * dim * 4 * 2`` bytes of free disk per size in ``--dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, threading, time

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])  # kB
    return out

peak = {"RssAnon": 0, "RssFile": 0}
stop = threading.Event()

def sample():
    while not stop.is_set():
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.005)

inp, out, nlist, batch, keep = sys.argv[1:6]
import numpy  # noqa: F401  (counted in the baseline)
import diskivf.build
from diskivf.cli import main
if keep == "1":
    diskivf.build._drop_pages = lambda x: None
base = status()
t = threading.Thread(target=sample, daemon=True)
t.start()
t0 = time.perf_counter()
code = main(["build", inp, out, "--nlist", nlist, "--metric", "l2", "--batch-size", batch,
             "--quiet"])
elapsed = time.perf_counter() - t0
stop.set()
t.join()
end = status()
print(json.dumps({"code": code, "elapsed_s": elapsed, "baseline_rss_kb": base["VmRSS"],
                  "vmhwm_kb": end["VmHWM"], "peak_rss_anon_kb": peak["RssAnon"],
                  "peak_rss_file_kb": peak["RssFile"]}))
"""


def write_input(path: Path, n: int, dim: int, seed: int = 0) -> None:
    """Random float32 rows, written in 64k-row chunks (the writer's memory stays small)."""
    rng = np.random.default_rng(seed)
    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, 65536):
        b = min(n, a + 65536)
        x[a:b] = rng.standard_normal((b - a, dim), dtype=np.float32)
    x.flush()
    del x


def run_one(inp: Path, out: Path, nlist: int, batch: int, keep_pages: bool) -> dict[str, float]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    p = subprocess.run(
        [sys.executable, "-c", CHILD, str(inp), str(out), str(nlist), str(batch),
         "1" if keep_pages else "0"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {p.stderr.strip()}")
    result: dict[str, float] = json.loads(p.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"diskivf build failed: {p.stderr.strip()}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print one line per input size."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[500_000, 2_000_000])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--nlist", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=65536)
    ap.add_argument("--keep-pages", action="store_true", help="do not drop mapped input pages")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="diskivf-mem-"))
    scratch.mkdir(parents=True, exist_ok=True)
    print(
        f"diskivf build, dim {args.dim}, nlist {args.nlist}, batch {args.batch_size}, "
        f"train sample {min(256 * args.nlist, min(args.sizes))}+ rows"
        + (", mapped pages KEPT" if args.keep_pages else "")
    )
    print(f"{'rows':>10} {'input MiB':>10} {'VmHWM MiB':>10} {'peak anon':>10} "
          f"{'peak file':>10} {'baseline':>9} {'time s':>7}")  # fmt: skip
    try:
        for n in args.sizes:
            inp, out = scratch / f"in_{n}.npy", scratch / f"out_{n}.index"
            shutil.rmtree(out, ignore_errors=True)
            write_input(inp, n, args.dim)
            r = run_one(inp, out, args.nlist, args.batch_size, args.keep_pages)
            mib = 1024.0
            print(
                f"{n:>10,} {inp.stat().st_size / 2**20:>10.0f} {r['vmhwm_kb'] / mib:>10.1f} "
                f"{r['peak_rss_anon_kb'] / mib:>10.1f} {r['peak_rss_file_kb'] / mib:>10.1f} "
                f"{r['baseline_rss_kb'] / mib:>9.1f} {r['elapsed_s']:>7.1f}"
            )
            inp.unlink()
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
