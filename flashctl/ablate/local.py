"""Running cells on this machine: one subprocess per cell in its own process group, a lock per
grid, and a local `mlflow server` when several cells write one SQLite store.

Each cell gets `MLFLOW_RUN_ID` and `MLFLOW_TRACKING_URI`; a failing cell never stops the grid.
With `parallel > 1` on a SQLite store the cells log through a local `mlflow server` (one writer
in front of the file). While a grid runs it holds a lock in its folder (a second `ablate` of the
same grid fails fast) and records each cell's process group there: a grid killed without
clean-up (SIGKILL) leaves its cells running in their own sessions, and the next `--resume` stops
them before running those cells again.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from collections import deque
from contextlib import contextmanager, suppress
from pathlib import Path

from flashctl.ablate.grid import CommandBuilder, Grid, execution_overrides, uses_server
from flashctl.ablate.status import CellState, StatusView
from flashctl.errors import UserError
from flashctl.system import environ
from flashctl.track import TAG_ATTEMPTS, TAG_EXIT


def _kill_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """TERM the cell's process group, then KILL after `timeout_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


# Process groups a grid leaves behind. Cells (and the mlflow server) run in their own sessions so
# that they can be stopped one by one; the price is that a grid killed by SIGKILL cannot stop
# them. Each group is recorded as GRID/pids/<name> = "<leader pid> <leader start time>" (pid + start
# time identify a process across pid reuse) and removed when the grid ends it.

_PIDS = "pids"


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of a live process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return fields[0], int(fields[2]), int(fields[19])


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[1] == pgid and st[0] != "Z":
                out.append(int(entry.name))
    return out


def _record_group(grid: Grid, name: str, pid: int) -> None:
    st = _proc_stat(pid)
    if st is not None:
        path = grid.out_dir / _PIDS / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{pid} {st[2]}\n")


def _forget_group(grid: Grid, name: str) -> None:
    with suppress(FileNotFoundError):
        (grid.out_dir / _PIDS / name).unlink()


def stop_leftover_groups(grid: Grid, console, timeout_s: float = 60.0) -> list[str]:
    """Stop the process groups recorded by an earlier run of this grid that died without ending
    them (TERM: cells checkpoint and exit; KILL after `timeout_s`). Call with the grid lock held,
    i.e. when no live grid owns them. Returns the names of the groups it stopped."""
    folder = grid.out_dir / _PIDS
    if not folder.is_dir() or not Path("/proc").is_dir():
        return []
    stopped = []
    for path in sorted(folder.iterdir()):
        with suppress(ValueError, OSError):
            pid, start = (int(x) for x in path.read_text().split())
            leader = _proc_stat(pid)
            ours = leader[2] == start if leader is not None else bool(_group_members(pid))
            if ours and _group_members(pid):
                console.print(f"stopping {path.name} (process group {pid}), left running by an earlier "
                              "grid that was killed", highlight=False, markup=False)
                with suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while _group_members(pid) and time.monotonic() < deadline:
                    time.sleep(0.5)
                if _group_members(pid):
                    with suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                stopped.append(path.name)
        path.unlink(missing_ok=True)
    return stopped


@contextmanager
def grid_lock(grid: Grid):
    """Hold an exclusive lock on GRID/.lock while the grid runs, so a second `ablate` of the same
    grid fails fast instead of running its cells twice. The kernel drops a `flock` when its
    holder dies, SIGKILL included, so a killed grid never leaves a stale lock."""
    import fcntl

    grid.out_dir.mkdir(parents=True, exist_ok=True)
    path = grid.out_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by cell processes
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "?"
            raise UserError(f"grid {grid.grid_id} is being run by another `flashctl ablate` (pid {holder}, "
                            f"lock {path}); wait for it to end") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _start(state: CellState, grid: Grid, client, uri: str, parallel: int, experiment_id: str,
           command_builder: CommandBuilder, base_env: dict[str, str]) -> None:
    run = client.get_run(state.run_id)
    attempts = int(run.data.tags.get(TAG_ATTEMPTS, "0") or 0) + 1
    client.set_tag(state.run_id, TAG_ATTEMPTS, str(attempts))
    client.update_run(state.run_id, status="RUNNING")
    argv = command_builder(grid, state.cell, execution_overrides(grid, state.cell, uri, parallel))
    env = dict(base_env, MLFLOW_RUN_ID=state.run_id, MLFLOW_TRACKING_URI=uri,
               MLFLOW_EXPERIMENT_ID=experiment_id)
    state.log.parent.mkdir(parents=True, exist_ok=True)
    with open(state.log, "ab") as log:
        log.write(f"\n$ {shlex.join(argv)}\n".encode())
        log.flush()
        state.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    _record_group(grid, state.cell.name, state.proc.pid)
    state.status = "running"
    state.started = time.monotonic()


def _finish(state: CellState, grid: Grid, client, rc: int) -> None:
    """Record a finished process: FINISHED on exit 0, FAILED otherwise (never stops the grid)."""
    _forget_group(grid, state.cell.name)
    state.ended = time.monotonic()
    state.returncode = rc
    state.proc = None
    client.set_tag(state.run_id, TAG_EXIT, str(rc))
    run = client.get_run(state.run_id)
    if rc == 0 and run.info.status != "FAILED":
        state.status = "finished"
        if run.info.status != "FINISHED":  # the job exited cleanly without closing its run
            client.set_terminated(state.run_id, status="FINISHED")
    else:
        state.status = "failed"
        client.set_terminated(state.run_id, status="FAILED")
    if state.log and state.log.exists():
        # the log is a convenience: a store that cannot take artifacts must not fail the grid
        with suppress(Exception):
            client.log_artifact(state.run_id, str(state.log), "logs")


def _execute(states: list[CellState], grid: Grid, client, uri: str, parallel: int,
             experiment_id: str, command_builder: CommandBuilder, console, poll_s: float) -> None:
    base_env = dict(os.environ)
    pending = deque(s for s in states if s.status == "pending")
    running: list[CellState] = []
    try:
        with StatusView(grid, states, console) as live:
            while pending or running:
                while pending and len(running) < parallel:
                    s = pending.popleft()
                    _start(s, grid, client, uri, parallel, experiment_id, command_builder, base_env)
                    running.append(s)
                    live.update()
                time.sleep(poll_s)
                for s in list(running):
                    rc = s.proc.poll()
                    if rc is not None:
                        running.remove(s)
                        _finish(s, grid, client, rc)
                live.update()
    except BaseException:
        for s in running:
            if s.proc is not None:
                _kill_group(s.proc)
                _forget_group(grid, s.cell.name)
            s.status, s.ended, s.proc = "killed", time.monotonic(), None
            with suppress(Exception):  # best effort while interrupted
                client.set_terminated(s.run_id, status="KILLED")
        raise


def execute_local(states: list[CellState], grid: Grid, direct, store: str, parallel: int, experiment_id: str,
                  command_builder: CommandBuilder, console, poll_s: float) -> None:
    """Run the cells on this machine, through a local mlflow server when several write SQLite."""
    from mlflow.tracking import MlflowClient

    from flashctl.mlflow_server import MlflowServer
    from flashctl.track import artifact_root

    if not uses_server(store, parallel):
        _execute(states, grid, direct, store, parallel, experiment_id, command_builder, console, poll_s)
        return
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"starting an mlflow server in front of {store} (parallel cells, one writer)", highlight=False)
    # MLflow prints a "View run at http://..." link per terminated run on an http store: here
    # it would point at a server that is gone once the grid ends.
    with environ(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"), \
            MlflowServer(store, artifact_root(store), log_path=grid.out_dir / "mlflow-server.log") as server:
        _record_group(grid, "mlflow-server", server.proc.pid)
        try:
            console.print(f"mlflow server {server.uri} is up", highlight=False)
            client = MlflowClient(tracking_uri=server.uri)
            _execute(states, grid, client, server.uri, parallel, experiment_id, command_builder, console, poll_s)
        finally:
            _forget_group(grid, "mlflow-server")

