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
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_STOPPED = 75
"""Exit code after a stop signal: a checkpoint was written, re-running resumes."""


class DistillJob:
    """DMD2 distillation of one spec on this rank.

    Construction follows design §5: under ZeRO-3 the student and critic (and the frozen teachers
    when partitioned) are built in the training dtype inside `deepspeed.zero.Init` and filled
    per tensor from the pipelines' safetensors files (`models.weights.build_transformer`), so no
    rank ever holds an unpartitioned copy; student and critic start from the files of their
    teacher, not from an in-memory copy, and the adapter holds no transformer of its own.
    `partition_teachers` (default: on CUDA under ZeRO-3) makes the frozen teachers ZeRO-3
    engines, over all ranks or, with `deepspeed.teacher_shard: node`, over each node's ranks;
    otherwise they are plain replicas in the training dtype (tiny CPU scale only).
    """

    def __init__(self, spec, run_dir: Path, info, partition_teachers: bool | None = None):
        import torch

        import flashctl.models.processor  # noqa: F401  (diffusers' loader finds the processor class)
        from flashctl.distill.dmd2 import Teacher
        from flashctl.distill.engine import (
            ds_config,
            freeze,
            frozen_config,
            make_engine,
            make_frozen_engine,
            node_group,
            warmup_updates_for,
        )
        from flashctl.flow import student_sigmas
        from flashctl.models.adapter import QwenImageAdapter
        from flashctl.models.weights import build_transformer
        from flashctl.pipelines import resolve_model_path

        self.spec, self.run_dir, self.info = spec, run_dir, info
        self.rank, self.world = info.rank, info.world_size
        self.device = info.device
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[spec.deepspeed.precision]
        g = spec.guidance
        base_path = resolve_model_path(spec.teachers[g.base].path)
        from flashctl.data.conditioning import cache_for_run

        # cached conditioning (prepare-data --cache-embeddings): no text encoder or VAE on the ranks
        self.cache = cache_for_run(spec)
        self.adapter = QwenImageAdapter.from_pretrained(base_path, device=self.device, transformer=False,
                                                        encoders=self.cache is None,
                                                        edit_max_pixels=spec.model.edit_max_pixels)
        zero3 = spec.deepspeed.zero_stage == 3
        if partition_teachers is None:
            partition_teachers = spec.teachers_partitioned()
        self.partition_teachers = bool(partition_teachers) and zero3
        student_cfg = ds_config(spec, spec.distill.lr_generator, self.world, export=True,
                                warmup_updates=warmup_updates_for(spec, "student"))
        critic_cfg = ds_config(spec, spec.distill.lr_critic, self.world,
                               warmup_updates=warmup_updates_for(spec, "critic"))
        frozen_cfg = frozen_config(critic_cfg)

        def build(path: str, cfg: dict[str, Any] | None, group: Any = None):
            return build_transformer(path, self.dtype, self.device, zero_config=cfg, process_group=group)

        # deepspeed.teacher_shard: node -> each teacher partitioned over its node's ranks only
        self.teacher_group = None
        if self.partition_teachers and spec.deepspeed.teacher_shard == "node":
            self.teacher_group = node_group()

        self.teachers: dict[str, Teacher] = {}
        self.teacher_paths: dict[str, str] = {}
        for name in spec.teachers_held():  # same order on every rank (construction is collective)
            t = spec.teachers[name]
            self.teacher_paths[name] = resolve_model_path(t.path)
            if self.partition_teachers:
                model = build(self.teacher_paths[name], frozen_cfg, self.teacher_group)
                frozen = make_frozen_engine(model, frozen_cfg, blocks=spec.gather_unit("teacher") == "block")
            else:
                frozen = freeze(build(self.teacher_paths[name], None))
            self.teachers[name] = Teacher(frozen, t.cfg_scale, t.cfg_rescale)
        for problem in spec.edit_family_errors()[:1]:  # asked again now that hub files are local
            from flashctl.errors import UserError

            raise UserError(problem)
        init = spec.model.init_from  # a teacher's name or a pipeline path
        init_path = resolve_model_path(spec.teachers[init].path if init in spec.teachers else init)
        student = build(init_path, student_cfg if zero3 else None).train().requires_grad_(True)
        critic = build(base_path, critic_cfg if zero3 else None).train().requires_grad_(True)
        if spec.distill.gan_weight > 0:  # DMD2's classifier head: part of the critic's engine, never the student's
            from flashctl.distill.gan import attach_head

            attach_head(critic, spec.distill.seed)
        self.student_config = dict(student.config)
        if spec.gradient_checkpointing():
            for model in (student, critic):
                model.enable_gradient_checkpointing()
        self.student = make_engine(student, student_cfg, blocks=spec.gather_unit("student") == "block")
        # a GAN critic keeps per-sub-module gathers (why: ExperimentSpec.gather_unit)
        self.critic = make_engine(critic, critic_cfg, blocks=spec.gather_unit("critic") == "block")
        del student, critic  # the engines hold the only references
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
                                 world_size=self.world, seed=self.spec.distill.seed, verify=False,
                                 conditioning=self.cache is not None)
            self._loaders[task] = (loader, loader.batches())
        return self._loaders[task]

    def conditioning(self, task: str):
        """Next batch of `task` as a Conditioning (prompt embeddings, CFG negatives, edit source)."""

        from flashctl.distill.dmd2 import Conditioning
        from flashctl.models.cache import batch_images

        _, it = self.loader(task)
        batch = next(it)
        h, w = batch["height"], batch["width"]
        if self.cache is not None:
            embeds, mask, neg, neg_mask, src, src_size = self._cached(batch)
        else:
            sources = batch_images(batch, "source_images") if task == "edit" else None
            embeds, mask = self.adapter.encode_prompts(batch["prompts"], sources)
            if sources is None:  # T2I's CFG negative ("") is one constant: encoded once per job, not per micro-step
                from flashctl.evaluate import PromptCache

                neg, neg_mask = self.__dict__.setdefault("_negatives", PromptCache()).negative(self.adapter, "",
                                                                                              len(batch["prompts"]))
            else:  # an edit's negative carries its source image
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
                            height=h, width=w, source_latents=src, latent_shape=(seq, ch), velocity_fn=velocity,
                            target_latents=self._targets(batch) if self.spec.distill.gan_weight > 0 else None)

    def _targets(self, batch):
        """The batch's real images (T2I image / edit target) as packed latents, for DMD2's GAN
        term: from the cache, or encoded by the VAE as prepare-data's cache encodes them."""
        import torch

        from flashctl.errors import UserError

        if self.cache is not None:
            lat = batch["cond"]["latents"]
            missing = [i for i, x in zip(batch["ids"], lat) if x is None]
        else:
            missing = [i for i, has in zip(batch["ids"], batch["has_image"].tolist()) if not has]
        if missing:
            raise UserError(f"{self.spec.data.root}: row {missing[0]!r} has no target image, which "
                            "distill.gan_weight > 0 needs (the GAN term's real samples)")
        if self.cache is not None:
            return torch.stack(lat).to(self.device, self.adapter.dtype)
        return self.adapter.encode_images(batch["images"])

    def _cached(self, batch):
        """(embeds, mask, neg, neg_mask, source latents, source size) of a batch from the cache:
        the rows' stored tokens padded to one length (`cat_conditioning`, as the pipelines pad a
        batch), in the adapter's dtype on this rank's device; the T2I negative stored once."""
        import torch

        from flashctl.data.conditioning import load_negatives
        from flashctl.models.adapter import cat_conditioning

        c, dev, dt = batch["cond"], self.device, self.adapter.dtype

        def padded(items):
            e, m = cat_conditioning([(x[None], torch.ones(1, x.shape[0], dtype=torch.long)) for x in items])
            return e.to(dev, dt), m.to(dev)

        embeds, mask = padded(c["embeds"])
        if c["neg_embeds"] is None:  # T2I: the constant negative, encoded once by prepare-data
            if "_cached_negative" not in self.__dict__:
                e, m = load_negatives(Path(self.cache["root"]), self.cache)
                self._cached_negative = (e.to(dev, dt), m.to(dev))
            e, m = self._cached_negative
            neg, neg_mask = e.expand(len(c["embeds"]), *e.shape[1:]), m.expand(len(c["embeds"]), *m.shape[1:])
        else:
            neg, neg_mask = padded(c["neg_embeds"])
        src = c["source_latents"].to(dev, dt) if c["source_latents"] is not None else None
        return embeds, mask, neg, neg_mask, src, c["source_size"]

    # ---------------------------------------------------------------------------- training
    def teacher_for(self, task: str, student_step: int):
        from flashctl.distill.guidance import teacher_for

        # stepwise's student_sigma_range reads the student step's input level sigma_k
        name = teacher_for(self.spec.guidance, task, student_step, float(self.sigmas[student_step]))
        return name, self.teachers[name]

    def draws(self, step: int, micro: int):
        """The random draws of one micro-step, in one place: `shared` (same on every rank: the
        task, the student step k, the re-noise levels, so every rank runs the same forward
        passes under ZeRO-3) and `local` (per rank: noise, so ranks see different samples)."""
        from flashctl.distill import dmd2
        from flashctl.distill.mixture import task_for_step
        from flashctl.distill.schedules import sample_student_step

        d = self.spec.distill
        shared = dmd2.step_generator(d.seed, step, micro)
        local = dmd2.step_generator(d.seed + 7919 * (self.rank + 1), step, micro)
        task = task_for_step(step, micro, d.seed, self.spec.mixture.edit_probability)
        k = sample_student_step(shared, d.student_steps)
        return shared, local, task, k

    def _student_noise(self, cond, local):
        import torch

        return torch.randn((cond.batch, *cond.latent_shape), generator=local).to(self.device)

    def critic_update(self, step: int, micro: int) -> dict[str, float]:
        """One fake-score update: flow matching on a detached student sample (backward simulation).
        Returns {"loss": ...} and, with the GAN term, its diagnostics."""
        from flashctl.distill import dmd2

        _, local, task, k = self.draws(step, micro)
        cond = self.conditioning(task)
        x = dmd2.simulate_student(self.student, cond, self.sigmas, k, self._student_noise(cond, local), with_grad=False)
        stats = {}
        if self.spec.distill.gan_weight > 0:  # + DMD2's discriminator loss, real images vs these samples
            loss, stats = dmd2.critic_gan_loss(self.critic, cond, x, cond.target_latents, local,
                                               self.spec.distill.gan_weight)
        else:
            loss = dmd2.critic_loss(self.critic, cond, x, local)
        self.critic.backward(loss)
        self.critic.step()
        return {"loss": loss.item(), **stats}

    def generator_update(self, step: int, micro: int) -> dict[str, Any]:
        """One student update: a sample with grad at student step k, the teacher the guidance
        policy picks for (task, k), the distribution-matching loss against the critic."""
        from flashctl.distill import dmd2

        d = self.spec.distill
        shared, local, task, k = self.draws(step, micro)
        cond = self.conditioning(task)
        name, teacher = self.teacher_for(task, k)
        x = dmd2.simulate_student(self.student, cond, self.sigmas, k, self._student_noise(cond, local), with_grad=True)
        loss, stats = dmd2.generator_loss(x, cond, self.critic, teacher, local, d.tau_min, d.tau_max,
                                          objective=d.objective, tau_generator=shared,
                                          student_sigma=float(self.sigmas[k]), gan_weight=d.gan_weight)
        self.student.backward(loss)
        self.student.step()
        return {"loss": loss.item(), "stats": stats, "task": task, "k": k, "teacher": name}

    def round(self, step: int) -> dict[str, float]:
        """DMD2's two time scales: K critic updates, then one generator update (DMD: K = 1)."""
        d = self.spec.distill
        updates = 1 if d.objective == "dmd" else d.critic_updates  # DMD: no two-time-scale rule
        critic = [self.critic_update(step, micro) for micro in range(updates)]
        gen = self.generator_update(step, micro=updates)
        gan = {}
        if d.gan_weight > 0:  # DMD2's GAN term: discriminator loss and accuracies (mean over the K updates)
            gan = {f"train/{name}": sum(c[key] for c in critic) / len(critic) for name, key in
                   (("loss_gan_d", "gan_d"), ("d_acc_real", "d_real_acc"), ("d_acc_fake", "d_fake_acc"))}
            gan["train/loss_gan_g"] = gen["stats"]["gan_g"]
        return {
            **gan,
            "train/loss_generator": gen["loss"],
            "train/loss_critic": sum(c["loss"] for c in critic) / len(critic),
            "train/grad_norm_generator": _norm(self.student),
            "train/grad_norm_critic": _norm(self.critic),
            "train/lr_generator": self.student.get_lr()[0],
            "train/lr_critic": self.critic.get_lr()[0],
            "train/dm_grad_norm": gen["stats"]["dm_grad_norm"],
            "train/fake_real_gap": gen["stats"]["fake_real_gap"],
            "train/student_step": float(gen["k"]),
            "train/task_edit": float(gen["task"] == "edit"),
            "train/teacher_specialised": float(gen["teacher"] != self.spec.guidance.base),
        }

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

    def student_scheduler(self):
        """A fresh scheduler on the student's training grid (`self.sigmas`), derived from the
        teacher's: samples, the exported pipeline and the evaluation use it for the student,
        while the teacher keeps its own (`self.adapter.scheduler`)."""
        from flashctl.distill.schedules import student_scheduler

        return student_scheduler(self.adapter.scheduler, self.spec.distill.shift)

    def export(self, max_shard_bytes: int | None = None):
        """Write the student as the diffusers pipeline folder `run_dir/student` (all ranks: a collective).

        The student is gathered one submodule at a time and rank 0 streams each tensor, in the
        training dtype, into sharded safetensors (`models.weights.write_transformer`): beyond its
        partition no rank holds more than one submodule. The pipeline's scheduler is the
        student's own. The folder is moved into place complete (`save_components`), so its
        presence means a finished export. Returns the folder. The evaluation samples the
        student engine on every rank when teachers are partitioned, else (teachers as plain
        replicas) this folder loaded back as a replica, like the teachers (`_evaluate`). The folder's
        pipeline class is the base's family (`adapter.family`: how its edits are conditioned).
        Trained from cached conditioning, the text encoder and VAE are copied file by file from
        the base pipeline (`save_components(copy_from=...)`): the export builds no encoder."""
        from flashctl.distill.engine import barrier
        from flashctl.models.export import save_components
        from flashctl.models.weights import DEFAULT_SHARD_BYTES, write_transformer

        module = self.student.module
        shard = max_shard_bytes or DEFAULT_SHARD_BYTES
        out = self.run_dir / "student"
        if self.rank == 0:
            # the student's own scheduler (its training grid); the adapter keeps the teacher's
            held = self.adapter.has_encoders
            comps = {**self.adapter.components(encoders=held), "scheduler": self.student_scheduler()}
            from flashctl.data.conditioning import local_model_dir

            save_components(comps, out, lambda folder: write_transformer(module, folder, self.dtype, shard),
                            pipeline_class=self.adapter.family,
                            copy_from=None if held else local_model_dir(self.adapter.source))
        else:
            write_transformer(module, None, self.dtype, shard)
        barrier()
        return out

    def base_teacher_replica(self):
        """The base teacher as this rank holds it, for the data-parallel evaluation: the frozen
        replica, or, when teachers are partitioned, its ZeRO-3 inference engine (its forwards
        are collectives; `evaluate.rank_batches` keeps every rank running the same ones). No
        whole copy is built."""
        return self.teachers[self.spec.guidance.base].model


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
    from flashctl.progress import Phase, announce
    from flashctl.spec import load_spec, spec_hash
    from flashctl.track import NullTracker, make_tracker

    spec = load_spec(run_dir / "spec.resolved.yaml")
    # trained, exported and evaluated: nothing to redo. Decided before joining the process group
    # (summary.json is written once, at the very end, in the shared run directory)
    if _finished(run_dir, spec):
        announce(f"{run_dir} is finished (summary.json): nothing to do", os.environ.get("RANK", "0") == "0")
        return 0
    info = init_distributed(spec.launch.device)
    quiet_collective_warnings()
    torch.manual_seed(spec.distill.seed)
    stop = install_stop_handler()
    with Phase(f"loading models, building DeepSpeed engines (ZeRO-{spec.deepspeed.zero_stage}, {info.world_size} rank(s))",
               enabled=info.rank == 0):
        job = DistillJob(spec, run_dir, info)
    announce("loading the latest checkpoint, if any", info.rank == 0)
    state = load_checkpoint(job.ckpt_dir, {"student": job.student, "critic": job.critic})
    start = job.restore(state) if state else 0
    tags = {"flashctl.spec_hash": spec_hash(spec)}  # track.TAG_HASH
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
    announce(f"training: generator steps {start + 1}-{spec.distill.steps}", info.rank == 0 and start < spec.distill.steps)
    if start == 0 and spec.distill.sample_every:  # the curve's first point: the student as initialised
        _log_samples(job, tracker, 0)
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
        saved = (step + 1) % spec.distill.checkpoint_every == 0 and step + 1 < spec.distill.steps
        if saved:
            job.save(step + 1)
        if stop.should_stop(info.device):
            if not saved:  # a checkpoint of this very step exists: saving it again would be refused
                job.save(step + 1)
            progress.close()
            tracker.set_tags({"status": "stopped", "stopped_at": str(step + 1)})
            tracker.finish("KILLED")
            return EXIT_STOPPED
    progress.close()
    if start < spec.distill.steps:
        with Phase("saving the final checkpoint", enabled=info.rank == 0):
            job.save(spec.distill.steps)
    student_dir = run_dir / "student"
    # the export is moved into place complete: after a requeue at the end, it is not redone
    if _rank0_says(start < spec.distill.steps or not student_dir.is_dir()):
        with Phase("exporting the student (gather + diffusers folder)", enabled=info.rank == 0):
            job.export()
    else:
        announce(f"the student was exported before this restart: keeping {student_dir}", info.rank == 0)
    train_time = time.perf_counter() - t0
    if info.rank == 0 and steps_done:
        tracker.log_metrics({"train/time_s": train_time}, spec.distill.steps)
    eval_metrics = None
    if spec.eval.enabled:
        from flashctl.evaluate import EvalStopped

        try:
            eval_metrics = _evaluate(job, tracker, stop)
        except EvalStopped as exc:
            announce(f"stop signal during the evaluation ({exc}); no results written, re-run to evaluate",
                     info.rank == 0)
            tracker.set_tags({"status": "stopped", "stopped_at": "eval"})
            tracker.finish("KILLED")
            return EXIT_STOPPED
    if info.rank == 0:
        summary = {"steps": spec.distill.steps, "resumed_from": start, "train_time_s": train_time,
                   "last_metrics": last, "student": str(student_dir)}
        if eval_metrics is not None:
            summary["eval"] = eval_metrics
        atomic_write_json(run_dir / "summary.json", summary)  # last: the run is finished
        tracker.set_tags({"status": "finished"})
        tracker.finish("FINISHED")
    return 0


def _finished(run_dir: Path, spec) -> bool:
    """Whether `run_dir` holds a finished run of `spec`: summary.json (written last, after the
    export and after the eval metrics were logged) for every step, with the evaluation when it
    is enabled. A re-run of such a run has nothing left to do."""
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (summary.get("steps") == spec.distill.steps and (run_dir / "student").is_dir()
            and (not spec.eval.enabled or "eval" in summary))


def _rank0_says(flag: bool) -> bool:
    """Rank 0's `flag` on every rank (a collective): decisions that choose collectives, such as
    skipping the export, must be the same on all ranks even if their file views differ."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _previous_results(path: Path, rows: list[dict[str, Any]], models: dict[str, Any], diversity: bool):
    """This run's eval results.json when it is complete for these rows and models (it is written
    atomically, after every image): a restart reuses it instead of sampling again. Else None."""
    import json

    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ids = [r["id"] for r in rows]
    got = res.get("models", {})
    if set(got) != set(models) or res.get("rows") != len(rows) or "metrics" not in res:
        return None
    for summary in got.values():
        if [r.get("id") for r in summary.get("per_row", [])] != ids or ("diversity" in summary) != diversity:
            return None
    return res


def _evaluate(job: DistillJob, tracker, stop) -> dict[str, float] | None:
    """The end-of-run evaluation, data-parallel: call it on every rank.

    Each rank samples its share of the eval batches (`evaluate.rank_batches`) with the models
    it holds, student and base teacher placed alike: both ZeRO-3 engines when teachers are
    partitioned (forwards are collectives; the batches are padded so every rank runs the same
    ones), else both plain replicas (the student loaded back from its export).
    Verifier results are gathered to rank 0, which writes eval/results.json, logs the metrics
    and returns them (None on the other ranks). A stop signal is honoured between batches
    (`EvalStopped`, nothing written); a complete results.json from before a restart is reused."""
    from flashctl.evaluate import default_models, eval_rows, evaluate_models, open_rows, teacher_cache_dir
    from flashctl.pipelines import resolve_model_path
    from flashctl.progress import Phase, announce

    spec = job.spec
    teacher = job.base_teacher_replica()
    if not job.adapter.has_encoders:  # trained from cached conditioning: see _eval_encoders
        _eval_encoders(job)
    models = default_models(spec)
    models["student"].scheduler = job.student_scheduler()  # the teachers sample on their own schedule
    student = job.student
    if not job.partition_teachers:
        # The teachers are plain replicas here (tiny CPU scale): the student is sampled the same
        # way, loaded back from its export as a user would load it, so the timed speed-up compares
        # like with like. The ZeRO-3 engine's per-sub-module gather hooks cost more than the tiny
        # model's maths (measured: 158 vs 34 ms/image denoising at the same 4 NFE).
        from flashctl.distill.engine import freeze
        from flashctl.models.weights import build_transformer

        student = freeze(build_transformer(job.run_dir / "student", job.dtype, job.device))
    chosen = {"student": (student, models["student"]), "teacher": (teacher, models["teacher"]),
              "teacher_fast": (teacher, models["teacher_fast"])}
    out = job.run_dir / "eval"
    rows = eval_rows(spec)
    with_div = spec.eval.diversity_seeds > 0 and bool(open_rows(rows))
    res = _previous_results(out / "results.json", rows, chosen, with_div) if job.rank == 0 else None
    if _rank0_says(res is not None):
        announce(f"{out / 'results.json'} is complete: evaluation not repeated", job.rank == 0)
    else:
        cached = {}
        if spec.eval.reuse_teacher:  # one teacher evaluation per grid (and per teacher + eval set)
            cached["teacher"] = teacher_cache_dir(spec, resolve_model_path(spec.teachers[spec.guidance.base].path),
                                                  rows)
        with Phase(f"evaluating student vs teacher ({len(rows)} rows on {job.world} rank(s))", enabled=job.rank == 0):
            res = evaluate_models(job.adapter, chosen, rows, out, spec.eval.seed, rank=job.rank, world=job.world,
                                  should_stop=lambda: stop.should_stop(job.device),
                                  diversity_seeds=spec.eval.diversity_seeds, cached=cached)
        if job.rank == 0 and res["timing"]["cached"]:
            announce(f"teacher evaluation reused from {cached['teacher']} (accuracy and images; timed again "
                     f"interleaved with the student on {res['timing'].get('subset', {}).get('rows', 0)} rows)")
    if job.rank != 0:
        return None
    tracker.log_metrics(res["metrics"], spec.distill.steps)
    tracker.log_artifact(out / "results.json", "eval")
    from flashctl.track import EVAL_IMAGES

    tracker.log_artifacts(out / "images", EVAL_IMAGES)
    _print_eval(res["metrics"], res.get("ranks"))
    return res["metrics"]


def _eval_encoders(job: DistillJob) -> None:
    """Encoders for the end-of-run evaluation of a run trained from cached conditioning.

    The eval set is the shapes world's seeded `eval_rows`, not rows of the training shards, so
    the cache has no conditioning for it, and every sample must be decoded by the VAE. Each
    rank loads the encoders once (`adapter.load_encoders`), as the evaluation is data-parallel
    and each rank encodes only its own batches: the VAE (small; it encodes edit sources and
    decodes every image) on the rank's device, the text encoder (7B at scale) on the CPU, so
    it never takes GPU memory beside the engines; its outputs move to the device per batch.
    The export before it builds no encoder at all (`DistillJob.export`)."""
    job.adapter.load_encoders(text_encoder_device="cpu")


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _print_eval(m: dict[str, float], ranks: list[dict[str, int]] | None = None) -> None:
    from rich.table import Table

    from flashctl.shapes.diversity import KINDS
    from flashctl.term import human_console, show
    from flashctl.track import EVAL_SPEEDUP, eval_metric

    def get(*name: str) -> float:
        return m.get(eval_metric(*name), float("nan"))

    table = Table(title="evaluation (verifier accuracy)")
    for col in ("model", "NFE", "T2I acc", "edit acc", "s/image"):
        table.add_column(col)
    for name in ("teacher", "teacher_fast", "student"):
        if eval_metric(name, "nfe") in m:
            table.add_row(name, f"{get(name, 'nfe'):.0f}", f"{get(name, 't2i_acc'):.3f}", f"{get(name, 'edit_acc'):.3f}",
                          _seconds(m.get(eval_metric(name, "sec_per_image"))))
    console = human_console(stderr=True)
    show(console, table)
    if EVAL_SPEEDUP in m:
        console.print(f"retention T2I {get('retention', 't2i'):.2f}, edit {get('retention', 'edit'):.2f}; "
                      f"speed-up x{m[EVAL_SPEEDUP]:.1f}")
    for name in ("teacher", "teacher_fast", "student"):
        parts = [f"{kind} H {get(name, 'diversity', kind, 'entropy'):.2f} "
                 f"(i.i.d. {get(name, 'diversity', kind, 'entropy_ref'):.2f}), "
                 f"TV {get(name, 'diversity', kind, 'tv'):.2f} (i.i.d. {get(name, 'diversity', kind, 'tv_ref'):.2f})"
                 for kind in KINDS if eval_metric(name, "diversity", kind, "entropy") in m]
        if parts:
            console.print(f"diversity {name}: " + "; ".join(parts))
    if ranks and len(ranks) > 1:
        console.print(f"eval rows per rank: {', '.join(str(r['rows']) for r in ranks)} ({len(ranks)} ranks, "
                      f"{sum(r['padding'] for r in ranks)} padding batches)")


def _log_samples(job: DistillJob, tracker, step: int) -> None:
    """Periodic student samples: the seeded eval set at `distill.sample_rows` rows per task,
    sampled at the student's steps (all ranks sample: ZeRO-3 forwards are collectives), scored
    by the verifier (`track.SAMPLE_ACC`: the training curves of accuracy) and a grid of the
    square ones logged as an artifact."""
    from flashctl.evaluate import eval_rows, sample_rows, score_images
    from flashctl.track import SAMPLE_ACC, SAMPLE_N

    if not job.adapter.has_encoders and job.device.type == "cuda":  # cached conditioning: keep them off the GPUs
        from flashctl.progress import announce

        announce(f"step {step}: samples skipped (trained from cached conditioning: no text encoder/VAE on the ranks)",
                 job.rank == 0)
        return
    ev = job.spec.eval
    k = job.spec.distill.sample_rows
    rows = eval_rows(job.spec.model_copy(update={"eval": ev.model_copy(
        update={"n_t2i": min(k, ev.n_t2i), "n_edit": min(k, ev.n_edit)})}))
    images, _ = sample_rows(job.adapter, job.student, rows, job.spec.distill.student_steps, 1.0, ev.seed,
                            batch=16, scheduler=job.student_scheduler())
    if job.rank == 0:
        from flashctl.images import image_grid

        summary, _ = score_images(rows, images)
        by_task = {t: v for t, v in summary.get("by_task", {}).items() if t in SAMPLE_ACC}
        tracker.log_metrics({**{SAMPLE_ACC[t]: v["accuracy"] for t, v in by_task.items()},
                             **{SAMPLE_N[t]: float(v["n"]) for t, v in by_task.items()}}, step)
        square = [r for r in rows if r["aspect"] == "square"][:8]
        if square:
            path = job.run_dir / "samples" / f"step-{step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid([images[r["id"]] for r in square], cols=len(square)).save(path)
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
