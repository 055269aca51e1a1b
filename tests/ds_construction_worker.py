"""Builds a real DistillJob under torchrun (CPU, gloo) for tests/test_construction.py.

    python -m torch.distributed.run --nproc_per_node 2 ds_construction_worker.py --out DIR SPEC [k=v ...]

Student, critic and the frozen teachers are built partitioned (ZeRO-3 engines, teachers too);
writes DIR/construction_rank{R}.json with, per engine, the parameter elements this rank holds vs
the full count, whether every parameter is partitioned, and whether the gathered weights equal
the tensors in the base teacher's safetensors files exactly; the same for a transformer filled
by the gather path (rank 0 fills each tensor) instead of the per-rank slice path. Then exports
the (untrained) student with small shards to DIR/run/student.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _partition_stats(module) -> dict:
    params = list(module.parameters())
    return {
        "all_partitioned": all(getattr(p, "ds_tensor", None) is not None for p in params),
        "local_numel": sum(p.ds_tensor.numel() for p in params),
        "full_numel": sum(p.ds_numel for p in params),
        "largest_param": max(p.ds_numel for p in params),
        "none_persisted": not any(getattr(p, "ds_persist", False) for p in params),
    }


def _equal_to_files(module, files: dict, dtype) -> bool:
    """Gathered weights (a collective) == the files' tensors cast to the training dtype, exactly."""
    import torch
    from safetensors import safe_open

    from flashctl.distill.engine import full_state_dict

    state = full_state_dict(module)
    for name, t in state.items():
        with safe_open(str(files[name]), "pt") as f:
            if t.dtype != dtype or not torch.equal(f.get_tensor(name).to(dtype), t):
                return False
    return state.keys() == files.keys()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from flashctl.distill.engine import init_distributed, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    from flashctl.distill.engine import barrier, ds_config, frozen_config
    from flashctl.distill.worker import DistillJob
    from flashctl.models.weights import build_transformer, transformer_folder, weight_map
    from flashctl.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    job = DistillJob(spec, args.out / "run", info, partition_teachers=True)
    base = job.teacher_paths[spec.guidance.base]
    files = weight_map(transformer_folder(base))
    engines = {"student": job.student.module, "critic": job.critic.module}
    engines.update({f"teacher:{n}": t.model.module for n, t in job.teachers.items()})
    result = {"rank": info.rank, "world_size": info.world_size, "adapter_transformer": job.adapter.transformer is not None}
    for name, module in engines.items():
        result[name] = {**_partition_stats(module), "equal_to_files": _equal_to_files(module, files, job.dtype)}
    cfg = frozen_config(ds_config(spec, 1e-4, info.world_size))
    gathered = build_transformer(base, job.dtype, "cpu", zero_config=cfg, load="gather")
    result["gather_mode"] = {**_partition_stats(gathered), "equal_to_files": _equal_to_files(gathered, files, job.dtype)}
    job.export(max_shard_bytes=64 * 1024)
    # then one DMD2 round on the partitioned engines, with activation checkpointing when the spec asks
    result["gradient_checkpointing"] = [bool(m.gradient_checkpointing) for m in (job.student.module, job.critic.module)]
    result["round"] = job.round(1)
    (args.out / f"construction_rank{info.rank}.json").write_text(json.dumps(result))
    barrier()


if __name__ == "__main__":
    main()
