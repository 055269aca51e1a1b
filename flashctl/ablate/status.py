"""Cells while a grid runs: their states, the grid's result, and the view of both (a live
table on a terminal, one line per cell event in a log or pipe)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flashctl.ablate.grid import Cell, Grid


@dataclass
class CellState:
    """A cell during/after `run_grid`."""

    cell: Cell
    run_id: str = ""
    status: str = "pending"  # pending | skipped | reused | queued (Slurm) | running | finished | failed | killed
    resumed: bool = False
    reused_from: str | None = None  # run id of the other grid's cell whose results this cell shows
    stale_from: str | None = None  # run id of this cell's run whose teachers or data have changed since
    stale_dir: Path | None = None  # where that run's run dir was moved
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


DONE = ("finished", "skipped", "reused")
"""States of a cell whose results exist: run now, finished before in this grid, or in another."""


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
        return all(s.status in DONE + ("queued", "running") for s in self.cells)

    @property
    def failed(self) -> list[CellState]:
        return [s for s in self.cells if s.status not in DONE + ("queued", "running")]

    @property
    def in_flight(self) -> list[CellState]:
        """Cells still queued or running in a Slurm array after `run_grid` returned."""
        return [s for s in self.cells if s.status in ("queued", "running")]


_STYLE = {"pending": "dim", "skipped": "cyan", "reused": "cyan", "queued": "blue", "running": "yellow", "finished": "green",
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
            s.run_id + (f" (results of {s.reused_from})" if s.reused_from else ""),
            str(s.log) if s.status in ("failed", "killed") and s.log else "",
        )
    return table


class StatusView:
    """The cells as they change: one line per cell event (started, queued, finished, failed), on a
    terminal above a live table of every cell, in a log or pipe on its own (rich draws nothing
    live there)."""

    def __init__(self, grid: Grid, states: Sequence[CellState], console):
        self.grid, self.states, self.console = grid, states, console
        self._seen = {s.cell.index: s.status for s in states}
        self._live = None

    def __enter__(self) -> StatusView:
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
                self.console.print(event_line(s), highlight=False, markup=False)
        if self._live is not None:
            self._live.update(status_table(self.grid, self.states))

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)


def event_line(s: CellState) -> str:
    levels = " ".join(f"{f}={lv}" for f, lv in s.cell.levels)
    line = f"cell {s.cell.index} [{levels}] {s.status}"
    if s.status in ("finished", "failed", "killed") and s.elapsed is not None:
        line += f" after {s.elapsed:.0f}s"
    if s.returncode is not None:
        line += f" (exit {s.returncode})"
    line += f", run {s.run_id}"
    if s.reused_from:
        line += f" (results of {s.reused_from}, same spec hash and inputs in another grid)"
    if s.stale_from and s.status in ("pending", "reused"):
        line += (f" (replaces run {s.stale_from}, which ran on other teachers' files or data"
                 + (f"; its run dir is now {s.stale_dir}" if s.stale_dir else "") + ")")
    if s.log and s.status in ("running", "queued", "failed", "killed"):
        line += f", log {s.log}"
    return line

