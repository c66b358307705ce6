from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_folder
from PIL import Image

from tlkit.cli import cli
from tlkit.core.errors import ConfigError, DataError, RunError
from tlkit.evaluation.evaluate import (
    EvalConfig,
    Member,
    ViewRunner,
    _shared_groups,
    classification_metrics,
    evaluate,
    fit_member_weights,
    greedy_member_weights,
)
from tlkit.evaluation.predict import predict_images
from tlkit.evaluation.views import crop_views


@pytest.fixture
def trained(tiny_runs):
    return tiny_runs


def test_ten_crop_views_are_the_hand_built_crops_and_prediction_is_their_mean(trained):
    import keras

    data, runs = trained
    path = sorted((data / "test" / "b").iterdir())[0]
    image = np.asarray(Image.open(path).convert("RGB"))
    short = round(32 / 0.875)  # the eval scale: 37
    h, w = image.shape[:2]
    s = short / min(h, w)
    # enlarging: bilinear (tlkit averages areas only when it shrinks)
    big = cv2.resize(
        image, (max(short, round(w * s)), max(short, round(h * s))), interpolation=cv2.INTER_LINEAR
    )
    H, W = big.shape[:2]
    crops = [
        big[t : t + 32, x : x + 32]
        for t, x in (
            (0, 0),
            (0, W - 32),
            (H - 32, 0),
            (H - 32, W - 32),
            ((H - 32) // 2, (W - 32) // 2),
        )
    ]
    crops += [np.fliplr(c) for c in crops]
    views = crop_views(image, 32, 0.875, "10")
    for i, crop in enumerate(crops):  # the pixels of every view, in order
        np.testing.assert_array_equal(views[i], crop, err_msg=f"view {i}")
    model = keras.saving.load_model(runs[0] / "model.keras")
    expected = np.asarray(model.predict(np.stack(crops), verbose=0)).mean(axis=0)
    _, probs = predict_images([str(runs[0])], [str(path)], multicrop="10")
    np.testing.assert_allclose(probs[0], expected, atol=1e-6)


def test_ensembles_of_one_and_of_two_identical_models_equal_the_model(trained, tmp_path):
    _data, runs = trained
    copy = tmp_path / "copy"
    shutil.copytree(runs[0], copy)
    single = evaluate(EvalConfig(runs=(str(runs[0]),), multicrop="5", name="one"))
    twin = evaluate(EvalConfig(runs=(str(runs[0]), str(copy)), multicrop="5", name="two"))
    assert single["top1"] == twin["top1"] and single["log_loss"] == pytest.approx(
        twin["log_loss"], abs=1e-9
    )
    assert twin["member_disagreement"] == 0.0
    one = (runs[0] / "eval/one/predictions.csv").read_text()
    two = (runs[0] / "eval/two/predictions.csv").read_text()
    assert one == two


def test_shared_trunk_runs_once_and_gives_the_same_probabilities(trained):
    data, runs = trained
    members = [Member(__import__("tlkit").load_run(r)) for r in runs]
    groups = _shared_groups(members)
    assert len(groups) == 1 and groups[0][0] is not None and groups[0][2] == [0, 1]
    paths = [str(p) for p in sorted((data / "test").rglob("*.png"))]
    shared = ViewRunner(members).probs(paths, "1", 4)
    for m, p in zip(members, shared, strict=True):
        alone = ViewRunner([m]).probs(paths, "1", 4)[0]
        np.testing.assert_allclose(p, alone, atol=1e-5)
    assert not np.allclose(shared[0], shared[1])  # the heads differ: two real members


def test_no_forward_pass_takes_more_than_batch_size_views_and_the_probabilities_stay(trained):
    """A pass holds the activations of every row it is given: 32 images x 10 crops of Lite0
    took 4 GB. Crop sets go through batch_size views at a time, dense through at most the
    pixels of batch_size crops, and the probabilities are those of one big pass."""
    from tlkit.models.distribute import traced_predictor

    data, runs = trained
    members = [Member(__import__("tlkit").load_run(r)) for r in runs]  # a shared trunk
    seen = []  # (rows, pixels of raw images) of every call

    def predictor(model):
        traced = traced_predictor(model)

        def predict(x):
            seen.append((len(x), x[0, :, :, 0].size if x.dtype == np.uint8 else 0))
            return traced(x)

        return predict

    paths = [str(p) for p in sorted((data / "test").rglob("*.png"))]  # 24 px: dense 37 x 37
    bounded = ViewRunner(members, predictor)
    for mode in ("10", "multiscale", "dense"):
        small = bounded.probs(paths, [mode, "1" if mode == "dense" else mode], 4)
        assert max(rows for rows, _ in seen) <= 4, (mode, seen)
        assert max(rows * pixels for rows, pixels in seen) <= 4 * 32 * 32, (mode, seen)
        big = ViewRunner(members).probs(paths, [mode, "1" if mode == "dense" else mode], 512)
        for s, b in zip(small, big, strict=True):
            np.testing.assert_allclose(s, b, atol=1e-6)
        seen.clear()


def test_eval_cli_defaults_outputs_and_errors(trained, tmp_path, monkeypatch):
    _data, runs = trained
    monkeypatch.chdir(runs[0].parent)
    (runs[0].parent / "runs").mkdir(exist_ok=True)
    newest = runs[0].parent / "runs" / "newest"
    shutil.copytree(runs[1], newest)
    runner = CliRunner()
    # newest run, its test split; the bare flag is auto: this head-only run saw the eval view
    result = runner.invoke(cli, ["eval", "--multicrop"])
    assert result.exit_code == 0, result.output
    assert "the only views training showed" in result.output
    out = newest / "eval" / "test-cropsauto"
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion_matrix.png",
        "metrics.json",
        "predictions.csv",
        "reliability_diagram.png",
        "report.html",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 9 and metrics["split"] == "test"
    assert [(v["views"], v["count"]) for v in metrics["views"]] == [("1", 1)]
    assert "top5" not in metrics  # 3 classes
    assert len(metrics["confusion_matrix"]) == 3
    assert "data:image/png;base64," in (out / "report.html").read_text()
    again = runner.invoke(cli, ["eval", "--multicrop"])
    assert again.exit_code == 7 and "already exists" in again.output
    as_json = runner.invoke(cli, ["eval", str(newest), "--json", "--name", "j"])
    assert json.loads(as_json.output)["top1"] == pytest.approx(
        json.loads((newest / "eval/j/metrics.json").read_text())["top1"]
    )
    ensemble = runner.invoke(cli, ["eval", *map(str, runs), "--ensemble-weights", "val"])
    assert ensemble.exit_code == 0, ensemble.output
    assert "ensemble" in ensemble.output and "members disagree on" in ensemble.output
    (out,) = (runs[0] / "eval").glob("test-crops1-ensemble2-*")
    weights = json.loads((out / "metrics.json").read_text())["member_weights"]
    assert sum(weights) == pytest.approx(1.0)
    greedy = runner.invoke(
        cli, ["eval", *map(str, runs), "--ensemble-weights", "greedy", "--name", "greedy"]
    )
    assert greedy.exit_code == 0, greedy.output
    chosen = json.loads((runs[0] / "eval/greedy/metrics.json").read_text())
    assert chosen["member_weights_rule"] == "greedy"
    assert sum(chosen["member_weights"]) == pytest.approx(1.0)
    assert all(
        w * 25 == pytest.approx(round(w * 25)) or w in (0, 1) for w in chosen["member_weights"]
    )
    assert "member weights (greedy on " in greedy.output


def test_unknown_class_in_eval_data_is_an_error(trained, tmp_path):
    _data, runs = trained
    other = tmp_path / "other"
    write_folder(other, ["a", "zebra"], 2)
    with pytest.raises(DataError, match="class 'zebra' is unknown to the model"):
        evaluate(EvalConfig(runs=(str(runs[0]),), data=str(other)))
    write_folder(other, ["a"], 2)
    shutil.rmtree(other / "zebra")
    result = evaluate(EvalConfig(runs=(str(runs[0]),), data=str(other)))  # a plain folder
    assert result["images"] == 2 and result["split"] == "all"  # missing classes are fine


def test_eval_cli_on_a_folder_lacking_a_class_and_on_one_with_an_extra_class(trained, tmp_path):
    _data, runs = trained
    lacking = tmp_path / "lacking"
    write_folder(lacking / "test", ["a", "b"], 3, seed=5)
    result = CliRunner().invoke(cli, ["eval", str(runs[0]), str(lacking), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["images"] == 6 and metrics["classes_without_images"] == ["c"]
    assert all(v["support"] == 3 for k, v in metrics["per_class"].items() if k != "c")
    text = CliRunner().invoke(cli, ["eval", str(runs[0]), str(lacking), "--name", "t2"])
    assert "no images of class c in this set" in text.output

    extra = tmp_path / "extra"
    write_folder(extra / "test", ["a", "b", "c", "d"], 2, seed=6)
    refused = CliRunner().invoke(cli, ["eval", str(runs[0]), str(extra)])
    assert refused.exit_code == 3
    assert "class 'd' is unknown to the model" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and "Traceback" not in refused.output
    assert not list((runs[0] / "eval").glob("*.incomplete-*"))


def test_members_with_different_class_maps_are_refused(trained, tmp_path):
    _data, runs = trained
    odd = tmp_path / "odd"
    shutil.copytree(runs[0], odd)
    info = json.loads((odd / "run.json").read_text())
    info["classes"] = ["a", "b", "x"]
    (odd / "run.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"class map differs .*missing \['c'\], extra \['x'\]"):
        evaluate(EvalConfig(runs=(str(runs[0]), str(odd))))


def test_metrics_on_a_known_example():
    classes = ["a", "b", "c"]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 1, 2])
    m = classification_metrics(probs, labels, classes)
    assert m["top1"] == 0.75 and m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert m["per_class"]["a"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
    }
    assert m["per_class"]["b"]["recall"] == 0.5 and m["per_class"]["b"]["precision"] == 1.0
    assert m["most_confused"] == [{"true": "b", "predicted": "a", "count": 1}]
    assert m["macro"]["recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["weighted"]["recall"] == pytest.approx((1 + 2 * 0.5 + 1) / 4)


def test_fitted_weights_prefer_the_better_member():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.05)
    good[np.arange(200), labels] = 0.9
    noise = rng.dirichlet(np.ones(3), 200)
    w = fit_member_weights([good, noise], labels)
    assert w[0] > 0.9 and w.sum() == pytest.approx(1.0)


def test_greedy_selection_keeps_members_that_add_and_drops_those_that_do_not():
    """Caruana's selection with replacement: two members right on different halves of the
    images share the weight (their average beats either); a copy of a member, or noise,
    gets none; and the ensemble's log loss is never above the best member's."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    halves = np.arange(200) < 100

    def right_on(mask: np.ndarray) -> np.ndarray:
        p = np.full((200, 3), 0.2)
        p[np.arange(200), labels] = np.where(mask, 0.6, 0.2)
        return p / p.sum(1, keepdims=True)

    first, second = right_on(halves), right_on(~halves)
    noise = rng.dirichlet(np.ones(3), 200)
    w = greedy_member_weights([first, first.copy(), second, noise], labels)
    assert w[1] == 0 and w[3] == 0 and w[0] == pytest.approx(0.5) and w[2] == pytest.approx(0.5)

    def loss(p: np.ndarray) -> float:
        return float(-np.log(p[np.arange(200), labels]).mean())

    mix = sum(wi * p for wi, p in zip(w, [first, first, second, noise], strict=True))
    assert loss(mix) < min(loss(first), loss(second))
    assert list(greedy_member_weights([first, first.copy()], labels)) == [1.0, 0.0]
    broken = first.copy()
    broken[5] = np.nan
    for fit in (greedy_member_weights, fit_member_weights):
        with pytest.raises(RunError, match="ensemble member 2: its probabilities on the valid"):
            fit([first, broken], labels)


def test_val_weights_are_never_fitted_on_the_images_they_score(trained):
    """The member weights are fitted on the members' own validation split; scoring that split
    (by --split val, or by naming its folder) is refused instead of reporting a fitted figure."""
    data, runs = trained
    runner = CliRunner()
    for extra in (["--split", "val"], [str(data / "val")]):
        refused = runner.invoke(
            cli, ["eval", *map(str, runs), *extra, "--ensemble-weights", "val", "--name", "x"]
        )
        assert refused.exit_code == 2, refused.output
        assert "--ensemble-weights val fits the member weights on" in refused.output
        assert len(refused.output.strip().splitlines()) == 1
    plain = evaluate(
        EvalConfig(
            runs=tuple(map(str, runs)),
            data=str(data / "test"),
            ensemble_weights="val",
            name="plain",
        )
    )  # a plain class folder
    assert plain["split"] == "all" and plain["member_weights_fitted_on"] == f"{data} (val)"


def test_val_weights_favour_the_better_member(trained, tmp_path):
    """A copy of a member whose head is scrambled is worse on the validation split: the fitted
    weights move away from equal, towards the good member."""
    import keras

    data, runs = trained
    bad = tmp_path / "bad"
    shutil.copytree(runs[0], bad)
    model = keras.saving.load_model(bad / "model.keras")
    head = model.get_layer("predictions")
    kernel, bias = head.get_weights()
    head.set_weights([-kernel[:, ::-1] * 5, bias[::-1]])  # confidently wrong
    model.save(bad / "model.keras")
    m = evaluate(
        EvalConfig(
            runs=(str(runs[0]), str(bad)),
            data=str(data / "test"),
            ensemble_weights="val",
            name="fitted",
        )
    )
    good, worse = m["member_weights"]
    assert good > 0.8 and worse < 0.2 and good + worse == pytest.approx(1.0)
    singles = [r["single_crop_top1"] for r in m["comparison"][:2]]
    assert singles[0] > singles[1]  # the copy is indeed the worse member


def test_members_trained_on_different_splits_are_refused(trained, tmp_path):
    _data, runs = trained
    for key, value in (("val_source", "hash-split"), ("fingerprint", "0" * 64)):
        odd = tmp_path / f"odd-{key}"
        shutil.copytree(runs[1], odd)
        info = json.loads((odd / "run.json").read_text())
        info["data"][key] = value
        (odd / "run.json").write_text(json.dumps(info))
        with pytest.raises(
            ConfigError,
            match=rf"{odd}: trained on other data or another "
            rf"split .*{key}",
        ):
            evaluate(EvalConfig(runs=(str(runs[0]), str(odd)), name=key))


def test_scoring_the_split_that_chose_the_checkpoint_says_the_figure_is_optimistic(trained):
    data, runs = trained
    result = CliRunner().invoke(cli, ["eval", str(runs[0]), "--split", "val", "--name", "v"])
    assert result.exit_code == 0, result.output
    assert "optimistic" in result.output
    metrics = json.loads((runs[0] / "eval/v/metrics.json").read_text())
    assert any("optimistic" in n for n in metrics["notes"])
    assert "optimistic" in (runs[0] / "eval/v/report.html").read_text()
    named = evaluate(EvalConfig(runs=(str(runs[0]),), data=str(data / "val"), name="named"))
    assert any("optimistic" in n for n in named["notes"])  # the same images, named as a folder
    clean = evaluate(EvalConfig(runs=(str(runs[0]),), name="t"))  # the test split
    assert not any("optimistic" in n for n in clean["notes"])


def test_a_class_with_no_images_that_is_predicted_counts_in_the_macro_average():
    classes = ["a", "b", "c", "d"]
    probs = np.array([[0.1, 0.1, 0.8, 0], [0.8, 0.1, 0.1, 0], [0.1, 0.8, 0.1, 0]])
    m = classification_metrics(probs, np.array([0, 0, 1]), classes)
    assert m["macro"]["recall"] == pytest.approx((0.5 + 1 + 0) / 3)  # c scored 0, d left out
    assert m["classes_without_images"] == ["c", "d"]
    assert any("no images of class d" in n and "left out of the averages" in n for n in m["notes"])
    assert any(
        "no images of class c" in n and "predicted 1 time" in n and "as 0" in n for n in m["notes"]
    )
    assert not any("class c" in n and "left out" in n for n in m["notes"])


def test_a_float16_member_does_not_share_a_float32_trunk(trained, tmp_path):
    from tlkit.core.runs import load_run
    from tlkit.features.cache import weights_digest
    from tlkit.models.freezing import FreezeRequest
    from tlkit.models.model import backbone_of
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    data, runs = trained
    cfg = FinetuneConfig.of(
        data=str(data),
        backbone=TINY,
        weights="none",
        input_size=32,
        freeze=FreezeRequest(count="all"),
        head_epochs=1,
        epochs=0,
        batch_size=8,
        output=str(tmp_path / "half"),
        cache="off",
        mixed_precision=True,
    )
    half = finetune(cfg, verbose=0)
    members = [Member(load_run(runs[0])), Member(half)]
    same = {weights_digest(backbone_of(m.model).get_weights()) for m in members}
    assert len(same) == 1  # the same trunk weights: only the compute dtype differs
    assert [idx for _, _, idx in _shared_groups(members)] == [[0], [1]]


def test_leftovers_of_a_crashed_evaluation_are_cleared_whatever_their_age(trained):
    from tlkit.core.fsutil import incomplete_dir, release

    _data, runs = trained
    out = runs[0] / "eval" / "left"
    crashed, live = incomplete_dir(out, "evaluation"), incomplete_dir(out, "evaluation")
    release(crashed)  # what a crashed evaluation leaves: its lock went with its process
    for path in (crashed, live):
        (path / "metrics.json").write_text("{}")  # half of an evaluation
    stranger = out.parent / "left.incomplete-mine"
    stranger.mkdir()  # no writer record: not tlkit's to judge
    evaluate(EvalConfig(runs=(str(runs[0]),), name="left"))
    assert not crashed.exists() and live.exists() and stranger.exists()
    assert (out / "metrics.json").is_file()
    release(live)
    shutil.rmtree(stranger)  # the shared run stays one that --overwrite may replace
    shutil.rmtree(live)


def test_eval_names_its_output_after_the_data_so_two_datasets_never_collide(trained, tmp_path):
    import hashlib

    data, runs = trained
    run = tmp_path / "run"
    shutil.copytree(runs[0], run, ignore=shutil.ignore_patterns("eval"))
    shelf, other = tmp_path / "shelf", tmp_path / "b" / "shelf"  # the same folder name twice
    write_folder(shelf / "test", ["a", "b"], 2, seed=7)
    write_folder(other / "test", ["b", "c"], 2, seed=8)

    def score(*data_args: str):
        return CliRunner().invoke(cli, ["eval", str(run), *data_args, "--json"])

    for args in ((), (str(shelf),), (str(other),)):
        result = score(*args)
        assert result.exit_code == 0, result.output
    digest = {p: hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:6] for p in (shelf, other)}
    assert sorted(p.name for p in (run / "eval").iterdir()) == sorted(
        ["test-crops1", f"shelf-{digest[shelf]}-test-crops1", f"shelf-{digest[other]}-test-crops1"]
    )
    for args in ((str(shelf),), (str(data),), ()):  # the same data again, named or not
        again = score(*args)
        assert again.exit_code == 7 and "already exists; pass --name or --overwrite" in again.output
    twin = tmp_path / "twin"  # two ensembles of the same size on the same data: two folders
    shutil.copytree(run, twin, ignore=shutil.ignore_patterns("eval"))
    for other in (runs[1], twin):
        both = CliRunner().invoke(cli, ["eval", str(run), str(other), "--json"])
        assert both.exit_code == 0, both.output
    assert len(list((run / "eval").glob("test-crops1-ensemble2-*"))) == 2
