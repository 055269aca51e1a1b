"""`flashctl ablate` end to end with the REAL distill job (2-rank ZeRO-3 on CPU per cell).

Everything is checked from the outside: the CLI is run as users run it, the store is read with
`mlflow.search_runs` / `MlflowClient` (not flashctl code), processes are killed with signals.
Each distill launch costs ~30-60 s on a 2-core machine; runs are short (`tiny_world` overrides).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXPERIMENTS, run_cli
from flashctl.spec import load_spec, spec_hash

SPEC = str(EXPERIMENTS / "tiny-cpu.yaml")
LEVELS = {"9:1": ["mixture.t2i=9", "mixture.edit=1"], "7:3": ["mixture.t2i=7", "mixture.edit=3"],
          "5:5": ["mixture.t2i=5", "mixture.edit=5"]}
NARROW = {"COLUMNS": "40"}  # nothing may depend on the width: rich once wrapped piped output at 80
TRAIN_KEYS = ("train/loss_generator", "train/loss_critic", "train/grad_norm_generator", "train/samples_per_s")


def _args(tiny_world, tmp_path: Path, *extra: str) -> tuple[list[str], str]:
    """tiny_world's short-run overrides with this test's own store and output folder."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return [*tiny_world["spec_args"], f"tracking.uri={uri}", f"run.out_dir={tmp_path / 'runs'}", *extra], uri


def _grid_runs(uri: str):
    """(parent row, {level: child row}) of the only grid in the store, via mlflow.search_runs."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["flashctl-tiny"])
    parents = runs[runs["tags.flashctl.kind"] == "grid"]
    assert len(parents) == 1, runs[["run_id", "tags.flashctl.kind", "status"]]
    parent = parents.iloc[0]
    children = runs[runs["tags.mlflow.parentRunId"] == parent["run_id"]]
    assert len(children) == len(runs) - 1, "every other run is a child of the grid"
    by_level = {row["tags.flashctl.level"]: row for _, row in children.iterrows()}
    assert len(by_level) == len(children), "one child per level"
    return parent, by_level


def _check_children(parent, children, args: list[str]) -> None:
    """One FINISHED child per level, tagged with factor, level, the cell's spec hash and parent."""
    assert sorted(children) == sorted(LEVELS)
    for level, row in children.items():
        assert row["status"] == "FINISHED", (level, row["status"])
        assert row["tags.flashctl.factor"] == "task-mixture"
        assert row["tags.flashctl.grid_id"] == parent["tags.flashctl.grid_id"]
        assert row["tags.mlflow.parentRunId"] == parent["run_id"]
        expected = spec_hash(load_spec(SPEC, [*args, *LEVELS[level]]))
        # ablate tags the child with the cell's hash (test_ablate checks that); the job writes the
        # same tag last, with the hash of the spec it ran: it must be the cell's, the level's recipe
        assert row["tags.flashctl.spec_hash"] == expected
        t2i, edit = (float(o.split("=")[1]) for o in LEVELS[level])
        assert (float(row["params.mixture.t2i"]), float(row["params.mixture.edit"])) == (t2i, edit)


@pytest.mark.slow
def test_parallel_grid_of_real_jobs_then_report(tiny_world, tmp_path):
    """Three cells at once against one SQLite store (through the grid's mlflow server): one parent,
    three FINISHED children, no metric point lost, no "database is locked"; then `report`."""
    args, uri = _args(tiny_world, tmp_path)
    res = run_cli(["ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5", "--parallel", "3"], cwd=tmp_path, env=NARROW,
                  timeout=1800)
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "runs").glob("ablate-*/**/*.log"))
    assert res.returncode == 0, res.stderr[-4000:] + logs[-4000:]
    assert "3 of 3 cells to run, 3 at a time" in res.stderr
    for i, level in enumerate(LEVELS):  # not a terminal: one line per cell event, nothing lost
        assert f"cell {i} [task-mixture={level}] running" in res.stderr
        assert re.search(rf"cell {i} \[task-mixture={re.escape(level)}\] finished after \d+s \(exit 0\)", res.stderr)
    assert "database is locked" not in res.stderr + res.stdout + logs

    parent, children = _grid_runs(uri)
    assert parent["status"] == "FINISHED"
    _check_children(parent, children, args)

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    spec = load_spec(SPEC, args)
    expected_steps = list(range(spec.distill.log_every, spec.distill.steps + 1, spec.distill.log_every))
    for level, row in children.items():
        for key in TRAIN_KEYS:
            steps = [m.step for m in client.get_metric_history(row["run_id"], key)]
            assert steps == expected_steps, (level, key, steps)
        assert row["metrics.eval/student/nfe"] == 4

    out = tmp_path / "report"
    rep = run_cli(["report", "--tracking-uri", uri, "--parent", parent["run_id"], "--out", str(out)], cwd=tmp_path, env=NARROW)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "3/3 cells finished" in rep.stdout
    for level in LEVELS:
        assert level in rep.stdout
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    # a level plot, the training curves, and the qualitative grid: teacher + 3 levels per prompt
    assert len(srcs) >= 2 + 4, len(srcs)
    head = re.search(r'<table class="qual">.*?</thead>', page, re.DOTALL).group(0)
    assert re.findall(r"<th[^>]*>([^<]*)</th>", head) == ["prompt", "teacher", "9:1", "7:3", "5:5"]
    # edit rows show the source image first, then the teacher and each level (the paper's Figure 4)
    heads = re.findall(r'<table class="qual">.*?</thead>', page, re.DOTALL)
    assert re.findall(r"<th[^>]*>([^<]*)</th>", heads[1]) == ["prompt", "input", "teacher", "9:1", "7:3", "5:5"]


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment contains `marker` (e.g. MLFLOW_RUN_ID=<id>)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in env and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_killed_grid_resumes_only_the_unfinished_cells(tiny_world, tmp_path):
    """SIGKILL the grid (its whole process group) once the first cell is FINISHED and the second
    has started; `--resume` stops the orphaned second cell, leaves the finished one alone and
    runs the other two, and a second grid on the same cells is refused meanwhile."""
    args, uri = _args(tiny_world, tmp_path, "eval.enabled=false", "distill.steps=6")
    cmd = [sys.executable, "-m", "flashctl.cli", "ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5"]
    with open(tmp_path / "grid.log", "wb") as log:
        grid = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **NARROW})
    try:
        deadline = time.monotonic() + 900
        first_done = second_started = False
        while not (first_done and second_started):
            assert grid.poll() is None, (tmp_path / "grid.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first cell did not finish in 900 s"
            time.sleep(1)
            # read the store only once the grid has set it up (a fresh SQLite store is migrated
            # by its first client; a second one migrating at the same time fails)
            if not first_done and any((tmp_path / "runs").glob("ablate-*/*task-mixture-9-1/spec.resolved.yaml")):
                import mlflow

                mlflow.set_tracking_uri(uri)
                runs = mlflow.search_runs(experiment_names=["flashctl-tiny"])
                first_done = bool(len(runs)) and "FINISHED" in set(runs["status"])
            second_started = any((tmp_path / "runs").glob("ablate-*/*task-mixture-7-3/spec.resolved.yaml"))
        busy = run_cli(["ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5", "--resume"], cwd=tmp_path, env=NARROW)
        assert busy.returncode == 1 and "is being run by another `flashctl ablate`" in busy.stderr, busy.stderr
        os.killpg(grid.pid, signal.SIGKILL)
    finally:
        if grid.poll() is None:
            os.killpg(grid.pid, signal.SIGKILL)
        grid.wait()

    _, before = _grid_runs(uri)
    assert before["9:1"]["status"] == "FINISHED" and before["7:3"]["status"] == "RUNNING"
    assert before["5:5"]["tags.flashctl.attempts"] == "0"

    res = run_cli(["ablate", SPEC, *args, "--factor", "task-mixture", "--levels", "9:1,7:3,5:5", "--resume"], cwd=tmp_path, env=NARROW,
                  timeout=1800)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "2 of 3 cells to run" in res.stderr
    assert "stopping tiny-cpu-task-mixture-7-3 (process group" in res.stderr  # the orphan of the killed grid
    parent, after = _grid_runs(uri)  # still one parent
    assert parent["status"] == "FINISHED"
    _check_children(parent, after, args)
    # the finished cell did not run again; the interrupted one ran again under its run id
    assert after["9:1"]["end_time"] == before["9:1"]["end_time"]
    assert after["9:1"]["tags.flashctl.attempts"] == "1"
    assert after["7:3"]["run_id"] == before["7:3"]["run_id"] and after["7:3"]["tags.flashctl.attempts"] == "2"
    assert after["5:5"]["tags.flashctl.attempts"] == "1"
    logs = {lv: next((tmp_path / "runs").glob(f"ablate-*/logs/*task-mixture-{lv.replace(':', '-')}.log")).read_text()
            for lv in LEVELS}
    assert [log.count("\n$ ") for log in logs.values()] == [1, 2, 1]
    # no process of the orphaned attempt is left behind
    assert _processes_with(f"MLFLOW_RUN_ID={after['7:3']['run_id']}") == []
