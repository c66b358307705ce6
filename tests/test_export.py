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
