"""`flashctl train-teacher`: flow-matching (SFT) training of a teacher on prepared shards.

From scratch (tiny components built offline; the VAE is trained on the shard images first) or
fine-tuned from a pipeline folder (e.g. an edit-specialised teacher from the base teacher with
`train_teacher.t2i=0`). Latents and prompt embeddings are encoded once with the frozen VAE and
text encoder (`models.cache`). Checkpoints every `checkpoint_every` steps with an atomic
`latest` pointer; a re-run resumes. The result is a diffusers pipeline folder (EMA weights).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from flashctl import flow
from flashctl.errors import UserError
from flashctl.io import atomic_write_json, atomic_write_text
from flashctl.progress import StepProgress
from flashctl.spec import ExperimentSpec

EMA_DECAY = 0.999


def ckpt_dir_for(output: Path) -> Path:
    return output.parent / f"{output.name}.ckpt"


def logit_normal_sigmas(gen: torch.Generator, n: int) -> torch.Tensor:
    """Training noise levels from a logit-normal(0, 1), as SD3 / Qwen-Image-class training."""
    return torch.sigmoid(torch.randn(n, generator=gen))


def _images_for_vae(root: Path, data, limit: int = 4096, crop: int = 32) -> torch.Tensor:
    """Up to `limit` images (targets and edit sources) from the shards as one (N, 3, crop, crop)
    tensor of random crops: the VAE is fully convolutional, so square crops of every aspect
    teach it all sizes, and one tensor lets `train_vae` draw small random batches."""
    from flashctl.data.loader import ShardLoader

    loader = ShardLoader(root, batch_size=32, categories=dict(data.categories), aspects=dict(data.aspects), seed=7)
    gen = torch.Generator().manual_seed(7)
    crops, n = [], 0
    for batch in loader:
        parts = [batch["images"][batch["has_image"]]]
        if "source_images" in batch:
            parts.append(batch["source_images"][batch["has_source"]])
        for x in parts:
            h, w = x.shape[-2:]
            for img in x:
                top = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
                crops.append(img[:, top:top + crop, left:left + crop])
        n += len(batch["ids"])
        if n >= limit:
            break
    return torch.stack(crops)


def build_components(spec: ExperimentSpec, ckpt: Path, console) -> dict[str, Any]:
    """Tiny components with a trained VAE, saved once under `ckpt/components` (reused on resume)."""
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.export import save_components
    from flashctl.models.tiny import build_tiny_pipeline
    from flashctl.models.vae_train import set_latent_stats, train_vae
    from flashctl.shapes import corpus

    folder = ckpt / "components"
    if (folder / "model_index.json").is_file():
        return QwenImageAdapter.from_pretrained(folder, edit_max_pixels=spec.model.edit_max_pixels).components()
    tt = spec.train_teacher
    comps = build_tiny_pipeline(spec.model.tiny, corpus(seed=tt.seed), seed=tt.seed)
    if tt.vae_steps:
        images = _images_for_vae(spec.data.root, spec.data)
        with StepProgress("vae", tt.vae_steps, console) as prog:
            metrics = train_vae(
                comps["vae"], images, steps=tt.vae_steps, lr=tt.vae_lr, seed=tt.seed, batch_size=tt.vae_batch_size,
                progress=lambda s, m: prog.update(s + 1, f"l1 {m['l1']:.4f}"),
            )
        console.print(f"vae: l1 {metrics['l1_first']:.3f} -> {metrics['l1_last']:.3f} in {metrics['seconds']:.0f}s")
        set_latent_stats(comps["vae"], images)
    save_components(comps, folder)
    return comps


def teacher_lr(step: int, lr: float, steps: int, warmup: int, decay_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup` steps,
    constant, then linear decay to 0 over the last `decay_steps` steps (warmup-stable-decay)."""
    scale = min(1.0, (step + 1) / max(1, warmup))
    if decay_steps:
        scale = min(scale, (steps - step) / decay_steps)
    return lr * scale


def _latest(ckpt: Path) -> Path | None:
    pointer = ckpt / "latest"
    if not pointer.is_file():
        return None
    path = ckpt / pointer.read_text().strip()
    return path if path.is_file() else None


def _save_state(ckpt: Path, step: int, model, ema, opt, gen: torch.Generator) -> None:
    name = f"step-{step:07d}.pt"
    state = {
        "step": step,
        "model": model.state_dict(),
        "ema": ema.module.state_dict(),
        "n_averaged": ema.n_averaged,
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
    }
    tmp = ckpt / f".{name}.tmp"
    torch.save(state, tmp)
    tmp.replace(ckpt / name)
    atomic_write_text(ckpt / "latest", name + "\n")
    for old in sorted(ckpt.glob("step-*.pt"))[:-2]:
        old.unlink()


def train_teacher(spec: ExperimentSpec, console=None, resume: bool = True) -> dict[str, Any]:
    """Train the teacher described by `spec.train_teacher`; returns a summary dict."""
    from rich.console import Console
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from flashctl.data.manifest import read_manifest
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.cache import encode_dataset, take
    from flashctl.pipelines import resolve_model_path
    from flashctl.track import make_tracker

    console = console or Console(stderr=True)
    tt = spec.train_teacher
    manifest = read_manifest(spec.data.root)
    ckpt = ckpt_dir_for(tt.output)
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(tt.seed)
    if tt.init_from:
        adapter = QwenImageAdapter.from_pretrained(resolve_model_path(tt.init_from), edit_max_pixels=spec.model.edit_max_pixels)
    else:
        adapter = QwenImageAdapter(build_components(spec, ckpt, console), edit_max_pixels=spec.model.edit_max_pixels)

    tasks = tuple(t for t, w in (("t2i", tt.t2i), ("edit", tt.edit)) if w > 0)
    if not tasks:
        raise UserError("train_teacher.t2i / train_teacher.edit: at least one must be > 0")
    t0 = time.perf_counter()
    with StepProgress("encode", None, console) as prog:
        buckets = encode_dataset(
            adapter, spec.data.root, categories=dict(spec.data.categories), aspects=dict(spec.data.aspects),
            tasks=tasks, progress=lambda i, n: prog.update(i, "batches", total=n),
        )
    if not buckets:
        raise UserError(f"{spec.data.root}: no rows with target images for tasks {tasks}")
    console.print(f"encoded {sum(len(b) for b in buckets.values())} rows in {time.perf_counter() - t0:.0f}s")

    model = adapter.transformer
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=tt.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True)
    gen = torch.Generator().manual_seed(tt.seed)
    start = 0
    latest = _latest(ckpt) if resume else None
    if latest is not None:
        state = torch.load(latest, weights_only=True)
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.n_averaged.copy_(state["n_averaged"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start = int(state["step"])
        console.print(f"resumed from {latest.name} (step {start})")

    tracker = make_tracker(spec.tracking, ckpt, f"teacher-{tt.output.name}", tags={"flashctl.kind": "teacher"})
    tracker.start()
    tracker.log_params_once({"train_teacher." + k: v for k, v in tt.model_dump(mode="json").items()})
    tracker.log_dataset(spec.data.root, "shards", manifest.digest)

    by_task = {t: [b for b in buckets.values() if b.task == t] for t in tasks}
    weights = {t: torch.tensor([len(b) for b in by_task[t]], dtype=torch.float) for t in tasks}
    p_edit = tt.edit / (tt.t2i + tt.edit) if "edit" in tasks and "t2i" in tasks else (1.0 if tasks == ("edit",) else 0.0)
    warmup = min(100, tt.steps // 10)
    running = None
    losses: list[float] = []
    with StepProgress("teacher", tt.steps, console, completed=start) as prog:
        for step in range(start, tt.steps):
            for g in opt.param_groups:
                g["lr"] = teacher_lr(step, tt.lr, tt.steps, warmup, tt.decay_steps)
            task = "edit" if torch.rand(1, generator=gen).item() < p_edit else "t2i"
            bi = torch.multinomial(weights[task], 1, generator=gen).item()
            bucket = by_task[task][bi]
            idx = torch.randint(len(bucket), (tt.batch_size,), generator=gen)
            b = take(bucket, idx)
            drop = torch.rand(tt.batch_size, generator=gen) < tt.cond_dropout
            embeds, mask = _drop_condition(b, drop)
            x0 = b.latents
            eps = torch.randn(x0.shape, generator=gen)
            sigma = logit_normal_sigmas(gen, tt.batch_size)
            x_t = flow.add_noise(x0, eps, sigma)
            v = adapter.velocity(model, x_t, sigma, embeds, mask, b.height, b.width, b.source_latents, b.source_size)
            loss = flow.flow_matching_loss(v, x0, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update_parameters(model)
            lv = loss.item()
            losses.append(lv)
            running = lv if running is None else 0.98 * running + 0.02 * lv
            prog.update(step + 1, f"loss {running:.4f}")
            if (step + 1) % 10 == 0:
                tracker.log_metrics({"train/loss": running, "train/grad_norm": float(gnorm),
                                     "train/lr": opt.param_groups[0]["lr"]}, step + 1)
            if (step + 1) % tt.checkpoint_every == 0 and step + 1 < tt.steps:
                _save_state(ckpt, step + 1, model, ema, opt, gen)
    if start < tt.steps:
        _save_state(ckpt, tt.steps, model, ema, opt, gen)
    ema.module.eval().requires_grad_(False)
    out = adapter.save_pipeline(tt.output, transformer=ema.module)
    if tt.init_from:
        source = Path(resolve_model_path(tt.init_from))
        copy_frozen_components(out, source)
        link_unchanged_components(out, source)
    first = sum(losses[:50]) / max(1, len(losses[:50])) if losses else math.nan
    last = sum(losses[-50:]) / max(1, len(losses[-50:])) if losses else math.nan
    summary = {"output": str(out), "steps": tt.steps, "resumed_from": start, "loss_first50": first,
               "loss_last50": last, "seconds": time.perf_counter() - t0, "dataset_digest": manifest.digest}
    atomic_write_json(ckpt / "summary.json", summary)
    tracker.log_metrics({"train/loss_first50": first, "train/loss_last50": last}, tt.steps)
    tracker.finish()
    return summary


def copy_frozen_components(folder: Path, source: Path) -> list[str]:
    """Replace every component subfolder of the fine-tuned pipeline `folder` except the
    transformer (the only part teacher training changes) by a file-by-file copy of `source`'s.
    Saving them again from memory is not byte-identical: transformers adds `dtype` entries to the
    configs and the tokenizer writes the truncation state of its last call, which would change
    the teacher's content fingerprint (`pipelines.hash_files`), hence every prepared conditioning
    cache keyed on its text encoder, for weights that did not change. Returns the names."""
    import shutil

    copied = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "transformer"):
        theirs = source / sub.name
        if theirs.is_dir():
            if sub.is_symlink():
                sub.unlink()
            else:
                shutil.rmtree(sub)
            shutil.copytree(theirs.resolve(), sub)
            copied.append(sub.name)
    return copied


def link_unchanged_components(folder: Path, base: Path) -> list[str]:
    """Replace component subfolders of `folder` that are byte-identical to `base`'s by relative
    symlinks (a fine-tuned teacher shares the VAE, text encoder and tokenizer of its base: the
    shipped teachers stay small in git). diffusers loads through the links. Only a base that sits
    beside `folder` (same parent, as the shipped teachers do) is linked to: a link out of the
    folder's tree (e.g. a stage-1 teacher under runs/) would break once either tree moves or is
    not shipped. Returns the names."""
    import os
    import shutil

    if not base.is_dir() or base.resolve() == folder.resolve() or base.resolve().parent != folder.resolve().parent:
        return []
    linked = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()):
        other = base / sub.name
        if not other.is_dir():
            continue
        names = sorted(x.name for x in sub.iterdir())
        if names != sorted(x.name for x in other.iterdir()):
            continue
        if all(_same_file(sub / n, other / n) for n in names):
            shutil.rmtree(sub)
            os.symlink(os.path.relpath(other.resolve(), folder.resolve()), sub)
            linked.append(sub.name)
    return linked


def _same_file(a: Path, b: Path) -> bool:
    """Byte-identical, or for JSON equal once the loaders' source-path entries are ignored."""
    import filecmp

    if a.suffix == ".json":
        def load(p: Path):
            d = json.loads(p.read_text())
            return {k: v for k, v in d.items() if k not in ("_name_or_path", "name_or_path")} if isinstance(d, dict) else d

        return load(a) == load(b)
    return filecmp.cmp(a, b, shallow=False)


def _drop_condition(b, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the conditioning of `drop`ped samples by the unconditional one (for CFG)."""
    if not drop.any():
        return b.embeds, b.mask
    from flashctl.models.adapter import cat_conditioning

    n = b.embeds.shape[0]
    both, masks = cat_conditioning([(b.embeds, b.mask), (b.neg_embeds, b.neg_mask)])  # padded to one length
    e, ne, m, nm = both[:n], both[n:], masks[:n], masks[n:]
    d = drop.view(-1, 1)
    return torch.where(d.unsqueeze(-1), ne, e), torch.where(d, nm, m)
