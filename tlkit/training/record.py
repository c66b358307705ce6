"""What a finished `finetune` writes about itself: the model without its training state, the
test score it ends on, --calibrate's temperature, run.json and search.csv."""

from __future__ import annotations

import csv
import io
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlkit import _version
from tlkit.core import selection
from tlkit.core.choices import AUTO
from tlkit.core.fsutil import atomic_write
from tlkit.core.records import Best, Searched
from tlkit.core.runs import RunRecord
from tlkit.data.views_seen import ViewsSeen, views_trained_on
from tlkit.models.distribute import Placement
from tlkit.models.model import scales_of, taps_of
from tlkit.training.state import Schedule, TrainingState

if TYPE_CHECKING:
    import keras

    from tlkit.training.plan import Plan

log = logging.getLogger("tlkit")

SEARCH_TABLE = "search.csv"


def write_search_table(path: Path, searched: Searched) -> None:
    """Every candidate of the `auto` searches (--head-features, --augment, --freeze), one row
    each, beside run.json; no file when nothing was searched."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("setting", "candidate", "val_loss", "val_accuracy", "seconds", "chosen"))
    header = buf.tell()
    for setting, found in (
        ("head_features", searched.get("head_features")),
        ("augment", searched.get("augment")),
        ("freeze", searched.get("freeze")),
    ):
        for s in found["scores"] if found else ():
            writer.writerow(
                (
                    setting,
                    s.get("head_features") or s.get("augment") or s.get("candidate"),
                    f"{s['val_loss']:.5f}",
                    f"{s['val_accuracy']:.4f}",
                    s["seconds"],
                    int(bool(s.get("chosen"))),
                )
            )
    if buf.tell() > header:  # --head-features stages measures and records, it searches nothing
        atomic_write(path, buf.getvalue())


def inference_model(model: keras.Model) -> keras.Model:
    """The classifier without its training state (optimizer, loss): what model.keras holds, so
    that plain `keras.saving.load_model` opens it whatever trained it; the state for resuming is
    in the checkpoints."""
    import keras

    return keras.Model(model.input, model.output, name=model.name)


def _predict_split(plan: Plan, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of the model being saved on a split's eval view."""
    probs = np.asarray(plan.start.model.predict(plan.eval_dataset(split), verbose=0), np.float64)
    return probs, np.array([e.label for e in plan.split(split)])


def saved_checkpoint(plan: Plan, state: TrainingState, ckpt_dir: Path) -> Path:
    """The checkpoint that becomes model.keras: the best epoch's, or the --freeze auto search's
    trained stage(s) where it scores better (the selection criterion) on the run's own
    validation images (state.best then says so). Scored here, not taken from the search, so
    that a resumed run whose data changed (--force-resume) compares like with like."""
    from tlkit.core.calibration import log_loss
    from tlkit.core.checkpoints import BEST, SEARCH, load_checkpoint

    path, best = ckpt_dir / SEARCH, state.best
    if not path.is_file() or plan.config.model.freeze.count != AUTO:
        return ckpt_dir / BEST
    found = load_checkpoint(path, plan.start.model)
    probs, labels = _predict_split(plan, "val")
    row: Best = {
        "val_loss": log_loss(probs, labels),
        "val_accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
        "phase": "freeze-search",
        "epoch": found["best_epoch"],
    }
    if not selection.CRITERION.improves(row, state.best):
        return ckpt_dir / BEST
    log.info(
        "--freeze auto: the search's %s (val_loss %.4f) beat the run's best (phase %s, "
        "val_loss %.4f) by %s: it is the model saved",
        found["candidate"],
        row["val_loss"],
        best["phase"] if best else None,
        best["val_loss"] if best else math.nan,
        selection.CRITERION.describe(),
    )
    state.best = row
    return path


def score_on_test(plan: Plan) -> dict[str, Any] | None:
    """The saved model's single-crop score on the test split, when the data has one: the
    figure a run ends on, since validation chose the model and flatters it."""
    from tlkit.core.calibration import log_loss

    if not plan.start.folder.splits.get("test"):
        return None
    probs, labels = _predict_split(plan, "test")
    return {
        "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
        "loss": log_loss(probs, labels),
        "images": len(labels),
        "views": 1,
    }


def calibrate(plan: Plan) -> dict[str, Any]:
    """--calibrate: temperature scaling fitted on the validation split's eval view, folded into
    the softmax layer of the model about to be saved."""
    from tlkit.core.calibration import apply_temperature, fit_temperature, fold_temperature, summary
    from tlkit.models.model import softmax_layer

    val = plan.split("val")
    probs, labels = _predict_split(plan, "val")
    temperature = fit_temperature(probs, labels)
    before, after = summary(probs, labels), summary(apply_temperature(probs, temperature), labels)
    fold_temperature(softmax_layer(plan.start.model, "--calibrate"), temperature)
    log.info(
        "--calibrate: temperature %.3f fitted on %d validation images; ECE %.4f -> %.4f, "
        "log loss %.4f -> %.4f there (an eval on a test split gives the unbiased ECE)",
        temperature,
        len(val),
        before["ece"],
        after["ece"],
        before["log_loss"],
        after["log_loss"],
    )
    return {
        "temperature": temperature,
        "fitted_on": "val",
        "images": len(val),
        "before": before,
        "after": after,
    }


def _data_record(plan: Plan) -> dict[str, Any]:
    """run.json `data`: where the images came from, how many, and which were left out."""
    folder = plan.start.folder
    return {
        "source": plan.config.data,
        "root": str(Path(folder.root).resolve()),
        "layout": folder.layout,
        "val_source": folder.val_source,
        "counts": folder.counts(),
        "fingerprint": plan.fingerprint,
        "ignored": list(folder.ignored),
        "skipped": plan.start.skipped,
    }


def _distribution(placement: Placement, batch_size: int) -> dict[str, Any]:
    return {
        "strategy": placement.name,
        "replicas": placement.replicas,
        "workers": placement.workers,
        "per_replica_batch": -(-batch_size // placement.replicas),
    }


def _head_features(plan: Plan) -> dict[str, Any]:
    """run.json's `head_features`: what the head reads, and `auto`'s probes."""
    return {
        "used": plan.config.model.head_features,
        "taps": list(taps_of(plan.start.model)),
        "scales": scales_of(plan.start.model),
        "search": plan.chosen.searched.get("head_features", {}).get("scores"),
    }


def run_record(
    plan: Plan,
    placement: Placement,
    state: TrainingState,
    schedule: Schedule,
    calibration: dict[str, Any] | None = None,
    test: dict[str, Any] | None = None,
) -> RunRecord:
    import keras

    c, folder, pca = plan.config, plan.start.folder, plan.feed.transform.pca
    rows, by_class, cache = state.rows, plan.feed.weights_by_class, plan.feed.cache
    return RunRecord(
        tlkit_version=_version.__version__,
        keras_version=keras.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        backbone=plan.start.spec.name,
        weights=plan.start.weights.as_dict(),
        freeze={
            **plan.chosen.freeze.as_dict(),
            "search": plan.chosen.searched.get("freeze", {}).get("scores"),
        },
        train_bn=c.fit.bn_trains,
        head=plan.start.identity.head,
        head_features=_head_features(plan),
        input_size=plan.start.size,
        preprocessing=plan.start.spec.preprocessing,
        crop_fraction=plan.start.spec.crop_fraction,
        augment={
            **c.augment.as_dict(),
            "pca": pca.as_dict() if pca is not None else None,
            "search": plan.chosen.searched.get("augment", {}).get("scores"),
        },
        classes=tuple(folder.classes),
        config=plan.requested,
        class_weight={folder.classes[i]: w for i, w in by_class.items()} if by_class else None,
        calibration=calibration,
        views_seen=views_seen_by(plan, state).as_dict(),
        data=_data_record(plan),
        feature_cache={
            "used": cache is not None,
            "key": cache.key if cache else None,
            "note": plan.feed.cache_note,
        },
        seed=c.loader.seed,
        distribution=_distribution(placement, c.loader.batch_size),
        lr_used={phase: lr for phase, _, lr in schedule},
        phase=rows[-1]["phase"] if rows else None,
        epoch=rows[-1]["epoch"] if rows else None,
        optimizer_steps=sum(state.phase_steps.values()),
        resumed=state.resumed,
        results={
            "best": state.best,
            "phases": state.phase_summaries(schedule),
            "head_probe": state.head_probe,
            "test": test,
        },
    )


def views_seen_by(plan: Plan, state: TrainingState) -> ViewsSeen:
    """What the saved weights were trained on: the views of the phase they come from (the
    head phase trains on the eval view unless --head-views K). Test-time views follow it."""
    augment, phase = plan.config.augment, state.best["phase"] if state.best else None
    probe = state.head_probe
    if phase == "head" and probe:
        augmented, source = probe["views"] > 1, f"{probe['views']} view(s) of each image"
    elif phase == "freeze-search":
        augmented, source = False, "the eval view of each image, as --freeze auto's search"
    elif plan.feed.cache is not None:
        views = plan.feed.cache.manifest["splits"]["train"]["views"]
        augmented, source = views > 1, f"a feature cache of {views} view(s) of each image"
    else:
        augmented, source = augment.random, "the training images, live"
    what = f"--augment {augment.preset} views" if augmented else "the eval view only"
    return views_trained_on(
        augment,
        augmented,
        f"the saved weights are from the {phase} phase, trained on {source}: {what}",
    )
