"""Progress for long loops: a rich bar on a terminal, periodic log lines otherwise.

Rich draws nothing live when its console is not a terminal (logs, CI, Slurm output files), so
there this prints one line every ~5% instead, with the same information.
"""

from __future__ import annotations

import time
from typing import Any


class StepProgress:
    """`with StepProgress("teacher", total, console) as p: p.update(step, "loss 0.12")`."""

    def __init__(self, name: str, total: int | None, console: Any = None, completed: int = 0):
        from rich.console import Console

        self.name, self.total = name, total
        self.console = console or Console(stderr=True)
        self.completed = completed
        self._start = completed
        self._t0 = time.perf_counter()
        self._next_line = 0.0
        self._bar = None

    def __enter__(self) -> "StepProgress":
        if self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn(f"[bold]{self.name}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console)
            self._task = self._bar.add_task(self.name, total=self.total, completed=self.completed, info="")
            self._bar.start()
        return self

    def rate(self) -> float:
        """Steps per second since this progress started."""
        return (self.completed - self._start) / max(time.perf_counter() - self._t0, 1e-9)

    def update(self, completed: int, info: str = "", total: int | None = None) -> None:
        self.completed = completed
        if total is not None:
            self.total = total
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=self.total, info=info)
            return
        frac = completed / self.total if self.total else 0.0
        if frac >= self._next_line or completed == self.total:
            eta = (self.total - completed) / self.rate() if self.total and self.rate() > 0 else 0.0
            of = f"/{self.total}" if self.total else ""
            self.console.print(f"{self.name} {completed}{of} {info} ({self.rate():.2f} it/s, eta {eta:.0f}s)",
                               highlight=False, markup=False)
            self._next_line = frac + 0.05

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
