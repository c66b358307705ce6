"""The real CLI (click's CliRunner) on real files, end to end."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from tlkit.cli import cli
from tlkit.training.head import CHECK_EVERY, MIN_HEAD_STEPS

# mechanics run on tlkit's test backbone (a few thousand parameters, 32 px by default)
TINY = ["--backbone", "test_resnet"]
FAST = [*TINY, "--weights", "none", "--batch-size", "8", "--head-epochs", "1", "--epochs", "1"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["finetune"],
        ["predict"],
        ["inspect"],
        ["backbones"],
        ["weights", "list"],
        ["weights", "import"],
        ["eval"],
        ["diagnose"],
        ["lr-find"],
        ["precompute-features"],
        ["cache", "ls"],
        ["cache", "rm"],
        ["cache", "merge"],
        ["augment-preview"],
        ["bench-input"],
        ["check-data"],
        ["recipes"],
        ["runs"],
        ["export"],
    ],
)
def test_help_does_not_import_tensorflow(command):
    code = (
        "import sys; from tlkit.cli import cli\n"
        f"try:\n    cli({[*command, '--help']!r}, prog_name='tlkit')\n"
        "except SystemExit:\n    pass\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'numpy') if m in sys.modules]\n"
        "print('HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout
    assert "HEAVY []" in out.stdout


@pytest.mark.slow  # real ImageNet features on the real drawings: the transfer is the point
def test_the_quickstart_transfers_imagenet_features_offline(lite0_weights, tmp_path, monkeypatch):
    """The README's main command as a new user runs it offline (TLKIT_OFFLINE is set for every
    test), at 64 px and one fine-tune epoch so it fits a test: no --backbone, no --weights."""
    import keras

    from tlkit.core.fsutil import file_hash
    from tlkit.data.pipeline import load_eval_image

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(REPO / "data")
    result = invoke("finetune", "--freeze", "10", "--input-size", "64", "--epochs", "1", "data/")
    assert result.exit_code == 0, result.output
    assert "10 classes; train 240, val 80, test 80" in result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("efficientnet_lite0-")
    info = json.loads((run / "run.json").read_text())
    assert info["classes"][:3] == ["birds", "bugs", "computers"]
    assert info["data"]["val_source"] == "folder"
    assert info["backbone"] == "efficientnet_lite0" and info["preprocessing"] == "lite"
    assert info["weights"]["source"] == "imagenet"
    assert info["weights"]["sha256"] == file_hash(lite0_weights)
    # the end of the log: the test split's score, single crop, as run.json holds it
    test = info["results"]["test"]
    assert f"test: top-1 {test['accuracy']:.4f} on 80 images" in result.output
    # chance is 0.1; ImageNet features at 64 px measured 0.50 val, 0.49 test (224 px: 0.65)
    assert info["results"]["best"]["val_accuracy"] > 0.35, info["results"]["best"]
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)  # plain Keras
    files = sorted((REPO / "data" / "test").glob("*/*.png"))
    x = np.stack([load_eval_image(str(f), 64, 0.875) for f in files])
    predicted = np.argmax(model.predict(x, verbose=0), axis=1)
    truth = [info["classes"].index(f.parent.name) for f in files]
    assert np.mean(predicted == np.array(truth)) == pytest.approx(test["accuracy"])


def test_finetune_end_to_end_then_reload_and_predict(make_folder, tmp_path):
    import keras

    data = make_folder(per_class=12)
    result = invoke("finetune", str(data), "--freeze", "11", "-o", "runs/a", *FAST)
    assert result.exit_code == 0, result.output
    assert "phase head (head only, backbone frozen)" in result.output
    # before the head trains: its time, from a timed forward pass; the fine-tune phase's
    # from its own first training steps
    assert "estimate from the first batches" in result.output
    assert "phase fine-tune: " in result.output and " ms per training step" in result.output
    assert "up to about" in result.output
    assert "trainable /" in result.output and "frozen BatchNorm layers" in result.output
    run = tmp_path / "runs" / "a"
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "data_report.json",
        "history.csv",
        "model.keras",
        "run.json",
        "training_curves.png",
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "best.h5",
        "identity.json",
        "last.h5",
    ]
    assert not list((tmp_path / "runs").glob("*.incomplete-*"))
    info = json.loads((run / "run.json").read_text())
    assert info["classes"] == ["cat", "dog"] and info["backbone"] == "test_resnet"
    assert info["freeze"]["n_frozen"] == 11 and info["weights"]["source"] == "none"
    assert info["input_size"] == 32 and info["preprocessing"] == "tf"
    assert len(info["data"]["fingerprint"]) == 64
    history = (run / "history.csv").read_text().splitlines()
    assert history[0].startswith("phase,epoch,loss,accuracy,val_loss")
    # the head phase: a validation check every CHECK_EVERY of its 500 steps; one fine-tune epoch
    assert [line.split(",")[0] for line in history[1:]] == ["head"] * (
        MIN_HEAD_STEPS // CHECK_EVERY
    ) + ["fine-tune"]

    # plain Keras loads it (no tlkit layers) and it takes raw uint8 images
    model = keras.saving.load_model(run / "model.keras", safe_mode=True)
    from tlkit.data.pipeline import load_eval_image

    image = data / "dog" / "img3.png"
    x = load_eval_image(str(image), 32, 0.875)[None]
    probs = np.asarray(model.predict(x, verbose=0))[0]
    pred = invoke("predict", str(run), str(image), "--json")
    assert pred.exit_code == 0, pred.output
    top = json.loads(pred.output)[0]["top"]
    assert top[0]["label"] == ["cat", "dog"][int(probs.argmax())]
    assert top[0]["probability"] == pytest.approx(float(probs.max()), abs=1e-6)
    table = invoke("predict", str(run), str(image), "-k", "1")
    assert table.output.splitlines()[1].split()[1] == top[0]["label"]


def test_existing_run_is_refused_without_overwrite(make_folder, tmp_path):
    data = make_folder(per_class=8)
    fast = [*FAST, "--epochs", "0"]  # the head alone: what is tested is the run folder
    first = invoke("finetune", str(data), "--freeze", "all", "-o", "runs/a", *fast)
    assert first.exit_code == 0, first.output
    before = (tmp_path / "runs/a/run.json").read_text()
    again = invoke("finetune", str(data), "--freeze", "all", "-o", "runs/a", *fast)
    assert again.exit_code == 7
    assert again.output.strip() == (
        "Error: runs/a: already exists; choose another -o/--output or pass --overwrite"
    )
    assert (tmp_path / "runs/a/run.json").read_text() == before
    forced = invoke("finetune", str(data), "--freeze", "all", "-o", "runs/a", "--overwrite", *fast)
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "runs/a/run.json").read_text() != before
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["a"]


def test_imagenet_weights_offline_fail_before_any_image_is_decoded(make_folder, tmp_path):
    data = make_folder(per_class=3)
    (data / "cat" / "broken.jpg").write_text("not an image: decoding would say so (exit 3)")
    result = invoke("finetune", str(data), "--backbone", "vgg16")
    assert result.exit_code == 4
    line = result.output.strip()
    assert "\n" not in line
    assert "ImageNet weights for vgg16 are not available" in line
    assert (
        str(
            tmp_path / "keras_home" / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
        )
        in line
    )
    assert "tlkit weights import FILE" in line and "--weights none" in line


def test_bad_image_stops_before_training_and_names_the_file(make_folder, tmp_path):
    data = make_folder(per_class=6)
    (data / "cat" / "broken.jpg").write_text("not really a jpeg")
    result = invoke("finetune", str(data), "-o", "runs/x", *FAST)
    assert result.exit_code == 3
    assert "broken.jpg: not an image (text file)" in result.output
    assert not (tmp_path / "runs").exists()  # nothing half-written


@pytest.mark.parametrize(
    "args,message",
    [
        (["--freeze", "ten"], "--freeze must be an integer"),
        (["--input-size", "16"], "--input-size 16 is below the minimum of 32"),
        (["--backbone", "resnet5"], "unknown backbone 'resnet5'"),
        (["--fine-tune-lr", "0.1"], "--fine-tune-lr should be lower than --lr"),
        (["--weights", "missing.h5"], "Received: 'missing.h5' (no such file or folder)"),
        (["--augment", "auto", "--flip-p", "0"], "--augment auto chooses the whole augmentation"),
    ],
)
def test_bad_options_are_one_line_errors(make_folder, args, message):
    data = make_folder(per_class=4)
    result = invoke("finetune", str(data), "--weights", "none", *args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_weights_import_rejects_an_unknown_file(tmp_path):
    f = tmp_path / "w.h5"
    f.write_bytes(b"not weights")
    result = invoke("weights", "import", str(f))
    assert result.exit_code == 4 and "matches none of the pinned ImageNet files" in result.output


def test_weights_import_places_a_verified_file(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    import tlkit.models.backbones as backbones

    f = tmp_path / "download.h5"
    f.write_bytes(b"pretend weights")
    spec = dataclasses.replace(
        backbones.REGISTRY["vgg16"], weights_hash=hashlib.md5(f.read_bytes()).hexdigest()
    )
    monkeypatch.setitem(backbones.REGISTRY, "vgg16", spec)
    result = invoke("weights", "import", str(f))
    assert result.exit_code == 0, result.output
    target = tmp_path / "keras_home/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert target.read_bytes() == b"pretend weights"
    listing = invoke("weights", "list").output
    assert any(line.startswith("vgg16") and "cached" in line for line in listing.splitlines())
    assert invoke("weights", "import", str(f)).exit_code == 4  # no silent overwrite


@pytest.mark.subprocess
def test_seed_makes_a_cpu_run_reproducible(make_folder, tmp_path):
    """Two processes, same seed: identical weights and metrics."""
    data = make_folder(per_class=8)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tlkit",
                "finetune",
                str(data),
                "--freeze",
                "14",
                "-o",
                f"runs/{name}",
                "--seed",
                "7",
                *FAST,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for name in ("s1", "s2")
    ]  # side by side
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    h1 = (tmp_path / "runs/s1/history.csv").read_text().splitlines()
    h2 = (tmp_path / "runs/s2/history.csv").read_text().splitlines()
    timing = {"seconds", "input_seconds", "model_seconds", "input_share"}

    def strip(lines: list[str]) -> list[list[str]]:
        keep = [i for i, name in enumerate(lines[0].split(",")) if name not in timing]
        return [[line.split(",")[i] for i in keep] for line in lines]

    assert strip(h1) == strip(h2)
    import keras

    m1 = keras.saving.load_model(tmp_path / "runs/s1/model.keras")
    m2 = keras.saving.load_model(tmp_path / "runs/s2/model.keras")
    for a, b in zip(m1.get_weights(), m2.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_transfer_from_a_previous_run(make_folder, tmp_path):
    from tlkit.core.runs import load_run
    from tlkit.models.backbones import get_backbone
    from tlkit.models.model import backbone_of, build_backbone
    from tlkit.models.weights import resolve_weights

    data = make_folder(per_class=8)
    assert invoke("finetune", str(data), "--freeze", "14", "-o", "runs/src", *FAST).exit_code == 0
    resolved = resolve_weights(get_backbone("test_resnet"), "runs/src")
    assert resolved.source == "run" and len(resolved.sha256) == 64
    base = build_backbone(get_backbone("test_resnet"), resolved, 48)  # another size is fine
    src = backbone_of(load_run("runs/src").load_model())
    for a, b in zip(base.get_weights(), src.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    wrong = invoke("finetune", str(data), "--backbone", "vgg16", "--weights", "runs/src")
    assert wrong.exit_code == 4 and "that run trained test_resnet, not vgg16" in wrong.output


def test_mixed_precision_run_saves_float32_probabilities(make_folder, tmp_path):
    import keras

    data = make_folder(per_class=6)
    result = invoke(
        "finetune",
        str(data),
        *TINY,
        "--weights",
        "none",
        "--input-size",
        "32",
        "--freeze",
        "all",
        "--head-epochs",
        "1",
        "--epochs",
        "0",
        "--mixed-precision",
        "-o",
        "runs/mp",
    )
    assert result.exit_code == 0, result.output
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    model = keras.saving.load_model(tmp_path / "runs/mp/model.keras")
    assert model.get_layer("backbone").get_layer("stem_conv").dtype_policy.name == "mixed_float16"
    x = np.zeros((2, 32, 32, 3), np.uint8)
    probs = model.predict(x, verbose=0)
    assert probs.dtype == np.float32 and np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)


def test_finetune_with_alexnet_augmentation_records_it(make_folder, tmp_path):
    data = make_folder(per_class=8)
    result = invoke(
        "finetune",
        str(data),
        "--freeze",
        "all",
        "--augment",
        "alexnet",
        "--extra-transform",
        'Rotate:{"limit": 10}',
        "--workers",
        "2",
        "--prefetch",
        "2",
        "-o",
        "runs/aug",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert "PCA colour: eigenvalues" in result.output
    info = json.loads((tmp_path / "runs/aug/run.json").read_text())
    aug = info["augment"]
    assert aug["preset"] == "alexnet" and aug["crop"] == "crop" and aug["pca_sigma"] == 0.1
    assert aug["extra"] == [{"name": "Rotate", "args": {"limit": 10}}]
    n_train = sum(info["data"]["counts"]["train"].values())
    assert len(aug["pca"]["eigvals"]) == 3 and aug["pca"]["n_images"] == n_train


def test_bad_extra_transform_is_a_one_line_error_before_any_work(make_folder, tmp_path):
    data = make_folder(per_class=4)
    result = invoke(
        "finetune", str(data), "--weights", "none", "--extra-transform", 'Rotate:{"limitt": 5}'
    )
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0
    assert "Rotate has no argument 'limitt'. Did you mean 'limit'?" in result.output
    assert not (tmp_path / "runs").exists()


def test_augment_preview_writes_a_grid(make_folder, tmp_path):
    from PIL import Image

    data = make_folder(per_class=5)
    result = invoke(
        "augment-preview",
        str(data),
        "-n",
        "3",
        "--draws",
        "4",
        "--input-size",
        "32",
        "--augment",
        "vgg",
        "-o",
        "grid.png",
    )
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "grid.png") as im:
        assert im.size == (5 * 36 + 4, 3 * 36 + 4)  # (1 + draws) columns, n rows, 4 px gaps
        grid = np.asarray(im)
    first, second = grid[4:36, 40:72], grid[4:36, 76:108]  # two draws of the first image
    assert not np.array_equal(first, second)
    again = invoke("augment-preview", str(data), "-o", "grid.png")
    assert again.exit_code == 7 and "already exists" in again.output


def test_bench_input_measures_both_sides_and_says_what_to_do(make_folder):
    data = make_folder(per_class=10)
    result = invoke(
        "bench-input",
        str(data),
        *TINY,
        "--input-size",
        "32",
        "--batch-size",
        "4",
        "--batches",
        "2",
        "--max-workers",
        "2",
        "--freeze",
        "all",
        "--json",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [r["workers"] for r in plan["pipeline"]] == [1, 2]
    assert all(r["images_per_s"] > 0 for r in plan["pipeline"])
    assert plan["model_images_per_s"] > 0
    best = max(r["images_per_s"] for r in plan["pipeline"])
    assert plan["headroom"] == pytest.approx(best / plan["model_images_per_s"])
    # the verdict the measured figures imply: the fewest workers giving 1.2x the model
    enough = [
        r["workers"]
        for r in plan["pipeline"]
        if r["images_per_s"] >= 1.2 * plan["model_images_per_s"]
    ]
    assert plan["workers_needed"] == (enough[0] if enough else None)
    assert plan["verdict"].startswith(
        f"the input keeps up: {enough[0]} worker(s)" if enough else "input-bound"
    )
    images = plan["images"]  # 24 x 24 PNGs: no reduced decode
    assert list(images["formats"]) == ["PNG"] and images["jpeg_reduction"] is None
    assert images["median_megapixels"] == round(24 * 24 / 1e6, 3)
    store = plan["store"]
    assert store["workers"] == 2 and store["images_per_s"] > 0 and store["bytes_per_image"] > 0
    assert not list(pathlib.Path(tempfile.gettempdir()).glob("tlkit-bench-store-*"))  # nothing left


def test_input_verdict_on_known_figures():
    from tlkit.training.throughput import input_verdict

    rows = [{"workers": 1, "images_per_s": 10.0}, {"workers": 2, "images_per_s": 19.0}]
    needed, verdict = input_verdict(rows, 10.0)  # 1 worker only matches the model: not enough
    assert needed == 2 and verdict.startswith("the input keeps up: 2 worker(s) give >= 1.2x")
    assert "--workers 2" in verdict
    needed, verdict = input_verdict(rows, 16.0)  # 19 < 1.2 x 16
    assert needed is None and verdict.startswith("input-bound: the model trains at 16.0")
    assert "at most 19.0 with 2 worker(s)" in verdict and "precompute" in verdict
    needed, verdict = input_verdict(rows, 16.0, store_ips=40.0)  # the store would do it
    assert needed is None and verdict.endswith(
        "From the resized-image store it gives 40.0 (>= 1.2x): train with --resized-cache"
    )
    _, verdict = input_verdict(rows, 16.0, store_ips=17.0)  # it would not
    assert "the resized-image store gives 17.0. Freeze more" in verdict


def test_quiet_json_tensorboard_curves_and_runs(make_folder, tmp_path):
    from PIL import Image

    data = make_folder(per_class=8)
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "finetune",
            str(data),
            "-o",
            "runs/q",
            "--freeze",
            "all",
            "--tensorboard",
            "--json",
            *FAST,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert summary["run"] == "runs/q" and summary["optimizer_steps"] > 0
    assert [p["phase"] for p in summary["phases"]] == ["head", "fine-tune"]
    run = tmp_path / "runs" / "q"
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    with Image.open(run / "training_curves.png") as im:
        assert im.format == "PNG" and im.size == (1100, 400)

    (tmp_path / "runs" / "q2.incomplete-0000").mkdir()  # not resumable: no identity, not listed
    listed = CliRunner().invoke(cli, ["runs", "--json"])
    rows = json.loads(listed.stdout)
    assert [r["run"] for r in rows] == ["q"]
    assert rows[0]["best_val_accuracy"] == summary["best"]["val_accuracy"]
    assert rows[0]["backbone"] == "test_resnet" and rows[0]["freeze"] == "--freeze all"
    table = CliRunner().invoke(cli, ["runs"]).output
    assert "q " in table and "--freeze all" in table


def test_each_kind_of_error_has_one_exit_code(make_folder, tmp_path):
    """2 options, 6 caches, 7 an output already there: the same kind, the same code, whichever
    command meets it (README, "Exit codes")."""
    data = make_folder(per_class=4)
    for command in (
        ["finetune", str(data), "--val-fraction", "1.5"],
        ["precompute-features", str(data), "--val-fraction", "1.5"],
    ):
        result = invoke(*command)
        assert result.exit_code == 2, result.output
        assert "'--val-fraction': 1.5 is not in the range 0<x<1" in result.output
    merge = invoke("cache", "merge", "--cache-dir", str(tmp_path / "nothing"))
    assert merge.exit_code == 6 and "no shards to merge" in merge.output
    (tmp_path / "notes.json").write_text("{}")
    report = invoke("check-data", str(data), "-o", str(tmp_path / "notes.json"))
    assert report.exit_code == 7 and "is not a tlkit data report" in report.output
    for result in (merge, report):
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_every_choice_comes_from_one_module():
    """The CLI's click.Choice lists are the constants the configs check against."""
    from tlkit.cli import cli
    from tlkit.core import choices

    offered = {
        tuple(p.type.choices)
        for c in cli.commands.values()
        for p in getattr(c, "params", [])
        if isinstance(p.type, click.Choice)
    }
    constants = {v for k, v in vars(choices).items() if k.isupper() and isinstance(v, tuple)}
    assert offered <= constants, offered - constants
