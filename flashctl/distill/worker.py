"""The distillation worker: one process per rank, started by torchrun / the deepspeed launcher.

    python -m flashctl.distill.worker --run-dir RUN_DIR

RUN_DIR holds `spec.resolved.yaml` (written by `flashctl distill`). The worker builds the
student and critic DeepSpeed engines (ZeRO stage from the spec), loads the frozen teachers, and
runs DMD2 (`dmd2.py`) with K critic updates per generator update. It checkpoints every
`distill.checkpoint_every` generator steps (DeepSpeed layout + atomic `latest`), resumes from
the latest checkpoint, stops cleanly on SIGTERM / SIGUSR1 after writing a checkpoint, exports
the student as a diffusers pipeline folder, and (rank 0) evaluates student vs teacher.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

EXIT_STOPPED = 75
"""Exit code after a stop signal: a checkpoint was written, re-running resumes."""


def _load_transformer(path: str, dtype):  # noqa: D103
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)


class DistillJob:
    """DMD2 distillation of one spec on this rank."""

    def __init__(self, spec, run_dir: Path, info):
        import torch

        import flashctl.models.processor  # noqa: F401  (diffusers' loader finds the processor class)
        from flashctl.distill.dmd2 import Teacher
        from flashctl.distill.engine import ds_config, freeze, make_engine, make_frozen_engine
        from flashctl.distill.schedules import student_sigmas
        from flashctl.models.adapter import QwenImageAdapter
        from flashctl.models.paths import resolve_model_path

        self.spec, self.run_dir, self.info = spec, run_dir, info
        self.rank, self.world = info.rank, info.world_size
        self.device = info.device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.deepspeed.precision]
        g = spec.guidance
        base_path = resolve_model_path(spec.teachers[g.base].path)
        self.adapter = QwenImageAdapter.from_pretrained(base_path, device=self.device,
                                                        edit_max_pixels=spec.model.edit_max_pixels)
        needed = {g.base} | (set(g.specialised.values()) if g.policy != "single" else set())
        if spec.model.init_from in spec.teachers:
            needed.add(spec.model.init_from)
        partition_teachers = spec.launch.device == "cuda" and spec.deepspeed.zero_stage == 3
        frozen_cfg = ds_config(spec, spec.distill.lr_critic, self.world)
        self.teachers: dict[str, Teacher] = {}
        raw: dict[str, Any] = {}
        for name in sorted(needed):
            t = spec.teachers[name]
            model = self.adapter.transformer if name == g.base else _load_transformer(resolve_model_path(t.path), torch.float32)
            raw[name] = model
            frozen = make_frozen_engine(copy.deepcopy(model), frozen_cfg) if partition_teachers else freeze(model.to(self.device))
            self.teachers[name] = Teacher(frozen, t.cfg_scale, t.cfg_rescale)
        if spec.model.init_from in raw:
            student = copy.deepcopy(raw[spec.model.init_from])
        else:
            student = _load_transformer(resolve_model_path(spec.model.init_from), torch.float32)
        critic = copy.deepcopy(raw[g.base])
        for m in (student, critic):
            m.train().requires_grad_(True)
        self.student_config = dict(student.config)
        self.student = make_engine(student, ds_config(spec, spec.distill.lr_generator, self.world, export=True))
        self.critic = make_engine(critic, ds_config(spec, spec.distill.lr_critic, self.world))
        self.sigmas = student_sigmas(spec.distill.student_steps, spec.distill.shift).to(self.device)
        self.ckpt_dir = run_dir / "checkpoints"
        self._loaders: dict[str, Any] = {}
        self._encoded: dict[str, Any] = {}

    # ---------------------------------------------------------------------------- data
    def loader(self, task: str):
        from flashctl.data.loader import ShardLoader

        if task not in self._loaders:
            d = self.spec.data
            loader = ShardLoader(d.root, batch_size=self.spec.distill.batch_size, task=task,
                                 categories=dict(d.categories), aspects=dict(d.aspects), rank=self.rank,
                                 world_size=self.world, seed=self.spec.distill.seed, verify=False)
            self._loaders[task] = (loader, loader.batches())
        return self._loaders[task]

    def conditioning(self, task: str):
        """Next batch of `task` as a Conditioning (prompt embeddings, CFG negatives, edit source)."""

        from flashctl.distill.dmd2 import Conditioning
        from flashctl.models.cache import batch_images

        _, it = self.loader(task)
        batch = next(it)
        h, w = batch["height"], batch["width"]
        sources = batch_images(batch, "source_images") if task == "edit" else None
        embeds, mask = self.adapter.encode_prompts(batch["prompts"], sources)
        neg, neg_mask = self.adapter.encode_prompts([""] * len(batch["prompts"]), sources)
        src = src_size = None
        if sources is not None:
            src, src_size = self.adapter.encode_sources(sources)
        f = self.adapter.vae_scale_factor * 2
        seq, ch = (h // f) * (w // f), 4 * self.adapter.z_dim
        adapter = self.adapter

        def velocity(model, x_t, sigma, e, m, hh, ww, s):
            # the adapter runs each model in its own dtype (bf16 engines, fp32 teacher replicas)
            return adapter.velocity(model, x_t, sigma, e, m, hh, ww, s, src_size).float()

        return Conditioning(task=task, embeds=embeds, mask=mask, neg_embeds=neg, neg_mask=neg_mask,
                            height=h, width=w, source_latents=src, latent_shape=(seq, ch), velocity_fn=velocity)

    # ---------------------------------------------------------------------------- training
    def teacher_for(self, task: str, student_step: int):
        from flashctl.distill.guidance import teacher_for

        name = teacher_for(self.spec.guidance, task, student_step, float(self.sigmas[student_step]))
        return name, self.teachers[name]

    def round(self, step: int) -> dict[str, float]:
        """K critic updates then one generator update; returns metrics of this round."""
        import torch

        from flashctl.distill import dmd2
        from flashctl.distill.mixture import task_for_step
        from flashctl.distill.schedules import sample_student_step

        d = self.spec.distill
        p_edit = self.spec.mixture.edit_probability
        S = d.student_steps
        critic_losses = []
        updates = 1 if d.objective == "dmd" else d.critic_updates  # DMD: no two-time-scale rule
        for micro in range(updates + 1):
            shared = dmd2.step_generator(d.seed, step, micro)  # same on every rank
            local = dmd2.step_generator(d.seed + 7919 * (self.rank + 1), step, micro)
            task = task_for_step(step, micro, d.seed, p_edit)
            k = sample_student_step(shared, S)
            cond = self.conditioning(task)
            noise = torch.randn((cond.batch, *cond.latent_shape), generator=local).to(self.device)
            if micro < updates:
                x = dmd2.simulate_student(self.student, cond, self.sigmas, k, noise, with_grad=False)
                loss = dmd2.critic_loss(self.critic, cond, x, local)
                self.critic.backward(loss)
                self.critic.step()
                critic_losses.append(loss.item())
            else:
                name, teacher = self.teacher_for(task, k)
                x = dmd2.simulate_student(self.student, cond, self.sigmas, k, noise, with_grad=True)
                gen_loss, stats = dmd2.generator_loss(x, cond, self.critic, teacher, local, d.tau_min, d.tau_max,
                                                      objective=d.objective, tau_generator=shared)
                self.student.backward(gen_loss)
                self.student.step()
        metrics = {
            "train/loss_generator": gen_loss.item(),
            "train/loss_critic": sum(critic_losses) / len(critic_losses),
            "train/grad_norm_generator": _norm(self.student),
            "train/grad_norm_critic": _norm(self.critic),
            "train/lr_generator": self.student.get_lr()[0],
            "train/lr_critic": self.critic.get_lr()[0],
            "train/dm_grad_norm": stats["dm_grad_norm"],
            "train/fake_real_gap": stats["fake_real_gap"],
            "train/student_step": float(k),
            "train/task_edit": float(task == "edit"),
            "train/teacher_specialised": float(name != self.spec.guidance.base),
        }
        return metrics

    def state(self, step: int) -> dict[str, Any]:
        from flashctl.distill.checkpoint import capture_rng_state

        return {"step": step, "rng": capture_rng_state(),
                "loaders": {t: l.state_dict() for t, (l, _) in self._loaders.items()}}

    def restore(self, state: dict[str, Any]) -> int:
        from flashctl.distill.checkpoint import restore_rng_state

        restore_rng_state(state["rng"])
        for task, ls in state.get("loaders", {}).items():
            loader, _ = self.loader(task)
            loader.load_state_dict(ls)
            self._loaders[task] = (loader, loader.batches())
        return int(state["step"])

    def save(self, step: int) -> None:
        from flashctl.distill.checkpoint import prune_checkpoints, save_checkpoint, tag_for_step

        save_checkpoint(self.ckpt_dir, tag_for_step(step), {"student": self.student, "critic": self.critic},
                        self.state(step))
        if self.rank == 0:
            prune_checkpoints(self.ckpt_dir, keep=2)

    def export(self):
        """Gather the student (all ranks) and, on rank 0, write the pipeline folder + safetensors."""
        from safetensors.torch import save as safetensors_bytes

        from flashctl.distill.engine import barrier, full_state_dict
        from flashctl.io import atomic_write_bytes

        state = full_state_dict(self.student)
        if self.rank != 0:
            barrier()
            return None
        from diffusers import QwenImageTransformer2DModel

        model = QwenImageTransformer2DModel.from_config(self.student_config).eval().requires_grad_(False)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        out = self.run_dir / "student"
        self.adapter.scheduler = _student_scheduler(self.adapter.scheduler, self.spec.distill.shift)
        self.adapter.save_pipeline(out, transformer=model)
        atomic_write_bytes(self.run_dir / "student.safetensors",
                           safetensors_bytes({k: v.contiguous().float() for k, v in state.items()}))
        barrier()
        return model


def _student_scheduler(scheduler, shift: float):
    """The teacher's scheduler set to the student's static shift (its training grid)."""
    return type(scheduler).from_config({**scheduler.config, "use_dynamic_shifting": False, "shift": shift})


def _norm(engine) -> float:
    v = engine.get_global_grad_norm()
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def run(run_dir: Path) -> int:
    import torch

    from flashctl.distill.checkpoint import install_stop_handler, load_checkpoint
    from flashctl.distill.engine import init_distributed, quiet_collective_warnings
    from flashctl.io import atomic_write_json
    from flashctl.spec import load_spec, spec_hash
    from flashctl.track import NullTracker, make_tracker

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    spec = load_spec(run_dir / "spec.resolved.yaml")
    info = init_distributed(spec.launch.device)
    quiet_collective_warnings()
    torch.manual_seed(spec.distill.seed)
    stop = install_stop_handler()
    job = DistillJob(spec, run_dir, info)
    state = load_checkpoint(job.ckpt_dir, {"student": job.student, "critic": job.critic})
    start = job.restore(state) if state else 0
    tags = {"spec_hash": spec_hash(spec)}
    if not os.environ.get("MLFLOW_RUN_ID"):  # an ablation cell keeps the grid's own tags
        tags["flashctl.kind"] = "distill"
    tracker = make_tracker(spec.tracking, run_dir, spec.run.name, rank=info.rank, tags=tags)
    if info.rank == 0 and not isinstance(tracker, NullTracker):
        tracker.start()
        if tracker.log_params_once(_flat_params(spec)):
            tracker.log_artifact(run_dir / "spec.resolved.yaml")
            from flashctl.data.manifest import read_manifest

            tracker.log_dataset(spec.data.root, "shards", read_manifest(spec.data.root, verify=False).digest)
        tracker.set_tags({"status": "running", "resumed_from": str(start)})
    progress = _Progress(info.rank == 0, spec.distill.steps, start)
    t0 = time.perf_counter()
    samples = 0
    steps_done = 0
    last: dict[str, float] = {}
    for step in range(start, spec.distill.steps):
        metrics = job.round(step)
        steps_done += 1
        samples += spec.distill.batch_size * info.world_size  # generator samples
        metrics["train/samples_per_s"] = samples / max(time.perf_counter() - t0, 1e-9)
        last = metrics
        progress.update(step + 1, metrics)
        if (step + 1) % spec.distill.log_every == 0 or step + 1 == spec.distill.steps:
            tracker.log_metrics(metrics, step + 1)
        if spec.distill.sample_every and (step + 1) % spec.distill.sample_every == 0:
            _log_samples(job, tracker, step + 1)
        if (step + 1) % spec.distill.checkpoint_every == 0 and step + 1 < spec.distill.steps:
            job.save(step + 1)
        if stop.should_stop(info.device):
            job.save(step + 1)
            progress.close()
            tracker.set_tags({"status": "stopped", "stopped_at": str(step + 1)})
            tracker.finish("KILLED")
            return EXIT_STOPPED
    progress.close()
    if start < spec.distill.steps:
        job.save(spec.distill.steps)
    student = job.export()
    if info.rank == 0:
        train_time = time.perf_counter() - t0
        tracker.log_metrics({"train/time_s": train_time}, spec.distill.steps)
        summary = {"steps": spec.distill.steps, "resumed_from": start, "train_time_s": train_time,
                   "last_metrics": last, "student": str(run_dir / "student")}
        if spec.eval.enabled:
            summary["eval"] = _evaluate(job, student, tracker)
        atomic_write_json(run_dir / "summary.json", summary)
        tracker.set_tags({"status": "finished"})
        tracker.finish("FINISHED")
    return 0


def _evaluate(job: DistillJob, student, tracker) -> dict[str, float]:
    from rich.console import Console

    from flashctl.evaluate import default_models, eval_rows, evaluate_models

    spec = job.spec
    teacher = job.adapter.transformer  # the base teacher, unpartitioned (rank 0 samples alone)
    models = default_models(spec)
    chosen = {"student": (student, models["student"]), "teacher": (teacher, models["teacher"]),
              "teacher_fast": (teacher, models["teacher_fast"])}
    Console(stderr=True).print("evaluating student vs teacher on the seeded eval set")
    out = job.run_dir / "eval"
    res = evaluate_models(job.adapter, chosen, eval_rows(spec), out, spec.eval.seed)
    tracker.log_metrics(res["metrics"], spec.distill.steps)
    tracker.log_artifact(out / "results.json", "eval")
    tracker.log_artifacts(out / "images", "eval/images")
    _print_eval(res["metrics"])
    return res["metrics"]


def _print_eval(m: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="evaluation (verifier accuracy)")
    for col in ("model", "NFE", "T2I acc", "edit acc", "s/image"):
        table.add_column(col)
    for name in ("teacher", "teacher_fast", "student"):
        if f"eval/{name}/nfe" in m:
            table.add_row(name, f"{m[f'eval/{name}/nfe']:.0f}", f"{m.get(f'eval/{name}/t2i_acc', float('nan')):.3f}",
                          f"{m.get(f'eval/{name}/edit_acc', float('nan')):.3f}", f"{m[f'eval/{name}/sec_per_image']:.4f}")
    Console(stderr=True).print(table)
    if "eval/speedup" in m:
        Console(stderr=True).print(
            f"retention T2I {m.get('eval/retention/t2i', float('nan')):.2f}, edit "
            f"{m.get('eval/retention/edit', float('nan')):.2f}; speed-up x{m['eval/speedup']:.1f}")


def _log_samples(job: DistillJob, tracker, step: int) -> None:
    """A small grid of student samples (all ranks sample: ZeRO-3 forwards are collectives)."""
    from flashctl.evaluate import eval_rows, sample_rows

    rows = [r for r in eval_rows(job.spec) if r["aspect"] == "square"][:8]
    images, _ = sample_rows(job.adapter, job.student, rows, job.spec.distill.student_steps, 1.0, job.spec.eval.seed, batch=8)
    if job.rank == 0:
        from flashctl.images import image_grid

        path = job.run_dir / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid([images[r["id"]] for r in rows], cols=8).save(path)
        tracker.log_artifact(path, "samples")


def _flat_params(spec) -> dict[str, Any]:
    from flashctl.spec import resolved_dict

    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict) and v and prefix.split(".")[0] != "ablations":
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            out[prefix] = v

    walk("", resolved_dict(spec))
    return {k: v for k, v in out.items() if not k.startswith("ablations")}


class _Progress:
    """Progress on rank 0 (step, losses, it/s, ETA); nothing on other ranks."""

    def __init__(self, enabled: bool, total: int, start: int):
        from flashctl.progress import StepProgress

        self.bar = StepProgress("distill", total, completed=start).__enter__() if enabled else None

    def update(self, step: int, m: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step, f"G {m['train/loss_generator']:.4f}  C {m['train/loss_critic']:.4f}  "
                                  f"{self.bar.rate():.2f} it/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
