"""The benchmarks' smoke modes: every figure they report is produced, from real runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

# every figure benchmarks/run.py prints, named as --smoke names them (test backbone, 32 px)
SPEED_FIGURES = {
    "cli_help_seconds",
    "bad_input_seconds",
    "train_images_per_s_test_resnet_32_frozen",
    "train_images_per_s_test_resnet_32_unfrozen",
    "train_speedup_test_resnet_32_frozen_over_unfrozen",
    "train_speedup_test_resnet_over_test_resnet_32_unfrozen",
    "pca_images_per_s_tlkit",
    "pca_images_per_s_fancypca",
    "pca_images_per_s_numpy_same_shift",
    "pca_dataset_shift_speedup_vs_fancypca_per_image",
    "pca_speedup_vs_numpy_same_shift",
    "pipeline_loop_images_per_s",
    "pipeline_tfdata_threads_1_images_per_s",
    "aug_overhead_ratio",
    "aug_scaling_efficiency",
    "input_headroom",
    "decode_eval_images_per_s_jpeg_full",
    "decode_eval_images_per_s_jpeg_reduced",
    "reduced_decode_speedup_jpeg",
    "decode_eval_images_per_s_png_full",
    "decode_eval_images_per_s_png_reduced",
    "reduced_decode_speedup_png",
    "reduced_decode_parity_eval",
    "reduced_decode_parity_10crop",
    *(f"{k}_parity_{p}" for k in ("reduced_decode", "store") for p in ("light", "vgg", "standard")),
    "epoch_images_per_s_jpeg_files",
    "epoch_images_per_s_jpeg_store",
    "store_epoch_speedup_jpeg",
    "store_build_images_per_s",
    "store_kb_per_image",
    "pipeline_peak_rss_mb_4_workers",
    "pipeline_rss_growth_4_workers",
    "cache_live_epoch_seconds",
    "cache_epoch_seconds",
    "cache_epoch_speedup",
    "cache_build_ratio",
    "cache_rss_peak_mb",
    "cache_rss_growth",
    "eval_rss_peak_mb",
    "eval_rss_growth",
    "eval_memory_keras_peak_mb",
    *(f"eval_memory_{k}_{f}" for k in ("single", "multicrop") for f in ("peak_mb", "over_keras")),
    *(f"eval_memory_{k}_growth_4x" for k in ("single", "multicrop")),
    "multicrop1_seconds",
    "multicrop10_seconds",
    "multicrop10_cost_ratio",
    "multicrop_dense_cost_ratio",
    "multicrop_dense_mirrored_cost_ratio",
    "ensemble3_shared_trunk_seconds",
    "ensemble_shared_trunk_ratio",
    "eval_retracing_warnings_predict_on_batch",
    "eval_retracing_warnings_traced",
    "eval_traced_speedup",
    "audit_images_per_s",
    "audit_overhead_ratio",
    "audit_memo_seconds",
    "audit_memo_speedup",
    "data_identity_cold_seconds_photos",
    "data_identity_warm_seconds_photos",
    "checkpoint_save_seconds_test_resnet",
    "checkpoint_restore_seconds_test_resnet",
    "dist_train_images_per_s_default",
    "dist_train_images_per_s_mirrored",
    "dist_mirrored_speedup",
    "dist_multiworker_2proc_speedup",
    "precompute_sharded_2proc_ratio",
    "cache_merge_mb_per_s",
    "export_single_tflite_mb",
    "export_single_tflite_ms",
    "export_ensemble3_tflite_mb",
    "export_ensemble3_tflite_ms",
    "export_ensemble3_size_over_members",
    "export_ensemble3_latency_over_members",
}

DIAGNOSE_FIGURES = {
    *(f"label_noise_0.1_{m}_at_{k}" for m in ("recall", "precision") for k in ("N", "2N")),
    "near_duplicates_found",
    "near_duplicates_false_pairs",
    "cam_peak_in_patch",
    "lr_find_over_best_fixed_seed0",
    "diagnose_seconds_digits",
}


@pytest.mark.subprocess
def test_every_benchmark_smoke_produces_every_figure(tmp_path):
    """benchmarks/run.py --smoke (every speed group once at tiny sizes),
    benchmarks/quality.py --smoke (real runs on the test backbone) and benchmarks/diagnose.py
    --smoke, side by side since none measures anything here: a changed signature or a broken
    group fails here, not in a README table."""
    out = tmp_path / "quality.json"
    speed = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--smoke"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    quality = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--json", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    diagnosis = subprocess.Popen(
        [sys.executable, str(REPO / "benchmarks" / "diagnose.py"), "--smoke"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    diagnose_out, diagnose_err = diagnosis.communicate(timeout=600)
    speed_out, speed_err = speed.communicate(timeout=600)
    quality_out, quality_err = quality.communicate(timeout=600)
    assert speed.returncode == 0, speed_err[-3000:]
    assert quality.returncode == 0, quality_err[-3000:]
    assert diagnosis.returncode == 0, diagnose_err[-3000:]
    found = {f["name"]: f["value"] for f in map(json.loads, diagnose_out.splitlines())}
    assert set(found) == DIAGNOSE_FIGURES, sorted(set(found) ^ DIAGNOSE_FIGURES)
    assert all(math.isfinite(v) and v >= 0 for v in found.values()), found

    figures = [json.loads(line) for line in speed_out.splitlines() if line.startswith("{")]
    names = {f["name"] for f in figures}
    # tf.data with all cores, and grain when it is installed, are named by their counts
    names = {
        n for n in names if not n.startswith(("pipeline_tfdata_threads_", "pipeline_grain_"))
    } | ({"pipeline_tfdata_threads_1_images_per_s"} & names)
    assert names == SPEED_FIGURES, sorted(names ^ SPEED_FIGURES)
    for f in figures:
        assert isinstance(f["value"], (int, float)) and math.isfinite(f["value"]), f
        zero_is_a_result = ("pipeline_grain_processes_skipped", "eval_retracing_warnings_traced")
        if f["name"] not in zero_is_a_result and "_parity_" not in f["name"]:  # 0: identical
            assert f["value"] > 0, f
    # one trace per model: not one retracing warning in the whole benchmark, and none counted
    assert "retracing" not in speed_err
    assert {f["name"]: f["value"] for f in figures}["eval_retracing_warnings_traced"] == 0

    rows = json.loads(out.read_text())["rows"]
    views = [r for r in rows if "views" in r]  # the --multicrop table, one preset in the smoke
    assert [(r["config"], r["views"]) for r in views] == [
        ("--augment light", m) for m in ("1", "auto", "10", "dense")
    ]
    assert views[0]["chosen"] == "1" and views[3]["chosen"] == "dense"
    assert "| light |" in quality_out and "--multicrop auto" in quality_out
    pictures = [r["config"] for r in rows if r.get("protocol") == "pictures"]  # drawings
    assert pictures == [
        "logreg-probe on raw pixels (32x32)",
        "logreg-probe on test_resnet, random weights",
    ]
    assert "224 px, probes | test top-1" in quality_out
    quick = [r for r in rows if r.get("protocol") == "quickstart"]  # data/ as shipped
    assert [r["config"] for r in quick] == [
        "test_resnet, random weights, head only",
        "logreg-probe on the features of test_resnet, random weights",
    ]
    assert all(0 <= r["top1"] <= 1 for r in quick)
    assert "data/ as shipped (drawings), 224 px | test top-1" in quality_out
    real = [r for r in rows if r.get("protocol") == "real"]  # the real-picture core plan
    assert [r["config"] for r in real] == [
        "defaults",
        "frozen: head only (--freeze all --epochs 0)",
        "ensemble of 3 defaults runs (seeds s, s+1000, s+2000)",
        "its best member on validation",
        "keras-reference, frozen (head on features)",
        "logreg-probe (sklearn, same features)",
        "logreg-probe on the last layer and the 3 stage ends before it, pooled",
        "logreg-probe, alpha over mid-grey instead of white",
        "keras-reference, fine-tuned (the guide's 2 stages)",
        "timm-style reference (AdamW, cosine, smoothing, layer decay; rate on val from 3)",
        "scratch (random init, converged, rate chosen on val)",
    ]
    assert all(0 <= r["top1"] <= 1 for r in real)
    assert all(r["seconds"] > 0 for r in real[:2])
    # every row that chooses has its validation figure (the ensemble itself chooses nothing)
    assert all(0 <= r["val"] <= 1 for r in real if "ensemble" not in r["config"])
    by_name = {r["config"]: r for r in real}
    # the Keras guide's fine-tune keeps BatchNorm in inference mode: its statistics never move
    assert by_name["keras-reference, fine-tuned (the guide's 2 stages)"]["bn_moved"] is False
    scratch = by_name["scratch (random init, converged, rate chosen on val)"]
    assert scratch["lr"] in (3e-3, 1e-3, 3e-4) and 1 <= scratch["classes_hit"] <= 12
    assert sorted(scratch["rates"]) == [3e-4, 1e-3, 3e-3]  # the smoke does not widen
    icons = [r for r in rows if r.get("protocol") == "icons"]  # the icons plan, head only
    assert [r["config"] for r in icons] == ["frozen: head only (--freeze all --epochs 0)"]
    assert "| icons, unseen themes: configuration | k=4 |" in quality_out
    real_views = [r for r in rows if r.get("protocol") == "real-views"]
    assert [r["config"] for r in real_views] == [
        f"defaults, --multicrop {m}" for m in ("1", "auto", "10", "dense")
    ]
    assert real_views[0]["cost"] == 1 and real_views[2]["count"] == 10
    assert "| real pictures: configuration | k=4 | train s (k=4) |" in quality_out
    assert "| --multicrop dense |" in quality_out
    rows = [r for r in rows if "views" not in r and "protocol" not in r]  # the self-transfer
    configs = {r["config"] for r in rows}
    assert configs == {
        "defaults",
        "recipe small-data",
        "keras-reference (plain Keras, frozen)",
        "logreg-probe (sklearn, frozen)",
    }
    for r in rows:
        assert r["k"] == 5 and r["seed"] == 0
        assert 0.0 <= r["top1"] <= 1.0 and math.isfinite(r["top1"])
    # the table printed for the README has a row per configuration
    for name in configs:
        assert f"| {name} |" in quality_out


def test_icons_test_split_is_themes_never_seen_in_training(tmp_path, monkeypatch):
    """The icons protocol's promise: train and val come from the training families, the test
    split only from TEST_FAMILIES, and each seed draws another train/val."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import icons

    root = icons.smoke_icons(tmp_path / "icons")
    train, test = icons.pools(root)

    def families(task, split):
        return {f.resolve().relative_to(root).parts[0] for f in (task / split).rglob("*.png")}

    a = icons.make_task(tmp_path / "a", train, test, 4, seed=0)
    b = icons.make_task(tmp_path / "b", train, test, 4, seed=1)
    assert families(a, "test") == set(icons.TEST_FAMILIES)
    assert families(a, "train") | families(a, "val") == {"train-a", "train-b"}
    for c in icons.CONTEXTS:
        assert len(list((a / "train" / c).iterdir())) == 4
        assert len(list((a / "val" / c).iterdir())) == icons.val_count(4)
    assert sorted(p.name for p in (a / "test").rglob("*.png")) == sorted(
        p.name for p in (b / "test").rglob("*.png")
    )
    assert sorted(p.name for p in (a / "train").rglob("*.png")) != sorted(
        p.name for p in (b / "train").rglob("*.png")
    )


def test_a_plan_runs_only_the_k_and_names_asked_for(monkeypatch):
    """`quality.py --icons P --sweep --k 50 --only fine-tune-lr`: the rate rows at k = 50 and
    nothing else; a k the plan lacks is one line naming the plan's k."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import icons
    from real_pictures import RATES, plan_for

    assert plan_for(icons.PLANS, True, ["fine-tune-lr"], [50]) == {50: (RATES, set())}
    assert sorted(plan_for(icons.PLANS, True, None, None)) == [10, 50, 100, 150, 200]
    assert plan_for(icons.PLANS, True, ["timm"], [200]) == {200: ([], {"timm reference"})}
    scratch = {k: ([], {"scratch"}) for k in (10, 50, 200)}
    assert plan_for(icons.PLANS, True, ["scratch"], None) == scratch
    with pytest.raises(SystemExit, match=r"--k 20: this plan has k = \[10, 50, 100, 150, 200\]"):
        plan_for(icons.PLANS, True, None, [20])


def test_the_scratch_rate_grid_widens_while_its_edge_wins(monkeypatch):
    """Three rates first; then one step past whichever edge is best, until the best has both
    neighbours tried (or the ladder ends): a grid's edge never decides the rate."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from common import next_scratch_rate

    def tried(scores):
        ranks = {}
        while (lr := next_scratch_rate(ranks, True)) is not None:
            ranks[lr] = (scores(lr), 0.0)
        return sorted(ranks)

    assert tried(lambda lr: -abs(lr - 1e-3)) == [3e-4, 1e-3, 3e-3]
    assert tried(lambda lr: -abs(lr - 1e-2)) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    assert tried(lambda lr: lr) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]  # the ladder's top ends it
    assert tried(lambda lr: -lr) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    assert next_scratch_rate({3e-3: (1.0, 0), 1e-3: (0.0, 0), 3e-4: (0.0, 0)}, False) is None
