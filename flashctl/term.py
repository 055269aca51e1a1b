"""Where output goes: text for programs byte-exact on stdout; text for people rich only on a terminal.

Rich wraps whatever it prints to a console that is not a terminal at 80 columns (or `COLUMNS`),
truncates table cells to "…" and draws nothing live. That is right for people at a terminal
and wrong for everything else: a job script piped to a file, JSON for an editor, a table in a
Slurm log. So there are two paths, and every command picks one per piece of output:

* `emit(text)` — scripts, JSON, YAML, commands, CSV: written to stdout as is (no wrapping,
  markup, highlighting or tab expansion), whatever the terminal width.
* `human_console()` + `show(console, renderable)` — tables and messages: rich on a terminal;
  elsewhere plain lines that lose nothing (soft-wrapped text, tables as Markdown).

Only `rich` is imported here, so the CLI can use it at start-up.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def emit(text: str, file: TextIO | None = None) -> None:
    """Write machine-readable `text` byte-exact (a final newline added if missing) and flush."""
    fh = file or sys.stdout
    fh.write(text if text.endswith("\n") or not text else text + "\n")
    fh.flush()


def human_console(stderr: bool = False):
    """A rich Console for people. Lines are never wrapped by rich (a terminal wraps them itself; a
    log keeps them whole); whether it is a terminal is decided at each print, so the same console
    serves a redirected stdout."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def _plain(cell: Any) -> str:
    from rich.text import Text

    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        text = Text.from_markup(cell).plain
    else:
        text = str(cell)
    return text.replace("|", "\\|").replace("\n", "<br>")


def table_markdown(table: Any) -> str:
    """A rich Table as a Markdown table (title and caption as plain lines): every column, every cell."""
    cols = list(table.columns)
    rows = [[_plain(c) for c in col.cells] for col in cols]
    n = max((len(r) for r in rows), default=0)
    lines = []
    if table.title:
        lines.append(_plain(table.title))
        lines.append("")
    lines.append("| " + " | ".join(_plain(c.header) for c in cols) + " |")
    lines.append("|" + "|".join("---:" if c.justify == "right" else "---" for c in cols) + "|")
    for i in range(n):
        lines.append("| " + " | ".join(r[i] if i < len(r) else "" for r in rows) + " |")
    if table.caption:
        lines.append("")
        lines.append(_plain(table.caption).replace("<br>", "\n"))
    return "\n".join(lines) + "\n"


def show(console: Any, renderable: Any) -> None:
    """Print a table or message for people: rich on a terminal, Markdown tables / full lines elsewhere."""
    from rich.table import Table

    if isinstance(renderable, Table) and not console.is_terminal:
        emit(table_markdown(renderable) + "\n", console.file)
    else:
        console.print(renderable)
