"""The fine-tune phase's optimizer and both phases' loss, with what timm and fastai fine-tune with.

- `--schedule cosine` and `--warmup-epochs N`: a linear warmup from 0 to `--fine-tune-lr`, then
  a cosine decay to 0 over the rest of the phase (timm's default scheduler); `--schedule
  constant` stays at the rate after the warmup.
- `--weight-decay W`: decoupled weight decay (AdamW, Loshchilov & Hutter) on kernels only;
  biases and BatchNorm scales are left alone, as timm does.
- `--stage-lr-decay D`: fastai's discriminative rates (timm's layer decay, by stage): the head
  trains at the phase's rate, the backbone's last stage at D times it, each earlier stage at D
  times the stage after it. Adam's steps do not scale with the gradient, so this is a rate per
  variable, not a scaled gradient.
- `--label-smoothing E`: the training loss of both phases targets (1 - E) on the label and E
  spread over every class (Szegedy et al. 2016). Validation losses stay the plain cross-entropy,
  so that early stopping and the best-epoch choice compare the same thing in both phases.

Imported only while training (it imports Keras).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import keras
from keras import ops

if TYPE_CHECKING:
    from tlkit.models.backbones import BackboneSpec
    from tlkit.training.config import FinetuneConfig

CROSS_ENTROPY = "cross_entropy"  # the metric that stands in for val_loss under smoothing


@keras.saving.register_keras_serializable(package="tlkit")
class StagedAdam(keras.optimizers.Adam):
    """Adam (AdamW with weight_decay) whose step for each variable is multiplied by its factor
    in `factors` (variable path -> factor; 1 when absent)."""

    def __init__(self, factors: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factors = dict(factors or {})

    def build(self, variables: Any) -> None:
        super().build(variables)
        self._factor_at = [self.factors.get(v.path, 1.0) for v in variables]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        factor = self._factor_at[self._get_variable_index(variable)]
        super().update_step(
            gradient, variable, learning_rate * factor if factor != 1.0 else learning_rate
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factors": self.factors}


def stage_factors(base: Any, stage_ends: list[int], decay: float) -> dict[str, float]:
    """Variable path -> rate factor: decay ** (stages - j) for the backbone's stage j (0 first);
    `stage_ends[j]` is how many layers stages 0..j hold."""
    factors: dict[str, float] = {}
    start, n = 0, len(stage_ends)
    for j, end in enumerate(stage_ends):
        for layer in base.layers[start:end]:
            for v in layer.trainable_weights:
                factors[v.path] = decay ** (n - j)
        start = end
    return factors


def phase_optimizer(
    model: Any, base: Any, spec: BackboneSpec, config: FinetuneConfig, steps_per_epoch: int
) -> Any:
    """The fine-tune phase's optimizer for `model` (the classifier or its tail), from the
    FinetuneConfig's rate, schedule, warmup, weight decay and stage decay."""
    from tlkit.models.model import optimizer_for

    factors = {}
    if config.fit.stage_lr_decay < 1:
        names = [layer.name for layer in base.layers]
        ends = [spec.stage_end_index(names, k) for k in range(1, len(spec.stages) + 1)]
        factors = stage_factors(base, ends, config.fit.stage_lr_decay)
    lr = config.fit.tune_lr * config.lr_scale()
    built = fine_tune_optimizer(
        lr,
        steps_per_epoch * config.fit.epochs,
        steps_per_epoch * config.fit.warmup_epochs,
        config.fit.schedule == "cosine",
        config.fit.weight_decay,
        factors,
        model,
    )
    return optimizer_for(model, lr, built)


def fine_tune_optimizer(
    lr: float,
    steps: int,
    warmup_steps: int,
    cosine: bool,
    weight_decay: float,
    factors: dict[str, float],
    model: Any,
) -> Any:
    """The fine-tune phase's optimizer for `model`'s trainable variables over `steps` steps.
    Stock Keras classes (a model.keras that plain Keras loads compiled) unless stage factors
    need StagedAdam."""
    rate: Any = lr
    if warmup_steps or cosine:  # alpha=1: the rate stays at its peak after the warmup
        rate = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else lr,
            max(1, steps - warmup_steps),
            alpha=0.0 if cosine else 1.0,
            warmup_target=lr if warmup_steps else None,
            warmup_steps=warmup_steps,
        )
    decay = weight_decay or None
    if factors:
        optimizer = StagedAdam(factors=factors, learning_rate=rate, weight_decay=decay)
    elif weight_decay:
        optimizer = keras.optimizers.AdamW(learning_rate=rate, weight_decay=weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=rate)
    if weight_decay:  # kernels only: biases, BatchNorm and LayerNorm parameters are 1-D
        optimizer.exclude_from_weight_decay(
            var_list=[v for v in model.trainable_variables if len(v.shape) <= 1]
        )
    return optimizer


@keras.saving.register_keras_serializable(package="tlkit")
class SmoothedCrossentropy(keras.losses.Loss):
    """Cross-entropy against integer labels smoothed by `smoothing`, on softmax outputs."""

    def __init__(
        self, smoothing: float = 0.0, name: str = "smoothed_crossentropy", **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.smoothing = float(smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        target = ops.one_hot(labels, ops.shape(y_pred)[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(target, y_pred, label_smoothing=self.smoothing)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "smoothing": self.smoothing}


def compile_args(label_smoothing: float) -> dict[str, Any]:
    """loss and metrics for compile(): under smoothing, the plain cross-entropy as a metric,
    which the recorder reads as val_loss."""
    if not label_smoothing:
        return {"loss": "sparse_categorical_crossentropy", "metrics": ["accuracy"]}
    return {
        "loss": SmoothedCrossentropy(label_smoothing),
        "metrics": ["accuracy", keras.metrics.SparseCategoricalCrossentropy(name=CROSS_ENTROPY)],
    }


def plain_val_loss(logs: dict[str, Any]) -> dict[str, Any]:
    """Keras logs with val_loss the plain cross-entropy (the smoothed one kept as
    val_smoothed_loss), so every phase is compared on the same loss."""
    if f"val_{CROSS_ENTROPY}" not in logs:
        return logs
    out = {k: v for k, v in logs.items() if k not in (CROSS_ENTROPY, f"val_{CROSS_ENTROPY}")}
    out["val_smoothed_loss"], out["val_loss"] = logs["val_loss"], logs[f"val_{CROSS_ENTROPY}"]
    return out


def describe(config: FinetuneConfig) -> str:
    """The fine-tune options in use, for the log; '' when none is."""
    parts = []
    if config.fit.schedule != "constant":
        parts.append(f"{config.fit.schedule} schedule")
    if config.fit.warmup_epochs:
        parts.append(f"{config.fit.warmup_epochs} warmup epoch(s)")
    if config.fit.weight_decay:
        parts.append(f"weight decay {config.fit.weight_decay:g} (AdamW)")
    if config.fit.stage_lr_decay < 1:
        parts.append(f"each earlier stage at x{config.fit.stage_lr_decay:g} the rate")
    if config.fit.label_smoothing:
        parts.append(f"label smoothing {config.fit.label_smoothing:g}")
    return ", ".join(parts)
