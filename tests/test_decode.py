from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit.decode import decode_image
from tlkit.errors import DataError

RGB = np.array([[[10, 200, 30], [40, 50, 60]], [[70, 80, 90], [250, 5, 128]]], dtype=np.uint8)


def save(path: Path, image: Image.Image, fmt: str, **kw) -> Path:
    image.save(path, format=fmt, **kw)
    return path


def test_rgb_png_roundtrip(tmp_path):
    out = decode_image(save(tmp_path / "a.png", Image.fromarray(RGB), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("fmt,ext", [("BMP", ".bmp"), ("GIF", ".gif"), ("WEBP", ".webp"),
                                     ("JPEG", ".jpg"), ("TIFF", ".tif")])
def test_formats_decode_to_rgb(tmp_path, fmt, ext):
    img = Image.fromarray(np.full((16, 20, 3), 128, np.uint8))
    out = decode_image(save(tmp_path / f"a{ext}", img, fmt))
    assert out.shape == (16, 20, 3) and out.dtype == np.uint8
    assert abs(int(out.mean()) - 128) <= 3


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


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed tall
    out = decode_image(save(tmp_path / "o.jpg", img, "JPEG", exif=exif.tobytes()))
    assert out.shape == (20, 10, 3)


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
        buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    with pytest.raises(DataError, match=r"cut\.jpg: cannot decode image"):
        decode_image(path)
