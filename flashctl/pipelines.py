"""Where pipelines live and what they are: `builtin:NAME` names a toy teacher shipped inside the
package; `pipeline_info` reads a pipeline's class from its model_index.json (no torch)."""

from __future__ import annotations

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


def model_files(path: str | Path) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime_ns) of every file of a local model folder, sorted: what
    identifies its weights without reading them (a 20B teacher is ~40 GB; hashing it would cost
    minutes). Hidden files are left out. A file rewritten in place, a retrained `builtin:base`
    included, changes its mtime and so the result."""
    root = Path(path).resolve()
    return sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in root.rglob("*") if f.is_file() and not f.name.startswith("."))


def model_fingerprint(path: str) -> dict[str, object]:
    """What a spec's model reference (`builtin:NAME`, a folder, a hub id) stands for today: a
    local folder by its resolved path and `model_files`, a hub id by its name. A spec hash sees
    only the reference, so caches and reuse across runs compare this as well."""
    resolved = resolve_model_path(path)
    if Path(resolved).is_dir():
        return {"path": str(Path(resolved).resolve()), "files": model_files(resolved)}
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
