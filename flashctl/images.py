"""Images: PNG bytes to arrays and tensors (the data loader, the conditioning cache), and grids
(PIL: sample sheets during training, qualitative grids in reports)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def to_tensor(images: list[np.ndarray]) -> Any:
    """uint8 (H, W, 3) arrays -> float tensor (B, 3, H, W) in [-1, 1]."""
    import torch

    arr = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return arr / 127.5 - 1.0


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
