"""`finetune`: the two-phase recipe of the Keras transfer-learning guide, into a run directory.

Phase 1 trains only the new head with the whole backbone frozen, so large random gradients never
reach pretrained weights. Phase 2 unfreezes everything after the freeze point and trains it at a
much lower rate. The model with the best validation score over both phases (the selection
criterion, tlkit/core/selection.py: the lowest validation loss) is the one saved.

The plan (plan.py), the phases (phases.py), the state they carry (state.py), resuming
(resume.py) and what the run records (record.py) live beside this module, which opens the run
folder, trains, and publishes it whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlkit.core.checkpoints import (
    PREVIOUS,
    SEARCH,
    load_checkpoint,
    remove_stale_temporaries,
    restore,
    write_checkpoint,
)
from tlkit.core.errors import ConfigError, Interrupted, RunError
from tlkit.core.fsutil import (
    FolderBusy,
    atomic_path,
    atomic_write,
    atomic_write_json,
    claim,
    find_incomplete,
    folder_bytes,
    incomplete_dir,
    publish_dir,
    refuse_overwrite,
    release,
)
from tlkit.core.runs import RUN_FILE, RUNS_DIR, Run, load_run
from tlkit.data.preflight import Checked, check_inputs, is_chief
from tlkit.features.cache import cache_dataset
from tlkit.models.distribute import Placement, Share
from tlkit.training.config import FinetuneConfig
from tlkit.training.input_wait import InputClock
from tlkit.training.phases import PhaseRunner, make_recorder
from tlkit.training.plan import Call, Plan, make_plan
from tlkit.training.record import (
    SEARCH_TABLE,
    calibrate,
    inference_model,
    run_record,
    saved_checkpoint,
    score_on_test,
    write_search_table,
)
from tlkit.training.resume import IDENTITY_FILE, Identity, find_resumable, read_identity
from tlkit.training.state import Schedule, TrainingState, write_history

if TYPE_CHECKING:
    from tlkit.models.model import Head

log = logging.getLogger("tlkit")


def default_run_dir(backbone: str) -> Path:
    return Path(RUNS_DIR) / f"{backbone}-{datetime.now():%Y%m%d-%H%M%S}"


@dataclass(frozen=True)
class Folders:
    """A run's folders: where it is published, where the chief builds it (None on the other
    workers), and its checkpoints (which every worker reads when resuming)."""

    run: Path
    building: Path | None
    checkpoints: Path | None


def finetune(
    config: FinetuneConfig | None = None,
    verbose: int | str = "auto",
    resume: str | os.PathLike[str] | None = None,
    force_resume: bool = False,
    callbacks: Sequence[Any] = (),
    head: Head | None = None,
) -> Run | None:
    """Train a classifier on `config.data`; return the finished run.

    Args:
        config: the settings (FinetuneConfig); with `resume`, None means the settings the
            interrupted run started with.
        verbose: Keras' verbosity, 0, 1 or 2; "auto": 1 on a terminal, else 2.
        resume: an interrupted run (its folder) to continue from its last checkpoint.
        force_resume: resume even though something that changes what is learned (settings,
            class map, preprocessing, data) differs from what the run started with.
        callbacks: Keras callbacks added to every phase trained with `fit()`: the fine-tune
            phase, and the head phase where it runs live (the head probe on cached features is
            a loop of its own and calls none). tlkit's own come first: a callback sees the
            epoch's logs after tlkit has recorded and checkpointed it.
        head: `head(pooled, num_classes)` -> class probabilities, Keras layers on the pooled
            backbone features in place of tlkit's dropout + softmax Dense (`--dropout` is
            then unused). Its output must sum to one; it is trained like tlkit's (the head
            probe, then with the backbone), saved in model.keras (Keras' own layers: it must
            load in safe mode), and recorded by its name and layers (a resume must pass the
            same). `--calibrate` needs a last softmax Dense layer, the activation maps a
            softmax Dense on the pooled features (tlkit's head).

    Under a multi-worker strategy every worker calls this; the chief writes and returns the
    run, the others None.
    """
    config, run_dir, tmp_dir, identity = _start(config, resume)
    checked = _check(config, run_dir, new=identity is None)
    from tlkit.models.distribute import make_placement

    placement = make_placement(config.strategy)  # before any other TensorFlow work
    if tmp_dir is not None and placement.is_chief:
        try:
            claim(tmp_dir)
        except FolderBusy:
            raise RunError(
                f"{tmp_dir}: another process is training this run right now; wait "
                "for it, or stop it first"
            ) from None
    if placement.name != "default":
        log.info("strategy: %s", placement.describe())
    try:
        with contextlib.ExitStack() as scope:
            scope.enter_context(placement.strategy.scope())
            if verbose == "auto":
                verbose = 1 if os.isatty(1) else 2
            call = Call(int(verbose), force_resume, tuple(callbacks), head)
            plan = make_plan(config, checked, placement, identity, tmp_dir, call)
            return _finetune(plan, placement, run_dir, tmp_dir, call, scope)
    except BaseException:
        for folder in find_incomplete(run_dir):  # interrupted: resumable, by anyone, now
            release(folder)
        raise


def _start(
    config: FinetuneConfig | None, resume: str | os.PathLike[str] | None
) -> tuple[FinetuneConfig, Path, Path | None, Identity | None]:
    """(settings, run folder, the interrupted run's folder, what it started with): a new run's,
    or a resumed one's."""
    if resume is not None:
        tmp_dir, run_dir = find_resumable(resume)
        identity = read_identity(tmp_dir)
        return (config or FinetuneConfig.from_dict(identity.config)), run_dir, tmp_dir, identity
    if config is None:
        raise TypeError("finetune() needs a config, or resume= to continue a run")
    run_dir = Path(config.output) if config.output else default_run_dir(config.model.backbone)
    return config, run_dir, None, None


def _check(config: FinetuneConfig, run_dir: Path, new: bool) -> Checked:
    """Everything that can be refused before TensorFlow loads: the data's listing, the
    backbone and freeze request, a run folder in the way (a new run's), TensorBoard missing."""
    checked = check_inputs(config.data, config.model, config.val_fraction)
    if new and is_chief():
        refuse_overwrite(
            run_dir,
            config.overwrite,
            "choose another -o/--output or pass --overwrite",
            kind="run",
            inputs=local_inputs(config),
        )
        check_outside_data(config, run_dir)
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs TensorBoard: pip install 'tlkit[tensorboard]'")
    return checked


def local_inputs(config: FinetuneConfig) -> tuple[Path, ...]:
    """The files a run is made from, which its folder must never replace or sit inside: the
    data (a CSV's folder) and a weights file or run."""
    if config.data.startswith("tfds:"):
        return ()
    data = Path(config.data)
    data = data.parent if data.suffix.lower() == ".csv" else data
    weights = () if config.model.weights in ("imagenet", "none") else (Path(config.model.weights),)
    return (data, *weights)


def check_outside_data(config: FinetuneConfig, run_dir: Path) -> None:
    """A data folder reads every sub-folder as a class (a CSV lists its files: no such risk)."""
    data = Path(config.data)
    if data.is_dir() and run_dir.resolve().is_relative_to(data.resolve()):
        raise ConfigError(
            f"-o/--output {run_dir}: inside the data folder {data}, where "
            "the run would be read as images of a class; choose a folder outside it"
        )


def _finetune(
    plan: Plan,
    placement: Placement,
    run_dir: Path,
    tmp_dir: Path | None,
    call: Call,
    scope: contextlib.ExitStack,
) -> Run | None:
    """finetune() in the strategy's `scope`, planned: train, record. Every worker trains; only
    the chief writes."""
    config = plan.config
    state, folders = _open_run_dir(plan, placement, run_dir, tmp_dir)
    tmp_dir, ckpt_dir = folders.building, folders.checkpoints
    schedule = plan.schedule()
    _train(plan, placement, state, folders, schedule, call)
    scope.close()  # saving inside it would start collective ops the other workers never join
    if not placement.is_chief:
        log.info("worker %d: done; the chief writes %s", placement.worker, run_dir)
        return None
    if tmp_dir is None or ckpt_dir is None:
        raise RuntimeError("the chief has no run folder")  # a bug, not bad input
    if state.best is None:
        raise RunError(
            f"{tmp_dir}: no epoch finished with a finite validation loss; nothing to save"
        )
    test = _write_run(plan, placement, state, schedule, tmp_dir, ckpt_dir)
    try:
        publish_dir(tmp_dir, run_dir, overwrite=config.overwrite)
    except FileExistsError:
        raise RunError(
            f"{run_dir}: appeared while training; the finished run is in {tmp_dir}"
        ) from None
    _report(run_dir, state, test)
    return load_run(run_dir)


def _write_run(
    plan: Plan,
    placement: Placement,
    state: TrainingState,
    schedule: Schedule,
    tmp_dir: Path,
    ckpt_dir: Path,
) -> dict[str, Any] | None:
    """The best model and everything recorded about it, into the folder being built; the
    test score, when there is a test split."""
    from tlkit.training.curves import training_curves_png

    load_checkpoint(saved_checkpoint(plan, state, ckpt_dir), plan.start.model)
    calibration = calibrate(plan) if plan.config.calibrate else None
    test = score_on_test(plan)
    with atomic_path(tmp_dir / "model.keras") as tmp:
        inference_model(plan.start.model).save(tmp)
    atomic_write(tmp_dir / "training_curves.png", training_curves_png(state.rows))
    atomic_write_json(
        tmp_dir / RUN_FILE,
        run_record(plan, placement, state, schedule, calibration, test).as_dict(),
    )
    if plan.chosen.searched:
        write_search_table(tmp_dir / SEARCH_TABLE, plan.chosen.searched)
    for name in (PREVIOUS, SEARCH):  # needed only while a crash could damage `last` / to compare
        with contextlib.suppress(FileNotFoundError):
            (ckpt_dir / name).unlink()
    return test


def _write_search_model(plan: Plan, ckpt_dir: Path) -> None:
    """The search's trained tail, beside the checkpoints from the run's start, so that a
    resumed run still has it to compare at its end."""
    if plan.chosen.search_model is None:
        return
    score = next(s for s in plan.chosen.searched["freeze"]["scores"] if s["chosen"])
    start = plan.start.model.get_weights()
    plan.start.model.set_weights(plan.chosen.search_model)
    write_checkpoint(ckpt_dir / SEARCH, plan.start.model, None, score)
    plan.start.model.set_weights(start)


def _report(run_dir: Path, state: TrainingState, test: dict[str, Any] | None) -> None:
    """The run's last lines: where it is and its size, its test score, and a fine-tune phase
    that bought nothing."""
    best: Mapping[str, Any] = state.best or {}
    log.info(
        "saved %s (%.1f MB; best val_accuracy %.4f, %s epoch %s)",
        run_dir,
        folder_bytes(run_dir) / 1e6,
        best.get("val_accuracy") or math.nan,
        best.get("phase"),
        best.get("epoch"),
    )
    if test is not None:
        log.info(
            "test: top-1 %.4f on %d images (single crop; `tlkit eval %s --multicrop` for "
            "test-time views)",
            test["accuracy"],
            test["images"],
            run_dir,
        )
    wasted = state.fine_tune_wasted()
    if wasted:
        log.warning("%s", wasted)


def _open_run_dir(
    plan: Plan, placement: Placement, run_dir: Path, tmp_dir: Path | None
) -> tuple[TrainingState, Folders]:
    """(training state, the run's folders): a new one, or the interrupted one restored from its
    last checkpoint (by every worker)."""
    chief = placement.is_chief
    state = TrainingState()
    if tmp_dir is None:
        tmp_dir = incomplete_dir(run_dir, "run") if chief else None
        ckpt_dir = tmp_dir / "checkpoints" if tmp_dir is not None else None
        if ckpt_dir is not None:  # the search's model first: the identity makes it resumable
            _write_search_model(plan, ckpt_dir)
            found = dataclasses.replace(plan.start.identity, searched=plan.chosen.searched)
            atomic_write_json(ckpt_dir / IDENTITY_FILE, found.as_dict())
    else:  # every worker restores from the run's folder (under multiworker: a shared one)
        ckpt_dir = tmp_dir / "checkpoints"
        state = _restore(plan, tmp_dir, ckpt_dir, chief)
    if chief and tmp_dir is not None:
        atomic_write_json(tmp_dir / "data_report.json", plan.start.report.as_dict())
        log.info(
            "building the run in %s; if it is interrupted, `tlkit finetune --resume %s` "
            "continues it",
            tmp_dir,
            run_dir,
        )
    else:
        log.info(
            "worker %d: training in step with the chief, which writes the run", placement.worker
        )
    return state, Folders(run_dir, tmp_dir, ckpt_dir)


def _restore(plan: Plan, tmp_dir: Path, ckpt_dir: Path, chief: bool) -> TrainingState:
    """The interrupted run's model and state from its last checkpoint (the optimizer follows
    once it is built)."""
    if chief:
        remove_stale_temporaries(ckpt_dir)
    found = restore(ckpt_dir, plan.start.model)
    state = TrainingState()
    if found is not None:
        path, saved = found
        state = TrainingState.from_dict(saved)
        log.info(
            "resuming %s from %s: phase %s, epoch %d done, %d optimizer steps",
            tmp_dir,
            path.name,
            state.phase,
            state.epoch,
            state.phase_steps.get(state.phase or "", 0),
        )
    else:
        log.info("resuming %s: it had no checkpoint yet; starting from the first epoch", tmp_dir)
    state.resumed = [*state.resumed, datetime.now(UTC).isoformat(timespec="seconds")]
    if chief:
        write_history(tmp_dir / "history.csv", state.rows)
    return state


def _val_dataset(plan: Plan, placement: Placement) -> Any:
    """One pass, with validation_steps its length, so Keras never has to find the end of a
    distributed dataset (whose length it cannot see). Keras resets the validation iterator
    before every pass; a repeated one would keep decoding batches in the background during
    training only to discard them, then wait for them (measured: 1.8 to 3.8 s an epoch on
    the feature-cache example of docs/training.md, a third of its epoch). Repeated only under
    a strategy, where Keras takes one batch from the previous pass's iterator before it resets
    it."""
    c, cache = plan.config, plan.feed.cache

    def build(share: Share) -> Any:
        if cache is not None:
            return cache_dataset(cache, "val", c.loader, None, share)
        return plan.eval_dataset("val", share)

    if placement.name == "default":
        return placement.dataset(build)
    return placement.dataset(lambda share: build(share).repeat())


def _train(
    plan: Plan,
    placement: Placement,
    state: TrainingState,
    folders: Folders,
    schedule: Schedule,
    call: Call,
) -> None:
    """Both phases, skipping what a resumed run had finished."""
    tmp_dir, ckpt_dir, run_dir = folders.building, folders.checkpoints, folders.run
    writes = ckpt_dir if placement.is_chief else None
    clock = InputClock()
    recorder = make_recorder(
        writes,
        tmp_dir / "history.csv" if writes and tmp_dir else None,
        plan.start.model,
        plan.config.fit.patience,
        state,
        clock,
    )
    phases = PhaseRunner(
        plan,
        placement,
        state,
        recorder,
        ckpt_dir,
        writes is not None,
        _val_dataset(plan, placement),
        call.verbose,
        plan.chosen.head_features,
        clock=clock,
        callbacks=call.callbacks,
    )
    first_epoch = 0  # global epoch counter: every epoch of both phases draws new augmentations
    try:
        for index, (phase, epochs, lr) in enumerate(schedule):
            phase_first, first_epoch = first_epoch, first_epoch + epochs
            done = state.phase_index > index or (state.phase_index == index and state.phase_done)
            if epochs == 0 or done:
                continue
            initial = state.epoch if state.phase_index == index else 0
            if initial == 0:
                state.wait, state.phase_best = 0, math.inf
            phases.run(phase, index, epochs, lr, initial, phase_first)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; the checkpoints in {ckpt_dir} are intact: "
            f"`tlkit finetune --resume {run_dir}` continues from the last finished "
            "epoch"
        ) from None
