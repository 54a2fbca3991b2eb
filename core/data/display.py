"""Pictures for the screen: dataset images are often tiny (digits are 8×8), too small to read."""
from __future__ import annotations

import numpy as np


def enlarge(pixels: np.ndarray, min_side: int = 64) -> np.ndarray:
    """Nearest-neighbour upscale by the smallest integer factor that brings the shorter side to at
    least `min_side` pixels, so an 8×8 digit shows as crisp 64×64 blocks rather than a blur or a speck.

    Shape: (H, W) or (H, W, C) in, (H·f, W·f) or (H·f, W·f, C) out, same dtype; an image whose
    shorter side is already `min_side` or more comes back as it is (f = 1, the same array).
    """
    if min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    if pixels.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {pixels.shape}")
    shorter = min(pixels.shape[:2])
    if shorter == 0 or shorter >= min_side:
        return pixels
    factor = -(-min_side // shorter)  # ceiling division
    return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)
