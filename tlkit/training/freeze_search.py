"""`--freeze auto`: pick the freeze point by training what each candidate would train, on cached
activations, and scoring it on the validation split.

Candidates: the whole backbone frozen (head only), and the last one or two stages trainable.
The backbone runs once over the eval view of every training and validation image, giving the
activations at each candidate's cut and the pooled features in the same pass. Head only is a
head probe on the pooled features (head.py); each deeper candidate starts from that head and
trains its tail (the trainable stages + head) from the activations for `--epochs` at
`--fine-tune-lr` with the run's patience, as the fine-tune phase would, without augmentation.
Head only is kept by the one-standard-error rule (core/selection.py) when its validation
losses are within one standard error of the lowest, since on a small validation split a
fine-tune "winning" by less than that is noise, and it costs more; otherwise the stage
candidate with the lowest validation loss is chosen (both are trained by then, so cost no
longer decides between them).

Deeper tails are not probed: nothing cached could stand in for the layers they train, so
probing them would cost the fine-tune itself. Where a tail wins, fine-tuning pays on this
data, and the run (training/plan.py) fine-tunes the whole network for real, keeping the
chosen tail's trained model to compare at its end: on the icons benchmark at 200 a class
the probes ranked the last stage first while the whole network's real fine-tune scored
better on validation (docs/accuracy.md).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tlkit.core import selection
from tlkit.models.backbones import BackboneSpec
from tlkit.models.freezing import FreezePlan, FreezeRequest, apply_freeze, resolve_freeze

if TYPE_CHECKING:
    from tlkit.features.rows import Features
    from tlkit.models.cut import Cut
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.head import ProbeData

log = logging.getLogger("tlkit")

TRAINABLE_STAGES = (1, 2)  # deeper candidates: this many of the last stages trainable
MAX_ACTIVATION_BYTES = 4 * 1024**3  # a candidate whose activations exceed this is skipped


def freeze_candidates(spec: BackboneSpec, layer_names: list[str]) -> list[FreezePlan]:
    """Head only first, then the last 1 and 2 stages trainable (as --freeze-blocks)."""
    plans = [resolve_freeze(FreezeRequest(count="all"), spec, layer_names)]
    for k in TRAINABLE_STAGES:
        if len(spec.stages) - k >= 1:
            plans.append(
                resolve_freeze(FreezeRequest(blocks=len(spec.stages) - k), spec, layer_names)
            )
    return plans


def _affordable(base: Any, plans: Sequence[FreezePlan], n_images: int) -> list[tuple[Any, Any]]:
    """(plan, cut) of the deeper candidates whose cached activations fit in memory."""
    from tlkit.models.cut import resolve_cut

    out = []
    for plan in plans:
        cut = resolve_cut(base, plan.n_frozen)
        if cut is None:  # the candidates freeze at least one layer
            raise RuntimeError(f"no cut for a search candidate freezing {plan.n_frozen}")
        need = n_images * int(np.prod(base.get_layer(cut.layer).output.shape[1:])) * 4
        if need > MAX_ACTIVATION_BYTES:
            log.info(
                "--freeze auto: skipping %s (its activations would take %.1f GB)",
                plan.request,
                need / 1024**3,
            )
            continue
        out.append((plan, cut))
    return out


def _train_tail(
    model: Any,
    spec: BackboneSpec,
    candidate: tuple[FreezePlan, Any],
    data: tuple[Any, ...],
    config: FinetuneConfig,
    head_only: tuple[dict[str, Any], np.ndarray],
) -> tuple[np.ndarray, dict[str, Any]]:
    """(per-image val losses, score) of one deeper candidate (its plan and cut): its tail
    trained from the cached activations (`data`: x and y of train and val, the sample weights
    or None), starting from the head probe (`head_only`: its score and per-image val losses),
    for --epochs with patience."""
    from tlkit.core.calibration import per_image_log_loss
    from tlkit.models.cut import build_tail
    from tlkit.models.model import backbone_of
    from tlkit.training.optim import compile_args, phase_optimizer, plain_val_loss

    (plan, cut), (start, start_losses) = candidate, head_only
    x_train, y_train, x_val, y_val, weights = data
    t = time.perf_counter()
    base = backbone_of(model)
    apply_freeze(base, plan, config.fit.bn_trains)
    tail = build_tail(model, cut)
    steps = -(-len(x_train) // config.loader.batch_size)
    tail.compile(
        optimizer=phase_optimizer(tail, base, spec, config, steps),
        **compile_args(config.fit.label_smoothing),
    )
    history = tail.fit(
        x_train,
        y_train,
        sample_weight=weights,
        batch_size=config.loader.batch_size,
        epochs=config.fit.epochs,
        validation_data=(x_val, y_val),
        verbose=0,
        callbacks=_tail_callbacks(tail, x_train, config),
    ).history
    history = plain_val_loss(history)
    # the best epoch's weights, restored; where each tail starts is the head probe, which
    # stays its score unless training beat it
    per_epoch = zip(*history.values(), strict=True)
    epochs = [start, *(dict(zip(history, v, strict=True)) for v in per_epoch)]
    best = selection.CRITERION.best_index(epochs)
    trained = start_losses
    if best > 0:
        trained = per_image_log_loss(np.asarray(tail.predict(x_val, verbose=0), np.float64), y_val)
    score = _score(
        plan,
        float(np.mean(trained)),
        epochs[best]["val_accuracy"],
        len(epochs) - 1,
        time.perf_counter() - t,
    )
    return trained, {**score, "best_epoch": best}  # 0: its start, the head probe


def _tail_callbacks(tail: Any, x_train: np.ndarray, config: FinetuneConfig) -> list[Any]:
    """The best epoch kept, early stopping, and under random weights whose BatchNorm trains,
    its statistics recomputed before each validation, as the fine-tune phase does (phases.py)."""
    from tlkit.training.head import best_keeper

    callbacks = [best_keeper(config.fit.patience)]
    if config.fit.train_bn and config.model.weights == "none":
        from tlkit.features.rows import bn_indices
        from tlkit.training.precise_bn import PreciseBatchNorm

        batches = [x_train[i] for i in bn_indices(len(x_train))]
        callbacks.insert(0, PreciseBatchNorm(tail, batches))
    return callbacks


def _activations(
    data: ProbeData, deeper: list[tuple[FreezePlan, Cut]], config: FinetuneConfig
) -> tuple[dict[str, list[np.ndarray]], Any]:
    """One pass over the eval view of every image: the activations at each deeper candidate's
    cut, and the pooled Features the head probe trains on."""
    from tlkit.data.augment import TrainTransform, resolve_augment
    from tlkit.features.rows import Features, RowMaker, forward
    from tlkit.models.cut import trunk_outputs

    start = time.perf_counter()
    train, val, crop_fraction = data.train, data.val, data.crop_fraction
    extractor = trunk_outputs(
        data.model, [cut.layer for _, cut in deeper], pooled=True, name="freeze_search"
    )
    plain = TrainTransform(resolve_augment("none"), data.size, crop_fraction)
    c = config
    with RowMaker(plain, crop_fraction, c.loader) as make_rows:
        out = forward(extractor, make_rows, train, val, 1, c.loader.batch_size, data.on_first_batch)
    y_train = np.array([e.label for e in train], np.int32)
    y_val = np.array([e.label for e in val], np.int32)
    seconds = time.perf_counter() - start
    pooled = Features(out["train"][-1], y_train, out["val"][-1], y_val, 1, seconds)
    log.info(
        "--freeze auto: activations at %d cut(s) and pooled features of %d + %d images in %.1f s",
        len(deeper),
        len(train),
        len(val),
        pooled.seconds,
    )
    return out, pooled


def search_freeze(
    data: ProbeData, spec: BackboneSpec, config: FinetuneConfig
) -> tuple[FreezePlan, list[dict[str, Any]], Any, list[np.ndarray] | None]:
    """(the chosen plan, every candidate's scores, the pooled eval-view Features, the chosen
    candidate's trained model when it is deeper than head only).

    The model's weights are left as they were."""
    from tlkit.models.model import backbone_of

    model, sample_weights = data.model, data.sample_weights
    base = backbone_of(model)
    plans = freeze_candidates(spec, [layer.name for layer in base.layers])
    deeper = _affordable(base, plans[1:], len(data.train) + len(data.val))
    out, pooled = _activations(data, deeper, config)
    y_train, y_val = pooled.train_labels, pooled.val_labels
    initial = model.get_weights()
    scores, losses = _head_only(model, plans[0], pooled, config, sample_weights)
    probed = model.get_weights()
    kept = [None]  # each candidate's trained model; head only's is the head phase's to make
    weights = np.asarray(sample_weights, np.float32) if sample_weights is not None else None
    for i, (plan, cut) in enumerate(deeper):
        model.set_weights(probed)
        cached = (out["train"][i], y_train, out["val"][i], y_val, weights)
        head_only = (scores[0], losses[0])
        trained, score = _train_tail(model, spec, (plan, cut), cached, config, head_only)
        kept.append(model.get_weights() if trained is not losses[0] else probed)
        losses.append(trained)
        scores.append(score)
    model.set_weights(initial)
    base.trainable = True
    index = _choose(scores, losses)
    return (
        [plans[0], *(p for p, _ in deeper)][index],
        scores,
        pooled,
        kept[index],
    )


def _head_only(
    model: Any,
    plan: FreezePlan,
    pooled: Features,
    config: FinetuneConfig,
    sample_weights: Sequence[float] | None,
) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """([score], [per-image val losses]) of head only: a head probe on the pooled features, as
    the head phase trains it; the model keeps the probe's head."""
    from tlkit.training.head import HeadFit, fit_head, head_val_losses

    t = time.perf_counter()
    fit = HeadFit.of(config, len(pooled.train_labels))
    rows, _ = fit_head(model, pooled, fit, sample_weights)
    top = selection.CRITERION.best(rows) or rows[0]
    score = _score(plan, top["val_loss"], top["val_accuracy"], 0, time.perf_counter() - t)
    return [score], [head_val_losses(model, pooled)]


def _choose(scores: list[dict[str, Any]], losses: list[np.ndarray]) -> int:
    """Head only if it is within one standard error of the lowest validation loss, else the
    deeper candidate with the lowest; the scores are marked with the choice."""
    from tlkit.core.selection import one_se_choice

    for s in scores:
        log.info(
            "--freeze auto: %-22s val_loss %.4f, val_accuracy %.4f (%d tail epochs, %.1f s)",
            s["candidate"],
            s["val_loss"],
            s["val_accuracy"],
            s["epochs"],
            s["seconds"],
        )
    index, excess = one_se_choice(losses)
    if index == 0:
        log.info(
            "--freeze auto: chose head only (within one standard error of the lowest "
            "validation loss)"
        )
    else:  # a stage beats the head for sure; both tails are trained, so the lower loss wins
        index = min(
            range(1, len(losses)),
            key=lambda j: float(np.mean(losses[j])) if np.all(np.isfinite(losses[j])) else math.inf,
        )
        log.info(
            "--freeze auto: chose %s (head only is more than one standard error above the "
            "lowest validation loss; of the stages, the lowest)",
            scores[index]["candidate"],
        )
    for j, (s, e) in enumerate(zip(scores, excess, strict=True)):
        s["chosen"] = j == index
        s["se_above_best"] = round(e, 2) if math.isfinite(e) else None
    return index


def _score(
    plan: FreezePlan, val_loss: float, val_accuracy: float, epochs: int, seconds: float
) -> dict[str, Any]:
    candidate = "head only" if plan.n_frozen == plan.n_layers else plan.request
    return {
        "candidate": candidate,
        "n_frozen": plan.n_frozen,
        "val_loss": float(val_loss),
        "val_accuracy": float(val_accuracy),
        "epochs": epochs,
        "seconds": round(seconds, 1),
    }
