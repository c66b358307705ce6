"""`finetune`: the two-phase recipe of the Keras transfer-learning guide, into a run directory.

Phase 1 trains only the new head with the whole backbone frozen, so large random gradients never
reach pretrained weights. Phase 2 unfreezes everything after the freeze point and trains it at a
much lower rate. The model with the lowest validation loss over both phases is the one saved.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tlkit import _version
from tlkit.backbones import get_backbone
from tlkit.config import FinetuneConfig
from tlkit.datasets import check_decodable, fingerprint, load_folder
from tlkit.errors import RunError
from tlkit.features import cache_dataset
from tlkit.freezing import apply_freeze, freeze_all, resolve_freeze
from tlkit.fsutil import atomic_path, atomic_write, atomic_write_json, incomplete_dir, publish_dir
from tlkit.runs import RUN_SCHEMA, RUNS_DIR, Run, load_run
from tlkit.weights import build_backbone, resolve_weights

log = logging.getLogger("tlkit")
HISTORY_FIELDS = ("phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr",
                  "seconds")


def default_run_dir(backbone: str) -> Path:
    return Path(RUNS_DIR) / f"{backbone}-{datetime.now():%Y%m%d-%H%M%S}"


def seed_everything(seed: int) -> None:
    """Same seed, same CPU run: Python, NumPy and TF RNGs plus deterministic TF kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU"):  # GPUs lack some deterministic kernels
        tf.config.experimental.enable_op_determinism()


def _make_progress_callback(run_dir: Path, rows: list[dict[str, Any]], best: dict[str, Any],
                            model: Any) -> Any:
    """`model` is the whole classifier, also when training runs on its tail from the cache."""
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        """History rows, atomic `last`/`best` checkpoints, and the best weights over all phases."""

        phase = "head"

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            logs = logs or {}
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {"phase": self.phase, "epoch": epoch + 1, "lr": lr,
                   "seconds": round(time.perf_counter() - self._start, 3)}
            row.update({k: float(logs[k]) for k in HISTORY_FIELDS if k in logs})
            rows.append(row)
            write_history(run_dir / "history.csv", rows)
            ckpt = run_dir / "checkpoints"
            with atomic_path(ckpt / "last.weights.h5", suffix=".weights.h5") as tmp:
                model.save_weights(tmp)
            val_loss = row.get("val_loss", math.inf)
            if val_loss < best.get("val_loss", math.inf):
                best.update(val_loss=val_loss, val_accuracy=row.get("val_accuracy"),
                            phase=self.phase, epoch=epoch + 1, weights=model.get_weights())
                with atomic_path(ckpt / "best.weights.h5", suffix=".weights.h5") as tmp:
                    model.save_weights(tmp)

    return EpochRecorder()


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _param_counts(model: Any) -> tuple[int, int]:
    from tlkit.model import count_params

    return count_params(model.trainable_weights), count_params(model.non_trainable_weights)


def _select_cache(config: FinetuneConfig, spec: Any, weights: Any, model: Any, base: Any,
                  plan: Any, size: int, folder: Any, pca: Any) -> tuple[Any, Any, str]:
    """(cache or None, the model to fit, why): train the tail from cached activations when a
    cache matches these exact settings (or --cache builds one)."""
    from tlkit.cache import cache_root, open_cache
    from tlkit.features import build_with_progress, prepare_cache
    from tlkit.split import build_tail, resolve_cut

    if config.cache == "off":
        return None, model, "not used (--no-cache)"
    cut = resolve_cut(base, plan.n_frozen)
    if cut is None:
        return None, model, "not used (nothing is frozen)"
    if config.views == 1 and config.augment.random:
        return None, model, (f"not used: --augment {config.augment.preset} is random and a "
                             "one-view cache holds no augmentation; use --views K (K > 1) or "
                             "--augment none to train from a cache")
    trunk, key, inputs, transform = prepare_cache(
        spec, weights, model, cut, size, config.views, config.augment, config.seed, folder,
        config.cache_dtype, pca)
    root = cache_root(config.cache_dir)
    cache = open_cache(root, key)
    moved = "" if cut.k == plan.n_frozen else (
        f"; freeze point {plan.n_frozen} is inside a block, cached at the single-tensor cut "
        f"after layer {cut.k - 1} ({cut.layer}), the frozen layers after it run live")
    if cache is None and config.cache == "build":
        cache = build_with_progress(root, key, inputs, trunk, folder, config.views, transform,
                                    spec.crop_fraction, config.seed, config.cache_dtype,
                                    config.batch_size, config.workers)
        note = f"built and used {root / key}{moved}"
    elif cache is None:
        return None, model, (f"not used: no cache for these settings ({root / key}); "
                             "`tlkit precompute-features` with the same options, or --cache, "
                             "builds it")
    else:
        note = f"using {root / key}{moved}"
    cache.verify()
    from tlkit.cache import touch

    touch(cache)
    return cache, build_tail(model, cut), note


def finetune(config: FinetuneConfig, verbose: int | str = "auto") -> Run:
    """Train a classifier on `config.data`; return the finished run."""
    spec = get_backbone(config.backbone)
    size = spec.resolve_input_size(config.input_size)
    run_dir = Path(config.output) if config.output else default_run_dir(spec.name)
    if run_dir.exists() and not config.overwrite:
        raise RunError(f"{run_dir}: already exists; choose another -o/--output or pass --overwrite")

    weights = resolve_weights(spec, config.weights)  # before the data: fail fast when offline
    folder = load_folder(config.data, config.val_fraction)
    all_examples = [e for split in folder.splits.values() for e in split]
    log.info("data: %s (%s layout), %d classes; %s", folder.root, folder.layout,
             len(folder.classes),
             ", ".join(f"{s} {len(x)}" for s, x in folder.splits.items()))
    if folder.ignored:
        log.info("ignored %d hidden or system entries (e.g. %s)", len(folder.ignored),
                 folder.ignored[0])
    check_decodable(all_examples, config.workers)
    data_fingerprint = fingerprint(folder)

    import keras

    seed_everything(config.seed)
    previous_policy = keras.config.dtype_policy()
    if config.mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        base = build_backbone(spec, weights, size)
        plan = resolve_freeze(config.freeze, spec, [layer.name for layer in base.layers])
        from tlkit.model import build_classifier

        model = build_classifier(spec, base, len(folder.classes), size, config.dropout)
    finally:
        keras.config.set_dtype_policy(previous_policy)

    from tlkit.pipeline import build_train_transform, eval_dataset, steps_per_epoch, train_dataset

    train_examples = folder.splits["train"]
    transform = build_train_transform(config.augment, train_examples, size, spec.crop_fraction)
    if transform.pca is not None:
        log.info("PCA colour: eigenvalues %s from %d images", ", ".join(
            f"{v:.4f}" for v in transform.pca.eigvals), transform.pca.n_images)
    cache, fit_model, cache_note = _select_cache(config, spec, weights, model, base, plan, size,
                                                 folder, transform.pca)
    log.info("feature cache: %s", cache_note)
    if cache is not None:
        val_ds = cache_dataset(cache, "val", config.batch_size, config.seed, shuffle=False,
                               workers=config.workers, prefetch=config.prefetch)
    else:
        val_ds = eval_dataset(folder.splits["val"], size, spec.crop_fraction, config.batch_size,
                              config.workers, config.prefetch)

    tmp_dir = incomplete_dir(run_dir)
    rows: list[dict[str, Any]] = []
    best: dict[str, Any] = {}
    recorder = _make_progress_callback(tmp_dir, rows, best, model)
    if verbose == "auto":
        verbose = 1 if os.isatty(1) else 2
    phases = []
    epochs_done = 0  # global epoch counter: every epoch of both phases draws new augmentations
    schedule = [("head", config.head_epochs, config.lr), ("fine-tune", config.epochs,
                                                          config.fine_tune_lr)]
    for phase, epochs, lr in schedule:
        if epochs == 0:
            continue
        if phase == "head":
            frozen_bn = freeze_all(base)
            what = "head only, backbone frozen"
        else:
            frozen_bn = apply_freeze(base, plan, config.train_bn)
            what = (f"{plan.request}: layers 0..{plan.n_frozen - 1} of {plan.n_layers} frozen"
                    if plan.n_frozen else f"{plan.request}: whole backbone trainable")
        trainable, frozen = _param_counts(model)  # the shared layers: same for the tail
        log.info("phase %s (%s): %s trainable / %s frozen parameters, %d frozen BatchNorm layers"
                 "%s", phase, what, f"{trainable:,}", f"{frozen:,}", frozen_bn,
                 "" if phase == "head" or not config.train_bn else " (--train-bn)")
        fit_model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        recorder.phase = phase
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience)
        start = time.perf_counter()
        if cache is not None:
            train_ds = cache_dataset(cache, "train", config.batch_size, config.seed,
                                     first_epoch=epochs_done, epochs=epochs,
                                     workers=config.workers, prefetch=config.prefetch)
        else:
            train_ds = train_dataset(train_examples, transform, config.batch_size, config.seed,
                                     first_epoch=epochs_done, epochs=epochs,
                                     workers=config.workers, prefetch=config.prefetch)
        history = fit_model.fit(train_ds, validation_data=val_ds, epochs=epochs,
                                steps_per_epoch=steps_per_epoch(len(train_examples),
                                                                config.batch_size),
                                callbacks=[recorder, stop], verbose=verbose,
                                shuffle=False)  # the dataset shuffles, seeded
        ran = len(history.history.get("loss", []))
        epochs_done += epochs
        phase_rows = [r for r in rows if r["phase"] == phase]
        top = min(phase_rows, key=lambda r: r.get("val_loss", math.inf))
        summary = {"phase": phase, "epochs_run": ran, "best_epoch": top["epoch"],
                   "best_val_loss": top.get("val_loss"),
                   "best_val_accuracy": top.get("val_accuracy"),
                   "seconds": round(time.perf_counter() - start, 1),
                   "early_stopped": ran < epochs}
        phases.append(summary)
        log.info("phase %s: %d epochs%s in %.1fs, best val_loss %.4f, val_accuracy %.4f "
                 "(epoch %d)", phase, ran, " (early stop)" if ran < epochs else "",
                 summary["seconds"], top.get("val_loss", math.nan),
                 top.get("val_accuracy", math.nan), top["epoch"])
        if not all(math.isfinite(r.get("loss", math.nan)) for r in phase_rows):
            log.warning("phase %s: the loss was not finite; lower --lr", phase)

    if "weights" in best:
        model.set_weights(best.pop("weights"))
    with atomic_path(tmp_dir / "model.keras") as tmp:
        model.save(tmp)
    info = {
        "schema": RUN_SCHEMA,
        "tlkit_version": _version.__version__,
        "keras_version": keras.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": spec.name,
        "weights": weights.as_dict(),
        "freeze": plan.as_dict(),
        "train_bn": config.train_bn,
        "input_size": size,
        "preprocessing": spec.preprocessing,
        "crop_fraction": spec.crop_fraction,
        "augment": {**config.augment.as_dict(),
                    "pca": transform.pca.as_dict() if transform.pca is not None else None},
        "classes": list(folder.classes),
        "config": config.as_dict(),
        "data": {
            "root": str(Path(folder.root).resolve()), "layout": folder.layout,
            "val_source": folder.val_source, "counts": folder.counts(),
            "fingerprint": data_fingerprint, "ignored": list(folder.ignored),
        },
        "feature_cache": {"used": cache is not None, "key": cache.key if cache else None,
                          "note": cache_note},
        "seed": config.seed,
        "phase": rows[-1]["phase"] if rows else None,
        "epoch": rows[-1]["epoch"] if rows else None,
        "results": {"best": {k: best.get(k) for k in ("phase", "epoch", "val_loss",
                                                       "val_accuracy")},
                    "phases": phases},
    }
    atomic_write_json(tmp_dir / "run.json", info)
    try:
        publish_dir(tmp_dir, run_dir, overwrite=config.overwrite)
    except FileExistsError:
        raise RunError(f"{run_dir}: appeared while training; the finished run is in {tmp_dir}") \
            from None
    log.info("saved %s (best val_accuracy %.4f, %s epoch %s)", run_dir,
             best.get("val_accuracy") or math.nan, best.get("phase"), best.get("epoch"))
    return load_run(run_dir)
