"""Running a grid: one MLflow parent run, every unfinished cell under it, locally or as a Slurm
array, with a live view of the cells and a summary at the end. A failing cell never stops the
grid; SIGTERM / SIGHUP stop the running cells (and the grid's mlflow server) as Ctrl-C does.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from flashctl.ablate.array import execute_array
from flashctl.ablate.grid import CommandBuilder, Grid, cell_command, check_array, on_slurm, plan_grid, print_plan
from flashctl.ablate.local import execute_local, grid_lock, stop_leftover_groups
from flashctl.ablate.status import GridResult, event_line, status_table
from flashctl.ablate.store import prepare_runs
from flashctl.errors import UserError
from flashctl.system import signals_interrupt
from flashctl.track import TAG_ARRAY


def run_grid(
    grid: Grid,
    parallel: int = 1,
    resume: bool = False,
    command_builder: CommandBuilder = cell_command,
    console=None,
    poll_s: float = 0.5,
    wait: bool = True,
    reuse: bool = True,
) -> GridResult:
    """Run every unfinished cell (up to `parallel` at once) under one MLflow parent run.

    Prints a live table of cell states and a summary; returns the result (callers exit
    non-zero when `result.ok` is False). Raises UserError when the grid already exists and
    `resume` is False, or while another process runs it. With `parallel > 1` on a SQLite store,
    cells log through a local `mlflow server` that is stopped before returning. On Slurm
    (`launch.backend: slurm`) the cells run as one job array; `parallel` is then
    `launch.slurm.array_parallel`, and `wait=False` returns once the array is submitted. With
    `reuse`, a cell that a finished cell of another grid already trained (same spec hash, same
    teachers' files and data) is not run again: `ablate.store` records it as `reused`.
    """
    from mlflow.tracking import MlflowClient

    from flashctl.term import human_console, show
    from flashctl.track import ensure_experiment

    if parallel < 1:
        raise UserError(f"--parallel: must be >= 1, got {parallel}")
    as_array = on_slurm(grid)
    if as_array:
        check_array(grid)
    console = console or human_console(stderr=True)
    if as_array and parallel > 1:
        console.print(f"--parallel {parallel} does not apply on Slurm: launch.slurm.array_parallel "
                      f"({grid.base_spec.launch.slurm.array_parallel}) sets how many array tasks run at once",
                      highlight=False, markup=False)
    store = grid.tracking_uri
    direct = MlflowClient(tracking_uri=store)
    experiment_id = ensure_experiment(direct, grid.experiment, store)
    with grid_lock(grid):
        stop_leftover_groups(grid, console)
        parent_id, states = prepare_runs(direct, experiment_id, grid, resume, reuse)
        direct.update_run(parent_id, status="RUNNING")
        todo = sum(1 for s in states if s.status == "pending")
        at_once = grid.base_spec.launch.slurm.array_parallel if as_array else parallel
        console.print(f"grid {grid.grid_id}: parent run {parent_id}, {todo} of {len(states)} cells to run"
                      f", {min(at_once, max(todo, 1))} at a time" + (" on Slurm" if as_array else ""),
                      highlight=False)
        for s in states:
            if s.status == "reused" or s.stale_from:
                console.print(event_line(s), highlight=False, markup=False)
        interrupted = True
        with signals_interrupt(signal.SIGTERM, signal.SIGHUP):  # a `kill`, a closed terminal
            try:
                if as_array:
                    execute_array(states, grid, direct, experiment_id, parent_id, wait, command_builder,
                                  console, poll_s)
                elif todo:
                    execute_local(states, grid, direct, store, parallel, experiment_id, command_builder,
                                  console, poll_s)
                interrupted = False
            finally:
                result = GridResult(grid, parent_id, experiment_id, states)
                if not result.in_flight:  # an array still running keeps its parent RUNNING
                    status = "KILLED" if interrupted else ("FINISHED" if result.ok else "FAILED")
                    with suppress(Exception):  # best effort: the summary below must still print
                        direct.set_terminated(parent_id, status=status)
                show(console, status_table(grid, states, title=f"grid {grid.grid_id}: parent run {parent_id}"))
                if result.in_flight:
                    job = direct.get_run(parent_id).data.tags.get(TAG_ARRAY, "?")
                    console.print(f"Slurm array {job} keeps running ({len(result.in_flight)} cells): "
                                  f"`flashctl ablate ... --resume` waits for it and records the results; "
                                  f"`scancel {job}` stops it", highlight=False, markup=False)
    failed = result.failed
    if failed:
        console.print(f"[red]{len(failed)} of {len(states)} cells failed[/red]; fix and re-run with --resume "
                      f"(finished cells are skipped)", highlight=False)
    elif not result.in_flight:
        console.print(f"[green]all {len(states)} cells finished[/green]; `flashctl report --parent {parent_id}`",
                      highlight=False)
    return result


def ablate(
    spec_path: str | Path | None,
    overrides: Sequence[str] = (),
    factors: Sequence[str] = (),
    levels: Sequence[str] | None = None,
    parallel: int = 1,
    resume: bool = False,
    dry_run: bool = False,
    command_builder: CommandBuilder = cell_command,
    console=None,
    wait: bool = True,
    seeds: int = 1,
    reuse: bool = True,
) -> GridResult | Grid:
    """The `flashctl ablate` entry: plan the grid, then print it (`dry_run`) or run it.

    `wait=False` (Slurm only) returns once the array is submitted; `seeds` > 1 repeats every
    cell over that many training seeds."""
    grid = plan_grid(spec_path, overrides, factors, levels, seeds=seeds)
    if dry_run:
        print_plan(grid, parallel, command_builder, console)
        return grid
    return run_grid(grid, parallel=parallel, resume=resume, command_builder=command_builder, console=console,
                    wait=wait, reuse=reuse)
