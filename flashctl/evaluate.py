"""Evaluation: sample a fixed, seeded eval set at a given NFE, verify every image, time it.

The eval set comes from the shapes world (`shapes.eval_set`), so the same rows and the same
noise seeds are used for every model and every ablation level: images can be put side by side
and accuracies compared. Accuracy is the shapes verifier's (all claims of a prompt or an
instruction hold), per category for T2I and per edit type for editing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flashctl.io import atomic_write_json
from flashctl.spec import ExperimentSpec


@dataclass
class ModelUnderTest:
    """One configuration to evaluate: a name, sampling steps and CFG scale."""

    name: str
    steps: int
    cfg: float

    @property
    def nfe(self) -> int:
        """Network evaluations per image: CFG runs the network twice per step."""
        return self.steps * (2 if self.cfg > 1 else 1)


def eval_rows(spec: ExperimentSpec) -> list[dict[str, Any]]:
    """The seeded eval set of the spec (balanced over categories / edit types)."""
    from flashctl.shapes import eval_set

    sizes = {k: tuple(v) for k, v in spec.data.sizes.items()}
    return eval_set(spec.eval.seed, spec.eval.n_t2i, spec.eval.n_edit, sizes=sizes)


def _groups(rows: list[dict[str, Any]], batch: int) -> list[list[dict[str, Any]]]:
    """Rows grouped by (task, size) in chunks of `batch` (a batch shares one image size)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["task"], r["width"], r["height"]), []).append(r)
    out = []
    for key in sorted(groups):
        g = groups[key]
        out += [g[i:i + batch] for i in range(0, len(g), batch)]
    return out


def sample_rows(adapter, transformer, rows: list[dict[str, Any]], nfe: int, cfg: float, seed: int,
                batch: int = 16, cfg_rescale: float = 0.0, on_batch: Callable[[int], None] | None = None):
    """Generate one image per row; returns ({row id: PIL image}, seconds spent sampling)."""
    from flashctl.shapes.render import from_png

    images: dict[str, Any] = {}
    seconds = 0.0
    for i, chunk in enumerate(_groups(rows, batch)):
        task, w, h = chunk[0]["task"], chunk[0]["width"], chunk[0]["height"]
        sources = [from_png(r["source_image"]) for r in chunk] if task == "edit" else None
        t = time.perf_counter()
        out = adapter.sample(transformer, [r["prompt"] for r in chunk], h, w, nfe, cfg_scale=cfg,
                             seed=seed + i, source_images=sources, cfg_rescale=cfg_rescale)
        seconds += time.perf_counter() - t
        images.update({r["id"]: im for r, im in zip(chunk, out)})
        if on_batch:
            on_batch(len(chunk))
    return images, seconds


def score_images(rows: list[dict[str, Any]], images: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Verifier results per row and their aggregate."""
    from flashctl.shapes import score, verify_record

    results = [{**verify_record(r, images[r["id"]]), "prompt": r["prompt"]} for r in rows]
    return score(results), results


def flat_metrics(name: str, summary: dict[str, Any], nfe: int, sec_per_image: float) -> dict[str, float]:
    """MLflow metric names of one model's evaluation (the contract `report` reads)."""
    m: dict[str, float] = {f"eval/{name}/nfe": float(nfe), f"eval/{name}/sec_per_image": sec_per_image}
    by_task = summary.get("by_task", {})
    for task, key in (("t2i", "t2i_acc"), ("edit", "edit_acc")):
        if task in by_task:
            m[f"eval/{name}/{key}"] = by_task[task]["accuracy"]
    for cat, v in summary.get("by_category_t2i", {}).items():
        m[f"eval/{name}/t2i/{cat}"] = v["accuracy"]
    for et, v in summary.get("by_edit_type", {}).items():
        if et:
            m[f"eval/{name}/edit/{et}"] = v["accuracy"]
    return m


def evaluate_models(
    adapter,
    models: dict[str, tuple[Any, ModelUnderTest]],
    rows: list[dict[str, Any]],
    out_dir: Path,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate each (transformer, config) on `rows`; writes images + results.json in `out_dir`.

    Returns {"models": {name: {...summary, nfe, cfg, sec_per_image}}, "metrics": {...}}
    including teacher-relative retention and speed-up when `student` and `teacher` are present.
    """
    from flashctl.shapes import score

    out_dir = Path(out_dir)
    results: dict[str, Any] = {"models": {}, "metrics": {}, "rows": len(rows)}
    for name, (transformer, cfg) in models.items():
        done = 0

        def tick(n: int, name=name) -> None:
            nonlocal done
            done += n
            if progress:
                progress(name, done, len(rows))

        images, seconds = sample_rows(adapter, transformer, rows, cfg.steps, cfg.cfg, seed, on_batch=tick)
        summary, per_row = score_images(rows, images)
        t2i_rows = [r for r in per_row if r["task"] == "t2i"]
        summary["by_category_t2i"] = score(t2i_rows)["by_category"] if t2i_rows else {}
        img_dir = out_dir / "images" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        for rid, im in images.items():
            im.save(img_dir / f"{rid}.png")
        sec = seconds / max(1, len(rows))
        summary.update(steps=cfg.steps, nfe=cfg.nfe, cfg=cfg.cfg, sec_per_image=sec, per_row=per_row)
        results["models"][name] = summary
        results["metrics"].update(flat_metrics(name, summary, cfg.nfe, sec))
    m = results["metrics"]
    for task, key in (("t2i", "t2i_acc"), ("edit", "edit_acc")):
        s, t = m.get(f"eval/student/{key}"), m.get(f"eval/teacher/{key}")
        if s is not None and t:
            m[f"eval/retention/{task}"] = s / t
    if "eval/student/sec_per_image" in m and "eval/teacher/sec_per_image" in m:
        m["eval/speedup"] = m["eval/teacher/sec_per_image"] / max(m["eval/student/sec_per_image"], 1e-9)
    atomic_write_json(out_dir / "results.json", results)
    return results


def default_models(spec: ExperimentSpec) -> dict[str, ModelUnderTest]:
    """student: `student_nfe` steps, no CFG; teacher: `teacher_nfe` steps with `teacher_cfg`
    (2 x teacher_nfe network evaluations); teacher_fast: the teacher at the student's budget of
    network evaluations, `student_nfe` steps without CFG (CFG would halve the steps)."""
    e = spec.eval
    return {
        "student": ModelUnderTest("student", e.student_nfe, 1.0),
        "teacher": ModelUnderTest("teacher", e.teacher_nfe, e.teacher_cfg),
        "teacher_fast": ModelUnderTest("teacher_fast", e.student_nfe, 1.0),
    }
