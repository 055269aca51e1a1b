"""`flashctl evaluate`: one model on the spec's seeded eval set, printed as tables."""

from __future__ import annotations

from pathlib import Path

from flashctl.spec import ExperimentSpec


def run_evaluate(spec: ExperimentSpec, model: str, nfe: int, cfg: float, out_dir: Path | None,
                 track: bool, console):
    """Evaluate `model` (pipeline folder / builtin:NAME / hub id); returns a rich Table."""
    from rich.table import Table

    from flashctl.evaluate import ModelUnderTest, eval_rows, evaluate_models
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.models.paths import resolve_model_path

    path = resolve_model_path(model)
    name = Path(path).name if Path(path).exists() else model.replace("/", "_")
    out_dir = out_dir or Path("runs") / "eval" / f"{name}-steps{nfe}-cfg{cfg:g}"
    adapter = QwenImageAdapter.from_pretrained(path, edit_max_pixels=spec.model.edit_max_pixels)
    rows = eval_rows(spec)
    mut = ModelUnderTest("model", nfe, cfg)
    from flashctl.progress import StepProgress

    with StepProgress(f"sampling {name} @ {nfe} NFE", len(rows), console, unit="rows") as prog:
        res = evaluate_models(adapter, {"model": (adapter.transformer, mut)},
                              rows, out_dir, spec.eval.seed,
                              progress=lambda _n, done, total: prog.update(done),
                              diversity_seeds=spec.eval.diversity_seeds)
    summary = res["models"]["model"]
    table = Table(title=f"{model} @ {nfe} steps, CFG {cfg:g} ({mut.nfe} NFE): verifier accuracy ({len(rows)} eval rows)")
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    for task, v in summary["by_task"].items():
        table.add_row(f"[bold]{task}", str(v["n"]), f"{v['accuracy']:.3f}")
    for cat, v in summary["by_category_t2i"].items():
        table.add_row(f"t2i / {cat}", str(v["n"]), f"{v['accuracy']:.3f}")
    for et, v in summary["by_edit_type"].items():
        table.add_row(f"edit / {et}", str(v["n"]), f"{v['accuracy']:.3f}")
    div = summary.get("diversity", {})
    for kind in ("cell", "colour", "background"):  # shapes.diversity.KINDS
        if kind in div:  # normalised entropy of the open attribute, beside i.i.d. draws from the data
            d = div[kind]
            table.add_row(f"diversity / {kind} (H, i.i.d. H)", str(d["prompts"]),
                          f"{d['entropy']:.3f} ({d['entropy_ref']:.3f})")
    table.caption = (f"{summary['sec_per_image'] * 1000:.1f} ms per image end to end "
                     f"({summary['denoise_sec_per_image'] * 1000:.1f} ms denoising); images and results.json in {out_dir}")
    if track and spec.tracking.enabled:
        from flashctl.track import KIND_EVALUATE, TAG_KIND, Tracker, eval_metric

        tracker = Tracker(spec.tracking, out_dir, f"evaluate-{name}", tags={TAG_KIND: KIND_EVALUATE})
        tracker.start()
        tracker.log_params_once({"model": model, "nfe": nfe, "cfg": cfg})
        # one model per run: `eval/model/t2i_acc` is logged as the run's own `eval/t2i_acc`
        prefix = eval_metric("model", "")
        tracker.log_metrics({eval_metric(None, k[len(prefix):]) if k.startswith(prefix) else k: v
                             for k, v in res["metrics"].items()}, 0)
        tracker.log_artifact(out_dir / "results.json")
        tracker.finish()
    return table
