"""The shapes world: a procedural, verifiable stand-in for real T2I / editing data at CPU scale.

`scene` holds the grammar and the Scene/Edit model, `render` draws scenes with Pillow,
`language` writes prompts and instructions, `sample` turns (seed, index) into dataset rows,
and `verify` reads images back and checks every claim.
"""

from flashctl.shapes.language import corpus, instruction_for, prompt_for
from flashctl.shapes.render import from_png, render, to_png
from flashctl.shapes.sample import (
    eval_set,
    generate,
    record_at,
    sample_edit,
    sample_scene,
)
from flashctl.shapes.scene import (
    ASPECTS,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    DEFAULT_SIZES,
    EDIT_TYPES,
    EDITS_BY_CATEGORY,
    LETTERS,
    SHAPES,
    Edit,
    Item,
    Scene,
)
from flashctl.shapes.verify import score, verify_edit, verify_record, verify_t2i

__all__ = [
    "ASPECTS",
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "DEFAULT_SIZES",
    "EDITS_BY_CATEGORY",
    "EDIT_TYPES",
    "LETTERS",
    "SHAPES",
    "Edit",
    "Item",
    "Scene",
    "corpus",
    "eval_set",
    "from_png",
    "generate",
    "instruction_for",
    "prompt_for",
    "record_at",
    "render",
    "sample_edit",
    "sample_scene",
    "score",
    "to_png",
    "verify_edit",
    "verify_record",
    "verify_t2i",
]
