"""Cached conditioning: text embeddings and VAE latents of a prepared dataset, computed once.

`flashctl prepare-data SPEC --cache-embeddings` encodes every row with the spec's base teacher's
text encoder and VAE (design §5: at 20B neither belongs on the training GPUs) and writes, next
to each shard ``data-0000i-of-0000N.arrow``, a sidecar ``cond-0000i-of-0000N.arrow``: an Arrow
IPC stream with the same rows in the same order (schema `COND_SCHEMA`, `id` repeated to check
the alignment). The constant T2I negative ("" with no image) is encoded once, into
``negatives.safetensors``. The manifest's ``conditioning`` section lists the sidecars with
their sha256 (checked like the shards), the negatives file and the model that produced them.

Why sidecars rather than new shard columns: the shards -- and so the dataset digest every run
logs as its data lineage -- stay byte-identical with or without a cache (the cache is derived
from the rows and a model, not data), old datasets stay readable, the cache can be made by
ranks one shard each, and each sidecar carries its own `datasets` features (`Value("binary")`
and `Value("int32")`), so `datasets.Dataset.from_file(sidecar)` reads it too.

Tensors are stored as raw bytes in the encoding dtype (`dtype` in the manifest: bfloat16 at
GPU scale, float32 on CPU), unpadded: a row's text embedding is its `embeds_len` valid tokens
(mask 1), re-padded per batch with `models.adapter.cat_conditioning`, exactly as the pipelines
pad a batch. What is encoded is what `distill.worker.DistillJob.conditioning` encodes on the
fly: the prompt through `QwenImageAdapter.encode_prompts` (edits: the edit template with the
source image), an edit's negative ("" with its source image), the edit source's packed latents
at the reference size (`encode_sources`), and the target image's packed latents.

The model is identified by `model_fingerprint`: a sha256 over the pipeline class (its family:
QwenImageEdit and QwenImageEditPlus encode edits differently), the text encoder's, VAE's,
tokenizer's and processor's file names, sizes, full config/tokenizer files and the first and
last MiB of each weight file (cheap at 7B, and it tells apart two models of one architecture),
plus the dtype. `distill` refuses a cache whose fingerprint differs from its base teacher's.

This module imports no torch at module level (`prepare-data` without the flag stays light).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from flashctl.data.schema import COND_SCHEMA, COND_VERSION, NEGATIVES_NAME
from flashctl.errors import UserError
from flashctl.pipelines import hash_files


def sidecar_name(index: int, count: int) -> str:
    """File name of the sidecar of shard `index` of `count` (next to `data-...-of-....arrow`)."""
    return f"cond-{index:05d}-of-{count:05d}.arrow"


def local_model_dir(path: str) -> Path:
    """A local folder for a pipeline folder or hub id (the hub's cache only: no download here)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 -- any failure means: not available locally
        raise UserError(f"{path}: not a local pipeline folder nor in the Hugging Face cache ({type(exc).__name__})") from None


def model_fingerprint(path: str) -> str:
    """sha256 identifying the text encoder + VAE (+ tokenizer, processor) of pipeline `path`.

    By content (`pipelines.hash_files`): names, sizes and full contents of the small files
    (configs, tokenizers); names, sizes and the first and last MiB of weight files: a few MiB
    read even for a 7B text encoder, yet two checkpoints of one architecture differ."""
    root = local_model_dir(path)
    h = hashlib.sha256()
    import json

    try:  # the pipeline family: the same text encoder encodes edits otherwise per family
        h.update(f"pipeline\0{json.loads((root / 'model_index.json').read_text()).get('_class_name')}\0".encode())
    except (OSError, ValueError):
        pass
    for sub in ("text_encoder", "vae", "tokenizer", "processor"):
        folder = root / sub
        if folder.is_dir():
            hash_files(h, root, sorted(p for p in folder.rglob("*") if p.is_file()))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheModel:
    """What produced a cache (recorded in the manifest, compared by `distill`)."""

    path: str
    fingerprint: str
    dtype: str
    edit_max_pixels: int | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "fingerprint": self.fingerprint, "dtype": self.dtype,
                "edit_max_pixels": self.edit_max_pixels}


def model_for_spec(spec: Any, dtype: str) -> CacheModel:
    """The `CacheModel` of `spec`'s base teacher (guidance.base) encoding in `dtype`."""
    from flashctl.pipelines import resolve_model_path

    path = resolve_model_path(spec.teachers[spec.guidance.base].path)
    return CacheModel(path, model_fingerprint(path), dtype, spec.model.edit_max_pixels)


# ------------------------------------------------------------------------------------------
# Writing (prepare-data --cache-embeddings)


def _to_bytes(t: Any) -> bytes:
    """A tensor's raw bytes (any dtype, bf16 included: numpy has none, so via uint8)."""
    import torch

    return t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()


class ConditioningEncoder:
    """Encodes shards into sidecars with one adapter (text encoder + VAE, no transformer).

    One of `world` ranks (`prepare-data --cache-embeddings --nproc N`) with `gather`, an
    all-gather of small picklable objects over the ranks (rank order): each rank encodes every
    `world`-th shard (`write_conditioning` on rank 0, `follow_conditioning` on the others)."""

    def __init__(self, adapter: Any, model: CacheModel, batch_size: int = 16, *, rank: int = 0, world: int = 1,
                 gather: Callable[[Any], list[Any]] | None = None):
        if world > 1 and gather is None:
            raise ValueError("a ConditioningEncoder of several ranks needs `gather`")
        self.adapter, self.model, self.batch_size = adapter, model, batch_size
        self.rank, self.world = rank, world
        self.gather = gather if world > 1 else (lambda obj: [obj])

    @classmethod
    def from_spec(cls, spec: Any, device: str | None = None, batch_size: int = 16, **ranks: Any) -> ConditioningEncoder:
        """The spec's base teacher's text encoder and VAE on `device` (default: cuda if there is
        one), in bf16 on CUDA and fp32 on CPU (where the cache must equal on-the-fly encoding).
        `ranks`: rank, world, gather (see the class)."""
        import torch

        from flashctl.models.adapter import QwenImageAdapter

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        model = model_for_spec(spec, str(dtype).removeprefix("torch."))
        adapter = QwenImageAdapter.from_pretrained(model.path, device=device, dtype=dtype, transformer=False,
                                                   edit_max_pixels=spec.model.edit_max_pixels)
        return cls(adapter, model, batch_size, **ranks)

    def negatives(self, path: Path) -> tuple[str, int]:
        """Write the T2I negative ("" encoded once) to `path`; returns (sha256, hidden size)."""
        from safetensors.torch import save_file

        from flashctl.data.manifest import file_sha256

        e, m = self.adapter.encode_prompts([""])
        save_file({"t2i_embeds": e.contiguous().cpu(), "t2i_mask": m.contiguous().cpu()}, str(path))
        return file_sha256(path), int(e.shape[-1])

    def encode_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sidecar records of shard rows (PNG bytes as `row_from_arrow` gives them), in order.

        Rows are encoded in groups of one task and one image size (what the encoders need),
        `batch_size` at a time; each record holds only its own row's valid tokens."""
        from PIL import Image

        from flashctl.images import decode_png, to_tensor

        a = self.adapter
        out: list[dict[str, Any] | None] = [None] * len(rows)
        groups: dict[tuple[str, int, int], list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((r["task"], r["width"], r["height"]), []).append(i)
        for (task, _w, _h), idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s : s + self.batch_size]
                prompts = [rows[i]["prompt"] for i in part]
                sources = None
                if task == "edit":
                    if any(rows[i]["source_image"] is None for i in part):
                        raise UserError(f"row {rows[part[0]]['id']}: an edit row without a source image")
                    sources = [Image.fromarray(decode_png(rows[i]["source_image"])) for i in part]
                emb, mask = a.encode_prompts(prompts, sources)
                neg = neg_mask = src = src_size = None
                if sources is not None:
                    neg, neg_mask = a.encode_prompts([""] * len(part), sources)
                    src, src_size = a.encode_sources(sources)
                has = [j for j, i in enumerate(part) if rows[i]["image"] is not None]
                lat = None
                if has:
                    lat = a.encode_images(to_tensor([decode_png(rows[part[j]]["image"]) for j in has]))
                for j, i in enumerate(part):
                    n = int(mask[j].sum())
                    if not bool(mask[j, :n].all()):
                        raise RuntimeError("text mask is not right-padded")
                    rec: dict[str, Any] = {"id": rows[i]["id"], "embeds": _to_bytes(emb[j, :n]), "embeds_len": n}
                    if neg is not None:
                        k = int(neg_mask[j].sum())
                        rec.update(neg_embeds=_to_bytes(neg[j, :k]), neg_len=k, source_latents=_to_bytes(src[j]),
                                   source_height=int(src_size[0]), source_width=int(src_size[1]))
                    if j in has:
                        rec["latents"] = _to_bytes(lat[has.index(j)])
                    out[i] = rec
        return out  # type: ignore[return-value]

    def encode_shard(self, shard: Path, out: Path) -> tuple[int, str, int]:
        """Write the sidecar of `shard` to `out` (via `.partial` + fsync + rename).

        Returns (rows, sha256, bytes)."""
        from flashctl.data.manifest import file_sha256
        from flashctl.data.schema import row_from_arrow

        partial = Path(str(out) + ".partial")
        rows = 0
        with pa.memory_map(str(shard)) as src, pa.OSFile(str(partial), "wb") as sink:
            reader = pa.ipc.open_stream(src)
            with pa.ipc.new_stream(sink, COND_SCHEMA) as writer:
                for batch in reader:
                    records = self.encode_rows([row_from_arrow(r) for r in batch.to_pylist()])
                    writer.write_batch(pa.RecordBatch.from_pylist(records, schema=COND_SCHEMA))
                    rows += batch.num_rows
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        digest, size = file_sha256(partial), partial.stat().st_size
        os.replace(partial, out)
        return rows, digest, size


def _encode_share(encoder: ConditioningEncoder, staging: Path, shard_paths: list[Path],
                  progress: bool) -> list[tuple[int, dict[str, Any]]]:
    """This rank's sidecars (shards rank, rank + world, ...) in `staging`: [(shard index, file
    record)]. A shard's sidecar is the same bytes whichever rank encodes it."""
    from flashctl.progress import StepProgress

    mine = range(encoder.rank, len(shard_paths), encoder.world)
    out = []
    with StepProgress("cache-embeddings", len(mine), unit="shards", enabled=progress) as bar:
        for i in mine:
            name = sidecar_name(i, len(shard_paths))
            rows, digest, size = encoder.encode_shard(shard_paths[i], staging / name)
            out.append((i, {"file": name, "rows": rows, "sha256": digest, "bytes": size}))
            bar.advance(1)
    return out


def follow_conditioning(encoder: ConditioningEncoder) -> None:
    """A rank other than 0 of `prepare-data --cache-embeddings --nproc N`: wait for rank 0's
    shards (its `write_conditioning`), encode this rank's share of them, hand the records back."""
    job = encoder.gather(None)[0]
    encoder.gather(_encode_share(encoder, Path(job["staging"]), [Path(p) for p in job["shards"]], False))


def write_conditioning(encoder: ConditioningEncoder, staging: Path, shard_paths: list[Path],
                       progress: bool = True) -> dict[str, Any]:
    """Encode every shard (staging paths, in order) into sidecars + negatives in `staging`.

    Returns the manifest's `conditioning` section (file names are the final ones). With
    several ranks (rank 0 calls this, the others `follow_conditioning`) the shards are dealt
    round-robin; the all-gather of the records is the barrier after which rank 0 alone writes
    the negatives and the section: the same files, byte for byte, as one process writes."""
    a = encoder.adapter
    encoder.gather({"staging": str(staging), "shards": [str(p) for p in shard_paths]})
    parts = encoder.gather(_encode_share(encoder, Path(staging), list(shard_paths), progress))
    files = [rec for _, rec in sorted(rec for part in parts for rec in part)]
    neg_sha, hidden = encoder.negatives(staging / NEGATIVES_NAME)
    return {
        "version": COND_VERSION,
        "files": files,
        "negatives": {"file": NEGATIVES_NAME, "sha256": neg_sha},
        "model": encoder.model.to_json(),
        "hidden_size": hidden,
        "latent_channels": 4 * a.z_dim,
        "schema": {"fields": [{"name": f.name, "type": str(f.type), "nullable": f.nullable,
                               "doc": f.metadata[b"doc"].decode()} for f in COND_SCHEMA]},
    }


# ------------------------------------------------------------------------------------------
# Reading (manifest checks, distill)


def cache_for_run(spec: Any) -> dict[str, Any] | None:
    """The conditioning section `distill` trains from, or None (encode on the fly).

    `data.cached_conditioning`: None = use the cache when the dataset has one, True = require
    it, False = ignore it. A cache made by another text encoder / VAE than the spec's base
    teacher's, or with another `model.edit_max_pixels`, is refused (UserError, one line)."""
    from flashctl.data.manifest import read_manifest

    want = getattr(spec.data, "cached_conditioning", None)
    if want is False:
        return None
    manifest = read_manifest(spec.data.root, verify=False)
    cond = manifest.conditioning
    if cond is None:
        if want:
            raise UserError(f"data.cached_conditioning: {spec.data.root} has no cached conditioning "
                            "(run `flashctl prepare-data SPEC --cache-embeddings`)")
        return None
    from flashctl.pipelines import resolve_model_path

    base = resolve_model_path(spec.teachers[spec.guidance.base].path)
    rec = cond["model"]
    if model_fingerprint(base) != rec["fingerprint"]:
        raise UserError(f"{spec.data.root}: conditioning cached with {rec['path']} (text encoder/VAE "
                        f"{rec['fingerprint'][:12]}), but the base teacher is {base} "
                        f"({model_fingerprint(base)[:12]}); re-run `flashctl prepare-data --cache-embeddings` "
                        "or set data.cached_conditioning=false")
    want_dtype = "bfloat16" if spec.launch.device == "cuda" else "float32"  # what `from_spec` encodes in there
    if rec.get("dtype") != want_dtype:
        raise UserError(f"{spec.data.root}: conditioning cached in {rec.get('dtype')}, a launch.device="
                        f"{spec.launch.device} run encodes in {want_dtype}; re-run `flashctl prepare-data "
                        "--cache-embeddings` on that device or set data.cached_conditioning=false")
    if rec.get("edit_max_pixels") != spec.model.edit_max_pixels:
        raise UserError(f"{spec.data.root}: conditioning cached with model.edit_max_pixels={rec.get('edit_max_pixels')}, "
                        f"the spec has {spec.model.edit_max_pixels}; re-run `flashctl prepare-data --cache-embeddings`")
    return {**cond, "root": str(manifest.root)}


def tensor_from(data: bytes, rows: int, dtype: str, cols: int = -1) -> Any:
    """Raw bytes of a (rows, cols) tensor in `dtype` (torch name, e.g. 'float32') -> tensor
    (one of rows / cols may be -1)."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).view(rows, cols)


def load_negatives(root: Path, cond: dict[str, Any]) -> tuple[Any, Any]:
    """(embeds (1, L, D), mask (1, L)) of the T2I negative stored once for the dataset."""
    from safetensors.torch import load_file

    t = load_file(str(Path(root) / cond["negatives"]["file"]))
    return t["t2i_embeds"], t["t2i_mask"]
