"""Image grids for people to look at (samples, reconstructions); numpy + Pillow only."""

from __future__ import annotations

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, background: int = 255) -> Image.Image:
    """(N, H, W, 3) uint8 -> one RGB image, row-major, `pad` pixels between tiles."""
    n, h, w, c = images.shape
    nrows = max(1, -(-n // ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), background, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return Image.fromarray(grid)


def interleave(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Original, reconstruction, original, ... so each pair sits side by side in a grid with even columns."""
    out = np.empty((2 * len(originals), *originals.shape[1:]), dtype=originals.dtype)
    out[0::2], out[1::2] = originals, recons
    return out
