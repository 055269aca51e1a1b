"""Builds a real DistillJob twice in one 1-rank process (CPU, gloo) for tests/test_cached_conditioning.py.

    python cached_conditioning_worker.py --out DIR --rounds N SPEC [k=v ...]

Once on the dataset prepared without a cache (`--plain ROOT`, encoding on the fly) and once on
the one prepared with `--cache-embeddings` (`--cached ROOT`), same spec and seed; runs rounds
0..N-1 of each and writes DIR/result.json: per mode the round metrics, which tasks the
micro-steps drew, and whether the adapter holds a text encoder / VAE (after the rounds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plain", required=True)
    ap.add_argument("--cached", required=True)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from flashctl.distill.engine import init_distributed, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    import torch

    from flashctl.distill.worker import DistillJob
    from flashctl.spec import load_spec

    result = {}
    for mode, root in (("plain", args.plain), ("cached", args.cached)):
        spec = load_spec(args.spec, [*args.overrides, f"data.root={root}"])
        torch.manual_seed(spec.distill.seed)
        job = DistillJob(spec, args.out / mode, info)
        tasks: list[str] = []
        conditioning = job.conditioning

        def record(task, _c=conditioning, _t=tasks):
            _t.append(task)
            return _c(task)

        job.conditioning = record
        rounds = [job.round(step) for step in range(args.rounds)]
        result[mode] = {
            "rounds": rounds,
            "tasks": tasks,
            "cached": job.cache is not None,
            "text_encoder": job.adapter.text_encoder is not None,
            "vae": job.adapter.vae is not None,
        }
        del job
    (args.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
