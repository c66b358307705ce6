from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tlkit.cli import cli
from tlkit.core.errors import ConfigError
from tlkit.models.backbones import OUTPUT, REGISTRY, get_backbone, stage_of_layers

# Every registered backbone must be listed here; the guard below fails otherwise.
TESTED = [
    "vgg16",
    "vgg19",
    "inception_v3",
    "inception_resnet_v2",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50_v2",
    "resnet101_v2",
    "resnet152_v2",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_v2_b0",
    "efficientnet_v2_s",
    "convnext_tiny",
    "mobilenet_v3_large",
    "test_resnet",
]

# keras.applications' published table (https://keras.io/api/applications/), millions, with top;
# EfficientNet-Lite0: TensorFlow's efficientnet-lite README; MobileNetV3-Large: its paper's
# Table 3 (also in keras' mobilenet_v3.py docstring), which Keras' implementation exceeds by
# 0.1 M (5,507,432: the 1280-wide last conv carries a bias there), hence the tolerance; the
# Lite README truncates Lite1's 5.47 M and Lite2's 6.15 M (checked exactly below).
PUBLISHED_PARAMS_M = {
    "vgg16": 138.4,
    "vgg19": 143.7,
    "inception_v3": 23.9,
    "inception_resnet_v2": 55.9,
    "resnet50": 25.6,
    "resnet101": 44.7,
    "resnet152": 60.4,
    "resnet50_v2": 25.6,
    "resnet101_v2": 44.7,
    "resnet152_v2": 60.4,
    "efficientnet_lite0": 4.7,
    "efficientnet_lite1": 5.4,
    "efficientnet_lite2": 6.1,
    "efficientnet_v2_b0": 7.2,
    "efficientnet_v2_s": 21.6,
    "convnext_tiny": 28.6,
    "mobilenet_v3_large": 5.4,
}
TOLERANCE_M = {"mobilenet_v3_large": 0.11, "efficientnet_lite1": 0.1, "efficientnet_lite2": 0.1}


def test_every_registered_backbone_is_tested():
    assert sorted(REGISTRY) == sorted(TESTED)
    assert sorted(PUBLISHED_PARAMS_M) == sorted(n for n in TESTED if n != "test_resnet")


@pytest.mark.slow
@pytest.mark.parametrize("name", TESTED)
def test_builds_at_minimum_size_with_finite_output_and_known_stages(name):
    spec = get_backbone(name)
    base = spec.build(spec.min_size)
    # the registry knows each backbone's depth without building it (`tlkit backbones`)
    assert len(base.layers) == spec.n_layers, (name, len(base.layers))
    x = np.random.default_rng(0).uniform(-1, 1, (2, spec.min_size, spec.min_size, 3))
    out = np.asarray(base.predict(x.astype("float32"), verbose=0))
    assert out.shape[0] == 2 and np.isfinite(out).all()
    names = [layer.name for layer in base.layers]
    ends = [end for _, end in spec.stages]
    named = [e for e in ends if e != OUTPUT]
    assert all(end in names for end in named), [e for e in named if e not in names]
    assert [names.index(e) for e in named] == sorted(names.index(e) for e in named)
    # the last stage ends at the backbone's output (OUTPUT: that layer's name is numbered)
    assert ends[-1] in (names[-1], OUTPUT)
    assert all(end in names for end in ends if end != OUTPUT)
    stages = stage_of_layers(spec, names)
    assert stages[0] == spec.stages[0][0] and stages[-1] == spec.stages[-1][0]


def test_input_size_below_minimum_is_refused():
    with pytest.raises(ConfigError, match="minimum of 75 for inception_v3"):
        get_backbone("inception_v3").resolve_input_size(64)
    assert get_backbone("inception_v3").default_size == 299


def test_unknown_backbone_suggests_a_name():
    with pytest.raises(ConfigError, match="Did you mean 'resnet50'"):
        get_backbone("resnet05")


@pytest.mark.slow
def test_backbones_command_matches_published_parameter_counts():
    result = CliRunner().invoke(cli, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert sorted(rows) == sorted(TESTED)
    for name, published in PUBLISHED_PARAMS_M.items():
        count = rows[name]["params_with_top"] / 1e6
        assert abs(count - published) <= TOLERANCE_M.get(name, 0.05), (name, count)
    assert rows["resnet50"]["params_with_top"] == 25_636_712
    # EfficientNet-Lite0: the checkpoint's 4,694,073 numbers less 49 BatchNorm step counters
    assert rows["efficientnet_lite0"]["params_with_top"] == 4_694_073 - 49
    assert rows["efficientnet_lite0"]["params_no_top"] == 4_694_024 - 1_281_000
    # Lite1 and Lite2: their checkpoints' numbers less 64 step counters each
    assert rows["efficientnet_lite1"]["params_with_top"] == 5_470_408 - 64
    assert rows["efficientnet_lite2"]["params_with_top"] == 6_150_232 - 64
    # the test backbone, counted by hand: convs 216 + 2 x 576 + 1,152 + 4,608, BatchNorm
    # 4 x (8 + 8 + 8 + 16 + 32); its top is a 1000-way Dense on 32 pooled channels
    assert rows["test_resnet"]["params_no_top"] == 7_128 + 4 * 72 == 7_416
    assert rows["test_resnet"]["params_with_top"] == 7_416 + 32 * 1000 + 1000
    assert rows["inception_v3"]["default_size"] == 299
    table = CliRunner().invoke(cli, ["backbones"])  # second call: served from the cache
    assert "138.4M" in table.output and "inception_resnet_v2" in table.output


@pytest.mark.slow  # builds a real architecture: its layer names are the point
def test_inspect_prints_every_layer_with_index_and_stage():
    result = CliRunner().invoke(cli, ["inspect", "vgg16", "--input-size", "32"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["index", "name", "type"]
    row = next(line for line in lines if " block1_conv1 " in line)
    assert row.split()[:3] == ["1", "block1_conv1", "Conv2D"] and row.split()[-2:] == [
        "*",
        "block1",
    ]
    assert "1,792" in row  # 3*3*3*64 + 64
    assert sum(1 for line in lines if line.strip()[:1].isdigit()) == 19


def test_the_test_backbone_has_no_imagenet_weights_and_says_so():
    from tlkit.core.errors import WeightsError
    from tlkit.models.weights import resolve_weights

    with pytest.raises(
        WeightsError,
        match=r"test_resnet has no ImageNet weights .* use "
        r"--weights none",
    ):
        resolve_weights(get_backbone("test_resnet"), "imagenet")


@pytest.mark.slow  # builds two real architectures: their stage boundaries are the point
@pytest.mark.parametrize(("name", "stages"), [("efficientnet_lite0", 9), ("convnext_tiny", 5)])
def test_freeze_blocks_follows_the_stages_to_the_output(name, stages):
    """Every stage boundary is a layer (or the output); K stages freeze up to the K-th end."""
    from tlkit.models.freezing import FreezeRequest, resolve_freeze

    spec = get_backbone(name)
    names = [layer.name for layer in spec.build(spec.min_size).layers]
    assert len(spec.stages) == stages
    frozen = [
        resolve_freeze(FreezeRequest(blocks=k), spec, names).n_frozen for k in range(stages + 1)
    ]
    assert frozen[0] == 0 and frozen[-1] == len(names)
    assert frozen == sorted(set(frozen))  # each stage adds layers
    for k, (_, end) in enumerate(spec.stages[:-1], start=1):
        assert names[frozen[k] - 1] == end
    if name == "efficientnet_lite0":  # block names as keras.applications' EfficientNetB0
        assert [s for s, _ in spec.stages] == ["stem", *(f"stage{i}" for i in range(1, 8)), "top"]
        assert names[frozen[3] - 1] == "block2b_add" and names[-1] == "top_activation"
