from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tlkit.backbones import REGISTRY, get_backbone, stage_of_layers
from tlkit.cli import cli
from tlkit.errors import ConfigError

# Every registered backbone must be listed here; the guard below fails otherwise.
TESTED = ["vgg16", "vgg19", "inception_v3", "inception_resnet_v2", "resnet50", "resnet101",
          "resnet152", "resnet50_v2", "resnet101_v2", "resnet152_v2", "test_resnet"]

# keras.applications' published table (https://keras.io/api/applications/), millions, with top.
PUBLISHED_PARAMS_M = {"vgg16": 138.4, "vgg19": 143.7, "inception_v3": 23.9,
                      "inception_resnet_v2": 55.9, "resnet50": 25.6, "resnet101": 44.7,
                      "resnet152": 60.4, "resnet50_v2": 25.6, "resnet101_v2": 44.7,
                      "resnet152_v2": 60.4}


def test_every_registered_backbone_is_tested():
    assert sorted(REGISTRY) == sorted(TESTED)
    assert sorted(PUBLISHED_PARAMS_M) == sorted(n for n in TESTED if n != "test_resnet")


@pytest.mark.slow
@pytest.mark.parametrize("name", TESTED)
def test_builds_at_minimum_size_with_finite_output_and_known_stages(name):
    spec = get_backbone(name)
    base = spec.build(spec.min_size)
    x = np.random.default_rng(0).uniform(-1, 1, (2, spec.min_size, spec.min_size, 3))
    out = np.asarray(base.predict(x.astype("float32"), verbose=0))
    assert out.shape[0] == 2 and np.isfinite(out).all()
    names = [layer.name for layer in base.layers]
    ends = [end for _, end in spec.stages]
    assert all(end in names for end in ends), [e for e in ends if e not in names]
    assert [names.index(e) for e in ends] == sorted(names.index(e) for e in ends)
    assert ends[-1] == names[-1]  # the last stage ends at the backbone's output
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
        assert round(rows[name]["params_with_top"] / 1e6, 1) == published, name
    assert rows["resnet50"]["params_with_top"] == 25_636_712
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
        "*", "block1"]
    assert "1,792" in row  # 3*3*3*64 + 64
    assert sum(1 for line in lines if line.strip()[:1].isdigit()) == 19


def test_the_test_backbone_has_no_imagenet_weights_and_says_so():
    from tlkit.errors import WeightsError
    from tlkit.weights import resolve_weights

    with pytest.raises(WeightsError, match=r"test_resnet has no ImageNet weights .* use "
                                           r"--weights none"):
        resolve_weights(get_backbone("test_resnet"), "imagenet")
