"""Teacher guidance policies (paper factor 2): which frozen teacher supplies the real score.

* ``single``: the base teacher for every sample.
* ``specialised``: the task's specialised teacher (if one is configured for the task) for
  every sample of that task; the base teacher otherwise.
* ``stepwise``: the base teacher anchors; the task's specialised teacher is used only when
  the student step is in ``steps`` AND (if ``sigma_range`` is set) the re-noise level tau lies
  in [lo, hi]. To select by noise range alone, list every student step in ``steps``.

The choice must be the same on every rank when teachers are ZeRO-3 partitioned: pass a
``student_step`` and ``tau`` drawn from an RNG seeded by the global step (not per rank).
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
    tau: float | None,
    base: str,
    specialised: Mapping[str, str],
    steps: Sequence[int],
    sigma_range: tuple[float, float] | None,
) -> str:
    """Name of the teacher whose (CFG) prediction is the real score for this sample."""
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
        if sigma_range is not None:
            if tau is None:
                raise ValueError("stepwise guidance with a sigma_range needs the re-noise level tau")
            lo, hi = sigma_range
            if not lo <= tau <= hi:
                return base
        return expert
    raise ValueError(f"unknown guidance policy {policy!r}")


def teacher_for(guidance: GuidanceSpec, task: str, student_step: int, tau: float | None) -> str:
    """`real_score_teacher` with the fields of a spec's GuidanceSpec."""
    return real_score_teacher(
        guidance.policy,
        task,
        student_step,
        tau,
        guidance.base,
        guidance.specialised,
        guidance.steps,
        tuple(guidance.sigma_range) if guidance.sigma_range is not None else None,
    )
