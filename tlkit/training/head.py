"""The head phase as a probe: run the frozen backbone once over the training images, then train
the head to convergence on the pooled features.

Why: while the whole backbone is frozen, an epoch of the head phase costs one forward pass of
the backbone per image and gives n / batch optimizer steps. On a few hundred images that was a
handful of steps and an under-trained head, which then started the fine-tune phase (measured on
the accuracy benchmark: transfer below training from scratch). Here the backbone runs once, and
the head gets as many steps as it needs, in seconds. By default it trains on the eval view, as a
linear probe is trained; `--head-views K` trains it on K augmented views instead (view v is what
epoch v of the training pipeline gives, as in the feature cache), for the same forward passes as
K epochs of the old head phase.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tlkit.core import selection
from tlkit.core.calibration import per_image_log_loss
from tlkit.core.checkpoints import random_state
from tlkit.core.records import HistoryRow
from tlkit.core.selection import Keeper, one_se_choice
from tlkit.data.datasets import Example
from tlkit.features.rows import Features, FirstBatch, extract, pooled_extractor
from tlkit.models.model import POOL_LAYER, head_of

if TYPE_CHECKING:
    from tlkit.data.augment import AugmentConfig
    from tlkit.training.config import FinetuneConfig

log = logging.getLogger("tlkit")

MIN_HEAD_STEPS = 500  # a linear head on 2048 features needs a few hundred Adam steps
AUTO_VIEWS = 4  # --augment auto: views of each random candidate, at least
MAX_FEATURE_BYTES = 2 * 1024**3  # features held in memory; fewer views beyond this
CHECK_EVERY = 10  # head steps between validation checks


def head_steps(n_train: int, batch_size: int, head_epochs: int) -> int:
    """Optimizer steps of the head phase: what `head_epochs` epochs would take, and never fewer
    than MIN_HEAD_STEPS, because on small data epochs are only a few steps each."""
    return max(MIN_HEAD_STEPS, head_epochs * math.ceil(n_train / batch_size))


def feature_views(random_augment: bool, head_views: int, n_train: int, dim: int) -> int:
    """Views of the training images whose features the head trains on: `head_views` when the
    augmentation is random (one when not: every view is the eval view), as many as fit in
    MAX_FEATURE_BYTES."""
    wanted = head_views if random_augment else 1
    fits = MAX_FEATURE_BYTES // max(1, n_train * dim * 4)
    return max(1, min(wanted, fits))


def _feature_batches(
    features: Features, sample_weights: Sequence[float] | None, batch_size: int, seed: int
) -> Any:
    """Endless shuffled (features, label, weight) batches of the training rows."""
    import tensorflow as tf

    weights = (
        np.tile(np.asarray(sample_weights, np.float32), features.views)
        if sample_weights is not None
        else np.ones(len(features.train), np.float32)
    )
    data = (
        tf.data.Dataset.from_tensor_slices((features.train, features.train_labels, weights))
        .shuffle(len(features.train), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size)
        .prefetch(2)
    )
    return iter(data)


def _compiled_steps(head: Any, optimizer: Any, loss_fn: Any, batches: Any, classes: int) -> Any:
    """`train(n)`: n Adam steps of the head on the next batches, in one graph; the mean loss
    and the weighted accuracy over them."""
    import tensorflow as tf

    @tf.function
    def train(n: Any) -> tuple[Any, Any]:
        loss_sum, hits, seen = tf.constant(0.0), tf.constant(0.0), tf.constant(0.0)
        for _ in tf.range(n):
            x, y, w = next(batches)
            with tf.GradientTape() as tape:
                probs = tf.cast(head(x, training=True), tf.float32)
                loss = loss_fn(tf.one_hot(y, classes), probs, sample_weight=w)
            grads = tape.gradient(loss, head.trainable_weights)
            optimizer.apply_gradients(zip(grads, head.trainable_weights, strict=True))
            hit = tf.cast(tf.equal(tf.argmax(probs, -1, output_type=tf.int32), y), tf.float32)
            loss_sum += loss
            hits += tf.reduce_sum(hit * w)
            seen += tf.reduce_sum(w)
        return loss_sum / tf.cast(n, tf.float32), hits / seen

    return train


def _validate(head: Any, features: Features) -> tuple[float, float]:
    """(loss, accuracy) of the head on the validation features; NaN without any."""
    if not len(features.val_labels):
        return math.nan, math.nan
    probs = np.asarray(head(features.val), np.float64)
    val = per_image_log_loss(probs, features.val_labels)
    return float(val.mean()), float((probs.argmax(-1) == features.val_labels).mean())


@dataclass(frozen=True)
class HeadFit:
    """How the head is trained on features: Adam's rate, the batch size, the optimizer steps,
    the seed of the batches' order, and the label smoothing."""

    lr: float
    batch_size: int
    steps: int
    seed: int
    label_smoothing: float = 0.0

    @classmethod
    def of(cls, config: FinetuneConfig, n_train: int) -> HeadFit:
        """The head phase's, as a run's settings say (the rate scaled under --scale-lr)."""
        b = config.loader.batch_size
        steps = head_steps(n_train, b, config.fit.head_epochs)
        return cls(
            config.fit.lr * config.lr_scale(),
            b,
            steps,
            config.loader.seed,
            config.fit.label_smoothing,
        )


def fit_head(
    model: Any,
    features: Features,
    fit: HeadFit,
    sample_weights: Sequence[float] | None = None,
) -> tuple[list[HistoryRow], int]:
    """Train the classifier's own head (`head_of`) on the features for `steps` Adam steps,
    keep the weights of the best check (by the selection criterion; a check every CHECK_EVERY
    steps or every pass, whichever is longer); (one history row per check, optimizer steps
    taken).

    A compiled loop of its own rather than Keras fit(): with a check every few steps, fit's
    per-epoch machinery cost more than the training itself (seconds per probe on small data)."""
    import keras
    import tensorflow as tf

    lr, batch_size, steps = fit.lr, fit.batch_size, fit.steps
    head = head_of(model)
    optimizer = keras.optimizers.Adam(lr)
    optimizer.build(head.trainable_weights)
    loss_fn = keras.losses.CategoricalCrossentropy(label_smoothing=fit.label_smoothing)
    # a "check" is max(one pass, CHECK_EVERY steps): validation (and the choice of the best
    # weights) every so many steps, not after every tiny pass over a small set
    per_check = max(math.ceil(len(features.train) / batch_size), CHECK_EVERY)
    checks = max(1, math.ceil(steps / per_check))
    batches = _feature_batches(features, sample_weights, batch_size, fit.seed)
    train = _compiled_steps(head, optimizer, loss_fn, batches, int(model.output.shape[-1]))
    rows: list[HistoryRow] = []
    keeper: Keeper[list[np.ndarray]] = Keeper()
    n = tf.constant(per_check)
    for check in range(checks):
        start = time.perf_counter()
        loss, accuracy = (float(v) for v in train(n))
        val_loss, val_accuracy = _validate(head, features)
        rows.append(
            {
                "phase": "head",
                "epoch": check + 1,
                "loss": loss,
                "accuracy": accuracy,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "lr": lr,
                "seconds": round(time.perf_counter() - start, 3),
            }
        )
        if not (math.isfinite(loss) and math.isfinite(val_loss)):
            break  # the rows show it; nothing after a NaN is worth keeping
        keeper.offer(rows[-1], head.get_weights)
    if keeper.kept is not None:
        head.set_weights(keeper.kept)
    return rows, int(keras.ops.convert_to_numpy(optimizer.iterations))


def head_val_losses(model: Any, features: Features) -> np.ndarray:
    """Per-image validation losses of the classifier's head on `features` (dropout is off)."""
    probs = np.asarray(head_of(model)(features.val), np.float64)
    return per_image_log_loss(probs, features.val_labels)


def best_keeper(patience: int | None = None) -> Any:
    """A Keras callback around a `Keeper`: keeps the weights of the best epoch (the selection
    criterion, on plain cross-entropy under label smoothing), restores them at the end, stops
    after `patience` epochs without a better one, and at a NaN loss (the rows then show it)."""
    import keras

    class BestKeeper(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.keeper: Keeper[list[np.ndarray]] = Keeper()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            from tlkit.training.optim import plain_val_loss

            logs = plain_val_loss(logs or {})
            loss, val_loss = logs.get("loss", math.nan), logs.get("val_loss", math.nan)
            if not (math.isfinite(loss) and math.isfinite(val_loss)):
                self.model.stop_training = True
                return
            self.keeper.offer(logs, self.model.get_weights)
            if patience is not None and self.keeper.wait >= patience:
                self.model.stop_training = True

        def on_train_end(self, logs: Any = None) -> None:
            if self.keeper.kept is not None:
                self.model.set_weights(self.keeper.kept)

    return BestKeeper()


# (label, preset, overrides), simplest first (the one-standard-error rule prefers the
# earlier): from none to Inception's crops; shifts without and with mirroring, since mirroring
# changes the class of text, digits and anything with a handedness
AUTO_CANDIDATES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("none", "none", {}),
    ("light, no mirror", "light", {"flip_p": 0.0}),
    ("light", "light", {}),
    ("standard", "standard", {}),
)


@dataclass(frozen=True)
class ProbeData:
    """What a search (`--augment auto`, `--freeze auto`) probes on: the model, the training
    and validation images at `size` with the backbone's eval `crop_fraction`, their sample
    weights, and who is told the time of the first forward pass."""

    model: Any
    train: Sequence[Example]
    val: Sequence[Example]
    size: int
    crop_fraction: float
    sample_weights: Sequence[float] | None = None
    on_first_batch: FirstBatch | None = None


def _probe(
    data: ProbeData,
    extractor: Any,
    initial: list[np.ndarray],
    config: FinetuneConfig,
    augment: AugmentConfig,
    views: int,
) -> tuple[Features, list[HistoryRow]]:
    """One candidate's features and its head probe's rows, from the initial head."""
    from tlkit.data.pipeline import build_train_transform

    c, train = config, data.train
    transform = build_train_transform(
        augment, train, data.size, data.crop_fraction, max_pixels=c.loader.max_pixels
    )
    features = extract(extractor, train, data.val, transform, views, c.loader, data.on_first_batch)
    head_of(data.model).set_weights(initial)
    rows, _ = fit_head(data.model, features, HeadFit.of(c, len(train)), data.sample_weights)
    return features, rows


def _score(name: str, views: int, rows: list[HistoryRow], features: Features) -> dict[str, Any]:
    """A candidate's best check, logged."""
    top = selection.CRITERION.best(rows) or rows[0]
    seconds = round(features.seconds + sum(r["seconds"] for r in rows), 1)
    log.info(
        "--augment auto: %-17s val_loss %.4f, val_accuracy %.4f (%d view(s), %.1f s)",
        name,
        top["val_loss"],
        top["val_accuracy"],
        views,
        seconds,
    )
    return {
        "augment": name,
        "views": views,
        "val_loss": top["val_loss"],
        "val_accuracy": top["val_accuracy"],
        "seconds": seconds,
    }


def _choose(
    scores: list[dict[str, Any]],
    chosen: list[tuple[Any, str, Features | None]],
    losses: list[np.ndarray],
    head_views_of: tuple[int, int, int],
) -> tuple[Any, list[dict[str, Any]], Features | None]:
    """The one-standard-error pick among the candidates, its scores marked, and the features
    the head phase trains on when they were computed (`head_views_of`: --head-views, training
    images, feature size)."""
    index, excess = one_se_choice(losses)
    augment, name, features = chosen[index]
    log.info(
        "--augment auto: chose %s (the simplest within one standard error of the lowest "
        "validation loss)",
        name,
    )
    for score, e in zip(scores, excess, strict=True):
        score["chosen"] = score["augment"] == name
        score["se_above_best"] = round(e, 2) if math.isfinite(e) else None
    views = feature_views(augment.random, *head_views_of)
    if views == 1:  # the head phase trains on the eval view: the `none` candidate's features
        plain = [c[2] for c in chosen if not c[0].random]
        return augment, scores, plain[0] if plain else None
    return augment, scores, features if features is not None and features.views == views else None


def search_augment(
    data: ProbeData, config: FinetuneConfig
) -> tuple[Any, list[dict[str, Any]], Features | None]:
    """`--augment auto`: a head probe per candidate augmentation (max(--head-views, AUTO_VIEWS)
    views of the random ones), from the same initial head, scored by validation loss and
    chosen by the one-standard-error rule (`one_se_choice`).

    Returns the best AugmentConfig, every candidate's scores, and the features the head phase
    trains on when they were computed here (the eval view's when --head-views is 1), else None.
    The head is left as it was."""
    from tlkit.data.augment import resolve_augment

    model, train = data.model, data.train
    dim = int(model.get_layer(POOL_LAYER).output.shape[-1])
    extractor = pooled_extractor(model)
    initial = head_of(model).get_weights()
    scores: list[dict[str, Any]] = []
    chosen: list[tuple[Any, str, Features | None]] = []
    losses: list[np.ndarray] = []
    for name, preset, overrides in AUTO_CANDIDATES:
        augment = resolve_augment(preset, **overrides)
        views = feature_views(
            augment.random, max(config.fit.head_views, AUTO_VIEWS), len(train), dim
        )
        first = data if not scores else dataclasses.replace(data, on_first_batch=None)
        features, rows = _probe(first, extractor, initial, config, augment, views)
        losses.append(head_val_losses(model, features))
        scores.append(_score(name, views, rows, features))
        # kept only where the head phase could train on them (below): memory holds one or two
        # candidates' features, not every one's
        reusable = (
            not augment.random
            or feature_views(augment.random, config.fit.head_views, len(train), dim) == views
        )
        chosen.append((augment, name, features if reusable else None))
        del features
    head_of(model).set_weights(initial)
    return _choose(scores, chosen, losses, (config.fit.head_views, len(train), dim))


# --head-features auto, simplest first (the one-standard-error rule prefers the earlier)
HEAD_FEATURE_CANDIDATES = ("last", "stages")


def eval_view_features(data: ProbeData, config: FinetuneConfig) -> tuple[Features, ProbeData]:
    """The pooled features of the eval view of the training and validation images, and the
    data they are of: all of it, or where it would not fit in MAX_FEATURE_BYTES, a seeded
    sample that does (what --head-features measures and probes on; the head phase then
    computes its own)."""
    from tlkit.data.augment import TrainTransform, resolve_augment

    plain = TrainTransform(resolve_augment("none"), data.size, data.crop_fraction)
    extractor = pooled_extractor(data.model)
    dim = int(data.model.get_layer(POOL_LAYER).output.shape[-1])
    fits = MAX_FEATURE_BYTES // (dim * 4)
    n_train, n_val = len(data.train), len(data.val)
    if n_train + n_val > fits:
        rng, share = np.random.default_rng(config.loader.seed), fits / (n_train + n_val)
        kept = sorted(rng.permutation(n_train)[: int(n_train * share)])
        weights = data.sample_weights
        data = dataclasses.replace(
            data,
            train=[data.train[i] for i in kept],
            val=[data.val[i] for i in sorted(rng.permutation(n_val)[: int(n_val * share)])],
            sample_weights=[weights[i] for i in kept] if weights is not None else None,
        )
        log.info(
            "--head-features: measured on %d training and %d validation images, what fits in "
            "%d MiB",
            len(data.train),
            len(data.val),
            MAX_FEATURE_BYTES // 2**20,
        )
    loader, first = config.loader, data.on_first_batch
    return extract(extractor, data.train, data.val, plain, 1, loader, first), data


def search_head_features(
    data: ProbeData, last_model: Any, stages: Features, config: FinetuneConfig
) -> tuple[str, list[dict[str, Any]], Features]:
    """`--head-features auto`: `stages` are the eval view's pooled features of `data.model`;
    the last layer's are their last columns, which `last_model` (the same backbone, untapped)
    reads. A head probe on each from its initial head, scored by validation loss and chosen
    by the one-standard-error rule (`last` when it is within).

    Returns the choice, both candidates' scores and the chosen candidate's Features. Both
    heads are left as they were."""
    from tlkit.models.model import backbone_of

    width = int(backbone_of(last_model).outputs[-1].shape[-1])
    last = dataclasses.replace(stages, train=stages.train[:, -width:], val=stages.val[:, -width:])
    fit = HeadFit.of(config, len(data.train))
    scores, losses = [], []
    for name, model, features in (("last", last_model, last), ("stages", data.model, stages)):
        head = head_of(model)
        # the weights and the dropout's random state: the run goes on as if never probed
        initial = head.get_weights(), [np.array(v) for v in random_state(head)]
        start = time.perf_counter()
        rows, _ = fit_head(model, features, fit, data.sample_weights)
        losses.append(head_val_losses(model, features))
        head.set_weights(initial[0])
        for variable, value in zip(random_state(head), initial[1], strict=True):
            variable.assign(value)
        top = selection.CRITERION.best(rows) or rows[0]
        scores.append(
            {
                "head_features": name,
                "features": int(features.train.shape[1]),
                "val_loss": top["val_loss"],
                "val_accuracy": top["val_accuracy"],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        log.info(
            "--head-features auto: %-6s (%d features) val_loss %.4f, val_accuracy %.4f",
            name,
            features.train.shape[1],
            top["val_loss"],
            top["val_accuracy"],
        )
    index, excess = one_se_choice(losses)
    for j, (score, e) in enumerate(zip(scores, excess, strict=True)):
        score["chosen"] = j == index
        score["se_above_best"] = round(e, 2) if math.isfinite(e) else None
    chosen = HEAD_FEATURE_CANDIDATES[index]
    log.info(
        "--head-features auto: chose %s (the simplest within one standard error of the lowest "
        "validation loss)",
        chosen,
    )
    return chosen, scores, (last, stages)[index]
