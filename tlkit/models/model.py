"""The classifier: raw uint8 images -> backbone preprocessing -> backbone -> pooled head.

Preprocessing is built from stock Keras layers, so `model.keras` loads with plain
`keras.saving.load_model` and train, eval and predict can never disagree about it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.core.choices import LINEAR_HEAD
from tlkit.core.errors import ConfigError, RunError, WeightsError, first_line, shown
from tlkit.core.settings import SETTINGS
from tlkit.models.backbones import BackboneSpec
from tlkit.models.freezing import leaf_layers
from tlkit.models.weights import ResolvedWeights

# keras.applications.imagenet_utils constants, RGB order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
BACKBONE_LAYER = "backbone"
POOL_LAYER = "pool"
# (pooled features, number of classes) -> class probabilities: the layers on top of the pooled
# backbone, replaceable from Python (`tlkit.finetune(config, head=...)`)
Head = Callable[[Any, int], Any]


def preprocessing_layers(mode: str) -> list[Any]:
    """Layers equal to `imagenet_utils.preprocess_input(x, mode=mode)` on RGB 0..255 input
    (and EfficientNet-Lite's "lite"; "none" when the backbone has its own)."""
    import keras

    cast = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")
    if mode == "tf":
        return [
            cast,
            keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32", name="preprocess_tf"),
        ]
    if mode == "lite":  # EfficientNet-Lite's (x - 127) / 128
        return [
            cast,
            keras.layers.Rescaling(
                1 / 128, offset=-127 / 128, dtype="float32", name="preprocess_lite"
            ),
        ]
    if mode == "none":  # the backbone preprocesses 0..255 itself
        return [cast]
    if mode == "torch":
        mean = [255.0 * m for m in TORCH_MEAN]
        var = [(255.0 * s) ** 2 for s in TORCH_STD]
        return [
            cast,
            keras.layers.Normalization(
                mean=mean, variance=var, dtype="float32", name="preprocess_torch"
            ),
        ]
    if mode == "caffe":
        # RGB -> BGR and mean subtraction as one fixed 1x1 convolution (exact: 0/1 weights).
        kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for out_ch, in_ch in enumerate((2, 1, 0)):
            kernel[0, 0, in_ch, out_ch] = 1.0
        conv = keras.layers.Conv2D(3, 1, dtype="float32", name="preprocess_caffe", trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([kernel, -np.array(CAFFE_MEAN_BGR, dtype=np.float32)])
        return [cast, conv]
    raise ValueError(f"unknown preprocessing mode {mode!r}")  # the registry is wrong: a bug


def linear_head(dropout: float = SETTINGS["dropout"].default) -> Head:
    """tlkit's head: dropout, then one softmax Dense layer: a linear classifier on the pooled
    features, what the head probe trains, `--calibrate` folds its temperature into and the
    activation maps read."""

    def head(pooled: Any, num_classes: int) -> Any:
        import keras

        x = keras.layers.Dropout(dropout, name="dropout")(pooled)
        return keras.layers.Dense(
            num_classes, activation="softmax", dtype="float32", name="predictions"
        )(x)

    return head


def head_name(head: Head | None, model: Any) -> str:
    """How a run records its head: LINEAR_HEAD for tlkit's own, else the function's
    `module.name` and a digest of the layers it built (their kinds and settings, not their
    names), so that a resume given another head, or the same factory with other settings, is
    told apart."""
    if head is None:
        return LINEAR_HEAD
    import hashlib
    import json

    name = getattr(head, "__qualname__", type(head).__qualname__)
    layers = [
        [type(layer).__name__, {k: v for k, v in layer.get_config().items() if k != "name"}]
        for layer in head_of(model).layers[1:]  # past its input
    ]
    digest = hashlib.sha256(json.dumps(layers, sort_keys=True, default=str).encode()).hexdigest()
    return f"{getattr(head, '__module__', None) or '?'}.{name} (layers {digest[:12]})"


def tapped(base: Any, taps: Sequence[str]) -> Any:
    """The backbone named BACKBONE_LAYER: its own layers, in the same order (so freeze
    indices keep their meaning), with the tapped layers' outputs before its last."""
    import keras

    outputs = [base.get_layer(name).output for name in taps] + [base.outputs[-1]]
    if [id(t) for t in outputs] == [id(t) for t in base.outputs]:
        return base
    inner = keras.Model(base.input, outputs if taps else outputs[0], name=BACKBONE_LAYER)
    if [la.name for la in inner.layers] != [la.name for la in base.layers]:  # Keras changed
        raise RuntimeError("a tapped backbone reordered its layers; freeze indices would move")
    return inner


def taps_of(model: Any) -> tuple[str, ...]:
    """The tapped layers of a classifier's backbone (empty: the head reads the last layer)."""
    return backbone_taps(backbone_of(model))


def scales_of(model: Any) -> list[float]:
    """Each tap's scale (`scale_i`), as `tap_scales` measured it."""
    return [float(model.get_layer(f"scale_{i}").scale) for i in range(len(taps_of(model)))]


def backbone_taps(base: Any) -> tuple[str, ...]:
    """The tapped layers of a backbone (`tapped`): those making its outputs before the last."""
    return tuple(t._keras_history.operation.name for t in base.outputs[:-1])


def pool_maps(model: Any, maps: Any) -> Any:
    """The head's input from the backbone's maps, through the classifier's own pooling layers
    (`_pooled` made them)."""
    pool = model.get_layer(POOL_LAYER)
    if not isinstance(maps, (list, tuple)):
        return pool(maps)
    last = len(maps) - 1
    return pool(
        [
            model.get_layer(f"pool_{i}")(m)
            if i == last
            else model.get_layer(f"scale_{i}")(model.get_layer(f"pool_{i}")(m))
            for i, m in enumerate(maps)
        ]
    )


def _pooled(maps: Any, scales: Sequence[float] | None) -> Any:
    """Global average pooling of the backbone's map; with taps, of each map (`pool_i`), each
    tap's scaled (`scale_i`, by `scales`, default 1) and all concatenated (POOL_LAYER)."""
    import keras

    if not isinstance(maps, (list, tuple)):
        return keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(maps)
    scales = scales or [1.0] * (len(maps) - 1)
    pooled = [keras.layers.GlobalAveragePooling2D(name=f"pool_{i}")(m) for i, m in enumerate(maps)]
    scaled = [
        keras.layers.Rescaling(float(s), name=f"scale_{i}")(x)
        for i, (x, s) in enumerate(zip(pooled[:-1], scales, strict=True))
    ]
    return keras.layers.Concatenate(name=POOL_LAYER)([*scaled, pooled[-1]])


def tap_scales(model: Any, pooled: np.ndarray) -> list[float]:
    """Per tap, the factor that gives its pooled features the root mean square of the last
    layer's over these rows (the training images): stage ends are on other scales (several
    times the last layer's in EfficientNet-Lite), and the head's Adam steps, equal in every
    weight, would otherwise follow the loudest stage."""
    widths = [int(t.shape[-1]) for t in backbone_of(model).outputs]
    ends = np.cumsum([0, *widths])
    wide = np.asarray(pooled, np.float32)  # float16 features (mixed precision) would overflow
    rms = [float(np.sqrt(np.mean(np.square(wide[:, a:b])))) for a, b in itertools.pairwise(ends)]
    return [rms[-1] / r if r > 0 else 1.0 for r in rms[:-1]]


def rescaled(model: Any, pooled: np.ndarray, scales: Sequence[float]) -> np.ndarray:
    """Pooled features of the model with unit scales as the model with `scales` gives them."""
    widths = [int(t.shape[-1]) for t in backbone_of(model).outputs]
    factors = np.concatenate([np.full(w, s) for w, s in zip(widths, [*scales, 1.0], strict=True)])
    out: np.ndarray = (pooled * factors).astype(pooled.dtype)
    return out


def build_classifier(
    spec: BackboneSpec,
    base: Any,
    num_classes: int,
    input_size: int,
    head: Head | None = None,
    taps: Sequence[str] = (),
    scales: Sequence[float] | None = None,
) -> Any:
    """Wrap a backbone (a keras Model, no top) into the full uint8-in, softmax-out classifier:
    preprocessing, the backbone, global average pooling, then `head` (default: `linear_head`).

    Args:
        spec: the backbone's registry entry (its preprocessing).
        base: the backbone, a Keras model without its top.
        num_classes: the classes the head predicts.
        input_size: the square input's side, in pixels.
        head: `head(pooled, num_classes)` -> class probabilities, built from Keras layers
            (so `model.keras` loads in safe mode); its output must sum to one.
        taps: layers whose pooled outputs join the last layer's (`stage_taps`).
        scales: each tap's factor (`tap_scales`), default 1.
    """
    import keras

    if head is not None and not callable(head):
        raise ConfigError(
            f"head: must be a function (pooled features, number of classes) -> class "
            f"probabilities. Received: {shown(head, 60)}"
        )
    base.name = BACKBONE_LAYER
    base = tapped(base, taps)
    inputs = keras.Input((input_size, input_size, 3), dtype="uint8", name="image")
    x = inputs
    for layer in preprocessing_layers(spec.preprocessing):
        x = layer(x)
    pooled = _pooled(base(x), scales)
    outputs = (head or linear_head())(pooled, num_classes)
    shape = tuple(getattr(outputs, "shape", ()))
    if len(shape) != 2 or shape[-1] != num_classes:
        raise ConfigError(
            f"head: must return (batch, {num_classes}) class probabilities. Received a tensor "
            f"of shape {shape}"
        )
    if outputs.dtype != "float32":  # a mixed-precision head: probabilities in float32
        outputs = keras.layers.Activation("linear", dtype="float32", name="probabilities")(outputs)
    return keras.Model(inputs, outputs, name=f"tlkit_{spec.name}")


def check_user_head(model: Any) -> None:
    """A user's head must come back from `model.keras`: every reader loads it in Keras' safe
    mode, which refuses a Lambda layer (it would run code). Checked before training, so that
    hours of work never end in a model no command can open."""
    import keras

    head = head_of(model)
    try:
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(head), safe_mode=True
        )
    except Exception as e:  # whatever Keras raises for a layer it will not rebuild
        raise ConfigError(
            f"head: its layers cannot be loaded back in Keras' safe mode ({first_line(e)}); "
            "build it from Keras' own layers, without Lambda"
        ) from None


def head_of(model: Any) -> Any:
    """Pooled features -> class probabilities: the classifier's head as a model of its own,
    its layers (and so its weights) shared with the classifier."""
    import keras

    return keras.Model(model.get_layer(POOL_LAYER).output, model.output, name="head")


def one_backbone(model: Any) -> bool:
    """Whether `model` is tlkit's classifier on one backbone (pooled features, a head), not an
    ensemble of several (`--preset best`, `tlkit export RUN RUN`)."""
    return any(layer.name == POOL_LAYER for layer in model.layers)


def softmax_layer(model: Any, purpose: str, linear: bool = False) -> Any:
    """The Dense layer whose softmax the classifier returns (with `linear`: applied straight
    to the pooled features, dropout aside), for what needs it; one line when the head is
    another."""
    import keras

    if not one_backbone(model):
        raise RunError(
            f"{purpose} needs one backbone's pooled features, and this model is an ensemble "
            "of several (--preset best); use one of its members (RUN/members/)"
        )
    head = model.layers[model.layers.index(model.get_layer(POOL_LAYER)) + 1 :]
    last = head[-1] if head else None
    between = head[:-1]
    dense = (
        isinstance(last, keras.layers.Dense)
        and getattr(last.activation, "__name__", "") == "softmax"
        and (not linear or all(isinstance(la, keras.layers.Dropout) for la in between))
    )
    if not dense:
        shown = ", ".join(type(la).__name__ for la in head)
        wanted = "a softmax Dense layer on the pooled features" if linear else "a softmax Dense"
        raise RunError(
            f"{purpose} needs a head that is {wanted}; this model's head is {shown}. "
            "Train with tlkit's own head (the default) to use it"
        )
    return last


def dense_model(model: Any) -> Any:
    """The classifier's own layers (weights shared) behind an input of any height and width:
    the VGG paper's dense evaluation, the head applied to the whole feature map's average.
    With tlkit's linear head that equals the class-score map of the Dense layer applied at
    every location, averaged, and the softmax of that is what this model returns."""
    import keras

    after = model.layers[model.layers.index(backbone_of(model)) + 1]
    if after.name not in (POOL_LAYER, "pool_0"):  # pooled: its one map, or the first tap
        raise ValueError(f"dense evaluation expects the pooled backbone, found {after.name}")

    def reuse(layer: Any) -> Any:  # nested models get variable-size inputs, layers are kept
        if isinstance(layer, keras.Model):
            inputs = [keras.Input((None, None, t.shape[-1]), dtype=t.dtype) for t in layer.inputs]
            return keras.models.clone_model(
                layer, input_tensors=inputs if len(inputs) > 1 else inputs[0], clone_function=reuse
            )
        return layer

    inputs = keras.Input((None, None, 3), dtype=model.input.dtype, name="image")
    return keras.models.clone_model(model, input_tensors=inputs, clone_function=reuse)


def backbone_of(model: Any) -> Any:
    return model.get_layer(BACKBONE_LAYER)


def count_params(weights: list[Any]) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def build_backbone(spec: BackboneSpec, resolved: ResolvedWeights, input_size: int) -> Any:
    """The backbone with its starting weights loaded."""
    if resolved.source in ("none", "run"):
        base = spec.build(input_size, weights=None)
        if resolved.source == "run":
            from tlkit.core.runs import load_keras_file

            if resolved.path is None:  # resolve_weights always gives a run's weights a path
                raise RuntimeError("weights from a run without the run's path")
            old = load_keras_file(Path(resolved.path), WeightsError)
            try:
                base.set_weights(backbone_of(old).get_weights())
            except ValueError as e:
                raise WeightsError(f"--weights {resolved.path}: {e}") from None
        return base
    try:
        return spec.build(input_size, weights=resolved.path)
    except (ValueError, OSError, KeyError) as e:
        raise WeightsError(
            f"{resolved.path}: cannot load as {spec.name} weights ({str(e).splitlines()[0]})"
        ) from None


@dataclass(frozen=True)
class Top:
    """What sits on the backbone: the head function (None: `linear_head`), the stage ends it
    reads beside the last layer (`stage_taps`) and their scales (`tap_scales`; None: 1)."""

    head: Head | None = None
    taps: tuple[str, ...] = ()
    scales: tuple[float, ...] | None = None


def build_model(
    spec: BackboneSpec,
    weights: ResolvedWeights,
    size: int,
    num_classes: int,
    seed: int,
    mixed_precision: bool = False,
    top: Top = Top(),
) -> Any:
    """The classifier exactly as `finetune` builds it: seeded, under its dtype policy. One
    sequence for training and `precompute-features`, so that the same settings give the same
    trunk weights and the same cache key."""
    import keras

    keras.utils.set_random_seed(seed)
    with dtype_policy(mixed_precision):
        base = build_backbone(spec, weights, size)
        return build_classifier(spec, base, num_classes, size, top.head, top.taps, top.scales)


def retapped(
    model: Any,
    spec: BackboneSpec,
    weights: ResolvedWeights,
    top: Top,
    mixed_precision: bool,
    seed: int,
) -> Any:
    """The classifier built again as `build_model` builds it, with another `top`, and the
    backbone's weights as `model` has them now: what `--head-features` keeps once it has
    measured the stages. Built whole, not around `model`'s layers, so that the same seed
    gives the head that a run naming that setting starts from."""
    size, n = int(model.input.shape[1]), int(model.output.shape[-1])
    fresh = build_model(spec, weights, size, n, seed, mixed_precision, top)
    backbone_of(fresh).set_weights(backbone_of(model).get_weights())
    return fresh


@contextmanager
def dtype_policy(mixed_precision: bool) -> Iterator[None]:
    """Layers built inside compute in float16 under `mixed_precision`."""
    import keras

    previous = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def compute_dtypes(model: Any) -> list[str]:
    """The dtypes its weighted layers compute in: ['float16', 'float32'] under mixed precision
    (the preprocessing and the softmax stay float32), ['float32'] without."""
    return sorted(
        {layer.dtype_policy.compute_dtype for layer in leaf_layers(model) if layer.weights}
    )


def optimizer_for(model: Any, lr: float, optimizer: Any = None) -> Any:
    """`optimizer` (default Adam at `lr`), with dynamic loss scaling whenever a trainable layer
    computes in float16: small float16 gradients would otherwise underflow to zero without a
    word. Keras wraps the optimizer itself only when the compiled model's own policy is mixed,
    which a tail built over the feature cache does not carry."""
    import keras

    optimizer = optimizer or keras.optimizers.Adam(lr)
    if any(
        layer.trainable_weights and layer.dtype_policy.compute_dtype == "float16"
        for layer in leaf_layers(model)
    ):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer
