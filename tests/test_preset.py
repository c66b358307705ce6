"""`finetune --preset best`: a budget measured and honoured, a leaderboard, and one run folder
(the greedy ensemble as one model) that eval, predict and export take as any run."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_folder

from tlkit.cli import cli
from tlkit.core.errors import ConfigError
from tlkit.core.runs import load_run
from tlkit.preset.budget import Clock, fits, parse_duration

CANDIDATES = ["test_resnet-head", "test_resnet-fine-tune", "test_resnet-last-stages"]


def preset_config(data, out, limit="10m", **settings):
    from tlkit.preset.best import BestConfig
    from tlkit.training.config import FinetuneConfig

    base = FinetuneConfig.of(
        data=str(data),
        weights="none",
        input_size=32,
        head_epochs=1,
        epochs=2,
        batch_size=8,
        cache="off",
        output=str(out),
        **settings,
    )
    return BestConfig(base, limit, (TINY,))


@pytest.fixture(scope="module")
def preset_run(tmp_path_factory):
    """One --preset best run on the test backbone (its head alone, fine-tuned whole, its
    last stages fine-tuned), shared."""
    from tlkit.preset.best import best

    root = tmp_path_factory.mktemp("preset")
    data = root / "data"
    write_folder(data / "train", ["a", "b", "c"], 8)
    write_folder(data / "val", ["a", "b", "c"], 3, seed=1)
    write_folder(data / "test", ["a", "b", "c"], 3, seed=2)
    return data, best(preset_config(data, root / "best"), verbose=0)


def test_durations_read_as_typed_and_a_bare_number_is_refused():
    assert parse_duration("20m") == 1200
    assert parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400
    for bad in ("20", "", "m", "20 minutes", "0m", "-5m"):
        with pytest.raises(ConfigError, match="--time-limit"):
            parse_duration(bad)


def test_candidates_are_taken_in_priority_order_while_they_fit():
    kept, left = fits([("a", 10), ("b", 50), ("c", 20), ("d", 5)], 40)
    assert kept == ["a", "c", "d"]  # b does not fit after a; the cheaper c and d still do
    assert left == [("b", 50)]


def test_the_clock_corrects_estimates_by_what_finished_candidates_took():
    clock = Clock(100.0, spent_before=30.0)
    assert clock.correction() == 1.0 and 69 < clock.left <= 70
    clock.record(10.0, 20.0)
    clock.record(10.0, 30.0)
    assert clock.correction() == 2.5  # the median ratio
    clock.record(10.0, 0.1)
    assert clock.correction() == 2.0
    fast = Clock(100.0, ratios=[0.1])
    assert fast.correction() == 0.5  # a fast first run does not make the rest look free


def test_the_deadline_ends_training_before_an_epoch_that_would_overrun():
    from tlkit.preset.best import deadline_callback

    late = deadline_callback(time.monotonic() + 0.05)
    late.set_model(SimpleNamespace(stop_training=False))
    late.on_epoch_begin(0)
    time.sleep(0.03)
    late.on_epoch_end(0)  # 0.03 s taken, another would end after the deadline
    assert late.model.stop_training and late.stopped
    early = deadline_callback(time.monotonic() + 60)
    early.set_model(SimpleNamespace(stop_training=False))
    early.on_epoch_begin(0)
    early.on_epoch_end(0)
    assert not early.model.stop_training and not early.stopped


def test_a_preset_run_is_one_run_with_its_leaderboard_and_members(preset_run):
    import keras

    _, run = preset_run
    assert sorted(p.name for p in (run.path / "members").iterdir()) == sorted(CANDIDATES)
    with open(run.path / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["candidate"] for r in rows} == {*CANDIDATES, "ensemble"}
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses)  # best first
    for r in rows:
        if r["candidate"] != "ensemble":
            member = load_run(run.path / "members" / r["candidate"])
            assert float(r["val_loss"]) == member.record.results["best"]["val_loss"]
            assert r["head_features"] == member.record.head_features["used"]
    ensemble = run.record.extra["ensemble"]
    weights = ensemble["member_weights"]
    assert ensemble["member_weights_rule"] in ("auto: greedy", "auto: equal")
    assert abs(sum(weights) - 1) < 1e-9
    members = ensemble["members"]
    assert members == [f"members/{n}" for n in CANDIDATES if f"members/{n}" in members]
    for r in rows:  # a candidate out of the model is its backbone's head-only model again
        if r["candidate"] != "ensemble" and f"members/{r['candidate']}" not in members:
            assert r["note"].startswith("the same model as test_resnet-head"), r
            assert r["ensemble_weight"] == ""
    # the one model is the members' weighted mean, and plain Keras loads it in safe mode
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    one = keras.saving.load_model(run.path / "model.keras", compile=False, safe_mode=True)
    mixed = sum(
        w * load_run(run.path / m).load_model().predict(images, verbose=0)
        for w, m in zip(weights, members, strict=True)
    )
    np.testing.assert_allclose(one.predict(images, verbose=0), mixed, atol=1e-5)
    best = run.record.results["best"]
    assert best["phase"] == "ensemble" and 0 <= best["val_accuracy"] <= 1
    assert run.record.results["test"]["images"] == 9
    assert ensemble["views"]["views"] in ("1", "2", "5", "10", "multiscale")


def test_eval_predict_and_export_take_a_preset_run_as_any_run(preset_run):
    data, run = preset_run
    runner = CliRunner()
    evaluated = runner.invoke(cli, ["eval", str(run.path), "--name", "t", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.output[evaluated.output.index("{") :])
    assert metrics["images"] == 9
    assert abs(metrics["top1"] - run.record.results["test"]["accuracy"]) < 1e-9
    image = next((data / "test" / "a").iterdir())
    predicted = runner.invoke(cli, ["predict", str(run.path), str(image), "--json"])
    assert predicted.exit_code == 0, predicted.output
    top = json.loads(predicted.output[predicted.output.index("[") :])[0]["top"]
    assert {t["label"] for t in top} == {"a", "b", "c"}  # top 5 of 3 classes: all of them
    assert abs(sum(t["probability"] for t in top) - 1) < 1e-4
    out = run.path.parent / "exported"
    exported = runner.invoke(cli, ["export", str(run.path), "--format", "keras", "-o", str(out)])
    assert exported.exit_code == 0, exported.output
    assert json.loads((out / "export.json").read_text())["input"]["shape"] == [None, 32, 32, 3]


def test_what_needs_one_backbone_refuses_an_ensemble_in_one_line(preset_run):
    data, run = preset_run
    runner = CliRunner()
    for args in (
        ["eval", str(run.path), "--multicrop", "dense", "--name", "d"],
        ["diagnose", str(run.path)],
        ["finetune", str(data), "--weights", str(run.path), "--backbone", TINY, "-o", "x"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code != 0
        assert "ensemble" in result.output and "Traceback" not in result.output, args
        assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(
    "args, says",
    [
        (["--time-limit", "5m"], "--time-limit is the budget of --preset best"),
        (["--preset", "best", "--backbone", TINY], "chooses --backbone"),
        (["--preset", "best", "--freeze", "all"], "chooses --freeze"),
        (["--preset", "best", "--head-features", "stages"], "--head-features"),
        (["--preset", "best", "--time-limit", "20"], "a duration with its unit"),
        (["--preset", "fast"], "'fast'"),
    ],
)
def test_the_cli_refuses_what_the_preset_decides_or_cannot_read(make_folder, args, says):
    data = make_folder()
    result = CliRunner().invoke(cli, ["finetune", str(data), *args])
    assert result.exit_code == 2 and says in result.output, result.output
    assert not Path("runs").exists()  # refused before any folder


def test_a_budget_too_small_for_any_candidate_is_refused_before_any_folder(tmp_path):
    from tlkit.preset.best import best

    data = tmp_path / "data"
    write_folder(data / "train", ["a", "b"], 4)
    write_folder(data / "val", ["a", "b"], 2, seed=1)
    with pytest.raises(ConfigError, match=r"--time-limit 1s: the cheapest candidate"):
        best(preset_config(data, tmp_path / "best", "1s"), verbose=0)
    assert not list(tmp_path.glob("best*"))


@pytest.mark.slow  # the whole preset twice (interrupted, then resumed): the flow is the point
def test_an_interrupted_preset_run_resumes_keeping_its_finished_candidates(tmp_path, monkeypatch):
    """Interrupted in its second candidate: `finetune --resume` keeps the first (not trained
    again), trains the rest, and counts the time spent before against the budget."""
    import tlkit.training.train as train
    from tlkit.preset.best import PRESET_FILE, best

    data = tmp_path / "data"
    write_folder(data / "train", ["a", "b"], 6)
    write_folder(data / "val", ["a", "b"], 2, seed=1)
    real = train.finetune

    def interrupted(config, *args, **kwargs):
        if config is not None and config.fit.epochs > 0:  # the fine-tune candidate
            raise KeyboardInterrupt
        return real(config, *args, **kwargs)

    monkeypatch.setattr(train, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        best(preset_config(data, tmp_path / "best"), verbose=0)
    (tmp,) = tmp_path.glob("best.incomplete-*")
    state = json.loads((tmp / PRESET_FILE).read_text())
    assert list(state["done"]) == ["test_resnet-head"] and state["spent_s"] > 0
    head_model = tmp / "members" / "test_resnet-head" / "model.keras"
    before = head_model.stat().st_mtime_ns
    monkeypatch.setattr(train, "finetune", real)
    refused = CliRunner().invoke(
        cli, ["finetune", "--resume", str(tmp_path / "best"), "--time-limit", "1h"]
    )
    assert refused.exit_code == 2 and "leave out --time-limit" in refused.output
    began = time.monotonic()
    result = CliRunner().invoke(cli, ["finetune", "--resume", str(tmp_path / "best")])
    took = time.monotonic() - began
    assert result.exit_code == 0, result.output
    assert "leaderboard" in result.output and "test_resnet-last-stages" in result.output
    run = load_run(tmp_path / "best")
    assert (run.path / "members" / "test_resnet-head" / "model.keras").stat().st_mtime_ns == before
    spent = json.loads((run.path / PRESET_FILE).read_text())["spent_s"]
    assert state["spent_s"] + 0.5 * took < spent <= state["spent_s"] + took  # both attempts


def test_auto_member_weights_take_greedy_only_where_it_beats_equal_weights_out_of_fold():
    from tlkit.evaluation.evaluate import member_weights

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    sharp = np.where(np.eye(2)[labels] == 1, 0.9, 0.1)
    noise = [rng.dirichlet([1, 1], 60) for _ in range(2)]
    weights, used = member_weights([sharp, *noise], labels, "auto")
    assert used == "greedy" and weights[0] == 1.0  # the noise members only cost
    weights, used = member_weights([sharp, sharp, sharp], labels, "auto")
    assert used == "equal" and np.allclose(weights, 1 / 3)  # copies: nothing to select


@pytest.mark.slow  # a whole preset of three candidates: the flow past a failure is the point
def test_a_candidate_that_fails_on_its_own_is_recorded_and_the_rest_go_on(tmp_path, monkeypatch):
    import tlkit.training.train as train
    from tlkit.core.errors import RunError
    from tlkit.preset.best import best

    data = tmp_path / "data"
    write_folder(data / "train", ["a", "b"], 6)
    write_folder(data / "val", ["a", "b"], 2, seed=1)
    real = train.finetune

    def failing(config, *args, **kwargs):
        if config is not None and config.model.freeze.count == "0":  # the whole fine-tune
            raise RunError("no epoch finished with a finite validation loss; nothing to save")
        return real(config, *args, **kwargs)

    monkeypatch.setattr(train, "finetune", failing)
    run = best(preset_config(data, tmp_path / "best"), verbose=0)
    rows = {r["candidate"]: r for r in run.record.extra["ensemble"]["candidates"]}
    failed = rows["test_resnet-fine-tune"]
    assert failed["status"] == "failed" and "finite validation loss" in failed["note"]
    assert rows["test_resnet-last-stages"]["status"] == "trained"
    assert "members/test_resnet-fine-tune" not in run.record.extra["ensemble"]["members"]


def test_a_fine_tune_that_kept_its_head_is_not_a_second_member():
    from tlkit.preset.best import _distinct

    def run(phase):
        best = {"phase": phase, "val_loss": 1.0, "val_accuracy": 0.5, "epoch": 1}
        return SimpleNamespace(record=SimpleNamespace(backbone="b", results={"best": best}))

    runs = {"b-head": run("head"), "b-fine-tune": run("head"), "b-last-stages": run("fine-tune")}
    state = {"done": {n: {"status": "trained", "note": ""} for n in runs}}
    assert _distinct(list(runs), runs, state) == ["b-head", "b-last-stages"]
    assert state["done"]["b-fine-tune"]["note"].startswith("the same model as b-head")
    del runs["b-head"]  # without the head-only model, the fine-tune's head is a member
    assert _distinct(list(runs), runs, state) == ["b-fine-tune", "b-last-stages"]
