"""Cluster launches with the REAL distill job: Slurm (`distill` as one batch job, `ablate` as one
job array) on the one-node Slurm that .ci/slurm/setup.sh starts (skipped with its reason when it
cannot), and two hostfile "nodes" on loopback (`--no-ssh --node-rank 0/1`, ZeRO-3 over gloo)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import EXPERIMENTS, bash_n, run_cli
from flashctl.system import free_port

SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")
NARROW = {"COLUMNS": "40"}  # nothing may depend on the width: rich once wrapped piped output at 80


def _args(tiny_world, tmp_path: Path, *extra: str) -> tuple[list[str], str]:
    """tiny_world's short-run overrides with this test's own store and output folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [*tiny_world["spec_args"], f"tracking.uri={uri}", f"run.out_dir={tmp_path / 'runs'}", *extra], uri


def _assert_student(run_dir: Path) -> dict:
    """The run exported a diffusers student and wrote its summary; returns the summary."""
    assert (run_dir / "student" / "model_index.json").is_file()
    assert list((run_dir / "student" / "transformer").glob("*.safetensors"))
    return json.loads((run_dir / "summary.json").read_text())


# --------------------------------------------------------------------------------------------
# Dry runs (no Slurm needed)


def test_distill_dry_run_on_slurm_prints_a_valid_batch_script(tiny_world, tmp_path):
    args, _ = _args(tiny_world, tmp_path)
    res = run_cli(["distill", SPEC, *args, "launch.backend=slurm", "--dry-run"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    script = res.stdout
    bash_n(script, tmp_path)
    assert script.startswith("#!/bin/bash\n") and "#SBATCH --nodes=1" in script
    assert "srun " in script and "-m flashctl.distill.worker --run-dir" in script
    assert not (tmp_path / "runs").exists()


def test_ablate_dry_run_on_slurm_prints_one_array_and_its_cells(tiny_world, tmp_path):
    args, uri = _args(tiny_world, tmp_path, "launch.backend=slurm", "launch.slurm.array_parallel=2")
    res = run_cli(["ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5", "--dry-run"], cwd=tmp_path, env=NARROW)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    script = text[text.index("#!/bin/bash"):text.rindex("\n# ")]
    bash_n(script, tmp_path)
    assert "#SBATCH --array=0-2%2" in script.splitlines()
    cells = [line for line in text.splitlines() if line.startswith("task-mixture=")]
    assert [c.split("\t")[0] for c in cells] == ["task-mixture=9:1", "task-mixture=7:3", "task-mixture=5:5"]
    for cell in cells:
        # each task runs the cell's job inside its allocation, logging into its own child run
        assert cell.endswith("launch.backend=local") and "flashctl.cli distill" in cell
        assert "MLFLOW_RUN_ID=<child run of task-mixture=" in cell and f"MLFLOW_TRACKING_URI={uri}" in cell
    assert len({c.split("launch.master_port=")[1].split()[0] for c in cells}) == 3  # tasks may share a node
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------------------------
# Real Slurm


def _slurm_args(tiny_world, tmp_path: Path, *extra: str) -> tuple[list[str], str]:
    return _args(tiny_world, tmp_path, "launch.backend=slurm", "launch.slurm.time=00:30:00",
                 f"launch.master_port={free_port()}", *extra)


@pytest.mark.slow
def test_distill_submitted_to_slurm_exports_the_student(slurm_cluster, tiny_world, tmp_path):
    from flashctl.launch import slurm

    args, uri = _slurm_args(tiny_world, tmp_path, "launch.slurm.cpus_per_task=2", "run.name=on-slurm",
                            "eval.enabled=false")
    res = run_cli(["distill", SPEC, *args], cwd=tmp_path, env=NARROW)
    assert res.returncode == 0, res.stderr
    assert "submitted Slurm job" in res.stderr
    run_dir = tmp_path / "runs" / "on-slurm"
    job = (run_dir / "slurm_job_id").read_text().strip()
    state = slurm.wait_for(job, timeout_s=1500, poll_s=2)
    logs = "".join(p.read_text(errors="replace") for p in run_dir.glob("slurm-*"))
    assert state == "COMPLETED", logs[-4000:]
    assert f"flashctl: job {job}" in logs
    assert _assert_student(run_dir)["steps"] == 4

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["flashctl-tiny"], filter_string="attributes.run_name = 'on-slurm'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"


@pytest.mark.slow
def test_grid_on_slurm_runs_as_one_array(slurm_cluster, tiny_world, tmp_path, monkeypatch):
    """Submit without waiting, then `ablate --resume` finds the array still running and waits for
    it (nothing is submitted twice); every child ends FINISHED, judged by its MLflow status."""
    import mlflow

    from flashctl.ablate import ablate
    from flashctl.launch import slurm

    monkeypatch.chdir(tmp_path)
    args, uri = _slurm_args(tiny_world, tmp_path, "launch.slurm.cpus_per_task=1", "launch.slurm.array_parallel=2",
                            "eval.n_t2i=2", "eval.n_edit=2")
    submitted = ablate(SPEC, args, ["task-mixture"], ["9:1", "7:3", "5:5"], wait=False, console=Console(file=io.StringIO(), width=250))
    assert submitted.ok and [s.status for s in submitted.cells] == ["queued"] * 3

    mlflow.set_tracking_uri(uri)
    parent = mlflow.get_run(submitted.parent_run_id)
    job = parent.data.tags["flashctl.slurm_array"]
    assert parent.info.status == "RUNNING"  # the grid is not over while its array runs

    res = run_cli(["ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5", "--resume"], cwd=tmp_path, env=NARROW,
                  timeout=2400)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"Slurm array {job} of this grid is still active (3 cells in it): waiting for it" in res.stderr
    assert "submitted Slurm array" not in res.stderr

    runs = mlflow.search_runs(experiment_names=["flashctl-tiny"])
    assert len(runs) == 4
    parent = runs[runs["run_id"] == submitted.parent_run_id].iloc[0]
    assert parent["status"] == "FINISHED" and parent["tags.flashctl.slurm_array"] == job
    children = runs[runs["tags.mlflow.parentRunId"] == submitted.parent_run_id].sort_values("tags.flashctl.slurm_task")
    assert list(children["tags.flashctl.slurm_task"]) == [f"{job}_{i}" for i in range(3)]
    assert list(children["tags.flashctl.level"]) == ["9:1", "7:3", "5:5"]
    assert set(children["status"]) == {"FINISHED"}
    assert set(children["tags.flashctl.slurm_state"]) == {"COMPLETED"}
    assert set(children["tags.flashctl.attempts"]) == {"1"}
    assert set(children["tags.status"]) == {"finished"}  # set by the job itself
    assert slurm.job_states(job) == {f"{job}_{i}": "COMPLETED" for i in range(3)}
    grid_dir = next((tmp_path / "runs").glob("ablate-*"))
    for cell in submitted.cells:
        _assert_student(grid_dir / cell.cell.name)
        assert (grid_dir / "logs" / f"{job}_{cell.cell.index}.out").is_file()


# --------------------------------------------------------------------------------------------
# Two hostfile "nodes" on this machine


@pytest.mark.slow
def test_two_node_loopback_trains_the_real_worker(tiny_world, tmp_path):
    """Node ranks 0 and 1 (one rank each), started as two `flashctl distill --no-ssh` launchers the
    way a user starts them on two machines, train the tiny student with ZeRO-3 over gloo."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args, uri = _args(tiny_world, tmp_path, "launch.backend=hostfile", f"launch.hostfile={hostfile}",
                      "launch.nnodes=2", "launch.nproc_per_node=1", f"launch.master_port={free_port()}",
                      "run.name=two-nodes", "eval.enabled=false")
    env = {**os.environ, **NARROW}
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "flashctl.cli", "distill", SPEC, *args, "--no-ssh", "--node-rank", str(rank)]
        with open(tmp_path / f"node{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + 1200
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    logs = [(tmp_path / f"node{r}.log").read_text(errors="replace") for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)

    run_dir = tmp_path / "runs" / "two-nodes"
    summary = _assert_student(run_dir)
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4  # 2 micro x 2 ranks
    # each node wrote its own ZeRO-3 partition of the checkpoint
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "step-00000004" / "student").glob("*model_states.pt"))
    assert len(shards) == 2, shards

    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["flashctl-tiny"], filter_string="attributes.run_name = 'two-nodes'")
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"  # one run: only global rank 0 logs
    assert runs.iloc[0]["params.launch.nnodes"] == "2"
