"""Slurm: the unfinished cells of a grid as ONE job array.

The backend is the spec's (`launch.backend: slurm` in the spec or as an override), as for
`flashctl distill`, so one spec says where everything runs. The cells go to Slurm as one array
(`launch/slurm.py: write_array`, one cell per task, `launch.slurm.array_parallel` at a time);
each task runs the cell's `flashctl distill ... launch.backend=local` inside its allocation with
its child's `MLFLOW_RUN_ID`. The grid then waits for the array (`wait=False` only submits) and
marks every child by its MLflow status, which the job sets itself. An array outlives an
interrupted grid; `--resume` finds it (parent tag) and waits for it again instead of submitting
the cells twice. Tasks log straight to the store: on a real cluster use a tracking server
reachable from the compute nodes (SQLite only for a few tasks on a shared disk).
"""

from __future__ import annotations

import time
from contextlib import suppress
from pathlib import Path

from flashctl.ablate.grid import CommandBuilder, Grid, array_cells
from flashctl.ablate.status import CellState, StatusView
from flashctl.track import TAG_ARRAY, TAG_ATTEMPTS, TAG_SLURM_STATE, TAG_TASK


def _task_log(grid: Grid, job_id: str, task: int, ext: str = "out") -> Path:
    return grid.out_dir / "logs" / f"{job_id}_{task}.{ext}"  # `%A_%a` of render_array


def _submit_array(states: list[CellState], grid: Grid, client, experiment_id: str, parent_id: str,
                  command_builder: CommandBuilder) -> tuple[str, list[tuple[int, CellState]]]:
    """Write and submit the array of the pending cells; returns (job id, [(task index, cell)])."""
    from flashctl.launch import slurm

    todo = [s for s in states if s.status == "pending"]
    cells = array_cells(grid, [(s.cell, s.run_id) for s in todo], grid.tracking_uri, experiment_id,
                        command_builder)
    job = slurm.submit(slurm.write_array(grid.base_spec, cells, grid.out_dir))
    client.set_tag(parent_id, TAG_ARRAY, job)
    for i, s in enumerate(todo):
        attempts = int(client.get_run(s.run_id).data.tags.get(TAG_ATTEMPTS, "0") or 0) + 1
        client.set_tag(s.run_id, TAG_ATTEMPTS, str(attempts))
        client.set_tag(s.run_id, TAG_TASK, f"{job}_{i}")
        client.update_run(s.run_id, status="SCHEDULED")  # the job sets RUNNING when it starts
        s.status, s.log = "queued", _task_log(grid, job, i)
    return job, list(enumerate(todo))


def _active_array(client, grid: Grid, parent_id: str,
                  states: list[CellState]) -> tuple[str, list[tuple[int, CellState]]] | None:
    """The grid's array from an earlier run if Slurm still runs it: (job id, [(task, cell)])."""
    from flashctl.launch import slurm

    job = client.get_run(parent_id).data.tags.get(TAG_ARRAY)
    if not job or slurm.job_state(job) in slurm.TERMINAL_STATES | {"UNKNOWN"}:
        return None
    tasks = []
    for s in states:
        tag = client.get_run(s.run_id).data.tags.get(TAG_TASK, "") if s.status == "pending" else ""
        if tag.startswith(f"{job}_"):
            task = int(tag.rsplit("_", 1)[1])
            s.status, s.log = "queued", _task_log(grid, job, task)
            tasks.append((task, s))
    return job, sorted(tasks, key=lambda t: t[0])


def _finish_task(state: CellState, task: int, job: str, slurm_state: str, grid: Grid, client) -> None:
    """A task ended: the child's MLflow status (set by the job) decides finished or failed."""
    state.ended = time.monotonic()
    client.set_tag(state.run_id, TAG_SLURM_STATE, slurm_state)
    if client.get_run(state.run_id).info.status == "FINISHED":
        state.status = "finished"
    else:
        killed = slurm_state in ("CANCELLED", "TIMEOUT", "PREEMPTED", "DEADLINE")
        state.status = "killed" if killed else "failed"
        client.set_terminated(state.run_id, status="KILLED" if killed else "FAILED")
    for ext in ("out", "err"):
        log = _task_log(grid, job, task, ext)
        if log.exists():
            with suppress(Exception):  # the log is a convenience, as for local cells
                client.log_artifact(state.run_id, str(log), "logs")


def _wait_array(job: str, tasks: list[tuple[int, CellState]], grid: Grid, client, console,
                poll_s: float, lost_after: int = 5) -> None:
    """Poll the array until every task ended, marking each cell as its task ends. A task Slurm
    no longer knows (`lost_after` polls in a row without any record) is judged by MLflow alone."""
    from flashctl.launch import slurm

    n = max((t for t, _ in tasks), default=-1) + 1
    waiting = dict(tasks)
    misses = 0
    with StatusView(grid, [s for _, s in tasks], console) as live:
        while waiting:
            states = slurm.array_task_states(job, n)
            misses = 0 if states else misses + 1
            for task, s in list(waiting.items()):
                state = states.get(task, "UNKNOWN") if states else "UNKNOWN"
                if state in slurm.TERMINAL_STATES or (state == "UNKNOWN" and misses >= lost_after):
                    del waiting[task]
                    _finish_task(s, task, job, state, grid, client)
                elif state == "RUNNING" and s.status != "running":
                    s.status, s.started = "running", time.monotonic()
                elif state in ("PENDING", "REQUEUED", "REQUEUE_HOLD") and s.status == "running":
                    s.status = "queued"  # requeued (time limit, node failure): it resumes later
            live.update()
            if waiting:
                time.sleep(poll_s)


def execute_array(states: list[CellState], grid: Grid, client, experiment_id: str, parent_id: str,
                  wait: bool, command_builder: CommandBuilder, console, poll_s: float) -> None:
    """Run the pending cells as one array and, with `wait`, follow it to the end. The grid's
    array from an earlier run that Slurm still runs is waited for first (never submitted
    twice). An interrupted wait leaves the array running."""
    attached = _active_array(client, grid, parent_id, states)
    if attached is not None:
        job, tasks = attached
        console.print(f"Slurm array {job} of this grid is still active ({len(tasks)} cells in it)"
                      + (": waiting for it" if wait else ""), highlight=False)
        if not wait:
            return
        _wait_array(job, tasks, grid, client, console, poll_s)
    if not any(s.status == "pending" for s in states):
        return
    job, tasks = _submit_array(states, grid, client, experiment_id, parent_id, command_builder)
    console.print(f"submitted Slurm array {job}: {len(tasks)} cells, {grid.base_spec.launch.slurm.array_parallel} "
                  f"at a time ({grid.out_dir}/slurm-array.sbatch, logs in {grid.out_dir}/logs)", highlight=False)
    if wait:
        _wait_array(job, tasks, grid, client, console, poll_s)
