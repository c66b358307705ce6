"""`lr-find`: the learning-rate range test (Smith 2017; fastai's `lr_find`).

Train from the same start while the rate grows geometrically every step, record the loss, stop
once it has clearly diverged, and read a rate off the curve: fastai's classic rule, the rate at
the lowest smoothed loss divided by 10 (a rate still safely on the descending side). The head
phase runs on the pooled features of the eval view (the backbone once, then seconds); the
fine-tune phase runs the model live, from a head trained first, as `finetune` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tlkit.core.errors import ConfigError
from tlkit.core.figures import new_figure, png_bytes
from tlkit.core.settings import SETTINGS, Composed, Loader, check_fields, part, setting
from tlkit.models.freezing import ModelChoice

if TYPE_CHECKING:
    from tlkit.features.rows import Features
    from tlkit.models.backbones import BackboneSpec

log = logging.getLogger("tlkit")
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum
MIN_DROP = 0.1  # a curve that never falls this far below its start suggests nothing


@dataclass(frozen=True)
class LrFindConfig(Composed):
    """Settings of `tlkit lr-find`."""

    command: ClassVar[str] = "lr-find"

    data: str = "data"
    model: ModelChoice = part(ModelChoice)
    loader: Loader = part(Loader)
    phase: str = setting("phase")
    start_lr: float | None = setting("start_lr")  # None: 1e-6 for the head, 1e-8 fine-tuning
    end_lr: float | None = setting("end_lr")  # None: 10 for the head, 1e-1 for fine-tuning
    steps: int = setting("steps")
    val_fraction: float = setting("val_fraction")
    output: str = "lr_find.png"
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        self.model.chosen(self.command)
        lo, hi = self.rates()
        if not lo < hi:
            raise ConfigError(f"--start-lr must be below --end-lr. Received: {lo}, {hi}")

    def rates(self) -> tuple[float, float]:
        head = self.phase == "head"
        return (self.start_lr or (1e-6 if head else 1e-8), self.end_lr or (10.0 if head else 0.1))


def schedule(start: float, end: float, steps: int) -> np.ndarray:
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def suggest(rates: np.ndarray, losses: np.ndarray, beta: float = 0.9) -> dict[str, Any]:
    """Smoothed curve (debiased exponential average), where it stopped, and the rates read off
    it: `suggestion` (the minimum / 10) and `steepest` (the fastest descent)."""
    smooth, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        smooth.append(avg / (1 - beta ** (i + 1)))
        if not math.isfinite(loss) or (i > 10 and smooth[-1] > DIVERGED * min(smooth)):
            break
    curve = np.array(smooth)
    n = len(curve)
    best = int(np.nanargmin(curve))
    slope = np.gradient(curve, np.log(rates[:n])) if n > 2 else np.zeros(n)
    steep = int(np.nanargmin(slope[: best + 1])) if best > 0 else 0
    found = {
        "rates": rates[:n].tolist(),
        "losses": [float(x) for x in losses[:n]],
        "smoothed": curve.tolist(),
        "min_loss_lr": float(rates[best]),
        "suggestion": float(rates[best] / 10),
        "steepest": float(rates[steep]),
        "note": None,
    }
    start = float(np.median(losses[: max(3, n // 10)]))  # one noisy first batch is no start
    if not curve[best] < (1 - MIN_DROP) * start:
        found.update(
            suggestion=None,
            note=(
                f"the loss never fell {MIN_DROP:.0%} below where it started: no rate in the range "
                "learned anything, so there is nothing to suggest (features without signal, "
                "a range that is too low, or too few steps)"
            ),
        )
    return found


def head_range_test(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    rates: tuple[float, float],
    steps: int,
    batch_size: int = SETTINGS["batch_size"].default,
    seed: int = SETTINGS["seed"].default,
) -> dict[str, Any]:
    """The range test of a fresh softmax head on fixed features (Adam, as the head phase),
    over `steps` rates from rates[0] to rates[1]."""
    start, end = rates
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    dense = keras.layers.Dense(n_classes, activation="softmax")
    dense.build((None, features.shape[1]))
    optimizer = keras.optimizers.Adam(start)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    curve = schedule(start, end, steps)
    order = np.random.default_rng(seed).permutation(len(labels))

    @tf.function
    def step(x: Any, y: Any, lr: Any) -> Any:
        optimizer.learning_rate.assign(lr)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, dense(x))
        grads = tape.gradient(loss, dense.trainable_weights)
        optimizer.apply_gradients(zip(grads, dense.trainable_weights, strict=True))
        return loss

    losses = []
    for i, lr in enumerate(curve):
        idx = order[np.arange(i * batch_size, (i + 1) * batch_size) % len(order)]
        losses.append(float(step(features[idx], labels[idx].astype(np.int32), np.float32(lr))))
        if not math.isfinite(losses[-1]):
            break
    return suggest(curve, np.array(losses))


def lr_find(config: LrFindConfig) -> dict[str, Any]:
    """The learning-rate range test: the plot written, the curve and the suggested rate
    returned.

    Args:
        config: the settings (LrFindConfig): the data and model as finetune takes them, the
            phase whose rate is wanted (head or fine-tune), the rates swept and the steps.
    """
    from tlkit.core.fsutil import atomic_path, refuse_overwrite

    refuse_overwrite(config.output, config.overwrite, "pass -o with another name or --overwrite")
    found = _run(config)

    with atomic_path(config.output) as tmp:
        tmp.write_bytes(lr_find_png(found))
    flag = "--lr" if config.phase == "head" else "--fine-tune-lr"
    found.update(phase=config.phase, flag=flag, output=str(config.output))
    if found["suggestion"] is None:
        log.warning("lr-find (%s): %s", config.phase, found["note"])
    else:
        log.info(
            "lr-find (%s): lowest smoothed loss at %.2g; suggested %s %.2g (steepest "
            "descent at %.2g)",
            config.phase,
            found["min_loss_lr"],
            flag,
            found["suggestion"],
            found["steepest"],
        )
    return found


def _run(config: LrFindConfig) -> dict[str, Any]:
    from tlkit.data.preflight import check_inputs
    from tlkit.features.rows import Features, pooled_features, resolve_random_bn
    from tlkit.models.model import Top, build_model, rescaled, retapped, tap_scales
    from tlkit.models.weights import resolve_weights

    checked = check_inputs(config.data, config.model, config.val_fraction)
    spec, size = checked.spec, checked.size
    weights = resolve_weights(spec, config.model.weights)
    folder = checked.dataset()
    train = list(folder.splits["train"])
    taps = config.model.taps(spec)
    n, seed = len(folder.classes), config.loader.seed
    model = build_model(spec, weights, size, n, seed, top=Top(taps=taps))
    loader, crop = config.loader, spec.crop_fraction
    train_bn = resolve_random_bn(model, weights.source, train, size, crop, loader.max_pixels, None)
    labels = np.array([e.label for e in train], np.int32)
    feats = pooled_features(model, train, size, crop, loader)
    if taps:  # the stages at the last layer's size, as finetune scales them
        scales = tap_scales(model, feats)
        model = retapped(model, spec, weights, Top(None, taps, tuple(scales)), False, seed)
        feats = rescaled(model, feats, scales)
    start, end = config.rates()
    if config.phase == "head":
        n_classes, b = len(folder.classes), config.loader.batch_size
        return head_range_test(
            feats, labels, n_classes, (start, end), config.steps, b, config.loader.seed
        )
    val = list(folder.splits["val"])
    head_features = Features(
        feats,
        labels,
        pooled_features(model, val, size, crop, loader),
        np.array([e.label for e in val], np.int32),
        1,
        0.0,
    )
    return _fine_tune_range_test(config, model, spec, train, head_features, size, train_bn)


def _fine_tune_range_test(
    config: LrFindConfig,
    model: Any,
    spec: BackboneSpec,
    train: list[Any],
    head_features: Features,
    size: int,
    train_bn: bool,
) -> dict[str, Any]:
    """The head trained first on the features (500 steps at 1e-3, as finetune's default head
    phase), then the range test on everything the freeze plan leaves trainable, BatchNorm
    included where the run would train it (random weights whose signal fades)."""
    import keras
    import tensorflow as tf

    from tlkit.data.pipeline import eval_dataset
    from tlkit.models.freezing import apply_freeze, freeze_all, resolve_freeze
    from tlkit.models.model import backbone_of
    from tlkit.training.head import HeadFit, fit_head, head_steps

    base, rates = backbone_of(model), config.rates()
    freeze_all(base)
    b = config.loader.batch_size
    fit_head(
        model, head_features, HeadFit(1e-3, b, head_steps(len(train), b, 5), config.loader.seed)
    )
    apply_freeze(
        base,
        resolve_freeze(config.model.freeze, spec, [layer.name for layer in base.layers]),
        train_bn,
    )
    tried = schedule(*rates, config.steps)
    optimizer = keras.optimizers.Adam(rates[0])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    weights = model.trainable_weights

    @tf.function
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:  # one batch's own loss, not Keras's running mean
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights, strict=True))
        return loss

    data = eval_dataset(train, size, spec.crop_fraction, config.loader)
    batches = iter(data.shuffle(8, seed=config.loader.seed).repeat())
    losses: list[float] = []
    for lr in tried:
        optimizer.learning_rate.assign(lr)
        x, y = next(batches)
        losses.append(float(step(x, y)))
        if not math.isfinite(losses[-1]):
            break
    return suggest(tried, np.array(losses))


def lr_find_png(found: dict[str, Any]) -> bytes:
    """Loss against learning rate (log scale), smoothed, with the suggested rate marked."""
    fig = new_figure(6, 4)
    ax = fig.subplots()
    ax.plot(found["rates"], found["losses"], color="0.75", linewidth=1, label="loss")
    ax.plot(found["rates"], found["smoothed"], color="tab:blue", label="smoothed")
    if found["suggestion"] is not None:
        ax.axvline(
            found["suggestion"],
            color="tab:red",
            linestyle="--",
            label=f"suggested {found['suggestion']:.2g} (minimum / 10)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    top = min(max(found["smoothed"]), 3 * min(found["smoothed"]) + 1)
    ax.set_ylim(0, top)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return png_bytes(fig)
