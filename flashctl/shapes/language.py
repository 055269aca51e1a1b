"""Words for shapes scenes: T2I prompts, edit instructions and the tokenizer corpus."""

from __future__ import annotations

import numpy as np

from flashctl.shapes.scene import (
    ASPECTS,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    EDITS_BY_CATEGORY,
    LETTERS,
    SHAPES,
    Edit,
    Item,
    Scene,
    grid_cells,
    position_name,
)


def describe(scene: Scene, item: Item) -> str:
    """Noun phrase of an item with its position: "a red circle at the top left", "a red letter A"."""
    if item.is_letter:
        return f"a {item.colour} letter {item.letter}"
    return f"a {item.colour} {item.shape} at the {position_name(scene.aspect, item.cell)}"


def refer(item: Item) -> str:
    """Referring expression of an item in an instruction: "the red circle", "the letter A"."""
    if item.is_letter:
        return f"the letter {item.letter}"
    return f"the {item.colour} {item.shape}"


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def prompt_for(scene: Scene) -> str:
    """The T2I prompt stating every item (in order) and, where named, the background."""
    if not scene.items:
        return f"a plain {scene.background} background"
    text = _join([describe(scene, it) for it in scene.items])
    if scene.names_background():
        text += f" on a {scene.background} background"
    return text


def instruction_for(edit: Edit) -> str:
    """The edit instruction, e.g. "make the red circle blue", "move the red circle to the top right"."""
    src = edit.source
    if edit.edit_type == "background":
        return f"change the background to {edit.background}"
    if edit.edit_type == "add":
        return f"add {describe(src, edit.new_item)}"
    item = src.items[edit.item]
    if edit.edit_type == "recolour":
        return f"make {refer(item)} {edit.colour}"
    if edit.edit_type == "remove":
        return f"remove {refer(item)}"
    if edit.edit_type == "move":
        return f"move {refer(item)} to the {position_name(src.aspect, edit.cell)}"
    raise ValueError(f"unknown edit type {edit.edit_type!r}")


def vocabulary_texts() -> list[str]:
    """Templated sentences that together use every word the world can produce."""
    out = []
    for aspect in ASPECTS:
        scene = Scene("object", aspect, 1, 1)
        for cell in grid_cells(aspect):
            for colour in COLOURS:
                for shape in SHAPES:
                    item = Item(shape, colour, cell)
                    out.append(describe(scene, item))
                    out.append(f"add {describe(scene, item)}")
            out.append(f"move the red circle to the {position_name(aspect, cell)}")
    for colour in COLOURS:
        for letter in LETTERS:
            out.append(describe(Scene("text", "square", 1, 1), Item("letter", colour, None, letter)))
            out.append(f"make the letter {letter} {colour}")
        for shape in SHAPES:
            out.append(f"make the {colour} {shape} blue")
            out.append(f"remove the {colour} {shape}")
    for bg in BACKGROUNDS:
        out.append(f"a red circle and a blue square on a {bg} background")
        out.append(f"a plain {bg} background")
        out.append(f"change the background to {bg}")
    return out


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering the whole vocabulary (templated sentences + `n` sampled prompts and
    instructions), for training the tokenizer offline. Deterministic per (n, seed)."""
    from flashctl.shapes.sample import (  # sample imports this module
        sample_edit,
        sample_scene,
    )

    out = vocabulary_texts()
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0xC0])
        category = CATEGORIES[i % len(CATEGORIES)]
        aspect = ASPECTS[(i // len(CATEGORIES)) % len(ASPECTS)]
        if i % 2:
            kinds = EDITS_BY_CATEGORY[category]
            edit = sample_edit(rng, category, aspect, (32, 32), kinds[int(rng.integers(len(kinds)))])
            out.append(instruction_for(edit))
        else:
            out.append(prompt_for(sample_scene(rng, category, aspect, (32, 32))))
    return out
