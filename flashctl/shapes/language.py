"""Words for shapes scenes: T2I prompts and edit instructions (the tokenizer corpus, which samples scenes, is in sample.py)."""

from __future__ import annotations

from flashctl.shapes.scene import (
    ASPECTS,
    BACKGROUNDS,
    COLOURS,
    LETTERS,
    SHAPES,
    Edit,
    Item,
    Scene,
    grid_cells,
    position_name,
)


def describe(scene: Scene, item: Item, index: int | None = None) -> str:
    """Noun phrase of an item with its position: "a red circle at the top left", "a red letter A".
    With `index`, attributes that `scene.open` leaves open for that item are not stated
    ("a circle at the top left", "a red circle", "a circle", "a letter A")."""
    op = scene.open if index is not None else None
    colour_open = op is not None and op.colour_options(index) is not None
    cell_open = op is not None and op.cell_options(index) is not None
    colour = "" if colour_open else f"{item.colour} "
    if item.is_letter:
        return f"a {colour}letter {item.letter}"
    where = "" if cell_open else f" at the {position_name(scene.aspect, item.cell)}"
    return f"a {colour}{item.shape}{where}"


def refer(item: Item) -> str:
    """Referring expression of an item in an instruction: "the red circle", "the letter A"."""
    if item.is_letter:
        return f"the letter {item.letter}"
    return f"the {item.colour} {item.shape}"


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def refer_by(scene: Scene, index: int, prop: str) -> str:
    """Referring expression naming item `index` of `scene` by one property (REFER_BY): "the red
    one", "the circle", "the shape on the left", "the shape at the top", "the shape at the
    bottom right". The caller makes sure the property singles the item out (`referents`)."""
    item = scene.items[index]
    if prop == "colour":
        return f"the {item.colour} one"
    if prop == "shape":
        return f"the {item.shape}"
    if prop in ("left", "right"):
        return f"the shape on the {prop}"
    if prop in ("top", "bottom"):
        return f"the shape at the {prop}"
    if prop == "cell":
        return f"the shape at the {position_name(scene.aspect, item.cell)}"
    raise ValueError(f"unknown referring property {prop!r}")


def referents(scene: Scene, index: int) -> list[str]:
    """The properties (REFER_BY order) that single out item `index` among the scene's items:
    its colour or shape when no other item shares it, left/right/top/bottom when it is the
    only item in the extreme column/row, and its cell (always unique)."""
    item, others = scene.items[index], [it for j, it in enumerate(scene.items) if j != index]
    out = []
    if all(o.colour != item.colour for o in others):
        out.append("colour")
    if all(o.shape != item.shape for o in others):
        out.append("shape")
    (c, r) = item.cell
    if all(o.cell[0] > c for o in others):
        out.append("left")
    if all(o.cell[0] < c for o in others):
        out.append("right")
    if all(o.cell[1] > r for o in others):
        out.append("top")
    if all(o.cell[1] < r for o in others):
        out.append("bottom")
    out.append("cell")
    return out


def prompt_for(scene: Scene) -> str:
    """The T2I prompt stating every item (in order) and, where named, the background;
    attributes left open by `scene.open` are not stated."""
    if not scene.items:
        return f"a plain {scene.background} background"
    text = _join([describe(scene, it, i) for i, it in enumerate(scene.items)])
    bg_open = scene.open is not None and scene.open.background is not None
    if scene.names_background() and not bg_open:
        text += f" on a {scene.background} background"
    return text


def instruction_for(edit: Edit) -> str:
    """The edit instruction, e.g. "make the red circle blue", "move the red circle to the top
    right", "add a circle" (open add), "remove the shape on the left" (referring edit)."""
    src = edit.source
    kind = edit.base_type
    if kind == "background":
        return f"change the background to {edit.background}"
    if kind == "add":
        tgt = edit.target()
        return f"add {describe(tgt, edit.new_item, len(src.items))}"
    item = src.items[edit.item]
    name = refer_by(src, edit.item, edit.refer) if edit.refer else refer(item)
    if kind == "recolour":
        return f"make {name} {edit.colour}"
    if kind == "remove":
        return f"remove {name}"
    if kind == "move":
        return f"move {name} to the {position_name(src.aspect, edit.cell)}"
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
    # underspecified prompts and referring edits (words: "shape", "one", "on the left", ...)
    for shape in SHAPES:
        out.append(f"a {shape}")
        out.append(f"add a {shape}")
        out.append(f"remove the {shape}")
    out.append("a letter A")
    for colour in COLOURS:
        out.append(f"make the {colour} one blue")
        out.append(f"remove the {colour} one")
    for side in ("on the left", "on the right", "at the top", "at the bottom", "at the top left"):
        out.append(f"remove the shape {side}")
        out.append(f"move the shape {side} to the bottom right")
    return out
