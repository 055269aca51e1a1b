"""ZeRO-3 parameter all-gathers of one DMD2 round, CFG batched vs CFG as two passes (issue 10).

2 CPU ranks (torchrun, gloo, DS_ACCELERATOR=cpu) build a real `DistillJob` with every tensor
partitioned (`deepspeed.param_persistence_threshold=0`, frozen teacher a ZeRO-3 engine too, as
at GPU scale) on the bench world of bench/distill_step.py (T2I rows, a tiny teacher, guidance
`single`, teacher cfg_scale 2.5, objective dmd2). DeepSpeed's comms logger
(`deepspeed.comm.configure(enabled=True, prof_all=True)`, the same logger the `comms_logger`
config key turns on) counts every collective; a round's all-gathers are read from
`deepspeed.comm.comms_logger.comms_dict` before and after. Two variants, in the same processes:

* batched -- the code as it is: `Conditioning.velocity_pair` runs the teacher's conditional and
  unconditional passes as ONE forward of batch 2B;
* sequential -- CFG as before issue 10 (reproduced here only): `velocity_pair` replaced by two
  `Conditioning.velocity` calls (conditional, then unconditional).

One warm-up round, then rounds alternate batched, sequential, batched, ... all at the same
global step, so every variant draws the same student steps k and task: the only difference is
CFG. Gathers are attributed to phases (the K critic updates, the generator update) and to the
engine whose forward/backward ran them (student, critic, teacher). The logger records an
all-gather with its input (this rank's shard): bytes gathered = shard bytes x world size.

Columns: gathers / MiB per round; gathers in the K critic updates and in the generator update;
the teacher's gathers, MiB and forwards (objective dmd2: one guided prediction per round); the
student's and critic's gathers (forward + backward); ZeRO-3 trace-cache invalidations of
student/critic/teacher (after one, an engine fetches sub-module by sub-module, no prefetch,
until its next forward records a new trace).

    .venv/bin/python bench/round_gathers.py [--repeats 2] [--critic-updates 2] [--batch-size 2] [KEY=VALUE ...]

(the tiny teacher fits one 5e7-element prefetch bucket: one coalesced gather per forward once
its trace is recorded; `deepspeed.prefetch_bucket_size=100000` splits a forward into several,
as a 20B model's is)

Writes bench/results/round_gathers.json and prints a table (rank 0's counts; the ranks agree).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "round_gathers.json"
MIB = 1024 * 1024
GATHER_OPS = ("all_gather_into_tensor", "all_gather")  # what ZeRO-3's parameter fetch calls


# ------------------------------------------------------------------------------------ worker


class Meter:
    """Running totals of DeepSpeed's comms logger: all-gathers (count, bytes gathered) and the
    other collectives (count), read from `comms_dict` (op -> msg size -> [count, ...])."""

    def __init__(self, world: int):
        self.world = world

    def snapshot(self) -> Counter:
        from deepspeed.comm.comm import comms_logger

        out: Counter = Counter()
        for op, sizes in comms_logger.comms_dict.items():
            for size, rec in sizes.items():
                if op in GATHER_OPS:
                    out["gathers"] += rec[0]
                    out["gathered_bytes"] += rec[0] * size * self.world  # size: this rank's shard
                else:
                    out[f"other:{op}"] += rec[0]
        out["trace_invalidations"] = INVALIDATIONS[0]
        return out


INVALIDATIONS = [0]
"""ZeRO-3 trace-cache invalidations so far (any engine): after one, that engine fetches each
sub-module's parameters on demand, without prefetch, until a whole step records a new trace."""


def _count_invalidations() -> None:
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    original = PartitionedParameterCoordinator._invalidate_trace

    def counted(self):
        INVALIDATIONS[0] += 1
        return original(self)

    PartitionedParameterCoordinator._invalidate_trace = counted


def _sequential_pair(self, model, x_t, sigma):
    """CFG before issue 10: two teacher forwards (conditional, then unconditional)."""
    return self.velocity(model, x_t, sigma), self.velocity(model, x_t, sigma, uncond=True)


def worker(args) -> None:
    from flashctl.distill.engine import init_distributed, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    import warnings

    warnings.filterwarnings("ignore")
    import deepspeed.comm as ds_comm

    from flashctl.distill.dmd2 import Conditioning
    from flashctl.distill.engine import barrier
    from flashctl.distill.worker import DistillJob
    from flashctl.spec import load_spec

    spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml", json.loads(args.overrides))
    job = DistillJob(spec, args.out / "run", info, partition_teachers=True)
    teacher = job.teachers[spec.guidance.base]
    engines = {"student": job.student, "critic": job.critic, "teacher": teacher.model}
    partitioned = {n: all(getattr(p, "ds_tensor", None) is not None and not getattr(p, "ds_persist", False)
                          for p in e.module.parameters()) for n, e in engines.items()}
    param_bytes = {n: sum(p.ds_numel * p.ds_tensor.element_size() for p in e.module.parameters())
                   for n, e in engines.items()}
    meter = Meter(info.world_size)
    batched_pair = Conditioning.velocity_pair
    acc: dict[str, Counter] = {}  # key -> totals of the round being measured

    def attribute(key: str, fn):
        """Wrap `fn` so the collectives it runs (and its calls) are added to acc[key]."""
        def wrapped(*a, **kw):
            before = meter.snapshot()
            try:
                return fn(*a, **kw)
            finally:
                delta = meter.snapshot()
                delta.subtract(before)
                delta["calls"] += 1
                acc.setdefault(key, Counter()).update(delta)
        return wrapped

    # engine.forward / backward are looked up on the instance (nn.Module.__call__ -> self.forward)
    for name, engine in engines.items():
        engine.forward = attribute(f"{name}.forward", engine.forward)
        if name != "teacher":
            engine.backward = attribute(f"{name}.backward", engine.backward)
    job.critic_update = attribute("phase.critic_updates", job.critic_update)
    job.generator_update = attribute("phase.generator_update", job.generator_update)
    _count_invalidations()
    ds_comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)

    def one_round(variant: str, step: int) -> dict[str, Any]:
        Conditioning.velocity_pair = batched_pair if variant == "batched" else _sequential_pair
        acc.clear()
        barrier()
        before = meter.snapshot()
        t0 = time.perf_counter()
        job.round(step)
        seconds = time.perf_counter() - t0
        total = meter.snapshot()
        total.subtract(before)
        return {"variant": variant, "step": step, "seconds": seconds, "round": dict(total),
                "parts": {k: dict(v) for k, v in acc.items()}}

    warm = one_round("batched", 0)
    rounds = []
    for _ in range(args.repeats):
        for variant in ("batched", "sequential"):
            rounds.append(one_round(variant, 1))
    _, _, task, _ = job.draws(1, 0)
    ks = [job.draws(1, m)[3] for m in range(spec.distill.critic_updates + 1)]
    res = {"rank": info.rank, "world_size": info.world_size, "partitioned": partitioned,
           "param_bytes": param_bytes, "task": task, "k_per_micro_step": ks,
           "critic_updates": spec.distill.critic_updates, "batch_size": spec.distill.batch_size,
           "cfg_scale": teacher.cfg_scale, "warmup": warm, "rounds": rounds}
    (args.out / f"gathers-rank{info.rank}.json").write_text(json.dumps(res))
    barrier()


# ------------------------------------------------------------------------------------ driver


def _row(r: dict[str, Any]) -> dict[str, float]:
    p = r["parts"]

    def get(key: str, field: str) -> float:
        return p.get(key, {}).get(field, 0)

    return {
        "gathers": r["round"].get("gathers", 0), "mib": r["round"].get("gathered_bytes", 0) / MIB,
        "critic_phase": get("phase.critic_updates", "gathers"), "gen_phase": get("phase.generator_update", "gathers"),
        "teacher": get("teacher.forward", "gathers"), "teacher_mib": get("teacher.forward", "gathered_bytes") / MIB,
        "teacher_fwd": get("teacher.forward", "calls"),
        "student": get("student.forward", "gathers") + get("student.backward", "gathers"),
        "critic": get("critic.forward", "gathers") + get("critic.backward", "gathers"),
        "invalidations": "/".join(str(get(f"{n}.forward", "trace_invalidations")
                                      + get(f"{n}.backward", "trace_invalidations"))
                                  for n in ("student", "critic", "teacher")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2, help="measured (batched, sequential) pairs")
    ap.add_argument("--critic-updates", type=int, default=2, help="K critic updates per generator update")
    ap.add_argument("--batch-size", type=int, default=2, help="per-rank batch")
    ap.add_argument("--size", type=int, default=32, help="square image side in pixels")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for the 2-rank run")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("extra", nargs="*", help="spec overrides KEY=VALUE (e.g. deepspeed.prefetch_bucket_size=100000)")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from bench.distill_step import _run, build_world

    with tempfile.TemporaryDirectory(prefix="flashctl-bench-gathers-") as tmpname:
        tmp = Path(tmpname)
        print("building the tiny world (data + teacher) ...", flush=True)
        data_root, teacher = build_world(tmp, None, args.size)
        overrides = [
            f"data.root={data_root}", f"teachers.base.path={teacher}", f"teachers.edit.path={teacher}",
            "guidance.policy=single", "mixture.t2i=1", "mixture.edit=0", "data.aspects={square: 1.0}",
            f"distill.batch_size={args.batch_size}", f"distill.critic_updates={args.critic_updates}",
            "distill.objective=dmd2", "teachers.base.cfg_scale=2.5", "deepspeed.zero_stage=3",
            "deepspeed.param_persistence_threshold=0", "deepspeed.precision=fp32", "launch.device=cpu",
            "launch.nproc_per_node=2", "tracking.enabled=false", "eval.enabled=false", f"run.out_dir={tmp / 'runs'}", *args.extra,
        ]
        out = tmp / "out"
        out.mkdir()
        from flashctl.launch import rank_env
        from flashctl.system import free_port

        env = rank_env("cpu", base=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(Path(__file__).resolve()), "--worker", f"--out={out}", f"--overrides={json.dumps(overrides)}"]
        print("2 ranks: building the ZeRO-3 engines, 1 warm-up round, then "
              f"{2 * args.repeats} measured rounds ...", flush=True)
        t0 = time.perf_counter()
        _run(cmd, env, tmp / "ranks.log", "round_gathers (2 ranks)", args.timeout)
        ranks = [json.loads((out / f"gathers-rank{r}.json").read_text()) for r in (0, 1)]
    wall = time.perf_counter() - t0
    r0 = ranks[0]
    same = all(_row(a) == _row(b) for a, b in zip(r0["rounds"], ranks[1]["rounds"]))
    rows = [{"variant": r["variant"], **_row(r)} for r in r0["rounds"]]
    by = {v: [x for x in rows if x["variant"] == v] for v in ("batched", "sequential")}
    stable = all(x == by[v][0] for v in by for x in by[v])
    result = {"overrides": args.extra, "ranks_agree": same, "repeats_agree": stable, "run_s": wall, "rows": rows, "rank0": r0,
              "rank1_rounds": ranks[1]["rounds"]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")

    mib = {n: b / MIB for n, b in r0["param_bytes"].items()}
    print(f"\nDMD2 round, 2 CPU ranks, ZeRO-3 threshold 0 (every tensor partitioned: {r0['partitioned']}); "
          f"K={r0['critic_updates']} critic updates + 1 generator update, batch {r0['batch_size']}/rank, "
          f"task {r0['task']}, student steps k per micro-step {r0['k_per_micro_step']}, teacher cfg_scale "
          f"{r0['cfg_scale']}; fp32 parameters: student {mib['student']:.2f} MiB, critic {mib['critic']:.2f}, "
          f"teacher {mib['teacher']:.2f}. Counted by DeepSpeed's comms logger (all_gather_into_tensor).")
    head = (f"{'variant':<11} {'gathers':>7} {'MiB':>7} {'critic ph.':>10} {'gen. ph.':>8} {'teacher':>7} "
            f"{'teach MiB':>9} {'teach fwd':>9} {'student':>7} {'critic':>6} {'trace inval. s/c/t':>18}")
    print(head)
    for x in rows:
        print(f"{x['variant']:<11} {x['gathers']:>7} {x['mib']:>7.2f} {x['critic_phase']:>10} {x['gen_phase']:>8} "
              f"{x['teacher']:>7} {x['teacher_mib']:>9.2f} {x['teacher_fwd']:>9} {x['student']:>7} {x['critic']:>6} "
              f"{x['invalidations']:>18}")
    b, s = by["batched"][0], by["sequential"][0]
    print(f"teacher gathers per guided prediction: batched {b['teacher']}, sequential {s['teacher']} "
          f"(x{b['teacher'] / max(s['teacher'], 1):.2f}); per round {b['gathers']} vs {s['gathers']} "
          f"(x{b['gathers'] / max(s['gathers'], 1):.2f}), {b['mib']:.2f} vs {s['mib']:.2f} MiB. "
          f"ranks agree: {same}; repeats agree: {stable}; {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
