"""diagnose: the confident-learning rule by hand, near-duplicates against brute force, the
command's outputs on real files, and planted label noise found on the real digits."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, TINY

from tlkit.cli import cli
from tlkit.evaluation.diagnose import label_issues, near_duplicates, out_of_fold_probs


def test_the_off_diagonal_of_the_confident_joint_is_flagged():
    probs = np.array(
        [
            [0.9, 0.1],
            [0.8, 0.2],
            [0.25, 0.75],  # labelled 0
            [0.2, 0.8],
            [0.1, 0.9],
            [0.7, 0.3],
        ]
    )  # labelled 1
    labels = np.array([0, 0, 0, 1, 1, 1])
    # thresholds: class 0 = mean p0 over labelled 0 = 0.65, class 1 = mean p1 = 0.667; image 2
    # reaches only class 1's, image 5 only class 0's
    issues = label_issues(probs, labels)
    assert [(i, s) for i, s, _ in issues] == [(2, 1), (5, 0)]  # lowest p(given label) first
    assert issues[0][2] == pytest.approx(0.25)


@pytest.mark.slow  # imports cleanlab, pandas and scikit-learn: seconds cold, in a fresh venv
def test_the_flagged_set_is_cleanlabs_confident_learning_filter():
    """The rule, checked against the standard implementation (a dev dependency only: tlkit's
    ten lines keep pandas and scikit-learn out of every install)."""
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(0)
    for _ in range(5):
        true = rng.integers(0, 5, 600)
        logits = rng.normal(0, 1, (600, 5))
        logits[np.arange(600), true] += 2.5
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = true.copy()
        flip = rng.choice(600, 60, replace=False)
        labels[flip] = (labels[flip] + rng.integers(1, 5, 60)) % 5
        ours = {i for i, _, _ in label_issues(probs, labels)}
        theirs = set(
            np.flatnonzero(find_label_issues(labels, probs, filter_by="confident_learning"))
        )
        assert ours == theirs and len(ours) > 20


def test_near_duplicates_in_blocks_equal_the_brute_force_pairs():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(300, 16))
    feats[200:210] = feats[:10] + rng.normal(scale=0.01, size=(10, 16))  # ten planted copies
    pairs, total = near_duplicates(feats, 0.99, block=64)
    centred = feats - feats.mean(0)
    u = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    sims = u @ u.T
    brute = {(i, j) for i in range(300) for j in range(i + 1, 300) if sims[i, j] >= 0.99}
    assert {(i, j) for i, j, _ in pairs} == brute == {(k, 200 + k) for k in range(10)}
    assert total == 10


def test_near_duplicates_of_a_folder_of_copies_keep_a_bounded_list():
    """500 copies of one image make 124,750 pairs: memory holds the `limit` most similar."""
    rng = np.random.default_rng(0)
    feats = np.concatenate(
        [np.tile(rng.normal(size=(1, 8)), (500, 1)), rng.normal(size=(20, 8))]
    ) + rng.normal(scale=1e-4, size=(520, 8))
    pairs, total = near_duplicates(feats, 0.99, block=64, limit=100)
    assert total == 500 * 499 // 2 and len(pairs) == 100
    sims = [s for _, _, s in pairs]
    assert sims == sorted(sims, reverse=True) and all(i < j for i, j, _ in pairs)


def test_out_of_fold_heads_never_see_the_image_they_score():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    feats = np.eye(3)[labels] * 3 + rng.normal(size=(120, 3))
    feats[0] = feats[0] * 0 + 50 * np.eye(3)[2]  # an outlier labelled 0, lying deep in class 2
    probs = out_of_fold_probs(feats, labels, 3, 5, 0)
    assert probs[0].argmax() == 2  # a head that had seen it might have bent towards label 0
    assert (probs[1:].argmax(1) == labels[1:]).mean() > 0.9


def test_diagnose_writes_its_report_and_a_manifest_that_trains(tiny_runs, tmp_path):
    from tlkit.data.datasets import load_csv

    data, runs = tiny_runs
    runner = CliRunner()
    result = runner.invoke(cli, ["diagnose", str(runs[0]), "--name", "d", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    out = Path(found["output"])
    assert sorted(p.name for p in out.iterdir()) == ["diagnose.json", "relabel.csv", "report.html"]
    assert found["images"] == 42 and 0 <= found["out_of_fold_accuracy"] <= 1
    assert {"label_issues", "review_next", "near_duplicates", "top_losses"} <= set(found)
    assert "data:image/jpeg;base64," in (out / "report.html").read_text()
    # relabel.csv, copied into DATA/, is a manifest of every image with its given label
    shutil.copy(out / "relabel.csv", data / "relabel.csv")
    try:
        manifest = load_csv(data / "relabel.csv")
        with open(out / "relabel.csv") as f:
            rows = list(csv.DictReader(f))
    finally:
        (data / "relabel.csv").unlink()
    assert len(rows) == 42 and sorted(manifest.classes) == ["a", "b", "c"]
    assert {s: len(x) for s, x in manifest.splits.items()} == {"train": 24, "val": 9, "test": 9}
    again = runner.invoke(cli, ["diagnose", str(runs[0]), "--name", "d"])
    assert again.exit_code == 7 and "already exists" in again.output
    text = runner.invoke(cli, ["diagnose", str(runs[0]), "--name", "t"])
    assert "likely label errors" in text.output and "relabel.csv" in text.output


@pytest.mark.slow  # about 8 s: the digits 5-9 through a frozen test backbone, and diagnose
def test_planted_label_noise_in_the_digits_is_found(tmp_path):
    """Digits 5-9 with 10% of the training labels flipped, seen through frozen features that
    never saw these labels (a randomly initialised test backbone here; benchmarks/diagnose.py
    measures a trunk trained on the digits 0-4): the first 2N suggestions hold at least 80% of
    the N flipped images."""
    from tlkit.data.augment import resolve_augment
    from tlkit.evaluation.diagnose import DiagnoseConfig, diagnose
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    target = tmp_path / "target"
    for split in ("train", "val", "test"):
        for c in "56789":
            shutil.copytree(REPO / "examples" / "digits" / split / c, target / split / c)
    rng = np.random.default_rng(0)
    files = sorted((target / "train").rglob("*.png"))
    planted = set()
    for i in rng.choice(len(files), len(files) // 10, replace=False):
        f = files[i]
        new = rng.choice([c for c in "56789" if c != f.parent.name])
        dest = target / "train" / new / f"flipped-{f.name}"
        shutil.move(f, dest)
        planted.add(str(dest.relative_to(target)))
    run = finetune(
        FinetuneConfig.of(
            data=str(target),
            backbone=TINY,
            weights="none",
            input_size=32,
            freeze=FreezeRequest(count="all"),
            augment=resolve_augment("none"),
            head_epochs=5,
            epochs=0,
            batch_size=32,
            cache="off",
            output=str(tmp_path / "run"),
        ),
        verbose=0,
    )
    found = diagnose(DiagnoseConfig(run=str(run.path)))
    ranked = [r["path"] for r in found["label_issues"] + found["review_next"]]
    n = len(planted)
    assert len(set(ranked[: 2 * n]) & planted) >= 0.8 * n
