"""Reconstruction training of the tiny `AutoencoderKLQwenImage` and its latent statistics.

A randomly initialised VAE decodes noise, so the CPU-scale toy world trains the tiny VAE on
shapes images first (L1 + MSE + a small KL term), freezes it and then writes per-channel
`latents_mean` / `latents_std` into its config: the pipelines normalise latents with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image

Batch = torch.Tensor | list[Image.Image]


def images_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, 1, H, W) float tensor in [-1, 1] (the VAE's input)."""
    from diffusers.image_processor import VaeImageProcessor

    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
    w, h = images[0].size
    proc = VaeImageProcessor(vae_scale_factor=1)  # no resizing: the caller picks valid sizes
    return proc.preprocess([im.convert("RGB") for im in images], h, w).unsqueeze(2)


def _as_video(batch: Batch) -> torch.Tensor:
    if isinstance(batch, list):
        return images_to_tensor(batch)
    return batch if batch.dim() == 5 else batch.unsqueeze(2)


def _encode_moments(vae: Any, x: torch.Tensor) -> Any:
    """Posterior of a single-frame batch. Same maths as `vae.encode` for one frame (its frame
    cache only matters for videos), without the per-call cache bookkeeping."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(vae.quant_conv(vae.encoder(x)))


def _decode_unclamped(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode` for one frame without the final clamp to [-1, 1]: the clamp has zero
    gradient outside the range, which would stall training where the output overshoots."""
    return vae.decoder(vae.post_quant_conv(z))


def _batches(data: Iterable[Batch] | torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches: random draws from a (N, 3, [1,] H, W) tensor, or cycling an iterable."""
    if isinstance(data, torch.Tensor):
        data = _as_video(data)
        while True:
            idx = torch.randint(0, data.shape[0], (min(batch_size, data.shape[0]),), generator=gen)
            yield data[idx]
    while True:
        empty = True
        for batch in data:
            empty = False
            yield _as_video(batch)
        if empty:
            raise ValueError("train_vae: the image batches are empty")


def train_vae(
    vae: Any,
    data: Iterable[Batch] | torch.Tensor,
    steps: int,
    lr: float = 3e-4,
    seed: int = 0,
    batch_size: int = 16,
    kl_weight: float = 1e-4,
    latent_noise: float = 0.0,
    warmup_steps: int = 20,
    grad_clip: float = 1.0,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train `vae` in place to reconstruct images; returns metrics.

    `data`: a tensor of images in [-1, 1] (N, 3, H, W) or (N, 3, 1, H, W) sampled in random
    batches of `batch_size`, or an iterable of batches (tensors or lists of same-size PIL
    images; cycled). Loss: L1 + MSE of the unclamped reconstruction of the posterior mean
    (optionally perturbed by `latent_noise`), plus `kl_weight` x 0.5 mean^2 (the KL's mean
    term; the pipelines use the posterior mode, so the variance is not trained). AdamW with a
    linear warmup over `warmup_steps` and gradient-norm clipping at `grad_clip`: on this VAE,
    lr 1e-3 without them collapses after ~20 steps (L1 0.33 -> 0.57 and stuck); 3e-4 is
    stable. `progress(step, metrics)` is called every 10 steps and at the end.
    The VAE is left in eval mode without gradients. Metrics: loss/l1 of the first and last
    step (`*_first`, `*_last`), `steps`, `seconds`.
    """
    gen = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    vae.train().requires_grad_(True)
    params = [p for p in vae.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    batches = _batches(data, batch_size, gen)
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(steps):
        x = next(batches).to(device, next(vae.parameters()).dtype)
        post = _encode_moments(vae, x)
        z = post.mean
        if latent_noise > 0:
            z = z + latent_noise * torch.randn(z.shape, generator=gen).to(z)
        recon = _decode_unclamped(vae, z)
        l1 = (recon - x).abs().mean()
        mse = ((recon - x) ** 2).mean()
        kl = 0.5 * (post.mean**2).mean()  # the mean part of the KL, per latent element
        loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        warm.step()
        cur = {"loss": loss.item(), "l1": l1.item(), "mse": mse.item()}
        if step == 0:
            metrics.update({f"{k}_first": v for k, v in cur.items()})
        if progress is not None and (step % 10 == 0 or step == steps - 1):
            progress(step, cur)
        metrics.update({f"{k}_last": v for k, v in cur.items()})
    vae.eval().requires_grad_(False)
    metrics["steps"] = float(steps)
    metrics["seconds"] = time.perf_counter() - start
    return metrics


@torch.no_grad()
def reconstruction_l1(vae: Any, images: Batch) -> float:
    """Mean L1 error of `vae.encode` (mode) -> `vae.decode` on images in [-1, 1]."""
    x = _as_video(images).to(next(vae.parameters()).device, next(vae.parameters()).dtype)
    z = vae.encode(x).latent_dist.mode()
    return (vae.decode(z).sample - x).abs().mean().item()


@torch.no_grad()
def set_latent_stats(vae: Any, images: Iterable[Batch] | torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean / std of the posterior-mode latents of `images`, written into the VAE
    config (`latents_mean`, `latents_std`, which the pipelines normalise with). Returns them."""
    batches = [images] if isinstance(images, torch.Tensor) else images
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    total = torch.zeros(vae.config.z_dim, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for batch in batches:
        x = _as_video(batch).to(device, dtype)
        for chunk in x.split(64):
            z = vae.encode(chunk).latent_dist.mode().double().cpu()
            total += z.sum(dim=(0, 2, 3, 4))
            total_sq += (z**2).sum(dim=(0, 2, 3, 4))
            count += z[:, 0].numel()
    if count == 0:
        raise ValueError("set_latent_stats: no images")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return mean.tolist(), std.tolist()
