"""DMD / DMD2 tensor maths for rectified-flow models, as pure functions.

Flow convention (Qwen-Image, diffusers' FlowMatchEulerDiscreteScheduler):

    x_t = (1 - t) * x0 + t * eps          t = sigma in [0, 1], t = 1 is pure noise
    v   = eps - x0                        what the transformer predicts
    x0  = x_t - t * v                     eps = x_t + (1 - t) * v

Tensors are packed latents (B, seq, C) or any (B, ...) layout; a timestep is a Python float,
a 0-d tensor or a per-sample tensor of shape (B,), broadcast over the trailing dimensions.
Nothing here touches a model, a file or a global: the trainer feeds predictions in and takes
losses out, so every formula is unit-tested against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _per_sample_mean_abs(x: torch.Tensor) -> torch.Tensor:
    return x.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)


def dmd_gradient(
    x: torch.Tensor, fake_x0: torch.Tensor, real_x0: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The DMD2 distribution-matching gradient in x0 space.

    g = (fake_x0 - real_x0) / mean(|x - real_x0|), the normaliser taken per sample over all
    non-batch dims and clamped below by `eps` (DMD2's adaptive weighting). Descending along g
    moves the student sample x towards the real (teacher) prediction.
    """
    weight = _per_sample_mean_abs(x - real_x0).clamp_min(eps)
    return (fake_x0 - real_x0) / weight


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Surrogate loss 0.5 * mse(x, sg(x - grad)) whose gradient w.r.t. x is grad / x.numel()."""
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x, target, reduction="mean")


def decoupled_dmd_gradient(
    x: torch.Tensor,
    fake_x0_dm: torch.Tensor,
    real_cond_x0_dm: torch.Tensor,
    real_cond_x0_ca: torch.Tensor,
    real_uncond_x0_ca: torch.Tensor,
    scale: float,
    ca_weight: float = 1.0,
    dm_weight: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Decoupled-DMD gradient: CFG-augmentation and distribution-matching terms at their own levels.

    After "Decoupled DMD: CFG Augmentation as the Spear, Distribution Matching as the Shield"
    (Liu et al., 2025, arXiv 2511.22677). With real_cfg = uncond + w (cond - uncond)
    = cond + (w - 1)(cond - uncond), the DMD2 direction fake - real_cfg splits into

        DM (distribution matching, the "shield"):  fake(tau_dm) - real_cond(tau_dm)
        CA (CFG augmentation, the "spear"):        -(w - 1) (real_cond(tau_ca) - real_uncond(tau_ca))

    each term evaluated on the student sample re-noised to its own level (the `*_dm` and `*_ca`
    predictions come from two re-noisings of `x`). We implement

        g = (dm_weight * DM + ca_weight * CA) / mean(|x - real_cfg(tau_ca)|)

    The normaliser is DMD2's, taken from the CFG prediction at the CA level (available without
    an extra network call), so with tau_dm == tau_ca and unit weights g equals
    dmd_gradient(x, fake, cfg_combine(cond, uncond, w)) exactly.
    """
    dm = fake_x0_dm - real_cond_x0_dm
    ca = -(scale - 1.0) * (real_cond_x0_ca - real_uncond_x0_ca)
    real_cfg_ca = cfg_combine(real_cond_x0_ca, real_uncond_x0_ca, scale)
    weight = _per_sample_mean_abs(x - real_cfg_ca).clamp_min(eps)
    return (dm_weight * dm + ca_weight * ca) / weight


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


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake)) = -log sigmoid(D(fake))."""
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def ca_tau_range(tau_min: float, tau_max: float, student_sigma: float) -> tuple[float, float]:
    """Decoupled-DMD's re-noise range of the CFG-augmentation term: [tau_min, min(tau_max, sigma_k)).

    Below the student step's input level sigma_k (Liu et al. 2025's recommended schedule). When
    sigma_k <= tau_min there is no room below it; the range then collapses to a sliver just
    above tau_min rather than silently using the full range.
    """
    high = min(tau_max, student_sigma)
    if high <= tau_min:
        high = min(1.0, tau_min + 1e-3)
    return tau_min, high


def sample_tau(generator: torch.Generator, batch: int, tau_min: float, tau_max: float) -> torch.Tensor:
    """Per-sample re-noise levels tau ~ U[tau_min, tau_max), shape (batch,), on the generator's device."""
    if not 0.0 <= tau_min < tau_max <= 1.0:
        raise ValueError(f"need 0 <= tau_min < tau_max <= 1, got {tau_min}, {tau_max}")
    u = torch.rand(batch, generator=generator, device=generator.device)
    return tau_min + (tau_max - tau_min) * u
