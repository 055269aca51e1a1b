"""Benchmark one DMD2 round (K critic updates + 1 generator update) of `flashctl distill`.

In one run, on one tiny world (shapes data + a tiny Qwen-Image teacher pipeline):

* flashctl-1 / flashctl-2 -- `DistillJob.round` on DeepSpeed ZeRO-3 engines (CPU accelerator,
  gloo), started with torchrun at 1 and at 2 ranks, OMP_NUM_THREADS=1 per rank (so 2 ranks
  use 2 cores; the per-rank batch stays `--batch-size`, i.e. 2 ranks train twice the samples);
* flashctl-1-zero2 -- flashctl at 1 rank under ZeRO-2 (reference: separates the cost of
  ZeRO-3's per-module gather/release hooks from flashctl's own orchestration);
* minimal -- a single-file plain-PyTorch DMD2 loop (bench/_distill_bench_worker.py: no
  DeepSpeed, no flashctl trainer code) with the same transformer weights, batch, K, student
  steps, per-micro-step backward-simulation depths k, CFG teacher calls (cond + uncond),
  prompt encoding, torch AdamW and gradient clipping; one process, OMP_NUM_THREADS=1.

Reported: median seconds per round over `--rounds` rounds after `--warmup` rounds, the part
of it spent building the conditioning (data + text encoder), the ratio flashctl-1 / minimal
(both one process, one thread), and the student engine's per-rank parameter bytes under
ZeRO-3 (`local_param_bytes`) at 1 and 2 ranks vs the full size. At CPU scale flashctl sets
`stage3_param_persistence_threshold` to 0 (engine.py), so every tensor of the tiny model is
partitioned and gathered/released per sub-module on every forward: that Python hook work, not
the maths, is what ZeRO-3 costs here (compare the ZeRO-2 row). The bench uses T2I rows of
one image size (square) so both loops see identical shapes; edits are not timed.

    .venv/bin/python bench/distill_step.py [--teacher PIPELINE_DIR] [--rounds 10] [--warmup 2]

Writes bench/results/distill_step.json. Timings are wall-clock: run it on an otherwise idle
machine (the JSON records the 1-minute load average at start and end; `min s` is the least
disturbed round).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def run_flashctl(world: int, cfg: dict[str, Any], tmp: Path, tag: str, extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """torchrun `world` ranks of the flashctl worker (spec overrides `extra` added); returns the per-rank results."""
    from flashctl.launch.local import env_for, torchrun_command
    from flashctl.spec import load_spec

    port = _free_port()
    overrides = [*cfg["overrides"], *extra, f"launch.nproc_per_node={world}", f"launch.master_port={port}"]
    spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml", overrides)
    conf = tmp / f"{tag}.json"
    conf.write_text(json.dumps({**cfg, "overrides": overrides, "tag": tag}))
    cmd = torchrun_command(spec, WORKER, ["flashctl", "--config", str(conf), "--out", str(tmp / "out")])
    base = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="existing teacher pipeline folder (default: build a tiny one)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--batch-size", type=int, default=4, help="per-rank batch")
    parser.add_argument("--critic-updates", type=int, default=5, help="K critic updates per generator update")
    parser.add_argument("--size", type=int, default=32, help="square image side in pixels (multiple of 8)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per timed configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from flashctl.io import atomic_write_json
    from flashctl.spec import load_spec

    console = Console(stderr=True)
    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
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
        results: dict[str, Any] = {}
        for name, fn in (("minimal", lambda: run_minimal(cfg, tmp)),
                         ("flashctl-1", lambda: run_flashctl(1, cfg, tmp, "flashctl-1")),
                         ("flashctl-2", lambda: run_flashctl(2, cfg, tmp, "flashctl-2")),
                         ("flashctl-1-zero2", lambda: run_flashctl(1, cfg, tmp, "flashctl-1-zero2",
                                                                   ("deepspeed.zero_stage=2",)))):
            console.print(f"timing {name} ({args.warmup} warm-up + {args.rounds} rounds) ...")
            results[name] = fn()

    f1, f2, z2, mini = results["flashctl-1"], results["flashctl-2"], results["flashctl-1-zero2"], results["minimal"]
    # the k schedules agree (same number of forwards on both sides)
    ks_f = [r["k_generator"] for r in f1[0]["rounds"]]
    ks_m = [r["k_generator"] for r in mini["rounds"]]
    if ks_f != ks_m:
        raise SystemExit(f"k schedules differ: flashctl {ks_f} vs minimal {ks_m}")
    rows = {
        "minimal": {**summarise(mini["rounds"], args.warmup), "ranks": 1, "threads_per_rank": mini["threads"]},
        "flashctl-1": {**summarise(f1[0]["rounds"], args.warmup), "ranks": 1, "threads_per_rank": f1[0]["threads"]},
        "flashctl-2": {**summarise(f2[0]["rounds"], args.warmup), "ranks": 2, "threads_per_rank": f2[0]["threads"]},
        "flashctl-1-zero2": {**summarise(z2[0]["rounds"], args.warmup), "ranks": 1, "threads_per_rank": z2[0]["threads"]},
    }
    for row in rows.values():
        row["samples_per_round"] = args.batch_size * row["ranks"]
        row["generator_samples_per_s"] = row["samples_per_round"] / row["median_round_s"]
    report = {
        "config": {"batch_size_per_rank": args.batch_size, "critic_updates": args.critic_updates,
                   "student_steps": d.student_steps, "image_size": args.size, "rounds": args.rounds,
                   "warmup": args.warmup, "task": "t2i", "zero_stage": 3, "precision": "fp32",
                   "omp_num_threads_per_rank": 1, "teacher": args.teacher or "tiny (experiments/teacher-base.yaml model.tiny)",
                   "k_schedule": cfg["ks"][args.warmup:]},
        "timings": rows,
        "ratio_flashctl1_over_minimal": rows["flashctl-1"]["median_round_s"] / rows["minimal"]["median_round_s"],
        "ratio_flashctl1_over_minimal_excl_conditioning":
            rows["flashctl-1"]["median_train_s"] / rows["minimal"]["median_train_s"],
        "ratio_flashctl1_zero2_over_minimal": rows["flashctl-1-zero2"]["median_round_s"] / rows["minimal"]["median_round_s"],
        "ratio_flashctl2_over_flashctl1": rows["flashctl-2"]["median_round_s"] / rows["flashctl-1"]["median_round_s"],
        "param_bytes": {
            "student_full": f1[0]["student_full_param_bytes"],
            "student_local_1_rank": f1[0]["student_local_param_bytes"],
            "student_local_2_ranks": [r["student_local_param_bytes"] for r in f2],
            "critic_local_2_ranks": [r["critic_local_param_bytes"] for r in f2],
            "minimal_student": mini["student_full_param_bytes"],
        },
        "setup_s": {"minimal": mini["setup_s"], "flashctl-1": f1[0]["setup_s"], "flashctl-2": f2[0]["setup_s"],
                    "flashctl-1-zero2": z2[0]["setup_s"]},
        "total_bench_s": time.perf_counter() - t_start,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": load_start, "load_avg_1m_at_end": os.getloadavg()[0]},
    }
    atomic_write_json(args.out, report)

    table = Table(title=f"DMD2 round (K={args.critic_updates} critic + 1 generator update), batch {args.batch_size}/rank, "
                        f"{args.size}px T2I, median (and min) of {args.rounds}; cond = data + text encoder")
    for col in ("run", "ranks x thr", "s/round", "min s", "cond s", "train s", "gen smp/s", "vs minimal"):
        table.add_column(col, justify="right" if col != "run" else "left", no_wrap=True)
    base = rows["minimal"]["median_round_s"]
    for name, row in rows.items():
        table.add_row(name, f"{row['ranks']} x {row['threads_per_rank']}", f"{row['median_round_s']:.3f}",
                      f"{row['min_round_s']:.3f}", f"{row['median_conditioning_s']:.3f}", f"{row['median_train_s']:.3f}",
                      f"{row['generator_samples_per_s']:.2f}", f"x{row['median_round_s'] / base:.2f}")
    out = Console()
    if not out.is_terminal:
        out.width = 120
    out.print(table)
    pb = report["param_bytes"]
    mib = 1 / 2**20
    out.print(f"student params: full {pb['student_full'] * mib:.2f} MiB; ZeRO-3 per rank: 1 rank "
              f"{pb['student_local_1_rank'] * mib:.2f} MiB, 2 ranks "
              + ", ".join(f"{b * mib:.2f}" for b in pb["student_local_2_ranks"]) + " MiB")
    out.print(f"flashctl-1 / minimal: x{report['ratio_flashctl1_over_minimal']:.2f} per round "
              f"(x{report['ratio_flashctl1_over_minimal_excl_conditioning']:.2f} without conditioning); "
              f"total {report['total_bench_s']:.0f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
