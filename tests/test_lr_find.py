"""lr-find: the suggestion against a sweep of fixed rates on the same data, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY

from tlkit.cli import cli
from tlkit.training.lr_find import head_range_test


def clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, 800)
    centres = rng.normal(0, 1.0, (4, 32))
    return (centres[labels] + rng.normal(0, 1.0, (800, 32))).astype(np.float32), labels


def final_loss(features: np.ndarray, labels: np.ndarray, lr: float, steps: int = 100) -> float:
    """Adam on a fresh softmax head at one fixed rate: the training loss of the last 20 steps."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(4, activation="softmax")
    dense.build((None, 32))
    optimizer = keras.optimizers.Adam(lr)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    order = np.random.default_rng(0).permutation(len(labels))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, dense(x))
        grads = tape.gradient(loss, dense.trainable_weights)
        optimizer.apply_gradients(zip(grads, dense.trainable_weights, strict=True))
        return loss

    losses = []
    for i in range(steps):
        idx = order[np.arange(i * 32, (i + 1) * 32) % len(order)]
        losses.append(float(step(features[idx], labels[idx].astype(np.int32))))
    return float(np.mean(losses[-20:])) if np.isfinite(losses).all() else np.inf


@pytest.mark.slow  # about 8 s: a sweep of 9 fixed rates, each a traced training loop
def test_the_suggestion_is_within_10x_of_the_best_fixed_rate():
    features, labels = clusters()
    found = head_range_test(features, labels, 4, (1e-6, 10.0), 100, 32, 0)
    sweep = {lr: final_loss(features, labels, lr) for lr in 10.0 ** np.arange(-4, 1.0, 0.5)}
    best = min(sweep, key=sweep.get)
    assert found["suggestion"] is not None
    assert best / 10 <= found["suggestion"] <= best * 10, (found["suggestion"], sweep)


def test_a_flat_curve_suggests_nothing():
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(400, 8)).astype(np.float32)
    found = head_range_test(noise, rng.integers(0, 4, 400), 4, (1e-7, 1e-4), 50, 32, 0)
    assert found["suggestion"] is None and "never fell" in found["note"]


def test_lr_find_command_writes_its_plot_and_refuses_to_overwrite(make_folder, tmp_path):
    data = make_folder(per_class=8)
    args = [
        "lr-find",
        str(data),
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--input-size",
        "32",
        "--steps",
        "30",
        "-o",
        str(tmp_path / "lr.png"),
    ]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["flag"] == "--lr" and len(found["rates"]) == len(found["smoothed"]) <= 30
    assert (tmp_path / "lr.png").stat().st_size > 1000
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 7 and "already exists" in again.output
    tune = CliRunner().invoke(cli, [*args, "--phase", "fine-tune", "--overwrite", "--json"])
    assert tune.exit_code == 0, tune.output
    assert json.loads(tune.stdout)["flag"] == "--fine-tune-lr"
    bad = CliRunner().invoke(cli, [*args, "--steps", "3", "--overwrite"])
    assert bad.exit_code == 2 and "'--steps': 3 is not in the range x>=10" in bad.output
