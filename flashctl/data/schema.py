"""The one row schema of flashctl's Arrow shards.

Every shard is an Arrow IPC *stream* file (what Hugging Face `datasets` writes and reads as
`data-00000-of-00004.arrow`) whose schema is exactly `SCHEMA` below. Each field carries a
`doc` entry in its Arrow metadata, so the documentation travels with the data.

Images are stored as PNG bytes already resized to the spec's size for the row's aspect
(`width` x `height`), so a batch of one aspect stacks without further resizing.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 1
"""Bumped whenever a column is added, removed or changes meaning."""

TASKS = ("t2i", "edit")
CATEGORIES = ("object", "scene", "text")
ASPECTS = ("square", "landscape", "portrait")
EDIT_TYPES = ("recolour", "remove", "add", "move", "background")
"""Edit types of the shapes world; user manifests may use other non-empty names."""

_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("id", pa.string(), False, "Unique row id within the dataset."),
    ("task", pa.string(), False, "'t2i' (text-to-image) or 'edit' (instruction-guided editing)."),
    ("category", pa.string(), False, "Data category: 'object', 'scene' or 'text'."),
    ("aspect", pa.string(), False, "Aspect class: 'square', 'landscape' (w>h) or 'portrait' (w<h)."),
    ("width", pa.int32(), False, "Image width in pixels (the spec size for the aspect)."),
    ("height", pa.int32(), False, "Image height in pixels (the spec size for the aspect)."),
    ("prompt", pa.string(), False, "T2I prompt, or the edit instruction for edit rows."),
    ("edit_type", pa.string(), True, "Edit rows: recolour/remove/add/move/background (or a user label); null for T2I."),
    ("image", pa.binary(), True, "PNG bytes: the T2I image or the edit target; null when the source has none."),
    ("source_image", pa.binary(), True, "PNG bytes of the image to edit (edit rows); null for T2I."),
    ("scene", pa.string(), True, "JSON scene description of `image` (shapes world); null otherwise."),
    ("source_scene", pa.string(), True, "JSON scene description of `source_image` (shapes edits); null otherwise."),
    ("source", pa.string(), False, "Where the row came from: 'shapes' or 'jsonl:<manifest path>'."),
]

SCHEMA: pa.Schema = pa.schema(
    [pa.field(name, typ, nullable=nullable, metadata={"doc": doc}) for name, typ, nullable, doc in _COLUMNS],
    metadata={"flashctl.schema_version": str(SCHEMA_VERSION)},
)
"""The Arrow schema of every shard (field docs in each field's metadata under `doc`)."""

COLUMNS: tuple[str, ...] = tuple(c[0] for c in _COLUMNS)


def aspect_of(width: int, height: int) -> str:
    """Aspect class of a `width` x `height` image: landscape if w>h, portrait if w<h, else square."""
    if width > height:
        return "landscape"
    if width < height:
        return "portrait"
    return "square"


def schema_json() -> list[dict[str, Any]]:
    """The schema as JSON-able field descriptions (name, type, nullable, doc) for manifests."""
    return [
        {"name": f.name, "type": str(f.type), "nullable": f.nullable, "doc": f.metadata[b"doc"].decode()}
        for f in SCHEMA
    ]


def rows_to_batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    """Build a record batch in `SCHEMA` from row dicts (missing nullable keys become null)."""
    return pa.RecordBatch.from_pylist(rows, schema=SCHEMA)
