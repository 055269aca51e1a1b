"""Builds one real DistillJob in a 1-rank process (CPU, gloo) for tests/test_edit_families.py and
tests/test_cached_conditioning.py.

    python family_job_worker.py --out DIR [--rounds N] [--end] SPEC [k=v ...]

Runs rounds 0..N-1 and writes DIR/result.json: the round metrics, which tasks the micro-steps
drew, the adapter's pipeline family and whether it holds a text encoder / VAE. With `--end` it
then runs the end of a run as `worker.run` does -- `job.export()` and `_evaluate` -- and records
what the adapter held and loaded after each (`has_encoders`, `encoder_loads`, devices).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--end", action="store_true")
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from flashctl.distill.engine import init_distributed, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    import torch

    from flashctl.distill.checkpoint import install_stop_handler
    from flashctl.distill.worker import DistillJob, _evaluate
    from flashctl.spec import load_spec
    from flashctl.track import NullTracker

    spec = load_spec(args.spec, args.overrides)
    torch.manual_seed(spec.distill.seed)
    job = DistillJob(spec, args.out, info)
    tasks: list[str] = []
    conditioning = job.conditioning

    def record(task):
        tasks.append(task)
        return conditioning(task)

    job.conditioning = record
    a = job.adapter
    result = {"rounds": [job.round(step) for step in range(args.rounds)], "tasks": tasks, "family": a.family,
              "cached": job.cache is not None, "has_encoders": a.has_encoders, "encoder_loads": a.encoder_loads}
    if args.end:
        out = job.export()
        result["export"] = {"has_encoders": a.has_encoders, "encoder_loads": a.encoder_loads,
                            "model_index": json.loads((out / "model_index.json").read_text())}
        metrics = _evaluate(job, NullTracker(), install_stop_handler())
        result["eval"] = {"metrics": metrics, "encoder_loads": a.encoder_loads,
                          "text_encoder_device": str(next(a.text_encoder.parameters()).device),
                          "vae_device": str(next(a.vae.parameters()).device), "device": str(job.device)}
    (args.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
