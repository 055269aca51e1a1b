"""A tiny DeepSpeed ZeRO-3 worker for launcher tests (stands in for flashctl.distill.worker): probes
that a multi-node launch reaches every rank with its environment, its partition and the same weights.

    python multinode_zero3_probe.py --run-dir DIR [--steps N] [--teacher PIPELINE]

Trains a small MLP for a few steps with ZeRO-3 (gloo on the CPU accelerator, torch AdamW) and
writes DIR/result-rank{R}.json: rank, world size, node rank, losses, the number of parameter
elements this rank holds (its ZeRO-3 partition) and a checksum of the gathered weights, plus
the MLflow variables it saw (to check that the environment reached every node).

With --teacher, also builds that pipeline's transformer as a frozen ZeRO-3 teacher the way the
distill worker does, once partitioned over all ranks and once within each node
(`deepspeed.teacher_shard` world / node, `engine.node_group`), and records per way the elements
this rank holds, its partition group's size and one forward's output on fixed inputs (and the
node way once more with its weights filled by gathering, `load="gather"`).
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)


def _teacher_shards(path: str, world: int) -> dict:
    """Per `deepspeed.teacher_shard`: local/full parameter elements, group size, a forward's output."""
    import deepspeed
    import torch

    from flashctl.distill.engine import ds_config, frozen_config, make_frozen_engine, node_group
    from flashctl.models.weights import build_transformer, transformer_folder
    from flashctl.spec import ExperimentSpec

    spec = ExperimentSpec(deepspeed={"param_persistence_threshold": 0, "precision": "fp32"})
    cfg = frozen_config(ds_config(spec, 1e-4, world))
    config = json.loads((transformer_folder(path) / "config.json").read_text())
    gen = torch.Generator().manual_seed(7)  # the same inputs on every rank
    grid = 4  # 4x4 latent patches: img_shapes (1, 4, 4) of a 64x64 image
    inputs = {
        "hidden_states": torch.randn(1, grid * grid, config["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(1, 5, config["joint_attention_dim"], generator=gen),
        "timestep": torch.tensor([0.6]),
        "img_shapes": [[(1, grid, grid)]],
        "return_dict": False,
    }
    out = {}
    group = node_group()
    # "node_gather": the same node partition filled by the gather path (the group's rank 0 fills)
    for shard, pg, load in (("world", None, "auto"), ("node", group, "auto"), ("node_gather", group, "gather")):
        engine = make_frozen_engine(build_transformer(path, torch.float32, "cpu", zero_config=cfg, load=load,
                                                      process_group=pg), cfg)
        params = list(engine.module.parameters())
        with torch.no_grad():
            y = engine(**inputs)[0]
        out[shard] = {
            "local_numel": sum(p.ds_tensor.numel() for p in params),
            "full_numel": sum(p.ds_numel for p in params),
            "tensors": len(params),
            "group_size": deepspeed.comm.get_world_size(group=params[0].ds_process_group),
            "output": y.reshape(-1).tolist(),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--teacher", default=None)
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
    if args.teacher:
        result["teacher"] = _teacher_shards(args.teacher, world)
    out = Path(args.run_dir) / f"result-rank{rank}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
