"""Seeded sampling of shapes scenes, edits and dataset rows.

Every row depends only on (seed, index) through `numpy.random.default_rng([seed, index])`, so
rows can be produced by parallel workers, resumed at any index, and reproduced bit for bit.
The evaluation set draws from a different seed stream (`[seed, EVAL_STREAM, task, i]`).

Underspecified prompts and referring edits are decided from a *side* stream
(`[seed, index, OPEN_STREAM]`) that the main stream never sees: the scene is drawn exactly as
before and only the prompt drops the open attributes, so with `open_attributes=0` and
`ref_edits=0` every row is byte-identical to the fully specified world's, and with shares > 0
the rows that stay fully specified are too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import replace

import numpy as np

from flashctl.errors import UserError
from flashctl.shapes.language import instruction_for, prompt_for, referents, vocabulary_texts
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
    OPEN_KINDS,
    OPEN_KINDS_BY_CATEGORY,
    REF_EDIT_TYPES,
    REF_EDITS_BY_CATEGORY,
    REF_SUFFIX,
    SHAPES,
    Edit,
    Item,
    Open,
    Scene,
    base_edit_type,
    grid_cells,
)

EVAL_STREAM = 0xE7A1
"""Marker that keeps eval-set seeds apart from training-row seeds."""
OPEN_STREAM = 0x0BE7
"""Marker of the side stream that decides open attributes and referring edits."""
SOURCE = "shapes"
ADD_OPEN_KINDS = ("position", "colour", "both")
"""Open kinds of an `add` instruction ("add a red circle", "add a circle at the top left", "add a circle")."""
OpenShare = float | Mapping[str, float]
"""`data.open_attributes`: a share in [0, 1] (spread evenly over the kinds a row's category
allows) or {kind: share} over OPEN_KINDS (a row picks among the kinds its category allows,
the rest of the time it is fully specified; shares sum to <= 1)."""

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


def open_for(scene: Scene, kind: str) -> Open:
    """The `Open` of a T2I scene whose prompt leaves `kind` unstated. Options are the marginal
    distribution given the prompt: the sampler is symmetric under permutations of colours and
    of cells, so each item's colour is uniform over all colours, its cell uniform over the
    grid, and a scene's background uniform over the backgrounds."""
    if kind not in OPEN_KINDS_BY_CATEGORY[scene.category]:
        raise UserError(f"data.open_attributes: kind {kind!r} does not apply to {scene.category!r} prompts")
    n = len(scene.items)
    cells = tuple(grid_cells(scene.aspect)) if kind in ("position", "both") else None
    colours = _COLOUR_NAMES if kind in ("colour", "both") else None
    return Open(
        kind,
        _BG_NAMES if kind == "background" else None,
        (cells,) * n if cells else (),
        (colours,) * n if colours else (),
    )


def _add_open(src: Scene, new_item: Item, kind: str) -> Open:
    """The target's `Open` of an `add` whose new item leaves `kind` unstated: any free cell of
    the source, any colour that keeps (colour, shape) unique (how `_new_object` draws them)."""
    n = len(src.items)
    taken = {it.key() for it in src.items}
    cells = tuple(src.free_cells()) if kind in ("position", "both") else None
    colours = tuple(c for c in _COLOUR_NAMES if (c, new_item.shape) not in taken) if kind in ("colour", "both") else None
    return Open(
        kind, None,
        (None,) * n + (cells,) if cells else (),
        (None,) * n + (colours,) if colours else (),
    )


def sample_scene(
    rng: np.random.Generator,
    category: str,
    aspect: str,
    size: tuple[int, int],
    n_objects: int | None = None,
    open_kind: str | None = None,
) -> Scene:
    """A random scene of a category: `object` = 1 shape on white, `scene` = 2-3 shapes on a
    named background (`n_objects` forces the count), `text` = one centred letter on white.
    `open_kind` (OPEN_KINDS) marks attributes the prompt leaves unstated; the draws are the
    same either way."""
    width, height = int(size[0]), int(size[1])
    if category == "text":
        item = Item(LETTER, _pick(rng, _COLOUR_NAMES), None, _pick(rng, LETTERS))
        scene = Scene("text", aspect, width, height, DEFAULT_BACKGROUND, (item,))
        return replace(scene, open=open_for(scene, open_kind)) if open_kind else scene
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
    return replace(scene, open=open_for(scene, open_kind)) if open_kind else scene


def sample_edit(
    rng: np.random.Generator,
    category: str,
    aspect: str,
    size: tuple[int, int],
    edit_type: str,
    open_kind: str | None = None,
) -> Edit:
    """A random edit of `edit_type` on a fresh source scene of the category. Referring types
    (REF_EDIT_TYPES, scenes only) name the item by one property that singles it out, drawn
    uniformly among those that do. `open_kind` (ADD_OPEN_KINDS, `add` only) leaves the new
    item's position and/or colour unstated."""
    if edit_type not in EDITS_BY_CATEGORY[category] + REF_EDITS_BY_CATEGORY[category]:
        raise UserError(f"edit_type: {edit_type!r} is not defined for category {category!r}")
    if open_kind is not None and (edit_type != "add" or open_kind not in ADD_OPEN_KINDS):
        raise UserError(f"data.open_attributes: {edit_type!r} edits cannot leave {open_kind!r} open")
    kind = base_edit_type(edit_type)
    # `add` needs room for one more object; other scene edits use 2-3 objects.
    n_objects = MAX_OBJECTS - 1 if kind == "add" else None
    src = sample_scene(rng, category, aspect, size, n_objects)
    if kind == "background":
        return Edit("background", src, background=_pick(rng, [b for b in _BG_NAMES if b != src.background]))
    if kind == "add":
        new_item = _new_object(rng, src, src.free_cells())
        return Edit("add", src, new_item=new_item, open=_add_open(src, new_item, open_kind) if open_kind else None)
    i = int(rng.integers(len(src.items)))
    item = src.items[i]
    if kind == "remove":
        edit = Edit(edit_type, src, item=i)
    elif kind == "move":
        edit = Edit(edit_type, src, item=i, cell=_pick(rng, src.free_cells()))
    else:  # recolour: the new (colour, shape) must stay unique in the scene
        taken = {it.key() for it in src.items}
        colours = [c for c in _COLOUR_NAMES if c != item.colour and (c, item.key()[1]) not in taken]
        edit = Edit(edit_type, src, item=i, colour=_pick(rng, colours))
    if edit_type in REF_EDIT_TYPES:  # drawn last: a referring edit is its plain edit, renamed
        edit = replace(edit, refer=_pick(rng, referents(src, i)))
    return edit


def resample_open(scene: Scene, rng: np.random.Generator, tries: int = 200) -> Scene:
    """Another realisation of the same prompt: each open attribute redrawn uniformly from its
    options, keeping the world's rules (one item per cell, (colour, shape) unique). A valid
    image for the row's prompt (for tests: blends of two modes, diversity references); its
    joint law is close to, not exactly, the data's."""
    op = scene.open
    if op is None:
        return scene
    for _ in range(tries):
        items = []
        for i, it in enumerate(scene.items):
            cells, colours = op.cell_options(i), op.colour_options(i)
            cell = _pick(rng, cells) if cells else it.cell
            colour = _pick(rng, colours) if colours else it.colour
            items.append(replace(it, cell=cell, colour=colour))
        shape_cells = [it.cell for it in items if not it.is_letter]
        keys = [it.key() for it in items]
        if len(set(shape_cells)) == len(shape_cells) and len(set(keys)) == len(keys):
            background = _pick(rng, op.background) if op.background else scene.background
            return replace(scene, items=tuple(items), background=background)
    raise RuntimeError(f"no valid realisation of {prompt_for(scene)!r} in {tries} tries")


def _check_share(value: float, field: str) -> float:
    value = float(value)
    if not (np.isfinite(value) and 0.0 <= value <= 1.0):
        raise UserError(f"data.{field}: {value} must be in [0, 1]")
    return value


def check_open_attributes(open_attributes: OpenShare) -> None:
    """Raise UserError (naming `data.open_attributes`) unless it is a share in [0, 1] or a
    {kind: share} mapping over OPEN_KINDS with shares >= 0 summing to <= 1."""
    if isinstance(open_attributes, Mapping):
        unknown = [k for k in open_attributes if k not in OPEN_KINDS]
        if unknown:
            raise UserError(f"data.open_attributes: unknown kind {unknown[0]!r} (expected one of {', '.join(OPEN_KINDS)})")
        shares = [_check_share(v, f"open_attributes.{k}") for k, v in open_attributes.items()]
        if sum(shares) > 1.0 + 1e-9:
            raise UserError(f"data.open_attributes: shares sum to {sum(shares):g} > 1")
    else:
        _check_share(open_attributes, "open_attributes")


def open_kind(u: float, open_attributes: OpenShare, allowed: tuple[str, ...]) -> str | None:
    """The open kind of a row from one uniform draw `u` (None: fully specified). A share p
    opens the row when u < p, the kind then uniform over `allowed`; a mapping walks the
    cumulative shares of the allowed kinds in OPEN_KINDS order."""
    if isinstance(open_attributes, Mapping):
        acc = 0.0
        for k in OPEN_KINDS:
            if k in allowed:
                acc += float(open_attributes.get(k, 0.0))
                if u < acc:
                    return k
        return None
    p = float(open_attributes)
    if not allowed or u >= p:
        return None
    return allowed[min(int(u / p * len(allowed)), len(allowed) - 1)]


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
    open_attributes: OpenShare = 0.0,
    ref_edits: float = 0.0,
) -> dict:
    """Row `index` of the shapes dataset `seed`: category and aspect drawn by weight (0 =
    never), task = edit with probability `edit_fraction`, edit type uniform over those the
    category supports. Deterministic per (seed, index).

    `open_attributes` (see OpenShare) is the share of T2I rows and of `add` edits whose
    prompt leaves attributes open (the scene JSON then carries `open`); `ref_edits` the share
    of recolour/remove/move edits on scenes that name the item by one property instead
    (`recolour-ref`, ...). Both come from a side stream: at 0 the rows are today's, bit for bit."""
    categories, aspects, sizes = _defaults(categories, aspects, sizes)
    if not 0.0 <= edit_fraction <= 1.0:
        raise UserError(f"data.edit_fraction: {edit_fraction} must be in [0, 1]")
    check_open_attributes(open_attributes)
    _check_share(ref_edits, "ref_edits")
    rng = np.random.default_rng([int(seed), int(index)])
    u_cat, u_aspect, u_task = rng.random(3)  # fixed draws first: weights change only their own pick
    u_open, u_ref = np.random.default_rng([int(seed), int(index), OPEN_STREAM]).random(2)
    category = _choose(u_cat, categories, CATEGORIES, "categories")
    aspect = _choose(u_aspect, aspects, ASPECTS, "aspects")
    size = _size(sizes, aspect)
    row_id = f"{SOURCE}-{seed}-{index}"
    if u_task < edit_fraction:
        kinds = EDITS_BY_CATEGORY[category]
        kind = _pick(rng, kinds)
        if u_ref < ref_edits and kind + REF_SUFFIX in REF_EDITS_BY_CATEGORY[category]:
            kind += REF_SUFFIX
        add_open = open_kind(u_open, open_attributes, ADD_OPEN_KINDS) if kind == "add" else None
        return edit_row(row_id, sample_edit(rng, category, aspect, size, kind, add_open))
    t2i_open = open_kind(u_open, open_attributes, OPEN_KINDS_BY_CATEGORY[category])
    return t2i_row(row_id, sample_scene(rng, category, aspect, size, open_kind=t2i_open))


def generate(
    n: int,
    seed: int,
    *,
    categories: Mapping[str, float] | None = None,
    aspects: Mapping[str, float] | None = None,
    sizes: Mapping[str, tuple[int, int]] | None = None,
    edit_fraction: float = 0.5,
    start: int = 0,
    open_attributes: OpenShare = 0.0,
    ref_edits: float = 0.0,
) -> Iterator[dict]:
    """Rows start .. start+n-1 of the shapes dataset `seed` (see `record_at`)."""
    for index in range(start, start + n):
        yield record_at(
            index, seed, categories=categories, aspects=aspects, sizes=sizes, edit_fraction=edit_fraction,
            open_attributes=open_attributes, ref_edits=ref_edits,
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
    open_attributes: OpenShare = 0.0,
    ref_edits: float = 0.0,
) -> list[dict]:
    """A fixed evaluation set: `n_t2i` T2I rows cycling over categories x aspects, then
    `n_edit` edit rows cycling over edit types (x the categories that support them x aspects).
    Same rows on every call; seeds disjoint from `record_at` rows. Weights only filter (> 0).
    `open_attributes` opens T2I rows and `add` edits as in `record_at` (side stream per row);
    `ref_edits` > 0 adds the referring types (REF_EDIT_TYPES) to the cycle of edit types.
    With both 0 the rows are the fully specified world's, bit for bit."""
    check_open_attributes(open_attributes)
    _check_share(ref_edits, "ref_edits")
    cats = _enabled(categories, CATEGORIES, "categories")
    asps = _enabled(aspects, ASPECTS, "aspects")
    sizes = sizes if sizes is not None else DEFAULT_SIZES
    rows = []
    for i in range(n_t2i):
        category, aspect = _diagonal(i, cats, asps)
        rng = np.random.default_rng([int(seed), EVAL_STREAM, 0, i])
        u_open = np.random.default_rng([int(seed), EVAL_STREAM, 0, i, OPEN_STREAM]).random()
        kind = open_kind(u_open, open_attributes, OPEN_KINDS_BY_CATEGORY[category])
        scene = sample_scene(rng, category, aspect, _size(sizes, aspect), open_kind=kind)
        rows.append(t2i_row(f"{SOURCE}-eval-{seed}-t2i-{i}", scene))

    def supports(kind: str, cat: str) -> bool:
        return kind in EDITS_BY_CATEGORY[cat] + REF_EDITS_BY_CATEGORY[cat]

    types = EDIT_TYPES + (REF_EDIT_TYPES if ref_edits > 0 else ())
    kinds = [k for k in types if any(supports(k, c) for c in cats)]
    for i in range(n_edit):
        kind = kinds[i % len(kinds)]
        kind_cats = [c for c in cats if supports(kind, c)]
        category, aspect = _diagonal(i // len(kinds), kind_cats, asps)
        rng = np.random.default_rng([int(seed), EVAL_STREAM, 1, i])
        u_open = np.random.default_rng([int(seed), EVAL_STREAM, 1, i, OPEN_STREAM]).random()
        add_open = open_kind(u_open, open_attributes, ADD_OPEN_KINDS) if kind == "add" else None
        edit = sample_edit(rng, category, aspect, _size(sizes, aspect), kind, add_open)
        rows.append(edit_row(f"{SOURCE}-eval-{seed}-edit-{i}", edit))
    return rows


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Texts covering the whole vocabulary (templated sentences + `n` sampled prompts and
    instructions), for training the tokenizer offline. Deterministic per (n, seed)."""
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
