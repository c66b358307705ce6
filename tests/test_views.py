"""Test-time views: the view sets, which ones training showed, the choice on validation, dense
evaluation and one trace per model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_folder
from PIL import Image

from tlkit.cli import cli
from tlkit.core.errors import ConfigError
from tlkit.core.runs import load_run
from tlkit.data.augment import eval_transform
from tlkit.evaluation.evaluate import Member, ViewRunner
from tlkit.evaluation.views import (
    CROP_SETS,
    ViewsSeen,
    candidates,
    center_index,
    choose,
    choose_by,
    crop_views,
    dense_input,
    subset,
    unseen,
    val_scorer,
)

CENTRE_ONLY = ViewsSeen("center", (1.0, 1.0), (1.0, 1.0), False, "eval view")
LIGHT = ViewsSeen("crop", (1 / 0.875, 1 / 0.875), (0.08, 1.0), True, "light")


def test_crop_sets_are_the_classic_views_and_nest():
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ten = crop_views(img, 32, 0.875, "10")
    assert ten.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(ten[center_index("10")], eval_transform(img, 32, 0.875))
    np.testing.assert_array_equal(ten[5:], ten[:5, :, ::-1])  # the mirrors
    for superset in ("10", "multiscale"):
        views = crop_views(img, 32, 0.875, superset)
        for mode in CROP_SETS:
            if (
                len(CROP_SETS[mode]) <= len(CROP_SETS[superset])
                and mode != superset
                and set(CROP_SETS[mode]) <= set(CROP_SETS[superset])
            ):
                np.testing.assert_array_equal(
                    views[subset(superset, mode)], crop_views(img, 32, 0.875, mode)
                )
    assert crop_views(img, 32, 0.875, "multiscale").shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(
        crop_views(img, 32, 0.875, "2")[1], eval_transform(img, 32, 0.875)[:, ::-1]
    )
    with pytest.raises(ConfigError, match="--multicrop must be one of"):
        crop_views(img, 32, 0.875, "7")
    assert dense_input(img, 32, 0.875).shape == (37, 56, 3)  # shorter side at the eval scale


def test_candidates_follow_the_views_training_showed():
    assert candidates(CENTRE_ONLY, 0.875) == ["1"]
    mirror_only = ViewsSeen("center", (1.0, 1.0), (1.0, 1.0), True, "flip")
    assert candidates(mirror_only, 0.875) == ["1", "2"]
    # light: crops at the eval scale and mirrors; multiscale's other scales were never seen
    assert candidates(LIGHT, 0.875) == ["1", "2", "dense", "5", "10"]
    assert "shorter side 1x, 1.71x" in unseen("multiscale", LIGHT, 0.875)
    no_mirror = ViewsSeen("crop", (1 / 0.875, 1 / 0.875), (0.08, 1.0), False, "crop")
    assert candidates(no_mirror, 0.875) == ["1", "dense", "5"]
    standard = ViewsSeen("resized-crop", (1.0, 1.0), (0.08, 1.0), True, "standard")
    assert candidates(standard, 0.875) == ["1", "2", "dense", "5", "10", "multiscale"]
    tight = ViewsSeen("resized-crop", (1.0, 1.0), (0.9, 1.0), True, "tight")  # crops >= 90%
    assert candidates(tight, 0.875) == ["1", "2"]  # a 5-crop covers 77% of the area
    vgg = ViewsSeen("crop", (256 / 224, 512 / 224), (0.08, 1.0), True, "vgg")
    assert candidates(vgg, 0.875) == ["1", "2", "dense", "5", "10"]
    assert unseen("10", CENTRE_ONLY, 0.875) == (
        "mirrored views (training never mirrored); off-centre content (training saw the "
        "centre crop only)"
    )


def test_choose_keeps_single_crop_when_every_other_candidate_is_worse_on_val():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 40)
    good = np.full((40, 3), 0.1)
    good[np.arange(40), labels] = 0.8
    worse = np.full((40, 3), 0.25)
    worse[np.arange(40), labels] = 0.5
    worse[:8] = worse[:8, ::-1]  # and some wrong
    chosen, rows = choose({"1": good, "2": worse, "10": worse * 0.9 + 0.1 / 3}, labels)
    assert chosen == "1"
    assert [r["views"] for r in rows] == ["1", "2", "10"]
    assert rows[1]["below_single_crop"] and rows[0]["se_above_best"] == 0.0


def test_choose_never_takes_a_lower_top1_for_a_lower_loss_and_takes_a_clear_gain():
    labels = np.array([0, 1] * 20)
    single = np.where(np.eye(2)[labels] == 1, 0.55, 0.45)  # right, barely
    confident_but_wrong_once = np.where(np.eye(2)[labels] == 1, 0.99, 0.01)
    confident_but_wrong_once[0] = [0.4, 0.6]
    chosen, rows = choose({"1": single, "10": confident_but_wrong_once}, labels)
    assert chosen == "1" and rows[1]["below_single_crop"]
    assert rows[1]["val_loss"] < rows[0]["val_loss"]  # lower loss, yet below single-crop
    chosen, _ = choose({"1": single, "10": np.where(np.eye(2)[labels] == 1, 0.9, 0.1)}, labels)
    assert chosen == "10"


def test_the_choice_from_per_image_scores_is_the_choice_from_the_probabilities():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 50)
    views = rng.dirichlet(np.ones(4), (50, 10)) * 0.5 + 0.5 * np.eye(4)[labels][:, None]
    views[:7] = views[:7, :, ::-1]  # some wrong, so that the candidates differ in top-1
    named = [(m, subset("10", m)) for m in ("1", "2", "5", "10")]
    reduce = val_scorer(labels, [named])
    kept = np.concatenate([reduce(0, views[s : s + 8]) for s in range(0, 50, 8)])  # in batches
    assert kept.shape == (50, 2 * len(named))  # not 50 x 10 views x 4 classes
    losses = {m: kept[:, 2 * n] for n, (m, _) in enumerate(named)}
    hits = {m: kept[:, 2 * n + 1] > 0 for n, (m, _) in enumerate(named)}
    expected = choose({m: views[:, v].mean(axis=1) for m, v in named}, labels)
    assert choose_by(losses, hits) == expected


@pytest.fixture(scope="module")
def crop_trained(tmp_path_factory):
    """A run whose head trained on 3 random crops of each image, never mirrored."""
    root = tmp_path_factory.mktemp("crop_trained")
    data = root / "data"
    write_folder(data / "train", ["a", "b", "c"], 8)
    write_folder(data / "val", ["a", "b", "c"], 3, seed=1)
    write_folder(data / "test", ["a", "b", "c"], 3, seed=2)
    result = CliRunner().invoke(
        cli,
        [
            "finetune",
            str(data),
            "--backbone",
            TINY,
            "--weights",
            "none",
            "--input-size",
            "32",
            "--freeze",
            "all",
            "--epochs",
            "0",
            "--head-views",
            "3",
            "--augment",
            "light",
            "--flip-p",
            "0",
            "--no-cache",
            "-o",
            str(root / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    return data, root / "run"


def test_a_run_trained_without_mirroring_gets_no_mirrored_views_by_default(crop_trained):
    _data, run = crop_trained
    seen = json.loads((run / "run.json").read_text())["views_seen"]
    assert seen["crop"] == "crop" and seen["mirror"] is False and "head phase" in seen["why"]
    result = CliRunner().invoke(cli, ["eval", str(run), "--multicrop", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{") :])
    views = metrics["views"][0]
    assert [c["views"] for c in views["candidates"]] == ["1", "dense", "5"]
    assert views["views"] in ("1", "dense", "5") and metrics["multicrop"] == "auto"
    # the candidate "1" is scored on the validation split exactly as eval of that split scores it
    val = CliRunner().invoke(cli, ["eval", str(run), "--split", "val", "--json"])
    assert views["candidates"][0]["val_top1"] == pytest.approx(
        json.loads(val.output[val.output.index("{") :])["top1"]
    )
    assert views["candidates"][0]["val_loss"] == pytest.approx(
        json.loads(val.output[val.output.index("{") :])["log_loss"], rel=1e-5
    )


def test_auto_keeps_each_candidates_per_image_scores_not_every_views_probabilities(
    crop_trained, monkeypatch
):
    """--multicrop auto kept (validation images x views x classes) float64 per member; what
    the rule reads is each candidate's per-image loss and top-1 hit."""
    from tlkit.evaluation import evaluate

    _data, run = crop_trained
    kept = []
    real = evaluate.ViewRunner.probs

    def spy(self, paths, modes, batch_size, **reduce):
        out = real(self, paths, modes, batch_size, **reduce)
        kept.append([p.shape for p in out if p is not None])
        return out

    monkeypatch.setattr(evaluate.ViewRunner, "probs", spy)
    config = evaluate.EvalConfig(runs=(str(run),), multicrop="auto", name="auto-kept")
    views = evaluate.evaluate(config)["views"][0]
    assert [c["views"] for c in views["candidates"]] == ["1", "dense", "5"]
    n = 9  # validation images
    assert kept[:2] == [[(n, 2 * 2)], [(n, 2)]]  # "1" and "5" from the 5 crops; dense


def test_explicit_ten_crop_on_a_run_that_never_mirrored_warns_and_does_the_classic_ten(
    crop_trained, caplog
):
    _data, run = crop_trained
    result = CliRunner().invoke(cli, ["eval", str(run), "--multicrop", "10", "--json"])
    assert result.exit_code == 0, result.output
    assert "--multicrop 10 includes mirrored views (training never mirrored)" in caplog.text
    views = json.loads(result.output[result.output.index("{") :])["views"][0]
    assert views["count"] == 10 and views["outside_training"].startswith("mirrored views")
    centre_only = CliRunner().invoke(cli, ["eval", str(run), "--multicrop", "5", "--json"])
    assert centre_only.exit_code == 0  # corners at the eval scale: seen
    assert (
        json.loads(centre_only.output[centre_only.output.index("{") :])["views"][0][
            "outside_training"
        ]
        is None
    )


def _feature_map_model(model, height: int, width: int):
    """The classifier rebuilt from its config at a fixed height x width (new layers, the same
    weights), up to the backbone's feature map: independent of tlkit's dense model."""
    import keras

    config = json.loads(
        json.dumps(model.get_config()).replace(
            '"batch_shape": [null, 32, 32, 3]', f'"batch_shape": [null, {height}, {width}, 3]'
        )
    )
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return keras.Model(rebuilt.input, rebuilt.get_layer("pool").input)


def test_dense_evaluation_is_the_average_of_the_class_score_map(tiny_runs, tmp_path):
    _data, runs = tiny_runs
    member = Member(load_run(runs[0]))
    path = tmp_path / "wide.png"
    image = np.random.default_rng(3).integers(0, 256, (30, 52, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    whole = dense_input(image, 32, member.crop)  # 37 x 64
    assert whole.shape == (37, 64, 3)
    features = np.asarray(_feature_map_model(member.model, 37, 64)(whole[None]))[0]
    assert features.shape[:2] != (1, 1)  # a real map, not one location
    kernel, bias = member.model.get_layer("predictions").get_weights()
    score_map = features @ kernel + bias  # the class scores at every location
    logits = score_map.mean(axis=(0, 1))
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    probs = ViewRunner([member]).probs([str(path)], "dense", 4)[0]
    assert probs.shape == (1, 1, 3)  # the run never mirrored: one pass
    np.testing.assert_allclose(probs[0, 0], expected, atol=1e-5)
    # with mirroring seen, the mirrored whole image is the second pass
    member.seen = LIGHT
    both = ViewRunner([member]).probs([str(path)], "dense", 4)[0]
    flipped = np.asarray(_feature_map_model(member.model, 37, 64)(whole[None, :, ::-1]))[0]
    logits = (flipped @ kernel + bias).mean(axis=(0, 1))
    np.testing.assert_allclose(both[0, 1], np.exp(logits) / np.exp(logits).sum(), atol=1e-5)
    np.testing.assert_allclose(both[0, 0], probs[0, 0], atol=1e-6)


def test_one_trace_per_model_across_batches_view_sets_and_splits(tiny_runs):
    data, runs = tiny_runs
    members = [Member(load_run(r)) for r in runs]
    traced = []

    def predictor(model):
        from tlkit.models.distribute import traced_predictor

        traced.append(traced_predictor(model))
        return traced[-1]

    runner = ViewRunner(members, predictor)
    paths = [str(p) for p in sorted((data / "test").rglob("*.png"))]  # 9: last batch of 1
    for mode in ("1", "10", "5"):
        runner.probs(paths, mode, 4)
    runner.probs(paths[:5], "dense", 4)
    runner.probs(paths[:3], "dense", 4)
    assert len(traced) == 5  # the shared trunk, two tails, each member's dense model
    assert [t.traces() for t in traced] == [1] * 5
