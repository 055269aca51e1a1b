"""Per-rank host memory of building student + critic + teacher, and of the export (issue 10).

A medium Qwen-Image transformer (default 12 layers, 8 heads x 64 = 512 wide, ~113M parameters,
saved in bf16 with the tiny text encoder / VAE as a diffusers pipeline folder) is distilled
with precision bf16 under ZeRO-3 on the CPU accelerator (gloo), frozen teacher partitioned too
(as at GPU scale). Two ways of building, each at 1 and 2 ranks (torchrun):

* old -- the construction flashctl had before issue 10 (reproduced here, nowhere else): the
  whole pipeline loaded in fp32 on every rank, `copy.deepcopy` of its transformer for teacher,
  student and critic, then `deepspeed.initialize` partitions them; export gathers the full
  model on every rank (`GatheredParameters(modifier_rank=None)`), rank 0 builds an fp32 model
  and writes it twice (pipeline + in-memory student.safetensors);
* new -- `flashctl.distill.worker.DistillJob`: every transformer built in bf16 inside
  `deepspeed.zero.Init`, each rank filling its partition from the safetensors files;
  `DistillJob.export` gathers one submodule at a time and rank 0 streams sharded safetensors.

Measured per rank: peak RSS (VmHWM) after construction; then the peak is reset
(/proc/self/clear_refs) and the export's peak above the RSS before it is taken; for the new
export also the largest submodule gathered at once (what rank 1 holds beyond its partition).

    .venv/bin/python bench/construction_memory.py [--layers 12] [--ranks 1,2] [--ways old,new]

Writes bench/results/construction_memory.json and prints a table (MiB). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


# ---------------------------------------------------------------------------------- pipeline


def make_pipeline(folder: Path, layers: int, heads: int, head_dim: int) -> dict:
    """Write the medium pipeline folder (transformer in bf16) once; returns its sizes."""
    import torch

    from flashctl.models.export import save_components
    from flashctl.models.tiny import build_tiny_pipeline
    from flashctl.shapes import corpus
    from flashctl.spec import TinyModelSpec

    third = head_dim // 8 * 2  # rope dims (frame, h, w) sum to head_dim, even
    rope = (head_dim - 2 * third, third, third)
    spec = TinyModelSpec(num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                         axes_dims_rope=rope, vae_base_dim=16)
    marker = folder / "bench-config.json"
    want = {"layers": layers, "heads": heads, "head_dim": head_dim}
    if marker.is_file() and json.loads(marker.read_text())["config"] == want:
        return json.loads(marker.read_text())
    comps = build_tiny_pipeline(spec, corpus(n=200, seed=0), seed=0)
    comps["transformer"] = comps["transformer"].to(torch.bfloat16)
    params = sum(p.numel() for p in comps["transformer"].parameters())
    save_components(comps, folder)
    info = {"config": want, "transformer_params": params, "transformer_bf16_bytes": 2 * params}
    marker.write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------ worker


def _spec(pipeline: Path, out: Path):
    from flashctl.spec import load_spec

    return load_spec(REPO / "experiments" / "tiny-cpu.yaml", [
        f"teachers.base.path={pipeline}", f"teachers.edit.path={pipeline}", "guidance.policy=single",
        "deepspeed.precision=bf16", "eval.enabled=false", "tracking.enabled=false", f"run.out_dir={out}",
        "run.name=bench", "distill.batch_size=1",
    ])


def _old_build(spec, info):
    """flashctl's construction before issue 10 (worker.py at 7799121, GPU path: teachers partitioned)."""
    import torch

    from flashctl.distill.dmd2 import Teacher
    from flashctl.distill.engine import ds_config, make_engine, make_frozen_engine
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.pipelines import resolve_model_path

    base_path = resolve_model_path(spec.teachers[spec.guidance.base].path)
    adapter = QwenImageAdapter.from_pretrained(base_path, device=info.device, dtype=torch.float32)
    frozen_cfg = ds_config(spec, spec.distill.lr_critic, info.world_size)
    model = adapter.transformer
    teacher = Teacher(make_frozen_engine(copy.deepcopy(model), frozen_cfg), 1.0)
    student = copy.deepcopy(model)
    critic = copy.deepcopy(model)
    for m in (student, critic):
        m.train().requires_grad_(True)
    config = dict(student.config)
    student = make_engine(student, ds_config(spec, spec.distill.lr_generator, info.world_size, export=True))
    critic = make_engine(critic, ds_config(spec, spec.distill.lr_critic, info.world_size))
    return adapter, teacher, student, critic, config


def _old_export(adapter, student, config, out: Path, rank: int) -> int:
    """flashctl's export before issue 10: full gather on every rank, fp32 model + bytes on rank 0."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save as safetensors_bytes

    from flashctl.distill.engine import barrier, full_state_dict

    state = full_state_dict(student)
    held = sum(t.numel() * t.element_size() for t in state.values())  # every rank, all at once
    if rank == 0:
        model = QwenImageTransformer2DModel.from_config(config).eval().requires_grad_(False)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        adapter.save_pipeline(out / "student-old", transformer=model)
        (out / "student-old.safetensors").write_bytes(
            safetensors_bytes({k: v.contiguous().float() for k, v in state.items()}))
    barrier()
    return held


def _model_state_bytes(engine) -> int:
    """This rank's parameter partition + fp32 master partition + optimizer state of an engine
    (torch AdamW creates its moments at the first step, so right after construction: none)."""
    import torch

    from flashctl.distill.engine import local_param_bytes

    total = local_param_bytes(engine)
    zero_opt = getattr(engine, "optimizer", None)
    total += sum(t.numel() * t.element_size() for t in getattr(zero_opt, "fp32_partitioned_groups_flat", []))
    inner = getattr(zero_opt, "optimizer", None)
    if inner is not None:
        for state in inner.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim())
    return total


def worker(args) -> None:
    from flashctl.distill.engine import init_distributed, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    from flashctl.distill.engine import barrier, local_param_bytes

    spec = _spec(args.pipeline, args.out)
    # what every rank pays before any weight (libraries, DeepSpeed's comm op): the baseline
    # subtracted to get the memory construction adds
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    from diffusers import QwenImageEditPipeline, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

    import flashctl.distill.worker  # noqa: F401
    import flashctl.models.adapter  # noqa: F401
    import flashctl.models.processor  # noqa: F401

    barrier()
    base = _proc_status()
    t0 = time.perf_counter()
    if args.way == "old":
        adapter, teacher, student, critic, config = _old_build(spec, info)
    else:
        from flashctl.distill.worker import DistillJob

        job = DistillJob(spec, args.out / f"run-{info.world_size}", info, partition_teachers=True)
        student, critic, teacher = job.student, job.critic, job.teachers[spec.guidance.base]
    barrier()
    built = _proc_status()
    res = {
        "rank": info.rank, "world_size": info.world_size, "way": args.way,
        "rss_before_build": base["VmRSS"], "peak_after_build": built["VmHWM"], "rss_after_build": built["VmRSS"],
        "build_s": time.perf_counter() - t0,
        "local_param_bytes": {n: local_param_bytes(e) for n, e in
                              (("student", student), ("critic", critic), ("teacher", teacher.model))},
        "model_state_bytes": sum(_model_state_bytes(e) for e in (student, critic, teacher.model)),
    }
    _reset_peak()
    before = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    if args.way == "old":
        res["export_max_gathered_bytes"] = _old_export(adapter, student, config, args.out, info.rank)
    else:
        job.export()
    barrier()
    res["export_s"] = time.perf_counter() - t0
    res["export_rss_before"] = before
    res["export_peak_above_before"] = _proc_status()["VmHWM"] - before
    if args.way == "new":  # the largest submodule gathered at once (held beyond the partition)
        from flashctl.models.weights import write_transformer

        sizes: list[int] = []
        write_transformer(job.student.module, None, torch.bfloat16, on_gathered=sizes.append)
        res["export_max_gathered_bytes"] = max(sizes)
    (args.out / f"{args.way}-w{info.world_size}-rank{info.rank}.json").write_text(json.dumps(res))
    barrier()


# ------------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--way", choices=["old", "new"], default="new", help=argparse.SUPPRESS)
    scratch = Path(tempfile.gettempdir()) / "flashctl-bench-construction"  # ~1 GB, outside the repo
    ap.add_argument("--pipeline", type=Path, default=scratch / "medium-pipeline")
    ap.add_argument("--out", type=Path, default=scratch / "out")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--ways", default="old,new")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    info = make_pipeline(args.pipeline, args.layers, args.heads, args.head_dim)
    model_mib = info["transformer_bf16_bytes"] / MIB
    print(f"medium transformer: {info['transformer_params'] / 1e6:.1f}M parameters, {model_mib:.0f} MiB in bf16",
          flush=True)
    from flashctl.launch import rank_env
    from flashctl.system import free_port

    rows = []
    for world in [int(w) for w in args.ranks.split(",")]:
        for way in args.ways.split(","):
            env = rank_env("cpu", base=dict(os.environ, OMP_NUM_THREADS="1"))
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker", f"--way={way}",
                   f"--pipeline={args.pipeline}", f"--out={args.out}"]
            log = args.out / f"{way}-w{world}.log"
            with open(log, "w") as fh:
                rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
            if rc != 0:
                sys.exit(f"{way} at {world} rank(s) failed (rc {rc}); see {log}")
            for r in range(world):
                rows.append(json.loads((args.out / f"{way}-w{world}-rank{r}.json").read_text()))
    result = {"model": info, "rows": rows}
    (REPO / "bench" / "results" / "construction_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'way':<4} {'W':>2} {'rank':>4} {'baseline':>9} {'peak':>6} {'peak-base':>10} {'new/old':>8} "
          f"{'bf16 params':>12} {'states':>7} {'export +':>9} {'max gathered':>13}  (MiB; model = {model_mib:.0f} MiB bf16)")
    old = {(r["world_size"], r["rank"]): r["peak_after_build"] - r["rss_before_build"] for r in rows if r["way"] == "old"}
    for r in rows:
        added = r["peak_after_build"] - r["rss_before_build"]
        ratio = added / old[(r["world_size"], r["rank"])] if (r["world_size"], r["rank"]) in old else float("nan")
        local = sum(r["local_param_bytes"].values()) / MIB
        gathered = r.get("export_max_gathered_bytes")
        print(f"{r['way']:<4} {r['world_size']:>2} {r['rank']:>4} {r['rss_before_build'] / MIB:>9.0f} "
              f"{r['peak_after_build'] / MIB:>6.0f} {added / MIB:>10.0f} {ratio:>8.2f} {local:>12.0f} {r['model_state_bytes'] / MIB:>7.0f} "
              f"{r['export_peak_above_before'] / MIB:>9.0f} {'-' if gathered is None else f'{gathered / MIB:.1f}':>13}")


if __name__ == "__main__":
    main()
