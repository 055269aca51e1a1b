"""Commands that run data-parallel on this machine's ranks, started by torchrun like `distill`:

    python -m flashctl.launch.ranks evaluate SPEC_FILE MODEL --nfe N --cfg C --out OUT [--track]
    python -m flashctl.launch.ranks prepare-data SPEC_FILE --out OUT [--workers W] [--strict] [--overwrite]

`flashctl evaluate --nproc N` and `flashctl prepare-data --cache-embeddings --nproc N` start
them (`launch.local.run_ranks`: `launch.device`, gloo on CPU, NCCL on CUDA) with the resolved
spec written to SPEC_FILE, and report from what rank 0 wrote (results.json, the manifest).
Each rank does its share and rank 0 writes the outputs (`evaluate.evaluate_one`,
`data.conditioning.write_conditioning`); the outputs are those of one process.

Only torch.distributed, no DeepSpeed: nothing here is partitioned, each rank holds its own copy
of the (inference) models.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

WAIT_HOURS = 12
"""Collective timeout: ranks legitimately wait on rank 0 for long (it builds every shard before
the others encode theirs), longer than gloo's and NCCL's defaults (30 / 10 minutes)."""


ERROR_FILE = "error.txt"
"""Written beside SPEC_FILE by the first rank that fails with a user error: its one line."""


def join(device: str) -> tuple[int, int, str]:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA): (rank, world, torch device)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(hours=WAIT_HOURS))
    if dist.get_rank() != 0:  # progress on rank 0 only, the libraries' loading bars included
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if device == "cuda" else "cpu"


def evaluate(args: argparse.Namespace) -> None:
    """One rank of `flashctl evaluate --nproc N`."""
    import torch.distributed as dist

    from flashctl.evaluate import evaluate_one
    from flashctl.spec import load_spec
    from flashctl.term import human_console

    spec = load_spec(args.spec)
    rank, world, device = join(spec.launch.device)
    evaluate_one(spec, args.model, args.nfe, args.cfg, args.out, args.track, human_console(stderr=True),
                 rank=rank, world=world, device=device, barrier=dist.barrier)


def prepare_data(args: argparse.Namespace) -> None:
    """One rank of `flashctl prepare-data --cache-embeddings --nproc N`: rank 0 builds the
    shards, every rank encodes its share of the sidecars, rank 0 publishes the dataset."""
    from flashctl.data.conditioning import ConditioningEncoder, follow_conditioning
    from flashctl.data.prepare import prepare_data as prepare
    from flashctl.evaluate import _all_gather
    from flashctl.spec import load_spec

    spec = load_spec(args.spec)
    rank, world, device = join(spec.launch.device)
    encoder = ConditioningEncoder.from_spec(spec, device, rank=rank, world=world, gather=_all_gather)
    if rank == 0:
        prepare(spec.data, args.out, workers=args.workers, strict=args.strict, overwrite=args.overwrite,
                conditioning=encoder)
    else:
        follow_conditioning(encoder)


def main(argv: list[str] | None = None) -> int:
    from flashctl.errors import UserError
    from flashctl.spec import SpecError

    parser = argparse.ArgumentParser(prog="python -m flashctl.launch.ranks")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate")
    ev.add_argument("spec", type=Path)
    ev.add_argument("model")
    ev.add_argument("--nfe", type=int, required=True)
    ev.add_argument("--cfg", type=float, required=True)
    ev.add_argument("--out", type=Path, required=True)
    ev.add_argument("--track", action="store_true")
    pd = sub.add_parser("prepare-data")
    pd.add_argument("spec", type=Path)
    pd.add_argument("--out", type=Path, required=True)
    pd.add_argument("--workers", type=int, default=1)
    pd.add_argument("--strict", action="store_true")
    pd.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        (evaluate if args.command == "evaluate" else prepare_data)(args)
    except (UserError, SpecError) as exc:
        print(f"flashctl: error (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr, flush=True)
        try:  # the launching command reports it as its own one line (the first rank's to fail)
            with open(args.spec.with_name(ERROR_FILE), "x") as fh:
                fh.write(str(exc))
        except OSError:
            pass
        return 2
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
