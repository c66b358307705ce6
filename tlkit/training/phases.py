"""The two phases of `finetune`. Phase 1 trains only the new head with the whole backbone
frozen: as a probe on pooled features when it can (tlkit.training.head), else live. Phase 2
unfreezes everything after the freeze point and trains it at a much lower rate. Every epoch is
recorded and checkpointed by one callback, whose counters are part of the saved state."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from tlkit.core import selection
from tlkit.core.checkpoints import (
    BEST,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    save_epoch,
)
from tlkit.core.errors import RunError
from tlkit.core.records import HistoryRow
from tlkit.features.cache import cache_dataset
from tlkit.models.distribute import Placement
from tlkit.models.freezing import apply_freeze, freeze_all
from tlkit.models.model import POOL_LAYER
from tlkit.training.input_wait import InputClock
from tlkit.training.input_wait import describe as describe_wait
from tlkit.training.state import HISTORY_FIELDS, TrainingState, write_history
from tlkit.training.timing import log_estimate, step_timer

if TYPE_CHECKING:
    import keras

    from tlkit.features.rows import Features
    from tlkit.training.plan import Plan

log = logging.getLogger("tlkit")


class Diverged(RunError):
    """The loss became NaN or infinite: more epochs would only spread it."""


def _not_finite(logs: dict[str, Any]) -> str | None:
    bad = [k for k in ("loss", "val_loss") if not math.isfinite(logs.get(k, 0.0))]
    return f"{bad[0]} became {logs[bad[0]]}" if bad else None


def _number(variable: Any) -> float:
    import keras

    return float(keras.ops.convert_to_numpy(variable))


def _history_row(
    phase: str,
    epoch: int,
    optimizer: Any,
    logs: dict[str, Any],
    start: float,
    clock: InputClock | None,
) -> HistoryRow:
    """One epoch's row of history.csv, from Keras' logs (untyped: the one place a row is cast
    to its record); its input wait goes to the log too."""
    row: dict[str, Any] = {"phase": phase, "epoch": epoch + 1}
    row["lr"] = _number(optimizer.learning_rate)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row.update({k: float(logs[k]) for k in HISTORY_FIELDS if k in logs})
    if clock is not None:
        figures = clock.epoch_figures()
        row.update(figures)
        log.info("phase %s, epoch %d: %s", phase, epoch + 1, describe_wait(figures))
    return cast(HistoryRow, row)


def make_recorder(
    ckpt_dir: Path | None,
    history_path: Path | None,
    model: keras.Model,
    patience: int,
    state: TrainingState,
    clock: InputClock | None = None,
) -> keras.callbacks.Callback:
    """`model` is the whole classifier, also when training runs on its tail from the cache;
    `state` is updated in place and saved with every checkpoint. Workers other than the chief
    pass no `ckpt_dir`: they keep the same state and write nothing. `clock` times the input
    wait of each epoch's steps."""
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
            self.diverged = self.diverged or _not_finite(logs)
            if self.diverged is not None:
                self.diverged = f"phase {self.phase}, epoch {epoch + 1}: {self.diverged}"
                self.model.stop_training = True
                return  # nothing from this epoch is kept: the last checkpoint is the good one
            optimizer = self.model.optimizer
            row = _history_row(self.phase, epoch, optimizer, logs, self._start, clock)
            stop, improved = state.advance(row, patience)
            self.model.stop_training = stop
            if improved and self.phase == "head":
                self.best_head = model.get_weights()  # every worker: phase 2 starts from it
            state.phase, state.phase_index, state.epoch = self.phase, self.phase_index, epoch + 1
            state.phase_done = stop or epoch + 1 == self.params["epochs"]
            state.progress = len(state.rows)
            state.phase_steps[self.phase] = int(_number(optimizer.iterations))
            if ckpt_dir is not None and history_path is not None:
                save_epoch(ckpt_dir, model, optimizer, state.as_dict(), improved)
                write_history(history_path, state.rows)

    return EpochRecorder()


@dataclasses.dataclass
class PhaseRunner:
    """What both phases share; `run` trains one phase."""

    plan: Plan
    placement: Placement
    state: TrainingState
    recorder: Any  # make_recorder's callback
    ckpt_dir: Path | None  # where checkpoints are (read on resume by every worker)
    writes: bool  # this process writes the run: the chief
    val_ds: Any  # a tf.data.Dataset, or a distributed one
    verbose: int
    head_features: Features | None = None  # from a search: the head phase's features
    forward_per_image: float | None = None  # seconds, measured by the head phase's features
    clock: InputClock = dataclasses.field(default_factory=InputClock)  # the input wait
    callbacks: tuple[Any, ...] = ()  # the user's Keras callbacks (finetune's `callbacks`)

    @property
    def val_steps(self) -> int:
        """Batches in one pass over the validation split."""
        return -(-len(self.plan.split("val")) // self.plan.config.loader.batch_size)

    def run(
        self, phase: str, index: int, epochs: int, lr: float, initial: int, phase_first: int
    ) -> None:
        """Freeze, compile, restore the optimizer when resuming mid-phase, fit."""
        if phase == "head" and initial == 0 and self._probe():
            return
        self._freeze(phase)
        if phase != "head" and initial == 0:
            self._best_head()
        steps = self._compile(phase, lr)
        fit_model = self.plan.feed.fit_model
        if initial > 0 and self.ckpt_dir is not None:  # mid-phase: moments, step count, rate
            fit_model.optimizer.build(fit_model.trainable_variables)
            found = latest_checkpoint(self.ckpt_dir)
            if found is None:
                raise RunError(f"{self.ckpt_dir}: no readable checkpoint to continue from")
            load_checkpoint(found[0], self.plan.start.model, fit_model.optimizer)
            log.info("phase %s: continuing at epoch %d of %d", phase, initial + 1, epochs)
        self.recorder.phase, self.recorder.phase_index = phase, index
        timer = step_timer(phase, epochs, initial, steps, self._val_seconds(), self.state.estimates)
        fit_model.fit(
            self._train_dataset(phase_first + initial, epochs - initial),
            validation_data=self.val_ds,
            epochs=epochs,
            initial_epoch=initial,
            steps_per_epoch=steps,
            validation_steps=self.val_steps,
            callbacks=[
                self.clock.callback(),
                timer,
                *self._precise_bn(phase),
                self.recorder,
                *self._tensorboard(),
                *self.callbacks,
            ],
            verbose=self.verbose,
            shuffle=False,
        )  # the dataset shuffles, seeded
        self._after(phase, epochs)

    def _precise_bn(self, phase: str) -> list[Any]:
        """Random weights with BatchNorm training: its statistics recomputed before each
        validation (precise_bn.py says why)."""
        plan, c = self.plan, self.plan.config
        if phase == "head" or not c.fit.train_bn or plan.start.weights.source != "none":
            return []
        from tlkit.features.rows import bn_batches, pooled_extractor
        from tlkit.training.precise_bn import PreciseBatchNorm

        train, crop = plan.split("train"), plan.start.spec.crop_fraction
        batches = list(bn_batches(train, plan.start.size, crop, c.loader.max_pixels))
        log.info(
            "phase %s: BatchNorm statistics recomputed from %d training images before each "
            "validation (random weights)",
            phase,
            sum(len(b) for b in batches),
        )
        return [PreciseBatchNorm(pooled_extractor(plan.start.model), batches)]

    def _freeze(self, phase: str) -> None:
        plan, config = self.plan, self.plan.config
        if phase == "head":
            frozen_bn = freeze_all(plan.start.base)
            what = "head only, backbone frozen"
        else:
            frozen_bn = apply_freeze(plan.start.base, plan.chosen.freeze, config.fit.bn_trains)
            freeze = plan.chosen.freeze
            what = (
                f"{freeze.request}: layers 0..{freeze.n_frozen - 1} of {freeze.n_layers} frozen"
                if freeze.n_frozen
                else f"{freeze.request}: whole backbone trainable"
            )
        trainable, frozen = param_counts(plan.start.model)  # the shared layers: same for the tail
        log.info(
            "phase %s (%s): %s trainable / %s frozen parameters, %d frozen BatchNorm layers%s",
            phase,
            what,
            f"{trainable:,}",
            f"{frozen:,}",
            frozen_bn,
            "" if phase == "head" or not config.fit.train_bn else " (BatchNorm trains)",
        )

    def _compile(self, phase: str, lr: float) -> int:
        """Compile the model fit() trains for `phase`; its steps per epoch."""
        from tlkit.data.pipeline import steps_per_epoch
        from tlkit.models.model import optimizer_for
        from tlkit.training.optim import compile_args, describe, phase_optimizer

        plan, config = self.plan, self.plan.config
        steps = steps_per_epoch(
            len(plan.split("train")), config.loader.batch_size, self.placement.replicas
        )
        optimizer = (
            phase_optimizer(plan.feed.fit_model, plan.start.base, plan.start.spec, config, steps)
            if phase == "fine-tune"
            else optimizer_for(plan.feed.fit_model, lr)
        )
        plan.feed.fit_model.compile(optimizer=optimizer, **compile_args(config.fit.label_smoothing))
        if describe(config):
            log.info(
                "phase %s: %s",
                phase,
                describe(config)
                if phase == "fine-tune"
                else f"label smoothing {config.fit.label_smoothing:g}",
            )
        return steps

    def _train_dataset(self, first_epoch: int, epochs: int) -> Any:
        from tlkit.data.pipeline import train_dataset

        plan, config = self.plan, self.plan.config
        loader, window = config.loader, range(first_epoch, first_epoch + epochs)
        weights = plan.feed.sample_weights
        if plan.feed.cache is not None:
            cache = plan.feed.cache
            return self.placement.dataset(
                lambda share: self.clock.stamped(
                    cache_dataset(cache, "train", loader, window, share, weights)
                )
            )
        inputs, transform = plan.inputs("train"), plan.feed.transform
        return self.placement.dataset(
            lambda share: self.clock.stamped(
                train_dataset(inputs, transform, loader, window, share, weights)
            )
        )

    def _val_seconds(self) -> float | None:
        if self.forward_per_image is None or self.plan.feed.cache is not None:
            return None
        return self.forward_per_image * len(self.plan.split("val"))

    def _after(self, phase: str, epochs: int) -> None:
        """Stop on a divergence; else say how the phase went."""
        state = self.state
        if self.recorder.diverged:
            last = state.rows[-1] if state.rows else None
            kept = (
                f"the last good checkpoint (phase {last['phase']}, epoch {last['epoch']}) is "
                f"kept in {self.ckpt_dir}"
                if last
                else "no epoch had finished"
            )
            raise Diverged(
                f"{self.recorder.diverged}; training stopped and {kept}. Lower --lr "
                "or --fine-tune-lr, then resume with --force-resume and the new "
                "rate, or start again"
            )
        phase_rows = state.rows_of(phase)
        top = selection.CRITERION.best(phase_rows) or phase_rows[0]
        log.info(
            "phase %s: %d epochs%s, best val_loss %.4f, val_accuracy %.4f (epoch %d)",
            phase,
            len(phase_rows),
            " (early stop)" if len(phase_rows) < epochs else "",
            top.get("val_loss", math.nan),
            top.get("val_accuracy", math.nan),
            top["epoch"],
        )

    def _tensorboard(self) -> list[Any]:
        if not self.plan.config.tensorboard or not self.writes or self.ckpt_dir is None:
            return []
        import keras

        return [keras.callbacks.TensorBoard(log_dir=str(self.ckpt_dir.parent / "tensorboard"))]

    def _forward_timed(self, per_image: float, total: int) -> None:
        self.forward_per_image = per_image
        log_estimate(per_image, total, len(self.plan.split("train")), self.plan.config.fit.epochs)

    def _probe(self) -> bool:
        """The head phase on pooled features (head.py); False when it must run live: under
        a multi-device strategy, or when one view's features would not fit in memory."""
        from tlkit.training.head import MAX_FEATURE_BYTES, HeadFit, fit_head

        plan, config = self.plan, self.plan.config
        n, dim = (
            len(plan.split("train")),
            int(plan.start.model.get_layer(POOL_LAYER).output.shape[-1]),
        )
        if self.placement.replicas > 1 or n * dim * 4 > MAX_FEATURE_BYTES:
            log.info(
                "phase head: trained live, epoch by epoch (%s)",
                "several replicas"
                if self.placement.replicas > 1
                else "the features would not fit in memory",
            )
            return False
        features = self._head_features(n, dim, freeze_all(plan.start.base))
        fit = HeadFit.of(config, n)
        rows, steps_done = fit_head(plan.start.model, features, fit, plan.feed.sample_weights)
        bad = [r for r in rows if not (math.isfinite(r["loss"]) and math.isfinite(r["val_loss"]))]
        if bad:
            raise Diverged(
                f"phase head, check {bad[0]['epoch']}: the loss became "
                f"{bad[0]['loss']} (val {bad[0]['val_loss']}); nothing was kept. "
                "Lower --lr and start again"
            )
        self._record_probe(rows, steps_done, features)
        return True

    def _head_features(self, n: int, dim: int, frozen_bn: int) -> Features:
        """Say what the probe trains, then compute its features (or take a search's)."""
        from tlkit.features.rows import extract, pooled_extractor
        from tlkit.training.head import feature_views, head_steps

        plan, config = self.plan, self.plan.config
        trainable, frozen = param_counts(plan.start.model)
        views = (
            self.head_features.views
            if self.head_features is not None
            else feature_views(plan.feed.transform.config.random, config.fit.head_views, n, dim)
        )
        log.info(
            "phase head (head only, backbone frozen): %s trainable / %s frozen parameters, "
            "%d frozen BatchNorm layers; the backbone runs once over %d view(s) of %d "
            "training images and %d validation images, then the head trains %d steps on "
            "the pooled features, keeping its best validation loss",
            f"{trainable:,}",
            f"{frozen:,}",
            frozen_bn,
            views,
            n,
            len(plan.split("val")),
            head_steps(n, config.loader.batch_size, config.fit.head_epochs),
        )
        features = self.head_features or extract(
            pooled_extractor(plan.start.model),
            plan.split("train"),
            plan.split("val"),
            plan.feed.transform,
            views,
            config.loader,
            on_first_batch=self._forward_timed,
        )
        self.head_features = None  # memory
        return features

    def _record_probe(self, rows: list[HistoryRow], steps_done: int, features: Features) -> None:
        """The probe's checks become the head phase's rows, its best the run's best so far."""
        state = self.state
        top = selection.CRITERION.best(rows) or rows[0]
        rows[-1]["seconds"] = round(rows[-1]["seconds"] + features.seconds, 3)
        state.rows.extend(rows)
        state.best = {
            "val_loss": top["val_loss"],
            "val_accuracy": top["val_accuracy"],
            "phase": "head",
            "epoch": top["epoch"],
        }
        state.phase, state.phase_index, state.epoch, state.phase_done = "head", 0, len(rows), True
        state.progress, state.wait, state.phase_best = len(state.rows), 0, math.inf
        state.phase_steps["head"] = steps_done
        state.head_probe = {
            "views": features.views,
            "augment": (
                self.plan.feed.transform.config.preset if features.views > 1 else "none (eval view)"
            ),
            "feature_rows": len(features.train),
            "steps": steps_done,
            "feature_seconds": round(features.seconds, 1),
        }
        if self.writes and self.ckpt_dir is not None:
            save_epoch(self.ckpt_dir, self.plan.start.model, None, state.as_dict(), True)
            write_history(self.ckpt_dir.parent / "history.csv", state.rows)
        log.info(
            "phase head: %d validation checks, %d feature rows, %d steps in %.1f s after "
            "%.1f s of features; best val_loss %.4f, val_accuracy %.4f (check %d), restored",
            len(rows),
            len(features.train),
            steps_done,
            sum(r["seconds"] for r in rows) - features.seconds,
            features.seconds,
            top["val_loss"],
            top["val_accuracy"],
            top["epoch"],
        )

    def _best_head(self) -> None:
        """Fine-tuning starts from the best head, not the last: the one a live head phase kept
        in memory, or after a restart its checkpoint (best.h5, while the head holds the best)."""
        best = self.state.best
        if self.recorder.best_head is not None:
            self.plan.start.model.set_weights(self.recorder.best_head)
            self.recorder.best_head = None
        elif (
            self.state.head_probe is None
            and best is not None
            and best["phase"] == "head"
            and self.ckpt_dir is not None
            and (self.ckpt_dir / BEST).is_file()
        ):
            load_weights(self.ckpt_dir / BEST, self.plan.start.model)  # a probe's last is its best


def param_counts(model: keras.Model) -> tuple[int, int]:
    from tlkit.models.model import count_params

    return count_params(model.trainable_weights), count_params(model.non_trainable_weights)
