"""Class activation maps: an exact decomposition of the logit, and they point at the evidence."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY
from PIL import Image

from tlkit.cli import cli
from tlkit.evaluation.explain import class_maps, upsample


def test_the_maps_average_to_the_logits_the_model_softmaxes(tiny_runs):
    from tlkit.core.runs import load_run

    _data, runs = tiny_runs
    model = load_run(runs[0]).load_model()
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    _, bias = model.get_layer("predictions").get_weights()
    logits = np.stack(
        [class_maps(model, images, [c] * 5).mean(axis=(1, 2)) + bias[c] for c in range(3)], axis=1
    )
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(
        e / e.sum(1, keepdims=True), model.predict(images, verbose=0), atol=1e-5
    )


def test_the_maps_run_the_model_as_one_traced_graph_not_layer_by_layer(tiny_runs):
    """Called eagerly, Keras held 2.3 GB more than traced for 32 EfficientNet-Lite0 images:
    eval's report drew its maps that way and peaked 0.65 GB above its own evaluation."""
    import tensorflow as tf

    from tlkit.core.runs import load_run
    from tlkit.evaluation.explain import feature_map_model

    _data, runs = tiny_runs
    model = load_run(runs[0]).load_model()
    maps_model = feature_map_model(model)
    layer, eager = maps_model.layers[-1], []
    call = layer.call

    def spy(*args, **kwargs):
        eager.append(tf.executing_eagerly())
        return call(*args, **kwargs)

    layer.call = spy
    images = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    maps = class_maps(model, images, [0] * 40, maps_model)
    assert eager == [False]  # traced once, for both chunks of 32 and 8
    layer.call = call
    np.testing.assert_allclose(maps, class_maps(model, images, [0] * 40), atol=1e-5)


def test_predict_explain_writes_one_overlay_per_image(tiny_runs, tmp_path):
    data, runs = tiny_runs
    images = [str(p) for p in sorted((data / "test").rglob("*.png"))[:3]]
    out = tmp_path / "looks"
    result = CliRunner().invoke(cli, ["predict", str(runs[0]), *images, "--explain", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(out.iterdir())
    assert len(written) == 3 and "where it looks" in result.output
    assert Image.open(written[0]).size == (32, 32)
    again = CliRunner().invoke(cli, ["predict", str(runs[0]), *images, "--explain", str(out)])
    assert again.exit_code == 7 and "already exists" in again.output


def patch_images(n: int, rng: np.random.Generator, size: int = 64, side: int = 16):
    """Grey noise with one coloured square at a random place; the colour is the class."""
    images = rng.integers(60, 140, (n, size, size, 3)).astype(np.uint8)
    labels = rng.integers(0, 3, n)
    boxes = []
    for img, label in zip(images, labels, strict=True):
        y, x = rng.integers(10, size - side - 10, 2)
        img[y : y + side, x : x + side] = 40
        img[y : y + side, x : x + side, label] = 230
        boxes.append((y, x, side))
    return images, labels, boxes


@pytest.mark.slow  # about 12 s: a test backbone trained from scratch on 64 px patches
def test_the_map_peaks_inside_the_patch_that_decides_the_class(tmp_path):
    from tlkit.core.runs import load_run
    from tlkit.data.augment import eval_transform, resolve_augment
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    rng = np.random.default_rng(0)
    for split, n in (("train", 180), ("val", 45)):
        images, labels, _ = patch_images(n, rng)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            (tmp_path / "data" / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp_path / "data" / split / f"c{label}" / f"{i}.png")
    run = finetune(
        FinetuneConfig.of(
            data=str(tmp_path / "data"),
            backbone=TINY,
            weights="none",
            input_size=64,
            freeze=FreezeRequest(count="0"),
            augment=resolve_augment("none"),
            head_epochs=1,
            epochs=12,
            lr=3e-3,
            fine_tune_lr=2e-3,
            batch_size=32,
            patience=4,
            cache="off",
            output=str(tmp_path / "run"),
        ),
        verbose=0,
    )
    model = load_run(run.path).load_model()
    images, labels, boxes = patch_images(100, rng)
    views = np.stack([eval_transform(img, 64, 0.875) for img in images])
    scale, shift = 73 / 64, (73 - 64) // 2  # the eval view: shorter side 73, centre 64
    pred = model.predict(views, verbose=0).argmax(1)
    right = np.flatnonzero(pred == labels)
    assert len(right) >= 60  # the model learned the task
    maps = class_maps(model, views[right], labels[right])
    inside = 0
    for m, i in zip(maps, right, strict=True):
        py, px = np.unravel_index(upsample(m, 64).argmax(), (64, 64))
        y, x, side = boxes[i]
        top, left = y * scale - shift, x * scale - shift
        inside += top <= py <= top + side * scale and left <= px <= left + side * scale
    assert inside >= 0.9 * len(right), (inside, len(right))
