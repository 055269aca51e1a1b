"""The one row schema of flashctl's Arrow shards.

Every shard is an Arrow IPC *stream* file (what Hugging Face `datasets` writes and reads as
`data-00000-of-00004.arrow`) whose schema is exactly `SCHEMA` below. Each field carries a
`doc` entry in its Arrow metadata, so the documentation travels with the data.

Images are PNGs already resized to the spec's size for the row's aspect (`width` x
`height`), so a batch of one aspect stacks without further resizing. They are stored the way
Hugging Face `datasets` stores an `Image` feature -- `struct<bytes: binary, path: string>`,
`path` null -- and the schema metadata carries `datasets`' feature description under
`huggingface`, so `datasets.Dataset.from_file(shard)` and `load_dataset("arrow", ...)` show
the image columns as `Image` (decoding to PIL) and the text columns as `string`. flashctl's
own readers unwrap the struct (`row_from_arrow`): in Python a row's image is PNG bytes.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2
"""Bumped whenever a column is added, removed or changes meaning (2: images as `datasets`
Image structs instead of plain binary)."""

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""Arrow storage of `datasets.Image` (exactly `datasets.Image().pa_type`)."""
IMAGE_COLUMNS = ("image", "source_image")

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
    ("image", IMAGE_TYPE, True, "PNG {bytes, path: null}: the T2I image or the edit target; null when the source has none."),
    ("source_image", IMAGE_TYPE, True, "PNG {bytes, path: null} of the image to edit (edit rows); null for T2I."),
    ("scene", pa.string(), True, "JSON scene description of `image` (shapes world); null otherwise."),
    ("source_scene", pa.string(), True, "JSON scene description of `source_image` (shapes edits); null otherwise."),
    ("source", pa.string(), False, "Where the row came from: 'shapes' or 'jsonl:<manifest path>'."),
]



def hf_features() -> dict[str, Any]:
    """`datasets.Features.to_dict()` of the shard schema: `Image` for the image columns,
    `Value(<arrow type>)` for the others (what `datasets` reads from the `huggingface` key)."""
    return {
        name: {"_type": "Image"} if name in IMAGE_COLUMNS else {"dtype": str(typ), "_type": "Value"}
        for name, typ, _, _ in _COLUMNS
    }


SCHEMA: pa.Schema = pa.schema(
    [pa.field(name, typ, nullable=nullable, metadata={"doc": doc}) for name, typ, nullable, doc in _COLUMNS],
    metadata={
        "flashctl.schema_version": str(SCHEMA_VERSION),
        "huggingface": json.dumps({"info": {"features": hf_features()}}),
    },
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
    """Build a record batch in `SCHEMA` from row dicts (missing nullable keys become null;
    image columns hold PNG bytes or None, wrapped here into the `Image` struct)."""

    def wrap(value: Any) -> Any:
        return {"bytes": value, "path": None} if isinstance(value, (bytes, bytearray)) else value

    wrapped = [{**r, **{k: wrap(r.get(k)) for k in IMAGE_COLUMNS}} for r in rows]
    return pa.RecordBatch.from_pylist(wrapped, schema=SCHEMA)


def row_from_arrow(row: dict[str, Any]) -> dict[str, Any]:
    """A row as read from a shard (`to_pylist`) with its images as PNG bytes (or None)."""
    for k in IMAGE_COLUMNS:
        value = row.get(k)
        if isinstance(value, dict):
            row[k] = value.get("bytes")
    return row


# --------------------------------------------------------------------- conditioning sidecars

NEGATIVES_NAME = "negatives.safetensors"
COND_VERSION = 1
"""Bumped when the sidecar layout or what is encoded changes."""

_COND_COLUMNS: list[tuple[str, pa.DataType, bool, str]] = [
    ("id", pa.string(), False, "Row id; equals the id of the same row of the shard (alignment check)."),
    ("embeds", pa.binary(), False, "Prompt embedding (embeds_len, hidden) as raw bytes in the manifest's dtype; "
                                   "edits: the edit template with the source image."),
    ("embeds_len", pa.int32(), False, "Valid tokens of `embeds` (its mask is 1 for all of them)."),
    ("neg_embeds", pa.binary(), True, "Edit rows: the CFG negative (\"\" with the source image), raw bytes; "
                                      "null for T2I (its negative is the constant in negatives.safetensors)."),
    ("neg_len", pa.int32(), True, "Valid tokens of `neg_embeds`; null for T2I."),
    ("latents", pa.binary(), True, "Packed normalised VAE latents (seq, 4z) of the target image, raw bytes; "
                                   "null when the row has no image."),
    ("source_latents", pa.binary(), True, "Edit rows: packed latents (seq_src, 4z) of the source image at the "
                                          "reference size; null for T2I."),
    ("source_height", pa.int32(), True, "Edit rows: height in pixels of the source at the reference size."),
    ("source_width", pa.int32(), True, "Edit rows: width in pixels of the source at the reference size."),
]


def _cond_hf_features() -> dict[str, Any]:
    return {name: {"dtype": str(typ), "_type": "Value"} for name, typ, _, _ in _COND_COLUMNS}


COND_SCHEMA: pa.Schema = pa.schema(
    [pa.field(n, t, nullable=nl, metadata={"doc": d}) for n, t, nl, d in _COND_COLUMNS],
    metadata={
        "flashctl.conditioning_version": str(COND_VERSION),
        "huggingface": json.dumps({"info": {"features": _cond_hf_features()}}),
    },
)
"""Arrow schema of the conditioning sidecars."""
