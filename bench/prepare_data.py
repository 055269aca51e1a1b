"""Benchmark `prepare_data` (shapes source) against plain pyarrow writing, and its peak memory.

For each size N (default 10k and 100k rows), in one run:

* prepare -- `prepare_data` end to end (generate + validate + shard + hash + manifest), in a
             fresh subprocess per (N, workers). Peak memory: the subprocess's own high-water
             RSS (VmHWM) and the peak of the summed RSS of it and its pool workers (sampled
             every 20 ms with psutil). It should not grow with N (streaming). These run first,
             while this parent process is still small.
* gen     -- the same shapes rows generated in memory (record_at loop, no writing);
* pyarrow -- those pre-generated rows written with plain pyarrow (RecordBatch.from_pylist
             per 100 rows, IPC stream shards of 2000 rows): the floor of any writer.

Ratios: prepare / pyarrow (rows/s; generation dominates) and prepare / (gen + pyarrow)
(1.0 = no overhead beyond generating and writing the rows).

    .venv/bin/python bench/prepare_data.py [--sizes 10000 100000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _vm_hwm_mb() -> float:
    """High-water RSS of this process (Linux VmHWM; ru_maxrss would include the parent's RSS
    at fork time, since Linux carries it over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, workers: int, out: str) -> None:
    """Run prepare_data once and print its timing and peak memory as JSON."""
    from flashctl.data.prepare import prepare_data
    from flashctl.spec import DataSpec

    t0 = time.perf_counter()
    res = prepare_data(DataSpec(n=n, seed=0), Path(out), workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"rows": res.rows, "seconds": seconds, "hwm_mb": _vm_hwm_mb(), "digest": res.digest}))


def run_child(n: int, workers: int, tmp: Path) -> dict:
    """Run `child` in a subprocess, sampling the summed RSS of it and its workers."""
    import psutil

    out = tmp / f"prep-{n}-{workers}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(n), str(workers), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"prepare child failed:\n{stderr}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "tree_peak_mb": peak / 2**20}


def generate(n: int) -> tuple[list[dict], float]:
    from flashctl.data.prepare import _shapes_record_at
    from flashctl.spec import DataSpec

    record_at = _shapes_record_at()
    d = DataSpec(n=n, seed=0)
    t0 = time.perf_counter()
    rows = [
        record_at(i, d.seed, categories=d.categories, aspects=d.aspects, sizes=d.sizes, edit_fraction=d.edit_fraction)
        for i in range(n)
    ]
    return rows, time.perf_counter() - t0


def plain_pyarrow(rows: list[dict], out: Path, rows_per_shard: int = 2000, batch_rows: int = 100) -> float:
    import pyarrow as pa

    from flashctl.data.schema import SCHEMA, rows_to_batch

    out.mkdir(parents=True)
    with pa.BufferOutputStream() as sink, pa.ipc.new_stream(sink, SCHEMA) as w:  # warm-up
        w.write_batch(rows_to_batch(rows[:batch_rows]))
    t0 = time.perf_counter()
    for s, start in enumerate(range(0, len(rows), rows_per_shard)):
        shard = rows[start : start + rows_per_shard]
        with pa.OSFile(str(out / f"shard-{s:05d}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as w:
            for b in range(0, len(shard), batch_rows):
                w.write_batch(rows_to_batch(shard[b : b + batch_rows]))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), args.child[2])
        return
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        prepared = {(n, w): run_child(n, w, tmp) for n in args.sizes for w in args.workers}
        print(f"{'rows':>7} {'what':<20} {'seconds':>8} {'rows/s':>8} {'RSS main/tree MB':>17}  notes")
        for n in args.sizes:
            rows, gen_s = generate(n)
            write_s = plain_pyarrow(rows, tmp / f"plain-{n}")
            del rows
            print(f"{n:>7} {'gen (in memory)':<20} {gen_s:>8.2f} {n / gen_s:>8.0f}")
            print(f"{n:>7} {'plain pyarrow write':<20} {write_s:>8.2f} {n / write_s:>8.0f} {'':>17}  pre-generated rows")
            for w in args.workers:
                r = prepared[(n, w)]
                rate = r["rows"] / r["seconds"]
                rss = f"{r['hwm_mb']:.0f} / {r['tree_peak_mb']:.0f}"
                print(
                    f"{n:>7} {f'prepare_data w={w}':<20} {r['seconds']:>8.2f} {rate:>8.0f} {rss:>17}  "
                    f"prepare/pyarrow {rate / (n / write_s):.3f}, "
                    f"prepare/(gen+pyarrow) {(gen_s + write_s) / r['seconds']:.2f}"
                )


if __name__ == "__main__":
    main()
