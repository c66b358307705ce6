"""The selection criterion: what "best" means, owned by one object that every best-keeper asks."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from test_head import quick_config

from tlkit.core import selection
from tlkit.core.selection import Criterion, Keeper
from tlkit.models.freezing import FreezeRequest


def test_a_criterion_ranks_by_its_metric_and_direction():
    rows = [
        {"val_loss": 0.9, "val_accuracy": 0.7},
        {"val_loss": 0.5, "val_accuracy": 0.6},
        {"val_loss": 0.7, "val_accuracy": 0.8},
    ]
    assert Criterion().best(rows) is rows[1]
    assert Criterion("val_accuracy", "max").best(rows) is rows[2]
    assert Criterion("val_accuracy", "max").best_index(rows) == 2
    # ties: the first, as a keeper that only moves on a strictly better row keeps it
    tied = [{"val_loss": 0.5}, {"val_loss": 0.5}]
    assert Criterion().best(tied) is tied[0]
    assert Criterion().best([]) is None


def test_a_row_without_a_finite_value_ranks_last():
    c = Criterion()
    for bad in ({"val_loss": math.nan}, {"val_loss": math.inf}, {"val_loss": None}, {}, None):
        assert c.rank(bad) == math.inf
        assert not c.improves(bad, None)  # not even better than nothing
        assert c.improves({"val_loss": 9.0}, bad)
    assert Criterion("val_accuracy", "max").rank({"val_accuracy": math.nan}) == math.inf
    with pytest.raises(ValueError, match="mode"):
        Criterion(mode="lowest")


def test_the_keeper_keeps_only_what_improves_and_counts_the_rest():
    keeper: Keeper[str] = Keeper()
    calls = []

    def keep(name: str):
        return lambda: calls.append(name) or name

    assert keeper.offer({"val_loss": 1.0}, keep("a"))
    assert not keeper.offer({"val_loss": 1.0}, keep("b"))  # equal is not better
    assert not keeper.offer({"val_loss": math.nan}, keep("c"))
    assert keeper.wait == 2
    assert keeper.offer({"val_loss": 0.5}, keep("d"))
    assert (keeper.kept, keeper.wait, keeper.best) == ("d", 0, {"val_loss": 0.5})
    assert calls == ["a", "d"]  # weights are copied only when they are kept
    # started from a best (a resumed run's): only a better row moves it
    resumed: Keeper[None] = Keeper({"val_accuracy": 0.8}, Criterion("val_accuracy", "max"))
    assert not resumed.offer({"val_accuracy": 0.7})
    assert resumed.offer({"val_accuracy": 0.9})


# loss falls every epoch while accuracy peaks at the second: the two criteria disagree
DISAGREE = [
    {
        "phase": "fine-tune",
        "epoch": i + 1,
        "loss": 1.0,
        "val_loss": v,
        "val_accuracy": a,
        "seconds": 1,
    }
    for i, (v, a) in enumerate([(0.9, 0.6), (0.8, 0.9), (0.7, 0.7), (0.6, 0.8)])
]
BY_ACCURACY = Criterion("val_accuracy", "max")


@pytest.mark.parametrize("criterion", [Criterion(), BY_ACCURACY])
def test_the_run_state_keeps_and_stops_by_the_criterion(monkeypatch, criterion):
    from tlkit.training.state import TrainingState

    monkeypatch.setattr(selection, "CRITERION", criterion)
    state = TrainingState(phase_steps={"fine-tune": 4})
    stops = [state.advance(dict(r), patience=2)[0] for r in DISAGREE]
    summary = state.phase_summaries([("fine-tune", 4, 1e-4)])[0]
    if criterion == BY_ACCURACY:  # two epochs without a better accuracy after the second
        assert stops == [False, False, False, True]
        assert (state.best["epoch"], summary["best_epoch"]) == (2, 2)
    else:
        assert stops == [False] * 4
        assert (state.best["epoch"], summary["best_epoch"]) == (4, 4)


@pytest.mark.parametrize("criterion", [Criterion(), BY_ACCURACY])
def test_the_keras_best_keeper_keeps_and_stops_by_the_criterion(monkeypatch, criterion):
    from tlkit.training.head import best_keeper

    monkeypatch.setattr(selection, "CRITERION", criterion)

    class Model:  # what the callback touches of a Keras model
        def __init__(self):
            self.stop_training, self.weights = False, []

        def get_weights(self):
            return list(self.weights)

        def set_weights(self, weights):
            self.weights = weights

    callback, model = best_keeper(patience=2), Model()
    callback.set_model(model)
    callback.on_train_begin()
    for i, row in enumerate(DISAGREE):
        model.weights = [i + 1]
        callback.on_epoch_end(i, dict(row))
        if model.stop_training:
            break
    callback.on_train_end()
    if criterion == BY_ACCURACY:
        assert (model.weights, i + 1) == ([2], 4)  # restored to epoch 2, stopped after 4
    else:
        assert (model.weights, model.stop_training) == ([4], False)


def test_a_criterion_names_a_column_the_run_keeps():
    with pytest.raises(ValueError, match="monitor"):
        Criterion("val_top5")  # the run's best holds val_loss and val_accuracy only


@pytest.mark.slow  # about 10 s: a tiny run with a head phase and a fine-tune phase
def test_every_best_keeper_follows_the_one_criterion(make_folder, tmp_path, monkeypatch):
    """Swap the one object for "highest validation accuracy": the head's checks, the fine-tune
    epochs, the run's best across phases and the phase summaries all follow it."""
    import keras

    from tlkit.data.augment import eval_transform
    from tlkit.data.datasets import load_dataset
    from tlkit.data.decode import decode_image
    from tlkit.training.train import finetune

    by_accuracy = Criterion("val_accuracy", "max")
    monkeypatch.setattr(selection, "CRITERION", by_accuracy)
    data = make_folder(per_class=10, layout="splits", classes=("cat", "dog", "cow"))
    config = quick_config(
        data, tmp_path / "run", freeze=FreezeRequest(count="0"), epochs=3, patience=3
    )
    run = finetune(config)
    with open(run.path / "history.csv") as f:
        rows = [
            {**r, "val_loss": float(r["val_loss"]), "val_accuracy": float(r["val_accuracy"])}
            for r in csv.DictReader(f)
        ]
    results = run.record.results
    top = by_accuracy.best(rows)
    assert top is not None
    assert (results["best"]["phase"], results["best"]["epoch"]) == (top["phase"], int(top["epoch"]))
    assert results["best"]["val_accuracy"] == pytest.approx(top["val_accuracy"])
    # the model saved is that row's: the head's checks kept their weights by the criterion too
    model = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    val = load_dataset(str(data)).splits["val"]
    x = np.stack([eval_transform(decode_image(e.path), 32, 0.875) for e in val])
    y = np.array([e.label for e in val])
    probs = model.predict(x, verbose=0)
    assert np.mean(probs.argmax(-1) == y) == pytest.approx(top["val_accuracy"])
    loss = float(-np.log(probs[np.arange(len(y)), y]).mean())
    assert loss == pytest.approx(top["val_loss"], rel=1e-3, abs=1e-5)
    for summary in results["phases"]:
        phase_top = by_accuracy.best([r for r in rows if r["phase"] == summary["phase"]])
        assert phase_top is not None
        assert summary["best_epoch"] == int(phase_top["epoch"])
