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

Whatever the image library raises on a user's file makes it a bad file, named in one line (a
malformed TIFF tag made Pillow raise TypeError; tests/test_decode_fuzz.py mutates thousands of
files); only the library's calls are guarded, so tlkit's own bugs keep their tracebacks. Pixels
are converted a strip at a time at 8 bits a channel, and the threads of a process decode at most
DECODE_BUDGET_PIXELS at once, so a 16-bit 100-megapixel PNG per core cannot exhaust memory.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tlkit.core.choices import DEFAULT_MAX_PIXELS
from tlkit.core.errors import DataError, shown

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
# The most one side may exceed the other: the view's resize makes the shorter side its scale
# (512 px for vgg), so 100:1 keeps a view's pixels near DEFAULT_MAX_PIXELS; no photo is longer.
MAX_ASPECT = 100
REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes at (1/8, 1/4, 1/2 of each side)
# A PNG text field holding "WxH": the file is a resized copy of a WxH image (tlkit.data.store),
# trusted only in a store's entries (`in_store`): STORE_DIR/<key>/ beside its STORE_RECORD.
FULL_SIZE_KEY = "tlkit-full-size"
STORE_DIR = "images"  # under the cache folder, beside the feature caches
STORE_RECORD = "store.json"
TURNING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# Pixels converted to RGB at a time: bounds a conversion's temporaries (a few MB). Smaller strips
# were also faster (a 4000x3000 JPEG: 19 ms at 2**18, 25 ms at 2**20, 65 ms in one piece).
STRIP_PIXELS = 1 << 18
# Pixels decoded at once by all of a process's threads together (PixelBudget). A decode holds
# about 7 bytes a pixel at its peak (Pillow's image, the RGB result, a strip's temporaries), so
# 16 workers on files at the 100-megapixel limit would need 11 GB; the budget keeps it near
# 1.4 GB. A file above the budget is decoded alone.
DECODE_BUDGET_PIXELS = 200_000_000


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


class _Opened(NamedTuple):
    image: np.ndarray  # uint8 RGB (H, W, 3)
    format: str
    mode: str  # as stored in the file
    size: tuple[int, int]  # as stored in the file's header
    full: tuple[int, int]  # the whole image as shown (see Decoded)


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _library(path: Path, data: bytes) -> Iterator[None]:
    """Around the image library's calls on a user's file: whatever it raises is the file's fault
    (a malformed TIFF tag made Pillow raise TypeError, an offset OverflowError), so it becomes one
    line naming the file. MemoryError is the machine's, not the file's. tlkit's own code runs
    outside these blocks, so its bugs keep their tracebacks."""
    try:
        yield
    except MemoryError:
        raise
    except UnidentifiedImageError:
        raise DataError(
            f"{path}: not an image ({_sniff(data)}); remove it or move it out of the dataset"
        ) from None
    except Image.DecompressionBombError as e:
        raise DataError(
            f"{path}: refused as a possible decompression bomb ({_one_line(e)})"
        ) from None
    except Exception as e:
        raise DataError(
            f"{path}: cannot decode image ({type(e).__name__}: {_one_line(e)}); re-export or "
            "remove it"
        ) from None


class PixelBudget:
    """A semaphore counted in pixels, first come first served: threads decoding at once hold at
    most `total` pixels between them; an image above the whole budget waits until it can be
    decoded alone."""

    def __init__(self, total: int):
        self.total = total
        self.in_use = 0
        self._changed = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        want = min(max(pixels, 1), self.total)
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            try:
                self._changed.wait_for(
                    lambda: self._queue[0] is ticket and self.in_use + want <= self.total
                )
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in line may fit as well
            self.in_use += want
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= want
                self._changed.notify_all()


BUDGET = PixelBudget(DECODE_BUDGET_PIXELS)


def _open_rgb(data: bytes, path: Path, max_pixels: int | None, need: Need | None = None) -> _Opened:
    """Decode the bytes of `path`; DataError names it. With a `need`, a JPEG may come out
    reduced (see Need.reduction)."""
    with _library(path, data):
        im = Image.open(io.BytesIO(data))
    with im:
        if im.format not in FORMATS:
            raise DataError(
                f"{path}: unsupported image format {im.format}; convert it to JPEG or "
                "PNG, or move it out of the dataset"
            )
        check_pixels(path, im.size, max_pixels)
        fmt, mode, size = im.format, im.mode, im.size
        with _library(path, data):
            turned = im.getexif().get(0x0112) in TURNING_ORIENTATIONS
            recorded = im.info.get(FULL_SIZE_KEY) if fmt == "PNG" else None
            im.seek(0)  # first frame of a GIF / multi-page TIFF
        k = need.reduction(*size) if need is not None and fmt in ("JPEG", "MPO") else 1
        if k > 1:  # Pillow picks scale min(side // requested) = k exactly
            with _library(path, data):
                im.draft(im.mode, (size[0] // k, size[1] // k))
        with BUDGET.hold(im.size[0] * im.size[1]):
            with _library(path, data):
                ImageOps.exif_transpose(im, in_place=True)  # a copy otherwise: 36 MB at 12 MP
            image = _rgb(im, lambda: _library(path, data))
    # A reduced JPEG: its header's size, turned as shown (libjpeg rounds the reduced one up);
    # anything else: what was decoded (a TIFF's header already has the turned size).
    shown = (size[1], size[0]) if turned else size
    full = shown if k > 1 else (image.shape[1], image.shape[0])
    if recorded is not None and in_store(path):
        full = _recorded_size(path, recorded, full)
    return _Opened(image, fmt, mode, size, full)


def in_store(path: Path) -> bool:
    """Whether `path` is an entry of a resized-image store (tlkit.data.store): only there is the
    FULL_SIZE_KEY field tlkit's. A user's PNG may carry it too (copied from a store, or made
    up), and is decoded as the image it is."""
    folder = path.parent
    return folder.parent.name == STORE_DIR and (folder / STORE_RECORD).is_file()


def _recorded_size(path: Path, recorded: object, stored: tuple[int, int]) -> tuple[int, int]:
    """The whole image's size a store entry records, checked against the entry's own (a
    downscale of the whole image: no bigger, the same shape within a pixel's rounding per
    side); a store entry that fails is damaged, and said so."""
    width, height = stored
    text = recorded if isinstance(recorded, str) else ""
    match = re.fullmatch(r"([0-9]{1,9})x([0-9]{1,9})", text)
    if match:
        fw, fh = int(match[1]), int(match[2])
        if width <= fw and height <= fh and abs(width * fh - height * fw) <= fw + fh:
            return fw, fh
    raise DataError(
        f"{path}: damaged resized-image store entry (it records the whole image as "
        f"{shown(recorded, 40)}, for a {width}x{height} image); remove it, or the store with "
        f"`tlkit cache rm {path.parent.name}`, and run again"
    )


def check_pixels(
    path: str | os.PathLike[str], size: tuple[int, int], max_pixels: int | None
) -> None:
    """Refuse a size no view can be made from in bounded memory: above `max_pixels`, or
    longer than MAX_ASPECT times its width (views resize the shorter side up to the view's
    scale: a 200000x1 strip of 667 bytes would become 51 million pixels wide at 256)."""
    width, height = size
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise DataError(
            f"{path}: {width}x{height} is not an image a view can be cut from (sides beyond "
            f"{MAX_ASPECT}:1); crop it, or move it out of the dataset"
        )
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"{path}: {width}x{height} is {width * height / 1e6:.1f} megapixels, above the limit "
            f"of {max_pixels / 1e6:g} (a decompression bomb?); if the image is genuine, raise "
            "--max-pixels or downscale it"
        )


def decode_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode one file to uint8 RGB (H, W, 3); a DataError names the file if it is not an image.

    `max_pixels=None` skips tlkit's limit (for files check-data already passed).
    """
    path = Path(path)
    return _open_rgb(_read(path), path, max_pixels).image


def decode_for(
    path: str | os.PathLike[str], need: Need | None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Decoded:
    """Decode one file for a view that needs `need`: a JPEG at the largest reduction that keeps
    it; other formats, or `need=None`, in full."""
    path = Path(path)
    opened = _open_rgb(_read(path), path, max_pixels, need)
    return Decoded(opened.image, opened.full)


def _read(path: Path) -> bytes:
    """The whole file in one read: Pillow decodes from memory about 13% faster than from a
    file it reads piecemeal (measured on 500x375 JPEGs)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def probe_image(
    path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> ImageProbe:
    """Decode one file exactly as training will, and report what a data audit needs."""
    path = Path(path)
    data = _read(path)
    _, fmt, mode, (width, height), _ = _open_rgb(data, path, max_pixels)
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


def _rgb(im: Image.Image, library: Callable[[], ContextManager[None]]) -> np.ndarray:
    """Any Pillow mode -> uint8 RGB (H, W, 3), STRIP_PIXELS at a time: nothing the size of the
    image is made but the result (16-bit pixels through int64 and float64 cost 386 MB for a
    4000x4000 PNG). `library()` guards the image library's calls."""
    with library():
        kind, peak = _kind(im)
    width, height = im.size
    rows = max(1, STRIP_PIXELS // max(width, 1))
    if rows >= height:
        with library():
            raw = _raw(im, kind)
        return _as_rgb(raw, kind, peak)
    out = np.empty((height, width, 3), np.uint8)
    for top in range(0, height, rows):
        with library():
            raw = _raw(im.crop((0, top, width, min(height, top + rows))), kind)
        out[top : top + rows] = _as_rgb(raw, kind, peak)
    return out


def _kind(im: Image.Image) -> tuple[str, int | float]:
    """How the mode becomes 8-bit RGB, and the value that becomes 255 for deep greys."""
    mode = im.mode
    if mode in SIXTEEN_BIT:
        return "grey", 65535
    if mode in ("I", "F"):  # a single band: its extrema are (low, high)
        high = float(cast(tuple[float, float], im.getextrema())[1])
        if mode == "I":  # 32-bit integers: 16-bit data unless every value fits 8 bits
            return "grey", 65535 if high > 255 else 255
        return "float", 1.0 if high <= 1.0 else 255.0
    if mode in ("LA", "La", "PA", "RGBa", "RGBA") or (mode == "P" and "transparency" in im.info):
        return "alpha", 255
    return "rgb", 255


def _raw(strip: Image.Image, kind: str) -> np.ndarray:
    """The image library's part: a strip as an array, colour already 8-bit RGB for 'alpha'
    (composited over BACKGROUND) and 'rgb' (L, 1, CMYK, YCbCr, palettes...)."""
    if kind in ("grey", "float"):
        return np.asarray(strip)
    if kind == "alpha":
        rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
        background = Image.new("RGBA", strip.size, (*BACKGROUND, 255))
        strip = Image.alpha_composite(background, rgba)
    return np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"))


def _as_rgb(raw: np.ndarray, kind: str, peak: int | float) -> np.ndarray:
    """tlkit's part: deep greys to 0..255, rounded half up, then repeated into 3 channels."""
    if kind == "grey":
        wide = np.clip(raw, 0, peak).astype(np.uint32)  # 65535 / 257 = 255: no float needed
        grey = (wide if peak == 255 else (wide + 128) // 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if kind == "float":
        scaled = np.clip(raw.astype(np.float64) * 255.0 / peak + 0.5, 0, 255)
        return np.repeat(scaled.astype(np.uint8)[..., None], 3, axis=2)
    if raw.ndim != 3 or raw.shape[2] != 3 or raw.dtype != np.uint8:
        raise ValueError(f"decoder produced {raw.dtype} {raw.shape} for {kind}")  # a bug
    return raw
