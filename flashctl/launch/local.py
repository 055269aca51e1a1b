"""Launch a distributed worker on this machine (torchrun or the deepspeed launcher).

The commands run the launchers through `sys.executable -m ...` so the worker uses the same
Python (and venv) as flashctl, whatever is first on PATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from flashctl.errors import UserError
from flashctl.launch import rank_env
from flashctl.spec import ExperimentSpec


def torchrun_command(spec: ExperimentSpec, worker_module: str, args: list[str], node_rank: int = 0) -> list[str]:
    """`torchrun` command line starting `python -m worker_module args` on every local rank."""
    launch = spec.launch
    if not 0 <= node_rank < launch.nnodes:
        raise UserError(f"launch.nnodes: node rank {node_rank} outside 0..{launch.nnodes - 1}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={launch.nproc_per_node}",
        f"--nnodes={launch.nnodes}",
        f"--node_rank={node_rank}",
        f"--master_addr={launch.master_addr}",
        f"--master_port={launch.master_port}",
        "-m",
        worker_module,
        *args,
    ]


def deepspeed_command(spec: ExperimentSpec, worker_module: str, args: list[str]) -> list[str]:
    """`deepspeed` launcher command line (LOCAL_RANK comes from the environment, not an arg).

    On CPU use `--num_gpus` (set here), not `--include localhost:0,1`: the CPU accelerator
    counts NUMA nodes, not ranks. With `launch.backend: hostfile` the hostfile is passed on.
    """
    launch = spec.launch
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={launch.nproc_per_node}",
        f"--master_addr={launch.master_addr}",
        f"--master_port={launch.master_port}",
    ]
    if launch.backend == "hostfile":
        if launch.hostfile is None:
            raise UserError("launch.hostfile: required when launch.backend is 'hostfile'")
        cmd += [f"--hostfile={launch.hostfile}", f"--num_nodes={launch.nnodes}"]
    return cmd + ["--no_local_rank", "--module", worker_module, *args]


def launch_command(spec: ExperimentSpec, worker_module: str, args: list[str]) -> list[str]:
    """The command of the launcher named by `launch.launcher`."""
    if spec.launch.launcher == "deepspeed":
        return deepspeed_command(spec, worker_module, args)
    return torchrun_command(spec, worker_module, args)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def env_for(spec: ExperimentSpec, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the launched job: `flashctl.launch.rank_env` (accelerator, threads,
    warnings) with this machine's cores shared by its ranks, plus the rendezvous address."""
    launch = spec.launch
    env = rank_env(launch.device, _cores() // launch.nproc_per_node, base)
    env["MASTER_ADDR"] = launch.master_addr
    env["MASTER_PORT"] = str(launch.master_port)
    return env


def run_ranks(spec: ExperimentSpec, nproc: int, worker_module: str, args: list[str]) -> int:
    """Run `python -m worker_module args` on `nproc` ranks of this machine under torchrun, as
    `distill` runs its workers (same environment, `launch.device`: gloo on CPU, NCCL on CUDA),
    whatever the spec's backend and node count; returns the exit code. A taken
    `launch.master_port` is replaced by a free one (one machine: any port does)."""
    from flashctl.system import free_port, port_free

    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be >= 1")
    launch = spec.launch.model_copy(update={"nproc_per_node": nproc, "nnodes": 1, "backend": "local"})
    if not port_free(launch.master_addr, launch.master_port):
        launch = launch.model_copy(update={"master_port": free_port(launch.master_addr)})
    spec = spec.model_copy(update={"launch": launch})
    return run_local(torchrun_command(spec, worker_module, args), env_for(spec))


def run_local(
    cmd: list[str], env: Mapping[str, str], log_path: str | Path | None = None, cwd: str | Path | None = None
) -> int:
    """Run `cmd`, streaming its output (and appending it to `log_path`); returns its exit code.

    A SIGTERM sent to this process is forwarded to the launcher, which forwards it to the
    ranks: they checkpoint and exit (see flashctl.distill.checkpoint.StopRequest).
    """
    log = open(log_path, "ab") if log_path is not None else None
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE if log else None,
        stderr=subprocess.STDOUT if log else None,
    )
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        if log is not None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reaches the launcher's process group too; give it time to stop its ranks.
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if log is not None:
            log.close()
