"""Speed-up of the student over the teacher as `flashctl distill`'s evaluation measures it.

One process, the embedded default's eval set (experiments/tiny-cpu.yaml `eval`: 48 T2I + 48
edit rows) and its budgets: student @ `eval.student_nfe` steps without CFG vs teacher @
`eval.teacher_nfe` steps with CFG `eval.teacher_cfg`. Rows:

* interleaved -- `flashctl.evaluate.evaluate_models` as the worker runs it (batch by batch,
  the two models in turn, after a warm-up, median of `--repeats`): end-to-end and
  denoising-only seconds per image, both speed-ups and the NFE ratio beside them.
* phases (before) -- the previous way, for reference in the same run: every batch of the
  student through `adapter.sample`, then every batch of the teacher (no warm-up, negatives and
  prompts encoded per batch, each model timed in its own phase).

The student's weights do not change its cost (same architecture): `--student` takes an exported
student pipeline folder, default the shipped base teacher's transformer at the student budget.

    .venv/bin/python bench/eval_speedup.py [--student runs/tiny-cpu/student] [--repeats 3] [--threads 2]

Writes bench/results/eval_speedup.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "eval_speedup.json"


def phases(adapter, models, rows, seed: int) -> dict[str, float]:
    """Seconds per image of each model timed the old way: one phase per model, adapter.sample."""
    from flashctl.evaluate import _groups
    from flashctl.shapes.render import from_png

    out = {}
    for name, (transformer, mut) in models.items():
        total = 0.0
        for i, chunk in enumerate(_groups(rows, 16)):
            task, w, h = chunk[0]["task"], chunk[0]["width"], chunk[0]["height"]
            sources = [from_png(r["source_image"]) for r in chunk] if task == "edit" else None
            t = time.perf_counter()
            adapter.sample(transformer, [r["prompt"] for r in chunk], h, w, mut.steps, cfg_scale=mut.cfg,
                           seed=seed + i, source_images=sources, scheduler=mut.scheduler)
            total += time.perf_counter() - t
        out[name] = total / len(rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default=None, help="student pipeline folder (default: teacher weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per (batch, model); median kept")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-phases", action="store_true", help="skip the old phase-by-phase timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    from flashctl.evaluate import ModelUnderTest, default_models, eval_rows, evaluate_models
    from flashctl.io import atomic_write_json
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.pipelines import resolve_model_path
    from flashctl.spec import load_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = load_spec(REPO / "experiments" / "tiny-cpu.yaml")
    adapter = QwenImageAdapter.from_pretrained(resolve_model_path(spec.teachers[spec.guidance.base].path),
                                               edit_max_pixels=spec.model.edit_max_pixels)
    student = adapter.transformer
    budgets = default_models(spec)
    student_mut = budgets["student"]
    if args.student:
        from diffusers import QwenImageTransformer2DModel

        student = QwenImageTransformer2DModel.from_pretrained(args.student, subfolder="transformer").eval()
        from diffusers import FlowMatchEulerDiscreteScheduler

        student_mut = ModelUnderTest("student", student_mut.steps, student_mut.cfg,
                                     FlowMatchEulerDiscreteScheduler.from_pretrained(args.student, subfolder="scheduler"))
    models = {"student": (student, student_mut), "teacher": (adapter.transformer, budgets["teacher"])}
    rows = eval_rows(spec)
    console = Console(stderr=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    console.print(f"interleaved: {len(rows)} rows, student @ {student_mut.nfe} NFE vs teacher @ "
                  f"{budgets['teacher'].nfe} NFE, {args.repeats} repeat(s) ...")
    with tempfile.TemporaryDirectory() as tmp:
        res = evaluate_models(adapter, models, rows, Path(tmp), spec.eval.seed, repeats=args.repeats)
    m = res["metrics"]
    before = None
    if not args.no_phases:
        console.print("phases (before): student, then teacher, adapter.sample ...")
        before = phases(adapter, models, rows, spec.eval.seed)
    report = {
        "rows": len(rows), "repeats": args.repeats, "threads": torch.get_num_threads(),
        "student": args.student or "teacher weights at the student budget",
        "metrics": {k: v for k, v in m.items() if "sec_per_image" in k or "speedup" in k or "nfe" in k},
        "phases_sec_per_image": before,
        "phases_speedup": None if before is None else before["teacher"] / before["student"],
        "total_s": time.perf_counter() - t0,
        "load_avg_1m": [load0, os.getloadavg()[0]],
    }
    atomic_write_json(args.out, report)

    table = Table(title=f"student @ {student_mut.nfe} NFE vs teacher @ {budgets['teacher'].nfe} NFE "
                        f"({budgets['teacher'].steps} steps + CFG), {len(rows)} eval rows, interleaved, "
                        f"median of {args.repeats}")
    for col in ("", "student s/img", "teacher s/img", "speed-up", "NFE ratio", "speed-up / NFE ratio"):
        table.add_column(col, justify="right" if col else "left")
    nfe = m["eval/nfe_ratio"]
    for label, key, sp in (("end to end", "sec_per_image", m["eval/speedup"]),
                           ("denoising only", "denoise_sec_per_image", m["eval/speedup_denoise"])):
        table.add_row(label, f"{m[f'eval/student/{key}']:.4f}", f"{m[f'eval/teacher/{key}']:.4f}", f"x{sp:.1f}",
                      f"x{nfe:.0f}", f"{sp / nfe:.2f}")
    if before is not None:
        table.add_row("end to end, phases (before)", f"{before['student']:.4f}", f"{before['teacher']:.4f}",
                      f"x{report['phases_speedup']:.1f}", f"x{nfe:.0f}", f"{report['phases_speedup'] / nfe:.2f}")
    out = Console()
    if not out.is_terminal:
        out.width = 140
    out.print(table)
    out.print(f"total {report['total_s']:.0f}s, load {load0:.1f} -> {os.getloadavg()[0]:.1f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
