"""`ablate`: level tables, grid expansion, dry run, MLflow parent/child runs, resume, parallel cells.

The distill job is replaced by a real workload run through the injectable command builder: this
file, run as a script (`--worker`), logs metrics into its child run through `flashctl.track.Tracker`
exactly as the job does (MLFLOW_RUN_ID + MLFLOW_TRACKING_URI), and fails on request.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from conftest import EXPERIMENTS
from flashctl.ablate import (
    DEFAULT_LEVELS,
    ablate,
    cell_command,
    execution_overrides,
    plan_grid,
    run_grid,
    slug,
)
from flashctl.ablate.status import event_line
from flashctl.errors import UserError
from flashctl.spec import load_spec, spec_hash
from flashctl.track import (
    TAG_ATTEMPTS,
    TAG_CELL,
    TAG_EXIT,
    TAG_FACTOR,
    TAG_GRID,
    TAG_HASH,
    TAG_KIND,
    TAG_LEVEL,
    TAG_LEVELS,
    TAG_PARENT,
)

TINY = str(EXPERIMENTS / "tiny-cpu.yaml")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=250)


# --------------------------------------------------------------------------------------------
# Planning (no MLflow)


def test_data_composition_defaults_filter_categories_and_aspects(workdir):
    grid = plan_grid(TINY, [], ["data-composition"])  # tiny-cpu.yaml has no levels for it
    assert [lv for c in grid.cells for _, lv in c.levels] == list(DEFAULT_LEVELS["data-composition"])
    specs = {c.levels[0][1]: load_spec(TINY, c.override_args()) for c in grid.cells}
    assert specs["text-centric"].data.categories == {"text": 1.0}
    assert set(specs["mixed-category"].data.categories) == {"object", "scene", "text"}
    assert specs["landscape-only"].data.aspects == {"landscape": 1.0}
    assert specs["landscape-portrait"].data.aspects == {"landscape": 1.0, "portrait": 1.0}
    assert specs["portrait-only"].data.aspects == {"portrait": 1.0}
    assert len({c.spec_hash for c in grid.cells}) == 5
    assert grid.cells[0].name == "tiny-cpu-data-composition-text-centric"


def test_spec_ablations_replace_the_defaults(workdir):
    spec = workdir / "s.yaml"
    spec.write_text(Path(TINY).read_text()
                    + 'ablations:\n  task-mixture:\n    "8:2": {mixture.t2i: 8, mixture.edit: 2}\n'
                    + '    "1:1": {mixture.t2i: 1, mixture.edit: 1}\n')
    grid = plan_grid(spec, [], ["task-mixture"])
    assert [c.levels[0][1] for c in grid.cells] == ["8:2", "1:1"]
    assert load_spec(spec, grid.cells[0].override_args()).mixture.edit_probability == pytest.approx(0.2)
    # the spec's levels are quoted in the command: "8:2" must not become YAML's base-60 integer
    assert grid.cells[0].name == "tiny-cpu-task-mixture-8-2"


def test_levels_select_and_unknown_names_are_user_errors(workdir):
    grid = plan_grid(TINY, [], ["task-mixture"], ["9:1", "5:5"])
    assert [c.levels[0][1] for c in grid.cells] == ["9:1", "5:5"]
    with pytest.raises(UserError) as exc:
        plan_grid(TINY, [], ["task-mixture"], ["9:1", "3:7"])
    msg = str(exc.value)
    assert "'3:7'" in msg and "t2i-only, 9:1, 7:3, 5:5" in msg and "\n" not in msg
    with pytest.raises(UserError) as exc:
        plan_grid(TINY, [], ["task-mixtrue"])
    assert "'task-mixtrue'" in str(exc.value) and "data-composition, teacher-guidance, task-mixture" in str(exc.value)


def test_two_factors_expand_to_the_cartesian_product(workdir):
    grid = plan_grid(TINY, ["distill.steps=7"], ["task-mixture", "teacher-guidance"])
    assert len(grid.cells) == 4 * 5  # the paper's levels: t2i-only, 9:1, 7:3, 5:5 x five guidance levels
    assert len({c.spec_hash for c in grid.cells}) == 20
    assert grid.cells[11].key == "task-mixture=7:3,teacher-guidance=specialised"
    assert grid.cells[11].name == "tiny-cpu-task-mixture-7-3-teacher-guidance-specialised"
    assert load_spec(TINY, grid.cells[14].override_args()).guidance.steps == [0, 1]  # 7:3 x stepwise-01
    spec = load_spec(TINY, ["distill.steps=7"] + grid.cells[11].override_args())
    assert (spec.mixture.t2i, spec.mixture.edit, spec.guidance.policy) == (7, 3, "specialised")
    # the grid id is a function of the cells: stable, and changed by a recipe override
    assert plan_grid(TINY, ["distill.steps=7"], ["task-mixture", "teacher-guidance"]).grid_id == grid.grid_id
    assert plan_grid(TINY, ["distill.steps=8"], ["task-mixture", "teacher-guidance"]).grid_id != grid.grid_id
    # ...but not by run naming (excluded from the spec hash)
    assert plan_grid(TINY, ["distill.steps=7", "run.name=x"], ["task-mixture", "teacher-guidance"]).grid_id == grid.grid_id
    with pytest.raises(UserError, match="mixture.t2i=2.*conflicts"):
        plan_grid(TINY, ["mixture.t2i=2"], ["task-mixture"])


def test_seeds_repeat_every_cell_with_its_own_training_seed(workdir):
    grid = plan_grid(TINY, ["distill.steps=7", "distill.seed=10"], ["task-mixture"], seeds=2)
    assert grid.factors == ("task-mixture", "seed") and len(grid.cells) == 8
    assert grid.cells[1].key == "task-mixture=t2i-only,seed=11"
    seeds = {load_spec(TINY, ["distill.steps=7", "distill.seed=10", *c.override_args()]).distill.seed for c in grid.cells}
    assert seeds == {10, 11} and len({c.spec_hash for c in grid.cells}) == 8
    assert plan_grid(TINY, ["distill.steps=7"], ["task-mixture"]).grid_id != plan_grid(
        TINY, ["distill.steps=7"], ["task-mixture"], seeds=2).grid_id
    with pytest.raises(UserError, match="not a factor"):
        plan_grid(TINY, [], ["seed"])


def test_default_command_runs_exactly_the_cells_recipe(workdir):
    grid = plan_grid(TINY, ["distill.steps=7"], ["data-composition"])
    for cell in grid.cells:
        argv = cell_command(grid, cell, execution_overrides(grid, cell, "http://127.0.0.1:1", 1))
        assert argv[:5] == [sys.executable, "-m", "flashctl.cli", "distill", TINY]
        resolved = load_spec(argv[4], argv[5:])
        assert spec_hash(resolved) == cell.spec_hash
        assert resolved.run_dir() == grid.cell_run_dir(cell)
        assert resolved.tracking.uri == "http://127.0.0.1:1"
    ports = {load_spec(TINY, execution_overrides(grid, c, "http://127.0.0.1:1", 3)).launch.master_port for c in grid.cells}
    assert len(ports) == len(grid.cells)  # cells running at once never share a rendezvous port


def test_dry_run_prints_cells_and_commands_and_touches_nothing(workdir):
    console = quiet()
    grid = ablate(TINY, ["distill.steps=7"], ["task-mixture"], dry_run=True, console=console)
    text = console.file.getvalue()
    for cell in grid.cells:
        assert cell.spec_hash in text
        assert f"run.name={cell.name}" in text
    assert text.count("-m flashctl.cli distill") == 4
    assert "mixture.t2i=9 mixture.edit=1" in text and "mixture.t2i=1 mixture.edit=0" in text
    assert list(workdir.iterdir()) == []  # no mlflow.db, no runs/


# --------------------------------------------------------------------------------------------
# Running against real MLflow with a real workload


def worker_builder(flags: Path, steps: int, keys: int):
    """Command builder running this file as a worker in place of `flashctl distill`."""

    def build(grid, cell, execution):
        return [sys.executable, os.path.abspath(__file__), "--worker", str(flags), str(steps), str(keys),
                cell.key, *execution]

    return build


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _points(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_grid_runs_cells_as_children_survives_a_failure_and_resumes(workdir):
    flags = workdir / "flags"
    flags.mkdir()
    (flags / slug("task-mixture=7:3")).write_text("fail")  # this cell crashes on its first attempt
    grid = plan_grid(TINY, ["distill.steps=7"], ["task-mixture"], ["9:1", "7:3"])
    build = worker_builder(flags, steps=20, keys=3)

    result = run_grid(grid, command_builder=build, console=quiet(), poll_s=0.1)
    assert not result.ok
    assert [s.status for s in result.cells] == ["finished", "failed"]
    client = _client(grid.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags[TAG_KIND] == "grid" and parent.data.tags[TAG_GRID] == grid.grid_id
    assert json.loads(parent.data.tags[TAG_LEVELS]) == {"task-mixture": ["9:1", "7:3"]}
    children = {s.cell.key: client.get_run(s.run_id) for s in result.cells}
    for cell in grid.cells:
        run = children[cell.key]
        assert run.data.tags[TAG_PARENT] == result.parent_run_id
        assert run.data.tags[TAG_FACTOR] == "task-mixture"
        assert run.data.tags[TAG_LEVEL] == cell.levels[0][1]
        assert run.data.tags[TAG_HASH] == cell.spec_hash
        assert run.data.tags[TAG_CELL] == cell.key
        assert run.info.run_name == cell.name
    failed = children["task-mixture=7:3"]
    assert failed.info.status == "FAILED" and failed.data.tags[TAG_EXIT] == "3"
    assert [a.path for a in client.list_artifacts(failed.info.run_id, "logs")] == [
        f"logs/{grid.cells[1].name}.log"]
    assert len(_points(client, failed.info.run_id, "train/m0")) == 5  # it crashed after 5 steps
    ok = children["task-mixture=9:1"]
    assert ok.info.status == "FINISHED"
    assert _points(client, ok.info.run_id, "train/m2") == [(s, s * 10 + 2) for s in range(20)]

    # running the same grid again without --resume is refused, naming the flag
    with pytest.raises(UserError, match=r"1/2 cells finished.*--resume"):
        run_grid(grid, command_builder=build, console=quiet())

    (flags / slug("task-mixture=7:3")).unlink()
    again = run_grid(grid, resume=True, command_builder=build, console=quiet(), poll_s=0.1)
    assert again.ok and again.parent_run_id == result.parent_run_id
    assert [s.status for s in again.cells] == ["skipped", "finished"]
    assert [s.run_id for s in again.cells] == [s.run_id for s in result.cells]  # same child runs
    resumed = client.get_run(again.cells[1].run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags[TAG_ATTEMPTS] == "2"
    assert client.get_run(again.cells[0].run_id).data.tags[TAG_ATTEMPTS] == "1"
    assert client.get_run(again.parent_run_id).info.status == "FINISHED"
    assert _points(client, resumed.info.run_id, "train/m0")[-1] == (19, 190.0)
    assert len(client.search_runs([again.experiment_id])) == 3  # one parent + two children, no more

    # the report reads the grid ablate left behind
    from flashctl.report import make_report

    rep = make_report(grid.tracking_uri, parent=again.parent_run_id, out=workdir / "rep", formats="csv",
                      console=quiet())
    (table,) = rep.tables
    assert [(r.label, r.status) for r in table.rows] == [("9:1", "finished"), ("7:3", "finished")]
    j = [c.key for c in table.columns].index("eval/{m}/t2i_acc")
    assert [r.values[j] for r in table.rows] == [0.5, 0.5]  # the workload's eval/student/t2i_acc


@pytest.mark.slow
def test_parallel_cells_through_a_server_lose_no_metric(workdir):
    flags = workdir / "flags"
    flags.mkdir()
    steps, keys = 150, 6  # each writer: 150 log_batch calls of 6 metrics, flushed every step
    grid = plan_grid(TINY, [], ["task-mixture"], ["9:1", "7:3", "5:5"])
    result = run_grid(grid, parallel=3, command_builder=worker_builder(flags, steps, keys),
                      console=quiet(), poll_s=0.1)
    assert result.ok, [(s.cell.key, s.status, s.log.read_text()[-2000:]) for s in result.cells]

    spans = [json.loads((flags / (slug(s.cell.key) + ".json")).read_text()) for s in result.cells]
    uris = {sp["uri"] for sp in spans}
    assert len(uris) == 1 and next(iter(uris)).startswith("http://127.0.0.1:")
    assert max(sp["start"] for sp in spans) < min(sp["end"] for sp in spans)  # all three at once

    client = _client(grid.tracking_uri)  # read back from the SQLite file itself
    for s in result.cells:
        run = client.get_run(s.run_id)
        assert run.info.status == "FINISHED"
        for j in range(keys):
            assert _points(client, s.run_id, f"train/m{j}") == [(i, i * 10 + j) for i in range(steps)]
        assert run.data.metrics["eval/student/t2i_acc"] == pytest.approx(0.5)

    port = int(next(iter(uris)).rsplit(":", 1)[1])
    with socket.socket() as sock:  # the server is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert (grid.out_dir / "mlflow-server.log").exists()


@pytest.mark.slow
def test_sigterm_stops_cells_and_server_and_marks_runs_killed(workdir):
    """`kill` (or a closed terminal) on a parallel `ablate`: running cells' process groups and
    the mlflow server are stopped, the cells' runs and the parent marked KILLED."""
    import signal
    import subprocess

    flags = workdir / "flags"
    flags.mkdir()
    (flags / "hang").write_text("")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_ablate as t, io\n"
            "from rich.console import Console\n"
            "g = t.plan_grid(t.TINY, [], ['task-mixture'], ['9:1', '5:5'])\n"
            f"b = t.worker_builder(t.Path({str(flags)!r}), 5, 1)\n"
            "t.run_grid(g, parallel=2, command_builder=b, console=Console(file=io.StringIO()), poll_s=0.1)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=workdir, stderr=subprocess.PIPE, text=True)
    started = [flags / (slug(k) + ".pid") for k in ("task-mixture=9:1", "task-mixture=5:5")]
    for _ in range(1200):
        if all(p.exists() and p.read_text() for p in started):
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    workers = [json.loads(p.read_text()) for p in started]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) != 0
    assert "KeyboardInterrupt: signal SIGTERM" in proc.stderr.read()
    for w in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(w["pid"], 0)  # the cell's process is gone
    port = int(workers[0]["uri"].rsplit(":", 1)[1])
    with socket.socket() as sock:  # and so is the server
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    grid = plan_grid(TINY, [], ["task-mixture"], ["9:1", "5:5"])
    client = _client(grid.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(grid.experiment).experiment_id])
    assert sorted((r.data.tags[TAG_KIND], r.info.status) for r in runs) == [
        ("cell", "KILLED"), ("cell", "KILLED"), ("grid", "KILLED")]


def test_a_cell_another_grid_trained_is_reused_until_its_teacher_changes(workdir, tiny_world):
    """Grid B holds the cell grid A finished (same spec hash, teachers' files and data): B runs
    only its new cell and the report shows A's results for the shared one. `--no-reuse`, or a
    teacher rewritten in place under the same path, trains it again."""
    import shutil

    from flashctl.distill.job import inputs_digest
    from flashctl.report import make_report
    from flashctl.track import TAG_INPUTS, TAG_REUSED

    flags = workdir / "flags"
    flags.mkdir()
    teacher = workdir / "teacher"
    shutil.copytree(tiny_world["teacher"], teacher)
    args = [f"data.root={tiny_world['data']}", f"teachers.base.path={teacher}", f"teachers.edit.path={teacher}",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db"]
    build = worker_builder(flags, steps=3, keys=1)

    def run(levels, **kw):
        grid = plan_grid(TINY, args, ["task-mixture"], levels)
        return grid, run_grid(grid, command_builder=build, console=quiet(), poll_s=0.1, **kw)

    grid_a, a = run(["9:1"])
    assert a.ok and [s.status for s in a.cells] == ["finished"]
    client = _client(grid_a.tracking_uri)
    digest = client.get_run(a.cells[0].run_id).data.tags[TAG_INPUTS]
    assert digest == inputs_digest(load_spec(TINY, args)) and digest.startswith("c1-") and len(digest) == 19

    grid_b, b = run(["9:1", "7:3"])
    assert b.ok and [s.status for s in b.cells] == ["reused", "finished"]
    assert b.cells[0].reused_from == a.cells[0].run_id
    shared = client.get_run(b.cells[0].run_id)
    assert shared.info.status == "FINISHED" and shared.data.tags[TAG_REUSED] == a.cells[0].run_id
    assert shared.data.tags[TAG_GRID] == grid_b.grid_id and not shared.data.metrics  # trained nowhere else
    assert not grid_b.cell_log(grid_b.cells[0]).exists()  # no job started for it

    rep = make_report(grid_b.tracking_uri, parent=b.parent_run_id, out=workdir / "rep", formats="csv,html",
                      console=quiet())
    (table,) = rep.tables
    j = [c.key for c in table.columns].index("eval/{m}/t2i_acc")
    assert [(r.label, r.status, r.values[j]) for r in table.rows] == [
        ("9:1", "finished", 0.5), ("7:3", "finished", 0.5)]  # 9:1: grid A's run's metric
    html = next((workdir / "rep").glob("*.html")).read_text()
    assert "reused from another grid" in html and a.cells[0].run_id in html and b.cells[0].run_id in html

    # --resume --no-reuse trains the shared cell after all, under a new child run of grid B
    again = run_grid(grid_b, resume=True, reuse=False, command_builder=build, console=quiet(), poll_s=0.1)
    assert [s.status for s in again.cells] == ["finished", "skipped"]
    assert again.cells[0].run_id not in (b.cells[0].run_id, a.cells[0].run_id)
    assert again.cells[0].reused_from is None and grid_b.cell_log(grid_b.cells[0]).exists()

    grid_c, c = run(["9:1", "5:5"], reuse=False)
    assert [s.status for s in c.cells] == ["finished", "finished"]

    weights = next(p for p in teacher.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # rewritten with the same bytes (a copy, a touch): same teacher
    assert inputs_digest(load_spec(TINY, args)) == digest
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the teacher retrained in place: same path, same spec hash, other weights
    weights.write_bytes(bytes(data))
    assert inputs_digest(load_spec(TINY, args)) != digest
    _, d = run(["9:1", "5:5", "7:3"])
    assert [s.status for s in d.cells] == ["finished", "finished", "finished"]

    # --resume of grid A: its finished cell trained on the old teacher, so it is not kept; grid
    # D's cell trained on the current one and is reused. The old run dir (its checkpoint would
    # have been resumed, not retrained) is renamed, not deleted.
    old_dir = grid_a.cell_run_dir(grid_a.cells[0])
    assert old_dir.is_dir()
    stale = run_grid(grid_a, resume=True, command_builder=build, console=quiet(), poll_s=0.1)
    (cell,) = stale.cells
    assert (cell.status, cell.stale_from, cell.reused_from) == ("reused", a.cells[0].run_id, d.cells[0].run_id)
    assert f"replaces run {a.cells[0].run_id}, which ran on other teachers' files or data" in event_line(cell)
    assert old_dir.with_name(f"{old_dir.name}.stale-{a.cells[0].run_id[:12]}").is_dir() and not old_dir.exists()
    again = run_grid(grid_a, resume=True, command_builder=build, console=quiet(), poll_s=0.1)
    assert [(s.status, s.run_id, s.stale_from) for s in again.cells] == [("reused", cell.run_id, None)]
    # with --no-reuse it trains, on the current teacher
    again = run_grid(grid_a, resume=True, reuse=False, command_builder=build, console=quiet(), poll_s=0.1)
    assert [s.status for s in again.cells] == ["finished"]
    assert client.get_run(again.cells[0].run_id).data.tags[TAG_INPUTS] == inputs_digest(load_spec(TINY, args))

    missing = load_spec(TINY, [*args, f"data.root={workdir / 'nowhere'}"])
    assert inputs_digest(missing) is None  # data not prepared: nothing to compare, nothing reused


# --------------------------------------------------------------------------------------------
# The worker (run as a script by the tests above)


def _worker(argv: list[str]) -> int:
    flags, steps, keys, cell_key, *execution = argv
    flags, steps, keys = Path(flags), int(steps), int(keys)
    from flashctl.spec import TrackingSpec
    from flashctl.track import Tracker

    opts = dict(item.split("=", 1) for item in execution)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    assert opts["tracking.uri"] == uri
    tracker = Tracker(TrackingSpec(uri=uri, experiment="unused"), Path(opts["run.out_dir"]) / opts["run.name"],
                      opts["run.name"])
    run_id = tracker.start()
    assert run_id == os.environ["MLFLOW_RUN_ID"]
    start = time.time()
    if (flags / "hang").exists():  # stand for a long training run until stopped
        tmp = flags / (slug(cell_key) + ".pid.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "uri": uri}))
        tmp.replace(flags / (slug(cell_key) + ".pid"))  # the test polls for the file: never half-written
        time.sleep(300)
    fail = (flags / slug(cell_key)).exists()
    for step in range(steps):
        tracker.log_metrics({f"train/m{j}": step * 10 + j for j in range(keys)}, step)
        tracker.flush()  # one request per step: the most concurrent writes the store will see
        if fail and step == 4:
            print("simulated crash", flush=True)
            return 3
    tracker.log_metrics({"eval/student/t2i_acc": 0.5}, steps)
    tracker.finish()
    (flags / (slug(cell_key) + ".json")).write_text(json.dumps({"start": start, "end": time.time(), "uri": uri}))
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.exit(_worker(sys.argv[2:]))
