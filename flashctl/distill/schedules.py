"""The few-step student's schedule: its step draw for backward simulation, and the scheduler its
exported pipeline samples with (the sigma grid itself is `flashctl.flow.student_sigmas`).

The exported scheduler must reproduce exactly the training grid: a static-shift
FlowMatchEulerDiscreteScheduler with nothing that moves the grid (no dynamic shifting, no
shift_terminal); tests check it against the grid through diffusers' own timestep retrieval.
"""

from __future__ import annotations

import torch


def sample_student_step(generator: torch.Generator, steps: int) -> int:
    """Uniform student step index k in {0..steps-1} for backward simulation.

    Draw it from a generator seeded identically on every rank (e.g. by the global step) so
    all ranks run the same number of no-grad student passes before the graded one.
    """
    return int(torch.randint(steps, (1,), generator=generator).item())


STUDENT_SCHEDULER_OVERRIDES = {
    "use_dynamic_shifting": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}
"""Scheduler options that would move the exported student off its training grid: dynamic
(resolution-dependent) shifting replaces the static shift by exp(mu) at the pipeline's image
size, `shift_terminal` stretches the grid to end at e.g. 0.02 (Qwen-Image's: 4 steps at
[1, .80, .51, .02] instead of [1, .9, .75, .5]), and the sigma conversions / inversion /
stochastic steps change the levels or the update."""


def student_scheduler_config(teacher_config: dict, shift: float) -> dict:
    """Config of the student's FlowMatchEulerDiscreteScheduler, derived from the teacher's.

    The student is trained on `student_sigmas(S, shift)`; the scheduler written into the
    exported pipeline must give back exactly that grid when QwenImagePipeline calls
    `set_timesteps(sigmas=linspace(1, 1/S, S), mu=...)`. A static shift with every grid-moving
    option off does: sigma' = shift * sigma / (1 + (shift - 1) * sigma), then a terminal 0, for
    any `mu` (ignored without dynamic shifting). Other keys (e.g. `num_train_timesteps`) are kept.
    """
    if shift <= 0:
        raise ValueError(f"shift {shift} must be > 0")
    keep = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    return {**keep, **STUDENT_SCHEDULER_OVERRIDES, "shift": float(shift)}


def student_scheduler(teacher_scheduler, shift: float):
    """A new FlowMatchEulerDiscreteScheduler on the student's training grid (see
    `student_scheduler_config`); the teacher's scheduler is left as it is, so the teacher keeps
    sampling on its own schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(student_scheduler_config(teacher_scheduler.config, shift))
