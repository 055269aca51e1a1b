"""DMD / DMD2 tensor maths for rectified-flow models, as pure functions.

The flow-matching basics (noising, x0/velocity, Euler, CFG, sigma grids) are in `flashctl.flow`;
this module holds what is specific to distribution matching.

The flow convention is written once, at the top of `flashctl/flow.py`.
Nothing here touches a model, a file or a global: the trainer feeds predictions in and takes
losses out, so every formula is unit-tested against hand-computed values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flashctl.flow import cfg_combine


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


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake)) = -log sigmoid(D(fake))."""
    return F.softplus(-fake_logits).mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: mean softplus(-D(real)) + mean softplus(D(fake))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def with_gradient(x: torch.Tensor, grad: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A scalar equal to `value` whose gradient w.r.t. `x` is `grad`: sum((x - sg(x)) * sg(grad)) + sg(value).

    Carries a gradient computed elsewhere (DMD2's GAN term: through the critic, w.r.t. the
    critic's input only) back into `x`'s graph, while the logged loss stays the real one."""
    return ((x - x.detach()) * grad.detach()).sum() + value.detach()


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


