"""Programmatic verifier of shapes images (GenEval-style, at 32-48 px).

It reads an image back into the scene grammar and checks each claim of the prompt or edit:

* background: the background colour (nearest background palette entry covering most pixels);
* foreground: per-pixel distance from the measured background colour, ramped to [0, 1], so
  blur and noise degrade it smoothly;
* objects: a grid cell is occupied when its mean foreground exceeds OCCUPIED; its colour is
  the nearest palette colour of the median strongly-foreground pixel; its shape is the
  template (circle, square, triangle) of equal area centred on the blob's centroid with the
  highest soft IoU (our own renderer draws the templates);
* letters: soft IoU against every letter rendered by our renderer, over small shifts;
* edits: the target scene's claims, the instruction's own claim (`edited`) and `preserved`:
  pixels the edit must not touch stay close to the source image.

A record is correct iff all its claims hold. Images of any size are resized to the record's.

Rows whose prompt leaves attributes open (`Scene.open`, see `shapes.sample`) are checked for
what the prompt states, with each open attribute allowed any of its options (items are
matched to occupied cells by an assignment that respects every stated attribute), plus
well-formedness, so that a blend of two valid images (modes) fails:

* `clean`: every object, letter and the background is one palette colour (median within
  CLEAN_TOL of the nearest palette entry: the mid-point of any two object colours is >= 63
  away from every palette colour) and every blob is a recognisable shape (IoU >= SHAPE_MIN);
* `no_ghost`: no cell is half-present (GHOST <= coverage < OCCUPIED), and for letters no
  stray foreground outside the letter box;
* `count` (as for fully specified rows): exactly the stated number of items.

Fully specified rows get exactly the claims they always had (the shipped teachers' numbers
do not move).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from flashctl.errors import UserError
from flashctl.shapes.render import from_png, item_mask, letter_mask, shape_mask
from flashctl.shapes.scene import (
    BACKGROUNDS,
    COLOURS,
    LETTERS,
    SHAPES,
    Cell,
    Item,
    Scene,
    base_edit_type,
    grid_cells,
)

OCCUPIED = 0.12
"""Mean foreground coverage above which a cell holds an object (a triangle covers ~0.32)."""
FG_LO, FG_HI = 40.0, 80.0
"""RGB distance from the background mapped to foreground 0 .. 1 (object colours are >= 115
away from every background; noise of std 8 stays well below FG_LO)."""
STRONG = 0.75
"""Foreground level of the pixels whose colour is read."""
PRESERVE_TOL = 30.0
"""Max mean absolute difference (0-255 scale) between output and source in each region the
edit must not change (a grid cell, or an item's interior for background edits)."""
PRESERVE_SHIFT = 1
"""Pixels the whole output may sit off the source for `preserved`."""
LETTER_SHIFT = 2
"""Pixels a generated letter may sit off-centre."""
LETTER_PRESENT = 0.1
"""Mean foreground inside the letter box above which a letter is present."""
CLEAN_TOL = 45.0
"""Max RGB distance of a region's median colour from its palette colour for `clean` (open
rows). Mid-points of two object colours lie >= 63.6 from every palette colour."""
SHAPE_MIN = 0.6
"""Min soft IoU of a blob with its best shape template for `clean` (open rows)."""
GHOST = 0.04
"""Mean cell coverage from which a cell that is not occupied counts as a ghost (open rows)."""
_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
_BG_NAMES = list(BACKGROUNDS)
_OBJ_NAMES = list(COLOURS)
_PALETTE = np.array([BACKGROUNDS[n] for n in _BG_NAMES] + [COLOURS[n] for n in _OBJ_NAMES], np.float32)


@dataclass(frozen=True)
class Blob:
    """What the verifier sees in an occupied cell."""

    colour: str
    shape: str
    coverage: float
    colour_dist: float = 0.0
    """RGB distance of the median strong-foreground pixel from `colour`."""
    shape_iou: float = 1.0
    """Soft IoU with the `shape` template."""


@dataclass
class Reading:
    """An image read back into the grammar."""

    pixels: np.ndarray
    """(H, W, 3) float32 at the scene's size."""
    background: str
    fg: np.ndarray
    """(H, W) foreground in [0, 1]."""
    cells: dict[Cell, Blob | None]
    letter: str | None = None
    letter_colour: str | None = None
    letter_present: bool = False
    coverage: dict[Cell, float] | None = None
    """Mean foreground per grid cell (occupied or not)."""
    background_dist: float = 0.0
    """RGB distance of the measured background from its palette colour."""
    letter_colour_dist: float = 0.0
    stray: float = 0.0
    """Mean foreground outside the (dilated) letter box, for letter scenes."""


def load_pixels(image: Image.Image | bytes, width: int, height: int) -> np.ndarray:
    """(H, W, 3) float32 pixels of an image (PIL or PNG bytes) resized to width x height."""
    img = from_png(image) if isinstance(image, (bytes, bytearray)) else image.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def read_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, measured RGB) of the background: the background colour that most pixels are
    nearest to, among all palette colours; the RGB is the median of those pixels."""
    flat = pixels.reshape(-1, 3)
    labels = ((flat[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(labels, minlength=len(_PALETTE))[: len(_BG_NAMES)]
    k = int(counts.argmax())
    rgb = np.median(flat[labels == k], axis=0) if counts[k] else _PALETTE[k]
    return _BG_NAMES[k], rgb


def foreground(pixels: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """(H, W) soft foreground: distance from the background colour ramped to [0, 1]."""
    dist = np.sqrt(((pixels - bg_rgb) ** 2).sum(-1))
    return np.clip((dist - FG_LO) / (FG_HI - FG_LO), 0.0, 1.0)


def nearest_colour(pixels: np.ndarray, fg: np.ndarray) -> str:
    """Object colour of a region: nearest palette colour of its median strong-foreground pixel."""
    sel = pixels[fg >= STRONG]
    if len(sel) == 0:
        sel = pixels[fg >= fg.max() * 0.9]
    med = np.median(sel.reshape(-1, 3), axis=0)
    obj = _PALETTE[len(_BG_NAMES):]
    return _OBJ_NAMES[int(((obj - med) ** 2).sum(-1).argmin())]


def core_colour_dist(pixels: np.ndarray, fg: np.ndarray, bg_rgb: np.ndarray, colour: str) -> float:
    """RGB distance from `colour` of a region's core: the median of the strong-foreground
    pixels farthest from the background (top half), so anti-aliased and blurred edges, which
    mix towards the background, do not count while a blend of two colours (uniform) does."""
    sel = pixels[fg >= STRONG].reshape(-1, 3)
    if len(sel) == 0:
        return float("inf")
    far = np.sqrt(((sel - bg_rgb) ** 2).sum(-1))
    core = sel[far >= np.median(far)]
    med = np.median(core, axis=0)
    return float(np.sqrt(((med - np.array(COLOURS[colour], np.float32)) ** 2).sum()))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    den = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / den) if den > 0 else 0.0


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """Soft IoU of a blob with each shape template of equal area, aligned on its centroid."""
    mass = float(mask.sum())
    h, w = mask.shape
    if mass <= 0:
        return {s: 0.0 for s in SHAPES}
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((mask * xs).sum() / mass), float((mask * ys).sum() / mass)
    scores = {}
    for s in SHAPES:
        side = math.sqrt(mass / _AREA[s])
        box_cy = cy - side / 6 if s == "triangle" else cy  # a triangle's centroid is 2/3 down
        scores[s] = _iou(mask, shape_mask(s, cx, box_cy, side, w, h))
    return scores


def letter_scores(fg: np.ndarray) -> dict[str, float]:
    """Best soft IoU of the foreground with each letter template over shifts of +-LETTER_SHIFT px."""
    h, w = fg.shape
    out = {}
    for letter in LETTERS:
        t = letter_mask(letter, w, h)
        best = 0.0
        for dy in range(-LETTER_SHIFT, LETTER_SHIFT + 1):
            for dx in range(-LETTER_SHIFT, LETTER_SHIFT + 1):
                best = max(best, _iou(fg, np.roll(t, (dy, dx), axis=(0, 1))))
        out[letter] = best
    return out


def _box(box: tuple[float, float, float, float]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = (round(v) for v in box)
    return slice(max(y0, 0), y1), slice(max(x0, 0), x1)


def read(image: Image.Image | bytes, scene: Scene) -> Reading:
    """Read an image at the scene's size into background, occupied cells and letter."""
    pixels = load_pixels(image, scene.width, scene.height)
    background, bg_rgb = read_background(pixels)
    fg = foreground(pixels, bg_rgb)
    cells: dict[Cell, Blob | None] = {}
    covered: dict[Cell, float] = {}
    for cell in grid_cells(scene.aspect):
        sl = _box(scene.cell_box(cell))
        m = fg[sl]
        coverage = covered[cell] = float(m.mean())
        if coverage < OCCUPIED:
            cells[cell] = None
            continue
        scores = shape_scores(m)
        best = max(scores, key=scores.get)
        colour = nearest_colour(pixels[sl], m)
        dist = core_colour_dist(pixels[sl], m, bg_rgb, colour)
        cells[cell] = Blob(colour, best, coverage, dist, scores[best])
    bg_dist = float(np.sqrt(((bg_rgb - np.array(BACKGROUNDS[background], np.float32)) ** 2).sum()))
    reading = Reading(pixels, background, fg, cells, coverage=covered, background_dist=bg_dist)
    if any(it.is_letter for it in scene.items):
        sl = _box(scene.letter_box())
        reading.letter_present = float(fg[sl].mean()) >= LETTER_PRESENT
        x0, y0, x1, y1 = scene.letter_box()
        outside = np.ones(fg.shape, bool)
        outside[_box((x0 - 2, y0 - 2, x1 + 2, y1 + 2))] = False
        reading.stray = float(fg[outside].mean()) if outside.any() else 0.0
        if reading.letter_present:
            scores = letter_scores(fg)
            reading.letter = max(scores, key=scores.get)
            reading.letter_colour = nearest_colour(pixels, fg)
            reading.letter_colour_dist = core_colour_dist(pixels, fg, bg_rgb, reading.letter_colour)
    return reading


def _matches(blob: Blob | None, item: Item) -> bool:
    return blob is not None and blob.colour == item.colour and blob.shape == item.shape


def _allowed(scene: Scene, i: int) -> tuple[set[Cell], set[str]]:
    """(cells, colours) item i may take: its own, or its options where the prompt leaves them open."""
    it, op = scene.items[i], scene.open
    cells = op.cell_options(i) if op is not None else None
    colours = op.colour_options(i) if op is not None else None
    return set(cells or [it.cell]), set(colours or [it.colour])


def match_items(reading: Reading, scene: Scene) -> dict[int, Cell | None]:
    """Item index -> the occupied cell it is read in (None: not found), for the shape items:
    the injective assignment that satisfies the most items, each blob in an allowed cell with
    the item's shape and an allowed colour (ties: earliest items first, cells in reading order).
    At most 3 items and 6 cells, so every assignment is tried."""
    idx = [i for i, it in enumerate(scene.items) if not it.is_letter]
    ok: dict[int, list[Cell]] = {}
    for i in idx:
        cells, colours = _allowed(scene, i)
        ok[i] = [
            c for c in grid_cells(scene.aspect)
            if c in cells and (b := reading.cells.get(c)) is not None
            and b.shape == scene.items[i].shape and b.colour in colours
        ]
    best: dict[int, Cell | None] = {i: None for i in idx}
    best_n = 0

    def walk(k: int, used: set[Cell], cur: dict[int, Cell | None], n: int) -> None:
        nonlocal best, best_n
        if k == len(idx):
            if n > best_n:
                best, best_n = dict(cur), n
            return
        i = idx[k]
        for c in ok[i]:
            if c not in used:
                cur[i] = c
                walk(k + 1, used | {c}, cur, n + 1)
        cur[i] = None
        walk(k + 1, used, cur, n)

    walk(0, set(), {}, 0)
    return best


def _open_claims(reading: Reading, scene: Scene) -> dict[str, bool]:
    """Claims of a prompt with open attributes: stated attributes, open ones within their
    options, and well-formedness (`clean`, `no_ghost`)."""
    op = scene.open
    claims: dict[str, bool] = {}
    if op.background is not None:
        claims["background"] = reading.background in op.background
    elif scene.names_background():
        claims["background"] = reading.background == scene.background
    shapes = [it for it in scene.items if not it.is_letter]
    if len(shapes) == len(scene.items):
        claims["count"] = sum(b is not None for b in reading.cells.values()) == len(shapes)
    assigned = match_items(reading, scene)
    for i, it in enumerate(scene.items):
        p = f"obj{i}."
        cells, colours = _allowed(scene, i)
        if it.is_letter:
            claims[p + "present"] = reading.letter_present
            claims[p + "letter"] = reading.letter == it.letter
            claims[p + "colour"] = reading.letter_colour in colours
            continue
        claims[p + "present"] = assigned[i] is not None
        in_place = [b for c, b in reading.cells.items() if c in cells and b is not None]
        claims[p + "position"] = bool(in_place)
        claims[p + "colour"] = any(b.colour in colours for b in in_place)
        claims[p + "shape"] = any(b.shape == it.shape for b in in_place)
    blobs = [b for b in reading.cells.values() if b is not None] if shapes else []
    clean = reading.background_dist <= CLEAN_TOL and all(
        b.colour_dist <= CLEAN_TOL and b.shape_iou >= SHAPE_MIN for b in blobs
    )
    if reading.letter_present:
        clean = clean and reading.letter_colour_dist <= CLEAN_TOL
    claims["clean"] = clean
    if shapes and len(shapes) == len(scene.items):
        claims["no_ghost"] = all(
            reading.cells[c] is not None or v < GHOST for c, v in (reading.coverage or {}).items()
        )
    else:
        claims["no_ghost"] = reading.stray < GHOST
    return claims


def realised(reading: Reading, scene: Scene) -> dict[str, object]:
    """The values an image gives the open attributes of `scene` ({"obj0.cell": [c, r],
    "obj0.colour": "red", "background": "gray"}; an item not found is left out)."""
    op = scene.open
    if op is None:
        return {}
    out: dict[str, object] = {}
    if op.background is not None:
        out["background"] = reading.background
    assigned = match_items(reading, scene)
    for i, it in enumerate(scene.items):
        if it.is_letter:
            if op.colour_options(i) is not None and reading.letter_present:
                out[f"obj{i}.colour"] = reading.letter_colour
            continue
        cell = assigned.get(i)
        if cell is None:
            continue
        if op.cell_options(i) is not None:
            out[f"obj{i}.cell"] = list(cell)
        if op.colour_options(i) is not None:
            out[f"obj{i}.colour"] = reading.cells[cell].colour
    return out


def _t2i_claims(reading: Reading, scene: Scene) -> dict[str, bool]:
    if scene.open is not None:
        return _open_claims(reading, scene)
    claims: dict[str, bool] = {}
    if scene.names_background():
        claims["background"] = reading.background == scene.background
    shapes = [it for it in scene.items if not it.is_letter]
    if len(shapes) == len(scene.items):  # object scenes: nothing more, nothing less
        claims["count"] = sum(b is not None for b in reading.cells.values()) == len(shapes)
    for i, it in enumerate(scene.items):
        p = f"obj{i}."
        if it.is_letter:
            claims[p + "present"] = reading.letter_present
            claims[p + "letter"] = reading.letter == it.letter
            claims[p + "colour"] = reading.letter_colour == it.colour
            continue
        blob = reading.cells.get(it.cell)
        claims[p + "present"] = any(_matches(b, it) for b in reading.cells.values())
        claims[p + "position"] = blob is not None
        claims[p + "colour"] = blob is not None and blob.colour == it.colour
        claims[p + "shape"] = blob is not None and blob.shape == it.shape
    return claims


def verify_t2i(image: Image.Image | bytes, scene_json: str) -> dict[str, bool]:
    """Check every claim of the scene's prompt on an image: `background` (when the prompt
    names it), `count`, and per item `objN.present|position|colour|shape` or
    `objN.present|letter|colour`; for a scene with open attributes also `clean` and
    `no_ghost` (see the module docstring)."""
    scene = Scene.from_json(scene_json)
    return _t2i_claims(read(image, scene), scene)


def _delta(src: Scene, tgt: Scene, edit_type: str) -> tuple[Item | None, Item | None]:
    """(item before, item after) of an edit; raises UserError if the scenes don't fit the type.
    A referring type ("move-ref") is checked as its operation ("move")."""
    edit_type = base_edit_type(edit_type)
    before = [it for it in src.items if it not in tgt.items]
    after = [it for it in tgt.items if it not in src.items]
    same_frame = (src.aspect, src.width, src.height) == (tgt.aspect, tgt.width, tgt.height)
    ok = {
        "background": not before and not after and src.background != tgt.background,
        "recolour": len(before) == len(after) == 1 and before[0].colour != after[0].colour,
        "move": len(before) == len(after) == 1 and before[0].cell != after[0].cell,
        "remove": len(before) == 1 and not after,
        "add": len(after) == 1 and not before,
    }
    if edit_type not in ok:
        raise UserError(f"edit_type: unknown edit type {edit_type!r} (expected one of {', '.join(ok)})")
    if not (same_frame and ok[edit_type]):
        raise UserError(f"edit_type: {edit_type!r} does not turn the source scene into the target scene")
    if edit_type != "background" and src.background != tgt.background:
        raise UserError(f"edit_type: {edit_type!r} edit must keep the background")
    return (before[0] if before else None), (after[0] if after else None)


def _edited(reading: Reading, tgt: Scene, edit_type: str, before: Item | None, after: Item | None) -> bool:
    if edit_type == "add" and tgt.open is not None:  # the new item may sit in any free cell
        return match_items(reading, tgt).get(len(tgt.items) - 1) is not None
    if edit_type == "background":
        return reading.background == tgt.background
    if edit_type == "recolour" and after.is_letter:
        return reading.letter_colour == after.colour
    if edit_type == "remove":
        return reading.cells[before.cell] is None
    if edit_type == "move" and reading.cells[before.cell] is not None:
        return False
    return _matches(reading.cells[after.cell], after)


def _untouched(
    src: Scene, edit_type: str, before: Item | None, after: Item | None, added_at: set[Cell] | None = None
) -> list[np.ndarray]:
    """(H, W) bool masks of the regions the edit must leave as in the source, checked one by
    one so that a single spoiled object is not averaged away: each item's interior for a
    background edit, else every grid cell the edit does not touch (for a letter: all but the
    letter's box). `added_at`: the cells an open `add` may have used (default: the new
    item's cell)."""
    shape = (src.height, src.width)
    if edit_type == "background":
        return [item_mask(src, it) >= 0.99 for it in src.items]
    if (before or after).is_letter:
        keep = np.ones(shape, bool)
        x0, y0, x1, y1 = src.letter_box()
        keep[_box((x0 - 1, y0 - 1, x1 + 1, y1 + 1))] = False
        return [keep]
    touched = {it.cell for it in (before, after) if it is not None}
    if added_at is not None:
        touched = (touched - {after.cell}) | added_at
    regions = []
    for cell in grid_cells(src.aspect):
        if cell not in touched:
            keep = np.zeros(shape, bool)
            keep[_box(src.cell_box(cell))] = True
            regions.append(keep)
    return regions


def preservation_errors(output: np.ndarray, source: np.ndarray, regions: list[np.ndarray]) -> list[float]:
    """Per region, the mean absolute difference (0-255) between output and source, minimised
    over whole-image shifts of up to PRESERVE_SHIFT px (edge-padded), so a generator that
    keeps everything but sits a pixel off is not punished."""
    r = PRESERVE_SHIFT
    h, w = source.shape[:2]
    padded = np.pad(output, ((r, r), (r, r), (0, 0)), mode="edge")
    diffs = [
        np.abs(padded[r + dy : r + dy + h, r + dx : r + dx + w] - source).mean(-1)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
    ]
    return [min(float(d[keep].mean()) for d in diffs) for keep in regions]


def verify_edit(
    image: Image.Image | bytes,
    source_image: Image.Image | bytes,
    scene_json: str,
    source_scene_json: str,
    edit_type: str,
) -> dict[str, bool]:
    """Check an edit output: every claim of the target scene (as `verify_t2i`), `edited` (the
    instruction was carried out) and `preserved` (untouched pixels match the source image).
    Referring types ("recolour-ref", ...) are checked as their operation: the target scene
    says which item the instruction meant."""
    return _verify_edit(image, source_image, scene_json, source_scene_json, edit_type)[0]


def _verify_edit(
    image: Image.Image | bytes,
    source_image: Image.Image | bytes,
    scene_json: str,
    source_scene_json: str,
    edit_type: str,
) -> tuple[dict[str, bool], Reading, Scene]:
    tgt, src = Scene.from_json(scene_json), Scene.from_json(source_scene_json)
    before, after = _delta(src, tgt, edit_type)
    kind = base_edit_type(edit_type)
    reading = read(image, tgt)
    claims = _t2i_claims(reading, tgt)
    claims["edited"] = _edited(reading, tgt, kind, before, after)
    added_at = None
    if kind == "add" and tgt.open is not None:  # where the new item went; if nowhere, keep all source cells
        cell = match_items(reading, tgt).get(len(tgt.items) - 1)
        added_at = {cell} if cell is not None else set(src.free_cells())
    source = load_pixels(source_image, src.width, src.height)
    regions = [keep for keep in _untouched(src, kind, before, after, added_at) if keep.any()]
    claims["preserved"] = all(d <= PRESERVE_TOL for d in preservation_errors(reading.pixels, source, regions))
    return claims, reading, tgt


def verify_record(record: Mapping, image: Image.Image | bytes) -> dict:
    """Verify one generated image against a dataset row: {id, task, category, aspect,
    edit_type, claims, correct}, plus for rows with open attributes `open_kind` and
    `realised` (the values the image gives them, see `realised`; input of `diversity`)."""
    if record["task"] == "edit":
        claims, reading, scene = _verify_edit(
            image, record["source_image"], record["scene"], record["source_scene"], record["edit_type"]
        )
    else:
        scene = Scene.from_json(record["scene"])
        reading = read(image, scene)
        claims = _t2i_claims(reading, scene)
    out = {
        "id": record.get("id"),
        "task": record["task"],
        "category": record.get("category"),
        "aspect": record.get("aspect"),
        "edit_type": record.get("edit_type"),
        "claims": claims,
        "correct": all(claims.values()),
    }
    if scene.open is not None:
        out["open_kind"] = scene.open.kind
        out["realised"] = realised(reading, scene)
    return out


def _acc(flags: list[bool]) -> dict:
    return {"n": len(flags), "accuracy": float(np.mean(flags)) if flags else float("nan")}


def score(results: Iterable[Mapping]) -> dict:
    """Aggregate verifier results (from `verify_record`): overall accuracy, accuracy per
    task / category / aspect / edit type ({name: {n, accuracy}}), and the pass rate of each
    claim kind (`claims`: "colour", "shape", "edited", ...)."""
    groups: dict[str, dict[str, list[bool]]] = {k: defaultdict(list) for k in ("task", "category", "aspect", "edit_type")}
    claims: dict[str, list[bool]] = defaultdict(list)
    overall = []
    for r in results:
        ok = bool(r.get("correct", all(r["claims"].values())))
        overall.append(ok)
        for key, group in groups.items():
            if r.get(key) is not None:
                group[r[key]].append(ok)
        for name, value in r["claims"].items():
            claims[name.rsplit(".", 1)[-1]].append(bool(value))
    out = {"n": len(overall), "accuracy": _acc(overall)["accuracy"]}
    for key, group in groups.items():
        out[f"by_{key}"] = {name: _acc(flags) for name, flags in sorted(group.items())}
    out["claims"] = {name: _acc(flags)["accuracy"] for name, flags in sorted(claims.items())}
    return out
