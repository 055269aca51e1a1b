"""Where models live: `builtin:NAME` names a toy teacher shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from flashctl.errors import UserError

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "assets" / "teachers"


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
