"""`flashctl distill` on the launching side: check, write the run directory, start the workers.

The run directory (`run.out_dir/run.name`) holds `spec.resolved.yaml`, `ds_config.json`
(student engine; the critic's differs only in its learning rate), `checkpoints/`, `student/`
(the exported diffusers pipeline), `eval/`, `summary.json` and `inputs.json` (`inputs_digest`).
An existing run directory of the same spec hash is resumed; one of another spec, or whose
checkpoint was trained on other teachers' files or data, is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flashctl.errors import UserError
from flashctl.io import atomic_write_json, atomic_write_text
from flashctl.spec import ExperimentSpec, load_spec, spec_hash, to_yaml
from flashctl.system import free_port, port_free

WORKER = "flashctl.distill.worker"
INPUTS_FILE = "inputs.json"


def inputs_digest(spec: ExperimentSpec) -> str | None:
    """Digest of what a distill job reads that its spec hash cannot see: the files of every
    teacher (`pipelines.model_fingerprint`, by content: a retrained `builtin:base` keeps its
    name, a copied or re-cloned one keeps its digest) and of the student's init model when it
    is not a teacher, and the prepared data's manifest digest. Kept in the run dir
    (`inputs.json`: a resume on other inputs is refused) and on ablation cells' runs (reuse
    across grids, stale cells). None when the data is not prepared or a model cannot be found:
    then nothing is compared or reused."""
    from flashctl.data.manifest import read_manifest
    from flashctl.pipelines import model_fingerprint

    try:
        data = read_manifest(spec.data.root, verify=False).digest
        models = {name: model_fingerprint(t.path) for name, t in sorted(spec.teachers.items())}
        if spec.model.init_from not in spec.teachers:
            models["init_from"] = model_fingerprint(spec.model.init_from)
    except (UserError, OSError):
        return None
    blob = json.dumps({"data": data, "models": models}, sort_keys=True, default=str)
    return INPUTS_SCHEME + hashlib.sha256(blob.encode()).hexdigest()[:16]


INPUTS_SCHEME = "c1-"
"""Prefix of `inputs_digest` values: models by content (`c1`). Tags of an older scheme (models
by path and mtimes, no prefix) never match, so they are neither reused nor called stale."""


@dataclass
class PreparedRun:
    run_dir: Path
    command: list[str]
    env: dict[str, str]
    ds_config: dict
    resuming: bool
    script: str | None = None
    """The sbatch script (`launch.backend: slurm`)."""


def check_inputs(spec: ExperimentSpec) -> None:
    """Fail before launching: data prepared, teachers resolvable, guidance consistent."""
    from flashctl.data.manifest import read_manifest
    from flashctl.pipelines import resolve_model_path

    if not (Path(spec.data.root) / "manifest.json").is_file():
        raise UserError(f"data.root: no prepared dataset at {spec.data.root} (run `flashctl prepare-data` first)")
    read_manifest(spec.data.root, verify=False)
    if not spec.teachers:
        raise UserError("teachers: at least one teacher is needed to distil")
    for name, t in spec.teachers.items():
        try:
            resolve_model_path(t.path)
        except UserError as exc:
            raise UserError(f"teachers.{name}.path: {exc}") from None
    if spec.model.init_from not in spec.teachers:
        try:
            resolve_model_path(spec.model.init_from)
        except UserError as exc:
            raise UserError(f"model.init_from: {exc}") from None
    from flashctl.data.conditioning import cache_for_run

    cache_for_run(spec)  # a conditioning cache made by another text encoder / VAE is refused here


def prepare_run(spec: ExperimentSpec, fresh: bool = False, dry_run: bool = False,
                node_rank: int | None = None, no_ssh: bool = False) -> PreparedRun:
    """Write (or check) the run directory and build the launch command for `spec`.

    With `dry_run` nothing is written. The command depends on `launch.backend`: `local`
    (torchrun / deepspeed on this machine), `hostfile` (DeepSpeed's multi-node runner; with
    `no_ssh` only this node's ranks), `slurm` (the sbatch script is in `PreparedRun.script`)."""
    import shutil

    from flashctl.launch import hostfile
    from flashctl.launch.local import env_for, launch_command

    run_dir = spec.run_dir()
    resolved = run_dir / "spec.resolved.yaml"
    resuming = False
    if resolved.exists():
        old = load_spec(resolved)
        if spec_hash(old) != spec_hash(spec) and not fresh:
            raise UserError(
                f"{run_dir}: holds a run of another spec (hash {spec_hash(old)} != {spec_hash(spec)}); "
                "choose another run.name or pass --fresh to start over"
            )
        if fresh:
            shutil.rmtree(run_dir)
        else:
            resuming = (run_dir / "checkpoints" / "latest").exists()
    inputs = inputs_digest(spec)
    if resuming and inputs is not None:
        try:
            before = json.loads((run_dir / INPUTS_FILE).read_text()).get("digest")
        except (OSError, ValueError, AttributeError):
            before = None  # a run dir from before the file (or its scheme): nothing to compare
        if isinstance(before, str) and before.startswith(INPUTS_SCHEME) and before != inputs:
            raise UserError(
                f"{run_dir}: its checkpoint was trained on other teachers' files or data (inputs "
                f"{before}, now {inputs}); choose another run.name or pass --fresh to start over"
            )
    ds = ds_config_preview(spec)
    if not dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(resolved, to_yaml(spec))
        atomic_write_json(run_dir / "ds_config.json", ds)
        if inputs is not None:
            atomic_write_json(run_dir / INPUTS_FILE, {"digest": inputs})
    worker_args = ["--run-dir", str(run_dir.resolve())]
    backend = spec.launch.backend
    script = None
    if backend == "hostfile":
        cmd = hostfile.deepspeed_command(spec, run_dir, node_rank=node_rank, no_ssh=no_ssh,
                                         include=spec.launch.include, exclude=spec.launch.exclude)
        env = hostfile.node_env(spec, env_for(spec)) if dry_run else hostfile.launcher_env(spec, run_dir)
    elif backend == "slurm":
        import sys

        from flashctl.launch.slurm import render_sbatch

        cmd = [sys.executable, "-m", WORKER, *worker_args]
        env = hostfile.node_env(spec)
        script = render_sbatch(spec, run_dir, cmd, env)
    else:
        if spec.launch.nnodes == 1 and not port_free(spec.launch.master_addr, spec.launch.master_port):
            # One machine: any free port does (another job holds this one); it is not part of
            # the spec hash, so the run and its resume stay the same run.
            spec = spec.model_copy(update={"launch": spec.launch.model_copy(
                update={"master_port": free_port(spec.launch.master_addr)})})
        cmd = launch_command(spec, WORKER, worker_args)
        env = env_for(spec)
    return PreparedRun(run_dir, cmd, env, ds, resuming, script)


def ds_config_preview(spec: ExperimentSpec) -> dict:
    """The student engine's DeepSpeed config for this launch's world size."""
    from flashctl.distill.engine import ds_config, warmup_updates_for

    world = spec.launch.nproc_per_node * spec.launch.nnodes
    return ds_config(spec, spec.distill.lr_generator, world, export=True,
                     warmup_updates=warmup_updates_for(spec, "student"))


def describe(prep: PreparedRun) -> str:
    """What `--dry-run` prints: the sbatch script, or the DeepSpeed config and the command."""
    import shlex

    if prep.script is not None:
        return prep.script

    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(prep.env.items())
                   if k.startswith(("DS_", "OMP_", "MASTER_", "MLFLOW_", "PYTHONWARNINGS")))
    what = " (resumes its checkpoint)" if prep.resuming else ""
    return (f"# run dir: {prep.run_dir}{what}\n# DeepSpeed config (ds_config.json):\n"
            + "\n".join("# " + line for line in json.dumps(prep.ds_config, indent=2).splitlines())
            + f"\n{env} {shlex.join(prep.command)}\n")


def launch(spec: ExperimentSpec, prep: PreparedRun, console) -> None:
    """Run the workers on this machine; output is also appended to `train.log` in the run dir."""
    from flashctl.distill.worker import EXIT_STOPPED
    from flashctl.launch.local import run_local

    if prep.script is not None:
        from flashctl.launch.slurm import save_sbatch, submit

        path = save_sbatch(prep.run_dir, prep.script)
        job_id = submit(path)
        atomic_write_text(prep.run_dir / "slurm_job_id", job_id + "\n")
        console.print(f"[green]submitted[/green] Slurm job {job_id}: {path} (logs in {prep.run_dir}/slurm-{job_id}.out)",
                      highlight=False)
        return
    rc = run_local(prep.command, prep.env, log_path=prep.run_dir / "train.log")
    if rc == EXIT_STOPPED:
        raise UserError(f"{prep.run_dir}: stopped by a signal after writing a checkpoint; re-run to resume")
    if rc != 0:
        raise UserError(f"{prep.run_dir}: distillation failed (exit {rc}); see {prep.run_dir / 'train.log'}")
    summary_path = prep.run_dir / "summary.json"
    if not summary_path.exists():  # another node of a multi-node run: rank 0 writes the summary
        console.print(f"[green]ok[/green] this node's ranks finished ({prep.run_dir})", highlight=False)
        return
    summary = json.loads(summary_path.read_text())
    console.print(f"[green]ok[/green] student -> {summary['student']} ({summary['train_time_s']:.0f}s of training)",
                  highlight=False)
