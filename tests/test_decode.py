from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit.core.errors import DataError
from tlkit.data.decode import decode_image

RGB = np.array([[[10, 200, 30], [40, 50, 60]], [[70, 80, 90], [250, 5, 128]]], dtype=np.uint8)


def save(path: Path, image: Image.Image, fmt: str, **kw) -> Path:
    image.save(path, format=fmt, **kw)
    return path


def test_rgb_png_roundtrip(tmp_path):
    out = decode_image(save(tmp_path / "a.png", Image.fromarray(RGB), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize(
    "fmt,ext",
    [("BMP", ".bmp"), ("GIF", ".gif"), ("WEBP", ".webp"), ("JPEG", ".jpg"), ("TIFF", ".tif")],
)
def test_formats_decode_to_rgb(tmp_path, fmt, ext):
    """Four flat colour blocks, each channel checked: a BGR swap or a grey decode fails."""
    blocks = ((200, 30, 40), (30, 180, 60), (40, 50, 210), (220, 200, 20))
    array = np.zeros((32, 48, 3), np.uint8)  # blocks on JPEG's 16-pixel grid
    for i, colour in enumerate(blocks):
        array[(i // 2) * 16 : (i // 2) * 16 + 16, (i % 2) * 24 : (i % 2) * 24 + 24] = colour
    out = decode_image(save(tmp_path / f"a{ext}", Image.fromarray(array), fmt))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8
    for i, colour in enumerate(blocks):
        centre = out[(i // 2) * 16 + 8, (i % 2) * 24 + 12].astype(int)
        assert np.abs(centre - colour).max() <= 12, (fmt, colour, centre)


def test_png_named_jpg_decodes_by_content(tmp_path):
    out = decode_image(save(tmp_path / "really_png.jpg", Image.fromarray(RGB), "PNG"))
    np.testing.assert_array_equal(out, RGB)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.array([[0, 100], [200, 255]], np.uint8)
    out = decode_image(save(tmp_path / "g.png", Image.fromarray(gray, mode="L"), "PNG"))
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 0, 0)  # fully transparent black -> background
    out = decode_image(save(tmp_path / "t.png", Image.fromarray(rgba, mode="RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1
    path = save(tmp_path / "p.png", img, "PNG", transparency=1)
    out = decode_image(path)
    np.testing.assert_array_equal(out[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(out[0, 1], (255, 255, 255))


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(save(tmp_path / "c.jpg", img, "JPEG", quality=100))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60


def test_16_bit_grayscale_scales_to_8_bit(tmp_path):
    arr = np.array([[0, 65535], [32768, 256]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = decode_image(save(tmp_path / "d.png", img, "PNG"))
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 1]])


# where the stored image's top-left corner is displayed, by EXIF orientation (the EXIF spec's
# table: which visual side the 0th row and the 0th column are)
CORNER = {
    1: "top-left",
    2: "top-right",
    3: "bottom-right",
    4: "bottom-left",
    5: "top-left",
    6: "top-right",
    7: "bottom-right",
    8: "bottom-left",
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_puts_a_marked_corner_where_the_spec_says(tmp_path, orientation):
    stored = np.zeros((24, 40, 3), np.uint8)  # wide
    stored[:6, :6] = 255  # the marked top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(
        save(tmp_path / "o.jpg", Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    )
    assert out.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    h, w = out.shape[:2]
    corners = {
        "top-left": out[:4, :4],
        "top-right": out[:4, w - 4 :],
        "bottom-left": out[h - 4 :, :4],
        "bottom-right": out[h - 4 :, w - 4 :],
    }
    bright = [name for name, patch in corners.items() if patch.mean() > 200]
    assert bright == [CORNER[orientation]]


def test_text_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, not an image")
    with pytest.raises(DataError, match=r"notes\.jpg: not an image \(text file\)"):
        decode_image(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"gone\.png: no such file"):
        decode_image(tmp_path / "gone.png")


def test_truncated_jpeg_is_an_error_naming_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode image"):
        decode_image(path)
