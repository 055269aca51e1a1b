"""Factor grids: levels -> cells -> one MLflow parent run with one child run per cell.

One module per part, lowest first:

* `grid`: the pure grid — factors, levels, cells, their hashes, the grid id, each cell's
  command and the `--dry-run` plan. No MLflow, no files written.
* `status`: cell states while a grid runs, the grid's result, the live view.
* `store`: the grid in MLflow — the parent run, a child per cell, which cells a re-run skips
  (tag names: `flashctl.track`).
* `local`: cells as subprocesses on this machine — process groups, the grid's lock, the local
  mlflow server for parallel cells.
* `array`: cells as one Slurm job array.
* `run`: `run_grid` and the `flashctl ablate` entry, `ablate`.

mlflow is imported inside functions: `--dry-run` and `--help` stay fast and touch nothing.
"""

from flashctl.ablate.grid import (
    DEFAULT_LEVELS,
    EXECUTION_KEYS,
    ArrayCell,
    Cell,
    CommandBuilder,
    Grid,
    array_cells,
    cell_command,
    execution_overrides,
    factor_levels,
    grid_id_of,
    override_arg,
    plan_grid,
    print_plan,
    slug,
)
from flashctl.ablate.local import grid_lock, stop_leftover_groups
from flashctl.ablate.run import ablate, run_grid
from flashctl.ablate.status import CellState, GridResult, status_table
from flashctl.ablate.store import create_child, create_parent, grid_plan_json

__all__ = [
    "DEFAULT_LEVELS",
    "EXECUTION_KEYS",
    "ArrayCell",
    "Cell",
    "CellState",
    "CommandBuilder",
    "Grid",
    "GridResult",
    "ablate",
    "array_cells",
    "cell_command",
    "create_child",
    "create_parent",
    "execution_overrides",
    "factor_levels",
    "grid_id_of",
    "grid_lock",
    "grid_plan_json",
    "override_arg",
    "plan_grid",
    "print_plan",
    "run_grid",
    "slug",
    "status_table",
    "stop_leftover_groups",
]
