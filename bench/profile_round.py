"""Profile DMD2 rounds of `flashctl distill` (1 rank, in this process) to find what is not maths.

Builds the bench world of bench/distill_step.py (T2I rows + a tiny teacher) or uses the
embedded default's spec as shipped (`--default`: T2I + edits, its guidance, builtin teachers),
runs `--warmup` rounds, then profiles `--rounds` rounds with cProfile (Python time per function:
hooks, encoders, data) or, with `--torch`, torch.profiler (time per op).

    .venv/bin/python bench/profile_round.py [--default] [--rounds 3] [--torch] [--top 30] [KEY=VALUE ...]

Extra KEY=VALUE arguments are spec overrides (e.g. deepspeed.param_persistence_threshold=0).
The profile is written to bench/results/profile_round.txt as well as printed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "profile_round.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="spec overrides KEY=VALUE")
    parser.add_argument("--default", action="store_true", help="the embedded default spec and world")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="torch.profiler op table instead of cProfile")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from bench.distill_step import build_default_world, build_world
    from flashctl.distill.engine import init_distributed
    from flashctl.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="flashctl-profile-") as tmpname:
        tmp = Path(tmpname)
        common = ["tracking.enabled=false", "eval.enabled=false", f"run.out_dir={tmp / 'runs'}",
                  "launch.nproc_per_node=1"]
        if args.default:
            overrides = [f"data.root={build_default_world(tmp)}", *common]
        else:
            data_root, teacher = build_world(tmp, None, 32)
            overrides = [f"data.root={data_root}", f"teachers.base.path={teacher}", f"teachers.edit.path={teacher}",
                         "guidance.policy=single", "mixture.t2i=1", "mixture.edit=0", "data.aspects={square: 1.0}",
                         *common]
        spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml", [*overrides, *args.overrides])
        info = init_distributed("cpu")
        import torch

        from flashctl.distill.worker import DistillJob

        job = DistillJob(spec, tmp / "run", info)
        for step in range(args.warmup):
            job.round(step)
        t0 = time.perf_counter()
        text = io.StringIO()
        if args.torch:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for step in range(args.warmup, args.warmup + args.rounds):
                    job.round(step)
            text.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        else:
            pr = cProfile.Profile()
            pr.enable()
            for step in range(args.warmup, args.warmup + args.rounds):
                job.round(step)
            pr.disable()
            for key in ("cumulative", "tottime"):
                text.write(f"\n==== sorted by {key} ====\n")
                pstats.Stats(pr, stream=text).strip_dirs().sort_stats(key).print_stats(args.top)
        per_round = (time.perf_counter() - t0) / args.rounds
    head = (f"{'default' if args.default else 'bench'} world, {args.rounds} rounds after {args.warmup} warm-up, "
            f"{torch.get_num_threads()} thread(s): {per_round:.3f} s/round (profiled) "
            f"overrides {args.overrides}\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(head + text.getvalue())
    print(head + text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
