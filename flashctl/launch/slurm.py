"""Slurm launch (`launch.backend: slurm`): sbatch scripts, job arrays, submission, job state.

One distillation run is one batch job: one `srun` task per node, each running `torchrun` with
c10d rendezvous on the first node, which starts `launch.nproc_per_node` ranks there.

Time limits: the job asks Slurm for SIGUSR1 on the *batch shell* `signal_lead_s(spec)` seconds
before its limit (`--signal=B:USR1@...`). The shell's trap sends SIGTERM to the `srun` step (srun
forwards signals to its tasks, torchrun to its ranks, with `--shutdown-timeout` long enough for
the ranks to write a checkpoint: see flashctl.distill.checkpoint.StopRequest), waits for the
step, then `scontrol requeue`s the job so it resumes from that checkpoint. The lead is derived
from the checkpoint's size (`signal_lead_s`): the round in progress, then writing the ZeRO
state of student and critic at a conservative per-node write rate, then the requeue. USR1 rather than
TERM because `scancel` also sends TERM to the batch shell, and a cancelled job must stay
cancelled: on TERM the step is stopped the same way but nothing is requeued. `--requeue` also
lets Slurm requeue the job after a node failure or preemption; `--open-mode=append` keeps the
earlier logs.

CPUs: `srun` gets `--cpus-per-task` explicitly (`launch.slurm.cpus_per_task`): since Slurm
22.05 srun no longer inherits sbatch's `--cpus-per-task`, and a step without it binds all of a
node's ranks to one CPU.

Weights: when the spec names hub ids, one `srun` task per node first resolves (downloads) them
into the Hugging Face cache (`python -m flashctl.launch.slurm prefetch SPEC`, the same calls the
worker makes), and the training step then runs with `HF_HUB_OFFLINE=1`: the ranks read the
cache instead of racing each other to the hub.

Job arrays (`render_array`): one task per ablation cell, `%N` tasks at a time; each task reads
line SLURM_ARRAY_TASK_ID + 1 of a cells file (`cell_id<TAB>command`) and runs that command.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from flashctl.errors import UserError
from flashctl.io import atomic_write_text
from flashctl.launch import rank_env
from flashctl.spec import ExperimentSpec

ROUND_ALLOWANCE_S = 120
"""The worker checks for a stop after each DMD2 round: time for the round in progress to end."""
REQUEUE_ALLOWANCE_S = 60
"""After the checkpoint: torchrun's teardown and `scontrol requeue` before the limit."""
CHECKPOINT_WRITE_BYTES_PER_S = 0.5 * 1024**3
"""Assumed write rate of one node to the checkpoint filesystem (conservative for a parallel
filesystem, about right for NFS); every node writes its ranks' partitions at the same time."""
SIGNAL_LEAD_MIN_S = 180
"""Floor of the lead (small models: the allowances alone)."""
CHECKPOINT_BYTES_PER_PARAM = {"fp32": 12, "bf16": 14, "fp16": 14}
"""Bytes per trainable parameter in a DeepSpeed ZeRO checkpoint: the model-state partition
(4 B fp32, or 2 B 16-bit) + Adam's fp32 state (master copy 4 B in 16-bit training, exp_avg and
exp_avg_sq 8 B)."""
CELLS_FILE = "slurm-cells.tsv"
ARRAY_SCRIPT = "slurm-array.sbatch"
JOB_SCRIPT = "slurm.sbatch"

TERMINAL_STATES = frozenset(
    {
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
        "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
    }
)  # fmt: skip
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------
# Rendering


def _job_name(name: str) -> str:
    return "flashctl-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", name)[:60]


def checkpoint_bytes(spec: ExperimentSpec) -> int:
    """Bytes one checkpoint writes (all ranks together): student and critic, each
    `CHECKPOINT_BYTES_PER_PARAM` x the transformer's parameters (counted from its config, as
    `plan` does). 0 when the student's model cannot be sized from the spec."""
    from flashctl.plan import model_configs, model_size

    init = spec.model.init_from
    path = spec.teachers[init].path if init in spec.teachers else init
    try:
        configs, source = model_configs(path, spec.model.tiny, "model.init_from")
    except UserError:
        return 0
    if "transformer" not in configs:
        return 0
    params = model_size(configs["transformer"], "transformer", source).total
    return 2 * CHECKPOINT_BYTES_PER_PARAM[spec.deepspeed.precision] * params


def signal_lead_s(spec: ExperimentSpec, ckpt_bytes: int | None = None) -> int:
    """Seconds before the time limit at which the job is told to stop (`--signal=B:USR1@lead`):

        lead = ROUND_ALLOWANCE_S + ceil(checkpoint_bytes / nnodes / CHECKPOINT_WRITE_BYTES_PER_S)
               + REQUEUE_ALLOWANCE_S,   rounded up to 30 s, at least SIGNAL_LEAD_MIN_S.

    Qwen-Image (20.4B, bf16) on 8 nodes: 2 x 14 B x 20.4B = 533 GiB, 67 GiB per node, 134 s to
    write -> 330 s; on 1 node -> 1260 s. torchrun's shutdown grace is the lead less the requeue
    allowance (`shutdown_grace_s`).
    """
    import math

    if ckpt_bytes is None:
        ckpt_bytes = checkpoint_bytes(spec)
    write = math.ceil(ckpt_bytes / spec.launch.nnodes / CHECKPOINT_WRITE_BYTES_PER_S)
    lead = ROUND_ALLOWANCE_S + write + REQUEUE_ALLOWANCE_S
    return max(SIGNAL_LEAD_MIN_S, 30 * math.ceil(lead / 30))


def shutdown_grace_s(lead_s: int) -> int:
    """torchrun's wait between forwarding SIGTERM to the ranks and killing them."""
    return lead_s - REQUEUE_ALLOWANCE_S


def time_limit_s(value: str) -> int | None:
    """Seconds of a Slurm `--time` value (`MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
    `D-HH:MM:SS`); None for `UNLIMITED`/`INFINITE` or a form it does not know."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if m is None:
        return None
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if c is not None:  # HH:MM:SS
        return int(a) * 3600 + int(b) * 60 + int(c)
    return int(a) * 60 + int(b or 0)  # MM[:SS]


def _sbatch_header(spec: ExperimentSpec, job_name: str, output: Path, error: Path, lead_s: int) -> list[str]:
    """`#SBATCH` lines shared by single jobs and arrays."""
    launch, slurm = spec.launch, spec.launch.slurm
    limit = time_limit_s(slurm.time)
    if limit is not None and limit <= lead_s:
        raise UserError(f"launch.slurm.time: {slurm.time} leaves no time to train: the stop signal comes "
                        f"{lead_s} s before the limit (time to write a checkpoint of this model)")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={launch.nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --cpus-per-task={slurm.cpus_per_task}",
    ]
    if launch.device == "cuda":
        if slurm.gpus_per_node < 1:
            raise UserError("launch.slurm.gpus_per_node: must be >= 1 when launch.device is 'cuda'")
        if launch.nproc_per_node > slurm.gpus_per_node:
            raise UserError(
                f"launch.nproc_per_node: {launch.nproc_per_node} ranks per node but "
                f"launch.slurm.gpus_per_node is {slurm.gpus_per_node}"
            )
        lines.append(f"#SBATCH --gpus-per-node={slurm.gpus_per_node}")
    if slurm.partition:
        lines.append(f"#SBATCH --partition={slurm.partition}")
    if slurm.account:
        lines.append(f"#SBATCH --account={slurm.account}")
    lines += [
        f"#SBATCH --time={slurm.time}",
        f"#SBATCH --output={output}",
        f"#SBATCH --error={error}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{lead_s}",
    ]
    return lines


def _exports(env: Mapping[str, str]) -> list[str]:
    out = []
    for key, value in env.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"environment variable name {key!r} is not valid in a shell")
        out.append(f"export {key}={shlex.quote(str(value))}")
    return out


def _worker_args_for_torchrun(argv: Sequence[str]) -> list[str]:
    """torchrun's tail for a rank command: `-m mod args`, `script.py args` or `--no-python cmd`."""
    argv = list(argv)
    if not argv:
        raise ValueError("empty command")
    is_python = Path(argv[0]).name.startswith("python") or argv[0] == sys.executable
    if is_python and len(argv) >= 3 and argv[1] == "-m":
        return ["-m", *argv[2:]]
    if is_python and len(argv) >= 2 and argv[1].endswith(".py"):
        return argv[1:]
    return ["--no-python", *argv]


def _rank_env(spec: ExperimentSpec, env: Mapping[str, str] | None) -> dict[str, str]:
    """`env` plus `flashctl.launch.rank_env`, the task's CPUs shared by the node's ranks."""
    launch = spec.launch
    return rank_env(launch.device, launch.slurm.cpus_per_task // launch.nproc_per_node, env or {})


_TERM_TRAP = """\
# USR1 shortly before the time limit (--signal=B:USR1): the step gets SIGTERM, its ranks write
# a checkpoint and exit, then the job is requeued and resumes from that checkpoint. A plain
# SIGTERM (scancel, preemption) is forwarded too, without requeueing.
FLASHCTL_REQUEUE=0
STEP_PID=
_flashctl_stop() {
    echo "flashctl: $1 at $(date -Is): stopping step ${STEP_PID:-none}${2:+, then requeueing job $SLURM_JOB_ID}" >&2
    [ -n "$2" ] && FLASHCTL_REQUEUE=1
    [ -n "$STEP_PID" ] && {STOP} 2>/dev/null || true
}
trap '_flashctl_stop USR1 requeue' USR1
trap '_flashctl_stop TERM ""' TERM
"""

_WAIT_STEP = """\
rc=0
wait "$STEP_PID" || rc=$?
if [ "$FLASHCTL_REQUEUE" = 1 ]; then
    # `wait` returned early because of the trap: wait for the step itself to finish.
    while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID" || rc=$?; done
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID" || rc=$?; done
exit "$rc"
"""


def render_sbatch(
    spec: ExperimentSpec,
    run_dir: str | Path,
    command_argv: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> str:
    """The sbatch script of one distillation run.

    `command_argv` is what every rank runs (e.g. `[python, -m, flashctl.distill.worker,
    --run-dir, RUN]`); it is started by `srun` (one task per node) + `torchrun --nnodes
    $SLURM_NNODES --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:PORT`.
    `env` is exported in the script (use `hostfile.node_env(spec)`) with `flashctl.launch.rank_env`
    added (on CPU DS_ACCELERATOR=cpu and OMP_NUM_THREADS). Logs go to RUN/slurm-%j.out/.err. No GPU request on CPU.
    """
    run_dir = Path(run_dir).resolve()
    launch = spec.launch
    lead = signal_lead_s(spec)
    lines = _sbatch_header(spec, _job_name(spec.run.name), run_dir / "slurm-%j.out", run_dir / "slurm-%j.err", lead)
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    lines += _exports(_rank_env(spec, env))
    cpus = f"--cpus-per-task={launch.slurm.cpus_per_task}"
    # The shell expands the $VARIABLES of the torchrun options; the rank command is quoted as is.
    torchrun = [
        shlex.quote(sys.executable), "-m", "torch.distributed.run",
        "--nnodes", '"$SLURM_NNODES"',
        "--nproc_per_node", str(launch.nproc_per_node),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", '"$MASTER_ADDR:$MASTER_PORT"',
        "--rdzv_id", '"$SLURM_JOB_ID"',
        "--shutdown-timeout", str(shutdown_grace_s(lead)),
    ]  # fmt: skip
    quoted = " ".join(torchrun + [shlex.quote(a) for a in _worker_args_for_torchrun(command_argv)])
    lines += [
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        f"export MASTER_PORT={launch.master_port}",
        (
            'echo "flashctl: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}, '
            'master $MASTER_ADDR:$MASTER_PORT"'
        ),
        "",
    ]
    hub = hub_models(spec)
    if hub:
        spec_file = shlex.quote(str(run_dir / "spec.resolved.yaml"))
        lines += [
            f"# Hub weights ({', '.join(hub)}): resolved once per node before the ranks start, then read offline.",
            f"srun --ntasks-per-node=1 {cpus} {shlex.quote(sys.executable)} -m flashctl.launch.slurm prefetch {spec_file} "
            '|| { echo "flashctl: could not resolve the model weights (see above)" >&2; exit 1; }',
            "export HF_HUB_OFFLINE=1",
            "",
        ]
    lines += [
        # SIGTERM to srun itself makes it cancel the step (SIGKILL after a moment); `scancel
        # --signal` delivers TERM to the step's tasks and leaves their shutdown to them.
        _TERM_TRAP.replace("{STOP}", 'scancel --signal=TERM "$SLURM_JOB_ID"'),
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {cpus} {quoted} &",
        "STEP_PID=$!",
        _WAIT_STEP,
    ]
    return "\n".join(lines)


def cells_file_text(cells: Sequence[tuple[str, Sequence[str], Mapping[str, str]]]) -> str:
    """The cells file of an array: `cell_id<TAB>env K=V ... argv` per line, shell-quoted."""
    out = []
    for cell_id, argv, env in cells:
        if not cell_id or any(c in cell_id for c in "\t\n\r"):
            raise ValueError(f"cell id {cell_id!r} must be non-empty without tabs or newlines")
        if not argv:
            raise ValueError(f"cell {cell_id!r}: empty command")
        assigns = []
        for key, value in env.items():
            if not _ENV_KEY.match(key):
                raise ValueError(f"cell {cell_id!r}: environment variable name {key!r} is not valid")
            assigns.append(f"{key}={value}")
        command = shlex.join(["env", *assigns, *argv]) if assigns else shlex.join(list(argv))
        if "\n" in command:
            raise ValueError(f"cell {cell_id!r}: command contains a newline")
        out.append(f"{cell_id}\t{command}\n")
    return "".join(out)


def render_array(
    spec: ExperimentSpec,
    cells: Sequence[tuple[str, Sequence[str], Mapping[str, str]]],
    grid_dir: str | Path,
    env: Mapping[str, str] | None = None,
) -> str:
    """The sbatch script of a job array running one ablation cell per task.

    `cells` is [(cell_id, argv, env)]; each task runs its cell's argv (typically
    `flashctl distill SPEC k=v ...` with MLFLOW_RUN_ID in its env) in its own allocation of
    the spec's resources. `launch.slurm.array_parallel` tasks run at a time. The cells file
    `GRID/slurm-cells.tsv` must be written beside it (`write_array` does both); logs go to
    GRID/logs/%A_%a.out/.err. A task that gets the time-limit SIGTERM requeues itself.
    """
    if not cells:
        raise ValueError("an array needs at least one cell")
    grid_dir = Path(grid_dir).resolve()
    cells_file = grid_dir / CELLS_FILE
    n, par = len(cells), spec.launch.slurm.array_parallel
    name = _job_name(f"{spec.run.name}-grid")
    lines = _sbatch_header(spec, name, grid_dir / "logs" / "%A_%a.out", grid_dir / "logs" / "%A_%a.err",
                           signal_lead_s(spec))
    lines.insert(2, f"#SBATCH --array=0-{n - 1}%{par}")
    lines += ["", "set -uo pipefail", f"cd {shlex.quote(str(Path.cwd()))}"]
    lines += _exports(_rank_env(spec, env))
    lines += [
        f"CELLS={shlex.quote(str(cells_file))}",
        'LINE="$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$CELLS")"',
        'if [ -z "$LINE" ]; then echo "flashctl: no cell $SLURM_ARRAY_TASK_ID in $CELLS" >&2; exit 2; fi',
        'CELL_ID="${LINE%%$\'\\t\'*}"',
        'CELL_CMD="${LINE#*$\'\\t\'}"',
        "export FLASHCTL_CELL_ID=\"$CELL_ID\"",
        (
            'echo "flashctl: array task $SLURM_ARRAY_TASK_ID = cell $CELL_ID on $(hostname), '
            'restart ${SLURM_RESTART_COUNT:-0}"'
        ),
        "",
        _TERM_TRAP.replace("{STOP}", 'kill -TERM "$STEP_PID"'),
        'eval "exec $CELL_CMD" &',
        "STEP_PID=$!",
        _WAIT_STEP,
    ]
    return "\n".join(lines)


def write_sbatch(
    spec: ExperimentSpec, run_dir: str | Path, command_argv: Sequence[str], env: Mapping[str, str] | None = None
) -> Path:
    """Write `RUN/slurm.sbatch` (`render_sbatch`) and return its path."""
    return save_sbatch(run_dir, render_sbatch(spec, run_dir, command_argv, env))


def save_sbatch(run_dir: str | Path, script: str) -> Path:
    """Write a rendered job script as `RUN/slurm.sbatch`, executable, atomically (a script cut
    short by a crash is never submitted); return its path."""
    path = Path(run_dir) / JOB_SCRIPT
    atomic_write_text(path, script, executable=True)
    return path


def write_array(
    spec: ExperimentSpec,
    cells: Sequence[tuple[str, Sequence[str], Mapping[str, str]]],
    grid_dir: str | Path,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Write `GRID/slurm-cells.tsv` + `GRID/slurm-array.sbatch` (+ GRID/logs/); return the script."""
    grid_dir = Path(grid_dir)
    (grid_dir / "logs").mkdir(parents=True, exist_ok=True)
    script = render_array(spec, cells, grid_dir, env)
    atomic_write_text(grid_dir / CELLS_FILE, cells_file_text(cells))
    path = grid_dir / ARRAY_SCRIPT
    atomic_write_text(path, script, executable=True)
    return path


# --------------------------------------------------------------------------------------------
# Submission and state


def _require(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise UserError(
            f"launch.backend: 'slurm' needs Slurm's `{tool}` command, which is not on PATH "
            "(run on a Slurm login node, or use launch.backend: local / hostfile)"
        )
    return found


def submit(script_path: str | Path) -> str:
    """Submit a batch script with `sbatch --parsable`; returns the job id."""
    sbatch = _require("sbatch")
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        first = (proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}").splitlines()[0]
        raise UserError(f"sbatch {script_path}: {first}")
    return proc.stdout.strip().split(";")[0]


def _run(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout if proc.returncode == 0 else None


def job_states(job_id: str) -> dict[str, str]:
    """State of every record of a job ({"123": "COMPLETED"} or {"123_0": ..., "123_1": ...}).

    Asks sacct (the accounting database, which remembers old jobs) first, then `scontrol show
    job` (jobs still in the controller's memory, MinJobAge), then squeue. {} if none knows it.
    """
    out = _run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", "JobID,State"])
    states: dict[str, str] = {}
    if out:
        for line in out.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid.strip()] = state.split()[0] if state.split() else "UNKNOWN"
        if states:
            return states
    out = _run(["scontrol", "-o", "show", "job", str(job_id)])
    if out:
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            jid = fields.get("JobId", str(job_id))
            if fields.get("ArrayTaskId"):
                jid = f"{fields.get('ArrayJobId', job_id)}_{fields['ArrayTaskId']}"
            if "JobState" in fields:
                states[jid] = fields["JobState"]
        if states:
            return states
    out = _run(["squeue", "-h", "-j", str(job_id), "-o", "%i|%T"])
    if out:
        for line in out.splitlines():
            if "|" in line:
                jid, state = line.split("|", 1)
                states[jid.strip()] = state.strip()
    return states


def job_state(job_id: str) -> str:
    """One state for a job or a whole array: PENDING/RUNNING while any record is not finished,
    COMPLETED when all completed, else the first failure state; UNKNOWN if Slurm has no record."""
    _require("squeue")
    states = job_states(job_id)
    if not states:
        return "UNKNOWN"
    values = list(states.values())
    active = [s for s in values if s not in TERMINAL_STATES]
    if active:
        return "RUNNING" if "RUNNING" in active else active[0]
    failed = [s for s in values if s != "COMPLETED"]
    return failed[0] if failed else "COMPLETED"


def wait_for(job_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll `job_state` until the job (all of an array) is in a terminal state or `timeout_s`
    passes; returns the last state seen."""
    import time

    deadline = time.monotonic() + timeout_s
    state = job_state(job_id)
    while state not in TERMINAL_STATES and time.monotonic() < deadline:
        time.sleep(poll_s)
        state = job_state(job_id)
    return state


def array_task_states(job_id: str, n_tasks: int) -> dict[int, str]:
    """State of tasks 0..n_tasks-1 of array `job_id` ({} when Slurm has no record of the job).

    While tasks wait, Slurm lists them as one pending range (`123_[2-4%2]`) or not at all: a task
    without a record of its own is PENDING as long as Slurm still knows the array.
    """
    states = job_states(job_id)
    if not states:
        return {}
    return {i: states.get(f"{job_id}_{i}", "PENDING") for i in range(n_tasks)}


# --------------------------------------------------------------------------------------------
# Weights, resolved once per node


def _held_model_paths(spec: ExperimentSpec) -> dict[str, str]:
    """Spec path per role the worker loads: `base` (the whole pipeline: text encoder, VAE,
    scheduler, processor), every held teacher's and the student's transformer."""
    paths = {"base": spec.teachers[spec.guidance.base].path} if spec.guidance.base in spec.teachers else {}
    for name in spec.teachers_held():
        if name in spec.teachers:
            paths[f"teacher {name}"] = spec.teachers[name].path
    init = spec.model.init_from
    paths["student"] = spec.teachers[init].path if init in spec.teachers else init
    return paths


def hub_models(spec: ExperimentSpec) -> list[str]:
    """Hub ids among the models the worker loads (not `builtin:` names, not local folders)."""
    from flashctl.pipelines import resolve_model_path

    out = []
    for path in _held_model_paths(spec).values():
        try:
            resolved = resolve_model_path(path)
        except UserError:
            continue  # the worker reports it with its field
        if not Path(resolved).is_dir():
            out.append(resolved)
    return list(dict.fromkeys(out))


def prefetch_weights(spec: ExperimentSpec) -> list[str]:
    """Download (or find in the Hugging Face cache) the hub weights the worker will load, with
    the worker's own calls: the base pipeline as `DiffusionPipeline.from_pretrained` fetches it,
    and each transformer as `models.weights.transformer_folder` does. Returns the ids."""
    from diffusers import DiffusionPipeline

    from flashctl.models.weights import transformer_folder

    hub = hub_models(spec)
    base = spec.teachers[spec.guidance.base].path if spec.guidance.base in spec.teachers else None
    for repo in hub:
        if repo == base:
            DiffusionPipeline.download(repo, use_safetensors=True)
        transformer_folder(repo)
    return hub


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flashctl.launch.slurm prefetch SPEC`: the sbatch script's weight step."""
    import argparse

    from flashctl.spec import SpecError, load_spec

    parser = argparse.ArgumentParser(prog="python -m flashctl.launch.slurm")
    parser.add_argument("command", choices=["prefetch"])
    parser.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    try:
        ids = prefetch_weights(load_spec(args.spec))
    except (UserError, SpecError) as exc:
        print(f"flashctl: {exc}", file=sys.stderr)
        return 2
    print(f"flashctl: weights ready: {', '.join(ids) or 'none from the hub'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
