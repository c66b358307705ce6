"""The fine-tune phase's optimizer options (tlkit.training.optim): each does what its flag says."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from tlkit.cli import cli
from tlkit.models.backbones import get_backbone
from tlkit.training.config import FinetuneConfig
from tlkit.training.optim import (
    SmoothedCrossentropy,
    StagedAdam,
    fine_tune_optimizer,
    plain_val_loss,
    stage_factors,
)


def test_stage_factors_lower_each_earlier_stage():
    spec = get_backbone("test_resnet")
    base = spec.build(32)
    names = [layer.name for layer in base.layers]
    ends = [spec.stage_end_index(names, k) for k in range(1, len(spec.stages) + 1)]
    factors = stage_factors(base, ends, 0.5)
    n = len(ends)
    assert factors and set(factors.values()) <= {0.5 ** (n - j) for j in range(n)}
    first = base.layers[1 : ends[0]]  # the stem's weighted layers
    last = base.layers[ends[-2] : ends[-1]]
    stem = {factors[v.path] for layer in first for v in layer.trainable_weights}
    top = {factors[v.path] for layer in last for v in layer.trainable_weights}
    assert stem == {0.5**n} and top == {0.5}


def test_staged_adam_steps_each_variable_at_its_factor():
    a, b = (
        keras.Variable(np.zeros(4, np.float32), name="a"),
        keras.Variable(np.zeros(4, np.float32), name="b"),
    )
    opt = StagedAdam(factors={b.path: 0.1}, learning_rate=1e-2)
    grads = [keras.ops.ones(4), keras.ops.ones(4)]
    opt.apply(grads, [a, b])  # Adam's first step is lr * sign(gradient), whatever its size
    step_a, step_b = np.abs(a.numpy()), np.abs(b.numpy())
    np.testing.assert_allclose(step_a, 1e-2, rtol=1e-3)
    np.testing.assert_allclose(step_b, 1e-3, rtol=1e-3)


def _rate(optimizer, step: int) -> float:
    return (
        float(optimizer.learning_rate)
        if not callable(optimizer._learning_rate)
        else float(optimizer._learning_rate(step))
    )


@pytest.mark.parametrize("cosine,end", [(True, 0.0), (False, 1e-3)])
def test_warmup_rises_to_the_rate_then_decays_or_holds(cosine, end):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = fine_tune_optimizer(1e-3, 100, 10, cosine, 0.0, {}, model)
    assert _rate(opt, 0) == pytest.approx(0.0, abs=1e-12)
    assert _rate(opt, 5) == pytest.approx(5e-4, rel=1e-3)
    assert _rate(opt, 10) == pytest.approx(1e-3, rel=1e-3)
    assert _rate(opt, 100) == pytest.approx(end, abs=1e-9)
    if cosine:
        assert _rate(opt, 55) == pytest.approx(5e-4, rel=1e-2)  # halfway down the cosine


def test_weight_decay_shrinks_kernels_only():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, bias_initializer="ones")])
    opt = fine_tune_optimizer(1e-1, 10, 0, False, 0.5, {}, model)
    assert isinstance(opt, keras.optimizers.AdamW)
    kernel, bias = model.trainable_variables
    before = kernel.numpy().copy()
    opt.apply([keras.ops.zeros(kernel.shape), keras.ops.zeros(bias.shape)], [kernel, bias])
    np.testing.assert_allclose(kernel.numpy(), before * (1 - 0.1 * 0.5), rtol=1e-5)
    np.testing.assert_array_equal(bias.numpy(), np.ones(2, np.float32))


def test_plain_options_build_stock_keras_classes():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert type(fine_tune_optimizer(1e-3, 10, 0, False, 0.0, {}, model)) is keras.optimizers.Adam
    assert float(
        fine_tune_optimizer(1e-3, 10, 0, False, 0.0, {}, model).learning_rate
    ) == pytest.approx(1e-3)


def test_label_smoothing_loss():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, probs)
    assert float(SmoothedCrossentropy(0.0)(labels, probs)) == pytest.approx(float(plain), rel=1e-5)
    eps = 0.3
    target = np.eye(3)[labels] * (1 - eps) + eps / 3
    expected = float(np.mean(-(target * np.log(probs)).sum(1)))
    assert float(SmoothedCrossentropy(eps)(labels, probs)) == pytest.approx(expected, rel=1e-4)


def test_val_loss_stays_plain_cross_entropy_under_smoothing():
    logs = {"loss": 1.2, "val_loss": 1.5, "val_cross_entropy": 1.1, "cross_entropy": 0.9}
    out = plain_val_loss(logs)
    assert out["val_loss"] == 1.1 and out["val_smoothed_loss"] == 1.5
    assert "val_cross_entropy" not in out and out["loss"] == 1.2
    assert plain_val_loss({"val_loss": 2.0}) == {"val_loss": 2.0}


def test_finetune_options_from_the_cli_and_a_recipe(make_folder, tmp_path):
    """Every option through the real CLI (a recipe sets two): recorded, applied to the rate,
    and the saved model opens in plain Keras, compiled, without tlkit's classes."""
    data = make_folder(per_class=6)
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(
        "description: test\nfinetune:\n  label-smoothing: 0.1\n  stage-lr-decay: 0.5\n"
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            str(data),
            "--recipe",
            str(recipe),
            "--backbone",
            "test_resnet",
            "--weights",
            "none",
            "--batch-size",
            "4",
            "--head-epochs",
            "1",
            "--epochs",
            "3",
            "--patience",
            "3",
            "--fine-tune-lr",
            "1e-4",
            "--schedule",
            "cosine",
            "--warmup-epochs",
            "1",
            "--weight-decay",
            "0.01",
            "-o",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "run.json").read_text())["config"]
    assert (
        config["schedule"],
        config["warmup_epochs"],
        config["weight_decay"],
        config["stage_lr_decay"],
        config["label_smoothing"],
    ) == ("cosine", 1, 0.01, 0.5, 0.1)
    rows = [line.split(",") for line in (out / "history.csv").read_text().splitlines()[1:]]
    rates = [float(r[6]) for r in rows if r[0] == "fine-tune"]
    assert rates[0] == pytest.approx(1e-4, rel=1e-3)  # the warmup's end: the peak
    assert json.loads((out / "run.json").read_text())["lr_used"]["fine-tune"] == 1e-4
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)  # the cosine's end
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert model.output.shape[-1] == 2


@pytest.mark.parametrize(
    "n_train,set_rate,lr,rate,why",
    [
        (1200, None, 1e-3, 1e-4, "the default for this much data"),  # 200 a class
        (1199, None, 1e-3, 1e-5, "the default for this much data"),  # 199 a class
        (60, None, 1e-3, 1e-5, "the default for this much data"),
        (1200, 3e-5, 1e-3, 3e-5, "(given: --fine-tune-lr or a recipe)"),  # the user's rate wins
        (60, 1e-4, 1e-3, 1e-4, "(given: --fine-tune-lr or a recipe)"),
        (1200, None, 5e-5, 5e-5, "capped at --lr"),  # never above the head's rate
    ],
)
def test_the_fine_tune_rate_follows_the_data(n_train, set_rate, lr, rate, why):
    """FINE_TUNE_LR_BY_DATA: 1e-4 from 200 training images a class, 1e-5 below, measured on
    the icons benchmark (docs/accuracy.md); the log line says which and why."""
    config = FinetuneConfig.of(fine_tune_lr=set_rate, lr=lr)
    resolved, note = config.with_data_defaults(n_train, 6)
    assert resolved.fit.fine_tune_lr == rate and resolved.fit.tune_lr == rate
    assert note.startswith(f"{n_train} training images, {n_train // 6} a class: fine-tune rate")
    assert why in note
    assert resolved.replace(fine_tune_lr=None) == config.replace(fine_tune_lr=None)  # nothing else
    with pytest.raises(RuntimeError, match="with_data_defaults"):
        _ = FinetuneConfig.of().fit.tune_lr


def test_the_data_decides_the_rate_a_run_trains_at(make_folder, tmp_path, monkeypatch):
    """Through the CLI: run.json keeps the rate unset (a resume decides it again from the same
    data, and its identity holds the rate, so a changed rule shows), lr_used and history.csv
    hold the rate the data chose. The table is lowered so that tiny data takes its top row."""
    table = ((8, 3e-4), (0, 1e-5))
    monkeypatch.setattr("tlkit.training.config.FINE_TUNE_LR_BY_DATA", table)
    monkeypatch.setattr("tlkit.core.choices.FINE_TUNE_LR_BY_DATA", table)
    data = make_folder(per_class=12)  # the stable hash split: 19 of 24 train
    out = tmp_path / "run"
    args = ["finetune", str(data), "--backbone", "test_resnet", "--weights", "none"]
    args += ["--input-size", "32", "--head-epochs", "1", "--epochs", "1", "-o", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (
        "19 training images, 9 a class: fine-tune rate 3e-4 (the default for this much data: "
        "3e-4 from 8 training images a class, 1e-5 below)"
    ) in result.output
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["fine_tune_lr"] is None
    assert record["lr_used"]["fine-tune"] == 3e-4
    rows = [line.split(",") for line in (out / "history.csv").read_text().splitlines()[1:]]
    assert [float(r[6]) for r in rows if r[0] == "fine-tune"] == [pytest.approx(3e-4)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--stage-lr-decay", "0"], "'--stage-lr-decay': 0.0 is not in the range 0<x<=1"),
        (["--label-smoothing", "1"], "'--label-smoothing': 1.0 is not in the range 0<=x<1"),
        (["--warmup-epochs", "-1"], "'--warmup-epochs': -1 is not in the range x>=0"),
        (["--weight-decay", "-0.1"], "'--weight-decay': -0.1 is not in the range x>=0"),
        (["--schedule", "step"], "'step' is not one of 'constant', 'cosine'"),
    ],
)
def test_bad_fine_tune_options_are_one_line_errors(make_folder, args, message):
    data = make_folder(per_class=4)
    result = CliRunner().invoke(cli, ["finetune", str(data), "--weights", "none", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
