"""Bytes -> uint8 HxWx3 RGB, by content, for every colour mode Pillow reads.

Extensions lie (a PNG saved as .jpg, a text file named .jpg), so the format is whatever the
bytes say. Orientation follows the EXIF tag, as a photo viewer shows it, because that is the
image the user labelled.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlkit.errors import DataError

# Formats a folder of training photos can hold; anything else is refused by name.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO")
# Transparent pixels are composited onto this colour (what a browser shows on white).
BACKGROUND = (255, 255, 255)


def _sniff(head: bytes) -> str:
    text = head[:512]
    if not text:
        return "empty file"
    try:
        text.decode("utf-8")
        return "text file"
    except UnicodeDecodeError:
        return "unknown binary format"


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Decode one file to uint8 RGB (H, W, 3); a DataError names the file if it is not an image."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # truncated-but-readable JPEG tails etc.
            with Image.open(path) as im:
                if im.format not in FORMATS:
                    raise DataError(
                        f"{path}: unsupported image format {im.format}; convert it to JPEG or "
                        "PNG, or move it out of the dataset"
                    )
                im.seek(0)  # first frame of a GIF / multi-page TIFF
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except DataError:
        raise
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            kind = _sniff(f.read(512))
        raise DataError(
            f"{path}: not an image ({kind}); remove it or move it out of the dataset"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode image ({e}); re-export or remove it") from None


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 RGB array."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        gray = np.clip(arr * 255.0 / peak + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        peak = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        gray = np.clip(arr * 255.0 / peak + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGBA", im.size, (*BACKGROUND, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"decoder produced shape {arr.shape} from mode {mode}")  # a bug
    return arr
