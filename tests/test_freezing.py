from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY

from tlkit.core.errors import ConfigError
from tlkit.models.backbones import get_backbone
from tlkit.models.freezing import (
    FreezeRequest,
    apply_freeze,
    freeze_all,
    is_batch_norm,
    parse_freeze_count,
    resolve_freeze,
)
from tlkit.models.model import build_classifier


def trainable_layers(base) -> set[str]:
    return {layer.name for layer in base.layers if layer.trainable_weights}


def plan_for(name: str, size: int, **request):
    spec = get_backbone(name)
    base = spec.build(size)
    return spec, base, resolve_freeze(FreezeRequest(**request), spec, [x.name for x in base.layers])


@pytest.mark.slow  # builds a real architecture: its layer names are the point
def test_freeze_10_vgg16_exact_trainable_set():
    _, base, plan = plan_for("vgg16", 32, count="10")
    assert plan.n_frozen == 10 and plan.last_frozen == "block3_conv3"
    apply_freeze(base, plan)
    assert trainable_layers(base) == {
        "block4_conv1",
        "block4_conv2",
        "block4_conv3",
        "block5_conv1",
        "block5_conv2",
        "block5_conv3",
    }


@pytest.mark.slow  # builds a real architecture: its layer names are the point
def test_freeze_10_resnet50_exact_trainable_set():
    _, base, plan = plan_for("resnet50", 32, count="10")
    names = [x.name for x in base.layers]
    assert names[1:10] == [
        "conv1_pad",
        "conv1_conv",
        "conv1_bn",
        "conv1_relu",
        "pool1_pad",
        "pool1_pool",
        "conv2_block1_1_conv",
        "conv2_block1_1_bn",
        "conv2_block1_1_relu",
    ]
    frozen_bn = apply_freeze(base, plan)
    trainable = trainable_layers(base)
    assert plan.last_frozen == "conv2_block1_1_relu"
    assert "conv1_conv" not in trainable and "conv2_block1_1_conv" not in trainable
    assert "conv2_block1_2_conv" in trainable and "conv5_block3_3_conv" in trainable
    # every conv after index 10 trains; no BatchNorm trains without --train-bn
    convs_after = {x.name for x in base.layers[10:] if x.name.endswith("_conv")}
    assert trainable == convs_after
    assert frozen_bn == sum(is_batch_norm(x) for x in base.layers) == 53
    apply_freeze(base, plan, train_bn=True)
    bns_after = {x.name for x in base.layers[10:] if is_batch_norm(x)}
    assert trainable_layers(base) == convs_after | bns_after


@pytest.mark.slow  # builds a real architecture: its layer names are the point
def test_freeze_variants_resolve_to_a_count():
    spec, base, _ = plan_for("vgg16", 32)
    names = [x.name for x in base.layers]
    n = len(names)

    def count(**kw):
        return resolve_freeze(FreezeRequest(**kw), spec, names).n_frozen

    assert count(count="all") == n and count() == n
    assert count(count="0") == 0
    assert count(count="-3") == n - 3  # the last 3 layers stay trainable
    assert count(to_layer="block2_pool") == names.index("block2_pool") + 1
    assert count(blocks=2) == names.index("block2_pool") + 1
    assert count(blocks=0) == 0


@pytest.mark.parametrize(
    "request_kw,message",
    [
        ({"count": "999"}, r"--freeze 999 is out of range"),
        ({"to_layer": "block9_conv1"}, r"has no layer named 'block9_conv1'"),
        ({"blocks": 6}, r"--freeze-blocks must be between 0 and 5"),
        ({"count": "3", "blocks": 1}, r"choose one of"),
    ],
)
def test_bad_freeze_requests_are_clear_errors(request_kw, message):
    spec = get_backbone("vgg16")
    names = [f"l{i}" for i in range(19)]
    with pytest.raises(ConfigError, match=message):
        resolve_freeze(FreezeRequest(**request_kw), spec, names)


def test_parse_freeze_count():
    assert parse_freeze_count("ALL") == "all" and parse_freeze_count("-2") == "-2"
    with pytest.raises(ConfigError, match="Received: 'ten'"):
        parse_freeze_count("ten")


def _fit_on_shifted_data(model, seed=0):
    import keras

    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(200, 30, (32, 32, 32, 3)), 0, 255).astype("uint8")  # far from init
    y = rng.integers(0, 3, 32)
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def _bn_stats(base):
    return {
        x.name: [w.copy() for w in x.get_weights()[2:]] for x in base.layers if is_batch_norm(x)
    }


@pytest.mark.parametrize("train_bn", [False, True])
def test_fit_keeps_bn_statistics_and_frozen_kernels(train_bn):
    """Keras 3 fit() runs nested models with training=True; trainable=False must still hold.
    (The mechanism, not the architecture, is the point: the test backbone, frozen inside its
    residual block.)"""
    import keras

    keras.utils.set_random_seed(1)
    spec, base, plan = plan_for(TINY, 32, count="5")
    model = build_classifier(spec, base, 3, 32)
    apply_freeze(base, plan, train_bn=train_bn)
    stats_before = _bn_stats(base)
    kernels_before = {x.name: x.get_weights()[0].copy() for x in base.layers if x.weights}
    _fit_on_shifted_data(model)
    stats_after = _bn_stats(base)
    names = [x.name for x in base.layers]
    for name, before in stats_before.items():
        after = stats_after[name]
        in_trainable_part = names.index(name) >= plan.n_frozen
        same = all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        assert same == (not (train_bn and in_trainable_part)), name
    for x in base.layers:
        if x.name.endswith("_conv"):
            changed = not np.array_equal(kernels_before[x.name], x.get_weights()[0])
            assert changed == (names.index(x.name) >= plan.n_frozen), x.name


def test_head_phase_freezes_every_backbone_weight():
    spec, base, _ = plan_for(TINY, 32)
    model = build_classifier(spec, base, 3, 32)
    n_bn = freeze_all(base)
    assert n_bn == 5 and not base.trainable_weights
    before = [w.copy() for w in base.get_weights()]
    _fit_on_shifted_data(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, base.get_weights(), strict=True))


def test_calibrated_batch_norm_normalizes_in_inference_mode_as_a_training_batch_does():
    """After calibration on one batch, inference mode on that batch gives what a training-mode
    pass gives (its own statistics), and the layers' momentum and trainable flags are back."""
    import keras

    from tlkit.models.freezing import recompute_bn_statistics

    keras.utils.set_random_seed(2)
    _, base, plan = plan_for(TINY, 32, count="all")
    apply_freeze(base, plan)  # every BatchNorm frozen, as a run leaves them
    flags = [(x.momentum, x.trainable) for x in base.layers if is_batch_norm(x)]
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)
    assert recompute_bn_statistics(base, [x]) == 5
    assert [(x.momentum, x.trainable) for x in base.layers if is_batch_norm(x)] == flags
    for layer in base.layers:
        layer.trainable = True  # training mode reads the batch's own statistics
    np.testing.assert_allclose(
        np.asarray(base(x, training=False)), np.asarray(base(x, training=True)), atol=1e-3
    )


def test_statistics_batches_are_weighted_by_their_images():
    """A short last batch counts for its images, not as much as a whole one: the moving mean
    is the mean over every image."""
    import keras

    from tlkit.models.freezing import recompute_bn_statistics

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    x = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)
    x[32:] += 10.0  # the short batch differs, so equal weights would miss the mean
    recompute_bn_statistics(model, [x[:32], x[32:]])
    np.testing.assert_allclose(model.layers[1].moving_mean, x.mean(0), rtol=1e-5)


@pytest.mark.parametrize("n", [19, 120, 300, 5000])
def test_statistics_images_cover_a_class_sorted_split_in_mixed_batches(n):
    """A split is sorted by class: the chosen rows span it (every class of 12 seen), no row
    twice, the last short batch kept, and each batch mixes classes."""
    from tlkit.features.rows import BN_BATCH, BN_IMAGES, bn_indices

    labels = np.arange(n) * 12 // n  # 12 classes in order, as a split lists them
    parts = bn_indices(n)
    chosen = np.concatenate(parts)
    assert len(chosen) == len(set(chosen)) == min(n, BN_IMAGES)
    assert set(labels[chosen]) == set(range(12))
    assert all(len(p) == BN_BATCH for p in parts[:-1]) and 0 < len(parts[-1]) <= BN_BATCH
    assert all(len(set(labels[p])) > 3 for p in parts if len(p) >= 16)
    assert bn_indices(n)[0].tolist() == parts[0].tolist()  # fixed: a cache's trunk repeats


@pytest.mark.slow  # the real architecture is the point: its signal at initialization
def test_random_lite0_keeps_its_signal_only_with_calibrated_batch_norm():
    """With BatchNorm at its initial identity, random EfficientNet-Lite0 fades the signal to
    ~1e-12 (nothing can train, docs/training.md); calibrated, its last stage stays near 1."""
    import keras

    from tlkit.models.freezing import recompute_bn_statistics

    keras.utils.set_random_seed(0)
    base = get_backbone("efficientnet_lite0").build(64)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 64, 64, 3)).astype(np.float32)
    assert np.asarray(base(x, training=False)).std() < 1e-6
    recompute_bn_statistics(base, [x])
    assert np.asarray(base(x, training=False)).std() > 1e-2


def test_random_weights_keep_a_live_networks_batch_norm_unless_asked_and_recompute_it_if_so(
    make_folder, tmp_path
):
    """The tiny ResNet keeps its signal at initialization, so under --weights none its
    BatchNorm stays an identity; with --train-bn its statistics come from the training images
    and are recomputed before each validation, so the saved (best) model holds the statistics
    of its own weights over those images."""
    import json

    from click.testing import CliRunner

    from tlkit.cli import cli
    from tlkit.core.runs import load_run
    from tlkit.data.datasets import load_dataset
    from tlkit.features.rows import bn_batches, pooled_extractor
    from tlkit.models.freezing import leaf_layers, recompute_bn_statistics

    data = make_folder(per_class=12)
    args = ["finetune", str(data), "--backbone", TINY, "--weights", "none", "--input-size", "32"]
    args += ["--head-epochs", "1", "--epochs", "2", "--freeze", "0"]
    runs = {}
    for name, extra in (("default", []), ("train-bn", ["--train-bn"])):
        result = CliRunner().invoke(cli, [*args, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        runs[name] = result.output
        record = json.loads((tmp_path / name / "run.json").read_text())
        assert record["train_bn"] is (name == "train-bn")  # what ran; the config: the ask
        assert record["config"]["train_bn"] is (True if extra else None)
    # the saved model is a fine-tune epoch's, so its statistics are the callback's
    assert record["results"]["best"]["phase"] == "fine-tune"
    assert "BatchNorm stays frozen at its identity" in runs["default"]
    assert "before each validation" not in runs["default"]
    assert "take their statistics from 19 training images" in runs["train-bn"]
    assert "recomputed from 19 training images before each validation" in runs["train-bn"]

    model = load_run(tmp_path / "train-bn").load_model()
    bns = [x for x in leaf_layers(model) if is_batch_norm(x)]
    saved = [np.array(w) for x in bns for w in (x.moving_mean, x.moving_variance)]
    train = load_dataset(data).splits["train"]
    assert len(train) == 19
    recompute_bn_statistics(pooled_extractor(model), bn_batches(train, 32, 0.875, 10**9))
    again = [np.array(w) for x in bns for w in (x.moving_mean, x.moving_variance)]
    assert any(not np.allclose(w, 1.0) and not np.allclose(w, 0.0) for w in saved)
    for a, b in zip(saved, again, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the real architecture is the point: its signal fades at initialization
def test_random_lite0_is_found_faded_and_gets_batch_norm_from_the_data(make_folder):
    from tlkit.data.datasets import load_dataset
    from tlkit.features.rows import pooled_extractor, resolve_random_bn
    from tlkit.models.model import build_model
    from tlkit.models.weights import resolve_weights

    spec = get_backbone("efficientnet_lite0")
    model = build_model(spec, resolve_weights(spec, "none"), 64, 2, 0)
    train = load_dataset(make_folder(per_class=8)).splits["train"]
    assert resolve_random_bn(model, "none", train, 64, spec.crop_fraction, 10**9, None)
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    assert np.asarray(pooled_extractor(model)([x], training=False)).std() > 1e-2
    # the user's word stands: --no-train-bn keeps the identity, --train-bn trains anywhere
    other = build_model(spec, resolve_weights(spec, "none"), 64, 2, 0)
    assert not resolve_random_bn(other, "none", train, 64, spec.crop_fraction, 10**9, False)
    assert np.asarray(pooled_extractor(other)([x], training=False)).std() < 1e-6
