"""Pillow renderer of shapes scenes, and the masks the verifier matches against.

Scenes are drawn at SUPERSAMPLE x the target size and box-filtered down, which gives the same
anti-aliased edges on every platform. Letters are drawn from stroke lists rather than a font
file: no font download, and identical glyphs whatever Pillow's bundled default font is.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from flashctl.shapes.scene import BACKGROUNDS, COLOURS, LETTERS, Item, Scene

SUPERSAMPLE = 4
STROKE = 0.16
"""Letter stroke width as a fraction of the letter height."""

# Polylines in a unit box (x right, y down); "O" is drawn as an ellipse outline.
LETTER_STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "A": [[(0.0, 1.0), (0.5, 0.0), (1.0, 1.0)], [(0.22, 0.62), (0.78, 0.62)]],
    "E": [[(1.0, 0.0), (0.0, 0.0), (0.0, 1.0), (1.0, 1.0)], [(0.0, 0.5), (0.8, 0.5)]],
    "H": [[(0.0, 0.0), (0.0, 1.0)], [(1.0, 0.0), (1.0, 1.0)], [(0.0, 0.5), (1.0, 0.5)]],
    "L": [[(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]],
    "O": [],
    "T": [[(0.0, 0.0), (1.0, 0.0)], [(0.5, 0.0), (0.5, 1.0)]],
    "X": [[(0.0, 0.0), (1.0, 1.0)], [(1.0, 0.0), (0.0, 1.0)]],
    "Z": [[(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]],
}
assert set(LETTER_STROKES) == set(LETTERS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw a shape filling `box` (supersampled pixel coordinates, end exclusive)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1 - 1), ((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_letter(draw: ImageDraw.ImageDraw, letter: str, box: tuple[float, float, float, float], fill) -> None:
    """Draw a letter as thick strokes inside `box` (supersampled pixel coordinates)."""
    x0, y0, x1, y1 = box
    sw = STROKE * (y1 - y0)
    if letter == "O":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), outline=fill, width=max(1, round(sw)))
        return
    ix0, iy0 = x0 + sw / 2, y0 + sw / 2
    iw, ih = (x1 - x0) - sw, (y1 - y0) - sw
    for line in LETTER_STROKES[letter]:
        pts = [(ix0 + u * iw, iy0 + v * ih) for u, v in line]
        draw.line(pts, fill=fill, width=max(1, round(sw)), joint="curve")
        for px, py in pts:  # round caps, so joints and ends look the same at every angle
            r = sw / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=fill)


def _scaled(box: tuple[float, float, float, float], sx: float, sy: float) -> tuple[float, float, float, float]:
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def draw_item(draw: ImageDraw.ImageDraw, scene: Scene, item: Item, sx: float, sy: float, fill) -> None:
    """Draw one item of `scene` on a canvas scaled by (sx, sy) from the scene's size."""
    if item.is_letter:
        _draw_letter(draw, item.letter, _scaled(scene.letter_box(), sx, sy), fill)
    else:
        _draw_shape(draw, item.shape, _scaled(scene.object_box(item.cell), sx, sy), fill)


def render(scene: Scene, width: int | None = None, height: int | None = None) -> Image.Image:
    """Render a scene as an RGB image (default: the scene's own width x height)."""
    width = width or scene.width
    height = height or scene.height
    s = SUPERSAMPLE
    big = Image.new("RGB", (width * s, height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(big)
    sx, sy = width * s / scene.width, height * s / scene.height
    for item in scene.items:
        draw_item(draw, scene, item, sx, sy, COLOURS[item.colour])
    # BOX = exact area average: anti-aliasing identical on every platform.
    return big.resize((width, height), Image.Resampling.BOX)


def _mask(width: int, height: int, paint) -> np.ndarray:
    s = SUPERSAMPLE
    big = Image.new("L", (width * s, height * s), 0)
    paint(ImageDraw.Draw(big), s)
    small = big.resize((width, height), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def shape_mask(shape: str, cx: float, cy: float, side: float, width: int, height: int) -> np.ndarray:
    """Coverage mask (H, W) in [0, 1] of a shape whose bounding box is centred at (cx, cy)."""
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return _mask(width, height, lambda d, s: _draw_shape(d, shape, _scaled(box, s, s), 255))


@lru_cache(maxsize=256)
def letter_mask(letter: str, width: int, height: int) -> np.ndarray:
    """Coverage mask (H, W) in [0, 1] of the centred letter in a width x height image."""
    scene = Scene("text", "square", width, height)
    out = _mask(width, height, lambda d, s: _draw_letter(d, letter, _scaled(scene.letter_box(), s, s), 255))
    out.setflags(write=False)
    return out


def item_mask(scene: Scene, item: Item) -> np.ndarray:
    """Coverage mask (H, W) in [0, 1] of one item of a scene, at the scene's size."""
    return _mask(scene.width, scene.height, lambda d, s: draw_item(d, scene, item, s, s, 255))


def to_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (deterministic: no timestamps or text chunks)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> Image.Image:
    """Decode PNG bytes into an RGB image."""
    return Image.open(io.BytesIO(data)).convert("RGB")
