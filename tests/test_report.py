"""`report`: tables, plots, qualitative grids and exports from real MLflow runs made here."""

from __future__ import annotations

import base64
import csv
import io
import json
import re

import pytest
from PIL import Image, ImageDraw
from rich.console import Console

from flashctl.errors import UserError
from flashctl.report import COLUMNS, EDIT_TYPES, T2I_CATEGORIES, best_rows, make_report
from flashctl.track import (
    SAMPLE_ACC,
    SAMPLE_N,
    TAG_CELL,
    TAG_FACTOR,
    TAG_FACTORS,
    TAG_GRID,
    TAG_HASH,
    TAG_KIND,
    TAG_LEVEL,
    TAG_LEVEL_OF,
    TAG_LEVELS,
    TAG_PARENT,
)

ROWS = [  # (row id, task, kind, prompt)
    ("shapes-eval-1234-t2i-0", "t2i", "object", "a red circle on a white background"),
    ("shapes-eval-1234-t2i-1", "t2i", "scene", "a blue square left of a green triangle"),
    ("shapes-eval-1234-t2i-2", "t2i", "text", "the letter K in black"),
    ("shapes-eval-1234-edit-0", "edit", "recolour", "make the circle yellow"),
    ("shapes-eval-1234-edit-1", "edit", "remove", "remove the square"),
]
N_ROWS = 120  # eval rows per task in a cell's results.json
COLOURS = {"teacher": (200, 40, 40), "9:1": (40, 160, 60), "7:3": (40, 60, 200), "5:5": (220, 160, 0)}


def png(colour, size=(32, 32)) -> bytes:
    img = Image.new("RGB", size, (245, 245, 245))
    ImageDraw.Draw(img).ellipse((6, 6, size[0] - 7, size[1] - 7), fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def eval_metrics(t2i: float, edit: float) -> dict[str, float]:
    """A realistic eval block: the student per category/type around (t2i, edit), teachers fixed."""
    m = {}
    for model, (a, b, nfe, sec) in {"student": (t2i, edit, 4, 0.05), "teacher": (0.9, 0.8, 80, 0.62),
                                     "teacher_fast": (0.3, 0.2, 4, 0.05)}.items():
        for i, c in enumerate(T2I_CATEGORIES):
            m[f"eval/{model}/t2i/{c}"] = round(a - 0.05 * i, 4)
        for i, e in enumerate(EDIT_TYPES):
            m[f"eval/{model}/edit/{e}"] = round(b - 0.03 * i, 4)
        m[f"eval/{model}/t2i_acc"] = a - 0.05
        m[f"eval/{model}/edit_acc"] = b - 0.06
        m[f"eval/{model}/nfe"] = nfe
        m[f"eval/{model}/sec_per_image"] = sec
    m["eval/retention/t2i"] = m["eval/student/t2i_acc"] / m["eval/teacher/t2i_acc"]
    m["eval/retention/edit"] = m["eval/student/edit_acc"] / m["eval/teacher/edit_acc"]
    m["eval/speedup"] = 0.62 / 0.05
    return m


def make_grid(uri: str, tmp_path, factors: dict[str, list[str]], results: dict[tuple, tuple[float, float]],
              statuses: dict[tuple, str] | None = None, images: bool = True) -> str:
    """A grid as `ablate` + the distill job leave it: parent, children, metrics, histories, images."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("flashctl-tiny", artifact_location=(tmp_path / "art").as_uri())
    names = list(factors)
    parent = client.create_run(exp, run_name="tiny-grid", tags={
        TAG_KIND: "grid", TAG_GRID: "abc123def456", TAG_FACTORS: ",".join(names), TAG_LEVELS: json.dumps(factors)})
    pid = parent.info.run_id
    for n, (levels, (t2i, edit)) in enumerate(results.items()):
        key = ",".join(f"{f}={lv}" for f, lv in zip(names, levels))
        child = client.create_run(exp, run_name="tiny-" + key, tags={
            TAG_PARENT: pid, TAG_KIND: "cell", TAG_GRID: "abc123def456", TAG_CELL: key, TAG_HASH: f"hash{n}",
            TAG_FACTOR: ",".join(names), TAG_LEVEL: ",".join(levels),
            **{TAG_LEVEL_OF + f: lv for f, lv in zip(names, levels)}})
        rid = child.info.run_id
        ts = 1_700_000_000_000
        hist = [Metric("train/loss_generator", 1.0 / (1 + s) + 0.1 * n, ts, s) for s in range(0, 50, 5)]
        hist += [Metric("train/loss_critic", 0.5 + 0.01 * s, ts, s) for s in range(0, 50, 5)]
        # periodic samples from step 0, with their row counts: the curves' Wilson bands
        hist += [Metric(SAMPLE_ACC["t2i"], 0.5 + 0.005 * s, ts, s) for s in (0, 25, 50)]
        hist += [Metric(SAMPLE_N["t2i"], 64.0, ts, s) for s in (0, 25, 50)]
        final = eval_metrics(t2i, edit) | {"train/time_s": 100.0 + 10 * n}
        client.log_batch(rid, metrics=hist + [Metric(k, v, ts, 50) for k, v in final.items()])
        if images:
            folder = tmp_path / f"imgs{n}"
            for model, colour in (("student", COLOURS[levels[0]]), ("teacher", COLOURS["teacher"])):
                (folder / model).mkdir(parents=True)
                for rid_, task, _kind, _ in ROWS:
                    (folder / model / f"{rid_}.png").write_bytes(png(colour, (48, 32) if task == "edit" else (32, 32)))
            client.log_artifacts(rid, str(folder), "eval/images")
        else:
            folder = tmp_path / f"res{n}"
            folder.mkdir()
        # what evaluate writes: per-row verifier results of the student (N_ROWS per task, the first
        # accuracy * N_ROWS right, so cells agree on their easy rows as real models do)
        per_row = [{"id": f"row-{task}-{i}", "task": task, "category": "text" if i % 3 == 0 else "object",
                    "correct": i < round(acc * N_ROWS), "prompt": f"prompt {i}"}
                   for task, acc in (("t2i", t2i), ("edit", edit)) for i in range(N_ROWS)]
        results_json = {"rows": [{"row_id": r, "task": t, "prompt": p, ("edit_type" if t == "edit" else "category"): k,
                                  "student": {"correct": True}} for r, t, k, p in ROWS],
                        "models": {"student": {"per_row": per_row},
                                   # the starting point: the teacher at 4 NFE, right on the first 80% / 40%
                                   "teacher_fast": {"per_row": [
                                       {**r, "correct": int(r["id"].rsplit("-", 1)[1]) < round(
                                           (0.8 if r["task"] == "t2i" else 0.4) * N_ROWS)} for r in per_row]}}}
        (folder / "results.json").write_text(json.dumps(results_json))
        client.log_artifact(rid, str(folder / "results.json"), "eval")
        client.set_terminated(rid, status=(statuses or {}).get(levels, "FINISHED"))
    client.set_terminated(pid, status="FINISHED")
    return pid


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def quiet() -> Console:
    return Console(file=io.StringIO(), width=260)


MIXTURE = {"task-mixture": ["9:1", "7:3", "5:5"]}
MIX_RESULTS = {("9:1",): (0.82, 0.40), ("7:3",): (0.80, 0.55), ("5:5",): (0.85, 0.70)}


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """One task-mixture grid with images, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("mixture")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, make_grid(uri, tmp, MIXTURE, MIX_RESULTS), tmp


def col(key: str) -> int:
    return [c.key for c in COLUMNS].index(key)


def test_tables_have_every_level_and_mark_the_best(mixture, tmp_path):
    store, pid, _ = mixture
    console = quiet()
    result = make_report(store, parent=pid, out=tmp_path / "out", console=console)
    (table,) = result.tables
    assert [r.label for r in table.rows][:3] == ["9:1", "7:3", "5:5"]
    assert [r.reference for r in table.rows] == [False, False, False, True, True]
    assert table.rows[3].label == "teacher 80 NFE" and table.rows[4].label == "teacher 4 NFE"
    assert table.best[col("eval/{m}/edit_acc")] == {2}  # 5:5 is best for editing...
    assert table.best[col("eval/{m}/t2i_acc")] == {2}  # ...and for T2I
    assert table.best[col("train/time_s")] == {0}  # lower is better for time
    assert table.best[col("eval/{m}/nfe")] == set()  # every level at 4 NFE: nothing to mark
    assert table.rows[2].values[col("eval/retention/edit")] == pytest.approx(0.64 / 0.74)
    text = console.file.getvalue()
    for level in ("9:1", "7:3", "5:5"):
        assert level in text
    assert "64.0★" in text  # 5:5's edit accuracy, starred
    assert "teacher 80 NFE" in text


def test_html_embeds_plots_and_the_qualitative_grid(mixture, tmp_path):
    store, pid, _ = mixture
    result = make_report(store, parent=pid, out=tmp_path / "out", console=quiet())
    page = result.files["html"].read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    # 1 level plot + 1 training-curve plot + 5 prompts x (teacher + 3 levels)
    assert len(srcs) == 2 + len(ROWS) * 4
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # one self-contained file
    sizes = {Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size for s in srcs}
    assert (32, 32) in sizes and (48, 32) in sizes  # the eval images themselves, not re-rendered
    for _, _, _, prompt in ROWS:
        assert prompt in page
    head = re.search(r'<table class="qual">.*?</thead>', page, re.DOTALL).group(0)
    assert re.findall(r"<th[^>]*>([^<]*)</th>", head) == ["prompt", "teacher", "9:1", "7:3", "5:5"]
    assert page.count('class="best"') >= 10 and "★" in page
    assert "step 0 is the student as initialised" in page and "Wilson 95%" in page
    curves = Image.open(io.BytesIO(base64.b64decode(srcs[1].split(",", 1)[1])))
    assert curves.size[0] > 3 * curves.size[1]  # losses and the sample-accuracy panel side by side


def test_csv_and_markdown_exports(mixture, tmp_path):
    store, pid, _ = mixture
    result = make_report(store, parent=pid, out=tmp_path / "out", formats="csv,md", console=quiet())
    assert "html" not in result.files
    rows = list(csv.DictReader(result.files["csv:task-mixture"].read_text().splitlines()))
    assert [r["task-mixture"] for r in rows] == ["9:1", "7:3", "5:5", "teacher 80 NFE", "teacher 4 NFE"]
    assert float(rows[2]["eval/student/edit_acc"]) == pytest.approx(0.64)
    assert float(rows[0]["train/time_s"]) == 100.0 and rows[3]["train/time_s"] == ""
    md = result.files["md"].read_text()
    assert "| 5:5 |" in md and "**64.0** ★" in md


def test_multi_factor_grid_reports_marginals_and_every_cell(store, tmp_path):
    factors = {"task-mixture": ["9:1", "5:5"], "teacher-guidance": ["single", "stepwise"]}
    results = {("9:1", "single"): (0.6, 0.3), ("9:1", "stepwise"): (0.8, 0.5),
               ("5:5", "single"): (0.7, 0.5), ("5:5", "stepwise"): (0.9, 0.9)}
    pid = make_grid(store, tmp_path, factors, results, statuses={("5:5", "single"): "FAILED"}, images=False)
    result = make_report(store, parent=pid, out=tmp_path / "out", formats="csv", console=quiet())
    mix, guide, cells = result.tables
    j = col("eval/{m}/t2i_acc")
    # a level's row is the mean over its finished cells; the failed cell does not count
    assert mix.rows[0].values[j] == pytest.approx((0.55 + 0.75) / 2) and mix.rows[0].status == "2/2 finished"
    assert mix.rows[1].values[j] == pytest.approx(0.85) and mix.rows[1].status == "1/2 finished"
    assert guide.rows[1].values[j] == pytest.approx((0.75 + 0.85) / 2)
    assert [r.label for r in cells.rows][:4] == ["9:1 · single", "9:1 · stepwise", "5:5 · single", "5:5 · stepwise"]
    assert cells.rows[2].status == "failed" and cells.rows[2].values[j] is None
    assert cells.best[j] == {3}


def test_no_grid_or_no_store_is_a_one_line_user_error(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="no MLflow store at .*mlflow.db"):
        make_report(console=quiet())
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=store).create_experiment("empty", artifact_location=(tmp_path / "a").as_uri())
    for kwargs, pattern in (({}, "no ablation grid found"), ({"experiment": "empty"}, "no ablation grid found in experiment 'empty'"),
                            ({"experiment": "nope"}, "no experiment named 'nope'"), ({"parent": "f" * 32}, "--parent: no run")):
        with pytest.raises(UserError, match=pattern) as exc:
            make_report(store, console=quiet(), **kwargs)
        assert "\n" not in str(exc.value)
    with pytest.raises(UserError, match="--format: unknown format 'pdf'"):
        make_report(store, formats="csv,pdf", console=quiet())
    with pytest.raises(UserError, match="--tracking-uri: 'foo://bar': scheme 'foo' is not one of"):
        make_report("foo://bar", console=quiet())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite://")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI: .*SQLite store is sqlite:///"):
        make_report(console=quiet())
    assert not (tmp_path / "reports").exists()


def test_best_rows_ties_and_gaps():
    assert best_rows([0.5, 0.7, 0.7, None], "max") == {1, 2}
    assert best_rows([3.0, 1.0, 2.0], "min") == {1}
    assert best_rows([4.0, 4.0], "min") == set()
    assert best_rows([None, 0.3], "max") == set()


def test_findings_give_intervals_paired_p_values_and_the_paper_verdict(mixture, tmp_path):
    store, pid, _ = mixture
    console = quiet()
    make_report(store, parent=pid, out=tmp_path / "out", formats="md", console=console)
    text = console.file.getvalue()
    # 5:5 edits 84/120 right, 7:3 66/120, 9:1 48/120 (the first k rows): 5:5 wins every paired test
    assert "task-mixture, edit: 5:5 is best (70.0% [61.3, 77.5])" in text
    assert "beats every other level on the same rows and seeds" in text
    assert "This run: AGREE (5:5 has the best edit accuracy" in text
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Findings" in md and "| 9:1 | 81.7 [73.8, 87.6] n=120 | 40.0 [31.7, 48.9] n=120" in md
    assert re.search(r"\| 9:1 \|.*\| (\d\.\d+e-\d+|0\.0+\d+) \|", md)  # a tiny McNemar p against 5:5
    # did training move each student from its starting point (teacher at 4 NFE: 80% / 40% right)?
    assert "Did training move the students?" in md and "| 9:1 | +1.7 | 0.5 | +0.0 | 1 |" in md
    # 5:5: 6 T2I rows gained (p = 2 * 0.5**6), 36 edit rows gained (2 * 0.5**36), none lost
    assert "| 5:5 | +5.0 | 0.0312 | +30.0 | 2.91e-11 |" in md
    assert ("2 of 3 cells moved measurably from their starting point (7:3 edit +15.0 points; 5:5 T2I +5.0 points, "
            "edit +30.0 points); 9:1 did not") in md



def test_findings_table_shows_the_seed_test_next_to_mcnemar():
    from flashctl.findings import factor_finding, group_outcomes
    from flashctl.report import FINDINGS_LEGEND, findings_rows

    def cell(level, seed, k):
        return ({"task-mixture": level, "seed": seed},
                [{"id": f"e{i}", "task": "edit", "category": "scene", "correct": i < k} for i in range(100)])

    cells = [cell("5:5", "0", 90), cell("5:5", "1", 50), cell("9:1", "0", 60), cell("9:1", "1", 60)]
    finding = factor_finding("task-mixture", *group_outcomes(cells, "task-mixture", ["task-mixture", "seed"]))
    header, rows = findings_rows(finding)
    nine = next(r for r in rows if r[0] == "9:1")
    edit_p = nine[header.index("p vs best (edit)")]
    assert edit_p == "0.00222; seeds 0.667", edit_p  # McNemar 30 vs 10 rows; t = 0.5 on df 2
    assert "seeds 70.0 ± 28.3" in next(r for r in rows if r[0] == "5:5")[header.index("edit % [95% CI]")]
    assert "t-test on the per-seed accuracies" in FINDINGS_LEGEND


def test_sample_curves_carry_a_wilson_band_where_row_counts_were_logged():
    from flashctl.report import sample_band
    from flashctl.stats import wilson

    steps, low, high = sample_band([(0, 0.5), (25, 0.75), (50, 0.25)], [(0, 64.0), (25, 64.0)])
    assert steps == [0, 25]  # step 50 logged no count: no band there
    assert (low[0], high[0]) == (wilson(32, 64).low, wilson(32, 64).high)
    assert 0.37 < low[0] < 0.5 < high[0] < 0.63 and low[1] < 0.75 < high[1]
    assert sample_band([(25, 0.5)], []) is None  # a run from before the counts were logged
