"""Checkpoints survive a crash at any point, and `best` never gets worse."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from tlkit.core import checkpoints
from tlkit.core.checkpoints import latest_checkpoint, read_state, restore, save_epoch
from tlkit.training.phases import make_recorder
from tlkit.training.state import TrainingState


def tiny_model(compiled: bool = True):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    if compiled:
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    return model


def train_a_bit(model, steps: int = 2) -> None:
    rng = np.random.default_rng(steps)
    model.fit(
        rng.normal(size=(8 * steps, 4)),
        rng.integers(0, 3, 8 * steps),
        batch_size=8,
        epochs=1,
        verbose=0,
    )


def state(progress: int, val_loss: float) -> dict:
    return {"progress": progress, "best": {"val_loss": val_loss}, "rows": []}


def test_a_save_that_fails_halfway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model = tiny_model()
    train_a_bit(model)
    save_epoch(ckpt, model, model.optimizer, state(1, 0.5), improved=True)
    good = [w.copy() for w in model.get_weights()]
    train_a_bit(model)

    real = h5py.Group.create_dataset
    calls = []

    def dies_on_the_third_array(self, name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("No space left on device (injected)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", dies_on_the_third_array)
    with pytest.raises(OSError, match="injected"):
        save_epoch(ckpt, model, model.optimizer, state(2, 0.4), improved=True)
    monkeypatch.setattr(h5py.Group, "create_dataset", real)

    assert len(calls) == 3  # it really died in the middle of the file
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.h5", "last.h5"]  # no debris
    fresh = tiny_model(compiled=False)
    path, restored = restore(ckpt, fresh)
    assert path.name == "last.h5" and restored["progress"] == 1
    for a, b in zip(fresh.get_weights(), good, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_crash_between_renames_loses_no_epoch(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    model = tiny_model()
    train_a_bit(model)
    save_epoch(ckpt, model, model.optimizer, state(1, 0.5), improved=True)
    train_a_bit(model)
    real = os.replace

    def killed_before_last(src, dst):
        if str(dst).endswith(checkpoints.LAST):
            raise KeyboardInterrupt  # the process dies between the two renames
        real(src, dst)

    monkeypatch.setattr(checkpoints.os, "replace", killed_before_last)
    with pytest.raises(KeyboardInterrupt):
        save_epoch(ckpt, model, model.optimizer, state(2, 0.4), improved=True)
    monkeypatch.setattr(checkpoints.os, "replace", real)

    assert not (ckpt / "last.h5").exists()  # old last is now previous, new one incoming
    path, found = latest_checkpoint(ckpt)
    assert path.name == "incoming.h5" and found["progress"] == 2
    assert read_state(ckpt / "best.h5")["progress"] == 2


def test_optimizer_state_round_trips(tmp_path):
    import keras

    model = tiny_model()
    train_a_bit(model, steps=3)
    save_epoch(tmp_path, model, model.optimizer, state(1, 0.5), improved=False)
    other = tiny_model()
    other.optimizer.build(other.trainable_variables)
    checkpoints.load_checkpoint(tmp_path / "last.h5", other, other.optimizer)
    assert int(keras.ops.convert_to_numpy(other.optimizer.iterations)) == 3
    for a, b in zip(other.optimizer.variables, model.optimizer.variables, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def fresh_state() -> TrainingState:
    return TrainingState()


def recorder_for(folder, model, patience: int, epochs: int, state: dict | None = None):
    """The finetune callback on a tiny compiled model, driven by hand."""
    train_a_bit(model)
    recorder = make_recorder(
        folder,
        folder / "h.csv",
        model,
        patience,
        fresh_state() if state is None else TrainingState.from_dict(state),
    )
    recorder.set_model(model)
    recorder.set_params({"epochs": epochs})
    return recorder


def end_epoch(recorder, epoch: int, val_loss: float, loss: float = 1.0) -> None:
    recorder.on_epoch_begin(epoch)
    recorder.on_epoch_end(epoch, {"loss": loss, "val_loss": val_loss, "val_accuracy": 0.5})


def test_best_is_never_replaced_by_a_worse_model_across_a_resume(tmp_path):
    model = tiny_model()
    ckpt = tmp_path / "checkpoints"
    recorder = recorder_for(ckpt, model, patience=5, epochs=6)
    end_epoch(recorder, 0, 0.5)
    end_epoch(recorder, 1, 0.3)  # the best
    best_weights = [w.copy() for w in model.get_weights()]
    train_a_bit(model)
    end_epoch(recorder, 2, 0.4)
    assert read_state(ckpt / "best.h5")["best"]["epoch"] == 2

    resumed_model = tiny_model()  # a new process: restore, then more (worse) epochs
    _, restored = restore(ckpt, resumed_model)
    assert restored["best"]["val_loss"] == pytest.approx(0.3) and restored["wait"] == 1
    recorder = recorder_for(ckpt, resumed_model, patience=5, epochs=6, state=restored)
    end_epoch(recorder, 3, 0.35)
    assert read_state(ckpt / "best.h5")["best"]["epoch"] == 2
    assert read_state(ckpt / "last.h5")["progress"] == 4
    check = tiny_model(compiled=False)
    checkpoints.load_checkpoint(ckpt / "best.h5", check)
    for a, b in zip(check.get_weights(), best_weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_early_stopping_counters_are_checkpointed(tmp_path):
    model = tiny_model()
    recorder = recorder_for(tmp_path, model, patience=2, epochs=10)
    end_epoch(recorder, 0, 0.5)
    end_epoch(recorder, 1, 0.6)
    assert not model.stop_training and read_state(tmp_path / "last.h5")["wait"] == 1
    end_epoch(recorder, 2, 0.7)
    assert model.stop_training
    assert read_state(tmp_path / "last.h5")["phase_done"] is True


def test_a_nan_loss_stops_training_and_writes_nothing(tmp_path):
    model = tiny_model()
    recorder = recorder_for(tmp_path, model, patience=3, epochs=3)
    end_epoch(recorder, 0, 0.5)
    recorder.on_epoch_begin(1)
    recorder.on_train_batch_end(4, {"loss": float("nan")})
    assert model.stop_training
    recorder.on_epoch_end(1, {"loss": float("nan"), "val_loss": 0.1})
    assert "the training loss became nan at step 5" in recorder.diverged
    assert read_state(tmp_path / "last.h5")["progress"] == 1  # epoch 2 was not kept
    assert read_state(tmp_path / "best.h5")["best"]["val_loss"] == 0.5
