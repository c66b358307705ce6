"""A JPEG decoded at a reduced scale: the scale each view allows, and parity with full decode."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.photos import textured_photo
from tlkit.data.augment import (
    TrainTransform,
    eval_need,
    eval_transform,
    resolve_augment,
    sample_rng,
)
from tlkit.data.decode import REDUCED_MARGIN, Need, decode_for, decode_image
from tlkit.evaluation.views import crop_views, views_need

SIZES = ((4000, 3000), (3000, 4000), (4001, 2999), (1024, 768), (640, 480), (333, 250))
PRESETS = ("none", "light", "alexnet", "vgg", "standard")


def transform(preset: str, size: int) -> TrainTransform:
    return TrainTransform(resolve_augment(preset, pca_sigma=0.0), size, 0.875)


def kept(need: Need, width: int, height: int, k: int) -> bool:
    """Whether a 1/k decode keeps REDUCED_MARGIN x what the view needs (sides rounded up)."""
    w, h = math.ceil(width / k), math.ceil(height / k)
    region = math.sqrt(need.region * w * h)
    return (
        min(w, h) >= REDUCED_MARGIN * need.shorter and region >= REDUCED_MARGIN * need.region_side
    )


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("preset", PRESETS)
def test_the_reduction_keeps_what_each_preset_needs_and_no_more(preset, size):
    need = transform(preset, size).need
    for width, height in SIZES:
        k = need.reduction(width, height)
        if k > 1:
            assert kept(need, width, height, k), (width, height, k)
        if k < 8:  # the next reduction would fall short
            assert not kept(need, width, height, 2 * k), (width, height, k)


def test_the_reduction_of_each_view_on_a_phone_photo():
    """4000x3000 at 224 px: what each view is cut from, and so the scale it is decoded at."""
    expected = {"none": 4, "light": 4, "alexnet": 4, "vgg": 2, "standard": 1}
    assert {p: transform(p, 224).need.reduction(4000, 3000) for p in PRESETS} == expected
    assert views_need(224, 0.875, "10").reduction(4000, 3000) == 4
    assert views_need(224, 0.875, "multiscale").reduction(4000, 3000) == 2  # 384 px scale
    assert views_need(224, 0.875, "dense").shorter == eval_need(224, 0.875).shorter
    assert transform("standard", 64).need.reduction(4000, 3000) == 4


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    Image.fromarray(textured_photo(4000, 3000)).save(path, quality=90)
    return path


def test_the_decoded_image_has_the_scale_libjpeg_was_asked_for(photo):
    for need, shape in [
        (None, (3000, 4000, 3)),
        (Need(shorter=751), (3000, 4000, 3)),  # 2 x 751 > 1500: not even 1/2
        (Need(shorter=750), (1500, 2000, 3)),
        (Need(shorter=375), (750, 1000, 3)),
        (Need(shorter=187), (375, 500, 3)),
    ]:
        decoded = decode_for(photo, need)
        assert decoded.image.shape == shape and decoded.full == (4000, 3000)


@pytest.mark.parametrize("size", [64, 224])
def test_views_of_a_reduced_decode_match_full_decode_within_a_grey_level(photo, size):
    """Mean absolute difference against full decode + the same transform, on fine noise over a
    scene with sharp wraps (the hardest case for a box average): measured 0.29-0.93."""
    full = decode_image(photo)
    decoded = decode_for(photo, eval_need(size, 0.875))
    assert decoded.image.shape[0] < 3000
    view = eval_transform(decoded.image, size, 0.875).astype(int)
    assert np.abs(view - eval_transform(full, size, 0.875)).mean() <= 1.0
    for preset in ("light", "vgg", "standard"):
        t = transform(preset, size)
        decoded = decode_for(photo, t.need)
        diffs = [
            np.abs(
                t(decoded.image, sample_rng(0, 0, i), decoded.full).astype(int)
                - t(full, sample_rng(0, 0, i))
            ).mean()
            for i in range(8)
        ]
        assert np.mean(diffs) <= 1.0 and max(diffs) <= 2.0, (preset, diffs)
    for mode in ("10", "multiscale"):
        decoded = decode_for(photo, views_need(size, 0.875, mode))
        views = crop_views(decoded.image, size, 0.875, mode).astype(int)
        assert np.abs(views - crop_views(full, size, 0.875, mode)).mean() <= 1.0


def test_a_turned_photo_keeps_its_displayed_size_and_crops(tmp_path):
    """EXIF orientation 6: stored 4000x3000, shown 3000x4000; crops land on the same content."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    Image.fromarray(textured_photo(4000, 3000)).save(path, quality=90, exif=exif.tobytes())
    t = transform("standard", 64)
    decoded = decode_for(path, t.need)
    assert decoded.full == (3000, 4000) and decoded.image.shape == (1000, 750, 3)
    full = decode_image(path)
    crop = t(decoded.image, sample_rng(0, 0, 0), decoded.full).astype(int)
    assert np.abs(crop - t(full, sample_rng(0, 0, 0))).mean() <= 2.0


def test_other_formats_are_decoded_in_full(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(textured_photo(800, 600)).save(path)
    decoded = decode_for(path, Need(shorter=10))
    np.testing.assert_array_equal(decoded.image, decode_image(path))
