"""Output meant for programs survives a pipe byte-exact; tables for people lose no column.

Every command runs as users pipe it (`flashctl ... > file`, `| jq`): a subprocess whose stdout
is a pipe, `COLUMNS=40`, and paths longer than 80 characters with spaces in them. What comes
out is parsed by the program that would consume it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import EXPERIMENTS, bash_n, run_cli

SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")
NARROW = {"COLUMNS": "40"}


@pytest.fixture
def long_dir(tmp_path) -> Path:
    """A folder whose path is well over 80 characters and has spaces in it."""
    path = tmp_path / ("a rather long folder name with spaces " * 3).strip() / "and another level"
    path.mkdir(parents=True)
    assert len(str(path)) > 120 and " " in str(path)
    return path


def _args(tiny_world, where: Path, *extra: str) -> list[str]:
    return [*tiny_world["spec_args"], f"tracking.uri=sqlite:///{where / 'mlflow.db'}",
            f"run.out_dir={where / 'runs'}", *extra]


def test_schema_through_a_pipe_is_json(tmp_path):
    from flashctl.spec import json_schema

    res = run_cli(["schema"], cwd=tmp_path, env=NARROW)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == json.loads(json.dumps(json_schema()))


def test_print_config_through_a_pipe_is_the_resolved_yaml(tmp_path, long_dir):
    from flashctl.spec import load_spec, resolved_dict

    overrides = [f"run.out_dir={long_dir / 'runs'}", f"data.root={long_dir / 'data'}"]
    for command in (["validate", SPEC, *overrides, "--print-config"], ["distill", SPEC, *overrides, "--print-config"]):
        res = run_cli(command, cwd=tmp_path, env=NARROW)
        assert res.returncode == 0, res.stderr
        assert yaml.safe_load(res.stdout) == json.loads(json.dumps(resolved_dict(load_spec(SPEC, overrides)))), command


def test_slurm_dry_run_through_a_pipe_is_the_exact_job_script(tiny_world, long_dir, monkeypatch):
    from flashctl.distill.job import prepare_run
    from flashctl.spec import load_spec

    args = _args(tiny_world, long_dir, "launch.backend=slurm")
    res = run_cli(["distill", SPEC, *args, "--dry-run"], cwd=long_dir, env=NARROW)
    assert res.returncode == 0, res.stderr
    monkeypatch.chdir(long_dir)  # the job starts where it was submitted from
    expected = prepare_run(load_spec(SPEC, args), dry_run=True).script
    assert res.stdout == expected  # byte-exact
    bash_n(res.stdout, long_dir)
    [srun] = [line for line in res.stdout.splitlines() if line.lstrip().startswith("srun ")]
    argv = shlex.split(srun.rstrip(" &"))
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    assert run_dir == long_dir / "runs" / "tiny-cpu"
    assert "flashctl.distill.worker" in argv and len(srun) > 200


def test_local_dry_run_through_a_pipe_ends_with_one_runnable_command(tiny_world, long_dir):
    args = _args(tiny_world, long_dir)
    res = run_cli(["distill", SPEC, *args, "--dry-run"], cwd=long_dir, env=NARROW)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # the DeepSpeed config is the commented block, as JSON
    config = json.loads("\n".join(line[2:] for line in lines if line.startswith("# ") and not line.startswith("# run dir") and not line.startswith("# DeepSpeed")))
    assert config["zero_optimization"]["stage"] == 3
    argv = shlex.split(lines[-1])
    assert Path(argv[argv.index("--run-dir") + 1]) == long_dir / "runs" / "tiny-cpu"


def test_ablate_dry_run_through_a_pipe_prints_every_cell_command_whole(tiny_world, long_dir):
    args = _args(tiny_world, long_dir)
    res = run_cli(["ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5", "--dry-run"], cwd=long_dir, env=NARROW)
    assert res.returncode == 0, res.stderr
    commands = [line for line in res.stdout.splitlines() if re.match(r"\[\d+\] ", line)]
    assert len(commands) == 3
    for i, (line, level) in enumerate(zip(commands, ["9:1", "7:3", "5:5"])):
        argv = shlex.split(line.split(" ", 1)[1])
        assert argv[0].startswith("MLFLOW_RUN_ID=") and argv[1] == f"MLFLOW_TRACKING_URI=sqlite:///{long_dir / 'mlflow.db'}"
        t2i, edit = level.split(":")
        assert f"mixture.t2i={t2i}" in argv and f"mixture.edit={edit}" in argv, (i, argv)
    # the cell table is Markdown with every column and cell, whatever COLUMNS says
    header = next(line for line in res.stdout.splitlines() if line.startswith("| #"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["#", "task-mixture", "spec hash", "overrides"]
    assert "…" not in res.stdout


def test_report_tables_in_a_pipe_keep_every_column(tmp_path):
    from test_report import MIX_RESULTS, MIXTURE, make_grid

    from flashctl.report import factor_tables, find_grid, terminal_tables

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pid = make_grid(uri, tmp_path, MIXTURE, MIX_RESULTS, images=False)
    res = run_cli(["report", "--tracking-uri", uri, "--parent", pid, "--out", str(tmp_path / "out"), "--format", "md"],
                  cwd=tmp_path, env=NARROW)
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout

    from mlflow.tracking import MlflowClient

    expected = [t for table in factor_tables(find_grid(MlflowClient(uri), parent=pid)) for t in terminal_tables(table)]
    headers = [line for line in res.stdout.splitlines() if line.startswith("| task-mixture |")]
    assert len(headers) == len(expected) + 1  # the result tables, then the findings table
    assert headers[-1].rstrip().endswith("| p vs best (T2I) | p vs best (edit) | p vs best (text rendering) |")
    headers = headers[:-1]
    for line, table in zip(headers, expected):
        assert [c.strip() for c in line.strip("|").split("|")] == [str(c.header) for c in table.columns]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 5:5")][:len(expected)]
    assert len(rows) == len(expected)
    assert all(line.count("|") == len(t.columns) + 1 for line, t in zip(rows, expected))
