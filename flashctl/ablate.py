"""Factor grids: levels -> cells -> one MLflow parent run with one child run per cell.

A *factor* (data-composition, teacher-guidance, task-mixture) has named *levels*, each a set of
dotted overrides of the base spec (from the spec's `ablations` section, else `DEFAULT_LEVELS`).
Several factors expand into their Cartesian product. Each *cell* is base spec + CLI overrides +
its levels' overrides, identified by the `spec_hash` of that resolved spec; the *grid id* hashes
the cells. Run naming, tracking and the launch port are execution details added to the cell's
command, not part of its identity.

MLflow layout (through `MlflowClient` only): one parent run per grid (tags `flashctl.kind=grid`,
`flashctl.grid_id`, factors and level order), one child per cell (`mlflow.parentRunId`, factor,
level, spec hash, grid id). Running a grid again finds its parent by grid id: finished children
with the same hash are skipped, failed or unfinished ones run again under their old run id (the
job resumes from the checkpoint in its run dir). A failing cell never stops the grid.

Each cell is a subprocess (`cell_command` builds it; any `CommandBuilder` can replace it) that
gets `MLFLOW_RUN_ID` and `MLFLOW_TRACKING_URI`. With `parallel > 1` on a SQLite store the cells
log through a local `mlflow server` (one writer in front of the file). While a grid runs it holds
a lock in its folder (a second `ablate` of the same grid fails fast) and records each cell's
process group there: a grid killed without clean-up (SIGKILL) leaves its cells running in their
own sessions, and the next `--resume` stops them before running those cells again.

Slurm (`launch.backend: slurm` in the spec or as an override): the backend is the spec's, as for
`flashctl distill`, so one spec says where everything runs. The unfinished cells go to Slurm
as ONE job array (`launch/slurm.py: write_array`, one cell per task, `%launch.slurm.array_parallel`
at a time); each task runs the cell's `flashctl distill ... launch.backend=local` inside its
allocation with its child's `MLFLOW_RUN_ID`. The grid then waits for the array (`wait=False`
only submits) and marks every child by its MLflow status, which the job sets itself. An array
outlives an interrupted grid; `--resume` finds it (parent tag) and waits for it again instead
of submitting the cells twice. Tasks log straight to the store: on a real cluster use a tracking
server reachable from the compute nodes (SQLite only for a few tasks on a shared disk).

mlflow is imported inside functions: `--dry-run` and `--help` stay fast and touch nothing.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flashctl.errors import UserError
from flashctl.spec import (
    FACTORS,
    ExperimentSpec,
    SpecError,
    apply_overrides,
    load_spec_data,
    parse_override,
    spec_hash,
    to_yaml,
    validate_data,
)

# Tags (the contract between `ablate`, the distill job and `report`).
TAG_KIND = "flashctl.kind"
TAG_GRID = "flashctl.grid_id"
TAG_FACTORS = "flashctl.factors"
TAG_LEVELS = "flashctl.levels"  # parent: JSON {factor: [level, ...]} in grid order
TAG_FACTOR = "flashctl.factor"  # child: factors joined by ","
TAG_LEVEL = "flashctl.level"  # child: levels joined by ","
TAG_LEVEL_OF = "flashctl.level."  # child: + factor -> that factor's level
TAG_CELL = "flashctl.cell"  # child: "factor=level,factor=level"
TAG_HASH = "flashctl.spec_hash"
TAG_ATTEMPTS = "flashctl.attempts"
TAG_EXIT = "flashctl.exit_code"
TAG_PARENT = "mlflow.parentRunId"
TAG_ARRAY = "flashctl.slurm_array"  # parent: job id of the grid's latest Slurm array
TAG_TASK = "flashctl.slurm_task"  # child: "<array job id>_<task index>"
TAG_SLURM_STATE = "flashctl.slurm_state"  # child: the Slurm state its task ended in

_ALL_CATEGORIES = {"object": 1.0, "scene": 1.0, "text": 1.0}
_ALL_ASPECTS = {"square": 1.0, "landscape": 1.0, "portrait": 1.0}

DEFAULT_LEVELS: dict[str, dict[str, dict[str, Any]]] = {
    # Paper factor 1 mapped onto the shapes world. A dict override replaces the whole mapping,
    # so each level sets both categories and aspects: the level alone defines the composition.
    "data-composition": {
        "text-centric": {"data.categories": {"text": 1.0}, "data.aspects": _ALL_ASPECTS},
        "mixed-category": {"data.categories": _ALL_CATEGORIES, "data.aspects": _ALL_ASPECTS},
        "landscape-only": {"data.categories": _ALL_CATEGORIES, "data.aspects": {"landscape": 1.0}},
        "landscape+portrait": {"data.categories": _ALL_CATEGORIES,
                               "data.aspects": {"landscape": 1.0, "portrait": 1.0}},
        "portrait-only": {"data.categories": _ALL_CATEGORIES, "data.aspects": {"portrait": 1.0}},
    },
    "teacher-guidance": {
        "single": {"guidance.policy": "single"},
        "specialised": {"guidance.policy": "specialised"},
        "stepwise": {"guidance.policy": "stepwise"},
    },
    "task-mixture": {
        "9:1": {"mixture.t2i": 9, "mixture.edit": 1},
        "7:3": {"mixture.t2i": 7, "mixture.edit": 3},
        "5:5": {"mixture.t2i": 5, "mixture.edit": 5},
    },
}

# Spec keys a cell's command sets for execution only (not part of the cell's identity).
EXECUTION_KEYS = ("run.out_dir", "run.name", "tracking.uri", "launch.master_port", "launch.backend")


# --------------------------------------------------------------------------------------------
# Levels and grid expansion (pure: no MLflow, no files written)


def factor_levels(spec: ExperimentSpec, factor: str) -> dict[str, dict[str, Any]]:
    """Levels of `factor`: the spec's `ablations[factor]`, else the built-in defaults."""
    if factor not in FACTORS:
        raise UserError(f"--factor: unknown factor {factor!r}; valid: {', '.join(FACTORS)}")
    return dict(spec.ablations.get(factor) or DEFAULT_LEVELS[factor])


def override_arg(key: str, value: Any) -> str:
    """`key=value` that `spec.parse_override` reads back as exactly `value` (quoted if needed)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, str) and yaml.safe_load(value) != value:
        text = json.dumps(value)  # e.g. "5:5" would read back as the base-60 integer 305
    arg = f"{key}={text}"
    if parse_override(arg)[1] != value:
        raise UserError(f"ablations: override {key}={value!r} cannot be written as key=value")
    return arg


def slug(text: str) -> str:
    """File-system and run-name safe form of a level name (`9:1` -> `9-1`)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "x"


@dataclass(frozen=True)
class Cell:
    """One grid cell: a level per factor, its overrides and the hash of its resolved spec."""

    index: int
    levels: tuple[tuple[str, str], ...]
    overrides: dict[str, Any]
    spec_hash: str
    name: str

    @property
    def key(self) -> str:
        """`factor=level[,factor=level]` (unique within a grid)."""
        return ",".join(f"{f}={lv}" for f, lv in self.levels)

    @property
    def label(self) -> str:
        """Levels joined for display (`9:1 · single`)."""
        return " · ".join(lv for _, lv in self.levels)

    def override_args(self) -> list[str]:
        """The level overrides as `key=value` arguments."""
        return [override_arg(k, v) for k, v in self.overrides.items()]


@dataclass(frozen=True)
class Grid:
    """A planned grid: base spec, CLI overrides, factors, selected levels, cells."""

    spec_path: str | None
    overrides: tuple[str, ...]
    factors: tuple[str, ...]
    levels: dict[str, list[str]]
    cells: tuple[Cell, ...]
    grid_id: str
    base_name: str
    base_spec: ExperimentSpec
    tracking_uri: str
    experiment: str
    out_dir: Path

    def cell_run_dir(self, cell: Cell) -> Path:
        """Run directory of a cell's distill job (checkpoints live there)."""
        return self.out_dir / cell.name

    def cell_log(self, cell: Cell) -> Path:
        """Where the cell's stdout/stderr go."""
        return self.out_dir / "logs" / f"{cell.name}.log"


def _conflicts(cli_overrides: Sequence[str], level_keys: set[str]) -> list[tuple[str, str]]:
    out = []
    for item in cli_overrides:
        key = item.split("=", 1)[0]
        for lk in level_keys:
            if key == lk or key.startswith(lk + ".") or lk.startswith(key + "."):
                out.append((item, lk))
    return out


def grid_id_of(cells: Sequence[Cell]) -> str:
    """Hash of the cells (key and spec hash of each), 12 hex chars."""
    blob = json.dumps([[c.key, c.spec_hash] for c in cells], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def plan_grid(
    spec_path: str | Path | None,
    overrides: Sequence[str] = (),
    factors: Sequence[str] = (),
    levels: Sequence[str] | None = None,
) -> Grid:
    """Expand `factors` (Cartesian product) into validated cells; writes nothing.

    `levels` selects level names (each must belong to one of the factors; a factor none of
    whose levels is named keeps all of them). Raises UserError for unknown factors/levels or
    a CLI override that sets a key the grid sweeps, SpecError when a cell's spec is invalid.
    """
    from flashctl.track import resolve_uri

    if not factors:
        raise UserError(f"--factor: name at least one factor; valid: {', '.join(FACTORS)}")
    factors = tuple(dict.fromkeys(factors))
    data, text, source = load_spec_data(spec_path)
    try:
        base_data = apply_overrides(data, list(overrides))
    except ValueError as exc:
        raise SpecError(source, [("<override>", str(exc))]) from None
    base = validate_data(base_data, source, text)

    table = {f: factor_levels(base, f) for f in factors}
    chosen: dict[str, list[str]] = {f: list(lv) for f, lv in table.items()}
    if levels:
        wanted = [lv.strip() for lv in levels if lv.strip()]
        known = {lv for lvs in table.values() for lv in lvs}
        unknown = [lv for lv in wanted if lv not in known]
        if unknown:
            valid = "; ".join(f"{f}: {', '.join(lvs)}" for f, lvs in table.items())
            raise UserError(f"--levels: unknown level {unknown[0]!r}; valid levels: {valid}")
        for f, lvs in table.items():
            picked = [lv for lv in lvs if lv in wanted]
            chosen[f] = picked or list(lvs)
    for f, lvs in chosen.items():
        if not lvs:
            raise UserError(f"ablations.{f}: the factor has no levels")

    level_keys = {k for f in factors for lv in chosen[f] for k in table[f][lv]}
    clash = _conflicts(overrides, level_keys)
    if clash:
        item, lk = clash[0]
        raise UserError(f"override {item!r} conflicts with the swept key {lk!r}; drop it or drop the factor")

    cells = []
    for index, combo in enumerate(itertools.product(*(chosen[f] for f in factors))):
        pairs = tuple(zip(factors, combo))
        merged: dict[str, Any] = {}
        for f, lv in pairs:
            merged.update(table[f][lv])
        key = ",".join(f"{f}={lv}" for f, lv in pairs)
        try:
            spec = validate_data(apply_overrides(base_data, merged), f"{source} (cell {key})")
        except ValueError as exc:  # a malformed dotted key in `ablations`
            raise SpecError(f"{source} (cell {key})", [("ablations", str(exc))]) from None
        name = "-".join([base.run.name] + [f"{f}-{slug(lv)}" for f, lv in pairs])
        cells.append(Cell(index, pairs, merged, spec_hash(spec), name))

    gid = grid_id_of(cells)
    uri = resolve_uri(base.tracking.uri)
    return Grid(
        spec_path=str(spec_path) if spec_path is not None else None,
        overrides=tuple(overrides),
        factors=factors,
        levels=chosen,
        cells=tuple(cells),
        grid_id=gid,
        base_name=base.run.name,
        base_spec=base,
        tracking_uri=uri,
        experiment=base.tracking.experiment,
        out_dir=Path(base.run.out_dir) / f"ablate-{gid}",
    )


# --------------------------------------------------------------------------------------------
# Cell commands

CommandBuilder = Callable[[Grid, Cell, list[str]], list[str]]
"""(grid, cell, execution overrides `k=v`) -> argv of the cell's process."""


def execution_overrides(grid: Grid, cell: Cell, tracking_uri: str, parallel: int) -> list[str]:
    """Overrides that place a cell's job (run dir, name, store) without changing its identity.

    Cells running at once on one machine need distinct rendezvous ports, so with `parallel > 1`
    and the local backend, and always on Slurm, each gets `launch.master_port` + its index
    (`spec_hash` leaves the port out). A Slurm array task runs its cell with the local backend.
    """
    args = [f"run.out_dir={grid.out_dir}", f"run.name={cell.name}", f"tracking.uri={tracking_uri}"]
    backend = grid.base_spec.launch.backend
    if (parallel > 1 and backend == "local") or backend == "slurm":
        # Array tasks of one grid may share a node too.
        port = grid.base_spec.launch.master_port + cell.index
        if port > 65535:
            port = 1024 + port % 64511
        args.append(f"launch.master_port={port}")
    if backend == "slurm":
        args.append("launch.backend=local")  # the task runs the job inside its own allocation
    return args


def cell_command(grid: Grid, cell: Cell, execution: list[str]) -> list[str]:
    """The default cell process: `flashctl distill SPEC <cli overrides> <levels> <execution>`."""
    cmd = [sys.executable, "-m", "flashctl.cli", "distill"]
    if grid.spec_path is not None:
        cmd.append(grid.spec_path)
    return cmd + list(grid.overrides) + cell.override_args() + execution


def _uses_server(uri: str, parallel: int) -> bool:
    return parallel > 1 and uri.startswith("sqlite:")


def _on_slurm(grid: Grid) -> bool:
    return grid.base_spec.launch.backend == "slurm"


def _check_array(grid: Grid) -> None:
    """An array task is one allocation of `launch.nnodes` nodes running the local backend, which
    starts ranks on its own node only: multi-node cells cannot run as array tasks."""
    if grid.base_spec.launch.nnodes != 1:
        raise UserError(
            f"launch.nnodes: a grid on Slurm runs each cell as one job-array task on one node, got "
            f"{grid.base_spec.launch.nnodes} nodes; run multi-node cells one by one with `flashctl distill`"
        )


ArrayCell = tuple[str, list[str], dict[str, str]]


def array_cells(grid: Grid, cells: Sequence[tuple[Cell, str]], uri: str, experiment_id: str,
                command_builder: CommandBuilder = cell_command) -> list[ArrayCell]:
    """(cell key, argv, env) per (cell, child run id): the lines of the array's cells file."""
    out = []
    for cell, run_id in cells:
        argv = command_builder(grid, cell, execution_overrides(grid, cell, uri, 1))
        env = {"MLFLOW_RUN_ID": run_id, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_ID": experiment_id}
        out.append((cell.key, argv, env))
    return out


def print_plan(grid: Grid, parallel: int = 1, command_builder: CommandBuilder = cell_command,
               console=None) -> None:
    """`--dry-run`: the cells (levels, hash, overrides) and each exact command; touches nothing."""
    from rich.table import Table

    from flashctl.term import emit, human_console, show

    console = console or human_console()
    on_slurm = _on_slurm(grid)
    if on_slurm:
        _check_array(grid)
    uri = ("http://127.0.0.1:<port>" if _uses_server(grid.tracking_uri, parallel) and not on_slurm
           else grid.tracking_uri)
    table = Table(title=f"grid {grid.grid_id}: {len(grid.cells)} cells ({' x '.join(grid.factors)})")
    table.add_column("#", justify="right")
    for f in grid.factors:
        table.add_column(f)
    table.add_column("spec hash")
    table.add_column("overrides")
    for cell in grid.cells:
        table.add_row(str(cell.index), *(lv for _, lv in cell.levels), cell.spec_hash,
                      "\n".join(cell.override_args()))
    show(console, table)
    console.print(f"store {grid.tracking_uri}, experiment {grid.experiment!r}, cells in {grid.out_dir}"
                  + (", served by a local mlflow server" if uri != grid.tracking_uri else ""),
                  highlight=False, markup=False)
    if on_slurm:
        from flashctl.launch import slurm

        cells = array_cells(grid, [(c, f"<child run of {c.key}>") for c in grid.cells], uri,
                            "<experiment id>", command_builder)
        # Written as is, not through rich, which would wrap lines and expand the cells file's tabs.
        emit(f"# {grid.out_dir / slurm.ARRAY_SCRIPT} (one Slurm array task per cell):\n"
             + slurm.render_array(grid.base_spec, cells, grid.out_dir) + "\n"
             + f"# {grid.out_dir / slurm.CELLS_FILE}:\n" + slurm.cells_file_text(cells), console.file)
        return
    for cell in grid.cells:
        argv = command_builder(grid, cell, execution_overrides(grid, cell, uri, parallel))
        env = shlex.join([f"MLFLOW_RUN_ID=<child run of {cell.key}>", f"MLFLOW_TRACKING_URI={uri}"])
        emit(f"[{cell.index}] {env} {shlex.join(argv)}", console.file)


# --------------------------------------------------------------------------------------------
# MLflow structure


def find_parent(client, experiment_id: str, grid_id: str):
    """The parent run of `grid_id` in the experiment (oldest if several), or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_GRID}` = '{grid_id}' and tags.`{TAG_KIND}` = 'grid'",
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return runs[0] if runs else None


def list_children(client, experiment_id: str, parent_id: str) -> list:
    """Child runs of a parent, oldest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PARENT}` = '{parent_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )


def grid_plan_json(grid: Grid) -> dict[str, Any]:
    """The grid as JSON (logged on the parent as `grid.json`)."""
    return {
        "grid_id": grid.grid_id,
        "spec": grid.spec_path,
        "overrides": list(grid.overrides),
        "factors": list(grid.factors),
        "levels": grid.levels,
        "cells": [
            {"index": c.index, "key": c.key, "levels": dict(c.levels), "overrides": c.overrides,
             "spec_hash": c.spec_hash, "name": c.name}
            for c in grid.cells
        ],
    }


def create_parent(client, experiment_id: str, grid: Grid) -> str:
    """Create the grid's parent run with its tags and `grid.json` / `spec.resolved.yaml`."""
    tags = {
        TAG_KIND: "grid",
        TAG_GRID: grid.grid_id,
        TAG_FACTORS: ",".join(grid.factors),
        TAG_LEVELS: json.dumps(grid.levels),
        "flashctl.spec": grid.spec_path or "<default>",
        "flashctl.overrides": " ".join(grid.overrides)[:5000],
        "flashctl.cells": str(len(grid.cells)),
    }
    name = "-".join([grid.base_name, "grid"] + list(grid.factors))
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    client.log_text(run_id, json.dumps(grid_plan_json(grid), indent=2), "grid.json")
    client.log_text(run_id, to_yaml(grid.base_spec), "spec.resolved.yaml")
    return run_id


def create_child(client, experiment_id: str, parent_id: str, grid: Grid, cell: Cell) -> str:
    """Create a cell's child run (tags: parent, factor, level, spec hash, grid id)."""
    tags = {
        TAG_PARENT: parent_id,
        TAG_KIND: "cell",
        TAG_GRID: grid.grid_id,
        TAG_FACTOR: ",".join(f for f, _ in cell.levels),
        TAG_LEVEL: ",".join(lv for _, lv in cell.levels),
        TAG_CELL: cell.key,
        TAG_HASH: cell.spec_hash,
        TAG_ATTEMPTS: "0",
        **{TAG_LEVEL_OF + f: lv for f, lv in cell.levels},
    }
    run = client.create_run(experiment_id, run_name=cell.name, tags=tags)
    return run.info.run_id


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class CellState:
    """A cell during/after `run_grid`."""

    cell: Cell
    run_id: str = ""
    status: str = "pending"  # pending | skipped | queued (Slurm) | running | finished | failed | killed
    resumed: bool = False
    returncode: int | None = None
    started: float | None = None
    ended: float | None = None
    log: Path | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.monotonic()) - self.started


@dataclass
class GridResult:
    """Outcome of `run_grid`: the parent run and every cell's state."""

    grid: Grid
    parent_run_id: str
    experiment_id: str
    cells: list[CellState]

    @property
    def ok(self) -> bool:
        """True when no cell failed: each finished (this time or before) or, in a Slurm array
        left running (`wait=False`, an interrupted wait), is still queued or running there."""
        return all(s.status in ("finished", "skipped", "queued", "running") for s in self.cells)

    @property
    def failed(self) -> list[CellState]:
        return [s for s in self.cells if s.status not in ("finished", "skipped", "queued", "running")]

    @property
    def in_flight(self) -> list[CellState]:
        """Cells still queued or running in a Slurm array after `run_grid` returned."""
        return [s for s in self.cells if s.status in ("queued", "running")]


_STYLE = {"pending": "dim", "skipped": "cyan", "queued": "blue", "running": "yellow", "finished": "green",
          "failed": "red", "killed": "magenta"}


def status_table(grid: Grid, states: Sequence[CellState], title: str | None = None):
    """A rich table of cell states (the live view and the final summary)."""
    from rich.table import Table

    table = Table(title=title or f"grid {grid.grid_id}")
    table.add_column("#", justify="right")
    for f in grid.factors:
        table.add_column(f)
    table.add_column("hash")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("exit", justify="right")
    table.add_column("run id")
    table.add_column("log")
    for s in states:
        el = s.elapsed
        status = s.status + (" (resumed)" if s.resumed and s.status == "running" else "")
        table.add_row(
            str(s.cell.index), *(lv for _, lv in s.cell.levels), s.cell.spec_hash,
            f"[{_STYLE.get(s.status, '')}]{status}[/]",
            "" if el is None else f"{el:.0f}s",
            "" if s.returncode is None else str(s.returncode),
            s.run_id,
            str(s.log) if s.status in ("failed", "killed") and s.log else "",
        )
    return table


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


def _prepare(client, experiment_id: str, grid: Grid, resume: bool) -> tuple[str, list[CellState]]:
    """Find or create the parent and a child per cell; decide which cells run."""
    parent = find_parent(client, experiment_id, grid.grid_id)
    children: dict[str, Any] = {}
    if parent is not None:
        for run in list_children(client, experiment_id, parent.info.run_id):
            if run.data.tags.get(TAG_HASH) is not None:
                children[run.data.tags.get(TAG_CELL, "")] = run  # newest wins
        if not resume:
            done = sum(1 for c in grid.cells if (r := children.get(c.key)) is not None
                       and r.info.status == "FINISHED" and r.data.tags.get(TAG_HASH) == c.spec_hash)
            raise UserError(
                f"grid {grid.grid_id} already has parent run {parent.info.run_id} in experiment "
                f"{grid.experiment!r} ({done}/{len(grid.cells)} cells finished): pass --resume to "
                f"continue it (finished cells are skipped)"
            )
        parent_id = parent.info.run_id
    else:
        parent_id = create_parent(client, experiment_id, grid)
    states = []
    for cell in grid.cells:
        run = children.get(cell.key)
        state = CellState(cell, log=grid.cell_log(cell))
        if run is not None and run.data.tags.get(TAG_HASH) == cell.spec_hash:
            state.run_id = run.info.run_id
            if run.info.status == "FINISHED":
                state.status = "skipped"
            else:
                state.resumed = True
        else:
            state.run_id = create_child(client, experiment_id, parent_id, grid, cell)
        states.append(state)
    return parent_id, states


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


class _StatusView:
    """The cells as they change: one line per cell event (started, queued, finished, failed), on a
    terminal above a live table of every cell, in a log or pipe on its own (rich draws nothing
    live there)."""

    def __init__(self, grid: Grid, states: Sequence[CellState], console):
        self.grid, self.states, self.console = grid, states, console
        self._seen = {s.cell.index: s.status for s in states}
        self._live = None

    def __enter__(self) -> "_StatusView":
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(status_table(self.grid, self.states), console=self.console,
                              refresh_per_second=2, transient=True)
            self._live.__enter__()
        return self

    def update(self) -> None:
        for s in self.states:
            if self._seen.get(s.cell.index) != s.status:
                self._seen[s.cell.index] = s.status
                self.console.print(_event_line(s), highlight=False, markup=False)
        if self._live is not None:
            self._live.update(status_table(self.grid, self.states))

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)


def _event_line(s: CellState) -> str:
    levels = " ".join(f"{f}={lv}" for f, lv in s.cell.levels)
    line = f"cell {s.cell.index} [{levels}] {s.status}"
    if s.status in ("finished", "failed", "killed") and s.elapsed is not None:
        line += f" after {s.elapsed:.0f}s"
    if s.returncode is not None:
        line += f" (exit {s.returncode})"
    line += f", run {s.run_id}"
    if s.log and s.status in ("running", "queued", "failed", "killed"):
        line += f", log {s.log}"
    return line


def _execute(states: list[CellState], grid: Grid, client, uri: str, parallel: int,
             experiment_id: str, command_builder: CommandBuilder, console, poll_s: float) -> None:
    base_env = dict(os.environ)
    pending = deque(s for s in states if s.status == "pending")
    running: list[CellState] = []
    try:
        with _StatusView(grid, states, console) as live:
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


# --------------------------------------------------------------------------------------------
# Slurm: the unfinished cells as one job array


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
    with _StatusView(grid, [s for _, s in tasks], console) as live:
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


def _execute_array(states: list[CellState], grid: Grid, client, experiment_id: str, parent_id: str,
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


@contextmanager
def _environ(**values: str):
    """Set environment variables for the duration of a block (inherited by cell processes)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _signals_interrupt():
    """SIGTERM / SIGHUP (a closed terminal, `kill`) raise KeyboardInterrupt like Ctrl-C does,
    so running cells and the mlflow server are stopped instead of left orphaned in their own
    process groups. Only in the main thread (elsewhere Python cannot install handlers)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_grid(
    grid: Grid,
    parallel: int = 1,
    resume: bool = False,
    command_builder: CommandBuilder = cell_command,
    console=None,
    poll_s: float = 0.5,
    wait: bool = True,
) -> GridResult:
    """Run every unfinished cell (up to `parallel` at once) under one MLflow parent run.

    Prints a live table of cell states and a summary; returns the result (callers exit
    non-zero when `result.ok` is False). Raises UserError when the grid already exists and
    `resume` is False, or while another process runs it. With `parallel > 1` on a SQLite store,
    cells log through a local `mlflow server` that is stopped before returning. On Slurm
    (`launch.backend: slurm`) the cells run as one job array; `parallel` is then
    `launch.slurm.array_parallel`, and `wait=False` returns once the array is submitted.
    """
    from mlflow.tracking import MlflowClient

    from flashctl.term import human_console, show
    from flashctl.track import ensure_experiment

    if parallel < 1:
        raise UserError(f"--parallel: must be >= 1, got {parallel}")
    on_slurm = _on_slurm(grid)
    if on_slurm:
        _check_array(grid)
    console = console or human_console(stderr=True)
    if on_slurm and parallel > 1:
        console.print(f"--parallel {parallel} does not apply on Slurm: launch.slurm.array_parallel "
                      f"({grid.base_spec.launch.slurm.array_parallel}) sets how many array tasks run at once",
                      highlight=False, markup=False)
    store = grid.tracking_uri
    direct = MlflowClient(tracking_uri=store)
    experiment_id = ensure_experiment(direct, grid.experiment, store)
    with grid_lock(grid):
        stop_leftover_groups(grid, console)
        parent_id, states = _prepare(direct, experiment_id, grid, resume)
        direct.update_run(parent_id, status="RUNNING")
        todo = sum(1 for s in states if s.status != "skipped")
        at_once = grid.base_spec.launch.slurm.array_parallel if on_slurm else parallel
        console.print(f"grid {grid.grid_id}: parent run {parent_id}, {todo} of {len(states)} cells to run"
                      f", {min(at_once, max(todo, 1))} at a time" + (" on Slurm" if on_slurm else ""),
                      highlight=False)
        interrupted = True
        with _signals_interrupt():
            try:
                if on_slurm:
                    _execute_array(states, grid, direct, experiment_id, parent_id, wait, command_builder,
                                   console, poll_s)
                elif todo:
                    _execute_local(states, grid, direct, store, parallel, experiment_id, command_builder,
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


def _execute_local(states: list[CellState], grid: Grid, direct, store: str, parallel: int, experiment_id: str,
                   command_builder: CommandBuilder, console, poll_s: float) -> None:
    """Run the cells on this machine, through a local mlflow server when several write SQLite."""
    from mlflow.tracking import MlflowClient

    from flashctl.mlflow_server import MlflowServer
    from flashctl.track import artifact_root

    if not _uses_server(store, parallel):
        _execute(states, grid, direct, store, parallel, experiment_id, command_builder, console, poll_s)
        return
    grid.out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"starting an mlflow server in front of {store} (parallel cells, one writer)", highlight=False)
    # MLflow prints a "View run at http://..." link per terminated run on an http store: here
    # it would point at a server that is gone once the grid ends.
    with _environ(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"), \
            MlflowServer(store, artifact_root(store), log_path=grid.out_dir / "mlflow-server.log") as server:
        _record_group(grid, "mlflow-server", server.proc.pid)
        try:
            console.print(f"mlflow server {server.uri} is up", highlight=False)
            client = MlflowClient(tracking_uri=server.uri)
            _execute(states, grid, client, server.uri, parallel, experiment_id, command_builder, console, poll_s)
        finally:
            _forget_group(grid, "mlflow-server")


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
) -> GridResult | Grid:
    """The `flashctl ablate` entry: plan the grid, then print it (`dry_run`) or run it.

    `wait=False` (Slurm only) returns once the array is submitted."""
    grid = plan_grid(spec_path, overrides, factors, levels)
    if dry_run:
        print_plan(grid, parallel, command_builder, console)
        return grid
    return run_grid(grid, parallel=parallel, resume=resume, command_builder=command_builder, console=console,
                    wait=wait)
