"""Turning an image file into the 8-bit greyscale picture every other module works on.

One decoder for training, evaluation, caching and GradCAM, so all of them see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# Errors that mean "this file is not a usable image" (Pillow raises all of these).
UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_xray(path: str | Path) -> Image.Image:
    """Decode an X-ray as 8-bit greyscale, whatever its stored mode.

    Every image goes through greyscale first: the Kaggle set stores Normal cases as RGB
    and TB cases as greyscale, so the raw mode alone would give the label away.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit radiographs: Pillow's convert("L") would clip everything above 255 to white.
            pixels = np.asarray(img, dtype=np.float64)
            full_scale = 65535.0 if img.mode.startswith("I;16") or pixels.max() > 255 else 255.0
            return Image.fromarray(np.clip(pixels * (255.0 / full_scale) + 0.5, 0, 255).astype(np.uint8), mode="L")
        return img.convert("L")
