"""`flashctl report`: an ablation grid side by side — tables, plots and qualitative image grids.

Reads MLflow only through `MlflowClient`: the grid's parent run (`flashctl.kind=grid`), its child
runs (one per cell, tagged with their levels) and what the distill job logged into them (the
columns below, `eval/images/{model}/{row_id}.png`, `eval/results.json`). Tag, metric and artifact
names come from `flashctl.track`, the contract the writers use too.

Outputs: terminal tables (one per factor: rows = levels, best value per column starred), and in
the output folder a self-contained `report.html` (plots and images embedded as base64 PNG),
one CSV per table and `report.md`. In a grid of several factors a factor's row is the mean over
the finished cells at that level (the "marginal"), and an extra table lists every cell.

mlflow and matplotlib are imported inside functions (the CLI's `--help` stays fast).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flashctl.errors import UserError
from flashctl.findings import (
    METRICS,
    SEED_FACTOR,
    START_MODEL,
    FactorFinding,
    Movement,
    factor_finding,
    group_outcomes,
    movement,
    movement_sentence,
)
from flashctl.io import atomic_write_text
from flashctl.shapes.scene import CATEGORIES as T2I_CATEGORIES
from flashctl.shapes.scene import EDIT_TYPES
from flashctl.stats import PairedTest, wilson
from flashctl.system import environ
from flashctl.track import (
    EVAL_IMAGES,
    EVAL_NFE_RATIO,
    EVAL_RESULTS,
    EVAL_SPEEDUP,
    EVAL_SPEEDUP_DENOISE,
    KIND_GRID,
    SAMPLE_ACC,
    SAMPLE_N,
    TAG_CELL,
    TAG_FACTORS,
    TAG_GRID,
    TAG_KIND,
    TAG_LEVEL_OF,
    TAG_LEVELS,
    TAG_REUSED,
    eval_metric,
    grid_filter,
    hash_tag,
    list_children,
)

FORMATS = ("html", "csv", "md")
M = "{m}"  # the model in a per-model column key: `Column.metric(model)` fills it in


def per_model(*what: str) -> str:
    """Column key of a per-model eval metric (`eval/{m}/t2i_acc`)."""
    return eval_metric(M, *what)


@dataclass(frozen=True)
class Column:
    """A table column: metric key (`{m}` = model), labels, and which direction is better."""

    key: str
    label: str
    group: str
    better: str  # "max" | "min"
    kind: str  # "acc" | "ratio" | "nfe" | "x" | "s"

    def metric(self, model: str = "student") -> str:
        return self.key.format(m=model)

    @property
    def per_model(self) -> bool:
        return M in self.key


COLUMNS: tuple[Column, ...] = (
    *(Column(per_model("t2i", c), c, "T2I accuracy (%)", "max", "acc") for c in T2I_CATEGORIES),
    Column(per_model("t2i_acc"), "T2I", "T2I accuracy (%)", "max", "acc"),
    *(Column(per_model("edit", e), e, "Edit accuracy (%)", "max", "acc") for e in EDIT_TYPES),
    Column(per_model("edit_acc"), "edit", "Edit accuracy (%)", "max", "acc"),
    Column(eval_metric("retention", "t2i"), "T2I", "Retention vs teacher", "max", "ratio"),
    Column(eval_metric("retention", "edit"), "edit", "Retention vs teacher", "max", "ratio"),
    Column(per_model("nfe"), "NFE", "Cost", "min", "nfe"),
    Column(EVAL_SPEEDUP, "speed-up", "Cost", "max", "x"),
    Column(EVAL_SPEEDUP_DENOISE, "denoise speed-up", "Cost", "max", "x"),
    Column(EVAL_NFE_RATIO, "NFE ratio", "Cost", "max", "x"),
    Column(per_model("diversity", "cell", "entropy"), "position entropy", "Diversity (open prompts)", "max", "ratio"),
    Column(per_model("diversity", "colour", "entropy"), "colour entropy", "Diversity (open prompts)", "max", "ratio"),
    Column("train/time_s", "train time", "Cost", "min", "s"),
)
TRAIN_CURVES = ("train/loss_generator", "train/loss_critic", SAMPLE_ACC["t2i"], SAMPLE_ACC["edit"])


# --------------------------------------------------------------------------------------------
# Reading the grid


@dataclass
class CellRun:
    """One child run: its levels, status and final metrics."""

    run_id: str
    name: str
    status: str
    levels: dict[str, str]
    metrics: dict[str, float]
    spec_hash: str = ""
    child_id: str | None = None
    """Set when another grid's run trained this cell (`ablate --reuse`): this grid's own child
    run; `run_id` is then that other run, which holds the metrics, curves and images."""

    @property
    def reused(self) -> bool:
        return self.child_id is not None

    def label(self, factors: Sequence[str]) -> str:
        return " · ".join(self.levels.get(f, "?") for f in factors)


@dataclass
class GridRuns:
    """An ablation grid as stored in MLflow."""

    uri: str
    experiment_id: str
    experiment_name: str
    parent_id: str
    parent_name: str
    grid_id: str
    factors: list[str]
    levels: dict[str, list[str]]
    cells: list[CellRun]


def store_uri(tracking_uri: str | None = None) -> str:
    """The store to read: `tracking_uri`, else `MLFLOW_TRACKING_URI`, else `./mlflow.db`."""
    from flashctl.spec import check_tracking_uri
    from flashctl.track import resolve_uri

    given = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    try:
        check_tracking_uri(given)
    except ValueError as exc:
        where = "--tracking-uri" if tracking_uri else "MLFLOW_TRACKING_URI"
        raise UserError(f"{where}: {exc}") from None
    uri = resolve_uri(given)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no MLflow store at {uri[len('sqlite:///'):]}: run `flashctl ablate` first, "
                        f"or set MLFLOW_TRACKING_URI")
    return uri


def find_grid(client, parent: str | None = None, experiment: str | None = None) -> GridRuns:
    """The grid of run `parent`, else the latest grid parent in `experiment` (or in any)."""
    from mlflow.exceptions import MlflowException

    uri = client.tracking_uri if hasattr(client, "tracking_uri") else ""
    if parent:
        try:
            run = client.get_run(parent)
        except MlflowException:
            raise UserError(f"--parent: no run {parent!r} in {uri}") from None
        if run.data.tags.get(TAG_KIND) != KIND_GRID:
            raise UserError(f"--parent: run {parent} is not an ablation grid parent (no {TAG_KIND}={KIND_GRID} tag)")
    else:
        if experiment:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise UserError(f"--experiment: no experiment named {experiment!r} in {uri}")
            exp_ids = [exp.experiment_id]
        else:
            exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exp_ids, filter_string=grid_filter(),
                                  order_by=["attributes.start_time DESC"], max_results=1) if exp_ids else []
        if not runs:
            where = f"experiment {experiment!r}" if experiment else uri
            raise UserError(f"no ablation grid found in {where}: run `flashctl ablate SPEC --factor F` first")
        run = runs[0]
    tags = run.data.tags
    exp_id = run.info.experiment_id
    factors = [f for f in tags.get(TAG_FACTORS, "").split(",") if f]
    try:
        levels = {f: list(v) for f, v in json.loads(tags.get(TAG_LEVELS, "{}")).items()}
    except json.JSONDecodeError:
        levels = {}
    children = list_children(client, exp_id, run.info.run_id)
    by_key: dict[str, CellRun] = {}
    for child in children:
        ctags = child.data.tags
        cell_levels = {f: ctags[TAG_LEVEL_OF + f] for f in factors if TAG_LEVEL_OF + f in ctags}
        for f, lv in cell_levels.items():
            levels.setdefault(f, [])
            if lv not in levels[f]:
                levels[f].append(lv)
        key = ctags.get(TAG_CELL) or child.info.run_id
        data, source = child, ctags.get(TAG_REUSED)
        if source:  # another grid trained this cell: its run holds the metrics, curves and images
            try:
                data = client.get_run(source)
            except MlflowException:
                data = None
            if data is None or data.info.lifecycle_stage == "deleted":
                raise UserError(f"cell {key}: run {child.info.run_id} shows the results of run {source}, which is "
                                f"no longer in {uri}; re-run the grid with --resume --no-reuse") from None
        by_key[key] = CellRun(data.info.run_id, child.info.run_name or key, child.info.status, cell_levels,
                              dict(data.data.metrics), hash_tag(ctags),
                              child_id=child.info.run_id if source else None)  # newest wins
    order = {f: {lv: i for i, lv in enumerate(levels.get(f, []))} for f in factors}
    cells = sorted(by_key.values(), key=lambda c: tuple(order[f].get(c.levels.get(f, ""), 1 << 30) for f in factors))
    exp = client.get_experiment(exp_id)
    return GridRuns(uri, exp_id, exp.name, run.info.run_id, run.info.run_name or "", tags.get(TAG_GRID, ""),
                    factors, {f: levels.get(f, []) for f in factors}, cells)


# --------------------------------------------------------------------------------------------
# Tables (pure)


@dataclass
class Row:
    """A table row: a level (or cell, or a teacher reference) and its values per column."""

    label: str
    values: list[float | None]
    status: str
    reference: bool = False


@dataclass
class ResultTable:
    """Rows x COLUMNS with the best rows per column."""

    title: str
    factor: str | None  # None: the all-cells table of a multi-factor grid
    row_header: str
    rows: list[Row]
    columns: tuple[Column, ...] = COLUMNS
    best: list[set[int]] = field(default_factory=list)


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def best_rows(values: Sequence[float | None], better: str) -> set[int]:
    """Indexes holding the best value (ties all marked); none when every value is the same."""
    present = [(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    if len(present) < 2:
        return set()
    pick = max if better == "max" else min
    top = pick(v for _, v in present)
    winners = {i for i, v in present if math.isclose(v, top, rel_tol=1e-9, abs_tol=1e-12)}
    return set() if len(winners) == len(present) else winners


def _cell_values(cell: CellRun, model: str = "student") -> list[float | None]:
    out = []
    for col in COLUMNS:
        if not col.per_model and model != "student":
            out.append(None)
        else:
            out.append(cell.metrics.get(col.metric(model)))
    return out


def _finished(cells: Iterable[CellRun]) -> list[CellRun]:
    return [c for c in cells if c.status == "FINISHED"]


def _reference_rows(cells: Sequence[CellRun]) -> list[Row]:
    done = _finished(cells)
    rows = []
    for model in ("teacher", "teacher_fast"):
        vals = [_mean(v) for v in zip(*(_cell_values(c, model) for c in done))] if done else []
        if any(v is not None for v in vals):
            nfe = vals[[c.key for c in COLUMNS].index(per_model("nfe"))]
            label = "teacher" + (f" {nfe:g} NFE" if nfe is not None else (" (few steps)" if model == "teacher_fast" else ""))
            rows.append(Row(label, vals, "reference", reference=True))
    return rows


def _with_best(table: ResultTable) -> ResultTable:
    candidates = [i for i, r in enumerate(table.rows) if not r.reference]
    table.best = []
    for j, col in enumerate(table.columns):
        local = best_rows([table.rows[i].values[j] for i in candidates], col.better)
        table.best.append({candidates[i] for i in local})
    return table


def _status_of(cells: Sequence[CellRun]) -> str:
    if not cells:
        return "missing"
    if len(cells) == 1:
        return cells[0].status.lower()
    done = len(_finished(cells))
    return f"{done}/{len(cells)} finished"


def factor_tables(grid: GridRuns) -> list[ResultTable]:
    """One table per factor (rows = its levels; marginal means when the grid has several
    factors), plus an all-cells table for multi-factor grids; teacher rows as reference."""
    refs = _reference_rows(grid.cells)
    tables = []
    for f in (f for f in grid.factors if f != SEED_FACTOR):  # repeats over seeds are pooled, not compared
        rows = []
        for lv in grid.levels.get(f, []):
            at = [c for c in grid.cells if c.levels.get(f) == lv]
            done = _finished(at)
            vals = [_mean(v) for v in zip(*(_cell_values(c) for c in done))] if done else [None] * len(COLUMNS)
            rows.append(Row(lv, vals, _status_of(at)))
        title = f + (" (mean over the other factors)" if len(grid.factors) > 1 else "")
        tables.append(_with_best(ResultTable(title, f, f, rows + refs)))
    if len(grid.factors) > 1:
        rows = [Row(c.label(grid.factors), _cell_values(c) if c.status == "FINISHED" else [None] * len(COLUMNS),
                    c.status.lower()) for c in grid.cells]
        tables.append(_with_best(ResultTable("all cells", None, " · ".join(grid.factors), rows + refs)))
    return tables


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_value(col: Column, v: float | None) -> str:
    """Display form: accuracy in %, retention in %, speed-up as x, time as h/m/s."""
    if v is None or math.isnan(v):
        return "—"
    if col.kind == "acc":
        return f"{100 * v:.1f}"
    if col.kind == "ratio":
        return f"{100 * v:.0f}%"
    if col.kind == "x":
        return f"{v:.1f}×"
    if col.kind == "s":
        return _duration(v)
    return f"{v:g}"


_TERMINAL_LABELS = {"background": "backgr.", "T2I": "T2I all", "edit": "edit all", "train time": "train",
                    "denoise speed-up": "denoise ×", "NFE ratio": "NFE ×", "position entropy": "H pos",
                    "colour entropy": "H col"}


def _short(col: Column) -> str:
    if col.group == "Retention vs teacher":
        return f"ret {col.label}"
    return _TERMINAL_LABELS.get(col.label, col.label)


def terminal_tables(table: ResultTable) -> list:
    """The table as two rich Tables that fit ~110 columns: accuracy per category / edit type,
    then overall accuracy, retention and cost with the status (best values bold, starred)."""
    from rich.table import Table

    keys = [c.key for c in table.columns]
    split = keys.index(per_model("edit_acc")) + 1
    parts = [
        (f"{table.title}: accuracy (%) per T2I category and edit type", list(range(split)), False),
        (f"{table.title}: overall, retention vs teacher, cost",
         [keys.index(per_model("t2i_acc")), keys.index(per_model("edit_acc"))] + list(range(split, len(keys))), True),
    ]
    out = []
    for title, idx, with_status in parts:
        t = Table(title=title, title_justify="left", header_style="bold")
        t.add_column(table.row_header, no_wrap=True)
        for j in idx:
            t.add_column(_short(table.columns[j]), justify="right", no_wrap=True)
        if with_status:
            t.add_column("status", no_wrap=True)
        for i, row in enumerate(table.rows):
            cells = []
            for j in idx:
                text = format_value(table.columns[j], row.values[j])
                cells.append(f"[bold green]{text}★[/]" if i in table.best[j] else text)
            if with_status:
                cells.append("" if row.reference else row.status)
            t.add_row(row.label, *cells, style="dim italic" if row.reference else None)
        out.append(t)
    return out


def print_tables(tables: Sequence[ResultTable], console) -> None:
    """Print every table: rich on a terminal, Markdown with every column in a pipe or log."""
    from flashctl.term import show

    for table in tables:
        for t in terminal_tables(table):
            show(console, t)


def table_csv(table: ResultTable) -> str:
    """Raw values (metric keys as headers, student model), one row per level/cell/reference."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([table.row_header, "status", "reference"] + [c.metric() for c in table.columns])
    for row in table.rows:
        w.writerow([row.label, row.status, int(row.reference)]
                   + ["" if v is None else repr(float(v)) for v in row.values])
    return buf.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def tables_markdown(grid: GridRuns, tables: Sequence[ResultTable]) -> str:
    """All tables as GitHub Markdown (best values bold with a star)."""
    lines = [f"# Ablation grid `{grid.grid_id}`", "",
             (f"Experiment `{grid.experiment_name}`, parent run `{grid.parent_id}`, factors: "
              f"{', '.join(grid.factors)}. Accuracy in %, retention = student / teacher."), ""]
    for table in tables:
        lines += [f"## {table.title}", ""]
        head = [table.row_header] + [f"{c.group.split(' (')[0]}: {c.label}" for c in table.columns] + ["status"]
        lines.append("| " + " | ".join(_md_escape(h) for h in head) + " |")
        lines.append("|---" + "|---:" * len(table.columns) + "|---|")
        for i, row in enumerate(table.rows):
            vals = []
            for j, col in enumerate(table.columns):
                text = format_value(col, row.values[j])
                vals.append(f"**{text}** ★" if i in table.best[j] else text)
            label = f"*{row.label}*" if row.reference else row.label
            lines.append("| " + " | ".join(_md_escape(x) for x in [label] + vals + [row.status]) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def level_plot(table: ResultTable) -> bytes:
    """Metric vs level for one factor: overall accuracy (teacher dashed), retention, T2I per
    category, edit per type."""
    plt = _pyplot()
    rows = [r for r in table.rows if not r.reference]
    teacher = next((r for r in table.rows if r.reference), None)  # the first reference: full teacher
    x = list(range(len(rows)))
    keys = [c.key for c in table.columns]

    def series(key: str) -> list[float]:
        j = keys.index(key)
        return [math.nan if r.values[j] is None else r.values[j] for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), sharex=True)
    panels = [
        (axes[0, 0], "Overall accuracy", [(per_model("t2i_acc"), "T2I"), (per_model("edit_acc"), "edit")], True),
        (axes[0, 1], "Retention vs teacher",
         [(eval_metric("retention", "t2i"), "T2I"), (eval_metric("retention", "edit"), "edit")], False),
        (axes[1, 0], "T2I accuracy per category", [(per_model("t2i", c), c) for c in T2I_CATEGORIES], False),
        (axes[1, 1], "Edit accuracy per type", [(per_model("edit", e), e) for e in EDIT_TYPES], False),
    ]
    for ax, title, lines, with_teacher in panels:
        for _n, (key, label) in enumerate(lines):
            line, = ax.plot(x, series(key), marker="o", label=label)
            if with_teacher and teacher is not None:
                tv = teacher.values[keys.index(key)]
                if tv is not None:
                    ax.axhline(tv, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{label} teacher")
        ax.set_title(title, fontsize=11)
        ax.set_ylim(0, 1.05 if "Retention" not in title else None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.set_xticks(x, [r.label for r in rows], rotation=15 if len(rows) > 4 else 0, fontsize=9)
    axes[0, 1].set_ylim(bottom=0)
    fig.suptitle(table.title, fontsize=12)
    fig.tight_layout()
    return _png(fig)


def training_curves(client, grid: GridRuns) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per cell label: metric key -> [(step, value)] for the generator/critic losses, the periodic
    samples' accuracies and how many rows each is over (`track.SAMPLE_N`)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for cell in grid.cells:
        curves = {}
        for key in (*TRAIN_CURVES, *SAMPLE_N.values()):
            hist = client.get_metric_history(cell.run_id, key)
            if hist:
                curves[key] = sorted((m.step, m.value) for m in hist)
        if curves:
            out[cell.label(grid.factors)] = curves
    return out


def sample_band(acc: list[tuple[int, float]], n: list[tuple[int, float]]):
    """(steps, lows, highs) of the Wilson 95% interval around each periodic-sample accuracy
    whose row count was logged at the same step; None when none was (runs from before
    `track.SAMPLE_N`)."""
    rows = dict(n)
    pts = [(s, wilson(round(a * rows[s]), int(rows[s]))) for s, a in acc if rows.get(s)]
    if not pts:
        return None
    return [s for s, _ in pts], [i.low for _, i in pts], [i.high for _, i in pts]


def training_plot(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    """Generator and critic loss vs step, and the verifier's accuracy of the periodic student
    samples (where logged), one line per cell: a recipe that destabilises shows as a drop. The
    sample curves start at step 0 (the student as initialised: the teacher at the student's
    steps) and carry a shaded Wilson 95% band where the row counts were logged: with a few dozen
    rows per point, a wiggle inside the band is not a trend."""
    plt = _pyplot()
    keys = [k for k in TRAIN_CURVES if any(k in c for c in curves.values())]
    counts = {acc: SAMPLE_N[t] for t, acc in SAMPLE_ACC.items()}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, c in curves.items():
            if key in c:
                steps, vals = zip(*c[key])
                line, = ax.plot(steps, vals, label=label, linewidth=1.2,
                                marker="o" if key.startswith("samples/") else None, markersize=3)
                band = sample_band(c[key], c.get(counts.get(key, ""), []))
                if band:
                    ax.fill_between(band[0], band[1], band[2], color=line.get_color(), alpha=0.15, linewidth=0)
        title = key.split("/", 1)[1].replace("_", " ")
        ax.set_title(f"periodic samples: {title}" if key.startswith("samples/") else title, fontsize=11)
        if key.startswith("samples/"):
            ax.set_ylim(0, 1.02)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------------------------
# Qualitative grids (paper figures 2-4)


@dataclass
class QualRow:
    row_id: str
    task: str
    text: str
    kind: str  # category or edit type


@dataclass
class Qualitative:
    """Rows = eval prompts, columns = [input,] teacher, then one per cell; images as PNG bytes."""

    rows: list[QualRow]
    columns: list[str]
    images: dict[tuple[str, str], bytes]


def _rows_from_results(obj: Any) -> dict[str, dict[str, Any]]:
    """Every dict in `eval/results.json` that names a row id and its prompt/instruction."""
    found: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            rid = node.get("row_id", node.get("id"))
            text = node.get("prompt", node.get("instruction"))
            if isinstance(rid, str) and isinstance(text, str):
                found.setdefault(rid, node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(obj)
    return found


def _download(client, run_id: str, path: str, dst: Path) -> Path | None:
    """Download a run's artifact (file or folder) into `dst`; None when absent/unreadable."""
    try:
        # MLflow draws a tqdm bar per download; a report downloads dozens of folders
        with environ(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
            if not client.list_artifacts(run_id, path) and "." not in Path(path).name:
                return None
            return Path(client.download_artifacts(run_id, path, str(dst)))
    except Exception:  # noqa: BLE001 - an unreadable artifact shows as "no images", not as a failed report
        return None


def _artifact_pngs(client, run_id: str, path: str, dst: Path) -> dict[str, bytes]:
    """`{row_id: png}` of a run's artifact folder (empty when absent)."""
    local = _download(client, run_id, path, dst)
    if local is None:
        return {}
    return {p.stem: p.read_bytes() for p in sorted(local.glob("*.png"))}


def _pick_rows(rows: list[QualRow], per_task: int) -> list[QualRow]:
    """Up to `per_task` rows per task, round-robin over categories / edit types."""
    picked = []
    for task in ("t2i", "edit", "other"):
        groups: dict[str, list[QualRow]] = {}
        for r in rows:
            if r.task == task:
                groups.setdefault(r.kind, []).append(r)
        queue = [list(g) for g in groups.values()]
        taken = 0
        while taken < per_task and any(queue):
            for g in queue:
                if g and taken < per_task:
                    picked.append(g.pop(0))
                    taken += 1
    return picked


def collect_qualitative(client, grid: GridRuns, per_task: int = 6) -> Qualitative | None:
    """Teacher and per-cell student images of the same eval rows (None when no images)."""
    done = _finished(grid.cells) or grid.cells
    with tempfile.TemporaryDirectory(prefix="flashctl-report-") as tmp:
        tmp = Path(tmp)
        students = {c.run_id: _artifact_pngs(client, c.run_id, f"{EVAL_IMAGES}/student", tmp / c.run_id) for c in done}
        teacher, source, meta = {}, {}, {}
        for c in done:
            teacher = _artifact_pngs(client, c.run_id, f"{EVAL_IMAGES}/teacher", tmp / c.run_id)
            if teacher:
                source = _artifact_pngs(client, c.run_id, f"{EVAL_IMAGES}/source", tmp / c.run_id)
                path = _download(client, c.run_id, EVAL_RESULTS, tmp / c.run_id)
                try:
                    meta = _rows_from_results(json.loads(path.read_text())) if path else {}
                except (OSError, ValueError):  # unreadable results: label rows by id
                    meta = {}
                break
    ids = list(teacher) or sorted({r for imgs in students.values() for r in imgs})
    if not ids:
        return None
    rows = []
    for rid in ids:
        m = meta.get(rid, {})
        task = m.get("task") or ("edit" if "edit" in rid else "t2i" if "t2i" in rid else "other")
        kind = m.get("edit_type") or m.get("category") or ""
        text = m.get("prompt") or m.get("instruction") or rid
        rows.append(QualRow(rid, str(task), str(text), str(kind)))
    rows = _pick_rows(rows, per_task)
    columns = (["input"] if source else []) + ["teacher"] + [c.label(grid.factors) for c in done]
    images: dict[tuple[str, str], bytes] = {}
    for r in rows:
        if r.row_id in source:
            images[(r.row_id, "input")] = source[r.row_id]
        if r.row_id in teacher:
            images[(r.row_id, "teacher")] = teacher[r.row_id]
        for c in done:
            if r.row_id in students[c.run_id]:
                images[(r.row_id, c.label(grid.factors))] = students[c.run_id][r.row_id]
    return Qualitative(rows, columns, images)


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px 32px;color:#1d2330;max-width:1400px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px;color:#3b4452}
.meta{color:#5b6575;font-size:13px;margin:0 0 12px} code{background:#f1f3f6;padding:1px 4px;border-radius:3px}
nav a{margin-right:14px;font-size:13px}
.verdict{font-size:12px;padding:2px 8px;border-radius:10px;margin-left:8px;background:#eef0f3;color:#3b4452}
.verdict.agree{background:#dff3e4;color:#1b6b33} .verdict.disagree{background:#fbe3e1;color:#9b2c22}
table.results{border-collapse:collapse;font-size:13px;margin:6px 0 10px}
table.results th,table.results td{border:1px solid #dde1e8;padding:4px 7px;text-align:right;white-space:nowrap}
table.results th{background:#f5f7fa;font-weight:600} table.results td.lbl,table.results th.lbl{text-align:left}
table.results tr.ref td{color:#6b7485;font-style:italic;background:#fafbfc}
table.results td.best{font-weight:700;color:#0b6b2f;background:#e9f7ee}
td.status{color:#5b6575;text-align:left} td.status.failed{color:#b42318}
figure{margin:8px 0 16px} figure img{max-width:100%;border:1px solid #eef0f3} figcaption{font-size:12px;color:#5b6575}
table.qual{border-collapse:collapse;font-size:12px} table.qual th{font-weight:600;padding:4px 6px;vertical-align:bottom} table.qual th.p{text-align:left}
table.qual td{padding:3px 6px;vertical-align:middle;text-align:center} table.qual td.prompt{text-align:left;max-width:260px}
table.qual td.prompt small{color:#6b7485;display:block} table.qual tr:nth-child(even){background:#f8f9fb}
img.px{height:88px;image-rendering:pixelated;border:1px solid #d5d9e0;display:block;margin:auto}
.missing{color:#9aa3b1}
"""


def _b64(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _img(png: bytes, alt: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} alt="{html.escape(alt)}" src="{_b64(png)}">'


def html_table(table: ResultTable) -> str:
    """A results table with grouped headers; best values highlighted and starred."""
    e = html.escape
    groups: list[tuple[str, int]] = []
    for col in table.columns:
        if groups and groups[-1][0] == col.group:
            groups[-1] = (col.group, groups[-1][1] + 1)
        else:
            groups.append((col.group, 1))
    out = ['<table class="results"><thead><tr><th class="lbl" rowspan="2">' + e(table.row_header) + "</th>"]
    out += [f'<th colspan="{n}">{e(g)}</th>' for g, n in groups]
    out.append('<th class="lbl" rowspan="2">status</th></tr><tr>')
    out += [f"<th>{e(c.label)}</th>" for c in table.columns]
    out.append("</tr></thead><tbody>")
    for i, row in enumerate(table.rows):
        out.append('<tr class="ref">' if row.reference else "<tr>")
        out.append(f'<td class="lbl">{e(row.label)}</td>')
        for j, col in enumerate(table.columns):
            text = e(format_value(col, row.values[j]))
            out.append(f'<td class="best" title="best">★ {text}</td>' if i in table.best[j] else f"<td>{text}</td>")
        st = "" if row.reference else row.status
        out.append(f'<td class="status {e(st)}">{e(st)}</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def html_qualitative(q: Qualitative) -> str:
    """Image grids, one per task: rows = prompts, columns = [input,] teacher, each level."""
    e = html.escape
    out = []
    for task, title in (("t2i", "Text-to-image"), ("edit", "Editing"), ("other", "Other")):
        rows = [r for r in q.rows if r.task == task]
        if not rows:
            continue
        cols = [c for c in q.columns if c != "input" or task == "edit"]  # T2I rows have no input image
        out.append(f"<h3>{title}</h3><table class=\"qual\"><thead><tr><th class=\"p\">prompt</th>")
        out += [f"<th>{e(c)}</th>" for c in cols]
        out.append("</tr></thead><tbody>")
        for r in rows:
            out.append(f'<tr><td class="prompt">{e(r.text)}<small>{e(r.row_id)}'
                       + (f" · {e(r.kind)}" if r.kind else "") + "</small></td>")
            for c in cols:
                png = q.images.get((r.row_id, c))
                out.append(f"<td>{_img(png, f'{c}: {r.text}', 'px')}</td>" if png else '<td class="missing">—</td>')
            out.append("</tr>")
        out.append("</tbody></table>")
    return "".join(out)


def render_html(grid: GridRuns, tables: Sequence[ResultTable], plots: dict[str, bytes],
                curves_png: bytes | None, qual: Qualitative | None,
                findings: Sequence[FactorFinding] = (), moves: Sequence[Movement] = ()) -> str:
    """The whole report as one self-contained HTML document."""
    e = html.escape
    finished = len(_finished(grid.cells))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>flashctl report — grid {e(grid.grid_id)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Ablation grid <code>{e(grid.grid_id)}</code>: {e(' × '.join(grid.factors))}</h1>",
        (f'<p class="meta">experiment <code>{e(grid.experiment_name)}</code> · parent run <code>{e(grid.parent_id)}</code>'
         f" · {finished}/{len(grid.cells)} cells finished · store <code>{e(grid.uri)}</code> · {when}</p>"),
        ('<p class="meta">Student = 4-NFE distilled model; accuracy = shapes-verifier accuracy in %; retention = '
         "student / teacher accuracy; speed-up = teacher / student seconds per image. ★ = best level per column.</p>"),
        "<nav>" + ('<a href="#findings">findings</a>' if findings else "")
        + "".join(f'<a href="#t{i}">{e(t.title)}</a>' for i, t in enumerate(tables))
        + ('<a href="#training">training curves</a>' if curves_png else "")
        + ('<a href="#qualitative">qualitative</a>' if qual else "") + "</nav>",
    ]
    if findings:
        parts.append(findings_html(findings))
    parts.append(movement_html(moves))
    for i, table in enumerate(tables):
        parts.append(f'<h2 id="t{i}">{e(table.title)}</h2>')
        parts.append(html_table(table))
        if table.factor and table.factor in plots:
            parts.append(f"<figure>{_img(plots[table.factor], f'metrics vs level: {table.factor}')}"
                         f"<figcaption>Metrics vs level ({e(table.factor)}); dashed: teacher.</figcaption></figure>")
    if curves_png:
        parts.append('<h2 id="training">Training curves</h2>')
        parts.append(f"<figure>{_img(curves_png, 'training curves')}<figcaption>Generator (DMD) and critic "
                     "(flow-matching) loss per cell, and the verifier's accuracy of the periodic student samples "
                     "(distill.sample_every; step 0 is the student as initialised, the shaded band its Wilson 95% "
                     "interval over distill.sample_rows rows): a drop outside the band is instability."
                     "</figcaption></figure>")
    if qual:
        parts.append('<h2 id="qualitative">Qualitative comparison</h2>')
        parts.append('<p class="meta">Same eval prompts and seeds in every run: teacher first, then each '
                     "level's 4-NFE student.</p>")
        parts.append(html_qualitative(qual))
    parts.append("<h2>Runs</h2><table class=\"results\"><thead><tr><th class=\"lbl\">cell</th>"
                 "<th class=\"lbl\">run</th><th class=\"lbl\">run id</th><th class=\"lbl\">spec hash</th>"
                 "<th class=\"lbl\">status</th></tr></thead><tbody>")
    for c in grid.cells:
        parts.append(f'<tr><td class="lbl">{e(c.label(grid.factors))}</td><td class="lbl">{e(c.name)}</td>'
                     f'<td class="lbl"><code>{e(c.child_id or c.run_id)}</code></td>'
                     f'<td class="lbl"><code>{e(c.spec_hash)}</code></td>'
                     f'<td class="status {e(c.status.lower())}">{e(c.status.lower())}'
                     + (f' (results of <code>{e(c.run_id)}</code>, reused from another grid)' if c.reused else "")
                     + "</td></tr>")
    parts.append("</tbody></table></body></html>\n")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Findings: intervals, paired tests, the paper's claims


def collect_outcomes(client, grid: GridRuns, models: Sequence[str] = ("student",)
                     ) -> dict[str, list[tuple[dict[str, str], list[dict[str, Any]]]]]:
    """Per model in `models`: (levels, its per-row verifier results) of every finished cell, from
    the cell's `eval/results.json`, downloaded once (cells or models without results are left out)."""
    out: dict[str, list[tuple[dict[str, str], list[dict[str, Any]]]]] = {m: [] for m in models}
    with tempfile.TemporaryDirectory(prefix="flashctl-report-") as tmp:
        for c in _finished(grid.cells):
            path = _download(client, c.run_id, EVAL_RESULTS, Path(tmp) / c.run_id)
            try:
                found = json.loads(path.read_text())["models"] if path else {}
            except (OSError, ValueError, KeyError, TypeError):
                found = {}
            for m in models:
                rows = found.get(m, {}).get("per_row") if isinstance(found, dict) and isinstance(found.get(m), dict) else None
                if isinstance(rows, list):
                    out[m].append((dict(c.levels), [r for r in rows if isinstance(r, dict)]))
    return out


def grid_findings(grid: GridRuns, outcomes) -> list[FactorFinding]:
    """One finding per factor of the grid (the seed pseudo-factor pools, it is not a factor)."""
    found = []
    for f in grid.factors:
        if f == SEED_FACTOR:
            continue
        pooled, seeds = group_outcomes(outcomes, f, grid.factors)
        pooled = {m: v for m, v in pooled.items() if v}
        if pooled:
            found.append(factor_finding(f, pooled, seeds))
    return found


def grid_movement(grid: GridRuns, students, starts) -> list[Movement]:
    """Per cell with both: its student against its starting point (`findings.START_MODEL`)."""
    start_of = {tuple(sorted(levels.items())): rows for levels, rows in starts}
    moves = []
    for levels, rows in students:
        start = start_of.get(tuple(sorted(levels.items())))
        if start:
            m = movement(" · ".join(levels.get(f, "?") for f in grid.factors), rows, start)
            if m.tests:
                moves.append(m)
    return moves


MOVEMENT_TITLE = "Did training move the students? Student vs its starting point (the teacher at the student's NFE, no CFG)"
MOVEMENT_HEADER = ("cell", "T2I change (points)", "p (T2I)", "edit change (points)", "p (edit)")


def movement_rows(moves: Sequence[Movement]) -> list[list[str]]:
    def cells(t: PairedTest | None) -> list[str]:
        return ["—", "—"] if t is None else [f"{100 * t.difference:+.1f}", f"{t.p_value:.3g}"]

    return [[m.cell, *cells(m.tests.get("t2i")), *cells(m.tests.get("edit"))] for m in moves]


def _ci(r) -> str:
    iv = r.interval
    text = f"{100 * iv.estimate:.1f} [{100 * iv.low:.1f}, {100 * iv.high:.1f}] n={iv.n}"
    if r.seeds is not None:
        text += f"; seeds {100 * r.seeds.mean:.1f} ± {100 * r.seeds.std:.1f}"
    return text


def findings_rows(finding: FactorFinding) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a factor's findings table: per level, accuracy [95% CI] and the
    McNemar p-value against the best level (Holm-adjusted over the levels), for each outcome group;
    with several training seeds per level also the seed t-test's p ("0.01; seeds 0.3")."""
    metrics = list(finding.metrics.values())
    header = [finding.factor] + [f"{METRICS[m.metric]} % [95% CI]" for m in metrics] + \
             [f"p vs best ({METRICS[m.metric].split(' (')[0]})" for m in metrics]
    levels = list(dict.fromkeys(r.level for m in metrics for r in m.levels))
    rows = []
    for lv in levels:
        cells, ps = [lv], []
        for m in metrics:
            r = next((r for r in m.levels if r.level == lv), None)
            cells.append("—" if r is None else _ci(r) + (" ★" if lv == m.best else ""))
            sp = m.seed_p(lv) if lv in m.tests else None
            ps.append("best" if lv == m.best else ("—" if lv not in m.tests else f"{m.p(lv):.3g}"
                                                   + ("" if sp is None else f"; seeds {sp:.3g}")))
        rows.append(cells + ps)
    return header, rows


def finding_lines(finding: FactorFinding) -> list[str]:
    """Plain sentences: one per outcome group, then the comparison with the paper."""
    lines = [m.sentence() for m in finding.metrics.values()]
    if finding.paper:
        lines.append(f"Paper: {finding.paper.claim}. This run: {finding.verdict.upper()}"
                     + (f" ({finding.why})." if finding.why else "."))
    return lines


def print_findings(findings: Sequence[FactorFinding], console) -> None:
    from rich.table import Table

    from flashctl.term import show

    for f in findings:
        header, rows = findings_rows(f)
        t = Table(title=f"{f.factor}: findings (student; Wilson 95% intervals, exact McNemar on the same rows and seeds, "
                        "Holm-adjusted; seeds p = t-test over training seeds)",
                  title_justify="left")
        for i, h in enumerate(header):
            t.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*r)
        show(console, t)
        for line in finding_lines(f):
            console.print(line, highlight=False, markup=False)


def print_movement(moves: Sequence[Movement], console) -> None:
    from rich.table import Table

    from flashctl.term import show

    if not moves:
        return
    t = Table(title=MOVEMENT_TITLE, title_justify="left")
    for i, h in enumerate(MOVEMENT_HEADER):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in movement_rows(moves):
        t.add_row(*r)
    show(console, t)
    console.print(movement_sentence(moves), highlight=False, markup=False)


def movement_markdown(moves: Sequence[Movement]) -> str:
    if not moves:
        return ""
    lines = [f"### {MOVEMENT_TITLE}", "", "| " + " | ".join(MOVEMENT_HEADER) + " |",
             "|---" + "|---:" * (len(MOVEMENT_HEADER) - 1) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in movement_rows(moves)]
    return "\n".join(lines + ["", f"- {_md_escape(movement_sentence(moves))}", ""])


def movement_html(moves: Sequence[Movement]) -> str:
    e = html.escape
    if not moves:
        return ""
    parts = [f'<h3 id="movement">{e(MOVEMENT_TITLE)}</h3><table class="results"><thead><tr>'
             + "".join(f'<th class="{"lbl" if i == 0 else ""}">{e(h)}</th>' for i, h in enumerate(MOVEMENT_HEADER))
             + "</tr></thead><tbody>"]
    for r in movement_rows(moves):
        parts.append("<tr>" + "".join(f'<td class="{"lbl" if i == 0 else ""}">{e(c)}</td>' for i, c in enumerate(r))
                     + "</tr>")
    parts.append(f"</tbody></table><ul><li>{e(movement_sentence(moves))}</li></ul>")
    return "".join(parts)


FINDINGS_LEGEND = ("Student accuracy with Wilson 95% intervals; p = exact McNemar test against the best level on "
                   "the same eval rows and seeds, Holm-adjusted over the other levels; where both levels ran "
                   "several training seeds, \"seeds p\" = Student's t-test on the per-seed accuracies "
                   "(Holm-adjusted), which a level must also pass to be called significantly best; "
                   "★ = highest accuracy.")


def findings_markdown(findings: Sequence[FactorFinding]) -> str:
    lines = ["## Findings", "", FINDINGS_LEGEND, ""]
    for f in findings:
        header, rows = findings_rows(f)
        lines += [f"### {f.factor}", "", "| " + " | ".join(_md_escape(h) for h in header) + " |",
                  "|---" + "|---:" * (len(header) - 1) + "|"]
        lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
        lines += [""] + [f"- {_md_escape(x)}" for x in finding_lines(f)] + [""]
    return "\n".join(lines)


def findings_html(findings: Sequence[FactorFinding]) -> str:
    e = html.escape
    parts = [f'<h2 id="findings">Findings</h2><p class="meta">{e(FINDINGS_LEGEND)}</p>']
    for f in findings:
        header, rows = findings_rows(f)
        verdict = f'<span class="verdict {e(f.verdict.replace(" ", "-"))}">{e(f.verdict)}</span>'
        parts.append(f"<h3>{e(f.factor)} {verdict}</h3><table class=\"results\"><thead><tr>"
                     + "".join(f'<th class="{"lbl" if i == 0 else ""}">{e(h)}</th>' for i, h in enumerate(header))
                     + "</tr></thead><tbody>")
        for r in rows:
            parts.append("<tr>" + "".join(f'<td class="{"lbl" if i == 0 else ""}">{e(c)}</td>' for i, c in enumerate(r))
                         + "</tr>")
        parts.append("</tbody></table><ul>" + "".join(f"<li>{e(x)}</li>" for x in finding_lines(f)) + "</ul>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# Entry


@dataclass
class ReportResult:
    """What `make_report` wrote and computed."""

    grid: GridRuns
    tables: list[ResultTable]
    files: dict[str, Path]


def parse_formats(formats: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"csv,md"` / ["html", "csv"] -> validated tuple; None -> every format."""
    if formats is None:
        return FORMATS
    items = formats.split(",") if isinstance(formats, str) else [x for f in formats for x in f.split(",")]
    items = [i.strip().lower() for i in items if i.strip()]
    bad = [i for i in items if i not in FORMATS]
    if bad or not items:
        raise UserError(f"--format: unknown format {bad[0] if bad else '(empty)'!r}; valid: {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(items))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name)


def make_report(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent: str | None = None,
    out: str | Path | None = None,
    formats: str | Sequence[str] | None = None,
    console=None,
    images_per_task: int = 6,
) -> ReportResult:
    """The `flashctl report` entry: find the grid, print its tables, write HTML/CSV/Markdown.

    Output folder: `out`, default `reports/<grid id>`. Raises UserError (one line) when there
    is no store, no such experiment/run, or no grid.
    """
    from mlflow.tracking import MlflowClient

    from flashctl.term import human_console

    fmts = parse_formats(formats)
    console = console or human_console()
    uri = store_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    grid = find_grid(client, parent=parent, experiment=experiment)
    tables = factor_tables(grid)
    console.print(f"grid {grid.grid_id} (parent run {grid.parent_id}, experiment {grid.experiment_name!r}): "
                  f"{len(_finished(grid.cells))}/{len(grid.cells)} cells finished", highlight=False)
    print_tables(tables, console)
    outcomes = collect_outcomes(client, grid, ("student", START_MODEL))
    findings = grid_findings(grid, outcomes["student"])
    print_findings(findings, console)
    moves = grid_movement(grid, outcomes["student"], outcomes[START_MODEL])
    print_movement(moves, console)

    out_dir = Path(out) if out else Path("reports") / grid.grid_id
    files: dict[str, Path] = {}
    if "csv" in fmts:
        for table in tables:
            path = out_dir / f"{_safe(table.factor or 'cells')}.csv"
            atomic_write_text(path, table_csv(table))
            files[f"csv:{table.factor or 'cells'}"] = path
    if "md" in fmts:
        files["md"] = out_dir / "report.md"
        atomic_write_text(files["md"], tables_markdown(grid, tables) + "\n" + findings_markdown(findings)
                           + movement_markdown(moves))
    if "html" in fmts:
        plots = {t.factor: level_plot(t) for t in tables if t.factor}
        curves = training_curves(client, grid)
        qual = collect_qualitative(client, grid, images_per_task)
        files["html"] = out_dir / "report.html"
        atomic_write_text(files["html"], render_html(grid, tables, plots, training_plot(curves) if curves else None, qual,
                                                       findings, moves))
    for path in files.values():
        console.print(f"wrote {path}", highlight=False)
    return ReportResult(grid, tables, files)
