"""Starting the ranks of a job: on this machine (`local`), over a hostfile (`hostfile`), or as a
Slurm batch job (`slurm`).

The environment of a rank is one contract with two halves, both here: every launcher gives its
ranks `rank_env(...)`, and every process that imports deepspeed first calls
`select_accelerator(device)` (a rank started bare, without a launcher, still gets the right
accelerator). Standard library only: `flashctl --help` and the launchers pay nothing for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

COLLECTIVE_WARNING_FILTER = "ignore::FutureWarning:torch.distributed.c10d_logger"
"""torch >= 2.10 emits a FutureWarning from this module on every collective on every rank."""


def rank_env(device: str, threads: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) plus what every rank needs, whichever launcher starts it.

    * DS_ACCELERATOR=cpu on CPU: DeepSpeed would otherwise probe for a GPU. On CUDA a `cpu` left
      over from a CPU session is removed (DeepSpeed would ignore the GPU).
    * OMP_NUM_THREADS=`threads` on CPU (the node's cores // its ranks, so 2 ranks on 2 cores do
      not oversubscribe) unless `base` sets it; `threads=None` leaves it to `base`.
    * TOKENIZERS_PARALLELISM=false unless set: the tokenizers' thread pool would warn (and may
      deadlock) in the data loader's forked workers.
    * PYTHONWARNINGS gains COLLECTIVE_WARNING_FILTER (one warning per collective per rank).
    * PYTHONUNBUFFERED=1: rank output reaches the log as it is printed.
    """
    env = dict(os.environ if base is None else base)
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        if threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    elif env.get("DS_ACCELERATOR") == "cpu":
        del env["DS_ACCELERATOR"]
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    warn = env.get("PYTHONWARNINGS", "")
    if COLLECTIVE_WARNING_FILTER not in warn.split(","):
        env["PYTHONWARNINGS"] = ",".join(w for w in (warn, COLLECTIVE_WARNING_FILTER) if w)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def select_accelerator(device: str) -> None:
    """Make DeepSpeed use the CPU accelerator when `device` is "cpu" (no-op on CUDA).

    DeepSpeed picks its accelerator once, when first imported, from DS_ACCELERATOR: set it
    before `import deepspeed`. If deepspeed was already imported without it, the choice is made
    and wrong, which is a RuntimeError here rather than a CUDA error deep inside DeepSpeed.
    """
    if device != "cpu":
        return
    if "deepspeed" in sys.modules and os.environ.get("DS_ACCELERATOR") != "cpu":
        raise RuntimeError("deepspeed was imported before DS_ACCELERATOR=cpu was set")
    os.environ["DS_ACCELERATOR"] = "cpu"
