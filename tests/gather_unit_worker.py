"""Per-block vs per-sub-module ZeRO-3 gathers on real CPU ranks, for tests/test_gather_unit.py.

    python -m torch.distributed.run --nproc_per_node 2 gather_unit_worker.py --out DIR --teacher PATH

For each gather unit (`deepspeed.gather`: submodule, block) and activation checkpointing (off,
on): the teacher's transformer built partitioned (every tensor: threshold 0), one training
engine (`make_engine`), two AdamW steps on a fixed rank-specific batch. Writes
DIR/gather_rank{R}.json with, per variant, the two losses and gradient norms, the gathered
weights' sum and sum of squares after training, the parameter all-gathers of those steps
(DeepSpeed's comms logger), how many parameters are still gathered afterwards and how many
blocks were made gather units.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--teacher", required=True)
    args = ap.parse_args()

    from flashctl.distill.engine import init_distributed, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    import deepspeed.comm as ds_comm
    import torch
    from deepspeed.comm.comm import comms_logger
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import get_z3_leaf_modules

    from flashctl.distill.engine import ds_config, full_state_dict, make_engine
    from flashctl.models.weights import build_transformer
    from flashctl.spec import ExperimentSpec

    ds_comm.configure(enabled=True, prof_all=True, verbose=False, debug=False)

    def gathers() -> int:
        return sum(rec[0] for op, sizes in comms_logger.comms_dict.items()
                   if op in ("all_gather_into_tensor", "all_gather") for rec in sizes.values())

    result: dict = {"rank": info.rank, "world_size": info.world_size}
    for gather in ("submodule", "block"):
        for checkpointing in (False, True):
            spec = ExperimentSpec(distill={"batch_size": 2},
                                  deepspeed={"param_persistence_threshold": 0, "gather": gather})
            cfg = ds_config(spec, 1e-3, info.world_size)
            model = build_transformer(args.teacher, torch.float32, "cpu", zero_config=cfg).train().requires_grad_(True)
            if checkpointing:
                model.enable_gradient_checkpointing()
            engine = make_engine(model, cfg, blocks=gather == "block")
            c = model.config
            g = torch.Generator().manual_seed(100 + info.rank)
            h = w = 4
            x = torch.randn(2, h * w, c.in_channels, generator=g)
            text = torch.randn(2, 5, c.joint_attention_dim, generator=g)
            target = torch.randn(2, h * w, c.patch_size**2 * c.out_channels, generator=g)
            losses, norms = [], []
            before = gathers()
            for _ in range(2):
                out = engine(hidden_states=x, encoder_hidden_states=text,
                             encoder_hidden_states_mask=torch.ones(2, 5, dtype=torch.long),
                             timestep=torch.tensor([0.3, 0.7]), img_shapes=[[(1, h, w)]] * 2, return_dict=False)[0]
                loss = (out - target).pow(2).mean()
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                norms.append(float(engine.get_global_grad_norm()))
            n_gathers = gathers() - before
            still = sum(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in model.parameters())
            state = full_state_dict(engine)
            result[f"{gather}/{'ckpt' if checkpointing else 'plain'}"] = {
                "losses": losses, "grad_norms": norms, "gathers": n_gathers, "still_gathered": still,
                "weight_sum": sum(float(t.double().sum()) for t in state.values()),
                "weight_sq": sum(float(t.double().pow(2).sum()) for t in state.values()),
                "blocks": len(get_z3_leaf_modules(model)), "num_layers": c.num_layers,
            }
            engine.destroy()
    (args.out / f"gather_rank{info.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
