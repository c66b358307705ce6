"""Bytes -> uint8 HxWx3 RGB, by content, for every colour mode Pillow reads.

Extensions lie (a PNG saved as .jpg, a text file named .jpg), so the format is whatever the
bytes say. Orientation follows the EXIF tag, as a photo viewer shows it, because that is the
image the user labelled. An image above a pixel limit is refused before it is decoded: a small
file can declare a huge canvas (a decompression bomb).

A JPEG is decoded at a reduced scale when the view made from it is much smaller (`Need`):
libjpeg's DCT scaling yields 1/2, 1/4 or 1/8 of each side for a fraction of the work (the entropy
decoding stays). The reduced image is a box average of the full one, so a further area resize
lands close to full decode + one area resize, provided the reduced image keeps at least
REDUCED_MARGIN times the pixels per side the view needs: with a margin of 1, the 224 px eval view
of a textured 4000x3000 photo decoded at 1/8 was 1.63 grey levels off on average; with 2, 0.89
(tests/test_reduced_decode.py holds the limit of 1).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlkit.core.choices import DEFAULT_MAX_PIXELS
from tlkit.core.errors import DataError

# Formats a folder of training photos can hold; anything else is refused by name.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO")
# What each extension promises; a file whose bytes say otherwise still decodes, with a warning.
EXTENSION_FORMATS = {
    ".jpg": ("JPEG", "MPO"),
    ".jpeg": ("JPEG", "MPO"),
    ".jpe": ("JPEG",),
    ".jfif": ("JPEG",),
    ".png": ("PNG",),
    ".bmp": ("BMP",),
    ".gif": ("GIF",),
    ".webp": ("WEBP",),
    ".tif": ("TIFF",),
    ".tiff": ("TIFF",),
    ".mpo": ("MPO", "JPEG"),
}
# Transparent pixels are composited onto this colour (what a browser shows on white).
BACKGROUND = (255, 255, 255)
# A reduced JPEG decode keeps at least this many times the pixels per side a view needs.
REDUCED_MARGIN = 2
REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes at (1/8, 1/4, 1/2 of each side)
# A PNG text field holding "WxH": the file is a resized copy of a WxH image (tlkit.data.store).
FULL_SIZE_KEY = "tlkit-full-size"
TURNING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class Need:
    """The fewest pixels a view is made from, in the decoded image: its shorter side at least
    `shorter`, and, for a random-resized crop, the smallest region a crop may take (`region`,
    a share of the image's area folded with its most extreme aspect ratio, so that
    sqrt(region x width x height) is that region's shorter side) at least `region_side`.
    `fixed_scale`: every view resizes the whole image's shorter side to exactly `shorter` (the
    eval view, crops without scale jitter)."""

    shorter: int = 0
    region: float = 1.0
    region_side: int = 0
    fixed_scale: bool = False

    def fraction(self, width: int, height: int) -> float:
        """The share of each side of a width x height image that the view needs."""
        f = self.shorter / min(width, height)
        if self.region_side:
            f = max(f, self.region_side / math.sqrt(self.region * width * height))
        return f

    def reduction(self, width: int, height: int) -> int:
        """The largest DCT reduction that keeps REDUCED_MARGIN times what the view needs."""
        f = self.fraction(width, height)
        return next((k for k in REDUCTIONS if REDUCED_MARGIN * f * k <= 1), 1)


@dataclass(frozen=True)
class Decoded:
    """A decoded image and the size of the whole image, (width, height) as displayed: crops
    drawn in the whole image's coordinates land on the same content at any reduction."""

    image: np.ndarray
    full: tuple[int, int]


@dataclass(frozen=True)
class ImageProbe:
    """What check-data learns from decoding one file."""

    format: str
    mode: str  # the colour mode stored in the file, before conversion to RGB
    width: int
    height: int
    sha256: str  # of the file's bytes: exact duplicates
    warnings: tuple[str, ...]  # decodes, but something is off


def _sniff(head: bytes) -> str:
    text = head[:512]
    if not text:
        return "empty file"
    try:
        text.decode("utf-8")
        return "text file"
    except UnicodeDecodeError:
        return "unknown binary format"


def decode_protocol() -> dict[str, object]:
    """How a file becomes pixels, for whoever must reproduce it outside tlkit (export.json)."""
    return {
        "exif_orientation": "applied (the image is rotated as a viewer shows it)",
        "channels": "RGB",
        "dtype": "uint8",
        "alpha": f"composited over RGB {list(BACKGROUND)}",
        "greyscale": "repeated into 3 channels",
        "16_bit": "scaled to 0..255",
        "jpeg_reduced_decode": (
            "libjpeg DCT scaling by 1/2, 1/4 or 1/8: the largest that leaves at least "
            f"{REDUCED_MARGIN}x the pixels per side the view is resized to (shorter side; "
            "for random-resized crops, the smallest region's shorter side)"
        ),
    }


def _open_rgb(
    source: io.BytesIO, path: Path, max_pixels: int | None, need: Need | None = None
) -> tuple[np.ndarray, str, str, tuple[int, int], tuple[int, int]]:
    """(RGB array, format, original mode, size as stored, size of the whole image as shown);
    DataError names `path`. With a `need`, a JPEG may come out reduced (see Need.reduction)."""
    try:
        with Image.open(source) as im:
            if im.format not in FORMATS:
                raise DataError(
                    f"{path}: unsupported image format {im.format}; convert it to JPEG or "
                    "PNG, or move it out of the dataset"
                )
            check_pixels(path, im.size, max_pixels)
            fmt, mode, size = im.format, im.mode, im.size
            full = _shown_size(im)
            im.seek(0)  # first frame of a GIF / multi-page TIFF
            if need is not None and fmt in ("JPEG", "MPO"):
                k = need.reduction(*size)
                if k > 1:  # Pillow picks scale min(side // requested) = k exactly
                    im.draft(im.mode, (size[0] // k, size[1] // k))
            ImageOps.exif_transpose(im, in_place=True)  # a copy otherwise: 36 MB at 12 MP
            return to_rgb(im), fmt, mode, size, full
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not an image ({_sniff(source.getvalue())}); remove it or "
            "move it out of the dataset"
        ) from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({e}); re-export or remove it") from None


def _shown_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of the whole image as a viewer shows it: turned by its EXIF orientation,
    or the original's size recorded in a resized copy (FULL_SIZE_KEY)."""
    recorded = im.info.get(FULL_SIZE_KEY) if im.format == "PNG" else None
    if isinstance(recorded, str):
        width, _, height = recorded.partition("x")
        if width.isdigit() and height.isdigit():
            return int(width), int(height)
    width, height = im.size
    if im.getexif().get(0x0112) in TURNING_ORIENTATIONS:
        return height, width
    return width, height


def check_pixels(path: str | os.PathLike, size: tuple[int, int], max_pixels: int | None) -> None:
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit "
            f"of {max_pixels / 1e6:g} (a decompression bomb?); if the image is genuine, raise "
            "--max-pixels or downscale it"
        )


def decode_image(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file to uint8 RGB (H, W, 3); a DataError names the file if it is not an image.

    `max_pixels=None` skips tlkit's limit (for files check-data already passed).
    """
    path = Path(path)
    return _open_rgb(io.BytesIO(_read(path)), path, max_pixels)[0]


def decode_for(
    path: str | os.PathLike, need: Need | None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Decoded:
    """Decode one file for a view that needs `need`: a JPEG at the largest reduction that keeps
    it; other formats, or `need=None`, in full."""
    path = Path(path)
    image, _, _, _, full = _open_rgb(io.BytesIO(_read(path)), path, max_pixels, need)
    return Decoded(image, full)


def _read(path: Path) -> bytes:
    """The whole file in one read: Pillow decodes from memory about 13% faster than from a
    file it reads piecemeal (measured on 500x375 JPEGs)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def probe_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageProbe:
    """Decode one file exactly as training will, and report what a data audit needs."""
    path = Path(path)
    data = _read(path)
    _, fmt, mode, (width, height), _ = _open_rgb(io.BytesIO(data), path, max_pixels)
    notes = []
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if expected is None:
        notes.append(
            f"extension {path.suffix or '(none)'!r} is not an image extension; the content is {fmt}"
        )
    elif fmt not in expected:
        notes.append(f"content is {fmt} but the extension is {path.suffix!r}")
    if fmt == "JPEG":
        end = data.rfind(b"\xff\xd9")
        trailing = len(data) - (end + 2) if end >= 0 else 0
        if trailing and data[end + 2 :].strip(b"\x00"):
            notes.append(f"{trailing} bytes of junk after the JPEG end marker (ignored)")
    return ImageProbe(fmt, mode, width, height, hashlib.sha256(data).hexdigest(), tuple(notes))


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
