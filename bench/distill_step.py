"""Benchmark one DMD2 round (K critic updates + 1 generator update) of `flashctl distill`.

Every row runs in one invocation, one after the other, so the ratios compare the same machine
state. Two worlds:

* bench world -- ~200 prepared T2I rows of one square size, a tiny Qwen-Image teacher, guidance
  `single`: identical shapes on both sides of the flashctl / minimal comparison.
  - minimal: a single-file plain-PyTorch DMD2 loop (bench/_distill_bench_worker.py: no DeepSpeed,
    no flashctl trainer code), same weights, batch, K, student steps, per-micro-step k, CFG
    teacher calls, prompt encoding, torch AdamW and clipping; one process, 1 thread.
  - flashctl-1 / flashctl-1-thr0: `DistillJob.round` on DeepSpeed ZeRO-3 engines (CPU, gloo) at 1
    rank x 1 thread, with DeepSpeed's default `stage3_param_persistence_threshold` (1e5: the tiny
    model's tensors stay whole; gradients and optimizer state are still partitioned) and with 0
    (every tensor partitioned, gathered/released by ZeRO-3's per-sub-module hooks).
  - flashctl-2 / flashctl-2-thr0: the same at 2 ranks x 1 thread (per-rank batch unchanged, so
    2 ranks train twice the samples per round: compare samples/s).
  - flashctl-1x2thr: 1 rank x 2 threads (the other way to spend 2 cores).
* default world -- the embedded default (experiments/tiny-cpu.yaml as shipped: T2I + edits, all
  aspects, its guidance policy, the builtin teachers) on 240 prepared rows:
  - default-before: the layout shipped before issue 12 (threshold 0, 2 ranks x 1 thread);
  - default-after: the yaml as it ships now (its ranks, cores // ranks threads each).

Reported per row: median seconds per round after `--warmup` rounds (and min), the part spent on
conditioning (data + text encoder), generator steps/s and generator samples/s, and the
fraction of the student's parameters every rank keeps whole (`whole/rank`: 100% = nothing
partitioned, 0% = every tensor partitioned).

    .venv/bin/python bench/distill_step.py [--rounds 8] [--warmup 2] [--only flashctl-1,flashctl-2] [--no-default]

Writes bench/results/distill_step.json (the 1-minute load average at start and end included:
timings are wall-clock, run it on an otherwise idle machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORKER = "bench._distill_bench_worker"
RESULTS = REPO / "bench" / "results" / "distill_step.json"


def build_world(root: Path, teacher: str | None, size: int) -> tuple[Path, Path]:
    """~200 prepared T2I shapes rows (square, `size` px) and a teacher pipeline folder."""
    from flashctl.data.prepare import prepare_data
    from flashctl.spec import DataSpec, load_spec

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # this parent only builds files; quiet DeepSpeed's probe
    data = DataSpec(root=root / "data", n=200, seed=0, edit_fraction=0.0, aspects={"square": 1.0},
                    sizes={"square": (size, size)}, rows_per_shard=200)
    prepare_data(data, data.root, progress=False)
    if teacher is not None:
        return data.root, Path(teacher).resolve()
    from diffusers.utils import logging as diffusers_logging

    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.tiny import build_tiny_pipeline
    from flashctl.shapes import corpus

    tiny = load_spec(REPO / "experiments" / "teacher-base.yaml").model.tiny
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    comps = build_tiny_pipeline(tiny, corpus(n=200, seed=0), seed=0)
    return data.root, QwenImageAdapter(comps).save_pipeline(root / "teacher")


def k_schedule(seed: int, steps: int, critic_updates: int, student_steps: int) -> list[list[int]]:
    """The backward-simulation depth k of every (round, micro-step), as DistillJob.round draws it."""
    from flashctl.distill.dmd2 import step_generator
    from flashctl.distill.schedules import sample_student_step

    return [[sample_student_step(step_generator(seed, s, m), student_steps) for m in range(critic_updates + 1)]
            for s in range(steps)]


def _run(cmd: list[str], env: dict[str, str], log: Path, what: str, timeout: float) -> None:
    """Run `cmd` in its own process group (torchrun + its ranks), killing the group on timeout / Ctrl-C."""
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException as exc:  # timeout or KeyboardInterrupt: no orphaned ranks
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                    break
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            rc = None
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        why = f"timed out after {timeout:.0f}s (see --timeout)" if rc is None else f"failed (exit {rc})"
        raise SystemExit(f"{what} {why}; log {log}:\n{tail}")


def run_flashctl(world: int, cfg: dict[str, Any], tmp: Path, tag: str, extra: tuple[str, ...] = (),
                 threads: int = 1) -> list[dict[str, Any]]:
    """torchrun `world` ranks of the flashctl worker, `threads` OMP threads each (spec overrides
    `extra` added); returns the per-rank results."""
    from flashctl.launch.local import env_for, torchrun_command
    from flashctl.spec import load_spec
    from flashctl.system import free_port

    port = free_port()
    overrides = [*cfg["overrides"], *extra, f"launch.nproc_per_node={world}", f"launch.master_port={port}"]
    spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml", overrides)
    conf = tmp / f"{tag}.json"
    conf.write_text(json.dumps({**cfg, "overrides": overrides, "tag": tag}))
    cmd = torchrun_command(spec, WORKER, ["flashctl", "--config", str(conf), "--out", str(tmp / "out")])
    base = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        base.pop(k, None)
    _run(cmd, env_for(spec, base), tmp / f"{tag}.log", f"{tag} ({world} rank(s))", cfg["timeout_s"])
    return [json.loads((tmp / "out" / f"{tag}-r{r}.json").read_text()) for r in range(world)]


def run_minimal(cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    conf = tmp / "minimal.json"
    conf.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", WORKER, "minimal", "--config", str(conf), "--out", str(tmp / "out")]
    _run(cmd, env, tmp / "minimal.log", "minimal loop", cfg["timeout_s"])
    return json.loads((tmp / "out" / "minimal.json").read_text())


def summarise(rounds: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    """Medians over the timed rounds (after warm-up)."""
    timed = rounds[warmup:]
    sec = statistics.median(r["seconds"] for r in timed)
    cond = statistics.median(r["conditioning_s"] for r in timed)
    train = statistics.median(r["seconds"] - r["conditioning_s"] for r in timed)
    return {"median_round_s": sec, "median_conditioning_s": cond, "median_train_s": train,
            "min_round_s": min(r["seconds"] for r in timed), "max_round_s": max(r["seconds"] for r in timed),
            "rounds_s": [round(r["seconds"], 4) for r in timed]}


THR0 = "deepspeed.param_persistence_threshold=0"
THR_DS = "deepspeed.param_persistence_threshold=null"  # DeepSpeed's own default (1e5), whatever the yaml sets
MEL0 = "deepspeed.memory_efficient_linear=false"  # plain F.linear instead of DeepSpeed's autograd Function
SUB = "deepspeed.gather=submodule"  # DeepSpeed's own gather unit (every Linear / norm apart)


def build_default_world(root: Path) -> Path:
    """Prepared rows of the embedded default's data spec (all aspects, half edits), fewer of them."""
    from flashctl.data.prepare import prepare_data
    from flashctl.spec import load_spec

    data = load_spec(REPO / "experiments" / "tiny-cpu.yaml").data.model_copy(
        update={"root": root / "data-default", "n": 240, "rows_per_shard": 240})
    prepare_data(data, data.root, progress=False)
    return data.root


def layouts(with_default: bool) -> list[dict[str, Any]]:
    """The rows of the bench, run one after the other in one invocation (same machine state).

    `world`: "bench" (T2I, square, single teacher, comparable with the minimal loop) or
    "default" (the embedded default spec as shipped, on its own data: T2I + edits, all aspects,
    its guidance policy and teachers)."""
    rows = [
        {"name": "minimal", "world": "bench", "ranks": 1, "threads": 1},
        {"name": "flashctl-1", "world": "bench", "ranks": 1, "threads": 1, "extra": (THR_DS,)},
        {"name": "flashctl-1-thr0", "world": "bench", "ranks": 1, "threads": 1, "extra": (THR0,)},
        {"name": "flashctl-1-mel0", "world": "bench", "ranks": 1, "threads": 1, "extra": (THR_DS, MEL0)},
        {"name": "flashctl-1-sub", "world": "bench", "ranks": 1, "threads": 1, "extra": (SUB, THR_DS)},
        {"name": "flashctl-1-sub-thr0", "world": "bench", "ranks": 1, "threads": 1, "extra": (SUB, THR0)},
        {"name": "flashctl-2", "world": "bench", "ranks": 2, "threads": 1, "extra": (THR_DS,)},
        {"name": "flashctl-2-thr0", "world": "bench", "ranks": 2, "threads": 1, "extra": (THR0,)},
        {"name": "flashctl-1x2thr", "world": "bench", "ranks": 1, "threads": 2, "extra": (THR_DS,)},
    ]
    if with_default:
        rows += [
            # before: the layout shipped until issue 12 (threshold 0, per-sub-module gathers, 2 ranks x 1 thread)
            {"name": "default-before", "world": "default", "ranks": 2, "threads": 1, "extra": (THR0, SUB)},
            # after: the embedded default exactly as flashctl/assets/tiny-cpu.yaml ships it
            {"name": "default-after", "world": "default", "ranks": None, "threads": None, "extra": ()},
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="existing teacher pipeline folder (default: build a tiny one)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=4, help="per-rank batch")
    parser.add_argument("--critic-updates", type=int, default=5, help="K critic updates per generator update")
    parser.add_argument("--size", type=int, default=32, help="square image side in pixels (multiple of 8)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per timed configuration")
    parser.add_argument("--cycles", type=int, default=1,
                        help="run the row list this many times over (A B .. A B ..), rounds of a row joined")
    parser.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--no-default", action="store_true", help="skip the embedded-default rows (before/after)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from flashctl.io import atomic_write_json
    from flashctl.spec import load_spec

    console = Console(stderr=True)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows_cfg = layouts(not args.no_default)
    if args.only:
        keep = set(args.only.split(","))
        rows_cfg = [r for r in rows_cfg if r["name"] in keep or r["name"] == "minimal"]
    shipped = load_spec(REPO / "experiments" / "tiny-cpu.yaml")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for r in rows_cfg:  # the shipped layout: its ranks, and the threads env_for gives each
        if r["ranks"] is None:
            r["ranks"] = shipped.launch.nproc_per_node
            r["threads"] = max(1, cores // r["ranks"])
    with tempfile.TemporaryDirectory(prefix="flashctl-bench-distill-") as tmpname:
        tmp = Path(tmpname)
        console.print("building the tiny world (data + teacher) ...")
        data_root, teacher = build_world(tmp, args.teacher, args.size)
        overrides = [
            f"data.root={data_root}", f"teachers.base.path={teacher}", f"teachers.edit.path={teacher}",
            "guidance.policy=single", "mixture.t2i=1", "mixture.edit=0", "data.aspects={square: 1.0}",
            f"distill.batch_size={args.batch_size}", f"distill.critic_updates={args.critic_updates}",
            "deepspeed.zero_stage=3", "deepspeed.precision=fp32", "launch.device=cpu",
            "tracking.enabled=false", "eval.enabled=false", f"run.out_dir={tmp / 'runs'}",
        ]
        spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml", overrides)
        d = spec.distill
        steps = args.warmup + args.rounds
        cfg = {
            "overrides": overrides, "warmup": args.warmup, "rounds": args.rounds, "teacher": str(teacher),
            "data": str(data_root), "batch_size": d.batch_size, "critic_updates": d.critic_updates,
            "student_steps": d.student_steps, "shift": d.shift, "cfg_scale": spec.teachers["base"].cfg_scale,
            "tau_min": d.tau_min, "tau_max": d.tau_max, "lr_generator": d.lr_generator, "lr_critic": d.lr_critic,
            "ks": k_schedule(d.seed, steps, d.critic_updates, d.student_steps), "timeout_s": args.timeout,
        }
        default_cfg = None
        if any(r["world"] == "default" for r in rows_cfg):
            console.print("preparing the embedded default's data (240 rows, T2I + edits) ...")
            default_root = build_default_world(tmp)
            default_cfg = {**cfg, "overrides": [f"data.root={default_root}", "tracking.enabled=false",
                                                "eval.enabled=false", f"run.out_dir={tmp / 'runs'}"]}
        results: dict[str, Any] = {}
        for cycle in range(args.cycles):  # A B C .. A B C ..: a load that drifts hits every row alike
            for r in rows_cfg:
                console.print(f"[{cycle + 1}/{args.cycles}] timing {r['name']} ({r['ranks']} rank(s) x "
                              f"{r['threads']} thread(s); {args.warmup} warm-up + {args.rounds} rounds) ...")
                if r["name"] == "minimal":
                    got = [run_minimal(cfg, tmp)]
                else:
                    got = run_flashctl(r["ranks"], default_cfg if r["world"] == "default" else cfg, tmp,
                                       f"{r['name']}-c{cycle}", r["extra"], r["threads"])
                for res in got:  # each launch's warm-up rounds dropped; the cycles' timed rounds joined
                    res["rounds"] = res["rounds"][args.warmup:]
                if r["name"] not in results:
                    results[r["name"]] = got
                else:
                    for old, new in zip(results[r["name"]], got):
                        old["rounds"] += new["rounds"]

    mini = results["minimal"][0]
    ks_m = [r["k_generator"] for r in mini["rounds"]]
    rows: dict[str, dict[str, Any]] = {}
    for r in rows_cfg:
        res = results[r["name"]]
        first = res[0]
        if r["world"] == "bench" and r["name"] != "minimal":  # same number of forwards on both sides
            ks_f = [x["k_generator"] for x in first["rounds"]]
            if ks_f != ks_m:
                raise SystemExit(f"k schedules differ: {r['name']} {ks_f} vs minimal {ks_m}")
        row = {**summarise(first["rounds"], 0), "world": r["world"], "ranks": r["ranks"],
               "threads_per_rank": first["threads"], "overrides": list(r.get("extra", ()))}
        row["samples_per_round"] = args.batch_size * r["ranks"]
        row["generator_steps_per_s"] = 1.0 / row["median_round_s"]
        row["generator_samples_per_s"] = row["samples_per_round"] / row["median_round_s"]
        row["setup_s"] = first["setup_s"]
        if "student_local_param_bytes" in first:
            row["student_local_param_bytes"] = [x["student_local_param_bytes"] for x in res]
            row["student_full_param_bytes"] = first["student_full_param_bytes"]
            row["student_persistent_fraction"] = first.get("student_persistent_fraction")
        rows[r["name"]] = row

    def ratio(a: str, b: str) -> float | None:
        return rows[a]["median_round_s"] / rows[b]["median_round_s"] if a in rows and b in rows else None

    report = {
        "config": {"batch_size_per_rank": args.batch_size, "critic_updates": args.critic_updates,
                   "student_steps": d.student_steps, "image_size": args.size, "rounds": args.rounds,
                   "warmup": args.warmup, "bench_world": "t2i, square, guidance single", "zero_stage": 3,
                   "precision": "fp32", "teacher": args.teacher or "tiny (experiments/teacher-base.yaml model.tiny)",
                   "default_world": "experiments/tiny-cpu.yaml as shipped, 240 prepared rows",
                   "k_schedule": cfg["ks"][args.warmup:]},
        "timings": rows,
        "ratios": {
            "flashctl1_over_minimal": ratio("flashctl-1", "minimal"),
            "flashctl1_thr0_over_minimal": ratio("flashctl-1-thr0", "minimal"),
            "flashctl1_sub_over_minimal": ratio("flashctl-1-sub", "minimal"),
            "flashctl1_sub_thr0_over_minimal": ratio("flashctl-1-sub-thr0", "minimal"),
            "flashctl2_over_flashctl1": ratio("flashctl-2", "flashctl-1"),
            "flashctl1x2thr_over_flashctl1": ratio("flashctl-1x2thr", "flashctl-1"),
            "default_after_speedup": ratio("default-before", "default-after"),
        },
        "total_bench_s": time.perf_counter() - t_start,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": load_start, "load_avg_1m_at_end": os.getloadavg()[0]},
    }
    atomic_write_json(args.out, report)

    table = Table(title=f"DMD2 round (K={args.critic_updates} critic + 1 generator update), batch {args.batch_size}/rank, "
                        f"median (and min) of {args.rounds} x {args.cycles} cycle(s); bench world: {args.size}px T2I; cond = data + text encoder")
    for col in ("run", "world", "ranks x thr", "s/round", "min s", "cond s", "gen steps/s", "gen smp/s",
                "vs minimal", "whole/rank"):
        table.add_column(col, justify="left" if col in ("run", "world") else "right", no_wrap=True)
    base = rows["minimal"]["median_round_s"]
    for name, row in rows.items():
        whole = row.get("student_persistent_fraction")
        part = "" if whole is None else f"{whole:.0%}"
        vs = f"x{row['median_round_s'] / base:.2f}" if row["world"] == "bench" else ""
        table.add_row(name, row["world"], f"{row['ranks']} x {row['threads_per_rank']}", f"{row['median_round_s']:.3f}",
                      f"{row['min_round_s']:.3f}", f"{row['median_conditioning_s']:.3f}",
                      f"{row['generator_steps_per_s']:.2f}", f"{row['generator_samples_per_s']:.2f}", vs, part)
    out = Console()
    if not out.is_terminal:
        out.width = 160
    out.print(table)
    rt = report["ratios"]

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"x{v:.2f}"

    out.print(f"flashctl-1 / minimal, per-block gathers: {fmt(rt['flashctl1_over_minimal'])} with DeepSpeed's default "
              f"persistence threshold, {fmt(rt['flashctl1_thr0_over_minimal'])} with threshold 0; per-sub-module gathers: "
              f"{fmt(rt['flashctl1_sub_over_minimal'])} and {fmt(rt['flashctl1_sub_thr0_over_minimal'])}; "
              f"1 rank x 2 threads / 1 x 1: {fmt(rt['flashctl1x2thr_over_flashctl1'])} per round; "
              f"embedded default before / after: {fmt(rt['default_after_speedup'])}; "
              f"total {report['total_bench_s']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
