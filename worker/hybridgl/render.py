"""Pictures for people: a chosen mask drawn over its image."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

OVERLAY_COLOR = (255, 64, 32)


def overlay(rgb: np.ndarray, mask: np.ndarray, box=None, alpha: float = 0.5) -> np.ndarray:
    """The image with the mask tinted and its box outlined (uint8 RGB)."""
    out = rgb.astype(np.float32)
    color = np.array(OVERLAY_COLOR, dtype=np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * color
    image = Image.fromarray(out.round().astype(np.uint8))
    if box is not None:
        x, y, w, h = (float(v) for v in box)
        ImageDraw.Draw(image).rectangle([x, y, x + w, y + h], outline=OVERLAY_COLOR, width=3)
    return np.asarray(image)
