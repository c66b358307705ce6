"""The head phase as a probe on pooled features, its step rule, and --augment auto."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from tlkit.core.settings import Loader
from tlkit.data.augment import resolve_augment
from tlkit.models.freezing import FreezeRequest
from tlkit.training.config import FinetuneConfig
from tlkit.training.head import CHECK_EVERY, MIN_HEAD_STEPS, feature_views, head_steps


def test_head_steps_count_optimizer_steps_not_epochs():
    # 50 images, batch 32: 5 epochs would be 10 steps; the head gets MIN_HEAD_STEPS
    assert head_steps(50, 32, 5) == MIN_HEAD_STEPS
    # on plenty of data the epochs give more than the minimum: they count
    assert head_steps(10_000, 32, 5) == 5 * 313
    assert head_steps(50, 32, 0) == MIN_HEAD_STEPS


def test_feature_views_follow_the_augmentation_and_memory():
    assert feature_views(True, 5, 100, 2048) == 5  # --head-views 5
    assert feature_views(False, 5, 100, 2048) == 1  # no randomness: every view is the eval view
    # 100k images x 2048 floats is 0.8 GB a view: two fit in the 2 GiB budget
    assert feature_views(True, 5, 100_000, 2048) == 2


def tinted_folder(root: Path, per_class: int, seed: int) -> Path:
    """Two classes told apart by colour alone, with equal grey levels (ToGray erases them)."""
    rng = np.random.default_rng(seed)
    for name, channel, level in (("red", 0, 200), ("green", 1, 102)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.zeros((24, 24, 3), np.int32)
            img[..., channel] = level
            img += rng.integers(0, 40, (24, 24, 1))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def quick_config(data: Path, out: Path, **kw) -> FinetuneConfig:
    values = {
        "data": str(data),
        "backbone": TINY,
        "weights": "none",
        "input_size": 32,
        "batch_size": 8,
        "freeze": FreezeRequest(count="all"),
        "head_epochs": 2,
        "epochs": 0,
        "output": str(out),
        "workers": 2,
        **kw,
    }
    return FinetuneConfig.of(**values)


def test_head_phase_trains_to_the_step_rule_and_keeps_its_best_weights(make_folder, tmp_path):
    import keras

    from tlkit.training.train import finetune

    data = make_folder(per_class=10, layout="splits", classes=("cat", "dog", "cow"))
    run = finetune(quick_config(data, tmp_path / "run"))
    results = run.record.results
    head = results["phases"][0]
    assert head["phase"] == "head"
    # 30 images at batch 8 are 4 steps an epoch: two epochs would have been 8 steps
    assert head["optimizer_steps"] == MIN_HEAD_STEPS
    with open(run.path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["val_loss"]) for r in rows]
    assert len(rows) == math.ceil(MIN_HEAD_STEPS / CHECK_EVERY)  # a check every 10 steps
    # the saved model is the best check's, not the last one's
    model = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    from tlkit.data.augment import eval_transform
    from tlkit.data.datasets import load_dataset
    from tlkit.data.decode import decode_image

    val = load_dataset(str(data)).splits["val"]
    x = np.stack([eval_transform(decode_image(e.path), 32, 0.875) for e in val])
    y = np.array([e.label for e in val])
    probs = model.predict(x, verbose=0)
    loss = float(-np.log(probs[np.arange(len(y)), y]).mean())
    assert loss == pytest.approx(min(losses), rel=1e-3, abs=1e-5)
    assert results["best"]["val_loss"] == pytest.approx(min(losses))
    assert results["head_probe"]["views"] == 1  # the eval view: a linear probe
    assert results["head_probe"]["feature_rows"] == 30

    # --head-views 3 with a random augmentation: the head sees 3 augmented views of each image
    views = finetune(quick_config(data, tmp_path / "views", head_views=3)).record.results
    assert views["head_probe"]["views"] == 3
    assert views["head_probe"]["feature_rows"] == 90
    assert views["head_probe"]["augment"] == "light"


def test_augment_auto_picks_the_candidate_that_keeps_the_signal(tmp_path, monkeypatch):
    """Colour is the class; a candidate that greys every view cannot learn it."""
    import tlkit.training.head
    from tlkit.training.train import finetune

    monkeypatch.setattr(
        tlkit.training.head,
        "AUTO_CANDIDATES",
        (
            ("grey", "none", {"extra": ['ToGray:{"p": 1.0}']}),
            ("none", "none", {}),
        ),
    )
    data = tmp_path / "data"
    tinted_folder(data / "train", 12, 0)
    tinted_folder(data / "val", 6, 1)
    run = finetune(
        quick_config(data, tmp_path / "run", augment=resolve_augment("auto", allow_auto=True))
    )
    search = run.record.augment["search"]
    assert [s["augment"] for s in search] == ["grey", "none"]
    grey, plain = search
    assert grey["val_loss"] > 0.6  # chance is ln 2 = 0.69: grey views carry no class
    assert plain["val_loss"] < grey["val_loss"] - 0.15 and plain["val_accuracy"] == 1.0
    assert plain["chosen"] and not grey["chosen"] and grey["se_above_best"] > 1
    assert run.record.augment["extra"] == []  # the chosen one: no ToGray
    assert run.record.config["augment"]["preset"] == "auto"  # what was asked for
    saved = json.loads((run.path / "run.json").read_text())
    assert saved["results"]["best"]["val_accuracy"] == 1.0


def test_augment_auto_is_refused_outside_finetune(make_folder):
    from click.testing import CliRunner

    from tlkit.cli import cli

    data = make_folder(per_class=4)
    result = CliRunner().invoke(
        cli,
        ["precompute-features", str(data), "--weights", "none", "--augment", "auto"],
        catch_exceptions=False,
    )
    assert result.exit_code == 2
    assert "--augment auto is chosen while training" in result.output
    assert "Traceback" not in result.output
    assert not Path("cache").exists()


def _tlkit_lines() -> tuple[list[str], Any]:
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("tlkit")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)

    def close() -> None:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    return lines, close


def test_the_head_estimate_leaves_the_fine_tune_phase_to_its_own_timed_steps():
    from tlkit.training.timing import log_estimate

    lines, close = _tlkit_lines()
    try:
        log_estimate(0.08, 1518, 1264, 10)  # ~80 ms a forward pass; the quickstart's images
        log_estimate(0.08, 1518, 1264, 0)
    finally:
        close()
    tuned, head_only = lines
    assert "head phase about 2 min (1518 forward passes)" in tuned
    assert "fine-tune phase (10 epoch(s) of 1264 images) is timed on its first training" in tuned
    assert "fine-tune" not in head_only


def test_the_step_timer_extrapolates_timed_steps_and_says_what_shortens_a_long_run(monkeypatch):
    """A fake clock: the first step (tracing) takes 10 s, the three skipped steps 1 s each,
    the eight timed steps 1 s each; 1000 steps an epoch, a 60 s validation pass, 10 epochs."""
    import tlkit.training.timing as timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    state: dict[str, Any] = {}
    lines, close = _tlkit_lines()
    try:
        timer = timing.step_timer("fine-tune", 10, 0, 1000, 60.0, state.setdefault("estimates", {}))
        for step in range(20):
            timer.on_train_batch_begin(step)
            clock[0] += 10.0 if step == 0 else 1.0
            timer.on_train_batch_end(step)
    finally:
        close()
    (line,) = lines
    assert state["estimates"]["fine-tune"] == {
        "step_seconds": 1.0,
        "epoch_seconds": 1060.0,
        "phase_seconds": 10609.0,
        "validation_included": True,
    }
    assert (
        "1000 ms per training step (timed over 8 step(s)): 1000 steps and a validation pass"
        " of about 60 s an epoch, about 18 min; up to about 2.9 h for 10 epoch(s)" in line
    )
    assert "That is long: --freeze all" in line and "smaller --input-size" in line


@pytest.mark.slow  # a real finetune with enough steps to time: the estimate against the clock
def test_the_fine_tune_estimate_holds_against_the_measured_phase(
    make_folder, tmp_path, monkeypatch
):
    import json

    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    monkeypatch.chdir(tmp_path)
    data = make_folder(per_class=48)
    lines, close = _tlkit_lines()
    try:
        run = finetune(
            FinetuneConfig.of(
                data=str(data),
                backbone=TINY,
                weights="none",
                freeze=FreezeRequest(count="3"),
                batch_size=4,
                head_epochs=1,
                epochs=3,
                patience=5,
                output=str(tmp_path / "r"),
                workers=1,
            )
        )
    finally:
        close()
    record = json.loads((Path(run.path) / "run.json").read_text())
    tune = next(p for p in record["results"]["phases"] if p["phase"] == "fine-tune")
    assert tune["epochs_run"] == 3
    ratio = tune["seconds"] / tune["estimated_seconds"]
    assert 0.5 <= ratio <= 2.0, (tune["seconds"], tune["estimated_seconds"])
    assert any(
        "ms per training step (timed over 8 step(s)): 20 steps and a validation pass" in line
        for line in lines
    ), lines


def test_one_view_is_the_eval_view_whatever_the_augmentation(make_folder):
    """--head-views 1 is a linear probe on the eval crop, also when --augment is random."""
    import keras

    from tlkit.data.augment import TrainTransform, eval_transform
    from tlkit.data.datasets import load_dataset
    from tlkit.data.decode import decode_image
    from tlkit.features.rows import extract

    folder = load_dataset(str(make_folder(per_class=5)))
    train, val = folder.splits["train"], folder.splits["val"]
    mean_colour = keras.Sequential(
        [
            keras.Input((32, 32, 3), dtype="uint8"),
            keras.layers.Rescaling(1.0),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    light = TrainTransform(resolve_augment("light"), 32, 0.875)
    loader = Loader(4, workers=1, max_pixels=10**8, seed=0)
    one = extract(mean_colour, train, val, light, 1, loader)
    expected = np.stack(
        [eval_transform(decode_image(e.path), 32, 0.875).mean(axis=(0, 1)) for e in train]
    )
    np.testing.assert_allclose(one.train, expected, rtol=1e-5)
    two = extract(mean_colour, train, val, light, 2, loader)
    assert two.train.shape == (2 * len(train), 3) and two.views == 2
    assert not np.allclose(two.train[: len(train)], expected)  # augmented: crops and mirrors
    np.testing.assert_allclose(two.val, one.val)  # validation: always the eval view


def auto_config(data: Path, out: Path, trunk: Path, epochs: int, grey: bool) -> FinetuneConfig:
    """--freeze auto on a trunk whose head alone cannot learn; `grey`: training views in grey,
    so that only the search's tail (trained on the eval view) can tell the colours apart."""
    return quick_config(
        data,
        out,
        weights=str(trunk),
        freeze=FreezeRequest(count="auto"),
        epochs=epochs,
        lr=0.05,
        fine_tune_lr=0.02,
        augment=resolve_augment("none", ['ToGray:{"p": 1.0}'] if grey else []),
    )


@pytest.mark.slow  # about 20 s: two runs, each with two candidate tails and a fine-tune
@pytest.mark.parametrize("grey", [False, True])
def test_freeze_auto_trains_a_stage_when_the_frozen_features_carry_nothing(tmp_path, grey):
    """A trunk whose last stage outputs a constant: head only cannot learn, training that
    stage can. auto must see it on the validation split; a tail having beaten the head, the
    fine-tune phase trains the whole network, and the run saves whichever of the search's tail
    and the run's best epoch has the lower validation loss. Trained on greyed views (colour is
    the class), the fine-tune phase cannot learn, and the search's tail (the eval view) is
    saved."""
    import keras

    from tlkit.core.fsutil import artifact_problem
    from tlkit.data.datasets import load_dataset
    from tlkit.data.pipeline import eval_dataset
    from tlkit.models.backbones import get_backbone
    from tlkit.training.train import finetune

    trunk = _constant_last_stage(tmp_path / "trunk.weights.h5")
    base = get_backbone(TINY).build(32)
    base.load_weights(trunk)
    data = tmp_path / "data"
    tinted_folder(data / "train", 12, 0)
    tinted_folder(data / "val", 6, 1)
    run = finetune(auto_config(data, tmp_path / "run", trunk, epochs=4, grey=grey))
    search = run.record.freeze["search"]
    assert [s["candidate"] for s in search] == [
        "head only",
        "--freeze-blocks 3",
        "--freeze-blocks 2",
    ]
    head_only = search[0]
    assert head_only["val_loss"] == pytest.approx(math.log(2), abs=0.05)  # chance
    chosen = [s for s in search if s["chosen"]]
    assert len(chosen) == 1 and chosen[0]["candidate"] != "head only"
    assert chosen[0]["val_loss"] < head_only["val_loss"] / 2
    # the fine-tune phase trained the whole network
    assert run.record.freeze["n_frozen"] == 0
    assert run.record.freeze["request"] == (
        f"--freeze auto (the whole network, against {chosen[0]['candidate']})"
    )
    assert run.record.config["freeze"]["count"] == "auto"  # what was asked for
    best = run.record.results["best"]
    with open(run.path / "history.csv") as f:
        trained = [float(r["val_loss"]) for r in csv.DictReader(f) if r["phase"] == "fine-tune"]
    assert len(trained) >= 1
    assert best["val_loss"] == pytest.approx(min(chosen[0]["val_loss"], *trained), rel=1e-6)
    assert best["phase"] == ("freeze-search" if grey else "fine-tune")
    # the model saved is the one that scored best: its validation loss is best's
    model = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    val = load_dataset(data).splits["val"]
    probs = np.concatenate(
        [model.predict(x, verbose=0) for x, _ in eval_dataset(val, 32, 0.875, Loader(8))]
    )
    labels = np.array([e.label for e in val])
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(val)), labels], 1e-7, 1)))
    assert loss == pytest.approx(best["val_loss"], rel=1e-3, abs=1e-4)
    if best["phase"] == "freeze-search":  # the tail alone trained: the stem is the trunk's
        np.testing.assert_array_equal(
            model.get_layer("backbone").get_layer("stem_conv").get_weights()[0],
            base.get_layer("stem_conv").get_weights()[0],
        )
    with open(run.path / "search.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["setting"], r["candidate"], r["chosen"]) for r in rows] == [
        ("freeze", s["candidate"], str(int(s["chosen"]))) for s in search
    ]
    # compared, so dropped from the finished run; a run published with it is still tlkit's
    assert not (run.path / "checkpoints" / "search.h5").exists()
    (run.path / "checkpoints" / "search.h5").write_bytes(b"")
    assert artifact_problem(run.path, "run") is None


@pytest.mark.slow  # about 10 s: a search and a fine-tune, interrupted and resumed
def test_freeze_auto_keeps_the_searchs_tail_across_a_resume(tmp_path, monkeypatch):
    """The search's trained tail is on disk from the run's start: a run interrupted in its
    fine-tune phase and resumed still compares it, and saves it when it scores best."""
    import tlkit.training.phases
    from tlkit.core.errors import Interrupted
    from tlkit.training.train import finetune

    base = _constant_last_stage(tmp_path / "trunk.weights.h5")
    data = tmp_path / "data"
    tinted_folder(data / "train", 12, 0)
    tinted_folder(data / "val", 6, 1)
    real = tlkit.training.phases.save_epoch

    def dies_in_the_fine_tune(directory, model, optimizer, state, improved):
        real(directory, model, optimizer, state, improved)
        if state["phase"] == "fine-tune":
            raise KeyboardInterrupt  # as Ctrl-C right after the first fine-tune epoch

    monkeypatch.setattr(tlkit.training.phases, "save_epoch", dies_in_the_fine_tune)
    config = auto_config(data, tmp_path / "run", base, epochs=3, grey=True)
    with pytest.raises(Interrupted):
        finetune(config)
    monkeypatch.setattr(tlkit.training.phases, "save_epoch", real)
    run = finetune(resume=tmp_path / "run")
    chosen = [s for s in run.record.freeze["search"] if s["chosen"]]
    assert chosen[0]["candidate"] != "head only"
    assert run.record.resumed
    best = run.record.results["best"]
    assert best["phase"] == "freeze-search"
    assert best["val_loss"] == pytest.approx(chosen[0]["val_loss"], rel=1e-9)


def _constant_last_stage(path: Path) -> Path:
    """The tiny backbone's weights with its last stage outputting a constant: a frozen trunk
    carries no signal to the head, training that stage brings it back."""
    from tlkit.models.backbones import get_backbone

    base = get_backbone(TINY).build(32)
    conv, bn = base.get_layer("block3_conv"), base.get_layer("block3_bn")
    conv.set_weights([np.zeros_like(w) for w in conv.get_weights()])
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, np.ones_like(beta), mean, var])  # relu(0 + 1): constant, not dead
    base.save_weights(path)
    return path


def test_freeze_auto_is_refused_outside_finetune(make_folder):
    from click.testing import CliRunner

    from tlkit.cli import cli

    data = make_folder(per_class=4)
    result = CliRunner().invoke(
        cli,
        [
            "precompute-features",
            str(data),
            "--backbone",
            TINY,
            "--weights",
            "none",
            "--freeze",
            "auto",
        ],
    )
    assert result.exit_code == 2
    assert result.output.strip().endswith(
        "--freeze auto is only for `tlkit finetune`, which "
        "picks the freeze point on the validation split; "
        "here give a number, 'all', --freeze-to or "
        "--freeze-blocks. Received: auto"
    )
    assert "Traceback" not in result.output


@pytest.mark.slow  # about 9 s: a tiny run with a fine-tune phase
def test_keras_callbacks_from_python_join_the_fine_tune_phase(make_folder, tmp_path):
    """`finetune(callbacks=...)`: a user's callback sees each fine-tune epoch's logs after tlkit
    recorded it, and stopping training from it ends the phase (the run is still written)."""
    import keras

    from tlkit.training.train import finetune

    class StopAfterTwo(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, float]] = []

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            self.seen.append((epoch, float((logs or {})["val_loss"])))
            self.model.stop_training = len(self.seen) == 2

    data = make_folder(per_class=10, layout="splits", classes=("cat", "dog", "cow"))
    spy = StopAfterTwo()
    config = quick_config(
        data, tmp_path / "run", freeze=FreezeRequest(count="0"), epochs=4, patience=4
    )
    run = finetune(config, verbose=0, callbacks=[spy])
    with open(run.path / "history.csv") as f:
        tuned = [r for r in csv.DictReader(f) if r["phase"] == "fine-tune"]
    assert [e for e, _ in spy.seen] == [0, 1] and len(tuned) == 2
    assert [float(r["val_loss"]) for r in tuned] == pytest.approx([v for _, v in spy.seen])


def mlp_head(pooled: Any, num_classes: int) -> Any:
    """A user's head: a hidden layer before the softmax."""
    import keras

    x = keras.layers.Dense(16, activation="relu", name="hidden")(pooled)
    return keras.layers.Dense(num_classes, activation="softmax", name="classes")(x)


def make_head(width: int) -> Any:
    """Heads from one factory: the same function name, other layers."""

    def head(pooled: Any, num_classes: int) -> Any:
        import keras

        x = keras.layers.Dense(width, activation="relu")(pooled)
        return keras.layers.Dense(num_classes, activation="softmax")(x)

    return head


@pytest.mark.slow  # about 10 s: a tiny run with a fine-tune phase, evaluated and resumed
def test_a_head_from_python_is_trained_saved_and_guarded(make_folder, tmp_path, monkeypatch):
    """`finetune(head=...)`: the user's head is what the probe trains (its validation loss
    falls), it is in model.keras as saved, named in run.json and identity.json; a resume
    without it, the activation maps and --calibrate refuse it in one line."""
    import keras

    from tlkit.core.errors import RunError
    from tlkit.evaluation.explain import class_maps
    from tlkit.training.train import finetune

    data = make_folder(per_class=10, layout="splits", classes=("cat", "dog", "cow"))
    config = quick_config(data, tmp_path / "run", freeze=FreezeRequest(count="0"), epochs=1)
    run = finetune(config, verbose=0, head=mlp_head)
    assert run.record.head.startswith("test_head.mlp_head (layers ")
    assert json.loads((run.path / "run.json").read_text())["head"] == run.record.head
    model = keras.saving.load_model(run.path / "model.keras", safe_mode=True)
    assert [la.name for la in model.layers[-3:]] == ["pool", "hidden", "classes"]
    with open(run.path / "history.csv") as f:
        head_rows = [float(r["val_loss"]) for r in csv.DictReader(f) if r["phase"] == "head"]
    assert min(head_rows) < head_rows[0]  # the probe trained the user's head
    with pytest.raises(RunError, match="activation maps needs a head that is a softmax Dense"):
        class_maps(model, np.zeros((1, 32, 32, 3), np.uint8), [0])
    # eval and diagnose take it as any run (the dense view too: the head on the whole map's
    # average), their reports without the maps, said; predict --explain refuses it up front
    from tlkit.evaluation.diagnose import DiagnoseConfig, diagnose
    from tlkit.evaluation.evaluate import EvalConfig, evaluate
    from tlkit.evaluation.explain import no_maps
    from tlkit.evaluation.predict import predict

    why = no_maps(model)
    assert why is not None and "this run's head is another" in why
    for views in ("1", "dense"):
        scored = evaluate(EvalConfig(runs=(str(run.path),), split="val", multicrop=views))
        assert 0.0 <= scored["top1"] <= 1.0 and why in scored["notes"]
    assert diagnose(DiagnoseConfig(run=str(run.path)))["activation_maps"] == why
    picture = next((data / "val").rglob("*.png"))
    with pytest.raises(
        RunError, match="--explain: activation maps left out: they read the weights of tlkit's"
    ):
        predict(run, [picture], explain=tmp_path / "maps")
    assert not (tmp_path / "maps").exists()
    assert predict(run, [picture])[0]["path"] == str(picture)

    # mlp_head ends in a softmax Dense, which --calibrate scales; a Softmax layer it cannot
    def softmax_layer_head(pooled: Any, num_classes: int) -> Any:
        return keras.layers.Softmax()(keras.layers.Dense(num_classes)(pooled))

    with pytest.raises(RunError, match="--calibrate needs a head that is a softmax Dense"):
        cal = quick_config(data, tmp_path / "cal", calibrate=True)
        finetune(cal, verbose=0, head=softmax_layer_head)
    assert not (tmp_path / "cal").exists()

    # an interrupted run of this head resumes only with it
    import tlkit.training.phases
    from tlkit.core.errors import Interrupted

    real = tlkit.training.phases.save_epoch

    def dies_in_the_fine_tune(directory, model, optimizer, state, improved):
        real(directory, model, optimizer, state, improved)
        if state["phase"] == "fine-tune":
            raise KeyboardInterrupt

    monkeypatch.setattr(tlkit.training.phases, "save_epoch", dies_in_the_fine_tune)
    cut = quick_config(data, tmp_path / "cut", freeze=FreezeRequest(count="0"), epochs=2)
    with pytest.raises(Interrupted):
        finetune(cut, verbose=0, head=make_head(16))
    monkeypatch.setattr(tlkit.training.phases, "save_epoch", real)
    with pytest.raises(RunError, match="cannot resume with head linear; the run started with head"):
        finetune(verbose=0, resume=tmp_path / "cut")
    with pytest.raises(RunError, match=r"cannot resume with head test_head.make_head.<locals>"):
        finetune(verbose=0, resume=tmp_path / "cut", head=make_head(32))  # same name, wider
    resumed = finetune(verbose=0, resume=tmp_path / "cut", head=make_head(16))
    assert resumed.record.head.startswith("test_head.make_head.<locals>.head (layers ")
    assert resumed.record.resumed


def test_a_head_of_the_wrong_shape_is_one_line(tmp_path):
    from tlkit.core.errors import ConfigError
    from tlkit.models.backbones import get_backbone
    from tlkit.models.model import build_classifier

    spec = get_backbone(TINY)
    with pytest.raises(ConfigError, match=r"head: must return \(batch, 3\) class probabilities"):
        build_classifier(spec, spec.build(32), 3, 32, head=lambda pooled, n: pooled)
    with pytest.raises(ConfigError, match=r"head: must be a function .* Received: 'dense'"):
        build_classifier(spec, spec.build(32), 3, 32, head="dense")  # type: ignore[arg-type]


def test_a_head_that_safe_mode_cannot_load_is_refused_before_training():
    """A Lambda layer would train and save, then no command could open model.keras."""
    import keras

    from tlkit.core.errors import ConfigError
    from tlkit.models.backbones import get_backbone
    from tlkit.models.model import build_classifier, check_user_head

    def lambda_head(pooled: Any, num_classes: int) -> Any:
        x = keras.layers.Lambda(lambda t: t * 2.0)(pooled)
        return keras.layers.Dense(num_classes, activation="softmax")(x)

    spec = get_backbone(TINY)
    with pytest.raises(ConfigError, match="head: its layers cannot be loaded back in Keras' safe"):
        check_user_head(build_classifier(spec, spec.build(32), 3, 32, head=lambda_head))
    check_user_head(build_classifier(spec, spec.build(32), 3, 32, head=mlp_head))  # loads
