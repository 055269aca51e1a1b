"""User JSONL manifests -> rows of the shard schema (or rejects).

One JSON object per line. Blank lines are skipped.

* T2I row: ``{"id", "prompt", ["category"], ["size"], ["image"]}`` -- `size` is ``[w, h]``
  or an aspect name; `image` is optional (DMD needs prompts, not images, for T2I).
* Edit row: ``{"id", "instruction", "source_image", ["target_image"], ["edit_type"],
  ["category"]}``.

Choices (documented here because users see their effects):

* `category` defaults to ``"object"`` and must be one of object/scene/text (the spec's
  composition weights are keyed by those); `edit_type` is any non-empty label.
* The aspect comes from the image (edit rows: the source image; w>h landscape, w<h portrait,
  else square), else from `size`, else ``square``. A `size` that disagrees with the image's
  aspect, or an edit target whose aspect differs from its source, is rejected.
* Images (after EXIF orientation) are converted to RGB, centre-cropped to the aspect's spec
  ratio and resized to the spec size for that aspect (`data.sizes`) with Lanczos, then stored
  as PNG: every row of one aspect has the same size, so the loader can stack a batch.
* Image paths are relative to the manifest's directory; absolute paths, ``..``, control
  characters and symlinks that leave that directory are rejected.
* Bounded work per row, whatever the input: lines longer than `MAX_LINE_BYTES`, image files
  larger than `MAX_IMAGE_BYTES` and images of more than `MAX_IMAGE_PIXELS` (checked from the
  header, before decoding: a 100 KB PNG can claim 10^9 pixels) are rejected; JSON with
  repeated keys, nesting too deep for the interpreter or numbers too long is a bad row.
* Rows are validated fully (images included) before the composition weights are applied,
  so the rejects do not depend on the weights.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from flashctl.data.schema import ASPECTS, CATEGORIES, aspect_of
from flashctl.yamlio import InputError, load_json

DEFAULT_CATEGORY = "object"
MAX_LINE_BYTES = 1 << 20
"""Longest JSONL line read (a row holds text and image paths, not images)."""
MAX_IMAGE_BYTES = 64 << 20
"""Largest image file opened."""
MAX_IMAGE_PIXELS = 40_000_000
"""Most pixels of an input image (e.g. 8000 x 5000); rows are resized to tens of pixels."""
T2I_KEYS = ("id", "prompt", "category", "size", "image")
EDIT_KEYS = ("id", "instruction", "source_image", "target_image", "edit_type", "category")
_REQUIRED = {"t2i": ("id", "prompt"), "edit": ("id", "instruction", "source_image")}


@dataclass(frozen=True)
class Reject:
    """An input row that was not written, and why."""

    file: str
    line: int
    id: str | None
    reason: str
    order: tuple[int, int] = field(default=(0, 0), compare=False)
    """Sort key (file index, line) so rejects are listed in input order."""

    def to_json(self) -> dict[str, Any]:
        """The `rejects.jsonl` record."""
        return {"file": self.file, "line": self.line, "id": self.id, "reason": self.reason}

    def message(self) -> str:
        """One line: `file:line: reason (id ...)`."""
        who = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.file}:{self.line}: {self.reason}{who}"


@dataclass(frozen=True)
class JsonlContext:
    """What a worker needs to turn manifest lines into rows (picklable)."""

    files: tuple[str, ...]
    """Manifest paths as given (used in rejects and the `source` column)."""
    base_dirs: tuple[str, ...]
    """Resolved directory of each manifest (image paths are relative to it)."""
    sizes: dict[str, tuple[int, int]]
    categories: dict[str, float]
    aspects: dict[str, float]


class _Bad(Exception):
    """A row problem; the message is the reject reason."""


def _text(obj: dict[str, Any], key: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _Bad(f"missing key {key!r}")
        return None
    if not isinstance(value, str):
        raise _Bad(f"wrong type: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _Bad(f"empty text: {key!r}")
    return value


def _safe_path(base: Path, rel: str, key: str) -> Path:
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        raise _Bad(f"bad path: {key} {rel[:60]!r} contains control characters")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise _Bad(f"path escapes the manifest directory: {key} {rel!r} is absolute")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise _Bad(f"path escapes the manifest directory: {key} {rel!r} contains '..'")
    path = base / rel
    if not path.resolve().is_relative_to(base):
        raise _Bad(f"path escapes the manifest directory: {key} {rel!r} links outside it")
    return path


def _open_image(path: Path, rel: str):
    from PIL import Image, ImageOps

    if not path.is_file():
        raise _Bad(f"image not found: {rel!r}")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise _Bad(f"image too large: {rel!r} is {size:,} bytes (at most {MAX_IMAGE_BYTES:,})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise _Bad(f"image too large: {rel!r} is {w}x{h} pixels (at most {MAX_IMAGE_PIXELS:,})")
                img.load()
                img = ImageOps.exif_transpose(img)
                return img.convert("RGB")
    except _Bad:
        raise
    # Pillow signals undecodable input with many exception types (OSError, SyntaxError,
    # ValueError, DecompressionBombError, ...): any of them means "corrupt image".
    except Exception as exc:  # noqa: BLE001
        raise _Bad(f"cannot decode image {rel!r}: {type(exc).__name__}: {exc}") from None


def _to_png(img, size: tuple[int, int]) -> bytes:
    from PIL import Image, ImageOps

    fitted = ImageOps.fit(img, size, method=Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    fitted.save(buf, format="PNG")
    return buf.getvalue()


def _size_aspect(value: Any) -> str:
    if isinstance(value, str):
        if value not in ASPECTS:
            raise _Bad(f"wrong type: 'size' {value!r} is not one of {', '.join(ASPECTS)}")
        return value
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return aspect_of(value[0], value[1])
    raise _Bad(f"wrong type: 'size' must be [width, height] (positive ints) or an aspect name, got {value!r}")


def _row(obj: Any, ctx: JsonlContext, file_index: int) -> dict[str, Any]:
    """Validate one parsed line and build its row (raises _Bad)."""
    if not isinstance(obj, dict):
        raise _Bad(f"bad JSON: a row must be an object, got {type(obj).__name__}")
    if "prompt" in obj and "instruction" in obj:
        raise _Bad("row has both 'prompt' (T2I) and 'instruction' (edit)")
    if "prompt" not in obj and "instruction" not in obj:
        raise _Bad("missing key: 'prompt' (T2I row) or 'instruction' (edit row)")
    task = "t2i" if "prompt" in obj else "edit"
    allowed = T2I_KEYS if task == "t2i" else EDIT_KEYS
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise _Bad(f"unknown key(s) {', '.join(map(repr, unknown))} for a {task} row (allowed: {', '.join(allowed)})")
    row_id = _text(obj, "id", True)
    category = _text(obj, "category", False) or DEFAULT_CATEGORY
    if category not in CATEGORIES:
        raise _Bad(f"unknown category {category!r} (expected one of {', '.join(CATEGORIES)})")
    base = Path(ctx.base_dirs[file_index])
    row: dict[str, Any] = {"id": row_id, "task": task, "category": category, "source": f"jsonl:{ctx.files[file_index]}"}

    if task == "t2i":
        row["prompt"] = _text(obj, "prompt", True)
        size_aspect = _size_aspect(obj["size"]) if obj.get("size") is not None else None
        rel = _text(obj, "image", False)
        img = _open_image(_safe_path(base, rel, "image"), rel) if rel else None
        aspect = aspect_of(*img.size) if img is not None else (size_aspect or "square")
        if img is not None and size_aspect is not None and size_aspect != aspect:
            raise _Bad(f"size {obj['size']!r} ({size_aspect}) disagrees with the image aspect ({aspect})")
        target, source = img, None
    else:
        row["prompt"] = _text(obj, "instruction", True)
        row["edit_type"] = _text(obj, "edit_type", False)
        rel_src = _text(obj, "source_image", True)
        rel_tgt = _text(obj, "target_image", False)
        src_path = _safe_path(base, rel_src, "source_image")
        tgt_path = _safe_path(base, rel_tgt, "target_image") if rel_tgt else None
        source = _open_image(src_path, rel_src)
        target = _open_image(tgt_path, rel_tgt) if tgt_path else None
        aspect = aspect_of(*source.size)
        if target is not None and aspect_of(*target.size) != aspect:
            raise _Bad(f"target_image aspect {aspect_of(*target.size)} differs from source_image aspect {aspect}")
    if aspect not in ctx.sizes:
        raise _Bad(f"no size for aspect {aspect!r} in data.sizes")
    w, h = ctx.sizes[aspect]
    row.update(aspect=aspect, width=w, height=h)
    row["image"] = _to_png(target, (w, h)) if target is not None else None
    row["source_image"] = _to_png(source, (w, h)) if source is not None else None
    return row


def _row_id(obj: Any) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("id"), str):
        return obj["id"]
    return None


def process_lines(
    lines: list[tuple[int, int, str]], ctx: JsonlContext
) -> tuple[list[dict[str, Any]], list[tuple[str, int]], list[Reject], int]:
    """Turn (file index, line number, text) items into rows.

    Returns (rows, origins (file, line) per row, rejects, filtered count). Rows whose
    category or aspect weight is 0 (or absent) are counted as filtered, not returned.
    Duplicate ids are not detected here (the caller sees all rows, in order).
    """
    rows, origins, rejects, filtered = [], [], [], 0
    for file_index, line_no, text in lines:
        if not text.strip():
            continue
        file = ctx.files[file_index]
        obj: Any = None
        try:
            try:
                obj = load_json(text, file, line_no)
            except InputError as exc:
                raise _Bad(exc.problem.replace("invalid JSON", "bad JSON", 1)) from None
            row = _row(obj, ctx, file_index)
        except _Bad as exc:
            rejects.append(Reject(file, line_no, _row_id(obj), str(exc), (file_index, line_no)))
            continue
        if ctx.categories.get(row["category"], 0) <= 0 or ctx.aspects.get(row["aspect"], 0) <= 0:
            filtered += 1
            continue
        rows.append(row)
        origins.append((file, line_no))
    return rows, origins, rejects, filtered
