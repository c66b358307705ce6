"""The decoder on damaged files: every one decodes or is refused in one line naming it.

Small valid images of each format, made with Pillow, are mutated (bytes flipped, the file cut
short, bytes inserted, a TIFF directory entry's type, count or value changed) with a seeded
generator, so a failure names a case that can be replayed. The directory mutations are what
found Pillow raising TypeError and OverflowError while loading a TIFF (issue 38, item 5).
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit.core.errors import DataError
from tlkit.data.decode import Need, decode_for

SEED = 38
CASES = 3000  # 1.6-2.5 s on the 2 busy cores this was written on; 11 escaped before the fix
MAX_PIXELS = 100_000  # a mutated header may declare a huge canvas: refused, not decoded


def originals() -> dict[str, bytes]:
    """Small valid files: each format, and the modes and metadata their decoders branch on."""
    rng = np.random.default_rng(SEED)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # turned: the orientation path
    exif[0x011A] = 72.0  # a rational
    exif[0x010F] = "camera"
    made = {
        "jpg": (rgb, "JPEG", {}),
        "exif.jpg": (rgb, "JPEG", {"exif": exif.tobytes()}),
        "png": (rgb, "PNG", {}),
        "rgba.png": (rgb.convert("RGBA"), "PNG", {}),
        "16.png": (Image.fromarray(rng.integers(0, 65535, (12, 16)).astype(np.uint16)), "PNG", {}),
        "gif": (rgb.convert("P"), "GIF", {}),
        "bmp": (rgb, "BMP", {}),
        "webp": (rgb, "WEBP", {"lossless": True}),
        "tif": (rgb, "TIFF", {}),
        "exif.tif": (rgb, "TIFF", {"exif": exif.tobytes()}),
    }
    out = {}
    for name, (image, fmt, options) in made.items():
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        out[name] = buf.getvalue()
    return out


def retype(data: bytearray, rng: np.random.Generator) -> None:
    """Change one field of one entry of a little-endian TIFF's first directory."""
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    at = ifd + 2 + 12 * int(rng.integers(entries))
    field = rng.integers(3)
    if field == 0:
        struct.pack_into("<H", data, at + 2, int(rng.integers(1, 14)))  # the type
    elif field == 1:
        struct.pack_into("<I", data, at + 4, int(rng.choice([0, 2, 3, 100, 2**31])))  # count
    else:
        struct.pack_into("<I", data, at + 8, int(rng.integers(0, 2**32)))  # value / offset


def mutate(original: bytes, tiff: bool, rng: np.random.Generator) -> bytes:
    data = bytearray(original)
    how = rng.integers(8 if tiff else 4)  # TIFFs: half of them a directory entry changed
    if how <= 1:  # flip 1-4 bytes: anywhere, or in the first 64 (headers, chunk lengths)
        span = len(data) if how == 0 else min(64, len(data))
        for at in rng.integers(0, span, rng.integers(1, 5)):
            data[at] = rng.integers(256)
    elif how == 2:
        del data[rng.integers(1, len(data)) :]
    elif how == 3:
        at = rng.integers(len(data))
        data[at:at] = rng.bytes(int(rng.integers(1, 9)))
    else:
        for _ in range(rng.integers(1, 3)):
            retype(data, rng)
    return bytes(data)


@pytest.mark.filterwarnings("ignore")  # Pillow warns about damaged tags: expected here
def test_mutated_images_are_decoded_or_refused_in_one_line(tmp_path):
    """3000 cases, 300 per original; a third of them decode. A case that raises anything but
    DataError, or decodes to something that is not uint8 RGB, is listed."""
    rng = np.random.default_rng(SEED)
    files = originals()
    names = sorted(files)
    outcomes: Counter[str] = Counter()
    failures = []
    for case in range(CASES):
        name = names[case % len(names)]
        path = tmp_path / f"case{case}.{name}"  # a new file: truncating one was 100x slower
        path.write_bytes(mutate(files[name], name.endswith("tif"), rng))
        try:
            decoded = decode_for(path, Need(shorter=3), MAX_PIXELS)
        except DataError as e:
            text = str(e)
            if "\n" in text or not text.startswith(f"{path}: ") or len(text) > 400:
                failures.append((case, name, "message", text[:300]))
            outcomes["refused"] += 1
        except Exception as e:  # what the test is for: report every case, not only the first
            failures.append((case, name, type(e).__name__, str(e)[:100]))
        else:
            image = decoded.image
            shaped = image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 1
            if image.dtype != np.uint8 or not shaped or min(decoded.full) < 1:
                failures.append((case, name, "pixels", image.dtype, image.shape, decoded.full))
            outcomes["decoded"] += 1
    assert not failures, failures
    assert outcomes["decoded"] > CASES // 10 and outcomes["refused"] > CASES // 10, outcomes


def test_the_originals_decode_whole(tmp_path):
    """The mutations start from files that are good, with the pixels they were made from."""
    for name, data in originals().items():
        path = Path(tmp_path, f"good.{name}")
        path.write_bytes(data)
        image = decode_for(path, None).image
        assert image.shape == ((16, 12, 3) if name.startswith("exif") else (12, 16, 3)), name
