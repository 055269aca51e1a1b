"""The shapes world's grammar and scene model: palette, shapes, letters, layout grid, edits.

The grammar is deliberately small so that a 2-layer diffusion transformer can learn it on a
CPU in minutes, and coarse so that a verifier can read it back from blurry 32 px images:

* 6 saturated object colours, well apart from each other and from the 3 background colours;
* 3 shapes (circle, square, triangle) plus single capital letters (the "text" category);
* objects sit in the cells of a coarse grid (2x2 square, 3x2 landscape, 2x3 portrait), so
  at the default sizes every cell is 16x16 px and an object is ~40% of the short side;
  one letter per text scene, centred and large (75% of the short side).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from flashctl.errors import UserError

RGB = tuple[int, int, int]
Cell = tuple[int, int]  # (column, row)

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "yellow": (245, 215, 20),
    "green": (30, 165, 50),
    "cyan": (0, 200, 215),
    "blue": (30, 70, 230),
    "purple": (150, 40, 200),
}
"""Object colours (name -> RGB)."""
BACKGROUNDS: dict[str, RGB] = {"white": (250, 250, 250), "gray": (128, 128, 128), "black": (15, 15, 15)}
"""Background colours (name -> RGB), all far from every object colour."""
DEFAULT_BACKGROUND = "white"
"""Background of `object` and `text` scenes; prompts name the background only when it differs
(and always for `scene`)."""
SHAPES = ("circle", "square", "triangle")
LETTER = "letter"
"""`Item.shape` of a glyph item."""
LETTERS = ("A", "E", "H", "L", "O", "T", "X", "Z")
"""Visually distinct capitals drawn with strokes (no font file needed)."""
CATEGORIES = ("object", "scene", "text")
ASPECTS = ("square", "landscape", "portrait")
EDIT_TYPES = ("recolour", "remove", "add", "move", "background")
"""The default edit types (the instruction names the item by colour and shape)."""
EDITS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "object": EDIT_TYPES,
    "scene": EDIT_TYPES,
    "text": ("recolour", "background"),
}
"""Edit types that make sense per category (a text scene holds one centred letter)."""
REF_SUFFIX = "-ref"
REF_EDIT_TYPES = ("recolour-ref", "remove-ref", "move-ref")
"""Referring edits: the instruction names one of 2-3 items by a single property ("the red
one", "the circle", "the shape on the left", "the shape at the top right"), so the model must
read the source image to know which item and what it looks like. Scenes only; kept out of
`EDIT_TYPES` (and of the default composition) so that the default world is unchanged."""
ALL_EDIT_TYPES = EDIT_TYPES + REF_EDIT_TYPES
REF_EDITS_BY_CATEGORY: dict[str, tuple[str, ...]] = {"object": (), "scene": REF_EDIT_TYPES, "text": ()}
"""Referring edit types per category (they need 2-3 items to choose from)."""
REFER_BY = ("colour", "shape", "left", "right", "top", "bottom", "cell")
"""Properties a referring edit may name the item by (each used only when it is unique)."""
OPEN_KINDS = ("position", "colour", "both", "background")
"""Kinds of underspecified prompt: `position` (no cell stated for any item: "a red circle";
for scenes the whole arrangement), `colour` (no item colour: "a circle at the top left",
"a letter A"), `both` (neither: "a circle"), `background` (scenes: no "on a ... background")."""
OPEN_KINDS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "object": ("position", "colour", "both"),
    "scene": OPEN_KINDS,
    "text": ("colour",),
}
"""Open kinds per category: object and text scenes always sit on the default background
(a prompt without background means white there), and a letter is always centred."""
GRIDS: dict[str, tuple[int, int]] = {"square": (2, 2), "landscape": (3, 2), "portrait": (2, 3)}
"""(columns, rows) of the object grid per aspect."""
DEFAULT_SIZES: dict[str, tuple[int, int]] = {"square": (32, 32), "landscape": (48, 32), "portrait": (32, 48)}
"""(width, height) per aspect."""
OBJECT_SCALE = 0.8
"""Object side as a fraction of the cell's short side."""
LETTER_SCALE = 0.75
"""Letter height as a fraction of the image's short side."""
LETTER_ASPECT = 0.7
"""Letter width / height."""
MAX_OBJECTS = 3

_COLUMN_NAMES = {1: ("center",), 2: ("left", "right"), 3: ("left", "center", "right")}
_ROW_NAMES = {1: ("middle",), 2: ("top", "bottom"), 3: ("top", "middle", "bottom")}


def grid_cells(aspect: str) -> list[Cell]:
    """All cells of the aspect's grid in reading order (row by row)."""
    cols, rows = GRIDS[aspect]
    return [(c, r) for r in range(rows) for c in range(cols)]


def position_name(aspect: str, cell: Cell) -> str:
    """Words for a cell, e.g. "top left", "bottom center", "middle right"."""
    cols, rows = GRIDS[aspect]
    return f"{_ROW_NAMES[rows][cell[1]]} {_COLUMN_NAMES[cols][cell[0]]}"


@dataclass(frozen=True)
class Item:
    """One thing in a scene: a shape in a grid cell, or a centred letter."""

    shape: str
    """circle | square | triangle | letter."""
    colour: str
    """A key of COLOURS."""
    cell: Cell | None = None
    """(column, row) for shapes; None for a letter (always centred)."""
    letter: str | None = None
    """The capital drawn, for letters."""

    @property
    def is_letter(self) -> bool:
        return self.shape == LETTER

    def key(self) -> tuple[str, str]:
        """What a referring expression names: (colour, shape) or (colour, letter)."""
        return (self.colour, self.letter if self.is_letter else self.shape)


@dataclass(frozen=True)
class Open:
    """What a prompt leaves unstated, and the distribution each unstated attribute was drawn
    from: every option list is the support of a *uniform* distribution (the marginal given
    the prompt, e.g. any cell of the grid for an item whose position is open).

    The scene itself holds the realised values (what the ground-truth image shows); the
    verifier accepts any option for an open attribute, the diversity metric compares the
    spread of realised values over seeds with these distributions."""

    kind: str
    """One of OPEN_KINDS."""
    background: tuple[str, ...] | None = None
    """Background options when the background is unstated."""
    cells: tuple[tuple[Cell, ...] | None, ...] = ()
    """Per item (aligned with Scene.items): cell options when its position is unstated."""
    colours: tuple[tuple[str, ...] | None, ...] = ()
    """Per item: colour options when its colour is unstated."""

    def cell_options(self, i: int) -> tuple[Cell, ...] | None:
        return self.cells[i] if i < len(self.cells) else None

    def colour_options(self, i: int) -> tuple[str, ...] | None:
        return self.colours[i] if i < len(self.colours) else None

    def attributes(self) -> dict[str, tuple]:
        """{attribute name: options} of every open attribute: "background", "obj<i>.cell",
        "obj<i>.colour" (the names `verify_record` uses for the realised values)."""
        out: dict[str, tuple] = {}
        if self.background is not None:
            out["background"] = self.background
        for i in range(max(len(self.cells), len(self.colours))):
            if self.cell_options(i) is not None:
                out[f"obj{i}.cell"] = self.cell_options(i)
            if self.colour_options(i) is not None:
                out[f"obj{i}.colour"] = self.colour_options(i)
        return out

    def to_dict(self) -> dict[str, Any]:
        n = max(len(self.cells), len(self.colours))
        items = []
        for i in range(n):
            it: dict[str, Any] = {}
            if self.cell_options(i) is not None:
                it["cell"] = [list(c) for c in self.cell_options(i)]
            if self.colour_options(i) is not None:
                it["colour"] = list(self.colour_options(i))
            items.append(it)
        out: dict[str, Any] = {"kind": self.kind, "dist": "uniform", "items": items}
        if self.background is not None:
            out["background"] = list(self.background)
        return out


@dataclass(frozen=True)
class Scene:
    """A full description of one image: size, background and items (in prompt order)."""

    category: str
    aspect: str
    width: int
    height: int
    background: str = DEFAULT_BACKGROUND
    items: tuple[Item, ...] = field(default_factory=tuple)
    open: Open | None = None
    """Attributes the prompt leaves unstated (None: the prompt states everything). Written to
    JSON only when set, so fully specified scenes keep their JSON byte for byte."""

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal scenes give equal strings."""
        data = asdict(replace(self, open=None))
        del data["open"]
        data["items"] = [{k: v for k, v in it.items() if v is not None} for it in data["items"]]
        if self.open is not None:
            data["open"] = self.open.to_dict()
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Parse and check a scene JSON string; raises UserError naming the bad field."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise UserError(f"scene JSON: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise UserError("scene JSON: expected an object")
        return _scene_from_dict(data)

    @property
    def grid(self) -> tuple[int, int]:
        return GRIDS[self.aspect]

    def cell_box(self, cell: Cell) -> tuple[float, float, float, float]:
        """Pixel box (x0, y0, x1, y1) of a grid cell at the scene's size."""
        cols, rows = self.grid
        cw, ch = self.width / cols, self.height / rows
        return (cell[0] * cw, cell[1] * ch, (cell[0] + 1) * cw, (cell[1] + 1) * ch)

    def object_box(self, cell: Cell) -> tuple[float, float, float, float]:
        """Pixel box of the (square) object drawn in a cell."""
        x0, y0, x1, y1 = self.cell_box(cell)
        side = OBJECT_SCALE * min(x1 - x0, y1 - y0)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    def letter_box(self) -> tuple[float, float, float, float]:
        """Pixel box of the centred letter."""
        h = LETTER_SCALE * min(self.width, self.height)
        w = LETTER_ASPECT * h
        cx, cy = self.width / 2, self.height / 2
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)

    def free_cells(self) -> list[Cell]:
        """Grid cells holding no object, in reading order."""
        used = {it.cell for it in self.items}
        return [c for c in grid_cells(self.aspect) if c not in used]

    def names_background(self) -> bool:
        """Whether the prompt states the background (always for scenes, else when non-default)."""
        return self.category == "scene" or self.background != DEFAULT_BACKGROUND


@dataclass(frozen=True)
class Edit:
    """An instruction applied to a source scene. Exactly the fields of its type are set."""

    edit_type: str
    source: Scene
    item: int | None = None
    """Index into source.items of the item recoloured / removed / moved."""
    colour: str | None = None
    """New colour (recolour)."""
    cell: Cell | None = None
    """New cell (move)."""
    new_item: Item | None = None
    """Item added (add)."""
    background: str | None = None
    """New background (background)."""
    refer: str | None = None
    """Referring edits: the property (one of REFER_BY) the instruction names the item by."""
    open: Open | None = None
    """`add` with an underspecified item: the target scene's `open` (the added item's cell
    and/or colour options given the source)."""

    @property
    def base_type(self) -> str:
        """The operation: "recolour" for "recolour-ref", etc."""
        return base_edit_type(self.edit_type)

    def target(self) -> Scene:
        """The scene after the edit (items keep their order; an added item goes last)."""
        src = self.source
        items = list(src.items)
        kind = self.base_type
        if kind == "recolour":
            items[self.item] = replace(items[self.item], colour=self.colour)
        elif kind == "remove":
            del items[self.item]
        elif kind == "move":
            items[self.item] = replace(items[self.item], cell=self.cell)
        elif kind == "add":
            items.append(self.new_item)
            return replace(src, items=tuple(items), open=self.open)
        elif kind == "background":
            return replace(src, background=self.background)
        else:
            raise UserError(
                f"edit_type: unknown edit type {self.edit_type!r} (expected one of {', '.join(ALL_EDIT_TYPES)})"
            )
        return replace(src, items=tuple(items))


def base_edit_type(edit_type: str) -> str:
    """The operation of an edit type: a referring type ("move-ref") does its base type's edit."""
    return edit_type[: -len(REF_SUFFIX)] if edit_type in REF_EDIT_TYPES else edit_type


def _scene_from_dict(data: dict[str, Any]) -> Scene:
    def need(name: str, ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"scene JSON: field {name!r} {what}")

    need("category", data.get("category") in CATEGORIES, f"must be one of {', '.join(CATEGORIES)}")
    need("aspect", data.get("aspect") in ASPECTS, f"must be one of {', '.join(ASPECTS)}")
    for side in ("width", "height"):
        need(side, isinstance(data.get(side), int) and data[side] > 0, "must be a positive integer")
    need("background", data.get("background") in BACKGROUNDS, f"must be one of {', '.join(BACKGROUNDS)}")
    raw = data.get("items")
    need("items", isinstance(raw, list), "must be a list")
    cells = set(grid_cells(data["aspect"]))
    items = []
    for i, it in enumerate(raw):
        where = f"items[{i}]"
        need(where, isinstance(it, dict), "must be an object")
        shape, colour = it.get("shape"), it.get("colour")
        need(f"{where}.shape", shape in SHAPES or shape == LETTER, "must be a shape or 'letter'")
        need(f"{where}.colour", colour in COLOURS, f"must be one of {', '.join(COLOURS)}")
        if shape == LETTER:
            need(f"{where}.letter", it.get("letter") in LETTERS, f"must be one of {''.join(LETTERS)}")
            items.append(Item(shape, colour, None, it["letter"]))
        else:
            cell = it.get("cell")
            cell = tuple(cell) if isinstance(cell, list) else None
            need(f"{where}.cell", cell in cells, f"must be a cell of the {data['aspect']} grid")
            items.append(Item(shape, colour, cell))
    scene = Scene(data["category"], data["aspect"], data["width"], data["height"], data["background"], tuple(items))
    if data.get("open") is not None:
        scene = replace(scene, open=_open_from_dict(data["open"], scene, need))
    return scene


def _open_from_dict(raw: Any, scene: Scene, need) -> Open:
    """Parse the `open` field of a scene JSON (see `Open.to_dict`)."""
    need("open", isinstance(raw, dict), "must be an object")
    need("open.kind", raw.get("kind") in OPEN_KINDS, f"must be one of {', '.join(OPEN_KINDS)}")
    need("open.dist", raw.get("dist") == "uniform", "must be 'uniform'")
    background = raw.get("background")
    if background is not None:
        ok = isinstance(background, list) and background and all(b in BACKGROUNDS for b in background)
        need("open.background", ok, f"must be a non-empty list of {', '.join(BACKGROUNDS)}")
        background = tuple(background)
    items = raw.get("items", [])
    need("open.items", isinstance(items, list) and len(items) <= len(scene.items), "must be a list, one per item")
    valid = set(grid_cells(scene.aspect))
    cells: list[tuple[Cell, ...] | None] = []
    colours: list[tuple[str, ...] | None] = []
    for i, it in enumerate(items):
        where = f"open.items[{i}]"
        need(where, isinstance(it, dict), "must be an object")
        c = it.get("cell")
        if c is not None:
            opts = tuple(tuple(x) for x in c if isinstance(x, list)) if isinstance(c, list) else ()
            need(f"{where}.cell", opts and len(opts) == len(c) and set(opts) <= valid,
                 f"must be a non-empty list of cells of the {scene.aspect} grid")
            c = opts
        k = it.get("colour")
        if k is not None:
            ok = isinstance(k, list) and k and all(x in COLOURS for x in k)
            need(f"{where}.colour", ok, f"must be a non-empty list of {', '.join(COLOURS)}")
            k = tuple(k)
        cells.append(c)
        colours.append(k)
    def aligned(opts: list) -> tuple:  # () when nothing of this kind is open, as the sampler writes it
        return tuple(opts) if any(o is not None for o in opts) else ()

    return Open(raw["kind"], background, aligned(cells), aligned(colours))
