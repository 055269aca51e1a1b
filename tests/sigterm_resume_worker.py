"""Toy DeepSpeed ZeRO-3 worker for tests/test_engine.py (run under torchrun, CPU, gloo): proves that
a run stopped by SIGTERM and resumed from its checkpoint ends bit-for-bit where an uninterrupted one does.

Trains a small MLP to match a frozen, ZeRO-3-partitioned "teacher" MLP; resumes from the
latest complete checkpoint; stops cleanly on SIGTERM (rank 0 can send itself one with
--sigterm-at); at the end writes the live engine's gathered weights, the zero_to_fp32
consolidation of the final checkpoint, and per-rank stats as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashctl.distill import checkpoint as ck
from flashctl.distill import engine as eng
from flashctl.spec import ExperimentSpec


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=1000)
    ap.add_argument("--sigterm-at", type=int, default=0, help="rank 0 SIGTERMs itself after this step")
    args = ap.parse_args()

    info = eng.init_distributed("cpu")
    stop = ck.install_stop_handler()
    # threshold 0: the toy MLP's tensors are below DeepSpeed's default, and the test must see them partitioned
    spec = ExperimentSpec(distill={"batch_size": 4}, deepspeed={"zero_stage": 3, "param_persistence_threshold": 0},
                          launch={"device": "cpu"})
    # a linear warm-up over 4 of the 6 steps (DeepSpeed's WarmupLR): a resume at step 3 must carry it on
    config = eng.ds_config(spec, lr=1e-2, world_size=info.world_size, export=True, warmup_updates=4)

    torch.manual_seed(args.seed)  # same initial weights on every rank
    student = mlp()
    teacher = mlp()
    engine = eng.make_engine(student, config)
    teacher_engine = eng.make_frozen_engine(teacher, config)

    ckpt_dir = args.out / "ckpt"
    data_rng = torch.Generator().manual_seed(1000 * args.seed + info.rank)
    state = ck.load_checkpoint(ckpt_dir, {"student": engine})
    step = 0
    if state is not None:
        step = state["step"]
        data_rng.set_state(state["data_rng"])
        ck.restore_rng_state(state["rng"])
    start_step = step

    losses, times, lrs = [], [], []
    stopped = False
    while step < args.steps:
        t0 = time.perf_counter()
        x = torch.randn(4, 16, generator=data_rng)
        jitter = 0.1 * torch.randn(4, 16)  # global torch RNG: its state must survive a resume
        with torch.no_grad():
            target = teacher_engine(x)
        loss = F.mse_loss(engine(x + jitter), target)
        lrs.append(engine.get_lr()[0])  # the rate this step's update uses
        engine.backward(loss)
        engine.step()
        step += 1
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if info.rank == 0 and step == args.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        stopped = stop.should_stop()
        if stopped or step % args.checkpoint_every == 0 or step == args.steps:
            trainer_state = {"step": step, "data_rng": data_rng.get_state(), "rng": ck.capture_rng_state()}
            ck.save_checkpoint(ckpt_dir, ck.tag_for_step(step), {"student": engine}, trainer_state)
        if stopped:
            break

    weights = eng.full_state_dict(engine)  # collective: every rank
    if info.rank == 0 and not stopped:
        from safetensors.torch import save_file

        save_file(weights, str(args.out / "final_params.safetensors"))
        ck.export_fp32(ckpt_dir, "student", args.out / "consolidated")
    stats = {
        "rank": info.rank,
        "world_size": info.world_size,
        "start_step": start_step,
        "end_step": step,
        "stopped": stopped,
        "losses": losses,
        "lrs": lrs,
        "step_times": times,
        "local_param_bytes": eng.local_param_bytes(engine),
        "full_param_bytes": eng.full_param_bytes(engine),
        "teacher_local_param_bytes": eng.local_param_bytes(teacher_engine),
    }
    (args.out / f"stats_rank{info.rank}.json").write_text(json.dumps(stats))
    eng.barrier()


if __name__ == "__main__":
    main()
