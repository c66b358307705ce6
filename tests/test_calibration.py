"""ECE against a hand count, temperature scaling on a model built to be over-confident, and a
calibrated run whose every output carries the temperature."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY, write_folder

from tlkit.core.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 0])
    # bin 14 (0.933, 1]: 2 predictions, confidence 0.95, accuracy 0.5;
    # bin 8 (0.533, 0.6]: 2 predictions, confidence 0.55, accuracy 0.5
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    counts = [b["count"] for b in reliability_bins(probs, labels)]
    assert sum(counts) == 4 and counts[8] == 2 and counts[14] == 2


def test_temperature_scaling_repairs_an_over_confident_model_on_held_out_data():
    rng = np.random.default_rng(0)
    n, c = 4000, 5
    logits = rng.normal(0, 1.5, (n, c))
    true = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=p) for p in true])  # labels drawn from the true odds
    sharp = apply_temperature(true, 1 / 3)  # the model: the right ranking, 3x too confident
    val, test = slice(0, n // 2), slice(n // 2, n)
    t = fit_temperature(sharp[val], labels[val])
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(sharp[test], labels[test])
    after = expected_calibration_error(apply_temperature(sharp[test], t), labels[test])
    assert after < before / 3 and after < 0.03
    assert (apply_temperature(sharp, t).argmax(1) == sharp.argmax(1)).all()  # same answers


@pytest.mark.slow  # about 8 s: two runs and their evaluations
def test_a_calibrated_run_serves_tempered_probabilities_everywhere(tmp_path):
    from tlkit.evaluation.evaluate import EvalConfig, evaluate
    from tlkit.evaluation.export import export_run
    from tlkit.evaluation.predict import predict_images
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    data = tmp_path / "data"
    write_folder(data / "train", ["a", "b", "c"], 8)
    write_folder(data / "val", ["a", "b", "c"], 4, seed=1)
    write_folder(data / "test", ["a", "b", "c"], 4, seed=2)
    runs = {}
    for calibrate in (False, True):
        cfg = FinetuneConfig.of(
            data=str(data),
            backbone=TINY,
            weights="none",
            input_size=32,
            freeze=FreezeRequest(count="all"),
            head_epochs=1,
            epochs=0,
            batch_size=8,
            cache="off",
            calibrate=calibrate,
            output=str(tmp_path / f"cal{int(calibrate)}"),
        )
        runs[calibrate] = finetune(cfg, verbose=0)
    record = runs[True].record.calibration
    t = record["temperature"]
    assert record["fitted_on"] == "val" and record["images"] == 12 and t != pytest.approx(1.0)
    assert record["after"]["log_loss"] <= record["before"]["log_loss"] + 1e-9
    assert runs[False].record.calibration is None

    images = [str(p) for p in sorted((data / "test").rglob("*.png"))]
    _, plain = predict_images([str(runs[False].path)], images)
    _, tempered = predict_images([str(runs[True].path)], images)
    np.testing.assert_allclose(tempered, apply_temperature(plain, t), atol=1e-5)
    metrics = evaluate(EvalConfig(runs=(str(runs[True].path),), name="e"))
    assert metrics["calibration"]["temperatures"] == [t]
    assert (runs[True].path / "eval" / "e" / "reliability_diagram.png").is_file()
    report = (runs[True].path / "eval" / "e" / "report.html").read_text()
    assert f"T = {t:.3f}, validation ECE {record['before']['ece']:.4f} -&gt; " in report
    exported = export_run(runs[True].path, "keras")
    import keras

    model = keras.saving.load_model(exported / "model.keras", safe_mode=True)
    from tlkit.data.augment import eval_transform
    from tlkit.data.decode import decode_image

    x = np.stack([eval_transform(decode_image(p), 32, 0.875) for p in images])
    np.testing.assert_allclose(model.predict(x, verbose=0), tempered, atol=1e-5)
    assert json.loads((runs[True].path / "run.json").read_text())["calibration"]["temperature"] == t
