"""DeepSpeed's JIT-compiled CPU ops, built ahead of the first run.

On the CPU accelerator DeepSpeed compiles a shared-memory allreduce op (`deepspeed_shm_comm`,
~50 s on 2 cores) the first time a process group starts, and CPUAdam (~80 s) the first time an
engine offloads its optimizer. Without this module that minute passes silently after
"starting runs/...". `make setup` runs

    python -m flashctl.distill.ops            # the shm comm op (what every CPU run needs)
    python -m flashctl.distill.ops --cpu-adam # also CPUAdam (deepspeed.offload_optimizer: cpu)

which compiles them into this virtual environment's own extension cache (`<venv>/torch_extensions`,
see `use_venv_cache`), where DeepSpeed's later `builder.load()` finds them. A failed build prints
one line and exits 0: set-up goes on.

Runs never compile the comm op themselves (`shm_op_or_gloo`): when it is not built, allreduce goes
through gloo and the run says so. Two things measured here make that the safe rule: torch's
extension build links with unquoted paths, so it fails in a clone whose path has a space; and a
build killed half-way (a cancelled job, a SIGKILLed grid) leaves torch's `lock` file behind, on
which every later run waits forever. A per-venv cache also keeps two clones (different DeepSpeed
source paths) from rebuilding each other's op.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from flashctl.launch import select_accelerator

SHM_COMM = "ShareMemCommBuilder"
CPU_ADAM = "CPUAdamBuilder"
DESCRIPTIONS = {SHM_COMM: "CPU shared-memory comm op", CPU_ADAM: "CPUAdam"}


def use_venv_cache() -> str:
    """Point torch's extension cache at `<venv>/torch_extensions` (unless TORCH_EXTENSIONS_DIR is
    set): ops built by this environment's `make setup`, for this environment's DeepSpeed."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def shm_op_or_gloo() -> bool:
    """Before a CPU process group starts: keep DeepSpeed's shm allreduce op if it is built, else
    switch it off so DeepSpeed uses gloo instead of compiling at run time. Returns whether the op
    is used. Call after DS_ACCELERATOR=cpu is set and before `deepspeed.init_distributed`."""
    use_venv_cache()
    builder = _builder(SHM_COMM)
    if builder is None:
        return False
    if op_is_built(SHM_COMM):
        return True
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[builder.NAME] = False  # read by deepspeed.comm's build_shm_op
    return False


def _builder(name: str):
    select_accelerator("cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None  # DeepSpeed itself would not build it here (e.g. not Linux): nothing to wait for
    return builder


def op_is_built(name: str = SHM_COMM) -> bool:
    """Whether DeepSpeed's op `name` is already compiled in torch's extension cache (no build).

    Used to say, before a run starts its process group, that a one-time compile is coming.
    """
    from torch.utils.cpp_extension import _get_build_directory

    builder = _builder(name)
    if builder is None:
        return True  # nothing to compile on this accelerator
    folder = _get_build_directory(builder.NAME, verbose=False)
    return os.path.isfile(os.path.join(folder, f"{builder.NAME}.so"))


def build_op(name: str) -> float:
    """Compile (or load, if cached) DeepSpeed op `name`; returns the seconds it took."""
    t0 = time.perf_counter()
    builder = _builder(name)
    if builder is None:
        raise RuntimeError(f"DeepSpeed does not build {name} on this machine")
    builder.load(verbose=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-adam", action="store_true", help="also build CPUAdam (optimizer offload)")
    args = parser.parse_args(argv)
    names = [SHM_COMM] + ([CPU_ADAM] if args.cpu_adam else [])
    use_venv_cache()
    for name in names:
        what = DESCRIPTIONS[name]
        try:
            if op_is_built(name):
                print(f"DeepSpeed's {what}: already built", flush=True)
                continue
        except Exception:  # noqa: BLE001 -- cannot tell: try the build below
            pass
        print(f"building DeepSpeed's {what} (one time, about a minute on 2 cores) ...", flush=True)
        try:
            seconds = build_op(name)
        except Exception as exc:  # noqa: BLE001 -- set-up must go on; the first run retries
            reason = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
            print(f"DeepSpeed's {what} did not build ({reason[0][:200]}); runs use gloo's allreduce instead",
                  flush=True)
            continue
        print(f"DeepSpeed's {what} ready ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
