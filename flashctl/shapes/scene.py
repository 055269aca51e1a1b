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
EDITS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    "object": EDIT_TYPES,
    "scene": EDIT_TYPES,
    "text": ("recolour", "background"),
}
"""Edit types that make sense per category (a text scene holds one centred letter)."""
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
class Scene:
    """A full description of one image: size, background and items (in prompt order)."""

    category: str
    aspect: str
    width: int
    height: int
    background: str = DEFAULT_BACKGROUND
    items: tuple[Item, ...] = field(default_factory=tuple)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): equal scenes give equal strings."""
        data = asdict(self)
        data["items"] = [{k: v for k, v in it.items() if v is not None} for it in data["items"]]
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

    def target(self) -> Scene:
        """The scene after the edit (items keep their order; an added item goes last)."""
        src = self.source
        items = list(src.items)
        if self.edit_type == "recolour":
            items[self.item] = replace(items[self.item], colour=self.colour)
        elif self.edit_type == "remove":
            del items[self.item]
        elif self.edit_type == "move":
            items[self.item] = replace(items[self.item], cell=self.cell)
        elif self.edit_type == "add":
            items.append(self.new_item)
        elif self.edit_type == "background":
            return replace(src, background=self.background)
        else:
            raise UserError(f"edit_type: unknown edit type {self.edit_type!r} (expected one of {', '.join(EDIT_TYPES)})")
        return replace(src, items=tuple(items))


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
    return Scene(data["category"], data["aspect"], data["width"], data["height"], data["background"], tuple(items))
