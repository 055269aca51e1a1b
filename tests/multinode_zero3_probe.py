"""A tiny DeepSpeed ZeRO-3 worker for launcher tests (stands in for flashctl.distill.worker): probes
that a multi-node launch reaches every rank with its environment, its partition and the same weights.

    python multinode_zero3_probe.py --run-dir DIR [--steps N]

Trains a small MLP for a few steps with ZeRO-3 (gloo on the CPU accelerator, torch AdamW) and
writes DIR/result-rank{R}.json: rank, world size, node rank, losses, the number of parameter
elements this rank holds (its ZeRO-3 partition) and a checksum of the gathered weights, plus
the MLflow variables it saw (to check that the environment reached every node).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from flashctl.distill.engine import init_distributed

    init_distributed("cpu")  # gloo; DeepSpeed's shm op only if `make setup` built it
    import deepspeed
    import torch

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    total = sum(p.numel() for p in model.parameters())
    config = {
        "train_batch_size": 4 * world,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(4, 16, generator=gen)
    y = x[:, :1] * 0.5
    losses = []
    for _ in range(args.steps):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    local = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        checksum = float(sum(p.detach().double().sum() for p in engine.module.parameters()))
    result = {
        "rank": rank,
        "world_size": world,
        "node_rank": int(os.environ.get("CROSS_RANK", "-1")),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "losses": losses,
        "total_params": total,
        "local_params": local,
        "checksum": checksum,
        "env": {k: os.environ.get(k) for k in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI", "DS_ACCELERATOR")},
    }
    out = Path(args.run_dir) / f"result-rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
