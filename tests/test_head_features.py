"""--head-features: the head reading the pooled ends of earlier stages beside the last layer's."""

from __future__ import annotations

import csv
import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY

from tlkit.cli import cli
from tlkit.models.backbones import get_backbone, stage_taps
from tlkit.models.cut import build_tail, build_trunk, resolve_cut, single_tensor_cuts
from tlkit.models.model import (
    backbone_of,
    build_classifier,
    dense_model,
    head_of,
    retapped,
    softmax_layer,
    taps_of,
)


def _images(size: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3)).astype("uint8")


@pytest.mark.parametrize(
    "name,size",
    [pytest.param("efficientnet_lite0", 64, marks=pytest.mark.slow), (TINY, 32)],
)
def test_stages_pooled_beside_the_last_keep_freeze_indices_and_every_cut(name, size):
    spec = get_backbone(name)
    plain = spec.build(size)
    names = [layer.name for layer in plain.layers]
    taps = stage_taps(spec, "stages")
    assert len(taps) == 3 and all(t in names for t in taps)
    assert taps == tuple(end for _, end in spec.stages[-4:-1])  # the 3 stages before the last
    model = build_classifier(spec, plain, 3, size, taps=taps)
    base = backbone_of(model)
    assert [layer.name for layer in base.layers] == names  # --freeze N means what it meant
    assert taps_of(model) == taps
    widths = [int(base.get_layer(t).output.shape[-1]) for t in taps]
    assert head_of(model).input.shape[-1] == sum(widths) + int(plain.output.shape[-1])
    x = _images(size)
    expected = np.asarray(model(x))
    # a cut at or past the first tap would drop a tapped map: it moves below, onto the tap
    first = names.index(taps[0]) + 1
    assert max(single_tensor_cuts(base)) == first
    for requested in sorted({2, first - 1, first, len(names)}):
        cut = resolve_cut(base, requested)
        assert cut.k == min(requested, first) or cut.k < requested
        out = np.asarray(build_tail(model, cut)(build_trunk(model, cut)(x)))
        np.testing.assert_allclose(out, expected, atol=1e-5)
    # the dense view pools every map of a bigger image; at the eval size it is the model
    np.testing.assert_allclose(np.asarray(dense_model(model)(x)), expected, atol=1e-5)


def test_the_last_layer_alone_rebuilt_with_the_backbone_as_it_is(tmp_path):
    from tlkit.models.model import Top
    from tlkit.models.weights import resolve_weights

    spec = get_backbone(TINY)
    model = build_classifier(spec, spec.build(32), 2, 32, taps=stage_taps(spec, "stages"))
    moved = backbone_of(model).layers[2]  # trained, as the search's model may have been
    moved.set_weights([w + 1 for w in moved.get_weights()])
    last = retapped(model, spec, resolve_weights(spec, "none"), Top(), False, seed=0)
    assert taps_of(last) == () and head_of(last).input.shape[-1] == 32
    for a, b in zip(backbone_of(last).get_weights(), backbone_of(model).get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the backbone as the model has it now
    assert softmax_layer(last, "maps", linear=True) is not None
    # model.keras: the taps come back in Keras' safe mode, with no tlkit
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert taps_of(again) == taps_of(model)
    x = _images(32)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-6)


def _finetune(data, out, *flags):
    return CliRunner().invoke(
        cli,
        [
            "finetune",
            str(data),
            "--backbone",
            TINY,
            "--weights",
            "none",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "-o",
            str(out),
            *flags,
        ],
    )


def test_auto_scores_both_on_val_and_the_run_records_and_keeps_its_choice(make_folder, tmp_path):
    data = make_folder(layout="splits", per_class=12)
    result = _finetune(data, tmp_path / "run", "--head-features", "auto", "--no-cache")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    found = record["head_features"]
    assert [s["head_features"] for s in found["search"]] == ["last", "stages"]
    assert sum(s["chosen"] for s in found["search"]) == 1
    chosen = next(s["head_features"] for s in found["search"] if s["chosen"])
    assert found["used"] == chosen and record["config"]["head_features"] == "auto"
    spec = get_backbone(TINY)
    assert found["taps"] == list(stage_taps(spec, chosen))
    with open(tmp_path / "run" / "search.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["setting"] == "head_features"]
    assert [r["candidate"] for r in rows] == ["last", "stages"]
    # the saved model reads what was chosen, and eval takes it as any run
    model = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    assert list(taps_of(model)) == found["taps"]
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "run"), "--multicrop", "dense"])
    assert result.exit_code == 0, result.output


def test_stages_beside_augment_auto_and_no_search_table_without_a_search(make_folder, tmp_path):
    """Each search takes the forward-pass timer only if no search before it did."""
    data = make_folder(layout="splits", per_class=6)
    both = _finetune(data, tmp_path / "a", "--head-features", "auto", "--augment", "auto")
    assert both.exit_code == 0, both.output
    with open(tmp_path / "a" / "search.csv") as f:
        settings = {r["setting"] for r in csv.DictReader(f)}
    assert settings == {"head_features", "augment"}
    stages = _finetune(data, tmp_path / "s", "--head-features", "stages", "--epochs", "0")
    assert stages.exit_code == 0, stages.output
    assert not (tmp_path / "s" / "search.csv").exists()  # measured, not searched


def test_stages_run_trains_from_a_cache_precomputed_for_it(make_folder, tmp_path):
    data = make_folder(layout="splits", per_class=8)
    runner = CliRunner()
    flags = ["--backbone", TINY, "--weights", "none", "--head-features", "stages"]
    result = runner.invoke(cli, ["precompute-features", str(data), *flags])
    assert result.exit_code == 0, result.output
    result = _finetune(
        data, tmp_path / "run", "--head-features", "stages", "--freeze", "all", "--augment", "none"
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["head_features"]["used"] == "stages"
    assert record["feature_cache"] is not None  # the tail trained from the stages' cache
    # the activation maps read every stage the head reads
    picture = next((data / "val").rglob("*.png"))
    result = runner.invoke(
        cli, ["predict", str(tmp_path / "run"), str(picture), "--explain", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "m").glob("*.png"))) == 1


def test_the_maps_of_a_stages_head_still_average_to_its_logits():
    """Each map's part of the logit (its slice of the head's weights, times its scale) on the
    finest grid, summed: still an exact decomposition, as with the last layer alone."""
    from tlkit.evaluation.explain import class_maps

    spec = get_backbone(TINY)
    scales = [0.5, 2.0, 0.25]
    model = build_classifier(spec, spec.build(32), 3, 32, None, stage_taps(spec, "stages"), scales)
    dense = model.get_layer("predictions")
    kernel, bias = dense.get_weights()
    rng = np.random.default_rng(1)
    bias = bias + np.array([0.1, 0.0, -0.2], np.float32)
    dense.set_weights([rng.normal(size=kernel.shape).astype("float32"), bias])
    images = _images(32, 5)
    maps = [class_maps(model, images, [c] * 5) for c in range(3)]
    assert maps[0].shape == (5, 16, 16)  # the finest tapped map's grid
    logits = np.stack([m.mean(axis=(1, 2)) + bias[c] for c, m in enumerate(maps)], axis=1)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), np.asarray(model(images)), atol=1e-5)


def test_only_finetune_takes_auto(make_folder):
    data = make_folder(per_class=4)
    result = CliRunner().invoke(
        cli,
        ["precompute-features", str(data), "--backbone", TINY, "--head-features", "auto"],
    )
    assert result.exit_code == 2  # a ConfigError, before any data or weights are read
    assert "--head-features auto: only finetune chooses" in result.output
    assert "Traceback" not in result.output


def test_a_resumed_auto_run_keeps_its_choice_and_scales_and_trains_as_one_run(
    tmp_path, monkeypatch
):
    from test_resume import HEAD_ROWS, assert_same_training, invoke

    import tlkit.training.phases

    data = make_data(tmp_path)
    common = ["--backbone", TINY, "--weights", "none", "--batch-size", "4", "--head-epochs", "2"]
    common += ["--epochs", "2", "--patience", "10", "--head-features", "auto", "--no-cache"]
    real = tlkit.training.phases.save_epoch

    def dies_after_the_first_epoch(directory, model, optimizer, state, improved):
        real(directory, model, optimizer, state, improved)
        if state["progress"] == HEAD_ROWS + 1:  # the head phase, then fine-tune epoch 1
            raise KeyboardInterrupt

    monkeypatch.setattr(tlkit.training.phases, "save_epoch", dies_after_the_first_epoch)
    assert invoke("finetune", str(data), "-o", "runs/c", *common).exit_code == 130
    monkeypatch.setattr(tlkit.training.phases, "save_epoch", real)
    resumed = invoke("finetune", "--resume", "runs/c")
    assert resumed.exit_code == 0, resumed.output
    assert "as chosen when the run started" in resumed.output
    assert "--head-features auto: last" not in resumed.output  # no second search
    assert invoke("finetune", str(data), "-o", "runs/s", *common).exit_code == 0
    a, b = (json.loads((tmp_path / f"runs/{n}/run.json").read_text()) for n in ("c", "s"))
    untimed = [
        [{k: v for k, v in s.items() if k != "seconds"} for s in r["head_features"]["search"]]
        for r in (a, b)
    ]
    assert untimed[0] == untimed[1] and a["head_features"]["taps"] == b["head_features"]["taps"]
    assert_same_training(tmp_path / "runs/c", tmp_path / "runs/s")


def make_data(tmp_path):
    from conftest import write_folder

    return write_folder(tmp_path / "data", ["a", "b"], 12)


def test_auto_choosing_the_last_layer_builds_the_head_that_last_builds():
    """Where `auto` keeps the last layer, its run starts where `--head-features last` starts."""
    from tlkit.models.model import Top, build_model
    from tlkit.models.weights import resolve_weights

    spec = get_backbone(TINY)
    weights = resolve_weights(spec, "none")
    last = build_model(spec, weights, 32, 3, seed=7)
    staged = build_model(spec, weights, 32, 3, seed=7, top=Top(taps=stage_taps(spec, "stages")))
    again = retapped(staged, spec, weights, Top(), False, seed=7)
    for a, b in zip(last.get_weights(), again.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_auto_run_trains_exactly_as_a_run_of_the_setting_it_chose(make_folder, tmp_path):
    from test_resume import assert_same_training

    data = make_folder(layout="splits", per_class=12)
    auto = _finetune(data, tmp_path / "auto", "--head-features", "auto", "--no-cache")
    assert auto.exit_code == 0, auto.output
    record = json.loads((tmp_path / "auto" / "run.json").read_text())
    chosen = record["head_features"]["used"]
    assert _finetune(data, tmp_path / "set", "--head-features", chosen, "--no-cache").exit_code == 0
    assert_same_training(tmp_path / "auto", tmp_path / "set")


def test_stages_too_wide_to_hold_are_measured_and_probed_on_a_sample(
    make_folder, tmp_path, monkeypatch
):
    import tlkit.training.head

    data = make_folder(layout="splits", per_class=10)
    # 64 features of 4 bytes: room for 16 of the 24 training and validation images' rows
    monkeypatch.setattr(tlkit.training.head, "MAX_FEATURE_BYTES", 16 * 64 * 4)
    flags = ["--head-features", "auto", "--class-weight", "balanced", "--no-cache"]
    result = _finetune(data, tmp_path / "run", *flags)
    assert result.exit_code == 0, result.output
    assert "--head-features: measured on 13 training and 2 validation images" in result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(record["head_features"]["search"]) == 2
