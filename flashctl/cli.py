"""The `flashctl` command line: parse, load the spec, hand over.

Thin on purpose: heavy modules (torch, diffusers, deepspeed, mlflow) are imported inside the
commands, never at module import, so `flashctl --help` starts in well under a second.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import typer

from flashctl.errors import UserError
from flashctl.spec import SpecError
from flashctl.term import emit, human_console, show

app = typer.Typer(
    name="flashctl",
    help=(
        "Few-step distillation experiments for Qwen-Image text-to-image + editing models.\n\n"
        "Typical session:\n\n"
        "  flashctl validate experiments/tiny-cpu.yaml\n\n"
        "  flashctl prepare-data experiments/tiny-cpu.yaml\n\n"
        "  flashctl distill experiments/tiny-cpu.yaml distill.steps=100\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor task-mixture\n\n"
        "  flashctl report"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
# People read `console` (stderr) and `out` (stdout tables); programs read what `emit` writes.
console = human_console(stderr=True)
out = human_console()

SPEC_ARGS_HELP = (
    "Spec file (YAML) followed by dotted overrides `key=value`; without a spec file the embedded "
    "default (experiments/tiny-cpu.yaml) is used."
)


def friendly(fn: Callable) -> Callable:
    """Turn user errors into one red line and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecError as exc:
            for loc, msg in exc.errors:
                console.print(f"[red]error[/red] {exc.source}: {loc}: {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except UserError as exc:
            console.print(f"[red]error[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def split_spec_args(args: Optional[list[str]]) -> tuple[Optional[str], list[str]]:
    """`[spec.yaml] [k=v ...]` -> (spec path or None for the default, overrides)."""
    args = list(args or [])
    spec = None
    if args and "=" not in args[0]:
        spec = args.pop(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise UserError(f"override {bad[0]!r} is not key=value (only the first argument may be a spec file)")
    return spec, args


def load(args: Optional[list[str]], extra: Optional[list[str]] = None):
    from flashctl.spec import load_spec

    spec_path, overrides = split_spec_args(args)
    return load_spec(spec_path, overrides + list(extra or []))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  flashctl validate experiments/tiny-cpu.yaml\n\n"
        "  flashctl validate experiments/qwen-image-flash.yaml distill.steps=2000 --print-config"
    )
)
@friendly
def validate(
    args: Optional[list[str]] = typer.Argument(None, help=SPEC_ARGS_HELP, metavar="[SPEC] [KEY=VALUE]..."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved spec as YAML."),
) -> None:
    """Check a spec: report [bold]every[/bold] error at once with its field path (and YAML line); exit 2 on errors."""
    from flashctl.spec import spec_hash, to_yaml

    spec = load(args)
    if print_config:
        emit(to_yaml(spec))
    else:
        console.print(f"[green]ok[/green] spec hash {spec_hash(spec)}", highlight=False)


@app.command(epilog="Example:\n\n  flashctl schema --out flashctl.schema.json")
@friendly
def schema(
    out_path: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Write the JSON Schema of experiment specs (for editor completion, e.g. yaml-language-server)."""
    from flashctl.io import atomic_write_text
    from flashctl.spec import json_schema

    text = json.dumps(json_schema(), indent=2)
    if out_path:
        atomic_write_text(out_path, text + "\n")
        console.print(f"wrote {out_path}")
    else:
        emit(text)


@app.command(
    "prepare-data",
    epilog=(
        "Examples:\n\n"
        "  flashctl prepare-data experiments/tiny-cpu.yaml\n\n"
        "  flashctl prepare-data --source shapes --n 10000 --out data/shapes-10k --workers 2\n\n"
        "  flashctl prepare-data --source jsonl --manifest my/prompts.jsonl --out data/mine --strict\n\n"
        "  flashctl prepare-data experiments/qwen-image-flash.yaml --cache-embeddings"
    ),
)
@friendly
def prepare_data_cmd(
    args: Optional[list[str]] = typer.Argument(None, help=SPEC_ARGS_HELP, metavar="[SPEC] [KEY=VALUE]..."),
    source: Optional[str] = typer.Option(None, help="shapes | jsonl (default: data.source)."),
    manifest: Optional[list[Path]] = typer.Option(None, "--manifest", "-m", help="JSONL manifest (repeatable)."),
    n: Optional[int] = typer.Option(None, help="Shapes records to generate (default: data.n)."),
    seed: Optional[int] = typer.Option(None, help="Shapes seed (default: data.seed)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: data.root)."),
    workers: int = typer.Option(1, min=1, help="Worker processes."),
    strict: bool = typer.Option(False, help="Fail on the first bad row instead of rejecting it."),
    overwrite: bool = typer.Option(False, help="Replace an existing dataset in the output directory."),
    cache_embeddings: bool = typer.Option(
        False, "--cache-embeddings",
        help="Also store each row's text embeddings and VAE latents, encoded with the spec's base teacher "
             "(distill then trains with no text encoder or VAE loaded)."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1,
        help="With --cache-embeddings: encode on N ranks of this machine (torchrun, launch.device); same files."),
) -> None:
    """Shard prompt/edit data into Arrow files + manifest.json (counts, sha256, digest); bad rows go to rejects.jsonl."""
    extra = []
    if source is not None:
        extra.append(f"data.source={source}")
    if manifest:
        extra.append("data.manifests=" + json.dumps([str(m) for m in manifest]))
        if source is None:
            extra.append("data.source=jsonl")
    if n is not None:
        extra.append(f"data.n={n}")
    if seed is not None:
        extra.append(f"data.seed={seed}")
    spec = load(args, extra)
    target = out_dir or spec.data.root
    if nproc is not None:
        _prepare_on_ranks(spec, Path(target), nproc, cache_embeddings, workers, strict, overwrite)
        return
    from flashctl.data.prepare import prepare_data

    encoder = None
    if cache_embeddings:
        from flashctl.data.conditioning import ConditioningEncoder

        encoder = ConditioningEncoder.from_spec(spec)
    result = prepare_data(spec.data, target, workers=workers, strict=strict, overwrite=overwrite,
                          conditioning=encoder)
    console.print(
        f"[green]ok[/green] {result.rows} rows in {result.shards} shards, {result.rejects} rejected, "
        f"digest {result.digest[:16]} -> {result.manifest}",
        highlight=False,
    )


@app.command(
    "train-teacher",
    epilog=(
        "Examples:\n\n"
        "  flashctl train-teacher experiments/teacher-base.yaml\n\n"
        "  flashctl train-teacher experiments/teacher-edit.yaml train_teacher.steps=500"
    ),
)
@friendly
def train_teacher_cmd(
    args: Optional[list[str]] = typer.Argument(None, help=SPEC_ARGS_HELP, metavar="[SPEC] [KEY=VALUE]..."),
    fresh: bool = typer.Option(False, help="Ignore existing checkpoints and start over."),
) -> None:
    """Flow-matching (SFT) training of a teacher on prepared shards; resumes from its checkpoints."""
    spec = load(args)
    from flashctl.teacher import train_teacher

    summary = train_teacher(spec, console=console, resume=not fresh)
    console.print(
        f"[green]ok[/green] teacher -> {summary['output']} (loss {summary['loss_first50']:.4f} -> "
        f"{summary['loss_last50']:.4f}, {summary['seconds']:.0f}s)",
        highlight=False,
    )


@app.command(
    epilog=(
        "Examples:\n\n"
        "  flashctl evaluate builtin:base --nfe 40 --cfg 4\n\n"
        "  flashctl evaluate runs/tiny-cpu/student --nfe 4\n\n"
        "  flashctl evaluate experiments/tiny-cpu.yaml --nfe 4   # the spec's base teacher"
    ),
)
@friendly
def evaluate(
    model: str = typer.Argument(..., help="Pipeline folder, builtin:NAME, or a spec (its base teacher)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides of the spec.", metavar="[KEY=VALUE]..."),
    nfe: int = typer.Option(4, "--nfe", "--steps", min=1, help="Sampling steps (= NFE without CFG; CFG doubles it)."),
    cfg: float = typer.Option(1.0, min=1.0, help="CFG scale (1 = off; >1 doubles the NFE)."),
    spec_path: Optional[Path] = typer.Option(None, "--spec", help="Spec giving the eval set (default: embedded)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: runs/eval/<name>-nfe<N>)."),
    track: bool = typer.Option(False, help="Log the result to MLflow (tracking section of the spec)."),
    nproc: Optional[int] = typer.Option(
        None, "--nproc", min=1,
        help="Sample on N ranks of this machine (torchrun, launch.device: gloo on CPU, NCCL on CUDA); same results."),
) -> None:
    """Sample the seeded eval set, verify every image, print accuracy per category / edit type and s/image."""
    from flashctl.spec import load_spec

    as_spec = model.endswith((".yaml", ".yml"))
    spec = load_spec(model if as_spec else spec_path, list(overrides or []))
    path = spec.teachers[spec.guidance.base].path if as_spec else model
    if nproc is None:
        from flashctl.evaluate import evaluate_one

        results, folder = evaluate_one(spec, path, nfe, cfg, out_dir, track, console)
    else:
        from flashctl.evaluate import eval_out_dir

        folder = out_dir or eval_out_dir(path, nfe, cfg)
        _on_ranks(spec, nproc, ["evaluate", path, "--nfe", str(nfe), "--cfg", str(cfg), "--out", str(folder),
                                *(["--track"] if track else [])])
        results = json.loads((folder / "results.json").read_text())
    show(out, _accuracy_table(path, results, folder))


def _on_ranks(spec, nproc: int, command: list[str]) -> None:
    """`python -m flashctl.launch.ranks COMMAND[0] SPEC_FILE COMMAND[1:]` on `nproc` ranks of this
    machine, the resolved spec in a temporary SPEC_FILE; a failed rank is one line here."""
    import shutil
    import tempfile

    from flashctl.launch.local import run_ranks
    from flashctl.launch.ranks import ERROR_FILE
    from flashctl.spec import to_yaml

    tmp = Path(tempfile.mkdtemp(prefix="flashctl-ranks-"))
    try:
        (tmp / "spec.yaml").write_text(to_yaml(spec))
        rc = run_ranks(spec, nproc, "flashctl.launch.ranks", [command[0], str(tmp / "spec.yaml"), *command[1:]])
        error = (tmp / ERROR_FILE).read_text() if (tmp / ERROR_FILE).exists() else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if rc != 0:
        raise UserError(error or f"{command[0]} --nproc {nproc}: a rank failed (exit {rc}); see the ranks' output above")


def _prepare_on_ranks(spec, target: Path, nproc: int, cache_embeddings: bool, workers: int, strict: bool,
                      overwrite: bool) -> None:
    """`prepare-data --cache-embeddings --nproc N`: rank 0 builds the shards, every rank encodes
    a share of the sidecars, rank 0 publishes; the line printed is the one-process run's."""
    from flashctl.data.manifest import MANIFEST_NAME, read_manifest

    if not cache_embeddings:
        raise UserError("--nproc: only with --cache-embeddings (the ranks share the encoding)")
    if (target / MANIFEST_NAME).exists() and not overwrite:  # before N ranks load a text encoder
        raise UserError(f"{target}: already holds a prepared dataset ({MANIFEST_NAME}); pass --overwrite to replace it")
    _on_ranks(spec, nproc, ["prepare-data", "--out", str(target), "--workers", str(workers),
                            *(["--strict"] if strict else []), *(["--overwrite"] if overwrite else [])])
    m = read_manifest(target, verify=False)
    console.print(f"[green]ok[/green] {m.rows} rows in {len(m.shards)} shards, {m.rejects} rejected, "
                  f"digest {m.digest[:16]} -> {target / MANIFEST_NAME}", highlight=False)


def _accuracy_table(model: str, results: dict, folder: Path):
    """`flashctl evaluate`'s table: verifier accuracy per task, T2I category and edit type, the
    diversity of open attributes beside i.i.d. draws from the data, and the time per image."""
    from rich.table import Table

    from flashctl.stats import wilson

    s = results["models"]["model"]
    table = Table(title=f"{model} @ {s['steps']} steps, CFG {s['cfg']:g} ({s['nfe']} NFE): "
                        f"verifier accuracy ({results['rows']} eval rows)")
    table.add_column("group")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("95% interval", justify="right")
    for label, groups in (("[bold]{}", s["by_task"]), ("t2i / {}", s["by_category_t2i"]),
                          ("edit / {}", s["by_edit_type"])):
        for key, v in groups.items():
            ci = wilson(round(v["accuracy"] * v["n"]), v["n"])
            table.add_row(label.format(key), str(v["n"]), f"{v['accuracy']:.3f}", f"{ci.low:.3f}-{ci.high:.3f}")
    div = s.get("diversity", {})
    for kind in ("cell", "colour", "background"):  # shapes.diversity.KINDS
        if kind in div:  # normalised entropy of the open attribute, beside i.i.d. draws from the data
            d = div[kind]
            table.add_row(f"diversity / {kind} (H, i.i.d. H)", str(d["prompts"]),
                          f"{d['entropy']:.3f} ({d['entropy_ref']:.3f})", "")
    table.caption = (f"{s['sec_per_image'] * 1000:.1f} ms per image end to end "
                     f"({s['denoise_sec_per_image'] * 1000:.1f} ms denoising); images and results.json in {folder}")
    return table


@app.command(
    epilog=(
        "Examples:\n\n"
        "  flashctl distill                                   # the embedded default (tiny CPU run)\n\n"
        "  flashctl distill experiments/tiny-cpu.yaml distill.steps=50 guidance.policy=single\n\n"
        "  flashctl distill experiments/qwen-image-flash.yaml --dry-run"
    ),
)
@friendly
def distill(
    args: Optional[list[str]] = typer.Argument(None, help=SPEC_ARGS_HELP, metavar="[SPEC] [KEY=VALUE]..."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the launch command and DeepSpeed config; run nothing."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved spec and exit."),
    fresh: bool = typer.Option(False, help="Delete an existing run directory of this run name first."),
    node_rank: Optional[int] = typer.Option(None, help="hostfile backend with --no-ssh: this node's rank."),
    no_ssh: bool = typer.Option(False, "--no-ssh", help="hostfile backend: start only this node's ranks (run on every node)."),
) -> None:
    """DMD2 distillation under DeepSpeed (ZeRO-3): student + critic engines, frozen teacher(s); resumes."""
    from flashctl.spec import to_yaml

    spec = load(args)
    if print_config:
        emit(to_yaml(spec))
        return
    from flashctl.distill.job import check_inputs, describe, launch, prepare_run

    check_inputs(spec)
    prep = prepare_run(spec, fresh=fresh and not dry_run, dry_run=dry_run, node_rank=node_rank, no_ssh=no_ssh)
    if dry_run:
        emit(describe(prep))
        return
    console.print(f"{'resuming' if prep.resuming else 'starting'} {prep.run_dir}", highlight=False)
    launch(spec, prep, console)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor task-mixture\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor teacher-guidance --levels single,stepwise --parallel 2\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor task-mixture --factor teacher-guidance --dry-run\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor task-mixture --seeds 3\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor data-composition   # mixed-category: the 5:5 cell's results, "
        "reused\n\n"
        "  flashctl ablate experiments/tiny-cpu.yaml --factor task-mixture --resume"
    ),
)
@friendly
def ablate(
    args: Optional[list[str]] = typer.Argument(None, help=SPEC_ARGS_HELP, metavar="[SPEC] [KEY=VALUE]..."),
    factor: list[str] = typer.Option(..., "--factor", "-f",
                                     help="data-composition | teacher-guidance | task-mixture (repeat for a grid)."),
    levels: Optional[str] = typer.Option(None, help="Comma-separated levels to run (default: all)."),
    parallel: int = typer.Option(1, min=1, help="Cells run at once (a local mlflow server serves the store)."),
    resume: bool = typer.Option(False, help="Continue an existing grid: skip FINISHED cells, re-run the rest."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and their exact commands; run nothing."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Slurm: submit the array and return; --resume waits later."),
    seeds: int = typer.Option(1, min=1, help="Repeat every cell over N training seeds (report: mean ± spread, "
                                            "paired tests on row and seed)."),
    reuse: bool = typer.Option(True, help="Take a cell's results from another grid's finished cell with the same "
                                          "spec hash, teachers' files and data instead of training it again."),
) -> None:
    """Sweep recipe factors: one MLflow parent run per grid, one child run (a distill job) per cell."""
    from flashctl.ablate import ablate as run_ablate

    spec_path, overrides = split_spec_args(args)
    result = run_ablate(spec_path, overrides, factor, levels.split(",") if levels else None,
                        parallel=parallel, resume=resume, dry_run=dry_run, wait=not no_wait, seeds=seeds,
                        reuse=reuse, console=out if dry_run else console)
    if not dry_run and not result.ok:
        raise typer.Exit(1)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  flashctl report                                   # the latest grid in ./mlflow.db\n\n"
        "  flashctl report --experiment flashctl-tiny --out reports/mixture\n\n"
        "  flashctl report --parent 3f2a... --format csv,md"
    ),
)
@friendly
def report(
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment (default: the latest grid anywhere)."),
    parent: Optional[str] = typer.Option(None, help="Parent run id of the grid."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: reports/<grid id>)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Comma-separated: html,csv,md (default: all)."),
    tracking_uri: Optional[str] = typer.Option(None, help="Tracking URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)."),
) -> None:
    """Tables per factor (best level marked), an HTML report with plots and image grids, CSV/Markdown."""
    from flashctl.report import make_report

    make_report(tracking_uri, experiment, parent, out_dir, fmt, console=out)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  flashctl plan experiments/qwen-image-flash.yaml\n\n"
        "  flashctl plan experiments/qwen-image-flash.yaml launch.nnodes=4 deepspeed.offload_optimizer=cpu"
    ),
)
@friendly
def plan(
    args: Optional[list[str]] = typer.Argument(None, help=SPEC_ARGS_HELP, metavar="[SPEC] [KEY=VALUE]..."),
) -> None:
    """Per-GPU memory under ZeRO (student, critic, teachers), activations, NFE per step, and whether it fits."""
    spec = load(args)
    from flashctl.plan import plan as make_plan
    from flashctl.plan import render_plan

    for table in render_plan(make_plan(spec)):
        show(out, table)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
