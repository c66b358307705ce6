"""`finetune`: the two-phase recipe of the Keras transfer-learning guide, into a run directory.

Phase 1 trains only the new head with the whole backbone frozen, so large random gradients never
reach pretrained weights. Phase 2 unfreezes everything after the freeze point and trains it at a
much lower rate. The model with the lowest validation loss over both phases is the one saved.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tlkit import _version
from tlkit.core.checkpoints import (
    BEST,
    PREVIOUS,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    remove_stale_temporaries,
    restore,
    save_epoch,
)
from tlkit.core.choices import AUTO
from tlkit.core.errors import ConfigError, Interrupted, RunError
from tlkit.core.fsutil import (
    INCOMPLETE,
    FolderBusy,
    atomic_path,
    atomic_write,
    atomic_write_json,
    claim,
    final_path,
    find_incomplete,
    folder_bytes,
    incomplete_dir,
    is_incomplete,
    publish_dir,
    read_json_record,
    refuse_overwrite,
    release,
)
from tlkit.core.runs import RUN_FILE, RUNS_DIR, Run, RunRecord, load_run
from tlkit.data.audit import audit_and_filter
from tlkit.data.datasets import fingerprint
from tlkit.data.preflight import Checked, check_inputs, is_chief
from tlkit.features.cache import cache_dataset
from tlkit.models.distribute import Placement
from tlkit.models.freezing import apply_freeze, freeze_all, nothing_to_train, resolve_freeze
from tlkit.models.weights import resolve_weights
from tlkit.training.config import FinetuneConfig

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


class Diverged(RunError):
    """The loss became NaN or infinite: more epochs would only spread it."""


def _make_recorder(ckpt_dir: Path | None, history_path: Path | None, model: Any, patience: int,
                   state: dict[str, Any]) -> Any:
    """`model` is the whole classifier, also when training runs on its tail from the cache;
    `state` is the training state that every checkpoint carries, updated in place. Workers
    other than the chief pass no `ckpt_dir`: they keep the same state and write nothing."""
    import keras

    class EpochRecorder(keras.callbacks.Callback):
        """History rows, early stopping, a NaN guard and a checkpoint after every epoch.

        Early stopping lives here (not in keras.callbacks.EarlyStopping, which resets its
        counters in on_train_begin) so that its counters are part of the checkpointed state.
        """

        phase, phase_index = "head", 0
        diverged: str | None = None
        best_head: list[Any] | None = None  # the live head phase's best weights, in memory

        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            loss = float((logs or {}).get("loss", 0.0))
            if not math.isfinite(loss) and self.diverged is None:
                self.diverged = f"the training loss became {loss} at step {batch + 1}"
                self.model.stop_training = True

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            from tlkit.training.optim import plain_val_loss

            logs = plain_val_loss(logs or {})
            if self.diverged is None:
                bad = [k for k in ("loss", "val_loss") if not math.isfinite(logs.get(k, 0.0))]
                if bad:
                    self.diverged = f"{bad[0]} became {logs[bad[0]]}"
            if self.diverged is not None:
                self.diverged = f"phase {self.phase}, epoch {epoch + 1}: {self.diverged}"
                self.model.stop_training = True
                return  # nothing from this epoch is kept: the last checkpoint is the good one
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {"phase": self.phase, "epoch": epoch + 1, "lr": lr,
                   "seconds": round(time.perf_counter() - self._start, 3)}
            row.update({k: float(logs[k]) for k in HISTORY_FIELDS if k in logs})
            stop, improved = _advance(state, row, patience)
            self.model.stop_training = stop
            if improved and self.phase == "head":
                self.best_head = model.get_weights()  # every worker: phase 2 starts from it
            state.update(phase=self.phase, phase_index=self.phase_index, epoch=epoch + 1,
                         phase_done=stop or epoch + 1 == self.params["epochs"],
                         progress=len(state["rows"]))
            state["phase_steps"][self.phase] = int(keras.ops.convert_to_numpy(
                self.model.optimizer.iterations))
            if ckpt_dir is not None and history_path is not None:
                save_epoch(ckpt_dir, model, self.model.optimizer, state, improved)
                write_history(history_path, state["rows"])

    return EpochRecorder()


def _advance(state: dict[str, Any], row: dict[str, Any], patience: int) -> tuple[bool, bool]:
    """Add an epoch's row to the state: (stop early, best so far)."""
    val_loss = row.get("val_loss", math.inf)
    if val_loss < state["phase_best"]:
        state["phase_best"], state["wait"] = val_loss, 0
    else:
        state["wait"] += 1
    improved = state["best"] is None or val_loss < state["best"]["val_loss"]
    if improved:
        state["best"] = {"val_loss": val_loss, "val_accuracy": row.get("val_accuracy"),
                         "phase": row["phase"], "epoch": row["epoch"]}
    state["rows"].append(row)
    return state["wait"] >= patience, improved


SEARCH_TABLE = "search.csv"


def write_search_table(path: Path, searched: dict[str, Any]) -> None:
    """Every candidate of --augment auto / --freeze auto, one row each, beside run.json."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("setting", "candidate", "val_loss", "val_accuracy", "seconds", "chosen"))
    for setting, found in searched.items():
        for s in found["scores"]:
            writer.writerow((setting, s.get("augment") or s.get("candidate"),
                             f"{s['val_loss']:.5f}", f"{s['val_accuracy']:.4f}", s["seconds"],
                             int(bool(s.get("chosen")))))
    atomic_write(path, buf.getvalue())


def _resolve_auto(config: FinetuneConfig, placement: Placement, identity: dict[str, Any] | None,
                  model: Any, spec: Any, train: Any, val: Any, size: int,
                  sample_weights: list[float] | None
                  ) -> tuple[FinetuneConfig, Any, dict[str, Any], Any]:
    """--augment auto, then --freeze auto: (config with the chosen augmentation, the chosen
    freeze plan or None, {setting: {chosen, scores}}, features the head phase can reuse or
    None). A resumed run reuses the choices its first start recorded."""
    from tlkit.data.augment import AugmentConfig
    from tlkit.models.freezing import FreezePlan
    from tlkit.training.freeze_search import search_freeze
    from tlkit.training.head import feature_views, search_augment

    searched: dict[str, Any] = dict((identity or {}).get("searched") or {})
    wanted = [flag for flag, on in (("--augment auto", config.augment.preset == AUTO),
                                    ("--freeze auto", config.freeze.count == AUTO)) if on]
    if wanted and placement.replicas > 1:
        raise ConfigError(f"{wanted[0]} runs on one device; name a value (--augment light, "
                          "--freeze all, ...) under --strategy mirrored or multiworker")
    estimates = [lambda per_image, total: log_estimate(per_image, total, len(train),
                                                       config.epochs)]
    head_features, plan = None, None
    if config.augment.preset == AUTO:
        if "augment" in searched:
            chosen = AugmentConfig.from_dict(searched["augment"]["chosen"])
            log.info("--augment auto: %s, as chosen when the run started", chosen.preset)
        else:
            chosen, scores, head_features = search_augment(
                model, train, val, size, spec.crop_fraction, config, sample_weights,
                on_first_batch=estimates.pop())
            searched["augment"] = {"chosen": chosen.as_dict(), "scores": scores}
        config = dataclasses.replace(config, augment=chosen)
    if config.freeze.count == AUTO:
        if "freeze" in searched:
            plan = FreezePlan(**searched["freeze"]["chosen"])
            log.info("%s, as chosen when the run started", plan.request)
        else:
            plan, scores, pooled = search_freeze(
                model, spec, train, val, size, spec.crop_fraction, config, sample_weights,
                on_first_batch=estimates.pop() if estimates else None)
            searched["freeze"] = {"chosen": plan.as_dict(), "scores": scores}
            dim = pooled.train.shape[1]
            if head_features is None and feature_views(
                    config.augment.random, config.head_views, len(train), dim) == 1:
                head_features = pooled
    return config, plan, searched, head_features


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())


def _param_counts(model: Any) -> tuple[int, int]:
    from tlkit.models.model import count_params

    return count_params(model.trainable_weights), count_params(model.non_trainable_weights)


def _select_cache(config: FinetuneConfig, spec: Any, weights: Any, model: Any, base: Any,
                  plan: Any, size: int, folder: Any, pca: Any, verbose: int,
                  placement: Placement) -> tuple[Any, Any, str]:
    """(cache or None, the model to fit, why): train the tail from cached activations when a
    cache matches these exact settings (or --cache builds one)."""
    from tlkit.features.cache import cache_root, open_cache
    from tlkit.features.precompute import build_with_progress, prepare_cache
    from tlkit.models.cut import build_tail, resolve_cut

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
        config.cache_dtype, pca, config.audit.max_pixels)
    root = cache_root(config.cache_dir)
    cache = open_cache(root, key)
    moved = "" if cut.k == plan.n_frozen else (
        f"; freeze point {plan.n_frozen} is inside a block, cached at the single-tensor cut "
        f"after layer {cut.k - 1} ({cut.layer}), the frozen layers after it run live")
    if cache is None and config.cache == "build":
        if placement.workers > 1:
            raise ConfigError("--cache build under --strategy multiworker: build the cache "
                              "first with `tlkit precompute-features --strategy multiworker` "
                              "(each worker computes a shard), then train from it")
        cache = build_with_progress(root, key, inputs, trunk, folder, config.views, transform,
                                    spec.crop_fraction, config.seed, config.cache_dtype,
                                    config.batch_size, config.workers, config.audit.max_pixels,
                                    verbose, placement.predictor(trunk))
        note = f"built and used {root / key}{moved}"
    elif cache is None:
        return None, model, (f"not used: no cache for these settings ({root / key}); "
                             "`tlkit precompute-features` with the same options, or --cache, "
                             "builds it")
    else:
        note = f"using {root / key}{moved}"
    cache.verify()
    from tlkit.features.cache import touch

    touch(cache)
    return cache, build_tail(model, cut), note


IDENTITY_FILE = "identity.json"  # in checkpoints/: what a resumed run must still match
# Settings a resumed run may change freely: they decide where and how fast, not what is learned.
RESUME_FREE = ("output", "overwrite", "workers", "prefetch", "cache_dir", "recipe", "tensorboard",
               "strategy")


def class_weights(examples: Any, n_classes: int) -> dict[int, float]:
    """'balanced' (scikit-learn's rule): n / (classes * count), so every class weighs the same."""
    counts = [0] * n_classes
    for e in examples:
        counts[e.label] += 1
    total = sum(counts)
    return {i: total / (n_classes * c) for i, c in enumerate(counts) if c}


def find_resumable(path: str | os.PathLike) -> tuple[Path, Path]:
    """(folder being built, final run folder) for `--resume PATH`: PATH is the run's name
    (runs/x) or its `runs/x.incomplete-<id>` folder."""
    path = Path(path)
    if is_incomplete(path):
        candidates = [path] if (path / "checkpoints" / IDENTITY_FILE).is_file() else []
        final = final_path(path)
    else:
        if (path / RUN_FILE).is_file():
            raise RunError(f"{path}: this run finished; there is nothing to resume (train a new "
                           "one with -o, or evaluate it with `tlkit eval`)")
        final = path
        candidates = [c for c in find_incomplete(path)
                      if (c / "checkpoints" / IDENTITY_FILE).is_file()]
    if not candidates:
        raise RunError(f"{path}: no interrupted run to resume (expected a folder "
                       f"{final.name}{INCOMPLETE}<id> holding checkpoints/{IDENTITY_FILE})")
    chosen = max(candidates, key=lambda c: (c / "checkpoints").stat().st_mtime)
    if len(candidates) > 1:
        log.info("%d interrupted attempts of %s; resuming the newest, %s", len(candidates),
                 final, chosen.name)
    return chosen, final


def read_identity(tmp_dir: Path) -> dict[str, Any]:
    """What an interrupted run started with (checkpoints/identity.json)."""
    return read_json_record(tmp_dir / "checkpoints" / IDENTITY_FILE, RunError,
                            f"the run cannot be resumed; remove {tmp_dir} and train again")


def resume_config(path: str | os.PathLike, **overrides: Any) -> FinetuneConfig:
    """The settings an interrupted run started with, with `overrides` on top."""
    tmp_dir, _ = find_resumable(path)
    saved = read_identity(tmp_dir)
    return dataclasses.replace(FinetuneConfig.from_dict(saved["config"]), **overrides)


def _differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (prefix == "config." and key in RESUME_FREE):
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _local_inputs(config: FinetuneConfig) -> tuple[Path, ...]:
    """The files a run is made from, which its folder must never replace or sit inside: the
    data (a CSV's folder) and a weights file or run."""
    if config.data.startswith("tfds:"):
        return ()
    data = Path(config.data)
    data = data.parent if data.suffix.lower() == ".csv" else data
    weights = () if config.weights in ("imagenet", "none") else (Path(config.weights),)
    return (data, *weights)


def _check_outside_data(config: FinetuneConfig, run_dir: Path) -> None:
    """A data folder reads every sub-folder as a class (a CSV lists its files: no such risk)."""
    data = Path(config.data)
    if data.is_dir() and run_dir.resolve().is_relative_to(data.resolve()):
        raise ConfigError(f"-o/--output {run_dir}: inside the data folder {data}, where "
                          "the run would be read as images of a class; choose a folder outside it")


def finetune(config: FinetuneConfig | None = None, verbose: int | str = "auto",
             resume: str | os.PathLike | None = None, force_resume: bool = False
             ) -> Run | None:
    """Train a classifier on `config.data`; return the finished run.

    `resume` continues an interrupted run from its last checkpoint; `config` then defaults to
    the settings it started with, and any difference that changes what is learned (settings,
    class map, preprocessing, data) is refused unless `force_resume`. Under a multi-worker
    strategy every worker calls this; the chief writes and returns the run, the others None.
    """
    if resume is not None:
        tmp_dir, run_dir = find_resumable(resume)
        identity = read_identity(tmp_dir)
        if config is None:
            config = FinetuneConfig.from_dict(identity["config"])
    elif config is None:
        raise TypeError("finetune() needs a config, or resume= to continue a run")
    else:
        tmp_dir, identity = None, None
        run_dir = Path(config.output) if config.output else default_run_dir(config.backbone)
    checked = check_inputs(config.data, config.backbone, config.input_size,
                           config.val_fraction, config.freeze)
    if identity is None and is_chief():
        refuse_overwrite(run_dir, config.overwrite,
                         "choose another -o/--output or pass --overwrite", kind="run",
                         inputs=_local_inputs(config))
        _check_outside_data(config, run_dir)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs TensorBoard: pip install 'tlkit[tensorboard]'")
    from tlkit.models.distribute import make_placement

    placement = make_placement(config.strategy)  # before any other TensorFlow work
    if tmp_dir is not None and placement.is_chief:
        try:
            claim(tmp_dir)
        except FolderBusy:
            raise RunError(f"{tmp_dir}: another process is training this run right now; wait "
                           "for it, or stop it first") from None
    if placement.name != "default":
        log.info("strategy: %s", placement.describe())
    try:
        with contextlib.ExitStack() as scope:
            scope.enter_context(placement.strategy.scope())
            return _finetune(config, checked, placement, run_dir, tmp_dir, identity, verbose,
                             force_resume, scope)
    except BaseException:
        for folder in find_incomplete(run_dir):  # interrupted: resumable, by anyone, now
            release(folder)
        raise


@dataclasses.dataclass
class _Plan:
    """Everything decided before the first step: what `_finetune` trains, then records."""

    config: FinetuneConfig  # with --augment auto resolved
    requested: dict[str, Any]  # the settings as asked for: run.json keeps `auto`
    spec: Any
    size: int
    weights: Any
    folder: Any  # the data to train on (bad files left out under --on-bad-image skip)
    report: Any  # the data check of every file
    skipped: list[dict[str, Any]]
    identity: dict[str, Any]  # what a resumed run must still match
    model: Any
    base: Any
    freeze: Any  # the FreezePlan
    searched: dict[str, Any]  # --augment auto / --freeze auto: choices and scores
    head_features: Any  # features the searches computed and the head phase can reuse
    weights_by_class: dict[int, float] | None
    sample_weights: list[float] | None
    transform: Any
    cache: Any
    fit_model: Any  # the classifier, or its tail over the feature cache
    cache_note: str

    @property
    def fingerprint(self) -> str:
        return self.identity["data_fingerprint"]

    def schedule(self) -> list[tuple[str, int, float]]:
        """(phase, epochs, learning rate) of the head and fine-tune phases."""
        config, scale = self.config, self.config.lr_scale()
        tune_epochs = config.epochs
        if "freeze" in self.searched and self.freeze.n_frozen == self.freeze.n_layers \
                and tune_epochs:
            log.info("--freeze auto chose head only: no fine-tune phase (it would train "
                     "nothing but the head again)")
            tune_epochs = 0
        schedule = [("head", config.head_epochs, config.lr * scale),
                    ("fine-tune", tune_epochs, config.fine_tune_lr * scale)]
        if config.scale_lr:
            log.info("--scale-lr: batch %d / base batch %d = x%g: head lr %g, fine-tune lr %g",
                     config.batch_size, config.lr_base_batch, scale, schedule[0][2],
                     schedule[1][2])
        return schedule


def _load_data(config: FinetuneConfig, checked: Checked, placement: Placement
               ) -> tuple[Any, Any, list[dict[str, Any]], str]:
    """(the folder to train on, the data check, the files skipped, the fingerprint of every
    file, usable or not)."""
    spec = checked.spec
    scanned = checked.dataset()
    log.info("data: %s (%s layout), %d classes; %s", scanned.root, scanned.layout,
             len(scanned.classes),
             ", ".join(f"{s} {len(x)}" for s, x in scanned.splits.items()))
    if scanned.ignored:
        log.info("ignored %d hidden or system entries (e.g. %s)", len(scanned.ignored),
                 scanned.ignored[0])
    folder, report, skipped = audit_and_filter(scanned, config.audit, spec.min_size,
                                               config.workers)
    data_fingerprint = fingerprint(report.folder)
    placement.check_same("data", data_fingerprint, "every worker needs the same files at the "
                         "same path (a copy, or a shared filesystem)")
    return folder, report, skipped, data_fingerprint


def _check_unchanged(saved: dict[str, Any] | None, now: dict[str, Any], tmp_dir: Path | None,
                     force_resume: bool) -> None:
    """A resumed run continues only on the settings, classes and data it started with."""
    if saved is None:
        return
    changed = _differences({k: saved.get(k) for k in now}, now)
    if changed and not force_resume:
        raise RunError(f"{tmp_dir}: cannot resume, the run started with different settings or "
                       f"data ({'; '.join(changed)}); restore them, or pass --force-resume to "
                       "continue anyway")
    for line in changed:
        log.warning("resuming despite a change (--force-resume): %s", line)


def _make_plan(config: FinetuneConfig, checked: Checked, placement: Placement,
               saved: dict[str, Any] | None, tmp_dir: Path | None, force_resume: bool,
               verbose: int) -> _Plan:
    """Weights, the data check, freeze point, augmentation and the cache decision, in the
    order that fails fastest (the data's listing was checked before TensorFlow loaded): the
    weights before decoding the data, the data before any model."""
    from tlkit.data.pipeline import build_train_transform
    from tlkit.models.model import backbone_of, build_model

    spec, size = checked.spec, checked.size
    weights = resolve_weights(spec, config.weights)
    folder, report, skipped, data_fingerprint = _load_data(config, checked, placement)
    identity = {"config": config.as_dict(), "backbone": spec.name,
                "weights_sha256": weights.as_dict().get("sha256"), "input_size": size,
                "preprocessing": spec.preprocessing, "classes": list(folder.classes),
                "data_fingerprint": data_fingerprint}
    _check_unchanged(saved, identity, tmp_dir, force_resume)
    seed_everything(config.seed)
    model = build_model(spec, weights, size, len(folder.classes), config.seed, config.dropout,
                        config.mixed_precision)
    base = backbone_of(model)
    freeze = (None if config.freeze.count == AUTO else
              resolve_freeze(config.freeze, spec, [layer.name for layer in base.layers]))
    train = folder.splits["train"]
    by_class = None
    if config.class_weight == "balanced":
        by_class = class_weights(train, len(folder.classes))
        log.info("class weights (balanced): %s", ", ".join(
            f"{folder.classes[i]} {w:.3f}" for i, w in by_class.items()))
    sample_weights = [by_class[e.label] for e in train] if by_class else None
    requested = config.as_dict()
    config, auto_freeze, searched, head_features = _resolve_auto(
        config, placement, saved, model, spec, train, folder.splits["val"], size, sample_weights)
    freeze = auto_freeze or freeze
    idle = nothing_to_train(base, freeze, config.train_bn) if config.epochs else None
    if idle is not None:
        log.warning("%s", idle)
    transform = build_train_transform(config.augment, train, size, spec.crop_fraction,
                                      max_pixels=config.audit.max_pixels)
    if transform.pca is not None:
        log.info("PCA colour: eigenvalues %s from %d images", ", ".join(
            f"{v:.4f}" for v in transform.pca.eigvals), transform.pca.n_images)
    cache, fit_model, note = _select_cache(config, spec, weights, model, base, freeze, size,
                                           folder, transform.pca, verbose, placement)
    log.info("feature cache: %s", note)
    placement.check_same("feature caches", cache.key if cache else "000000",
                         "build the cache on every worker (`tlkit precompute-features`), or "
                         "train with --no-cache")
    return _Plan(config, requested, spec, size, weights, folder, report, skipped, identity,
                 model, base, freeze, searched, head_features, by_class, sample_weights,
                 transform, cache, fit_model, note)


def _open_run_dir(plan: _Plan, placement: Placement, run_dir: Path, tmp_dir: Path | None
                  ) -> tuple[dict[str, Any], Path | None, Path | None]:
    """(training state, the folder the run is built in, its checkpoints/): a new one, or the
    interrupted one restored from its last checkpoint (by every worker)."""
    chief = placement.is_chief
    # the training state every checkpoint carries; progress counts finished epochs
    state: dict[str, Any] = {"schema": 1, "rows": [], "best": None, "phase_steps": {},
                             "progress": 0, "phase_index": -1, "phase_done": True, "epoch": 0,
                             "wait": 0, "phase_best": math.inf, "resumed": []}
    if tmp_dir is None:
        tmp_dir = incomplete_dir(run_dir, "run") if chief else None
        ckpt_dir = tmp_dir / "checkpoints" if tmp_dir is not None else None
        if ckpt_dir is not None:
            atomic_write_json(ckpt_dir / IDENTITY_FILE,
                              {**plan.identity, "searched": plan.searched})
    else:  # every worker restores from the run's folder (under multiworker: a shared one)
        ckpt_dir = tmp_dir / "checkpoints"
        if chief:
            remove_stale_temporaries(ckpt_dir)
        found = restore(ckpt_dir, plan.model)  # the optimizer follows once it is built
        if found is not None:
            path, state = found
            log.info("resuming %s from %s: phase %s, epoch %d done, %d optimizer steps",
                     tmp_dir, path.name, state["phase"], state["epoch"],
                     state["phase_steps"][state["phase"]])
        else:
            log.info("resuming %s: it had no checkpoint yet; starting from the first epoch",
                     tmp_dir)
        state["resumed"] = [*state.get("resumed", []),
                            datetime.now(UTC).isoformat(timespec="seconds")]
        if chief:
            write_history(tmp_dir / "history.csv", state["rows"])
    if chief and tmp_dir is not None:
        atomic_write_json(tmp_dir / "data_report.json", plan.report.as_dict())
        log.info("building the run in %s; if it is interrupted, `tlkit finetune --resume %s` "
                 "continues it", tmp_dir, run_dir)
    else:
        log.info("worker %d: training in step with the chief, which writes the run",
                 placement.worker)
    return state, tmp_dir, ckpt_dir


def _val_dataset(plan: _Plan, placement: Placement) -> Any:
    """One pass, with validation_steps its length, so Keras never has to find the end of a
    distributed dataset (whose length it cannot see). Keras resets the validation iterator
    before every pass; a repeated one would keep decoding batches in the background during
    training only to discard them, then wait for them (measured: 1.8 to 3.8 s an epoch on
    the README's cache example, a third of its epoch). Repeated only under a strategy, where
    Keras takes one batch from the previous pass's iterator before it resets it."""
    from tlkit.data.pipeline import eval_dataset

    c = plan.config
    if plan.cache is not None:
        build = lambda share: cache_dataset(  # noqa: E731
            plan.cache, "val", c.batch_size, c.seed, shuffle=False, workers=c.workers,
            prefetch=c.prefetch, share=share)
    else:
        build = lambda share: eval_dataset(  # noqa: E731
            plan.folder.splits["val"], plan.size, plan.spec.crop_fraction, c.batch_size,
            c.workers, c.prefetch, c.audit.max_pixels, share)
    if placement.name == "default":
        return placement.dataset(build)
    return placement.dataset(lambda share: build(share).repeat())


def _train(plan: _Plan, placement: Placement, state: dict[str, Any], tmp_dir: Path | None,
           ckpt_dir: Path | None, run_dir: Path, schedule: list[tuple[str, int, float]],
           verbose: int) -> None:
    """Both phases, skipping what a resumed run had finished."""
    c, val = plan.config, plan.folder.splits["val"]
    writes = ckpt_dir if placement.is_chief else None
    recorder = _make_recorder(writes, tmp_dir / "history.csv" if writes and tmp_dir else None,
                              plan.model, c.patience, state)
    phases = _PhaseRunner(c, plan.model, plan.fit_model, plan.base, plan.freeze, recorder,
                          state, ckpt_dir, writes is not None, plan.cache,
                          plan.folder.splits["train"], val, plan.spec.crop_fraction,
                          plan.transform, plan.head_features, _val_dataset(plan, placement),
                          -(-len(val) // c.batch_size), plan.sample_weights, placement, verbose,
                          plan.spec)
    first_epoch = 0  # global epoch counter: every epoch of both phases draws new augmentations
    try:
        for index, (phase, epochs, lr) in enumerate(schedule):
            phase_first, first_epoch = first_epoch, first_epoch + epochs
            done = state["phase_index"] > index or (state["phase_index"] == index
                                                    and state["phase_done"])
            if epochs == 0 or done:
                continue
            initial = state["epoch"] if state["phase_index"] == index else 0
            if initial == 0:
                state.update(wait=0, phase_best=math.inf)
            phases.run(phase, index, epochs, lr, initial, phase_first)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the checkpoints in {ckpt_dir} are intact: "
                          f"`tlkit finetune --resume {run_dir}` continues from the last finished "
                          "epoch") from None


def _finetune(config: FinetuneConfig, checked: Checked, placement: Placement, run_dir: Path,
              tmp_dir: Path | None, identity: dict[str, Any] | None, verbose: int | str,
              force_resume: bool, scope: contextlib.ExitStack) -> Run | None:
    """finetune() in the strategy's `scope`: plan, train, record. Every worker trains; only the
    chief writes."""
    if verbose == "auto":
        verbose = 1 if os.isatty(1) else 2
    plan = _make_plan(config, checked, placement, identity, tmp_dir, force_resume, int(verbose))
    state, tmp_dir, ckpt_dir = _open_run_dir(plan, placement, run_dir, tmp_dir)
    schedule = plan.schedule()
    _train(plan, placement, state, tmp_dir, ckpt_dir, run_dir, schedule, int(verbose))
    scope.close()  # saving inside it would start collective ops the other workers never join
    if not placement.is_chief:
        log.info("worker %d: done; the chief writes %s", placement.worker, run_dir)
        return None
    if tmp_dir is None or ckpt_dir is None:
        raise RuntimeError("the chief has no run folder")  # a bug, not bad input
    if state["best"] is None:
        raise RunError(f"{tmp_dir}: no epoch finished with a finite validation loss; nothing "
                       "to save")
    load_checkpoint(ckpt_dir / BEST, plan.model)
    calibration = _calibrate(plan) if plan.config.calibrate else None
    test = _test_score(plan)
    with atomic_path(tmp_dir / "model.keras") as tmp:
        inference_model(plan.model).save(tmp)
    from tlkit.training.curves import training_curves_png

    atomic_write(tmp_dir / "training_curves.png", training_curves_png(state["rows"]))
    atomic_write_json(tmp_dir / RUN_FILE,
                      _run_record(plan, placement, state, schedule, calibration, test).as_dict())
    if plan.searched:
        write_search_table(tmp_dir / SEARCH_TABLE, plan.searched)
    with contextlib.suppress(FileNotFoundError):
        (ckpt_dir / PREVIOUS).unlink()  # only needed while a crash could damage `last`
    try:
        publish_dir(tmp_dir, run_dir, overwrite=config.overwrite)
    except FileExistsError:
        raise RunError(f"{run_dir}: appeared while training; the finished run is in {tmp_dir}") \
            from None
    best = state["best"]
    log.info("saved %s (%.1f MB; best val_accuracy %.4f, %s epoch %s)", run_dir,
             folder_bytes(run_dir) / 1e6, best.get("val_accuracy") or math.nan, best["phase"],
             best["epoch"])
    if test is not None:
        log.info("test: top-1 %.4f on %d images (single crop; `tlkit eval %s --multicrop` for "
                 "test-time views)", test["accuracy"], test["images"], run_dir)
    wasted = fine_tune_wasted(state, schedule)
    if wasted:
        log.warning("%s", wasted)
    return load_run(run_dir)


def fine_tune_wasted(state: dict[str, Any], schedule: list[tuple[str, int, float]]
                     ) -> str | None:
    """A warning when fine-tuning ran yet never beat the head: the saved model is the head's,
    so its time bought nothing."""
    rows = [r for r in state["rows"] if r["phase"] == "fine-tune"]
    if not rows or state["best"]["phase"] != "head":
        return None
    seconds = sum(r["seconds"] for r in rows)
    return (f"the fine-tune phase never beat the head: {len(rows)} epochs, "
            f"{_duration(seconds)}, and the best val_loss stayed head epoch "
            f"{state['best']['epoch']}'s, the model saved. --epochs 0 skips the phase; "
            "--freeze auto tries it on validation first and skips it when it does not pay")


def inference_model(model: Any) -> Any:
    """The classifier without its training state (optimizer, loss): what model.keras holds, so
    that plain `keras.saving.load_model` opens it whatever trained it; the state for resuming is
    in the checkpoints."""
    import keras

    return keras.Model(model.input, model.output, name=model.name)


def _predict_split(plan: _Plan, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of the model being saved on a split's eval view."""
    from tlkit.data.pipeline import eval_dataset

    c, examples = plan.config, plan.folder.splits[split]
    probs = np.asarray(plan.model.predict(eval_dataset(
        examples, plan.size, plan.spec.crop_fraction, c.batch_size, c.workers, c.prefetch,
        c.audit.max_pixels), verbose=0), np.float64)
    return probs, np.array([e.label for e in examples])


def _test_score(plan: _Plan) -> dict[str, Any] | None:
    """The saved model's single-crop score on the test split, when the data has one: the
    figure a run ends on, since validation chose the model and flatters it."""
    from tlkit.core.calibration import log_loss

    if not plan.folder.splits.get("test"):
        return None
    probs, labels = _predict_split(plan, "test")
    return {"accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
            "loss": log_loss(probs, labels), "images": len(labels), "views": 1}


def _calibrate(plan: _Plan) -> dict[str, Any]:
    """--calibrate: temperature scaling fitted on the validation split's eval view, folded into
    the softmax layer of the model about to be saved."""
    from tlkit.core.calibration import apply_temperature, fit_temperature, fold_temperature, summary

    val = plan.folder.splits["val"]
    probs, labels = _predict_split(plan, "val")
    temperature = fit_temperature(probs, labels)
    before, after = summary(probs, labels), summary(apply_temperature(probs, temperature), labels)
    fold_temperature(plan.model, temperature)
    log.info("--calibrate: temperature %.3f fitted on %d validation images; ECE %.4f -> %.4f, "
             "log loss %.4f -> %.4f there (an eval on a test split gives the unbiased ECE)",
             temperature, len(val), before["ece"], after["ece"], before["log_loss"],
             after["log_loss"])
    return {"temperature": temperature, "fitted_on": "val", "images": len(val),
            "before": before, "after": after}


def _run_record(plan: _Plan, placement: Placement, state: dict[str, Any],
                schedule: list[tuple[str, int, float]],
                calibration: dict[str, Any] | None = None,
                test: dict[str, Any] | None = None) -> RunRecord:
    import keras

    c, folder, pca = plan.config, plan.folder, plan.transform.pca
    rows = state["rows"]
    return RunRecord(
        tlkit_version=_version.__version__, keras_version=keras.__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        backbone=plan.spec.name, weights=plan.weights.as_dict(),
        freeze={**plan.freeze.as_dict(),
                "search": plan.searched.get("freeze", {}).get("scores")},
        train_bn=c.train_bn, input_size=plan.size, preprocessing=plan.spec.preprocessing,
        crop_fraction=plan.spec.crop_fraction,
        augment={**c.augment.as_dict(), "pca": pca.as_dict() if pca is not None else None,
                 "search": plan.searched.get("augment", {}).get("scores")},
        classes=tuple(folder.classes), config=plan.requested,
        class_weight=({folder.classes[i]: w for i, w in plan.weights_by_class.items()}
                      if plan.weights_by_class else None),
        calibration=calibration, views_seen=_views_seen(plan, state).as_dict(),
        data={"source": c.data, "root": str(Path(folder.root).resolve()),
              "layout": folder.layout, "val_source": folder.val_source,
              "counts": folder.counts(), "fingerprint": plan.fingerprint,
              "ignored": list(folder.ignored), "skipped": plan.skipped},
        feature_cache={"used": plan.cache is not None,
                       "key": plan.cache.key if plan.cache else None, "note": plan.cache_note},
        seed=c.seed,
        distribution={"strategy": placement.name, "replicas": placement.replicas,
                      "workers": placement.workers,
                      "per_replica_batch": -(-c.batch_size // placement.replicas)},
        lr_used={phase: lr for phase, _, lr in schedule},
        phase=rows[-1]["phase"] if rows else None, epoch=rows[-1]["epoch"] if rows else None,
        optimizer_steps=sum(state["phase_steps"].values()), resumed=state["resumed"],
        results={"best": state["best"], "phases": phase_summaries(state, schedule),
                 "head_probe": state.get("head_probe"), "test": test})


def _views_seen(plan: _Plan, state: dict[str, Any]) -> Any:
    """What the saved weights were trained on: the views of the phase they come from (the
    head phase trains on the eval view unless --head-views K). Test-time views follow it."""
    from tlkit.data.views_seen import views_trained_on

    augment, phase = plan.config.augment, (state["best"] or {}).get("phase")
    probe = state.get("head_probe")
    if phase == "head" and probe:
        augmented, source = probe["views"] > 1, f"{probe['views']} view(s) of each image"
    elif plan.cache is not None:
        views = plan.cache.manifest["splits"]["train"]["views"]
        augmented, source = views > 1, f"a feature cache of {views} view(s) of each image"
    else:
        augmented, source = augment.random, "the training images, live"
    what = f"--augment {augment.preset} views" if augmented else "the eval view only"
    return views_trained_on(augment, augmented, f"the saved weights are from the {phase} "
                            f"phase, trained on {source}: {what}")


@dataclasses.dataclass
class _PhaseRunner:
    """What every phase shares; `run` trains one phase."""

    config: FinetuneConfig
    model: Any  # the whole classifier
    fit_model: Any  # what fit() trains: the classifier, or its tail over the feature cache
    base: Any
    plan: Any
    recorder: Any
    state: dict[str, Any]
    ckpt_dir: Path | None  # where checkpoints are (read on resume by every worker)
    writes: bool  # this process writes the run: the chief
    cache: Any
    train_examples: Any
    val_examples: Any
    crop_fraction: float
    transform: Any
    head_features: Any  # from --augment auto's search: the head phase's features, computed
    val_ds: Any
    val_steps: int  # batches in one pass over the validation split
    sample_weights: list[float] | None
    placement: Placement
    verbose: Any
    spec: Any = None  # the BackboneSpec: its stages set --stage-lr-decay's rates
    forward_per_image: float | None = None  # seconds, measured by the head phase's features

    def _forward_timed(self, per_image: float, total: int) -> None:
        self.forward_per_image = per_image
        log_estimate(per_image, total, len(self.train_examples), self.config.epochs)

    def _tensorboard(self) -> list[Any]:
        if not self.config.tensorboard or not self.writes or self.ckpt_dir is None:
            return []
        import keras

        return [keras.callbacks.TensorBoard(log_dir=str(self.ckpt_dir.parent / "tensorboard"))]

    def _probe(self) -> bool:
        """The head phase on pooled features (head.py); False when it must run live: under
        a multi-device strategy, or when one view's features would not fit in memory."""
        from tlkit.training.head import (
            MAX_FEATURE_BYTES,
            extract,
            feature_views,
            fit_head,
            head_steps,
            pooled_extractor,
        )

        config, state, n = self.config, self.state, len(self.train_examples)
        dim = int(self.model.get_layer("pool").output.shape[-1])
        if self.placement.replicas > 1 or n * dim * 4 > MAX_FEATURE_BYTES:
            log.info("phase head: trained live, epoch by epoch (%s)", "several replicas"
                     if self.placement.replicas > 1 else "the features would not fit in memory")
            return False
        lr = config.lr * config.lr_scale()
        frozen_bn = freeze_all(self.base)
        trainable, frozen = _param_counts(self.model)
        views = (self.head_features.views if self.head_features is not None else
                 feature_views(self.transform.config.random, config.head_views, n, dim))
        steps = head_steps(n, config.batch_size, config.head_epochs)
        log.info("phase head (head only, backbone frozen): %s trainable / %s frozen parameters, "
                 "%d frozen BatchNorm layers; the backbone runs once over %d view(s) of %d "
                 "training images and %d validation images, then the head trains %d steps on "
                 "the pooled features, keeping its best validation loss", f"{trainable:,}",
                 f"{frozen:,}", frozen_bn, views, n, len(self.val_examples), steps)
        features = self.head_features or extract(
            pooled_extractor(self.model), self.train_examples, self.val_examples,
            self.transform, self.crop_fraction, config.seed, views, config.batch_size,
            config.workers, config.audit.max_pixels,
            on_first_batch=self._forward_timed)
        self.head_features = None  # memory
        rows, steps_done = fit_head(self.model, features, lr, config.batch_size, steps,
                                    config.seed, self.sample_weights, config.label_smoothing)
        bad = [r for r in rows if not (math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]))]
        if bad:
            raise Diverged(f"phase head, check {bad[0]['epoch']}: the loss became "
                           f"{bad[0]['loss']} (val {bad[0]['val_loss']}); nothing was kept. "
                           "Lower --lr and start again")
        top = min(rows, key=lambda r: r["val_loss"])
        rows[-1]["seconds"] = round(rows[-1]["seconds"] + features.seconds, 3)
        state["rows"].extend(rows)
        state["best"] = {"val_loss": top["val_loss"], "val_accuracy": top["val_accuracy"],
                         "phase": "head", "epoch": top["epoch"]}
        state.update(phase="head", phase_index=0, epoch=len(rows), phase_done=True,
                     progress=len(state["rows"]), wait=0, phase_best=math.inf)
        state["phase_steps"]["head"] = steps_done
        state["head_probe"] = {"views": features.views, "augment": (
            self.transform.config.preset if features.views > 1 else "none (eval view)"),
            "feature_rows": len(features.train), "steps": steps_done,
            "feature_seconds": round(features.seconds, 1)}
        if self.writes and self.ckpt_dir is not None:
            save_epoch(self.ckpt_dir, self.model, None, state, True)
            write_history(self.ckpt_dir.parent / "history.csv", state["rows"])
        log.info("phase head: %d validation checks, %d feature rows, %d steps in %.1f s after "
                 "%.1f s of features; best val_loss %.4f, val_accuracy %.4f (check %d), restored",
                 len(rows), len(features.train), steps_done,
                 sum(r["seconds"] for r in rows) - features.seconds, features.seconds,
                 top["val_loss"], top["val_accuracy"], top["epoch"])
        return True

    def _best_head(self) -> None:
        """Fine-tuning starts from the best head, not the last: the one a live head phase kept
        in memory, or after a restart its checkpoint (best.h5, while the head holds the best)."""
        best = self.state.get("best") or {}
        if self.recorder.best_head is not None:
            self.model.set_weights(self.recorder.best_head)
            self.recorder.best_head = None
        elif "head_probe" not in self.state and best.get("phase") == "head" \
                and self.ckpt_dir is not None and (self.ckpt_dir / BEST).is_file():
            load_weights(self.ckpt_dir / BEST, self.model)  # a probe's last is its best

    def run(self, phase: str, index: int, epochs: int, lr: float, initial: int,
            phase_first: int) -> None:
        """Freeze, compile, restore the optimizer when resuming mid-phase, fit."""
        from tlkit.data.pipeline import steps_per_epoch, train_dataset
        from tlkit.models.model import optimizer_for
        from tlkit.training.optim import compile_args, describe, phase_optimizer

        config, plan, state = self.config, self.plan, self.state
        if phase == "head" and initial == 0 and self._probe():
            return
        if phase == "head":
            frozen_bn = freeze_all(self.base)
            what = "head only, backbone frozen"
        else:
            frozen_bn = apply_freeze(self.base, plan, config.train_bn)
            what = (f"{plan.request}: layers 0..{plan.n_frozen - 1} of {plan.n_layers} frozen"
                    if plan.n_frozen else f"{plan.request}: whole backbone trainable")
        trainable, frozen = _param_counts(self.model)  # the shared layers: same for the tail
        log.info("phase %s (%s): %s trainable / %s frozen parameters, %d frozen BatchNorm layers"
                 "%s", phase, what, f"{trainable:,}", f"{frozen:,}", frozen_bn,
                 "" if phase == "head" or not config.train_bn else " (--train-bn)")
        if phase != "head" and initial == 0:
            self._best_head()
        fit_model = self.fit_model
        steps = steps_per_epoch(len(self.train_examples), config.batch_size,
                                self.placement.replicas)
        optimizer = (phase_optimizer(fit_model, self.base, self.spec, config, steps)
                     if phase == "fine-tune" else optimizer_for(fit_model, lr))
        fit_model.compile(optimizer=optimizer, **compile_args(config.label_smoothing))
        if describe(config):
            log.info("phase %s: %s", phase, describe(config) if phase == "fine-tune" else
                     f"label smoothing {config.label_smoothing:g}")
        if initial > 0 and self.ckpt_dir is not None:  # mid-phase: moments, step count, rate
            fit_model.optimizer.build(fit_model.trainable_variables)
            path, _ = latest_checkpoint(self.ckpt_dir)
            load_checkpoint(path, self.model, fit_model.optimizer)
            log.info("phase %s: continuing at epoch %d of %d", phase, initial + 1, epochs)
        self.recorder.phase, self.recorder.phase_index = phase, index
        window = {"first_epoch": phase_first + initial, "epochs": epochs - initial,
                  "workers": config.workers, "prefetch": config.prefetch,
                  "sample_weights": self.sample_weights}
        if self.cache is not None:
            train_ds = self.placement.dataset(lambda share: cache_dataset(
                self.cache, "train", config.batch_size, config.seed, **window, share=share))
        else:
            train_ds = self.placement.dataset(lambda share: train_dataset(
                self.train_examples, self.transform, config.batch_size, config.seed, **window,
                max_pixels=config.audit.max_pixels, share=share))
        val_seconds = (self.forward_per_image * len(self.val_examples)
                       if self.forward_per_image is not None and self.cache is None else None)
        timer = _step_timer(phase, epochs, initial, steps, val_seconds, state)
        fit_model.fit(train_ds, validation_data=self.val_ds, epochs=epochs, initial_epoch=initial,
                      steps_per_epoch=steps, validation_steps=self.val_steps,
                      callbacks=[timer, self.recorder, *self._tensorboard()],
                      verbose=self.verbose, shuffle=False)  # the dataset shuffles, seeded
        if self.recorder.diverged:
            last = state["rows"][-1] if state["rows"] else None
            kept = (f"the last good checkpoint (phase {last['phase']}, epoch {last['epoch']}) is "
                    f"kept in {self.ckpt_dir}" if last else "no epoch had finished")
            raise Diverged(f"{self.recorder.diverged}; training stopped and {kept}. Lower --lr "
                           "or --fine-tune-lr, then resume with --force-resume and the new "
                           "rate, or start again")
        phase_rows = [r for r in state["rows"] if r["phase"] == phase]
        top = min(phase_rows, key=lambda r: r.get("val_loss", math.inf))
        log.info("phase %s: %d epochs%s, best val_loss %.4f, val_accuracy %.4f (epoch %d)",
                 phase, len(phase_rows), " (early stop)" if len(phase_rows) < epochs else "",
                 top.get("val_loss", math.nan), top.get("val_accuracy", math.nan), top["epoch"])


def log_estimate(per_image: float, head_images: int, n_train: int, epochs: int) -> None:
    """The head phase's time from the measured forward pass, said before it runs; the fine-tune
    phase is timed on its own first training steps (`_step_timer`), since what a step costs
    depends on the freeze point, the cache and the input pipeline, not only on the model."""
    later = (f"; the fine-tune phase ({epochs} epoch(s) of {n_train} images) is timed on its "
             "first training steps" if epochs else "")
    log.info("estimate from the first batches (%.1f ms per image through the model): head phase "
             "about %s (%d forward passes)%s.", 1000 * per_image,
             _duration(per_image * head_images), head_images, later)


# Training steps timed at the start of a phase. The first traces the graph, and the next few
# find batches the input pipeline prefetched meanwhile, which makes them look cheap.
SKIPPED_STEPS, TIMED_STEPS = 3, 8


def _step_timer(phase: str, epochs: int, initial: int, steps: int, val_seconds: float | None,
                state: dict[str, Any]) -> Any:
    """Times real training steps at the start of a fit() phase and says how long the phase
    will take: steps x epochs, plus the validation pass. Recorded in the state so run.json
    shows the estimate beside the measured time."""
    import keras

    warm = min(SKIPPED_STEPS, steps - 1) if steps > 4 else min(1, steps - 1)
    count = max(1, min(TIMED_STEPS, steps - warm))

    class StepTimer(keras.callbacks.Callback):
        start: float | None = None
        first: float | None = None  # when the first step began: its tracing is paid once
        done = False

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if self.first is None:
                self.first = time.perf_counter()
            if not self.done and batch == warm and self.start is None:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.done or self.start is None or batch < warm + count - 1:
                return
            self.done = True
            step = (time.perf_counter() - self.start) / count
            epoch = step * steps + (val_seconds or 0.0)
            tracing = max(0.0, (self.start - self.first) - warm * step)
            total = epoch * (epochs - initial) + tracing
            state.setdefault("estimates", {})[phase] = {
                "step_seconds": round(step, 4), "epoch_seconds": round(epoch, 3),
                "phase_seconds": round(total, 2),
                "validation_included": val_seconds is not None}
            advice = ""
            if total > 1800:
                advice = (" That is long: --freeze all (head only) or a higher --freeze, a "
                          "smaller --input-size, fewer --epochs or a GPU make it shorter.")
            val = (f" and a validation pass of about {_duration(val_seconds)}"
                   if val_seconds is not None else ", plus validation")
            log.info("phase %s: %.0f ms per training step (timed over %d step(s)): %d steps%s "
                     "an epoch, about %s; up to about %s for %d epoch(s), early stopping may "
                     "end it sooner.%s", phase, 1000 * step, count, steps, val,
                     _duration(epoch), _duration(total), epochs - initial, advice)

    return StepTimer()


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def phase_summaries(state: dict[str, Any], schedule: list[tuple[str, int, float]]
                    ) -> list[dict[str, Any]]:
    """Per phase, from the checkpointed history: the same whether or not the run was resumed."""
    out = []
    for phase, epochs, _ in schedule:
        rows = [r for r in state["rows"] if r["phase"] == phase]
        if not rows:
            continue
        top = min(rows, key=lambda r: r.get("val_loss", math.inf))
        out.append({"phase": phase, "epochs_run": len(rows), "best_epoch": top["epoch"],
                    "best_val_loss": top.get("val_loss"),
                    "best_val_accuracy": top.get("val_accuracy"),
                    "seconds": round(sum(r["seconds"] for r in rows), 1),
                    "early_stopped": len(rows) < epochs,
                    "estimated_seconds": state.get("estimates", {}).get(
                        phase, {}).get("phase_seconds"),
                    "optimizer_steps": state["phase_steps"][phase]})
    return out
