"""The pure grid: levels -> cells -> the commands that run them. No MLflow, no files written.

A *factor* (data-composition, teacher-guidance, task-mixture) has named *levels*, each a set of
dotted overrides of the base spec (from the spec's `ablations` section, else `DEFAULT_LEVELS`).
Several factors expand into their Cartesian product. Each *cell* is base spec + CLI overrides +
its levels' overrides, identified by the `spec_hash` of that resolved spec; the *grid id* hashes
the cells. Run naming, tracking and the launch port are execution details added to the cell's
command, not part of its identity.

Each cell is a subprocess: `cell_command` builds it (any `CommandBuilder` can replace it), and
it gets `MLFLOW_RUN_ID` and `MLFLOW_TRACKING_URI` from the runner. `print_plan` is `--dry-run`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flashctl.errors import UserError
from flashctl.findings import SEED_FACTOR
from flashctl.spec import FACTORS, ExperimentSpec, SpecError, load_spec, parse_override, spec_hash

_ALL_CATEGORIES = {"object": 1.0, "scene": 1.0, "text": 1.0}
_ALL_ASPECTS = {"square": 1.0, "landscape": 1.0, "portrait": 1.0}

DEFAULT_LEVELS: dict[str, dict[str, dict[str, Any]]] = {
    # Paper factor 1 mapped onto the shapes world. A dict override replaces the whole mapping,
    # so each level sets both categories and aspects: the level alone defines the composition.
    "data-composition": {
        "text-centric": {"data.categories": {"text": 1.0}, "data.aspects": _ALL_ASPECTS},
        "mixed-category": {"data.categories": _ALL_CATEGORIES, "data.aspects": _ALL_ASPECTS},
        "landscape-only": {"data.categories": _ALL_CATEGORIES, "data.aspects": {"landscape": 1.0}},
        "landscape-portrait": {"data.categories": _ALL_CATEGORIES,
                               "data.aspects": {"landscape": 1.0, "portrait": 1.0}},
        "portrait-only": {"data.categories": _ALL_CATEGORIES, "data.aspects": {"portrait": 1.0}},
    },
    # The paper's policies, and the step sets of stepwise worth sweeping (which student steps
    # take the specialised teacher: the last, the last two, the first two).
    "teacher-guidance": {
        "single": {"guidance.policy": "single"},
        "specialised": {"guidance.policy": "specialised"},
        "stepwise": {"guidance.policy": "stepwise"},
        "stepwise-3": {"guidance.policy": "stepwise", "guidance.steps": [3]},
        "stepwise-01": {"guidance.policy": "stepwise", "guidance.steps": [0, 1]},
    },
    # t2i-only: the zero-shot edit student (distilled on T2I alone, evaluated on edits too).
    "task-mixture": {
        "t2i-only": {"mixture.t2i": 1, "mixture.edit": 0},
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
    try:
        same = parse_override(arg)[1] == value
    except ValueError as exc:  # a malformed dotted key (`a..b`)
        raise UserError(f"ablations: {exc}") from None
    if not same:
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
    spec: ExperimentSpec | None = field(default=None, compare=False, repr=False)
    """The resolved spec, as the cell's process loads it (kept from planning)."""

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
    seeds: int = 1,
) -> Grid:
    """Expand `factors` (Cartesian product) into validated cells; writes nothing.

    `seeds` > 1 adds the pseudo-factor `seed` (levels: `distill.seed`, +1, ...): every cell runs
    that many times with different training seeds, so the report can show each level's spread
    over seeds and pair its tests on (row, seed). Seeds are pooled, never compared as levels.

    `levels` selects level names (each must belong to one of the factors; a factor none of
    whose levels is named keeps all of them). Raises UserError for unknown factors/levels or
    a CLI override that sets a key the grid sweeps, SpecError when a cell's spec is invalid.
    """
    from flashctl.track import resolve_uri

    if not factors:
        raise UserError(f"--factor: name at least one factor; valid: {', '.join(FACTORS)}")
    factors = tuple(dict.fromkeys(factors))
    base = load_spec(spec_path, list(overrides))

    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {seeds}")
    if SEED_FACTOR in factors:
        raise UserError(f"--factor: {SEED_FACTOR!r} is not a factor; repeat cells over seeds with --seeds N")
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

    if seeds > 1:  # after --levels: seed levels are not selectable by name
        first = base.distill.seed
        table[SEED_FACTOR] = {str(first + i): {"distill.seed": first + i} for i in range(seeds)}
        chosen[SEED_FACTOR] = list(table[SEED_FACTOR])
        factors = (*factors, SEED_FACTOR)
    # distill.seed on the command line is where --seeds starts, not a clash
    level_keys = {k for f in factors if f != SEED_FACTOR for lv in chosen[f] for k in table[f][lv]}
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
        level_args = [override_arg(k, v) for k, v in merged.items()]
        try:  # loaded as the cell's process loads it: its hash is the hash the job computes
            spec = load_spec(spec_path, [*overrides, *level_args])
        except SpecError as exc:
            raise SpecError(f"{exc.source} (cell {key})", exc.errors) from None
        name = "-".join([base.run.name] + [f"{f}-{slug(lv)}" for f, lv in pairs])
        cells.append(Cell(index, pairs, merged, spec_hash(spec), name, spec))

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


def uses_server(uri: str, parallel: int) -> bool:
    """Whether cells log through a local mlflow server: several at once on one SQLite file."""
    return parallel > 1 and uri.startswith("sqlite:")


def on_slurm(grid: Grid) -> bool:
    """Whether the grid's cells run as a Slurm job array (the spec's `launch.backend`)."""
    return grid.base_spec.launch.backend == "slurm"


def check_array(grid: Grid) -> None:
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
    array = on_slurm(grid)
    if array:
        check_array(grid)
    uri = ("http://127.0.0.1:<port>" if uses_server(grid.tracking_uri, parallel) and not array
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
    if array:
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


