"""Evaluation: sample a fixed, seeded eval set at a given NFE, verify every image, time it.

The eval set comes from the shapes world (`shapes.eval_set`), so the same rows and the same
noise seeds are used for every model and every ablation level: images can be put side by side
and accuracies compared. Accuracy is the shapes verifier's (all claims of a prompt or an
instruction hold), per category for T2I and per edit type for editing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flashctl.io import atomic_write_json
from flashctl.spec import ExperimentSpec
from flashctl.track import EVAL_NFE_RATIO, EVAL_SPEEDUP, EVAL_SPEEDUP_DENOISE, eval_metric


@dataclass
class ModelUnderTest:
    """One configuration to evaluate: a name, sampling steps, CFG scale and its scheduler."""

    name: str
    steps: int
    cfg: float
    scheduler: Any = None
    """Scheduler whose config sets the sampling schedule; None: the adapter's (the pipeline the
    adapter was loaded from, e.g. the teacher's). A student gets its own training grid."""

    @property
    def nfe(self) -> int:
        """Network evaluations per image: CFG runs the network twice per step."""
        return self.steps * (2 if self.cfg > 1 else 1)


def eval_rows(spec: ExperimentSpec) -> list[dict[str, Any]]:
    """The seeded eval set of the spec (balanced over categories / edit types)."""
    from flashctl.shapes import eval_set

    sizes = {k: tuple(v) for k, v in spec.data.sizes.items()}
    return eval_set(spec.eval.seed, spec.eval.n_t2i, spec.eval.n_edit, sizes=sizes,
                    open_attributes=spec.data.open_attributes, ref_edits=spec.data.ref_edits)


class EvalStopped(Exception):
    """A stop signal arrived during the evaluation: sampling stopped between two batches and
    no results were written (re-running evaluates again)."""


EVAL_BATCH = 16
"""Rows per eval batch (one image size per batch); a batch's noise comes from its seed."""

DIVERSITY_SEED_OFFSET = 1_000_003
"""Noise seeds of the diversity samples start here above `eval.seed`, clear of the seeds of the
accuracy batches (`seed + batch index`), so the K extra images are other draws than those."""


def rank_batches(sizes: list[int], rank: int, world: int) -> list[int | None]:
    """This rank's share of the eval batches (`sizes`: rows per batch, in global order): global
    batch indices, ascending, padded with None so that every rank runs the same number of
    batches. Batches are dealt largest first to the rank with the fewest rows so far (ties:
    fewer batches, then lower rank), which balances rows, i.e. sampling compute, per rank.

    Why padded: a forward pass of a ZeRO-3 partitioned model is a collective (every rank
    gathers each layer), so all ranks must run the same forwards in the same order; a padding
    batch runs the models on one row and its images are thrown away. The global index keeps
    fixing a batch's noise seed, so the images do not depend on the number of ranks."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world}")
    rows, count = [0] * world, [0] * world
    mine: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (rows[r], count[r], r))
        rows[r] += sizes[i]
        count[r] += 1
        mine[r].append(i)
    own: list[int | None] = sorted(mine[rank])
    return own + [None] * (max(count) - len(own))


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


@dataclass
class BatchTiming:
    """Wall-clock seconds of one sampled batch: end to end (prompt + source encoding, noise,
    denoising loop, VAE decode, PIL conversion) and the denoising loop alone (network
    evaluations + scheduler steps)."""

    seconds: float
    denoise_seconds: float


class PromptCache:
    """Prompt encodings that do not change between batches: the CFG negative of T2I ("" with no
    source image) is encoded once per adapter, not once per batch (design §5)."""

    def __init__(self) -> None:
        self._negatives: dict[tuple[int, str], tuple[Any, Any]] = {}

    def negative(self, adapter, text: str, batch: int):
        """(embeds, mask) of `text` repeated `batch` times, encoded once."""
        key = (id(adapter), text)
        if key not in self._negatives:
            self._negatives[key] = adapter.encode_prompts([text])
        e, m = self._negatives[key]
        return e.expand(batch, *e.shape[1:]), m.expand(batch, *m.shape[1:])


def encode_unique(adapter, prompts: list[str], sources: list[Any] | None = None,
                  keys: list[Any] | None = None):
    """`adapter.encode_prompts` with identical (prompt, source) pairs encoded once per batch.

    `keys`: one hashable per row standing for its source image (e.g. the row's PNG bytes);
    rows with equal prompt and key share one encoding. Returns (embeds, mask) for all rows."""
    import torch

    slot: dict[Any, int] = {}  # (prompt, key) -> position among the unique rows
    firsts: list[int] = []  # the first row of each unique (prompt, key)
    index: list[int] = []
    for i, k in enumerate(zip(prompts, keys if keys is not None else [None] * len(prompts))):
        if k not in slot:
            slot[k] = len(firsts)
            firsts.append(i)
        index.append(slot[k])
    if len(firsts) == len(prompts):
        return adapter.encode_prompts(prompts, sources)
    e, m = adapter.encode_prompts([prompts[i] for i in firsts], [sources[i] for i in firsts] if sources else None)
    at = torch.tensor(index)
    return e[at], m[at]


def sample_batch(adapter, transformer, prompts: list[str], height: int, width: int, steps: int,
                 cfg_scale: float = 1.0, seed: int = 0, source_images: list[Any] | None = None,
                 cfg_rescale: float = 0.0, scheduler: Any = None, source_keys: list[Any] | None = None,
                 cache: PromptCache | None = None):
    """`adapter.sample` (same schedule, noise, Euler loop and decode: the same images) with its
    time split into end to end and denoising only, and without flashctl's own repeated work:
    identical prompts of a batch are encoded once, and the T2I CFG negative once per `cache`.

    Returns (PIL images, BatchTiming). The split is what makes a speed-up honest: the
    denoising ratio is the one to hold against the NFE ratio, the end-to-end one is what a user
    waits for (it includes the fixed per-batch costs of encoding and decoding)."""
    import torch


    with torch.no_grad():
        t0 = time.perf_counter()
        adapter._check_size(height, width)
        b = len(prompts)
        embeds, mask = encode_unique(adapter, prompts, source_images, source_keys)
        do_cfg = cfg_scale > 1
        if do_cfg:
            if source_images is None:
                n_embeds, n_mask = (cache or PromptCache()).negative(adapter, "", b)
            else:  # an edit's negative carries its source image: one per distinct source
                keys = source_keys if source_keys is not None else list(range(b))
                n_embeds, n_mask = encode_unique(adapter, [""] * b, source_images, keys)
        src, src_size = (None, None)
        if source_images is not None:
            src, src_size = adapter.encode_sources(list(source_images))
        t1 = time.perf_counter()
        latents = adapter.denoise(transformer, embeds, mask, (n_embeds, n_mask) if do_cfg else None, height, width,
                                  steps, seed, cfg_scale, cfg_rescale, src, src_size, scheduler)
        t2 = time.perf_counter()
        images = adapter.decode_latents(latents, height, width)
        t3 = time.perf_counter()
    return images, BatchTiming(seconds=t3 - t0, denoise_seconds=t2 - t1)


def _batch_inputs(chunk: list[dict[str, Any]]):
    """(task, width, height, prompts, source images, source keys) of one eval batch; sources
    are decoded from PNG here, outside any timing (the eval set stores them as PNG bytes)."""
    from flashctl.shapes.render import from_png

    task, w, h = chunk[0]["task"], chunk[0]["width"], chunk[0]["height"]
    sources = keys = None
    if task == "edit":
        sources = [from_png(r["source_image"]) for r in chunk]
        keys = [r["source_image"] for r in chunk]
    return task, w, h, [r["prompt"] for r in chunk], sources, keys


def sample_rows(adapter, transformer, rows: list[dict[str, Any]], nfe: int, cfg: float, seed: int,
                batch: int = 16, cfg_rescale: float = 0.0, on_batch: Callable[[int], None] | None = None,
                scheduler: Any = None):
    """Generate one image per row; returns ({row id: PIL image}, seconds spent sampling).
    `scheduler`: the model's own schedule (default: the adapter's)."""
    images: dict[str, Any] = {}
    seconds = 0.0
    cache = PromptCache()
    for i, chunk in enumerate(_groups(rows, batch)):
        _, w, h, prompts, sources, keys = _batch_inputs(chunk)
        out, timing = sample_batch(adapter, transformer, prompts, h, w, nfe, cfg, seed + i, sources, cfg_rescale,
                                   scheduler, keys, cache)
        seconds += timing.seconds
        images.update({r["id"]: im for r, im in zip(chunk, out)})
        if on_batch:
            on_batch(len(chunk))
    return images, seconds


def sample_interleaved(adapter, models: dict[str, tuple[Any, "ModelUnderTest"]], rows: list[dict[str, Any]],
                       seed: int, batch: int = EVAL_BATCH, repeats: int = 1,
                       on_batch: Callable[[str, int], None] | None = None, rank: int = 0, world: int = 1,
                       should_stop: Callable[[], bool] | None = None) -> dict[str, dict[str, Any]]:
    """Sample `rows` with every model, timing them interleaved: batch by batch, each model in
    turn (the order rotating from batch to batch), after one untimed warm-up batch per model.

    Timing models in separate phases lets machine load decide a speed-up (the tiny demo moved
    from 8.5x to 2.7x that way); interleaved, every pair of batches sees the same load and the
    same warm state. With `repeats` > 1 each (batch, model) is sampled that many times and the
    median time kept (images from the first). Returns {name: {"images", "seconds",
    "denoise_seconds", "batches": [(seconds, denoise_seconds), ...], "batch_index": [global
    batch index, ...]}} (seconds summed over batches).

    Data-parallel with `world` > 1: this rank samples its batches (`rank_batches`, padded so
    every rank runs the same forwards) and returns its rows only. `should_stop` (a collective
    in a distributed job: called once per batch on every rank) is asked after each batch; when
    it says so, `EvalStopped` is raised."""
    import statistics

    chunks = _groups(rows, batch)
    names = list(models)
    out = {n: {"images": {}, "seconds": 0.0, "denoise_seconds": 0.0, "batches": [], "batch_index": []}
           for n in names}
    cache = PromptCache()
    plan = rank_batches([len(c) for c in chunks], rank, world)
    # a padding batch: one row of the smallest batch (it only has to run the same forwards)
    pad = [chunks[min(range(len(chunks)), key=lambda c: len(chunks[c]))][0]] if chunks else []
    if plan:  # warm-up: every code path of every model once (allocator, first-call costs)
        _, w, h, prompts, sources, keys = _batch_inputs(chunks[plan[0]] if plan[0] is not None else pad)
        for n in names:
            transformer, mut = models[n]
            sample_batch(adapter, transformer, prompts, h, w, 1, mut.cfg, seed, sources, 0.0, mut.scheduler, keys,
                         cache)
    for j, i in enumerate(plan):
        chunk = chunks[i] if i is not None else pad
        _, w, h, prompts, sources, keys = _batch_inputs(chunk)
        k = j % len(names)  # the order rotates with the local position: the same on every rank
        for n in names[k:] + names[:k]:
            transformer, mut = models[n]
            timings = []
            for r in range(max(1, repeats)):
                imgs, t = sample_batch(adapter, transformer, prompts, h, w, mut.steps, mut.cfg,
                                       seed + (i if i is not None else 0), sources, 0.0, mut.scheduler, keys, cache)
                if r == 0 and i is not None:
                    out[n]["images"].update({row["id"]: im for row, im in zip(chunk, imgs)})
                timings.append(t)
            if i is None:
                continue
            sec = statistics.median(t.seconds for t in timings)
            den = statistics.median(t.denoise_seconds for t in timings)
            out[n]["seconds"] += sec
            out[n]["denoise_seconds"] += den
            out[n]["batches"].append((sec, den))
            out[n]["batch_index"].append(i)
            if on_batch:
                on_batch(n, len(chunk))
        if should_stop is not None and should_stop():
            raise EvalStopped(f"stopped after {j + 1} of {len(plan)} eval batches")
    return out


def score_images(rows: list[dict[str, Any]], images: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Verifier results per row and their aggregate."""
    from flashctl.shapes import score, verify_record

    results = [{**verify_record(r, images[r["id"]]), "prompt": r["prompt"]} for r in rows]
    return score(results), results


def flat_metrics(name: str, summary: dict[str, Any], nfe: int, sec_per_image: float,
                 denoise_sec_per_image: float | None = None) -> dict[str, float]:
    """MLflow metric names of one model's evaluation (the contract `report` reads).

    `sec_per_image` is end to end (encode + denoise + decode); `denoise_sec_per_image` the
    denoising loop alone."""
    m: dict[str, float] = {eval_metric(name, "nfe"): float(nfe), eval_metric(name, "sec_per_image"): sec_per_image}
    if denoise_sec_per_image is not None:
        m[eval_metric(name, "denoise_sec_per_image")] = denoise_sec_per_image
    by_task = summary.get("by_task", {})
    for task, key in (("t2i", "t2i_acc"), ("edit", "edit_acc")):
        if task in by_task:
            m[eval_metric(name, key)] = by_task[task]["accuracy"]
    for cat, v in summary.get("by_category_t2i", {}).items():
        m[eval_metric(name, "t2i", cat)] = v["accuracy"]
    for et, v in summary.get("by_edit_type", {}).items():
        if et:
            m[eval_metric(name, "edit", et)] = v["accuracy"]
    return m


def speedup_metrics(m: dict[str, float], fast: str = "student", slow: str = "teacher") -> dict[str, float]:
    """Speed-up of `fast` over `slow` from their flat metrics, each beside the NFE ratio.

    eval/speedup           end to end (what a user waits for, per image)
    eval/speedup_denoise   the denoising loops alone
    eval/nfe_ratio         network evaluations of `slow` / `fast` per image
    The denoising speed-up should be close to the NFE ratio (same network, same batch); the
    end-to-end one is lower by the fixed per-image costs (encoding, decoding) both pay."""
    out: dict[str, float] = {}
    sec, den, nfe = ((m.get(eval_metric(fast, key)), m.get(eval_metric(slow, key)))
                     for key in ("sec_per_image", "denoise_sec_per_image", "nfe"))
    if None not in sec:
        out[EVAL_SPEEDUP] = sec[1] / max(sec[0], 1e-9)
    if None not in den:
        out[EVAL_SPEEDUP_DENOISE] = den[1] / max(den[0], 1e-9)
    if None not in nfe and nfe[0]:
        out[EVAL_NFE_RATIO] = nfe[1] / nfe[0]
    return out


def evaluate_models(
    adapter,
    models: dict[str, tuple[Any, ModelUnderTest]],
    rows: list[dict[str, Any]],
    out_dir: Path,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
    repeats: int = 1,
    *,
    rank: int = 0,
    world: int = 1,
    should_stop: Callable[[], bool] | None = None,
    diversity_seeds: int = 0,
    gather: Callable[[Any], list[Any]] | None = None,
    cached: dict[str, Path] | None = None,
) -> dict[str, Any] | None:
    """Evaluate each (transformer, config) on `rows`; writes images + results.json in `out_dir`.

    The models are sampled interleaved, batch by batch (`sample_interleaved`), so their timings
    share the machine's state. Returns {"models": {name: {...summary, nfe, cfg, sec_per_image,
    denoise_sec_per_image}}, "metrics": {...}} including teacher-relative retention and the
    speed-ups (`speedup_metrics`) when `student` and `teacher` are present.

    Data-parallel with `world` > 1 (call it on every rank of the process group): each rank
    samples and verifies its batches (`rank_batches`) and writes their images; the verifier
    results and timings are gathered (`gather`, default `all_gather_object`) and rank 0 scores,
    writes results.json and returns the results (None on the other ranks). `sec_per_image` is
    then the seconds of one device per image, summed over ranks. The images are those of one
    process. `diversity_seeds` K > 0: rows with open attributes are also sampled K more times
    (other seeds) per model, and `shapes.diversity` of those images is reported per model
    (`summary["diversity"]`, metrics `eval/<model>/diversity/...`). `should_stop`: see
    `sample_interleaved`; on `EvalStopped` nothing is written to results.json.

    `cached`: {model name: cache folder} (e.g. `teacher_cache_dir`). A model whose folder is
    complete is not sampled: its results, metrics and images are copied from there
    (`timing.cached` names it). Its timing is this run's: it is timed interleaved with the
    student on `timing_rows` (`timing.subset`); its `sec_per_image` and the speed-ups come from
    that subset (the student's own `sec_per_image` stays the whole evaluation's).
    Otherwise it is sampled and stored there for the next evaluation with the same key.
    """
    out_dir = Path(out_dir)
    gather_all = (gather or _all_gather) if world > 1 else (lambda obj: [obj])
    cached = {n: Path(d) for n, d in (cached or {}).items() if n in models}
    hits = sorted(n for n, d in cached.items() if (d / CACHE_RESULTS).is_file())
    if cached and world > 1:  # rank 0's view: every rank must sample the same models
        hits = gather_all(hits)[0]
    sample = {n: m for n, m in models.items() if n not in hits}
    part = (_evaluate_part(adapter, sample, rows, out_dir, seed, progress, repeats, rank, world, should_stop,
                           diversity_seeds) if sample else {"rank": rank, "models": {}, "rows": 0, "batches": 0,
                                                           "padding": 0})
    # a cached model's accuracy is the stored run's, but its timing must be this run's: it is
    # timed interleaved with the sampled models on a few batches per task (`timing_rows`)
    timed = {n: m for n, m in models.items() if n in hits or n == "student"} if "student" in sample else models
    timing = _time_subset(adapter, timed, rows, seed, rank, world, should_stop, gather_all) if hits and sample else None
    parts = gather_all(part)
    if rank != 0:
        return None
    results = merge_parts(parts, sample, rows, repeats, diversity_seeds)
    for name in hits:
        stored = load_cached(cached[name], out_dir / "images" / name)
        results["models"][name] = stored["summary"]
        # the stored run's timing is not this run's (another process, another machine load)
        results["metrics"].update({k: v for k, v in stored["metrics"].items()
                                   if not k.endswith(("/sec_per_image", "/denoise_sec_per_image"))})
        results["models"][name].pop("batch_seconds", None)  # the stored run's
        if timing is not None:
            sec, den = timing["seconds_per_image"][name]
            results["models"][name].update(sec_per_image=sec, denoise_sec_per_image=den, timed_on="timing.subset")
            results["metrics"].update({eval_metric(name, "sec_per_image"): sec,
                                       eval_metric(name, "denoise_sec_per_image"): den})
    results["models"] = {n: results["models"][n] for n in models}
    results["timing"]["cached"] = list(hits)
    results["metrics"].update(relative_metrics(results["metrics"]))
    if timing is not None:  # speed-ups only between timings of the same batches
        results["timing"]["subset"] = timing
        sub = {eval_metric(n, k): v for n, (sec, den) in timing["seconds_per_image"].items()
               for k, v in (("sec_per_image", sec), ("denoise_sec_per_image", den), ("nfe", float(timed[n][1].nfe)))}
        results["metrics"].update(speedup_metrics(sub))
    _write_sources(rows, out_dir / "images" / "source")
    for name in cached.keys() - set(hits):
        prefix = eval_metric(name, "")
        store_cached(cached[name], results["models"][name],
                     {k: v for k, v in results["metrics"].items() if k.startswith(prefix)}, out_dir / "images" / name)
    atomic_write_json(out_dir / "results.json", results)
    return results


TIMING_BATCHES = 3
"""Eval batches per task on which a cached model is timed against the student."""


def timing_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Up to `TIMING_BATCHES` eval batches per task (T2I and edit cost differ), each a whole
    batch of `sample_interleaved`'s grouping where there is one, of different image sizes first."""
    out: list[dict[str, Any]] = []
    for task in ("t2i", "edit"):
        chunks = _groups([r for r in rows if r["task"] == task], EVAL_BATCH)
        full = [c for c in chunks if len(c) == EVAL_BATCH] or chunks
        by_size: dict[tuple, list] = {}
        for c in full:
            by_size.setdefault((c[0]["width"], c[0]["height"]), []).append(c)
        order = [c for turn in itertools.zip_longest(*by_size.values()) for c in turn if c is not None]
        for c in order[:TIMING_BATCHES]:
            out += c
    return out


def _time_subset(adapter, models, rows, seed: int, rank: int, world: int, should_stop, gather_all) -> dict[str, Any]:
    """`models` (the student and the cached ones) sampled interleaved on `timing_rows(rows)`,
    images discarded: {"rows", "seconds_per_image": {name: (end to end, denoise)}} (a collective
    when `world` > 1: seconds summed over ranks, per image, as in `merge_parts`)."""
    sub = timing_rows(rows)
    got = sample_interleaved(adapter, models, sub, seed, rank=rank, world=world, should_stop=should_stop)
    parts = gather_all({n: (g["seconds"], g["denoise_seconds"]) for n, g in got.items()})
    n = max(1, len(sub))
    return {"rows": len(sub), "seconds_per_image": {name: (sum(p[name][0] for p in parts) / n,
                                                           sum(p[name][1] for p in parts) / n) for name in models}}


def _write_sources(rows: list[dict[str, Any]], folder: Path) -> None:
    """The edit rows' source images as `folder/<row id>.png` (the report's qualitative grids show
    the input first, then the teacher and each student, as in the paper's Figure 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if r.get("task") == "edit" and isinstance(r.get("source_image"), bytes | bytearray):
            (folder / f"{r['id']}.png").write_bytes(r["source_image"])


CACHE_RESULTS = "results.json"


def teacher_cache_dir(spec: ExperimentSpec, teacher_path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """`<run.out_dir>/eval-cache/<key>`: where the evaluation of the spec's teacher (`teacher`:
    `eval.teacher_nfe` steps with `eval.teacher_cfg`) is kept for every run and ablation cell
    that shares it. Why: the 80-NFE teacher is the costly part of an evaluation and does not
    depend on the student, so a grid evaluates it once.

    The key covers what its images depend on: the teacher's files (`pipelines.model_fingerprint`:
    by content, wherever they live), the
    eval rows themselves (ids, prompts, scenes: `eval` and the data's open/ref settings),
    steps, CFG, diversity seeds, precision, device and `model.edit_max_pixels`."""
    import hashlib
    import json

    from flashctl.pipelines import model_fingerprint

    e = spec.eval
    ident = {
        "version": 2, "teacher": model_fingerprint(str(teacher_path)),
        "rows": [(r["id"], r["prompt"], r.get("scene"), r.get("source_scene")) for r in rows],
        "steps": e.teacher_nfe, "cfg": e.teacher_cfg, "seed": e.seed, "diversity_seeds": e.diversity_seeds,
        "precision": spec.deepspeed.precision, "device": spec.launch.device,
        "edit_max_pixels": spec.model.edit_max_pixels,
    }
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(spec.run.out_dir) / "eval-cache" / f"teacher-{key}"


def store_cached(folder: Path, summary: dict[str, Any], metrics: dict[str, float], images: Path) -> bool:
    """Keep one model's evaluation (summary, its metrics, its images) in `folder`. Written beside
    it and renamed into place, so a reader sees all or nothing; when another evaluation (a
    concurrent cell) got there first its copy is kept and this one dropped. True if stored."""
    import os
    import shutil
    import tempfile

    folder = Path(folder)
    if folder.exists():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        shutil.copytree(images, tmp / "images")
        atomic_write_json(tmp / CACHE_RESULTS, {"summary": summary, "metrics": metrics})
        tmp.chmod(0o755)
        os.rename(tmp, folder)  # fails when `folder` appeared meanwhile: the first one stays
        return True
    except OSError:
        return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_cached(folder: Path, images: Path) -> dict[str, Any]:
    """{"summary", "metrics"} of a `store_cached` folder; its images are copied to `images`."""
    import json
    import shutil

    shutil.copytree(Path(folder) / "images", images, dirs_exist_ok=True)
    return json.loads((Path(folder) / CACHE_RESULTS).read_text())


def relative_metrics(m: dict[str, float]) -> dict[str, float]:
    """Student relative to teacher: retention per task (accuracy ratio) and the speed-ups."""
    out: dict[str, float] = {}
    for task, key in (("t2i", "t2i_acc"), ("edit", "edit_acc")):
        s, t = m.get(eval_metric("student", key)), m.get(eval_metric("teacher", key))
        if s is not None and t:
            out[eval_metric("retention", task)] = s / t
    out.update(speedup_metrics(m))
    return out


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a collective; small picklable objects only)."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def open_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose prompt leaves attributes open (the diversity rows)."""
    from flashctl.shapes.diversity import open_distributions

    return [r for r in rows if open_distributions(r)]


def diversity_rows(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The diversity metric's extra samples: every open row `k` more times (ids `<id>#<i>`,
    `of` = the row), sampled after the eval rows with noise seeds from DIVERSITY_SEED_OFFSET."""
    return [{**r, "id": f"{r['id']}#{i}", "of": r["id"]} for r in open_rows(rows) for i in range(k)] if k > 0 else []


def _evaluate_part(adapter, models, rows, out_dir: Path, seed: int, progress, repeats: int, rank: int, world: int,
                   should_stop, diversity_seeds: int) -> dict[str, Any]:
    """One rank's share of `evaluate_models`: sample, save the images, verify (plain data back)."""
    from flashctl.shapes import verify_record

    by_id = {r["id"]: r for r in rows}
    div_rows = diversity_rows(rows, diversity_seeds)
    done = dict.fromkeys(models, 0)

    def tick(name: str, n: int) -> None:  # one count over the eval rows, then the diversity rows
        done[name] += n
        if progress:
            progress(name, done[name], len(rows) + len(div_rows))

    sampled = sample_interleaved(adapter, models, rows, seed, repeats=repeats, on_batch=tick, rank=rank, world=world,
                                 should_stop=should_stop)
    div = (sample_interleaved(adapter, models, div_rows, seed + DIVERSITY_SEED_OFFSET, on_batch=tick, rank=rank,
                              world=world, should_stop=should_stop) if div_rows else {})
    div_by_id = {r["id"]: r for r in div_rows}
    part: dict[str, Any] = {"rank": rank, "models": {}}
    for name in models:
        images = sampled[name]["images"]
        img_dir = out_dir / "images" / name
        img_dir.mkdir(parents=True, exist_ok=True)
        for rid, im in images.items():
            im.save(img_dir / f"{rid}.png")
        per_row = {rid: {**verify_record(by_id[rid], im), "prompt": by_id[rid]["prompt"]} for rid, im in images.items()}
        seen: dict[str, list[dict[str, Any]]] = {}
        for did, im in (div[name]["images"].items() if div else ()):
            row = div_by_id[did]
            seen.setdefault(row["of"], []).append(verify_record(by_id[row["of"]], im))
        s = sampled[name]
        part["models"][name] = {"per_row": per_row, "seconds": s["seconds"], "denoise_seconds": s["denoise_seconds"],
                                "batches": list(zip(s["batch_index"], s["batches"])), "diversity": seen}
    chunks = _groups(rows, EVAL_BATCH)
    plan = rank_batches([len(c) for c in chunks], rank, world)
    part.update(rows=sum(len(chunks[i]) for i in plan if i is not None),
                batches=sum(i is not None for i in plan), padding=sum(i is None for i in plan))
    return part


def merge_parts(parts: list[dict[str, Any]], models: dict[str, tuple[Any, ModelUnderTest]],
                rows: list[dict[str, Any]], repeats: int = 1, diversity_seeds: int = 0) -> dict[str, Any]:
    """The results of `evaluate_models` from every rank's part: per-row verifier results in the
    eval set's order, accuracies, timings (seconds summed over ranks, per image), diversity."""
    from flashctl.shapes import score
    from flashctl.shapes.diversity import diversity
    from flashctl.shapes.diversity import flat_metrics as diversity_metrics

    results: dict[str, Any] = {"models": {}, "metrics": {}, "rows": len(rows),
                               "timing": {"interleaved": True, "repeats": max(1, repeats), "order": list(models)},
                               "world_size": len(parts),
                               "ranks": [{k: p[k] for k in ("rank", "rows", "batches", "padding")} for p in parts]}
    opened = open_rows(rows) if diversity_seeds > 0 else []
    for name, (_, cfg) in models.items():
        got = {rid: res for p in parts for rid, res in p["models"][name]["per_row"].items()}
        missing = [r["id"] for r in rows if r["id"] not in got]
        if missing:
            raise RuntimeError(f"evaluation of {name}: no result for {len(missing)} rows (e.g. {missing[0]})")
        per_row = [got[r["id"]] for r in rows]
        summary = score(per_row)
        t2i_rows = [r for r in per_row if r["task"] == "t2i"]
        summary["by_category_t2i"] = score(t2i_rows)["by_category"] if t2i_rows else {}
        n = max(1, len(rows))
        sec = sum(p["models"][name]["seconds"] for p in parts) / n
        den = sum(p["models"][name]["denoise_seconds"] for p in parts) / n
        batches = [list(b) for _, b in sorted(b for p in parts for b in p["models"][name]["batches"])]
        summary.update(steps=cfg.steps, nfe=cfg.nfe, cfg=cfg.cfg, sec_per_image=sec, denoise_sec_per_image=den,
                       batch_seconds=batches, per_row=per_row)
        results["metrics"].update(flat_metrics(name, summary, cfg.nfe, sec, den))
        if opened:
            seen: dict[str, list[dict[str, Any]]] = {}
            for p in parts:
                for rid, outs in p["models"][name]["diversity"].items():
                    seen.setdefault(rid, []).extend(outs)
            div = diversity(opened, seen)
            summary["diversity"] = {**div, "seeds": diversity_seeds, "open_rows": len(opened)}
            results["metrics"].update(diversity_metrics(name, div))
        results["models"][name] = summary
    results["metrics"].update(relative_metrics(results["metrics"]))
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


def eval_out_dir(model: str, nfe: int, cfg: float) -> Path:
    """`flashctl evaluate`'s default output folder of `model`: runs/eval/<name>-steps<N>-cfg<C>."""
    from flashctl.pipelines import resolve_model_path

    path = resolve_model_path(model)
    name = Path(path).name if Path(path).exists() else model.replace("/", "_")
    return Path("runs") / "eval" / f"{name}-steps{nfe}-cfg{cfg:g}"


def rank_rows(rows: list[dict[str, Any]], rank: int, world: int) -> int:
    """How many of `rows` this rank samples in a data-parallel evaluation (`rank_batches`)."""
    chunks = _groups(rows, EVAL_BATCH)
    return sum(len(chunks[i]) for i in rank_batches([len(c) for c in chunks], rank, world) if i is not None)


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Put the complete folder `staging` in the place of `out_dir` (an older one is replaced
    only once the new one is complete): the data-parallel `flashctl evaluate` never leaves a
    folder holding some ranks' images beside another evaluation's results.json."""
    import os
    import shutil

    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def evaluate_one(spec: ExperimentSpec, model: str, nfe: int, cfg: float, out_dir: Path | None,
                 track: bool, console, *, rank: int = 0, world: int = 1, device: str = "cpu",
                 barrier: Callable[[], None] | None = None) -> tuple[dict[str, Any] | None, Path]:
    """`flashctl evaluate`: `model` (pipeline folder / builtin:NAME / hub id) on the spec's eval
    set, logged as its own MLflow run when `track`. Returns the results (`results.json`, the
    model named "model") and the folder holding them and the images.

    Data-parallel with `world` > 1 (`flashctl evaluate --nproc N`; call it on every rank, in a
    process group, `barrier` its barrier): each rank samples its batches on `device` and writes
    their images into `.<out>.partial` beside the output folder, rank 0 gathers the verifier
    results (the same per row as one process: noise seeds follow the global batch), writes
    results.json there, swaps the folder into place and returns the results; other ranks get
    None. Progress is shown on rank 0 only, over its own rows."""
    from flashctl.models.adapter import QwenImageAdapter
    from flashctl.pipelines import resolve_model_path
    from flashctl.progress import StepProgress

    path = resolve_model_path(model)
    name = Path(path).name if Path(path).exists() else model.replace("/", "_")
    out_dir = Path(out_dir or eval_out_dir(model, nfe, cfg))
    write_dir = out_dir
    if world > 1:
        import shutil

        write_dir = out_dir.with_name(f".{out_dir.name}.partial")
        if rank == 0:  # what a killed earlier run left
            shutil.rmtree(write_dir, ignore_errors=True)
        barrier()
    adapter = QwenImageAdapter.from_pretrained(path, device=device, edit_max_pixels=spec.model.edit_max_pixels)
    rows = eval_rows(spec)
    extra = diversity_rows(rows, spec.eval.diversity_seeds)  # sampled after the eval rows: counted too
    label = f"sampling {name} @ {nfe} NFE" + (f" (+ {spec.eval.diversity_seeds} diversity seeds)" if extra else "")
    with StepProgress(label, rank_rows(rows, rank, world) + rank_rows(extra, rank, world), console, unit="rows",
                      enabled=rank == 0) as prog:
        res = evaluate_models(adapter, {"model": (adapter.transformer, ModelUnderTest("model", nfe, cfg))},
                              rows, write_dir, spec.eval.seed,
                              progress=lambda _n, done, total: prog.update(done),
                              diversity_seeds=spec.eval.diversity_seeds, rank=rank, world=world)
    if res is None:
        return None, out_dir
    if world > 1:
        _swap_in(write_dir, out_dir)
    if track and spec.tracking.enabled:
        from flashctl.track import KIND_EVALUATE, TAG_KIND, Tracker

        tracker = Tracker(spec.tracking, out_dir, f"evaluate-{name}", tags={TAG_KIND: KIND_EVALUATE})
        tracker.start()
        tracker.log_params_once({"model": model, "nfe": nfe, "cfg": cfg})
        # one model per run: `eval/model/t2i_acc` is logged as the run's own `eval/t2i_acc`
        prefix = eval_metric("model", "")
        tracker.log_metrics({eval_metric(None, k[len(prefix):]) if k.startswith(prefix) else k: v
                             for k, v in res["metrics"].items()}, 0)
        tracker.log_artifact(out_dir / "results.json")
        tracker.finish()
    return res, out_dir
