from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY

from tlkit.models.backbones import get_backbone
from tlkit.models.model import build_classifier, preprocessing_layers


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_preprocessing_layers_equal_keras_preprocess_input(mode):
    from keras.applications import imagenet_utils

    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype("uint8")
    out = x
    for layer in preprocessing_layers(mode):
        out = layer(out)
    expected = imagenet_utils.preprocess_input(x.astype("float32"), mode=mode)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("mode", "expected"), [("lite", lambda x: (x - 127) / 128), ("none", lambda x: x)]
)
def test_lite_and_in_backbone_preprocessing(mode, expected):
    """EfficientNet-Lite's (x - 127) / 128 (its stem's BatchNorm statistics match it);
    "none" leaves 0..255 to a backbone that preprocesses itself."""
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype("uint8")
    out = x
    for layer in preprocessing_layers(mode):
        out = layer(out)
    np.testing.assert_allclose(np.asarray(out), expected(x.astype("float64")), atol=1e-6)


def test_classifier_takes_uint8_and_outputs_probabilities():
    spec = get_backbone(TINY)
    model = build_classifier(spec, spec.build(32), 4, 32)
    assert model.input.dtype == "uint8"
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    p = np.asarray(model.predict(x, verbose=0))
    assert p.shape == (3, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
