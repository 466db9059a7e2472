"""Time parallel builds against the single-process build, and measure driver and worker memory.

Writes a seeded synthetic clustered float32 ``.npy`` input (default 2M x 128, 1 GB), builds it
with :func:`diskivf.build.build` (the reference), then with :func:`diskivf.parallel.build_parallel`
on a process pool and on a Dask ``LocalCluster`` (``processes=True``, one thread per worker)
with 1 and 2 workers. Each configuration runs in a fresh child process (the driver), so that
its peak memory is its own. For every run it reports:

* wall time of the build call, split into train / assign / merge / commit for parallel builds
  (a Dask cluster's start-up time is reported apart and not included);
* the driver's ``VmHWM`` (kernel peak resident set, anonymous + file-backed pages) and its
  peak ``RssAnon`` (sampled every 20 ms);
* the same for the largest worker process (every descendant of the driver is sampled; its
  ``VmHWM`` is read from ``/proc`` until it exits);
* whether the index equals the reference: list files byte for byte and the commit record's
  counts and CRC32s.

Usage::

    python tools/bench_parallel.py                      # 2M x 128, nlist 1024
    python tools/bench_parallel.py --n 200000 --dim 64 --nlist 256 --configs serial pool-2
    python tools/bench_parallel.py --json results.json --keep

Timings on a shared machine are noisy: run it when the machine is otherwise idle, and repeat.
Needs ``n * dim * 4`` bytes for the input plus about as much per index in ``--dir``
(indexes are deleted after each run unless ``--keep``), and ``dask[distributed]`` for the
Dask configurations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("serial", "inline", "pool-1", "pool-2", "dask-1", "dask-2")
DEFAULT_CONFIGS = ("serial", "pool-1", "pool-2", "dask-1", "dask-2")


# ----------------------------------------------------------------------------- memory sampling


def _status(pid: int | str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])  # kB
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return out


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Sampler:
    """Peak VmHWM and RssAnon of this process and of each of its descendants."""

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.me: dict[str, int] = {"VmHWM": 0, "RssAnon": 0}
        self.procs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:  # noqa: PYI034 - Self needs Python 3.11
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        s = _status("self")
        for k in self.me:
            self.me[k] = max(self.me[k], s.get(k, 0))
        for pid in _descendants(os.getpid()):
            s = _status(pid)
            if not s:
                continue
            rec = self.procs.setdefault(pid, {"VmHWM": 0, "RssAnon": 0, "cmd": _cmdline(pid)})
            for k in ("VmHWM", "RssAnon"):
                rec[k] = max(rec[k], s.get(k, 0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.period)

    def worker_peak(self) -> dict[str, Any]:
        """The descendant with the largest VmHWM (a worker, not a fork server or nanny)."""
        if not self.procs:
            return {}
        pid, rec = max(self.procs.items(), key=lambda kv: kv[1]["VmHWM"])
        return {"pid": pid, **rec, "processes": len(self.procs)}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return ""


# ------------------------------------------------------------------------------ the child


def run_child(cfg: str, inp: str, out: str, nlist: int, batch: int, durable: bool) -> None:
    """Run one configuration here (the driver) and print one JSON line of results."""
    from diskivf.build import build
    from diskivf.parallel import build_parallel, process_executor

    result: dict[str, Any] = {"config": cfg}
    with Sampler() as sampler:
        if cfg == "serial":
            t0 = time.perf_counter()
            r = build(inp, out, nlist=nlist, batch_size=batch, durable=durable)
            result["build_s"] = time.perf_counter() - t0
            result["phases"] = {"train_s": r.train_s, "add_s": r.add_s}
        elif cfg == "inline" or cfg.startswith("pool-"):
            workers = 1 if cfg == "inline" else int(cfg.split("-")[1])
            pool = None if cfg == "inline" else process_executor(workers)
            try:
                t0 = time.perf_counter()
                p = build_parallel(
                    inp,
                    out,
                    nlist=nlist,
                    batch_size=batch,
                    executor=pool,
                    blas_threads=None if pool is None else max(1, (os.cpu_count() or 1) // workers),
                    durable=durable,
                )
                result["build_s"] = time.perf_counter() - t0
            finally:
                if pool is not None:
                    pool.shutdown()
            result["phases"] = _phases(p)
        elif cfg.startswith("dask-"):
            import importlib

            distributed: Any = importlib.import_module("distributed")
            workers = int(cfg.split("-")[1])
            t0 = time.perf_counter()
            with (
                distributed.LocalCluster(
                    n_workers=workers,
                    processes=True,
                    threads_per_worker=1,
                    dashboard_address=None,
                    memory_limit=0,
                ) as cluster,
                distributed.Client(cluster) as client,
            ):
                result["cluster_start_s"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                p = build_parallel(
                    inp,
                    out,
                    nlist=nlist,
                    batch_size=batch,
                    executor=client.get_executor(),
                    durable=durable,
                )
                result["build_s"] = time.perf_counter() - t0
            result["phases"] = _phases(p)
        else:
            raise SystemExit(f"unknown configuration {cfg!r}")
    result["driver"] = dict(sampler.me)
    result["worker"] = sampler.worker_peak()
    print("RESULT " + json.dumps(result), flush=True)


def _phases(p: Any) -> dict[str, Any]:
    return {
        "train_s": p.train_s,
        "assign_s": p.assign_s,
        "merge_s": p.merge_s,
        "commit_s": p.commit_s,
        "shards": p.shards,
        "merge_tasks": p.merge_tasks,
        "retries": p.retries,
    }


# ----------------------------------------------------------------------------- the parent


def make_input(path: Path, n: int, dim: int, seed: int) -> None:
    """Seeded clustered float32 rows, written in chunks (bounded memory)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, n // 1000), dim)).astype(np.float32) * 4
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    chunk = 1 << 18
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        which = rng.integers(0, len(centers), b - a)
        out[a:b] = centers[which] + rng.standard_normal((b - a, dim), dtype=np.float32)
    out.flush()
    del out


def fingerprint(index: Path) -> dict[str, str]:
    """Hashes of what must match the reference: every list file, and the commit arrays."""
    sys.path.insert(0, str(REPO))
    from diskivf import format as fmt

    h = hashlib.sha256()
    for p in sorted((index / fmt.LISTS_DIR).iterdir()):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    meta = fmt.read_meta(index)
    rec = fmt.read_commit(index, meta.nlist, meta.index_uuid)
    c = hashlib.sha256()
    for arr in (rec.list_counts, rec.vec_crc32, rec.ids_crc32):
        c.update(np.ascontiguousarray(arr).tobytes())
    c.update(str(rec.next_id).encode())
    return {"lists": h.hexdigest(), "commit": c.hexdigest(), "trained": fmt.trained_hash(meta)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    ap.add_argument("--fsync", action="store_true", help="durable builds (default: no fsync)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the input and the indexes")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", nargs=6, metavar="ARG", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        cfg, inp, out, nlist, batch, durable = args.child
        run_child(cfg, inp, out, int(nlist), int(batch), durable == "1")
        return 0

    root = Path(args.dir or tempfile.mkdtemp(prefix="diskivf-bench-parallel-"))
    root.mkdir(parents=True, exist_ok=True)
    inp = root / f"synthetic_{args.n}x{args.dim}.npy"
    if not inp.exists():
        t0 = time.perf_counter()
        make_input(inp, args.n, args.dim, args.seed)
        print(f"wrote {inp} in {time.perf_counter() - t0:.1f} s", flush=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    results = []
    reference: dict[str, str] | None = None
    configs = list(args.configs)
    if "serial" in configs:  # the reference first
        configs.remove("serial")
        configs.insert(0, "serial")
    for cfg in configs:
        out = root / f"{cfg}.index"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            cfg,
            str(inp),
            str(out),
            str(args.nlist),
            str(args.batch_size),
            "1" if args.fsync else "0",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{cfg}: failed ({proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(lines[-1][len("RESULT ") :])
        fp = fingerprint(out)
        if cfg == "serial":
            reference = fp
        res["identical_to_serial"] = None if reference is None else fp == reference
        results.append(res)
        print(_line(res), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    if not args.keep and args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    summary = {
        "n": args.n,
        "dim": args.dim,
        "nlist": args.nlist,
        "batch_size": args.batch_size,
        "fsync": args.fsync,
        "cpus": os.cpu_count(),
        "results": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def _line(r: dict[str, Any]) -> str:
    ph = r.get("phases", {})
    split = " ".join(f"{k[:-2]} {v:.1f}" for k, v in ph.items() if k.endswith("_s"))
    start = f" (+{r['cluster_start_s']:.1f} s cluster start)" if "cluster_start_s" in r else ""
    w = r.get("worker") or {}
    worker = (
        f"worker VmHWM {w['VmHWM'] / 1024:.0f} MiB RssAnon {w['RssAnon'] / 1024:.0f} MiB"
        if w and r["config"] != "serial"
        else "no workers"
    )
    return (
        f"{r['config']:>7}: {r['build_s']:6.1f} s{start} [{split}]  driver VmHWM "
        f"{r['driver']['VmHWM'] / 1024:.0f} MiB RssAnon {r['driver']['RssAnon'] / 1024:.0f} MiB; "
        f"{worker}; identical to serial: {r['identical_to_serial']}"
    )


if __name__ == "__main__":
    sys.exit(main())
