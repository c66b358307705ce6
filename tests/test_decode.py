from __future__ import annotations

import io
import struct
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from tlkit.cli import cli
from tlkit.core.errors import DataError
from tlkit.data import decode
from tlkit.data.augment import TrainTransform, resolve_augment
from tlkit.data.decode import Need, decode_for, decode_image
from tlkit.data.pipeline import load_train_image

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


def rational_strip_tiff(path: Path) -> Path:
    """A turned TIFF whose StripOffsets entry is typed RATIONAL: loading it, inside
    ImageOps.exif_transpose, Pillow raises TypeError ('IFDRational' object cannot be interpreted
    as an integer), which check-data let through (issue 38, item 5)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 8, 3), 7, np.uint8)).save(buf, "TIFF", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for at in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, at)[0] == 273:  # StripOffsets
            struct.pack_into("<H", data, at + 2, 5)  # RATIONAL
    path.write_bytes(bytes(data))
    return path


def test_whatever_pillow_raises_on_a_file_is_one_line_naming_it(tmp_path):
    path = rational_strip_tiff(tmp_path / "odd.tif")
    with pytest.raises(DataError) as caught:
        decode_for(path, None)
    text = str(caught.value)
    assert text.startswith(f"{path}: cannot decode image (TypeError: ") and "\n" not in text
    assert "IFDRational" in text and text.endswith("re-export or remove it")


def test_tlkit_bugs_and_memory_errors_are_not_called_bad_images(tmp_path, monkeypatch):
    """Only the image library's calls are guarded: a bug in tlkit's conversion keeps its
    traceback, and running out of memory is not the file's fault."""
    path = save(tmp_path / "a.png", Image.fromarray(RGB), "PNG")

    def buggy(raw, kind, peak):
        raise ZeroDivisionError("a bug in tlkit")

    monkeypatch.setattr(decode, "_as_rgb", buggy)
    with pytest.raises(ZeroDivisionError):
        decode_image(path)
    monkeypatch.undo()

    def exhausted(im, **kwargs):
        raise MemoryError

    monkeypatch.setattr(decode.ImageOps, "exif_transpose", exhausted)
    with pytest.raises(MemoryError):
        decode_image(path)


@pytest.mark.parametrize("recorded", ["0x0", "40000x1"])
def test_a_users_png_claiming_a_full_size_is_the_image_it_is(tmp_path, recorded):
    """The store's size field is honoured in a store's entries only: a user's PNG carrying
    '0x0' passed check-data, then divided by zero in training; '40000x1' ended in a cv2 error."""
    root = tmp_path / "data"
    info = PngImagePlugin.PngInfo()
    info.add_text("tlkit-full-size", recorded)
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8))
            image.save(root / name / f"{i}.png", pnginfo=info)
    path = root / "cat" / "0.png"
    assert Image.open(path).info["tlkit-full-size"] == recorded
    checked = CliRunner().invoke(cli, ["check-data", str(root)])
    assert checked.exit_code == 0 and "6 files, 6 ok, 0 bad" in checked.output, checked.output
    standard = TrainTransform(resolve_augment("standard"), 16, 0.875)
    assert decode_for(path, standard.need).full == (40, 30)
    for index in range(4):
        assert load_train_image(str(path), standard, 0, 0, index).shape == (16, 16, 3)


def test_a_turned_tiff_has_its_shown_size(tmp_path):
    """Pillow's TIFF header already has the turned size; it used to be turned twice."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path / "t.tif", Image.fromarray(np.zeros((30, 40, 3), np.uint8)), "TIFF")
    Image.open(path).save(path, "TIFF", exif=exif.tobytes())
    decoded = decode_for(path, Need(shorter=4))
    assert decoded.image.shape == (40, 30, 3) and decoded.full == (30, 40)


def deep(mode: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A 37x23 image of `mode` with values over its whole range, and a format that keeps it."""
    shape = (23, 37)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, shape).astype(np.uint16)), "PNG"
    if mode in ("I", "I small"):
        top = 70000 if mode == "I" else 256
        return Image.fromarray(rng.integers(-50, top, shape).astype(np.int32)), "TIFF"
    if mode in ("F", "F unit"):
        top = 300.0 if mode == "F" else 1.0
        return Image.fromarray(rng.uniform(-0.1, top, shape).astype(np.float32)), "TIFF"
    rgba = Image.fromarray(rng.integers(0, 256, (*shape, 4), np.uint8), "RGBA")
    if mode == "P":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = 3
        return image, "PNG"
    return rgba.convert(mode), "TIFF" if mode == "CMYK" else "PNG"


MODES = ("RGB", "L", "1", "LA", "RGBA", "P", "CMYK", "I;16", "I", "I small", "F", "F unit")


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_converts_the_same_a_strip_at_a_time(tmp_path, monkeypatch, mode):
    """Converted a row at a time (a partial last strip too) or whole: the same pixels, and for
    deep greys, the values the old int64 / float64 formula gave."""
    image, fmt = deep(mode, np.random.default_rng(1))
    options = {"transparency": 3} if mode == "P" else {}
    path = save(tmp_path / f"x.{fmt.lower()}", image, fmt, **options)
    whole = decode_image(path)
    monkeypatch.setattr(decode, "STRIP_PIXELS", 37 * 2)  # two rows a strip, 23 rows
    np.testing.assert_array_equal(decode_image(path), whole)
    stored = Image.open(path)
    if stored.mode in ("I;16", "I", "F"):
        values = np.asarray(stored, dtype=np.float64)
        peak = {"I;16": 65535.0, "I": 65535.0 if values.max() > 255 else 255.0}.get(
            stored.mode, 1.0 if values.max() <= 1 else 255.0
        )
        expected = np.clip(values * 255.0 / peak + 0.5, 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(whole[..., 1], expected)


def test_a_16_bit_png_is_converted_at_8_bits(tmp_path):
    """A 36 kB 16-bit 4000x4000 PNG made 386 MB of numpy temporaries through int64 and float64
    (2.4 GB at the 100-megapixel limit); now 53 MB, 48 of them the result."""
    deep16 = np.zeros((4000, 4000), np.uint16)
    deep16[::7, ::5] = 40000
    path = tmp_path / "deep.png"
    Image.fromarray(deep16).save(path)
    tracemalloc.start()
    try:
        out = decode_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (4000, 4000, 3) and out[0, 0, 0] == 156 and out[1, 1, 2] == 0
    assert peak < out.nbytes + 16e6, f"{peak / 1e6:.0f} MB"


def test_threads_decode_within_the_pixel_budget_and_a_bigger_image_alone(tmp_path, monkeypatch):
    """Decodes running at once hold at most the budget's pixels between them; an image above
    the whole budget waits for the others, decodes alone, and does not deadlock."""
    small = [save(tmp_path / f"s{i}.png", Image.new("RGB", (30, 20)), "PNG") for i in range(6)]
    big = save(tmp_path / "big.png", Image.new("RGB", (50, 40)), "PNG")  # 2000 pixels
    live, seen, lock = [0], [], threading.Lock()
    convert = decode._rgb

    def slow(im, library):  # what each decode holds while it converts, as it starts
        pixels = im.size[0] * im.size[1]
        with lock:
            live[0] += pixels
            seen.append((pixels, live[0]))
        time.sleep(0.1)
        try:
            return convert(im, library)
        finally:
            with lock:
                live[0] -= pixels

    monkeypatch.setattr(decode, "_rgb", slow)

    def run(budget: int) -> list[tuple[int, int]]:
        monkeypatch.setattr(decode, "BUDGET", decode.PixelBudget(budget))
        seen.clear()
        pool = ThreadPoolExecutor(4)
        try:
            jobs = [pool.submit(decode_image, p) for p in [*small[:3], big, *small[3:]]]
            assert all(job.result(timeout=30).shape[2] == 3 for job in jobs)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return list(seen)

    assert max(held for _, held in run(10**9)) > 1000  # unbounded, the threads overlap
    bounded = run(1000)
    assert (2000, 2000) in bounded  # the big image, alone
    assert all(held <= 1000 for pixels, held in bounded if pixels < 2000), bounded
