"""Task mixture (paper factor 3): which task (T2I or edit) a micro-step trains.

The draw depends only on (seed, global step, micro step), never on the rank or on past
draws, so every rank picks the same branch (a rank running T2I while another runs edit
would issue different ZeRO-3 gathers and hang) and a resumed run repeats the same sequence.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

TaskName = Literal["t2i", "edit"]


def task_for_step(global_step: int, micro_step: int, seed: int, edit_probability: float) -> TaskName:
    """"edit" with probability `edit_probability`, else "t2i", for this (seed, step, micro step)."""
    if not 0.0 <= edit_probability <= 1.0:
        raise ValueError(f"edit_probability {edit_probability} must be in [0, 1]")
    if global_step < 0 or micro_step < 0:
        raise ValueError(f"steps must be >= 0, got global {global_step}, micro {micro_step}")
    # numpy's SeedSequence hashes the whole tuple into well-mixed state (neighbouring steps
    # give independent draws); it needs non-negative entries, so fold the seed to 64 bits.
    rng = np.random.default_rng([seed & 0xFFFF_FFFF_FFFF_FFFF, global_step, micro_step])
    return "edit" if rng.random() < edit_probability else "t2i"
