"""Encoded training data: VAE latents and prompt embeddings of prepared shards, cached.

The VAE and the text encoder are frozen in teacher training (and in distillation), so every
row is encoded once: a pass of the shard loader over the dataset fills one `Bucket` per
(task, aspect). Training then draws batches from memory; most of a CPU step would otherwise
be spent in VAE encoding (design §8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from flashctl.models.adapter import QwenImageAdapter


@dataclass
class Bucket:
    """Encoded rows of one task and one image size."""

    task: str
    height: int
    width: int
    latents: list[torch.Tensor] = field(default_factory=list)
    """Target latents, packed (seq, C) each (empty rows skipped)."""
    embeds: list[torch.Tensor] = field(default_factory=list)
    """Prompt (+ source image) embeddings (L_i, D), unpadded."""
    neg_embeds: list[torch.Tensor] = field(default_factory=list)
    """Unconditional embeddings: "" (+ the source image for edits)."""
    source_latents: list[torch.Tensor] = field(default_factory=list)
    """Packed source latents (edits)."""
    source_size: tuple[int, int] | None = None
    ids: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    edit_types: list[str | None] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def pad_embeds(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (L_i, D) embeddings to (B, L, D) with a (B, L) long mask (0 = padding)."""
    length = max(e.shape[0] for e in items)
    out = items[0].new_zeros(len(items), length, items[0].shape[1])
    mask = torch.zeros(len(items), length, dtype=torch.long)
    for i, e in enumerate(items):
        out[i, : e.shape[0]] = e
        mask[i, : e.shape[0]] = 1
    return out, mask


@dataclass
class EncodedBatch:
    task: str
    height: int
    width: int
    latents: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor
    neg_embeds: torch.Tensor
    neg_mask: torch.Tensor
    source_latents: torch.Tensor | None
    source_size: tuple[int, int] | None
    ids: list[str]
    prompts: list[str]


def take(bucket: Bucket, index: list[int] | torch.Tensor) -> EncodedBatch:
    """A padded batch of `bucket` rows `index`."""
    idx = [int(i) for i in index]
    embeds, mask = pad_embeds([bucket.embeds[i] for i in idx])
    neg, neg_mask = pad_embeds([bucket.neg_embeds[i] for i in idx])
    src = torch.stack([bucket.source_latents[i] for i in idx]) if bucket.source_latents else None
    return EncodedBatch(
        task=bucket.task, height=bucket.height, width=bucket.width,
        latents=torch.stack([bucket.latents[i] for i in idx]) if bucket.latents else None,
        embeds=embeds, mask=mask, neg_embeds=neg, neg_mask=neg_mask,
        source_latents=src, source_size=bucket.source_size,
        ids=[bucket.ids[i] for i in idx], prompts=[bucket.prompts[i] for i in idx],
    )


def _unpad(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [e[m.bool()].clone() for e, m in zip(embeds, mask)]


def batch_images(batch: dict[str, Any], key: str) -> list:
    """PIL images of a loader batch tensor (`images` / `source_images`, values in [-1, 1])."""
    from PIL import Image

    x = ((batch[key].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in x]


@torch.no_grad()
def encode_batch(adapter: QwenImageAdapter, batch: dict[str, Any], buckets: dict, need_target: bool = True) -> None:
    """Encode one loader batch (one task, one aspect) into `buckets` keyed by (task, h, w)."""
    task = batch["tasks"][0]
    h, w = batch["height"], batch["width"]
    key = (task, h, w)
    bucket = buckets.setdefault(key, Bucket(task=task, height=h, width=w))
    keep = list(range(len(batch["ids"])))
    if need_target:
        keep = [i for i in keep if bool(batch["has_image"][i])]
    if not keep:
        return
    prompts = [batch["prompts"][i] for i in keep]
    sources = None
    if task == "edit":
        sources = [im for i, im in enumerate(batch_images(batch, "source_images")) if i in keep]
    embeds, mask = adapter.encode_prompts(prompts, sources)
    neg, neg_mask = adapter.encode_prompts([""] * len(prompts), sources)
    bucket.embeds += _unpad(embeds, mask)
    bucket.neg_embeds += _unpad(neg, neg_mask)
    if need_target:
        lat = adapter.encode_images(batch["images"][keep])
        bucket.latents += list(lat)
    if sources is not None:
        src, size = adapter.encode_sources(sources)
        bucket.source_latents += list(src)
        bucket.source_size = size
    bucket.ids += [batch["ids"][i] for i in keep]
    bucket.categories += [batch["categories"][i] for i in keep]
    bucket.edit_types += [batch["edit_types"][i] for i in keep]
    bucket.prompts += prompts


def encode_dataset(
    adapter: QwenImageAdapter,
    root: str | Path,
    *,
    categories: dict[str, float] | None = None,
    aspects: dict[str, float] | None = None,
    tasks: tuple[str, ...] = ("t2i", "edit"),
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    need_target: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, int, int], Bucket]:
    """One pass of the shard loader over this rank's rows, encoded into buckets."""
    from flashctl.data.loader import ShardLoader

    buckets: dict[tuple[str, int, int], Bucket] = {}
    for task in tasks:
        loader = ShardLoader(root, batch_size=batch_size, task=task, categories=categories, aspects=aspects,
                             rank=rank, world_size=world_size, seed=seed)
        total = len(loader)
        for i, batch in enumerate(loader):
            encode_batch(adapter, batch, buckets, need_target)
            if progress:
                progress(i + 1, total)
    return {k: b for k, b in buckets.items() if len(b)}
