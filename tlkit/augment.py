"""Image transforms. Eval transforms are deterministic: a file always gives the same pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image


def eval_transform(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """Resize the shorter side to round(size / crop_fraction), then take the centre size x size.

    This is the single-crop protocol of the VGG/ResNet/Inception papers (crop_fraction 0.875
    means 224 out of 256).
    """
    h, w = image.shape[:2]
    short = max(size, round(size / crop_fraction))
    scale = short / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resized = np.asarray(
        Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])
