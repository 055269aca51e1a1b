"""Image grids (PIL): sample sheets during training, qualitative grids in reports."""

from __future__ import annotations

from PIL import Image


def image_grid(images: list[Image.Image], cols: int, pad: int = 2, scale: int = 2,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile `images` (any sizes) into rows of `cols`, each cell the size of the largest image,
    upscaled by `scale` with nearest neighbour so 32 px samples stay readable."""
    if not images:
        raise ValueError("image_grid: no images")
    cw = max(im.width for im in images) * scale
    ch = max(im.height for im in images) * scale
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        big = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
        sheet.paste(big, (pad + c * (cw + pad) + (cw - big.width) // 2, pad + r * (ch + pad) + (ch - big.height) // 2))
    return sheet
