"""Runs killed for real (SIGKILL) resume to the same step count; bad input never costs work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY, replace_keeping_size_and_mtime, write_folder

from tlkit.cli import cli
from tlkit.core.checkpoints import read_state
from tlkit.training.head import CHECK_EVERY, MIN_HEAD_STEPS

HEAD_ROWS = MIN_HEAD_STEPS // CHECK_EVERY  # history rows of the head phase on this tiny data
# 96 px: the test backbone's epochs last long enough for a signal to land inside one
ARGS = [
    "--backbone",
    TINY,
    "--input-size",
    "96",
    "--weights",
    "none",
    "--batch-size",
    "4",
    "--head-epochs",
    "2",
    "--epochs",
    "3",
    "--freeze",
    "11",
    "--patience",
    "10",
]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def progress(tmp_path: Path, name: str) -> int:
    for ckpt in tmp_path.glob(f"runs/{name}.incomplete-*/checkpoints/last.h5"):
        state = read_state(ckpt)
        if state is not None:
            return state["progress"]
    return 0


def kill_after(
    tmp_path: Path,
    name: str,
    data: Path,
    epochs_done: int,
    sig: int = signal.SIGKILL,
    args: list[str] = ARGS,
    launcher: tuple[str, ...] = ("-m", "tlkit"),
) -> subprocess.Popen:
    """Start a real `tlkit finetune` (`python LAUNCHER finetune ...`) and signal it once
    `epochs_done` epochs are saved."""
    # SIGINT back to its default in the child: a shell starting pytest in the background
    # leaves it ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(
        [sys.executable, *launcher, "finetune", str(data), "-o", f"runs/{name}", *args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 240
    while progress(tmp_path, name) < epochs_done:
        assert proc.poll() is None, "finetune ended before it could be killed"
        assert time.monotonic() < deadline, "finetune made no progress"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    # stopped before it finished
    assert not (tmp_path / "runs" / name).exists(), (proc.returncode, proc.stderr.read()[-2000:])
    return proc


def assert_same_training(resumed: Path, straight: Path) -> None:
    """Every history value (loss, accuracy, val_loss, val_accuracy, lr of every head check and
    epoch) and every final weight of a resumed run equal those of the uninterrupted run: runs
    are seeded and deterministic on a CPU, so a resume that lost the optimizer's moments, the
    step count, the data order or the augmentation draws shows here."""
    import csv

    import numpy as np

    from tlkit.core.runs import load_run

    rows = [
        list(csv.DictReader((run / "history.csv").read_text().splitlines()))
        for run in (resumed, straight)
    ]
    assert len(rows[0]) == len(rows[1])
    for a, b in zip(*rows, strict=True):
        assert (a["phase"], a["epoch"]) == (b["phase"], b["epoch"])
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5, abs=1e-7), (
                f"{a['phase']} {a['epoch']} {key}"
            )
    weights = [load_run(run).load_model().get_weights() for run in (resumed, straight)]
    for x, y in zip(*weights, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.subprocess
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 16)
    # the head phase is one checkpoint holding its 10 validation checks (training/head.py), then
    # one checkpoint per fine-tune epoch: 11 rows done is inside fine-tune epoch 2
    kill_after(tmp_path, "killed", data, epochs_done=HEAD_ROWS + 1)

    changed = invoke("finetune", "--resume", "runs/killed", "--lr", "0.01")
    assert changed.exit_code == 5
    assert "config.lr: 0.001 -> 0.01" in changed.output and "--force-resume" in changed.output
    victim = data / "a" / "img0.png"
    stat = victim.stat()
    old = replace_keeping_size_and_mtime(victim)  # new content, same size and mtime
    touched = invoke("finetune", "--resume", "runs/killed")
    assert touched.exit_code == 5 and "data_fingerprint" in touched.output
    victim.write_bytes(old)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    resumed = invoke("finetune", "--resume", "runs/killed")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "continuing at epoch" in resumed.output
    reference = invoke("finetune", str(data), "-o", "runs/straight", *ARGS)
    assert reference.exit_code == 0, reference.output

    a = json.loads((tmp_path / "runs/killed/run.json").read_text())
    b = json.loads((tmp_path / "runs/straight/run.json").read_text())
    steps = -(-sum(a["data"]["counts"]["train"].values()) // 4)  # per epoch, batch 4
    assert a["optimizer_steps"] == b["optimizer_steps"] == MIN_HEAD_STEPS + 3 * steps
    assert [
        (p["phase"], p["epochs_run"], p["optimizer_steps"]) for p in a["results"]["phases"]
    ] == [(p["phase"], p["epochs_run"], p["optimizer_steps"]) for p in b["results"]["phases"]]
    assert len(a["resumed"]) == 1 and not b["resumed"]
    history = (tmp_path / "runs/killed/history.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in history[1:]] == [
        ["head", str(i)] for i in range(1, HEAD_ROWS + 1)
    ] + [["fine-tune", "1"], ["fine-tune", "2"], ["fine-tune", "3"]]
    assert_same_training(tmp_path / "runs/killed", tmp_path / "runs/straight")
    for run in ("killed", "straight"):
        folder = tmp_path / "runs" / run
        assert (folder / "model.keras").is_file()
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
            "best.h5",
            "identity.json",
            "last.h5",
        ]
    assert not list((tmp_path / "runs").glob("*.incomplete-*"))
    again = invoke("finetune", "--resume", "runs/killed")
    assert again.exit_code == 5 and "this run finished" in again.output


@pytest.mark.subprocess
def test_ctrl_c_says_how_to_resume_and_force_resume_continues_despite_a_change(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 16)
    # 200 epochs with a patience as long: the run cannot be finishing when the signal lands
    # right after the head phase, however fast the machine; the resume shortens it
    proc = kill_after(
        tmp_path,
        "r",
        data,
        epochs_done=HEAD_ROWS,
        sig=signal.SIGINT,
        args=[*ARGS, "--epochs", "200", "--patience", "200"],
    )
    stderr = proc.stderr.read()
    assert proc.returncode == 130, stderr
    assert "Error: interrupted; the checkpoints in" in stderr
    assert "`tlkit finetune --resume runs/r` continues from the last finished epoch" in stderr
    assert "Traceback" not in stderr
    result = invoke(
        "finetune", "--resume", "runs/r", "--force-resume", "--epochs", "12", "--patience", "2"
    )
    assert result.exit_code == 0, result.output
    assert "resuming despite a change (--force-resume): config.epochs: 200 -> 12" in result.output
    assert "config.patience: 200 -> 2" in result.output
    config = json.loads((tmp_path / "runs/r/run.json").read_text())["config"]
    assert (config["epochs"], config["patience"]) == (12, 2)


def test_resume_without_an_interrupted_run_is_a_clear_error(tmp_path):
    result = invoke("finetune", "--resume", "runs/nothing")
    assert result.exit_code == 5
    assert "runs/nothing: no interrupted run to resume" in result.output


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import keras

    import tlkit.training.optim  # noqa: F401  (subclasses the real Adam before the patch)

    data = write_folder(tmp_path / "data", ["a", "b"], 8)
    adam = keras.optimizers.Adam

    # fault injection: the fine-tune phase (any rate but the head's 1e-3) gets an
    # optimizer that makes NaN
    def faulty(learning_rate=1e-3, **kwargs):
        if isinstance(learning_rate, float) and learning_rate >= 1e-3:
            return adam(learning_rate, **kwargs)
        return keras.optimizers.SGD(float("nan"))

    monkeypatch.setattr(keras.optimizers, "Adam", faulty)
    result = invoke("finetune", str(data), "-o", "runs/n", *ARGS)
    assert result.exit_code == 5
    assert "phase fine-tune, epoch 1: the training loss became nan at step 2" in result.output
    assert f"the last good checkpoint (phase head, epoch {HEAD_ROWS}) is kept in" in result.output
    (folder,) = (tmp_path / "runs").glob("n.incomplete-*")
    assert read_state(folder / "checkpoints" / "last.h5")["progress"] == HEAD_ROWS
    assert not (tmp_path / "runs" / "n").exists()
    # the rate the data chose is part of the run's identity: a rule changed since (by an
    # upgrade; here a lowered table) cannot change a resumed run's rate unseen
    monkeypatch.setattr("tlkit.training.config.FINE_TUNE_LR_BY_DATA", ((1, 3e-4), (0, 1e-5)))
    result = invoke("finetune", "--resume", "runs/n")
    assert result.exit_code == 5, result.output
    assert "cannot resume, the run started with different settings" in result.output
    assert "fine_tune_lr: 1e-05 -> 0.0003" in result.output
    # a run interrupted before the rule existed holds no chosen rate, only its config's: it
    # resumes on that (here: the fault injection again, so it stops at once)
    identity = folder / "checkpoints" / "identity.json"
    saved = json.loads(identity.read_text())
    del saved["fine_tune_lr"]
    saved["config"]["fine_tune_lr"] = 1e-5
    identity.write_text(json.dumps(saved))
    result = invoke("finetune", "--resume", "runs/n")
    assert "cannot resume" not in result.output
    assert "fine-tune rate 1e-5 (given" in result.output
    assert "the training loss became nan" in result.output  # it trained again


def test_bad_images_stop_finetune_or_are_skipped_and_recorded(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 10)
    (data / "a" / "broken.jpg").write_text("not an image")
    refused = invoke("finetune", str(data), "-o", "runs/x", *ARGS)
    assert refused.exit_code == 3
    assert "broken.jpg: not an image (text file)" in refused.output
    assert not (tmp_path / "runs").exists()  # nothing was started

    args = [*ARGS[:-6], "--epochs", "0", "--class-weight", "balanced"]
    skipped = invoke("finetune", str(data), "-o", "runs/x", "--on-bad-image", "skip", *args)
    assert skipped.exit_code == 0, skipped.output
    info = json.loads((tmp_path / "runs/x/run.json").read_text())
    assert info["data"]["skipped"] == [
        {
            "path": "a/broken.jpg",
            "reason": "not an image (text file); remove it or move it out of the dataset",
        }
    ]
    assert set(info["class_weight"]) == {"a", "b"}
    report = json.loads((tmp_path / "runs/x/data_report.json").read_text())
    assert report["totals"]["bad"] == 1


@pytest.mark.slow  # about 10 s: an interrupted run, its resume and a reference run
def test_resume_on_the_feature_cache_path_restores_the_tails_optimizer(tmp_path, monkeypatch):
    import tlkit.training.phases

    data = write_folder(tmp_path / "data", ["a", "b"], 12)
    common = [
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--batch-size",
        "4",
        "--head-epochs",
        "2",
        "--epochs",
        "2",
        "--freeze",
        "14",
        "--augment",
        "none",
        "--cache",
        "--patience",
        "10",
    ]
    real = tlkit.training.phases.save_epoch

    def dies_after_the_third_checkpoint(directory, model, optimizer, state, improved):
        real(directory, model, optimizer, state, improved)
        if state["progress"] == HEAD_ROWS + 1:  # the head phase, then fine-tune epoch 1
            raise KeyboardInterrupt  # as Ctrl-C right after an epoch is saved

    monkeypatch.setattr(tlkit.training.phases, "save_epoch", dies_after_the_third_checkpoint)
    first = invoke("finetune", str(data), "-o", "runs/c", *common)
    assert first.exit_code == 130, first.output
    monkeypatch.setattr(tlkit.training.phases, "save_epoch", real)  # undo() would undo the chdir
    resumed = invoke("finetune", "--resume", "runs/c")
    assert resumed.exit_code == 0, resumed.output
    assert "feature cache: using" in resumed.output
    assert invoke("finetune", str(data), "-o", "runs/s", *common).exit_code == 0
    a, b = (json.loads((tmp_path / f"runs/{n}/run.json").read_text()) for n in ("c", "s"))
    assert a["feature_cache"]["used"] and b["feature_cache"]["used"]
    assert a["optimizer_steps"] == b["optimizer_steps"]
    assert [p["optimizer_steps"] for p in a["results"]["phases"]] == [
        p["optimizer_steps"] for p in b["results"]["phases"]
    ]
    assert_same_training(tmp_path / "runs/c", tmp_path / "runs/s")  # the losses after resume
