"""Seeded sampling of shapes scenes, edits and dataset rows.

Every row depends only on (seed, index) through `numpy.random.default_rng([seed, index])`, so
rows can be produced by parallel workers, resumed at any index, and reproduced bit for bit.
The evaluation set draws from a different seed stream (`[seed, EVAL_STREAM, task, i]`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import replace

import numpy as np

from flashctl.errors import UserError
from flashctl.shapes.language import instruction_for, prompt_for
from flashctl.shapes.render import render, to_png
from flashctl.shapes.scene import (
    ASPECTS,
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    DEFAULT_BACKGROUND,
    DEFAULT_SIZES,
    EDIT_TYPES,
    EDITS_BY_CATEGORY,
    LETTER,
    LETTERS,
    MAX_OBJECTS,
    SHAPES,
    Edit,
    Item,
    Scene,
    grid_cells,
)

EVAL_STREAM = 0xE7A1
"""Marker that keeps eval-set seeds apart from training-row seeds."""
SOURCE = "shapes"

_COLOUR_NAMES = tuple(COLOURS)
_BG_NAMES = tuple(BACKGROUNDS)


def _pick(rng: np.random.Generator, options) -> object:
    return options[int(rng.integers(len(options)))]


def _new_object(rng: np.random.Generator, scene: Scene, cells: list) -> Item:
    """A random shape in one of `cells` whose (colour, shape) is not yet in the scene."""
    taken = {it.key() for it in scene.items}
    free = [(c, s) for c in _COLOUR_NAMES for s in SHAPES if (c, s) not in taken]
    colour, shape = _pick(rng, free)
    return Item(shape, colour, _pick(rng, cells))


def sample_scene(
    rng: np.random.Generator, category: str, aspect: str, size: tuple[int, int], n_objects: int | None = None
) -> Scene:
    """A random scene of a category: `object` = 1 shape on white, `scene` = 2-3 shapes on a
    named background (`n_objects` forces the count), `text` = one centred letter on white."""
    width, height = int(size[0]), int(size[1])
    if category == "text":
        item = Item(LETTER, _pick(rng, _COLOUR_NAMES), None, _pick(rng, LETTERS))
        return Scene("text", aspect, width, height, DEFAULT_BACKGROUND, (item,))
    if category == "object":
        n, background = 1, DEFAULT_BACKGROUND
    else:
        n = n_objects or int(rng.integers(2, MAX_OBJECTS + 1))
        background = _pick(rng, _BG_NAMES)
    scene = Scene(category, aspect, width, height, background)
    cells = grid_cells(aspect)
    order = rng.permutation(len(cells))[:n]
    for k in order:
        item = _new_object(rng, scene, [cells[int(k)]])
        scene = replace(scene, items=scene.items + (item,))
    return scene


def sample_edit(rng: np.random.Generator, category: str, aspect: str, size: tuple[int, int], edit_type: str) -> Edit:
    """A random edit of `edit_type` on a fresh source scene of the category."""
    if edit_type not in EDITS_BY_CATEGORY[category]:
        raise UserError(f"edit_type: {edit_type!r} is not defined for category {category!r}")
    # `add` needs room for one more object; other scene edits use 2-3 objects.
    n_objects = MAX_OBJECTS - 1 if edit_type == "add" else None
    src = sample_scene(rng, category, aspect, size, n_objects)
    if edit_type == "background":
        return Edit("background", src, background=_pick(rng, [b for b in _BG_NAMES if b != src.background]))
    if edit_type == "add":
        return Edit("add", src, new_item=_new_object(rng, src, src.free_cells()))
    i = int(rng.integers(len(src.items)))
    item = src.items[i]
    if edit_type == "remove":
        return Edit("remove", src, item=i)
    if edit_type == "move":
        return Edit("move", src, item=i, cell=_pick(rng, src.free_cells()))
    # recolour: the new (colour, shape) must stay unique in the scene
    taken = {it.key() for it in src.items}
    colours = [c for c in _COLOUR_NAMES if c != item.colour and (c, item.key()[1]) not in taken]
    return Edit("recolour", src, item=i, colour=_pick(rng, colours))


def _choose(u: float, weights: Mapping[str, float], allowed: tuple[str, ...], field: str) -> str:
    """Inverse-CDF choice over `allowed` (canonical order, so dict order never matters)."""
    unknown = [k for k in weights if k not in allowed]
    if unknown:
        raise UserError(f"data.{field}: unknown key {unknown[0]!r} (expected one of {', '.join(allowed)})")
    w = np.array([float(weights.get(k, 0.0)) for k in allowed])
    if (w < 0).any() or not np.isfinite(w).all():
        raise UserError(f"data.{field}: weights must be finite and >= 0")
    if w.sum() <= 0:
        raise UserError(f"data.{field}: at least one weight must be > 0")
    cdf = np.cumsum(w) / w.sum()
    return allowed[min(int(np.searchsorted(cdf, u, side="right")), len(allowed) - 1)]


def _size(sizes: Mapping[str, tuple[int, int]], aspect: str) -> tuple[int, int]:
    if aspect not in sizes:
        raise UserError(f"data.sizes: no size for aspect {aspect!r}")
    w, h = sizes[aspect]
    if int(w) <= 0 or int(h) <= 0:
        raise UserError(f"data.sizes.{aspect}: {w}x{h} must be positive")
    return int(w), int(h)


def t2i_row(row_id: str, scene: Scene) -> dict:
    """A T2I dataset row for a scene (renders the image)."""
    return {
        "id": row_id,
        "task": "t2i",
        "category": scene.category,
        "aspect": scene.aspect,
        "width": scene.width,
        "height": scene.height,
        "prompt": prompt_for(scene),
        "edit_type": None,
        "image": to_png(render(scene)),
        "source_image": None,
        "scene": scene.to_json(),
        "source_scene": None,
        "source": SOURCE,
    }


def edit_row(row_id: str, edit: Edit) -> dict:
    """An edit dataset row (renders source and target)."""
    src, tgt = edit.source, edit.target()
    return {
        "id": row_id,
        "task": "edit",
        "category": src.category,
        "aspect": src.aspect,
        "width": src.width,
        "height": src.height,
        "prompt": instruction_for(edit),
        "edit_type": edit.edit_type,
        "image": to_png(render(tgt)),
        "source_image": to_png(render(src)),
        "scene": tgt.to_json(),
        "source_scene": src.to_json(),
        "source": SOURCE,
    }


def _defaults(categories, aspects, sizes):
    return (
        categories if categories is not None else {c: 1.0 for c in CATEGORIES},
        aspects if aspects is not None else {a: 1.0 for a in ASPECTS},
        sizes if sizes is not None else DEFAULT_SIZES,
    )


def record_at(
    index: int,
    seed: int,
    *,
    categories: Mapping[str, float] | None = None,
    aspects: Mapping[str, float] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    edit_fraction: float = 0.5,
) -> dict:
    """Row `index` of the shapes dataset `seed`: category and aspect drawn by weight (0 =
    never), task = edit with probability `edit_fraction`, edit type uniform over those the
    category supports. Deterministic per (seed, index)."""
    categories, aspects, sizes = _defaults(categories, aspects, sizes)
    if not 0.0 <= edit_fraction <= 1.0:
        raise UserError(f"data.edit_fraction: {edit_fraction} must be in [0, 1]")
    rng = np.random.default_rng([int(seed), int(index)])
    u_cat, u_aspect, u_task = rng.random(3)  # fixed draws first: weights change only their own pick
    category = _choose(u_cat, categories, CATEGORIES, "categories")
    aspect = _choose(u_aspect, aspects, ASPECTS, "aspects")
    size = _size(sizes, aspect)
    row_id = f"{SOURCE}-{seed}-{index}"
    if u_task < edit_fraction:
        kinds = EDITS_BY_CATEGORY[category]
        return edit_row(row_id, sample_edit(rng, category, aspect, size, _pick(rng, kinds)))
    return t2i_row(row_id, sample_scene(rng, category, aspect, size))


def generate(
    n: int,
    seed: int,
    *,
    categories: Mapping[str, float] | None = None,
    aspects: Mapping[str, float] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    edit_fraction: float = 0.5,
    start: int = 0,
) -> Iterator[dict]:
    """Rows start .. start+n-1 of the shapes dataset `seed` (see `record_at`)."""
    for index in range(start, start + n):
        yield record_at(
            index, seed, categories=categories, aspects=aspects, sizes=sizes, edit_fraction=edit_fraction
        )


def _enabled(weights: Mapping[str, float] | None, allowed: tuple[str, ...], field: str) -> list[str]:
    if weights is None:
        return list(allowed)
    _choose(0.0, weights, allowed, field)  # validates
    return [k for k in allowed if weights.get(k, 0.0) > 0]


def _diagonal(k: int, cats: list[str], asps: list[str]) -> tuple[str, str]:
    """k-th (category, aspect) pair, ordered so every prefix is balanced over both."""
    nc, na = len(cats), len(asps)
    return cats[k % nc], asps[(k % na + k // math.lcm(nc, na)) % na]


def eval_set(
    seed: int,
    n_t2i: int,
    n_edit: int,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    categories: Mapping[str, float] | None = None,
    aspects: Mapping[str, float] | None = None,
) -> list[dict]:
    """A fixed evaluation set: `n_t2i` T2I rows cycling over categories x aspects, then
    `n_edit` edit rows cycling over edit types (x the categories that support them x aspects).
    Same rows on every call; seeds disjoint from `record_at` rows. Weights only filter (> 0)."""
    cats = _enabled(categories, CATEGORIES, "categories")
    asps = _enabled(aspects, ASPECTS, "aspects")
    sizes = sizes if sizes is not None else DEFAULT_SIZES
    rows = []
    for i in range(n_t2i):
        category, aspect = _diagonal(i, cats, asps)
        rng = np.random.default_rng([int(seed), EVAL_STREAM, 0, i])
        scene = sample_scene(rng, category, aspect, _size(sizes, aspect))
        rows.append(t2i_row(f"{SOURCE}-eval-{seed}-t2i-{i}", scene))
    kinds = [k for k in EDIT_TYPES if any(k in EDITS_BY_CATEGORY[c] for c in cats)]
    for i in range(n_edit):
        kind = kinds[i % len(kinds)]
        kind_cats = [c for c in cats if kind in EDITS_BY_CATEGORY[c]]
        category, aspect = _diagonal(i // len(kinds), kind_cats, asps)
        rng = np.random.default_rng([int(seed), EVAL_STREAM, 1, i])
        edit = sample_edit(rng, category, aspect, _size(sizes, aspect), kind)
        rows.append(edit_row(f"{SOURCE}-eval-{seed}-edit-{i}", edit))
    return rows
