"""Progress for long loops: a rich bar on a terminal, periodic log lines otherwise.

Rich draws nothing live when its console is not a terminal (logs, CI, Slurm output files), so
there this prints one line every ~5% instead, with the same information.
"""

from __future__ import annotations

import time
from typing import Any


class StepProgress:
    """`with StepProgress("teacher", total, console) as p: p.update(step, "loss 0.12")`."""

    def __init__(self, name: str, total: int | None, console: Any = None, completed: int = 0,
                 unit: str = "it", enabled: bool = True):
        from flashctl.term import human_console

        self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
        self.console = console or human_console(stderr=True)
        self.completed = completed
        self._start = completed
        self._t0 = time.perf_counter()
        self._next_line = 0.0
        self._bar = None

    def __enter__(self) -> "StepProgress":
        if self.enabled and self.console.is_terminal:
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

    def advance(self, n: int = 1, info: str = "") -> None:
        self.update(self.completed + n, info)

    def update(self, completed: int, info: str = "", total: int | None = None) -> None:
        self.completed = completed
        if total is not None:
            self.total = total
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, total=self.total, info=info)
            return
        frac = completed / self.total if self.total else 0.0
        if frac >= self._next_line or completed == self.total:
            eta = (self.total - completed) / self.rate() if self.total and self.rate() > 0 else 0.0
            of = f"/{self.total}" if self.total else ""
            info = f" {info}" if info else ""
            self.console.print(f"{self.name} {completed}{of}{info} ({self.rate():.2f} {self.unit}/s, eta {eta:.0f}s)",
                               highlight=False, markup=False)
            self._next_line = frac + 0.05

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()


class Phase:
    """One line when a long step starts and one with its duration when it ends, so no minute of
    a run passes without a word (loading, building engines, training, export, eval).

    `with Phase("building DeepSpeed engines", enabled=rank == 0): ...` prints
    `distill: building DeepSpeed engines ...` then `distill: building DeepSpeed engines done (12.3 s)`.
    Plain lines (no live display), so they read the same in a terminal, a log and a Slurm file.
    """

    def __init__(self, what: str, console: Any = None, enabled: bool = True, prefix: str = "distill"):
        self.what, self.enabled, self.prefix = what, enabled, prefix
        self.console = console
        self._t0 = 0.0

    def _print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.console is None:
            from flashctl.term import human_console

            self.console = human_console(stderr=True)
        self.console.print(f"{self.prefix}: {text}", highlight=False, markup=False)

    def __enter__(self) -> "Phase":
        self._t0 = time.perf_counter()
        self._print(f"{self.what} ...")
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self._print(f"{self.what} done ({time.perf_counter() - self._t0:.1f} s)")


def announce(what: str, enabled: bool = True, console: Any = None, prefix: str = "distill") -> None:
    """One plain `prefix: what ...` line marking the start of a phase (see Phase)."""
    Phase(what, console, enabled, prefix)._print(f"{what} ...")
