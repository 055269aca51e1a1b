"""Flow-matching tensor maths (pure functions).

Convention (design §4): x_t = (1 - t) x0 + t eps, velocity v = eps - x0, so
x0 = x_t - t v and eps = x_t + (1 - t) v. `sigma` is a float or a tensor of shape (B,);
it is broadcast over the trailing dimensions of the latents.
"""

from __future__ import annotations

import torch


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    if isinstance(sigma, torch.Tensor) and sigma.dim() == 1:
        return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return sigma


def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma eps."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x0_hat = x_t - sigma v."""
    return x_t - _bcast(sigma, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """eps_hat = x_t + (1 - sigma) v."""
    return x_t + (1 - _bcast(sigma, x_t)) * v


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target v = eps - x0."""
    return eps - x0


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Static timestep shift s*sigma / (1 + (s-1)*sigma), as FlowMatchEulerDiscreteScheduler."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def cfg_combine(
    cond: torch.Tensor, uncond: torch.Tensor, scale: float, rescale: float = 0.0
) -> torch.Tensor:
    """Classifier-free guidance uncond + scale (cond - uncond), optionally norm-rescaled.

    `rescale` in [0, 1] blends towards the output rescaled to the per-token norm of `cond`
    (over the channel dimension); 1.0 is exactly what the diffusers Qwen-Image pipelines do
    whenever `true_cfg_scale > 1`.
    """
    comb = uncond + scale * (cond - uncond)
    if rescale <= 0:
        return comb
    rescaled = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    if rescale >= 1:
        return rescaled
    return rescale * rescaled + (1 - rescale) * comb
