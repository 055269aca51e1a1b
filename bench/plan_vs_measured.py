"""`flashctl plan` vs what a ZeRO-3 rank really holds after one DMD2 round (issue 10, CPU proxy).

The medium Qwen-Image pipeline of `bench/construction_memory.py` (12 layers, 8 heads x 64,
114.4M transformer parameters, saved in bf16) is distilled with precision bf16 under ZeRO-3 on
the CPU accelerator (gloo), at 1 and 2 ranks (torchrun), teachers partitioned (as on CUDA):
`flashctl.distill.worker.DistillJob` builds student, critic and the base teacher, then runs ONE
real DMD2 round (`DistillJob.round`: 1 critic update + 1 generator update, each a backward and an
optimizer step, so the fp32 master partitions and the Adam moments exist). Each rank then sums
`numel * element_size` of the tensors it owns:

* params -- its ZeRO-3 partition of every parameter (`ds_tensor`);
* grads -- the engine's gradient partition buffer (`grad_partitions_flat_buffer`);
* optim -- fp32 master partitions (`fp32_partitioned_groups_flat`) + AdamW moments (`state`);
* reduce bucket -- the contiguous-gradients bucket stage 3 allocates per engine
  (`ipg_buckets[*].buffer`, `reduce_bucket_size` elements; on CPU only its touched pages count
  in RSS, on a GPU the whole buffer is allocated);
* teacher, text encoder + VAE -- parameter bytes this rank holds;
* RSS after the round and peak RSS during it, minus the RSS before any weight (libraries loaded).

and compares with `flashctl.plan.plan` for the same spec (`launch.nproc_per_node` = ranks,
`teacher_placement="partitioned"`).

    .venv/bin/python bench/plan_vs_measured.py [--ranks 1,2]

Writes bench/results/plan_vs_measured.json and prints the table (MiB per rank); the text result
is kept in bench/results/plan_vs_measured.txt. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.construction_memory import _proc_status, _reset_peak, make_pipeline  # noqa: E402

MIB = 1024 * 1024


def _overrides(pipeline: Path, data: Path, out: Path, world: int) -> list[str]:
    return [
        f"teachers.base.path={pipeline}", f"teachers.edit.path={pipeline}", "guidance.policy=single",
        "mixture.t2i=1", "mixture.edit=0", "data.aspects={square: 1.0}", f"data.root={data}",
        "deepspeed.zero_stage=3", "deepspeed.precision=bf16", "launch.device=cpu", f"launch.nproc_per_node={world}",
        "launch.nnodes=1", "distill.batch_size=1", "distill.critic_updates=1", "distill.grad_accum=1",
        "eval.enabled=false", "tracking.enabled=false", f"run.out_dir={out}", "run.name=plan-vs-measured",
    ]


def _spec(args, world: int):
    from flashctl.spec import load_spec

    return load_spec(REPO / "experiments" / "tiny-cpu.yaml", _overrides(args.pipeline, args.data, args.out, world))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def engine_bytes(engine) -> dict[str, int]:
    """What this rank owns of one engine: parameter partition, gradient partition, fp32 master +
    Adam moments, and the reduce bucket (see the module docstring)."""
    import torch

    from flashctl.distill.engine import local_param_bytes

    opt = getattr(engine, "optimizer", None)
    out = {"params": local_param_bytes(engine), "grads": 0, "master": 0, "adam": 0, "bucket": 0}
    if opt is None:
        return out
    buf = getattr(opt, "grad_partitions_flat_buffer", None)
    out["grads"] = _nbytes([buf]) if torch.is_tensor(buf) else 0
    out["master"] = _nbytes(getattr(opt, "fp32_partitioned_groups_flat", []))
    inner = getattr(opt, "optimizer", None)
    if inner is not None and hasattr(inner, "state"):
        out["adam"] = sum(_nbytes([v for v in s.values() if torch.is_tensor(v) and v.dim()]) for s in inner.state.values())
    out["bucket"] = _nbytes([b.buffer for b in getattr(opt, "ipg_buckets", {}).values()
                             if torch.is_tensor(getattr(b, "buffer", None))])
    # the 16-bit flat partition groups must alias the parameters' ds_tensors (else a second copy)
    flat = getattr(opt, "fp16_partitioned_groups_flat", [])
    ptrs = {t.untyped_storage().data_ptr() for t in flat if torch.is_tensor(t)}
    out["flat16_aliases_params"] = all(p.ds_tensor.untyped_storage().data_ptr() in ptrs
                                       for p in engine.module.parameters() if hasattr(p, "ds_tensor"))
    return out


def worker(args) -> None:
    from flashctl.distill.engine import barrier, init_distributed, local_param_bytes, quiet_collective_warnings

    info = init_distributed("cpu")
    quiet_collective_warnings()
    import warnings

    warnings.filterwarnings("ignore")
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401
    from diffusers import QwenImageEditPipeline, QwenImagePipeline, QwenImageTransformer2DModel  # noqa: F401
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: F401

    import flashctl.distill.dmd2  # noqa: F401
    import flashctl.models.adapter  # noqa: F401
    import flashctl.models.processor  # noqa: F401
    from flashctl.distill.worker import DistillJob

    spec = _spec(args, info.world_size)
    barrier()
    base = _proc_status()
    job = DistillJob(spec, args.out / f"run-{info.world_size}", info, partition_teachers=True)
    barrier()
    built = _proc_status()
    _reset_peak()
    t0 = time.perf_counter()
    losses = job.round(0)
    barrier()
    round_s = time.perf_counter() - t0
    after = _proc_status()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what of the RSS is only glibc keeping freed memory
    trimmed = _proc_status()["VmRSS"]
    adapter = job.adapter
    res = {
        "rank": info.rank, "world_size": info.world_size, "round_s": round_s,
        "losses": {k: losses[k] for k in ("train/loss_generator", "train/loss_critic")},
        "rss_baseline": base["VmRSS"], "peak_build": built["VmHWM"], "rss_after_build": built["VmRSS"],
        "rss_after_round": after["VmRSS"], "peak_round": after["VmHWM"], "rss_after_trim": trimmed,
        "student": engine_bytes(job.student), "critic": engine_bytes(job.critic),
        "teachers": {n: local_param_bytes(t.model) for n, t in job.teachers.items()},
        "text_encoder": local_param_bytes(adapter.text_encoder) if adapter.text_encoder is not None else 0,
        "vae": local_param_bytes(adapter.vae) if adapter.vae is not None else 0,
    }
    (args.out / f"w{info.world_size}-rank{info.rank}.json").write_text(json.dumps(res))
    barrier()


# ------------------------------------------------------------------------------------ driver


def _prepare_data(root: Path) -> Path:
    """8 T2I shapes rows, square 64 px (the data only has to feed one round)."""
    from flashctl.data.prepare import prepare_data
    from flashctl.spec import DataSpec

    data = DataSpec(root=root, n=8, seed=0, edit_fraction=0.0, aspects={"square": 1.0},
                    sizes={"square": (64, 64)}, rows_per_shard=8)
    if not (root / "manifest.json").is_file():
        prepare_data(data, data.root, progress=False)
    return data.root


def plan_rows(args, world: int) -> dict[str, float]:
    """`flashctl.plan.plan` of the bench spec at `world` ranks, in MiB per rank."""
    from flashctl.plan import GB, plan

    r = plan(_spec(args, world), teacher_placement="partitioned")
    mib = GB / MIB
    by = {c.name: c for c in r.components}
    out = {}
    for name in ("student", "critic"):
        c = by[name]
        out[f"{name} params"], out[f"{name} grads"], out[f"{name} optim"] = (
            c.params_gb * mib, c.grads_gb * mib, c.optim_gb * mib)
    out["teachers"] = sum(c.params_gb for c in r.components if c.role == "teacher") * mib
    out["text enc + vae"] = sum(c.params_gb for c in r.components if c.role in ("text_encoder", "vae")) * mib
    out["gathered + reduce buckets"] = sum(c.working_gb for c in r.components) * mib
    out["held (RSS after round)"] = sum(c.total_gb for c in r.components) * mib
    out["optimizer step transient"] = max(c.step_gb for c in r.components) * mib
    out["activations"] = r.activations.full_gb * mib
    out["peak (RSS during round)"] = (r.model_states_gb + r.activations.full_gb) * mib
    return out


def measured_rows(res: dict) -> dict[str, float]:
    out = {}
    for name in ("student", "critic"):
        e = res[name]
        out[f"{name} params"], out[f"{name} grads"] = e["params"] / MIB, e["grads"] / MIB
        out[f"{name} optim"] = (e["master"] + e["adam"]) / MIB
    out["teachers"] = sum(res["teachers"].values()) / MIB
    out["text enc + vae"] = (res["text_encoder"] + res["vae"]) / MIB
    out["owned tensors (rows above)"] = sum(out.values())
    out["reduce buckets (allocated)"] = (res["student"]["bucket"] + res["critic"]["bucket"]) / MIB
    out["held (RSS after round)"] = (res["rss_after_round"] - res["rss_baseline"]) / MIB
    out["  after malloc_trim"] = (res["rss_after_trim"] - res["rss_baseline"]) / MIB
    out["optimizer step transient"] = (res["peak_round"] - res["rss_after_round"]) / MIB
    out["peak (RSS during round)"] = (res["peak_round"] - res["rss_baseline"]) / MIB
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    scratch = Path(tempfile.gettempdir()) / "flashctl-bench-construction"  # shared with construction_memory
    ap.add_argument("--pipeline", type=Path, default=scratch / "medium-pipeline")
    ap.add_argument("--data", type=Path, default=scratch / "data-t2i-64")
    ap.add_argument("--out", type=Path, default=scratch / "plan-vs-measured")
    ap.add_argument("--ranks", default="1,2")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    info = make_pipeline(args.pipeline, 12, 8, 64)
    _prepare_data(args.data)
    from flashctl.system import free_port

    results = {"model": info, "runs": {}}
    for world in [int(w) for w in args.ranks.split(",")]:
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker",
               f"--pipeline={args.pipeline}", f"--data={args.data}", f"--out={args.out}"]
        log = args.out / f"w{world}.log"
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO).returncode
        if rc != 0:
            sys.exit(f"{world} rank(s) failed (rc {rc}); see {log}")
        ranks = [json.loads((args.out / f"w{world}-rank{r}.json").read_text()) for r in range(world)]
        results["runs"][world] = {"plan": plan_rows(args, world), "ranks": ranks}
    (REPO / "bench" / "results" / "plan_vs_measured.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"medium transformer: {info['transformer_params'] / 1e6:.1f}M parameters; bf16, ZeRO-3, teachers "
          "partitioned, after 1 DMD2 round (1 critic + 1 generator step); MiB per rank")
    for world, run in results["runs"].items():
        plan_, meas = run["plan"], [measured_rows(r) for r in run["ranks"]]
        print(f"\nworld {world}")
        head = f"{'component':<26} {'plan':>9} " + " ".join(f"{'rank ' + str(r):>9}" for r in range(len(meas)))
        print(head + f" {'ratio':>6}   (ratio = plan / rank 0)")
        keys = [*list(meas[0])[:8], "gathered + reduce buckets", *list(meas[0])[8:-2], "activations",
                *list(meas[0])[-2:]]
        for k in keys:
            p = plan_.get(k)
            m0 = meas[0].get(k)
            ratio = f"{p / m0:6.2f}" if p is not None and m0 else f"{'-':>6}"
            print(f"{k:<26} {'-' if p is None else f'{p:.1f}':>9} "
                  + " ".join(f"{'-' if m.get(k) is None else f'{m[k]:.1f}':>9}" for m in meas) + f" {ratio}")
        r0 = run["ranks"][0]
        print(f"(round {r0['round_s']:.1f} s; losses {r0['losses']}; 16-bit flat groups alias the parameter "
              f"partitions: {r0['student'].get('flat16_aliases_params')})")


if __name__ == "__main__":
    main()
