"""The shapes world: a procedural, verifiable stand-in for real T2I / editing data at CPU scale.

`scene` holds the grammar and the Scene/Edit model, `render` draws scenes with Pillow,
`language` writes prompts and instructions, `sample` turns (seed, index) into dataset rows,
and `verify` reads images back and checks every claim. Prompts may leave attributes open
(`Scene.open`, `data.open_attributes`); `diversity` measures how K samples of such a prompt
cover the open attributes' distribution.
"""

from flashctl.shapes.diversity import diversity, open_distributions
from flashctl.shapes.language import instruction_for, prompt_for
from flashctl.shapes.render import from_png, render, to_png
from flashctl.shapes.sample import (
    check_open_attributes,
    corpus,
    eval_set,
    generate,
    record_at,
    resample_open,
    sample_edit,
    sample_scene,
)
from flashctl.shapes.scene import (
    ALL_EDIT_TYPES,
    ASPECTS,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    DEFAULT_SIZES,
    EDIT_TYPES,
    EDITS_BY_CATEGORY,
    LETTERS,
    OPEN_KINDS,
    REF_EDIT_TYPES,
    SHAPES,
    Edit,
    Item,
    Open,
    Scene,
)
from flashctl.shapes.verify import score, verify_edit, verify_record, verify_t2i

__all__ = [
    "ALL_EDIT_TYPES",
    "ASPECTS",
    "BACKGROUNDS",
    "CATEGORIES",
    "COLOURS",
    "DEFAULT_SIZES",
    "EDITS_BY_CATEGORY",
    "EDIT_TYPES",
    "LETTERS",
    "OPEN_KINDS",
    "REF_EDIT_TYPES",
    "SHAPES",
    "Edit",
    "Item",
    "Open",
    "Scene",
    "check_open_attributes",
    "corpus",
    "diversity",
    "eval_set",
    "from_png",
    "generate",
    "instruction_for",
    "open_distributions",
    "prompt_for",
    "record_at",
    "render",
    "resample_open",
    "sample_edit",
    "sample_scene",
    "score",
    "to_png",
    "verify_edit",
    "verify_record",
    "verify_t2i",
]
