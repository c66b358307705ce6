"""Every export loads in its own runtime and answers like model.keras on the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tlkit.cli import cli
from tlkit.core.runs import load_run


@pytest.fixture(scope="module")
def run_and_images(tiny_runs):
    run = load_run(tiny_runs[1][0])
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    expected = np.asarray(run.load_model().predict(images, verbose=0))
    return run.path, images, expected


def run_savedmodel(path, images):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path / "saved_model"))  # kept: it owns the variables
    return loaded.serve(tf.constant(images)).numpy()


def run_tflite(path, images):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path / "model.tflite"))
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert inp["dtype"] == np.uint8  # raw images in: the preprocessing is inside
    interpreter.resize_tensor_input(inp["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


def run_onnx(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def run_keras(path, images):
    import keras

    model = keras.saving.load_model(path / "model.keras", compile=False, safe_mode=True)
    return model.predict(images, verbose=0)


RUNTIMES = {
    "keras": run_keras,
    "savedmodel": run_savedmodel,
    "tflite": run_tflite,
    "onnx": run_onnx,
}


@pytest.mark.parametrize("fmt", list(RUNTIMES))
def test_export_matches_the_run_in_its_own_runtime(run_and_images, fmt):
    run, images, expected = run_and_images
    result = CliRunner().invoke(cli, ["export", str(run), "--format", fmt], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = run / "export" / fmt
    assert (out / "labels.txt").read_text().splitlines() == ["a", "b", "c"]
    meta = json.loads((out / "export.json").read_text())
    assert {k: v for k, v in meta["input"].items() if k != "from_a_file"} == {
        "shape": [None, 32, 32, 3],
        "dtype": "uint8",
        "channels": "RGB",
        "preprocessing": "inside the model",
    }
    got = np.asarray(RUNTIMES[fmt](out, images))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not list((run / "export").glob("*.incomplete-*"))


def test_export_refuses_to_overwrite_and_names_bad_formats(run_and_images):
    run = run_and_images[0]
    runner = CliRunner()
    assert runner.invoke(cli, ["export", str(run), "--format", "keras", "-o", "e"]).exit_code == 0
    again = runner.invoke(cli, ["export", str(run), "--format", "keras", "-o", "e"])
    assert again.exit_code == 7 and "e: already exists; pass --overwrite" in again.output
    assert (
        runner.invoke(
            cli, ["export", str(run), "--format", "keras", "-o", "e", "--overwrite"]
        ).exit_code
        == 0
    )
    bad = runner.invoke(cli, ["export", str(run), "--format", "pickle"])
    assert bad.exit_code == 2 and "'pickle' is not one of" in bad.output
    assert load_run(run).classes == ["a", "b", "c"]


def test_export_json_says_enough_to_reproduce_the_eval_input_by_hand(run_and_images, tmp_path):
    """A deployment that follows export.json with OpenCV alone gets tlkit's eval pixels."""
    import cv2
    from PIL import Image

    from tlkit.evaluation.predict import predict_images

    run = run_and_images[0]
    assert (
        CliRunner().invoke(cli, ["export", str(run), "--format", "keras", "-o", "x"]).exit_code == 0
    )
    recipe = json.loads((tmp_path / "x" / "export.json").read_text())["input"]["from_a_file"]
    assert recipe["exif_orientation"].startswith("applied") and recipe["channels"] == "RGB"
    rng = np.random.default_rng(1)
    model = load_run(run).load_model()
    for h, w in ((90, 120), (20, 30)):  # shrinking (area) and enlarging (bilinear)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(image).save(tmp_path / f"{h}.png")
        short = recipe["resize_shorter_side_to"]
        scale = short / min(h, w)
        size = (max(short, round(w * scale)), max(short, round(h * scale)))
        flag = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
        big = cv2.resize(image, size, interpolation=flag)
        top, left = (big.shape[0] - 32) // 2, (big.shape[1] - 32) // 2
        by_hand = model.predict(big[None, top : top + 32, left : left + 32], verbose=0)
        _, tlkit_probs = predict_images([str(run)], [str(tmp_path / f"{h}.png")])
        np.testing.assert_allclose(tlkit_probs, by_hand, atol=1e-6)


@pytest.mark.parametrize("fmt", ["keras", "tflite"])
def test_an_ensemble_exports_as_one_model_that_averages_its_members(tiny_runs, fmt):
    """Two runs at the same size: the one model's probabilities are the members' mean on the
    same images, in Keras (safe mode) and in the TFLite interpreter; export.json and the CLI
    say the weights and the validation check."""
    _, (r1, r2) = tiny_runs
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    members = [load_run(r).load_model() for r in (r1, r2)]
    expected = sum(0.5 * np.asarray(m.predict(images, verbose=0)) for m in members)
    out = r1.parent / f"ensemble-{fmt}"
    result = CliRunner().invoke(
        cli, ["export", str(r1), str(r2), "--format", fmt, "-o", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "an ensemble of 2 of 2 runs" in result.output and "weights (equal): " in result.output
    assert "validation top-1 (9 images): " in result.output
    np.testing.assert_allclose(RUNTIMES[fmt](out, images), expected, atol=1e-5)
    meta = json.loads((out / "export.json").read_text())
    assert meta["input"]["shape"] == [None, 32, 32, 3] and meta["run"] == [
        str(r1.resolve()),
        str(r2.resolve()),
    ]
    ensemble = meta["ensemble"]
    assert ensemble["member_weights"] == [0.5, 0.5] and ensemble["val_images"] == 9
    assert ensemble["val_same_top1"] == 1.0 and ensemble["val_max_probability_difference"] < 1e-5


def test_an_ensemble_of_two_input_sizes_cuts_each_members_view_from_one_input(tiny_runs, tmp_path):
    """A member at 40 px beside one at 32: the input is 40 px and the 32 px member's branch
    shrinks it; on the validation split the one model stays close to the members run one by
    one on their own eval views, and a member greedy selection leaves out is not in it."""
    import keras

    from tlkit.evaluation.export import export_ensemble
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    data, (r1, _) = tiny_runs
    config = FinetuneConfig.of(
        data=str(data),
        backbone="test_resnet",
        weights="none",
        input_size=40,
        freeze=FreezeRequest(count="all"),
        head_epochs=1,
        epochs=0,
        fine_tune_lr=1e-5,
        batch_size=8,
        output=str(tmp_path / "r40"),
        cache="off",
    )
    r40 = finetune(config, verbose=0).path
    out = export_ensemble([r1, r40], "keras", output=tmp_path / "mixed")
    meta = json.loads((out / "export.json").read_text())
    assert meta["input"]["shape"] == [None, 40, 40, 3]
    assert [(b["crop"], b["size"]) for b in meta["ensemble"]["branches"]] == [(40, 32), (40, 40)]
    assert meta["ensemble"]["val_max_probability_difference"] < 0.05
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    images = np.random.default_rng(4).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    probs = model.predict(images, verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the resizing branch, its rounding and the member's uint8 input, in the TFLite runtime
    lite = export_ensemble([r1, r40], "tflite", output=tmp_path / "mixed-tflite")
    np.testing.assert_allclose(run_tflite(lite, images), probs, atol=1e-4)
    greedy = export_ensemble([r1, r40], "keras", "greedy", tmp_path / "greedy")
    weights = json.loads((greedy / "export.json").read_text())["ensemble"]["member_weights"]
    kept = keras.saving.load_model(greedy / "model.keras", safe_mode=True)
    names = {layer.name for layer in kept.layers if layer.name.startswith("member_")}
    assert names == {f"member_{i}" for i, w in enumerate(weights) if w > 0} != set()


def test_an_ensemble_export_refuses_what_it_cannot_make(tiny_runs):
    _, (r1, r2) = tiny_runs
    runner = CliRunner()
    one = runner.invoke(cli, ["export", str(r1), "--ensemble-weights", "greedy"])
    assert one.exit_code != 0 and "name two runs or more. Received: one run" in one.output
    assert "Traceback" not in one.output
    twice = runner.invoke(cli, ["export", str(r1), str(r2), str(r1)])
    assert twice.exit_code != 0 and "the same run as" in twice.output
    (r1.parent / "taken").mkdir(exist_ok=True)
    (r1.parent / "taken" / "mine.txt").write_text("the user's")
    taken = runner.invoke(cli, ["export", str(r1), str(r2), "-o", str(r1.parent / "taken")])
    assert taken.exit_code == 7 and "already exists" in taken.output
    assert (r1.parent / "taken" / "mine.txt").read_text() == "the user's"
