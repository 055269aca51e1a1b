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
log through a local `mlflow server` (one writer in front of the file).

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
EXECUTION_KEYS = ("run.out_dir", "run.name", "tracking.uri", "launch.master_port")


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
    and the local backend each gets `launch.master_port` + its index. (The port is part of
    `launch`, which `spec_hash` includes: the job computes another hash than the cell's unless
    `spec_hash` leaves `launch.master_port` out.)
    """
    args = [f"run.out_dir={grid.out_dir}", f"run.name={cell.name}", f"tracking.uri={tracking_uri}"]
    if parallel > 1 and grid.base_spec.launch.backend == "local":
        port = grid.base_spec.launch.master_port + cell.index
        if port > 65535:
            port = 1024 + port % 64511
        args.append(f"launch.master_port={port}")
    return args


def cell_command(grid: Grid, cell: Cell, execution: list[str]) -> list[str]:
    """The default cell process: `flashctl distill SPEC <cli overrides> <levels> <execution>`."""
    cmd = [sys.executable, "-m", "flashctl.cli", "distill"]
    if grid.spec_path is not None:
        cmd.append(grid.spec_path)
    return cmd + list(grid.overrides) + cell.override_args() + execution


def _uses_server(uri: str, parallel: int) -> bool:
    return parallel > 1 and uri.startswith("sqlite:")


def print_plan(grid: Grid, parallel: int = 1, command_builder: CommandBuilder = cell_command,
               console=None) -> None:
    """`--dry-run`: the cells (levels, hash, overrides) and each exact command; touches nothing."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    uri = "http://127.0.0.1:<port>" if _uses_server(grid.tracking_uri, parallel) else grid.tracking_uri
    table = Table(title=f"grid {grid.grid_id}: {len(grid.cells)} cells ({' x '.join(grid.factors)})")
    table.add_column("#", justify="right")
    for f in grid.factors:
        table.add_column(f)
    table.add_column("spec hash")
    table.add_column("overrides")
    for cell in grid.cells:
        table.add_row(str(cell.index), *(lv for _, lv in cell.levels), cell.spec_hash,
                      "\n".join(cell.override_args()))
    console.print(table)
    console.print(f"store {grid.tracking_uri}, experiment {grid.experiment!r}, cells in {grid.out_dir}"
                  + (", served by a local mlflow server" if uri != grid.tracking_uri else ""),
                  highlight=False, markup=False)
    for cell in grid.cells:
        argv = command_builder(grid, cell, execution_overrides(grid, cell, uri, parallel))
        env = f"MLFLOW_RUN_ID=<child run of {cell.key}> MLFLOW_TRACKING_URI={uri}"
        console.print(f"[{cell.index}] {env} {shlex.join(argv)}", highlight=False, markup=False,
                      soft_wrap=True)


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
    status: str = "pending"  # pending | skipped | running | finished | failed | killed
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
        """True when every cell finished (this time or before)."""
        return all(s.status in ("finished", "skipped") for s in self.cells)

    @property
    def failed(self) -> list[CellState]:
        return [s for s in self.cells if s.status not in ("finished", "skipped")]


_STYLE = {"pending": "dim", "skipped": "cyan", "running": "yellow", "finished": "green",
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
    state.status = "running"
    state.started = time.monotonic()


def _finish(state: CellState, client, rc: int) -> None:
    """Record a finished process: FINISHED on exit 0, FAILED otherwise (never stops the grid)."""
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
    from rich.live import Live

    base_env = dict(os.environ)
    pending = deque(s for s in states if s.status == "pending")
    running: list[CellState] = []
    try:
        with Live(status_table(grid, states), console=console, refresh_per_second=2,
                  transient=True) as live:
            while pending or running:
                while pending and len(running) < parallel:
                    s = pending.popleft()
                    _start(s, grid, client, uri, parallel, experiment_id, command_builder, base_env)
                    running.append(s)
                    live.update(status_table(grid, states))
                time.sleep(poll_s)
                for s in list(running):
                    rc = s.proc.poll()
                    if rc is not None:
                        running.remove(s)
                        _finish(s, client, rc)
                live.update(status_table(grid, states))
    except BaseException:
        for s in running:
            if s.proc is not None:
                _kill_group(s.proc)
            s.status, s.ended, s.proc = "killed", time.monotonic(), None
            with suppress(Exception):  # best effort while interrupted
                client.set_terminated(s.run_id, status="KILLED")
        raise


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
) -> GridResult:
    """Run every unfinished cell (up to `parallel` at once) under one MLflow parent run.

    Prints a live table of cell states and a summary; returns the result (callers exit
    non-zero when `result.ok` is False). Raises UserError when the grid already exists and
    `resume` is False. With `parallel > 1` on a SQLite store, cells log through a local
    `mlflow server` that is stopped before returning.
    """
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    from flashctl.mlflow_server import MlflowServer
    from flashctl.track import artifact_root, ensure_experiment

    if parallel < 1:
        raise UserError(f"--parallel: must be >= 1, got {parallel}")
    console = console or Console(stderr=True)
    store = grid.tracking_uri
    direct = MlflowClient(tracking_uri=store)
    experiment_id = ensure_experiment(direct, grid.experiment, store)
    parent_id, states = _prepare(direct, experiment_id, grid, resume)
    direct.update_run(parent_id, status="RUNNING")
    todo = sum(1 for s in states if s.status != "skipped")
    console.print(f"grid {grid.grid_id}: parent run {parent_id}, {todo} of {len(states)} cells to run"
                  f", {min(parallel, max(todo, 1))} at a time", highlight=False)

    interrupted = True
    with _signals_interrupt():
        try:
            if todo:
                if _uses_server(store, parallel):
                    grid.out_dir.mkdir(parents=True, exist_ok=True)
                    console.print(f"starting an mlflow server in front of {store} (parallel cells, one writer)",
                                  highlight=False)
                    # MLflow prints a "View run at http://..." link per terminated run on an http
                    # store: here it would point at a server that is gone once the grid ends.
                    with _environ(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"), \
                            MlflowServer(store, artifact_root(store), log_path=grid.out_dir / "mlflow-server.log") as server:
                        console.print(f"mlflow server {server.uri} is up", highlight=False)
                        client = MlflowClient(tracking_uri=server.uri)
                        _execute(states, grid, client, server.uri, parallel, experiment_id, command_builder,
                                 console, poll_s)
                else:
                    _execute(states, grid, direct, store, parallel, experiment_id, command_builder,
                             console, poll_s)
            interrupted = False
        finally:
            result = GridResult(grid, parent_id, experiment_id, states)
            status = "KILLED" if interrupted else ("FINISHED" if result.ok else "FAILED")
            with suppress(Exception):  # best effort: the summary below must still print
                direct.set_terminated(parent_id, status=status)
            console.print(status_table(grid, states, title=f"grid {grid.grid_id}: parent run {parent_id}"))
    failed = result.failed
    if failed:
        console.print(f"[red]{len(failed)} of {len(states)} cells failed[/red]; fix and re-run with --resume "
                      f"(finished cells are skipped)", highlight=False)
    else:
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
) -> GridResult | Grid:
    """The `flashctl ablate` entry: plan the grid, then print it (`dry_run`) or run it."""
    grid = plan_grid(spec_path, overrides, factors, levels)
    if dry_run:
        print_plan(grid, parallel, command_builder, console)
        return grid
    return run_grid(grid, parallel=parallel, resume=resume, command_builder=command_builder, console=console)
