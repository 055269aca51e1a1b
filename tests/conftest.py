"""Shared fixtures: a clean working directory and a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Run in an empty directory so relative outputs (runs/, data/, mlflow.db) land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """One thread per process, and no MLflow target leaking between tests: MLflow's
    `set_tracking_uri` exports MLFLOW_TRACKING_URI, which CLI subprocesses would inherit."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900):
    """Run `flashctl ARGS` in a subprocess (the way users run it); returns CompletedProcess."""
    import subprocess
    import sys

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "flashctl.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def bash_n(script: str, where: Path) -> None:
    """`script` parses as bash (`bash -n`): what a job script printed or written must pass."""
    import subprocess

    path = where / "check.sh"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A small prepared shapes dataset and a random (untrained) tiny teacher pipeline folder.

    Returns dict(root, data, teacher, spec_args): `spec_args` are overrides that point the
    embedded default at them with short schedules, for fast end-to-end runs."""
    from flashctl.data.prepare import prepare_data
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.tiny import build_tiny_pipeline
    from flashctl.shapes import corpus
    from flashctl.spec import DataSpec, TinyModelSpec

    root = tmp_path_factory.mktemp("world")
    data = DataSpec(root=root / "data", n=160, rows_per_shard=80, seed=3)
    prepare_data(data, data.root, progress=False)
    comps = build_tiny_pipeline(TinyModelSpec(), corpus(n=200, seed=0), seed=0)
    teacher = QwenImageAdapter(comps).save_pipeline(root / "teacher")
    spec_args = [
        f"data.root={data.root}", f"teachers.base.path={teacher}", f"teachers.edit.path={teacher}",
        "distill.steps=4", "distill.batch_size=2", "distill.critic_updates=1", "distill.checkpoint_every=2",
        "distill.log_every=1", "distill.sample_every=0", "eval.n_t2i=3", "eval.n_edit=3", "eval.teacher_nfe=3",
        f"tracking.uri=sqlite:///{root}/mlflow.db",
    ]
    return {"root": root, "data": data.root, "teacher": teacher, "spec_args": spec_args}


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running one-node Slurm: .ci/slurm/setup.sh starts it (installing it if needed and
    allowed, idempotent); the test is skipped with the script's reason when it cannot."""
    import subprocess

    setup = REPO / ".ci" / "slurm" / "setup.sh"
    try:
        proc = subprocess.run(["bash", str(setup)], capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("slurm setup: .ci/slurm/setup.sh did not finish in 600 s")
    if proc.returncode != 0:
        reason = next((ln for ln in proc.stdout.splitlines() if ln.startswith("slurm setup failed")), None)
        pytest.skip(reason or f"slurm setup exited {proc.returncode}: {proc.stdout[-300:]} {proc.stderr[-300:]}")
