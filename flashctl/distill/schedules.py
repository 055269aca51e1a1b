"""Sigma (timestep) schedules of the few-step student, as pure functions.

The student samples on the grid diffusers' QwenImagePipeline builds for a static-shift
FlowMatchEulerDiscreteScheduler: sigmas = linspace(1, 1/N, N), warped by the shift
s * sigma / (1 + (s - 1) * sigma), then a terminal 0. We compute it here instead of
instantiating the scheduler because the trainer needs the grid as a tensor without the
scheduler's per-call state (step index, timesteps x 1000); tests check both agree.
"""

from __future__ import annotations

import torch


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


def sample_student_step(generator: torch.Generator, steps: int) -> int:
    """Uniform student step index k in {0..steps-1} for backward simulation.

    Draw it from a generator seeded identically on every rank (e.g. by the global step) so
    all ranks run the same number of no-grad student passes before the graded one.
    """
    return int(torch.randint(steps, (1,), generator=generator).item())
