"""Freeze plans: which backbone layers stay fixed, and the BatchNorm policy.

`--freeze N` means exactly `for layer in base.layers[:N]: layer.trainable = False`, with Python
slice semantics (so a negative N keeps the last |N| layers trainable) and indices as
`tlkit inspect` prints them. Every other way of choosing (`all`, a layer name, a number of stages)
resolves to that same N, which is what the run records.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkit.core.choices import AUTO  # --freeze auto: finetune picks the freeze point on val
from tlkit.core.errors import ConfigError, did_you_mean
from tlkit.core.records import FreezeRecord
from tlkit.core.settings import check_fields, setting
from tlkit.models.backbones import BackboneSpec, stage_taps


@dataclass(frozen=True)
class FreezeRequest:
    """What the user asked for; exactly one way is set (none means `--freeze all`)."""

    count: str | None = None  # "all" or an int, as typed
    to_layer: str | None = None  # freeze up to and including this layer
    blocks: int | None = None  # freeze the first K stages

    def describe(self) -> str:
        if self.to_layer is not None:
            return f"--freeze-to {self.to_layer}"
        if self.blocks is not None:
            return f"--freeze-blocks {self.blocks}"
        return f"--freeze {self.count if self.count is not None else 'all'}"


@dataclass(frozen=True)
class ModelChoice:
    """Which pretrained network, at which size, frozen where: the settings every command that
    builds a backbone shares (finetune, precompute-features, lr-find)."""

    backbone: str = setting("backbone")
    weights: str = setting("weights")
    input_size: int | None = setting("input_size")  # None: the backbone's default
    # the Keras guide's default: after the head phase, fine-tune the whole backbone
    freeze: FreezeRequest = setting("freeze", factory=lambda: FreezeRequest(count="0"))
    head_features: str = setting("head_features")

    def taps(self, spec: BackboneSpec) -> tuple[str, ...]:
        """The layers --head-features taps (`stage_taps`); `auto` probes with the stages'."""
        return stage_taps(spec, "stages" if self.head_features == AUTO else self.head_features)

    def chosen(self, command: str) -> None:
        """Refuses `auto` for a command that does not choose (only finetune scores them)."""
        if self.head_features == AUTO:
            raise ConfigError(
                f"--head-features auto: only finetune chooses (on the validation split); give "
                f"{command} the run's choice, last or stages. Received: {self.head_features}"
            )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FreezePlan:
    """A request resolved against a concrete backbone: the first `n_frozen` layers are frozen."""

    n_frozen: int
    n_layers: int
    last_frozen: str | None  # name of the last frozen layer, None if nothing is frozen
    request: str

    def as_dict(self) -> FreezeRecord:
        return {
            "request": self.request,
            "n_frozen": self.n_frozen,
            "n_layers": self.n_layers,
            "last_frozen": self.last_frozen,
        }


def parse_freeze_count(value: str) -> str:
    """Validate `--freeze` early (at option parsing), before any model is built."""
    text = str(value).strip().lower()
    if text in ("all", AUTO):
        return text
    try:
        int(text)
    except ValueError:
        raise ConfigError(
            f"--freeze must be an integer (negative keeps the last |N| layers trainable), "
            f"'all' or 'auto'. Received: {value!r}"
        ) from None
    return text


def check_freeze(request: FreezeRequest, spec: BackboneSpec, n_layers: int) -> None:
    """Refuse a request that no backbone of `n_layers` layers can honour; needs no model, so
    it runs before TensorFlow loads (with the registry's layer count) and again after."""
    chosen = [x is not None for x in (request.count, request.to_layer, request.blocks)]
    if sum(chosen) > 1:
        raise ConfigError(
            "choose one of --freeze, --freeze-to and --freeze-blocks. "
            f"Received: {request.describe()} and others"
        )
    if request.blocks is not None and not 0 <= request.blocks <= len(spec.stages):
        raise ConfigError(
            f"--freeze-blocks must be between 0 and {len(spec.stages)} for {spec.name} "
            f"(stages: {', '.join(s for s, _ in spec.stages)}). Received: {request.blocks}"
        )
    if request.count not in (None, "all", AUTO) and n_layers:
        c = int(request.count)
        if not -n_layers <= c <= n_layers:
            raise ConfigError(
                f"--freeze {c} is out of range: {spec.name} has {n_layers} layers, so use "
                f"{-n_layers}..{n_layers} or 'all'. Received: {c}"
            )


def resolve_freeze(
    request: FreezeRequest, spec: BackboneSpec, layer_names: list[str]
) -> FreezePlan:
    n_layers = len(layer_names)
    check_freeze(request, spec, n_layers)
    if request.to_layer is not None:
        if request.to_layer not in layer_names:
            hint = did_you_mean(request.to_layer, layer_names)
            raise ConfigError(
                f"--freeze-to: {spec.name} has no layer named {request.to_layer!r}.{hint} "
                f"`tlkit inspect {spec.name}` lists the layers."
            )
        n = layer_names.index(request.to_layer) + 1
    elif request.blocks is not None:
        n = spec.stage_end_index(layer_names, request.blocks)
    else:
        count = request.count if request.count is not None else "all"
        if count == AUTO:
            raise ConfigError(
                "--freeze auto is only for `tlkit finetune`, which picks the freeze "
                "point on the validation split; here give a number, 'all', "
                "--freeze-to or --freeze-blocks. Received: auto"
            )
        if count == "all":
            n = n_layers
        else:
            c = int(count)
            n = c if c >= 0 else n_layers + c
    return FreezePlan(
        n_frozen=n,
        n_layers=n_layers,
        last_frozen=layer_names[n - 1] if n > 0 else None,
        request=request.describe(),
    )


def is_batch_norm(layer: Any) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


def recompute_bn_statistics(model: Any, batches: Iterable[np.ndarray]) -> int:
    """Set every BatchNorm layer's moving statistics to those of its inputs over `batches` (one
    training-mode pass, the batches' statistics averaged, each weighted by its images); return
    how many layers were set.

    For random weights: their BatchNorm starts at mean 0, variance 1, an identity that
    normalizes nothing, and inference mode (tlkit's default, docs/training.md) then lets the
    signal fade through a deep network: EfficientNet-Lite0's last stage gives outputs of about
    4e-12 at initialization, so the loss starts flat at ln(classes) and nothing trains. With
    the statistics of the data, inference mode normalizes each layer as a training batch would.
    """
    layers = [x for x in leaf_layers(model) if is_batch_norm(x)]
    saved = [(x.momentum, x.trainable) for x in layers]
    seen = 0
    try:
        for batch in batches:
            for x in layers:  # a running mean of the batches' statistics, by images
                x.momentum, x.trainable = seen / (seen + len(batch)), True
            model([batch], training=True)
            seen += len(batch)
    finally:
        for x, (momentum, trainable) in zip(layers, saved, strict=True):
            x.momentum, x.trainable = momentum, trainable
    return len(layers) if seen else 0


def leaf_layers(model: Any) -> Iterator[Any]:
    """Every layer that is not itself a model, nested backbones included."""
    for layer in model.layers:
        if hasattr(layer, "layers"):
            yield from leaf_layers(layer)
        else:
            yield layer


def apply_freeze(base: Any, plan: FreezePlan, train_bn: bool = False) -> int:
    """Set `trainable` on every backbone layer; return how many BatchNorm layers are frozen.

    Keras 3's `fit()` passes training=True into nested models regardless of how they were called,
    so BatchNorm is kept in inference mode the only way that survives it: `trainable = False` on
    the BatchNorm layer itself (BatchNormalization uses `training and self.trainable`).
    """
    base.trainable = True
    frozen_bn = 0
    for i, layer in enumerate(base.layers):
        frozen = i < plan.n_frozen
        bn = is_batch_norm(layer)
        layer.trainable = not frozen and not (bn and not train_bn)
        frozen_bn += int(bn and not layer.trainable)
    return frozen_bn


def freeze_all(base: Any) -> int:
    """Freeze the whole backbone (the head-only phase); return the number of BatchNorm layers."""
    base.trainable = False
    return sum(is_batch_norm(layer) for layer in base.layers)


def nothing_to_train(base: Any, plan: FreezePlan, train_bn: bool = False) -> str | None:
    """A warning when the plan freezes less than everything yet leaves no layer whose weights
    train (only pooling, activations, adds, or BatchNorm kept frozen), so the fine-tune phase
    trains exactly what `--freeze all` trains; it names the nearest plan that trains more."""

    def trains(layer: Any) -> bool:
        return bool(layer.weights) and (train_bn or not is_batch_norm(layer))

    layers = base.layers
    if plan.n_frozen >= len(layers) or any(trains(x) for x in layers[plan.n_frozen :]):
        return None
    nearest = next((n for n in range(plan.n_frozen - 1, -1, -1) if trains(layers[n])), None)
    if nearest is None:
        return f"{plan.request}: no layer of the backbone holds weights that train"
    tail = ", ".join(x.name for x in layers[plan.n_frozen :][:4])
    more = "" if len(layers) - plan.n_frozen <= 4 else ", ..."
    return (
        f"{plan.request} leaves only layers with nothing to train after the freeze point "
        f"({tail}{more}; BatchNorm stays frozen without --train-bn), so fine-tuning trains "
        f"what --freeze all trains; --freeze {nearest} (or {nearest - len(layers)}) also "
        f"trains {layers[nearest].name}"
    )
