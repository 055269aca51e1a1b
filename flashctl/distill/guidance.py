"""Teacher guidance policies (paper factor 2): which frozen teacher supplies the real score.

* ``single``: the base teacher for every sample.
* ``specialised``: the task's specialised teacher (if one is configured for the task) for
  every sample of that task; the base teacher otherwise.
* ``stepwise``: the base teacher anchors; the task's specialised teacher is used only when
  the student step k is in ``steps`` AND (if ``student_sigma_range`` is set) the student's
  input level sigma_k (its training grid, `flow.student_sigmas`) lies in [lo, hi]. To
  select by noise level alone, list every student step in ``steps``.

The teacher is chosen per batch, before the re-noise level tau of the DM gradient is drawn
(tau is drawn per sample, and one teacher forward serves the whole batch), so the noise-level
rule reads the student's level, which every sample of the batch shares.

The choice must be the same on every rank when teachers are ZeRO-3 partitioned: pass a
``student_step`` drawn from an RNG seeded by the global step (not per rank).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from flashctl.spec import GuidanceSpec

Policy = Literal["single", "specialised", "stepwise"]


def real_score_teacher(
    policy: Policy,
    task: str,
    student_step: int,
    sigma: float | None,
    base: str,
    specialised: Mapping[str, str],
    steps: Sequence[int],
    student_sigma_range: tuple[float, float] | None,
) -> str:
    """Name of the teacher whose (CFG) prediction is the real score for this batch;
    `sigma` is the student step's input level sigma_k (needed with a `student_sigma_range`)."""
    if policy == "single":
        return base
    expert = specialised.get(task)
    if expert is None:
        return base
    if policy == "specialised":
        return expert
    if policy == "stepwise":
        if student_step not in steps:
            return base
        if student_sigma_range is not None:
            if sigma is None:
                raise ValueError("stepwise guidance with a student_sigma_range needs the student step's sigma")
            lo, hi = student_sigma_range
            if not lo <= sigma <= hi:
                return base
        return expert
    raise ValueError(f"unknown guidance policy {policy!r}")


def teacher_for(guidance: GuidanceSpec, task: str, student_step: int, sigma: float | None) -> str:
    """`real_score_teacher` with the fields of a spec's GuidanceSpec; `sigma` = sigma_k of
    the student's training grid at `student_step`."""
    rng = guidance.student_sigma_range
    return real_score_teacher(
        guidance.policy,
        task,
        student_step,
        sigma,
        guidance.base,
        guidance.specialised,
        guidance.steps,
        tuple(rng) if rng is not None else None,
    )
