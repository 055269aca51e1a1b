"""Flow-matching maths every trainer uses (teacher SFT, DMD2, sampling), as pure functions.

Flow convention (Qwen-Image, diffusers' FlowMatchEulerDiscreteScheduler):

    x_t = (1 - t) * x0 + t * eps          t = sigma in [0, 1], t = 1 is pure noise
    v   = eps - x0                        what the transformer predicts
    x0  = x_t - t * v                     eps = x_t + (1 - t) * v

Tensors are packed latents (B, seq, C) or any (B, ...) layout; a timestep is a Python float,
a 0-d tensor or a per-sample tensor of shape (B,), broadcast over the trailing dimensions.
Nothing here touches a model, a file or a global: the trainer feeds predictions in and takes
losses out, so every formula is unit-tested against hand-computed values. The ground floor of
the package: models/, distill/, teacher and evaluate all import their flow maths from here.

Sigma grids: the student samples on the grid diffusers' QwenImagePipeline builds for a
static-shift FlowMatchEulerDiscreteScheduler, sigmas = linspace(1, 1/N, N) warped by the
shift s * sigma / (1 + (s - 1) * sigma), then a terminal 0; computed here as a tensor because
the trainer needs the grid without the scheduler's per-call state (tests check both agree).
"""

from __future__ import annotations

import torch

Time = float | torch.Tensor


def expand_t(t: Time, like: torch.Tensor) -> torch.Tensor:
    """A timestep as a tensor that broadcasts against `like` (B, ...): (B,) -> (B, 1, ..., 1)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"timestep of shape {tuple(t.shape)} does not match batch {like.shape[0]}")
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: Time) -> torch.Tensor:
    """Noise clean latents to level t: (1 - t) x0 + t eps."""
    t = expand_t(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = eps - x0."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, t: Time, v: torch.Tensor) -> torch.Tensor:
    """Clean-sample prediction from a velocity prediction: x0 = x_t - t v."""
    return x_t - expand_t(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, t: Time, v: torch.Tensor) -> torch.Tensor:
    """Noise prediction from a velocity prediction: eps = x_t + (1 - t) v."""
    return x_t + (1 - expand_t(t, x_t)) * v


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma: Time, sigma_next: Time) -> torch.Tensor:
    """One Euler step of the flow ODE from sigma to sigma_next: x + (sigma_next - sigma) v.

    The same update as diffusers' FlowMatchEulerDiscreteScheduler.step (deterministic branch).
    """
    return x_t + (expand_t(sigma_next, x_t) - expand_t(sigma, x_t)) * v


def cfg_combine(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0, dim: int = -1
) -> torch.Tensor:
    """Classifier-free guidance uncond + scale (cond - uncond), optionally norm-rescaled.

    `rescale` = 1 is QwenImagePipeline's true-CFG renormalisation: the combined prediction is
    scaled so its norm along `dim` (the channel dim of packed latents) equals the conditional
    prediction's; values in (0, 1) interpolate between the plain and the renormalised output.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"cfg rescale {rescale} must be in [0, 1]")
    comb = uncond + scale * (cond - uncond)
    if rescale == 0.0:
        return comb
    cond_norm = torch.linalg.vector_norm(cond, dim=dim, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb, dim=dim, keepdim=True)
    renormed = comb * (cond_norm / comb_norm.clamp_min(torch.finfo(comb.dtype).tiny))
    return rescale * renormed + (1.0 - rescale) * comb


def flow_matching_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Flow-matching MSE between a velocity prediction and eps - x0 (critic / teacher training).

    `weight` (B,) optionally weights samples; the result is the mean over all elements.
    """
    err = (v_pred - velocity_target(x0, eps)) ** 2
    if weight is not None:
        err = err * expand_t(weight, err)
    return err.mean()


def sample_tau(generator: torch.Generator, batch: int, tau_min: float, tau_max: float) -> torch.Tensor:
    """Per-sample re-noise levels tau ~ U[tau_min, tau_max), shape (batch,), on the generator's device."""
    if not 0.0 <= tau_min < tau_max <= 1.0:
        raise ValueError(f"need 0 <= tau_min < tau_max <= 1, got {tau_min}, {tau_max}")
    u = torch.rand(batch, generator=generator, device=generator.device)
    return tau_min + (tau_max - tau_min) * u


# ------------------------------------------------------------------------------ sigma grids


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift s * sigma / (1 + (s - 1) * sigma); s = 1 is the identity."""
    if shift <= 0:
        raise ValueError(f"shift {shift} must be > 0")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def student_sigmas(steps: int, shift: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The student's sigma grid: `steps` shifted levels from 1 down, then a terminal 0.

    steps=4, shift=3 -> [1, 0.9, 0.75, 0.5, 0].
    """
    if steps < 1:
        raise ValueError(f"steps {steps} must be >= 1")
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    grid = torch.cat([shift_sigmas(base, shift), torch.zeros(1, dtype=torch.float64)])
    return grid.to(dtype)
