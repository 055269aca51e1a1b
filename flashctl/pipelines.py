"""Where pipelines live and what they are: `builtin:NAME` names a toy teacher shipped inside the
package; `pipeline_info` reads a pipeline's class from its model_index.json (no torch)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from flashctl.errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parent / "assets" / "teachers"


def resolve_model_path(path: str) -> str:
    """`builtin:base` -> the shipped pipeline folder; local folders are checked; anything else
    is passed on as a hub id (GPU scale)."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        folder = BUILTIN_DIR / name
        if not (folder / "model_index.json").is_file():
            known = sorted(p.name for p in BUILTIN_DIR.glob("*") if (p / "model_index.json").is_file())
            raise UserError(f"{path}: no shipped teacher {name!r} (known: {', '.join(known) or 'none'})")
        return str(folder)
    p = Path(path)
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise UserError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return str(p)
    if path.startswith((".", "/")) or path.count("/") != 1:
        raise UserError(f"{path}: no such pipeline folder")
    return path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SAMPLE_BYTES = 1 << 20


def hash_files(h, root: Path, files) -> None:
    """Feed `files` (under `root`, in the given order) to the hash `h` by content: each file's
    relative name and size, then all of it, except weight files over 2 MiB, of which the first
    and last MiB. Why sampled: a 20B teacher is ~40 GB (hashing it would cost minutes), yet two
    checkpoints of one architecture differ there (a fine-tune changes every tensor). Why content
    and not mtimes: a copy, a `touch` or a fresh clone must not make the same weights new."""
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if f.suffix not in WEIGHT_SUFFIXES or size <= 2 * SAMPLE_BYTES:
                h.update(fh.read())
            else:
                h.update(fh.read(SAMPLE_BYTES))
                fh.seek(size - SAMPLE_BYTES)
                h.update(fh.read(SAMPLE_BYTES))


def model_fingerprint(path: str) -> dict[str, object]:
    """What a spec's model reference (`builtin:NAME`, a folder, a hub id) stands for today: a
    local folder by the content of its files (`hash_files`: hidden files left out; wherever the
    folder lives), a hub id by its name. A spec hash sees only the reference, so caches and reuse
    across runs compare this as well: a retrained `builtin:base` keeps its name."""
    resolved = resolve_model_path(path)
    root = Path(resolved)
    if root.is_dir():
        root = root.resolve()
        h = hashlib.sha256()
        hash_files(h, root, sorted((f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")),
                                   key=lambda f: f.relative_to(root).as_posix()))
        return {"sha256": h.hexdigest()}
    return {"hub": resolved}


KNOWN_PIPELINES = {
    "Qwen/Qwen-Image": ("QwenImagePipeline", False),
    "Qwen/Qwen-Image-Edit": ("QwenImageEditPipeline", True),
    "Qwen/Qwen-Image-Edit-2509": ("QwenImageEditPlusPipeline", True),
}
"""Hub ids whose model_index.json is known: (`_class_name`, ships a processor), so that
`validate` can judge them offline, before any download."""


def pipeline_info(path: str) -> tuple[str, bool] | None:
    """(`_class_name`, has a processor) from the model_index.json of pipeline `path` (a
    `builtin:` name, a local folder, a known hub id, or a hub id in the local Hugging Face
    cache), or None when that cannot be told without a download. Reads one small JSON file:
    spec validation calls it (no torch)."""
    import json

    if path in KNOWN_PIPELINES:
        return KNOWN_PIPELINES[path]
    index = None
    try:
        local = Path(resolve_model_path(path))
        if (local / "model_index.json").is_file():
            index = local / "model_index.json"
    except UserError:
        return None
    if index is None and path.count("/") == 1 and not path.startswith((".", "/")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "model_index.json")
            index = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 -- no cache, no hub library: unknown
            index = None
    if index is None:
        return None
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    proc = data.get("processor")
    return str(data.get("_class_name")), bool(proc and proc[0] is not None)
