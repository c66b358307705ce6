from __future__ import annotations

import numpy as np
import pytest

from benchmarks.photos import textured_photo
from tlkit.core.errors import ConfigError
from tlkit.data.augment import (
    PRESETS,
    ColorPCA,
    TrainTransform,
    eval_transform,
    fit_color_pca,
    random_crop,
    random_resized_crop,
    resize_shorter,
    resolve_augment,
    sample_rng,
)


def random_orthonormal(seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q


def test_fit_color_pca_recovers_a_known_covariance():
    p = random_orthonormal(1)
    lam = np.array([0.04, 0.01, 0.002])  # covariance eigenvalues in [0, 1] pixel units
    rng = np.random.default_rng(0)
    pixels = 0.5 + (rng.normal(size=(200_000, 3)) * np.sqrt(lam)) @ p.T
    image = np.clip(np.rint(pixels * 255), 0, 255).astype(np.uint8).reshape(400, 500, 3)
    pca = fit_color_pca([image], pixels_per_image=200_000)
    np.testing.assert_allclose(pca.eigvals, lam, rtol=0.05, atol=2e-5)
    for i in range(3):  # eigenvectors up to sign
        assert abs(float(np.dot(np.asarray(pca.eigvecs)[:, i], p[:, i]))) > 0.99
    again = fit_color_pca([image], pixels_per_image=50_000)
    assert again == fit_color_pca([image], pixels_per_image=50_000)  # deterministic sample


def test_pca_colour_shift_statistics_match_the_alexnet_definition():
    """Shifts over many draws: mean ~0, covariance ~ sigma^2 P diag(lambda^2) P^T (x 255^2)."""
    p = random_orthonormal(2)
    lam = np.array([0.2, 0.05, 0.02])
    pca = ColorPCA(tuple(lam), tuple(tuple(r) for r in p), 1, 1)
    sigma = 0.25
    config = resolve_augment("none", pca_sigma=sigma)
    transform = TrainTransform(config, 8, 1.0, pca)
    grey = np.full((8, 8, 3), 128, np.uint8)
    shifts = np.array(
        [transform(grey, sample_rng(0, 0, i))[0, 0].astype(float) - 128 for i in range(6000)]
    )
    expected = (255 * sigma) ** 2 * p @ np.diag(lam**2) @ p.T
    assert np.abs(shifts.mean(axis=0)).max() < 0.5
    # rounding to integers adds ~1/12 to each variance
    np.testing.assert_allclose(
        np.cov(shifts, rowvar=False), expected + np.eye(3) / 12, rtol=0.08, atol=0.3
    )
    # every pixel gets the same shift
    out = transform(grey, sample_rng(0, 0, 7))
    assert (out == out[0, 0]).all()


def test_same_seed_epoch_index_same_image_and_epochs_differ():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    pca = fit_color_pca([image])
    for preset in ("light", "standard", "alexnet", "vgg"):
        t = TrainTransform(resolve_augment(preset), 32, 0.875, pca)
        a = t(image, sample_rng(3, 0, 5))
        assert a.shape == (32, 32, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, t(image, sample_rng(3, 0, 5)))
        fresh = TrainTransform(resolve_augment(preset), 32, 0.875, pca)  # another worker
        np.testing.assert_array_equal(a, fresh(image, sample_rng(3, 0, 5)))
        assert not np.array_equal(a, t(image, sample_rng(3, 1, 5))), preset


def test_none_preset_is_exactly_the_eval_transform():
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    t = TrainTransform(resolve_augment("none"), 32, 0.875)
    np.testing.assert_array_equal(t(image, sample_rng(0, 0, 0)), eval_transform(image, 32, 0.875))
    assert not resolve_augment("none").random


def test_eval_transform_geometry():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255  # right half white
    out = eval_transform(image, 32, 0.5)  # shorter side -> 64, centre 32x32
    assert out.shape == (32, 32, 3)
    assert out[:, :14].max() == 0 and out[:, 18:].min() == 255


def test_presets_and_overrides():
    assert set(PRESETS) >= {"none", "light", "standard", "alexnet", "vgg"}
    light = resolve_augment("light")
    assert (light.crop, light.flip_p, light.pca_sigma) == ("crop", 0.5, 0.0)
    assert light.scale_range == pytest.approx((1 / 0.875, 1 / 0.875))  # the eval scale
    alex = resolve_augment("alexnet")
    assert (alex.crop, alex.flip_p, alex.pca_sigma) == ("crop", 0.5, 0.1)
    assert resolve_augment("alexnet", pca_sigma=0.0).pca_sigma == 0.0
    assert resolve_augment("vgg").scale_range == pytest.approx((256 / 224, 512 / 224))
    with pytest.raises(ConfigError, match="Did you mean 'alexnet'"):
        resolve_augment("alexnett")


@pytest.mark.parametrize(
    "extra,message",
    [
        ('Rotat:{"limit": 5}', "unknown albumentations transform 'Rotat'. Did you mean 'Rotate'"),
        ('Rotate:{"limitt": 5}', "Rotate has no argument 'limitt'. Did you mean 'limit'"),
        ('Rotate:{"limit": "x"}', r"albumentations Rotate\(\{\"limit\": \"x\"\}\)"),
        ("Rotate:{bad", "arguments are not valid JSON"),
    ],
)
def test_bad_extra_transforms_fail_when_the_config_is_made(extra, message):
    with pytest.raises(ConfigError, match=message):
        resolve_augment("standard", extra=[extra])


def test_good_extra_transform_is_recorded():
    cfg = resolve_augment("standard", extra=['Rotate:{"limit": 15}', "ToGray"])
    assert cfg.as_dict()["extra"] == [
        {"name": "Rotate", "args": {"limit": 15}},
        {"name": "ToGray", "args": {}},
    ]


def test_training_crops_and_eval_resample_the_same_way_on_a_large_photo():
    """Un-augmented training crops are windows of exactly the eval view's resized image.
    (Before: training resized with OpenCV's bilinear, no smoothing when shrinking, eval with
    Pillow's; on this photo the two differed by tens of grey levels.)"""
    photo = textured_photo(4000, 3000)
    size, crop_fraction = 64, 0.875
    resized = resize_shorter(photo, round(size / crop_fraction))
    h, w = resized.shape[:2]
    view = eval_transform(photo, size, crop_fraction)
    top, left = (h - size) // 2, (w - size) // 2
    np.testing.assert_array_equal(view, resized[top : top + size, left : left + size])
    transform = TrainTransform(resolve_augment("light", flip_p=0.0), size, crop_fraction)
    for index in range(5):
        crop = transform(photo, sample_rng(0, 0, index)).astype(int)
        diffs = [
            np.abs(crop - resized[t : t + size, s : s + size]).mean()
            for t in range(h - size + 1)
            for s in range(w - size + 1)
        ]
        assert min(diffs) == 0.0
    # a resized crop of the whole square image is the eval view of it at crop fraction 1
    square = np.ascontiguousarray(photo[:, :3000])
    whole = random_resized_crop(square, size, (1.0, 1.0), (1.0, 1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(whole, eval_transform(square, size, 1.0))
    np.testing.assert_array_equal(
        random_crop(square, size, (1.0, 1.0), np.random.default_rng(0)),
        eval_transform(square, size, 1.0),
    )
    # and the smoothing matters here: plain bilinear without it is far off
    import cv2

    plain = cv2.resize(square, (size, size), interpolation=cv2.INTER_LINEAR)
    assert np.abs(plain.astype(int) - whole).mean() > 10


def test_random_resized_crop_keeps_area_and_ratio_in_range():
    image = textured_photo(300, 200)
    for seed in range(20):
        out = random_resized_crop(
            image, 32, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(seed)
        )
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # a ratio no region of this image can have falls back to the largest centred one
    tall = random_resized_crop(image, 16, (0.99, 1.0), (0.2, 0.25), np.random.default_rng(0))
    assert tall.shape == (16, 16, 3)


def test_auto_is_for_finetune_only():
    assert resolve_augment("auto", allow_auto=True).preset == "auto"
    with pytest.raises(ConfigError, match="chosen while training"):
        resolve_augment("auto")
    with pytest.raises(ConfigError, match="chooses the whole augmentation"):
        resolve_augment("auto", allow_auto=True, flip_p=0.0)
