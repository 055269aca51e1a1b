"""`prepare-data`: a DataSpec's source (shapes world or JSONL manifests) -> Arrow shards.

Layout of a prepared dataset directory::

    data-00000-of-00003.arrow ...   Arrow IPC stream shards (schema: flashctl.data.schema)
    rejects.jsonl                   input rows not written: file, line, id, reason
    cond-00000-of-00003.arrow ...   with --cache-embeddings: text embeddings + VAE latents
    negatives.safetensors           per row, and the T2I negative (flashctl.data.conditioning)
    manifest.json                   written last; see flashctl.data.manifest

How it stays correct when interrupted: everything is written into ``out/.tmp-<pid>/`` first
(each shard as ``.partial`` then renamed). Only when the whole dataset is there, the old
manifest is removed, the shards and rejects are moved in (os.replace) and the new manifest is
moved in last. A run killed at any point leaves either no manifest or the old, intact one;
the next run removes stale ``.tmp-<pid>`` directories of dead processes.

Determinism: inputs are cut into fixed chunks (independent of `workers`), processed by a
process pool and consumed in order; `ShardWriter` makes shard bytes depend only on the rows.
Same spec and inputs => same shards => same digest.

This module imports no torch (the conditioning encoder, when given, brings its own).
"""

from __future__ import annotations

import base64
import json
import multiprocessing as mp
import os
import shutil
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from flashctl.data.jsonl import MAX_LINE_BYTES, JsonlContext, Reject, process_lines
from flashctl.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    REJECTS_NAME,
    dataset_digest,
    file_sha256,
    fsync_dir,
    write_json_atomic,
)
from flashctl.data.schema import (
    COLUMNS,
    SCHEMA,
    SCHEMA_VERSION,
    rows_to_batch,
    schema_json,
)
from flashctl.data.shards import ShardWriter, WrittenShard
from flashctl.errors import UserError
from flashctl.progress import StepProgress
from flashctl.spec import DataSpec
from flashctl.system import signals_interrupt

CHUNK = 100
"""Input rows (shapes indices or JSONL lines) per work item; fixed so output is independent
of the worker count."""
COUNTED = ("task", "category", "aspect", "edit_type")


@dataclass(frozen=True)
class PrepareResult:
    """What `prepare_data` wrote."""

    manifest: Path
    """Path of the written manifest.json."""
    rows: int
    """Rows in the dataset."""
    rejects: int
    """Input rows rejected (see rejects.jsonl next to the manifest)."""
    filtered: int
    """Valid rows left out because their category/aspect weight is 0."""
    shards: int
    """Number of shard files."""
    digest: str
    """Dataset digest (sha256 over shard digests)."""


@dataclass
class ChunkResult:
    """A worker's output for one chunk, in input order."""

    batch: pa.RecordBatch
    origins: list[tuple[str, int, int]]
    """(file, line, file index) per row of `batch` (shapes: ("shapes", index, 0))."""
    rejects: list[Reject] = field(default_factory=list)
    filtered: int = 0
    consumed: int = 0
    """Input items this chunk covered (for the progress bar)."""


# ------------------------------------------------------------------------------------------
# Work items (run in pool workers: module-level, picklable)


def _shapes_record_at() -> Callable[..., dict[str, Any]]:
    """The shapes world's `record_at(index, seed, *, categories, aspects, sizes, edit_fraction)`."""
    from flashctl.shapes import record_at

    return record_at


def _shapes_chunk(params: dict[str, Any], bounds: tuple[int, int]) -> ChunkResult:
    """Generate shapes-world rows `bounds[0]..bounds[1]-1` as one record batch."""
    record_at = _shapes_record_at()
    start, stop = bounds
    rows, origins, filtered = [], [], 0
    for index in range(start, stop):
        row = record_at(
            index,
            params["seed"],
            categories=params["categories"],
            aspects=params["aspects"],
            sizes=params["sizes"],
            edit_fraction=params["edit_fraction"],
            open_attributes=params.get("open_attributes", 0.0),
            ref_edits=params.get("ref_edits", 0.0),
        )
        extra = set(row) - set(COLUMNS)
        if extra:
            raise RuntimeError(f"shapes record {index} has keys outside the shard schema: {sorted(extra)}")
        if params["categories"].get(row["category"], 0) <= 0 or params["aspects"].get(row["aspect"], 0) <= 0:
            filtered += 1
            continue
        rows.append(row)
        origins.append(("shapes", index, 0))
    return ChunkResult(rows_to_batch(rows), origins, [], filtered, stop - start)


def _jsonl_chunk(ctx: JsonlContext, lines: list[tuple[int, int, bytes | None]]) -> ChunkResult:
    """Validate and convert one chunk of JSONL lines (None: a line too long to read)."""
    decoded, rejects = [], []
    for file_index, line_no, raw in lines:
        if raw is None:
            reason = f"bad JSON: line longer than {MAX_LINE_BYTES:,} bytes"
            rejects.append(Reject(ctx.files[file_index], line_no, None, reason, (file_index, line_no)))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            rejects.append(Reject(ctx.files[file_index], line_no, None, "bad JSON: line is not UTF-8", (file_index, line_no)))
            continue
        decoded.append((file_index, line_no, text.lstrip("\ufeff") if line_no == 1 else text))
    rows, origins, more, filtered = process_lines(decoded, ctx)
    rejects = sorted(rejects + more, key=lambda r: r.order)
    origins3 = [(f, line, ctx.files.index(f)) for f, line in origins]
    return ChunkResult(rows_to_batch(rows), origins3, rejects, filtered, len(lines))


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent stops the pool itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`map(fn, items)` over a process pool, results in input order, bounded memory.

    `Pool.imap` would read the whole input iterator ahead of the workers; here at most
    2 x `workers` items are in flight.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    # spawn: prepare-data may run inside processes that hold threads (e.g. a test runner).
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_ignore_sigint) as pool:  # __exit__ terminates
        window: deque[Any] = deque()
        for item in items:
            window.append(pool.apply_async(fn, (item,)))
            if len(window) >= 2 * workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


# ------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Plan:
    fn: Callable[[Any], ChunkResult]
    items: Iterable[Any]
    total: int
    source: dict[str, Any]


def _shapes_plan(data: DataSpec) -> _Plan:
    record_at = _shapes_record_at()  # fail here, not inside a worker

    params = {
        "seed": data.seed,
        "categories": dict(data.categories),
        "aspects": dict(data.aspects),
        "sizes": {k: tuple(v) for k, v in data.sizes.items()},
        "edit_fraction": data.edit_fraction,
        "open_attributes": data.open_attributes,
        "ref_edits": data.ref_edits,
    }
    items = ((s, min(s + CHUNK, data.n)) for s in range(0, data.n, CHUNK))
    return _Plan(partial(_shapes_chunk, params), items, data.n, {"type": "shapes", "generator": f"{record_at.__module__}.record_at"})


def _read_lines(fh: Any) -> Iterator[bytes | None]:
    """The lines of a binary file, None for a line longer than `MAX_LINE_BYTES` (skipped
    without holding it: a 10 GB file without newlines costs 1 MiB of memory)."""
    while raw := fh.readline(MAX_LINE_BYTES + 1):
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while (more := fh.readline(MAX_LINE_BYTES)) and not more.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _count_lines(path: Path) -> int:
    """Lines of a file (for the progress bar), counted in blocks, not held."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _jsonl_lines(paths: list[Path]) -> Iterator[list[tuple[int, int, bytes | None]]]:
    chunk: list[tuple[int, int, bytes | None]] = []
    for file_index, path in enumerate(paths):
        with open(path, "rb") as fh:
            for line_no, raw in enumerate(_read_lines(fh), start=1):
                chunk.append((file_index, line_no, raw))
                if len(chunk) == CHUNK:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _jsonl_plan(data: DataSpec) -> _Plan:
    if not data.manifests:
        raise UserError("data.manifests: empty; source 'jsonl' needs at least one JSONL manifest")
    paths = [Path(p) for p in data.manifests]
    for p in paths:
        if not p.is_file():
            raise UserError(f"{p}: JSONL manifest not found (data.manifests)")
    total = sum(_count_lines(p) for p in paths)
    ctx = JsonlContext(
        files=tuple(str(p) for p in paths),
        base_dirs=tuple(str(p.resolve().parent) for p in paths),
        sizes={k: tuple(v) for k, v in data.sizes.items()},
        categories=dict(data.categories),
        aspects=dict(data.aspects),
    )
    source = {"type": "jsonl", "manifests": [{"path": str(p), "sha256": file_sha256(p)} for p in paths]}
    return _Plan(partial(_jsonl_chunk, ctx), _jsonl_lines(paths), total, source)


# ------------------------------------------------------------------------------------------
# Output directory handling


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_staging(out: Path) -> Path:
    """Remove stale `.tmp-<pid>` dirs of dead runs; refuse if a live run writes here."""
    for d in out.glob(".tmp-*"):
        try:
            pid = int(d.name[len(".tmp-"):])
        except ValueError:
            continue
        if pid != os.getpid() and _pid_alive(pid):
            raise UserError(f"{out}: another prepare-data run (pid {pid}) is writing here; wait, or remove {d}")
        shutil.rmtree(d, ignore_errors=True)
    staging = out / f".tmp-{os.getpid()}"
    staging.mkdir()
    return staging


def _publish(staging: Path, out: Path, names: list[str], shards: list[WrittenShard], extra: list[str] = ()) -> None:
    """Move a complete dataset from `staging` into `out`, manifest last (`extra`: further
    files in `staging` to move, e.g. the conditioning sidecars)."""
    from flashctl.data.conditioning import NEGATIVES_NAME

    old = out / MANIFEST_NAME
    if old.exists():
        old.unlink()  # from here on `out` holds no manifest until the new one lands
        fsync_dir(out)
    for shard, name in zip(shards, names):
        os.replace(shard.path, out / name)
    for name in extra:
        os.replace(staging / name, out / name)
    keep = set(names) | set(extra)
    for stale in [*out.glob("data-*-of-*.arrow"), *out.glob("cond-*-of-*.arrow"), out / NEGATIVES_NAME]:
        if stale.name not in keep and stale.exists():
            stale.unlink()
    os.replace(staging / REJECTS_NAME, out / REJECTS_NAME)
    fsync_dir(out)
    os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)
    fsync_dir(out)


# ------------------------------------------------------------------------------------------


def prepare_data(
    data: DataSpec,
    out: Path,
    *,
    workers: int = 1,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    conditioning: Any = None,
) -> PrepareResult:
    """Build the Arrow shards + manifest.json of `data` in directory `out`.

    `conditioning` (a `data.conditioning.ConditioningEncoder`) also writes the cached text
    embeddings and VAE latents of every row next to the shards (`--cache-embeddings`); the
    shards themselves, and so the digest, are the same with or without it.
    `workers` > 1 generates/validates rows in a process pool (same bytes as 1 worker).
    Bad input rows go to `out/rejects.jsonl`; `strict` makes the first one a UserError.
    An existing dataset in `out` is refused unless `overwrite`, and is replaced only once the
    new one is complete. Raises UserError for bad input.
    """
    out = Path(out)
    if workers < 1:
        raise UserError(f"--workers {workers}: must be >= 1")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if (out / MANIFEST_NAME).exists() and not overwrite:
        raise UserError(f"{out}: already holds a prepared dataset ({MANIFEST_NAME}); pass --overwrite to replace it")
    plan = _shapes_plan(data) if data.source == "shapes" else _jsonl_plan(data)
    out.mkdir(parents=True, exist_ok=True)
    staging = _claim_staging(out)
    try:
        with signals_interrupt():  # SIGTERM: clean-up runs as for Ctrl-C
            return _build(data, plan, out, staging, workers=workers, strict=strict, progress=progress,
                          conditioning=conditioning)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build(data: DataSpec, plan: _Plan, out: Path, staging: Path, *, workers: int, strict: bool, progress: bool,
           conditioning: Any = None) -> PrepareResult:
    writer = ShardWriter(staging, data.rows_per_shard)
    counts = {name: Counter() for name in COUNTED}
    seen: dict[str, tuple[str, int]] = {}
    n_rejects = n_filtered = 0
    first_reject: Reject | None = None
    try:
        with (
            open(staging / REJECTS_NAME, "w") as rejects_fh,
            StepProgress("prepare-data", plan.total, unit="rows", enabled=progress) as bar,
            closing(ordered_map(plan.fn, plan.items, workers)) as results,
        ):
            for res in results:
                batch, rejects = res.batch, list(res.rejects)
                keep = []
                for row_id, (file, line, file_index) in zip(batch.column("id").to_pylist(), res.origins):
                    if row_id in seen:
                        f0, l0 = seen[row_id]
                        rejects.append(Reject(file, line, row_id, f"duplicate id (first at {f0}:{l0})", (file_index, line)))
                        keep.append(False)
                    else:
                        seen[row_id] = (file, line)
                        keep.append(True)
                if not all(keep):
                    batch = batch.filter(pa.array(keep))
                for r in sorted(rejects, key=lambda r: r.order):
                    if strict:
                        raise UserError(f"{r.message()} (--strict)")
                    first_reject = first_reject or r
                    rejects_fh.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
                n_rejects += len(rejects)
                n_filtered += res.filtered
                for name in COUNTED:
                    counts[name].update(v for v in batch.column(name).to_pylist() if v is not None)
                writer.write(batch)
                bar.advance(res.consumed)
            shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    n_rows = sum(s.rows for s in shards)
    if n_rows == 0:
        why = f" (first: {first_reject.message()})" if first_reject else ""
        raise UserError(f"{out}: no rows to write: {n_rejects} rejected{why}, {n_filtered} filtered out by the composition weights")
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    digest = dataset_digest([s.sha256 for s in shards])
    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "schema": {"fields": schema_json(), "arrow_ipc_base64": base64.b64encode(SCHEMA.serialize().to_pybytes()).decode()},
        "rows": n_rows,
        "rejects": n_rejects,
        "rejects_file": REJECTS_NAME,
        "filtered": n_filtered,
        "shards": [{"file": n, "rows": s.rows, "sha256": s.sha256, "bytes": s.bytes} for n, s in zip(names, shards)],
        "counts": {name: dict(sorted(c.items())) for name, c in counts.items()},
        "digest": digest,
        "data_spec": data.model_dump(mode="json"),
        "source": plan.source,
    }
    extra: list[str] = []
    if conditioning is not None:
        from flashctl.data.conditioning import write_conditioning

        section = write_conditioning(conditioning, staging, [s.path for s in shards], progress=progress)
        manifest["conditioning"] = section
        extra = [f["file"] for f in section["files"]] + [section["negatives"]["file"]]
    write_json_atomic(staging / MANIFEST_NAME, manifest)
    _publish(staging, out, names, shards, extra)
    return PrepareResult(out / MANIFEST_NAME, n_rows, n_rejects, n_filtered, len(shards), digest)
