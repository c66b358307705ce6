from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY

from tlkit.models.backbones import get_backbone
from tlkit.models.cut import build_tail, build_trunk, resolve_cut, single_tensor_cuts
from tlkit.models.model import build_classifier


@pytest.mark.parametrize(
    "name,size",
    [
        pytest.param("resnet50", 32, marks=pytest.mark.slow),
        pytest.param("inception_v3", 75, marks=pytest.mark.slow),
        pytest.param("vgg16", 32, marks=pytest.mark.slow),
        (TINY, 32),  # the mechanics in a second; the real architectures in the slow lane
    ],
)
def test_trunk_then_tail_equals_the_whole_model_at_any_freeze_point(name, size):
    spec = get_backbone(name)
    base = spec.build(size)
    model = build_classifier(spec, base, 3, size)
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype("uint8")
    expected = np.asarray(model(x))
    n = len(base.layers)
    cuts = single_tensor_cuts(base)
    assert 1 in cuts and n in cuts
    for requested in sorted({1, 10, n // 3, n // 2, n - 5, n}):
        cut = resolve_cut(base, requested)
        assert cut.k <= requested and cut.k in cuts
        assert max(k for k in cuts if k <= requested) == cut.k  # the nearest cut below
        out = np.asarray(build_tail(model, cut)(build_trunk(model, cut)(x)))
        np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.slow  # builds a real architecture: its layer names are the point
def test_residual_block_interior_is_not_a_cut():
    base = get_backbone("resnet50").build(32)
    names = [layer.name for layer in base.layers]
    cuts = set(single_tensor_cuts(base))
    assert names.index("conv2_block1_out") + 1 in cuts
    assert names.index("conv2_block2_1_conv") + 1 not in cuts  # the shortcut also crosses
    cut = resolve_cut(base, names.index("conv2_block2_2_conv") + 1)
    assert cut.layer == "conv2_block1_out"
    assert resolve_cut(base, 0) is None


def test_the_test_backbone_has_a_block_whose_interior_is_not_a_cut():
    base = get_backbone(TINY).build(32)
    names = [layer.name for layer in base.layers]
    cuts = set(single_tensor_cuts(base))
    assert names.index("stem_relu") + 1 in cuts and names.index("block1_out") + 1 in cuts
    for inside in ("block1_1_conv", "block1_1_relu", "block1_2_bn"):
        assert names.index(inside) + 1 not in cuts  # the shortcut crosses too
    assert resolve_cut(base, names.index("block1_2_conv") + 1).layer == "stem_relu"
