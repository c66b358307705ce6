"""What tlkit promises about the files it touches: nothing of the user's is destroyed, names stay
in their folder, results are readable by others, loading never runs code, bad input is one
line, shared folders survive two processes, and memory does not grow with views or copies."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, TINY, write_folder

from tlkit.cli import cli
from tlkit.core.errors import WeightsError, shown

FAST = [
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--input-size",
    "32",
    "--batch-size",
    "8",
    "--head-epochs",
    "1",
    "--epochs",
    "0",
    "--freeze",
    "all",
    "--no-cache",
]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line(result) -> str:
    """The error a user sees: one line, no traceback."""
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def run_copy(tiny_runs, tmp_path):
    """A finished run of our own, which a test may try to destroy."""
    return Path(shutil.copytree(tiny_runs[1][0], tmp_path / "runs" / "x"))


# 1. --overwrite replaces only an artifact of the same kind


def test_overwrite_never_replaces_the_data_or_a_run_or_a_stranger(tmp_path, run_copy):
    data = write_folder(tmp_path / "data", ["a", "b"], 6)
    before = tree_digest(data)
    result = invoke("finetune", str(data), "-o", str(data), "--overwrite", *FAST)
    assert result.exit_code == 7 and "holds the input" in one_line(result)
    assert tree_digest(data) == before

    run_before = tree_digest(run_copy)
    result = invoke("export", str(run_copy), "-o", str(run_copy), "--overwrite")
    assert result.exit_code == 7 and "holds the input" in one_line(result)
    other = tmp_path / "runs" / "other"
    shutil.copytree(run_copy, other)
    result = invoke("export", str(run_copy), "-o", str(other), "--overwrite")
    assert result.exit_code == 7
    assert "holds a tlkit run (run.json), not an earlier export" in one_line(result)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = invoke("export", str(run_copy), "-o", str(mine), "--overwrite")
    assert result.exit_code == 7 and "not made by tlkit (e.g. thesis.tex)" in one_line(result)
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert tree_digest(run_copy) == run_before and tree_digest(other) == run_before

    first = invoke("export", str(run_copy), "-o", "exported")
    again = invoke("export", str(run_copy), "-o", "exported", "--overwrite")
    assert first.exit_code == again.exit_code == 0, again.output  # an export over an export


def test_a_run_inside_its_data_folder_is_refused(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 6)
    result = invoke("finetune", str(data), "-o", str(data / "run1"), *FAST)
    assert result.exit_code == 2 and "inside the data folder" in one_line(result)
    assert sorted(p.name for p in data.iterdir()) == ["a", "b"]


# 2. leftovers are told by a lock, never by their age


def test_an_interrupted_run_and_a_live_build_are_never_cleaned_as_stale(tmp_path, run_copy):
    interrupted = tmp_path / "runs" / "foo.incomplete-1a2b3c4d"
    (interrupted / "checkpoints").mkdir(parents=True)
    (interrupted / "checkpoints" / "identity.json").write_text("{}")
    old = time.time() - 3 * 24 * 3600
    os.utime(interrupted, (old, old))
    result = invoke("export", str(run_copy), "-o", str(tmp_path / "runs" / "foo"))
    assert result.exit_code == 0, result.output
    assert interrupted.is_dir()  # `tlkit runs` still lists it as resumable

    from tlkit.core.fsutil import incomplete_dir, release

    final = tmp_path / "tfds" / "all"
    live = incomplete_dir(final, "tfds")  # a build this process is still writing, for days
    os.utime(live, (old, old))
    dead = incomplete_dir(final, "tfds")
    release(dead)  # what a killed builder leaves: its lock gone with it
    os.utime(dead, (old, old))
    fresh = incomplete_dir(final, "tfds", clean=True)
    assert live.is_dir() and fresh.is_dir() and not dead.exists()
    for folder in (live, fresh):
        release(folder)


# 3. a resumed run equals an uninterrupted one when the head phase runs live


@pytest.mark.subprocess
def test_kill_and_resume_with_a_live_head_phase_starts_fine_tuning_from_the_best_head(tmp_path):
    from test_resume import ARGS, assert_same_training, kill_after

    data = write_folder(tmp_path / "data", ["a", "b"], 16)
    # the head phase epoch by epoch (as under a mirrored strategy or with features too big to
    # hold): a high rate, so that its best epoch is not its last one
    args = [
        *ARGS[: ARGS.index("--head-epochs")],
        "--head-epochs",
        "4",
        "--epochs",
        "2",
        "--freeze",
        "11",
        "--patience",
        "10",
        "--lr",
        "3",
    ]
    live = (
        "import sys, tlkit.training.head; tlkit.training.head.MAX_FEATURE_BYTES = 0; "
        "from tlkit.cli import main; sys.argv[0] = 'tlkit'; main()"
    )
    kill_after(tmp_path, "killed", data, epochs_done=4, args=args, launcher=("-c", live))
    resumed = subprocess.run(
        [sys.executable, "-c", live, "finetune", "--resume", "runs/killed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(
        [sys.executable, "-c", live, "finetune", str(data), "-o", "runs/straight", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "trained live" in straight.stdout + straight.stderr
    rows = [
        r.split(",")
        for r in (tmp_path / "runs/straight/history.csv").read_text().splitlines()[1:]
        if r.startswith("head")
    ]
    header = (tmp_path / "runs/straight/history.csv").read_text().splitlines()[0].split(",")
    losses = [float(r[header.index("val_loss")]) for r in rows]
    assert int(np.argmin(losses)) != len(losses) - 1, losses  # the case that matters
    assert_same_training(tmp_path / "runs/killed", tmp_path / "runs/straight")


# 4. a download is renamed into place whole


def test_a_weights_download_is_never_visible_half_written(tmp_path, monkeypatch):
    import keras

    from tlkit.models.backbones import get_backbone, keras_cache_dir
    from tlkit.models.weights import ensure_imagenet

    spec = get_backbone("resnet50")
    target = keras_cache_dir() / spec.weights_file
    seen = []

    def fake_get_file(fname, origin, cache_subdir, cache_dir, file_hash):
        dest = Path(cache_dir) / cache_subdir / fname
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:
            f.write(b"half of the file")
            f.flush()
            seen.append(target.exists())  # what a second run would find now
            f.write(b" and the rest")
        return str(dest)

    monkeypatch.delenv("TLKIT_OFFLINE")
    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    monkeypatch.setattr("tlkit.models.weights.verify_pinned", lambda spec, path: None)
    assert ensure_imagenet(spec) == target
    assert seen == [False] and target.read_bytes() == b"half of the file and the rest"
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".download")] == []

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    target.unlink()
    monkeypatch.setattr(keras.utils, "get_file", no_network)
    with pytest.raises(WeightsError, match="download failed: Network is unreachable"):
        ensure_imagenet(spec)
    assert not target.exists()


# 5. names stay in their folder


@pytest.mark.parametrize("name", ["../..", "/tmp/elsewhere", "a/b", "..", "x\ny", "n" * 300])
def test_eval_and_diagnose_names_are_one_folder_inside_the_run(run_copy, name):
    for command in ("eval", "diagnose"):
        result = invoke(command, str(run_copy), "--name", name)
        assert result.exit_code == 2, (command, result.output)
        assert "must be a plain folder name" in one_line(result)
    assert not (run_copy.parent.parent / "eval").exists()


@pytest.mark.parametrize(
    "label, what",
    [
        ("x/../../../../tmp/pwn", "a path separator"),
        ("two\nlines", "a control character"),
        ("..", "only dots"),
        ("cat\u202egpj", "a control character"),
        ("c" * 300, "more than 200 bytes"),
    ],
)
def test_class_names_that_would_escape_or_break_a_file_are_refused(tmp_path, label, what):
    data = write_folder(tmp_path / "imgs", ["a", "b"], 4)
    rows = [("path", "label")] + [(f"imgs/{c}/img{i}.png", c) for c in "ab" for i in range(4)]
    rows[1] = (rows[1][0], label)
    import csv

    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = invoke("check-data", str(tmp_path / "labels.csv"))
    assert result.exit_code == 3, result.output
    line = one_line(result)
    assert f"labels.csv:2: class name {shown(label)} has {what}" in line and len(line) < 500
    assert data.is_dir()


def test_file_names_made_from_class_names_are_one_harmless_component():
    from tlkit.core.fsutil import safe_name

    for text in ("x/../../../../tmp/pwn", "..", "a\nb", "C:\\x", "", ".hidden"):
        name = safe_name(text)
        assert "/" not in name and "\\" not in name and "\n" not in name
        assert not name.startswith(".") and name
    assert safe_name("golden_retriever-2") == "golden_retriever-2"


# 6. files others can read


def test_written_files_honour_the_umask(tmp_path, run_copy):
    from tlkit.core.fsutil import atomic_write_json

    old = os.umask(0o022)
    try:
        data = write_folder(tmp_path / "data", ["a", "b"], 6)
        made = invoke("finetune", str(data), "-o", "runs/m", *FAST)
        assert made.exit_code == 0, made.output
        cached = invoke(*PRECOMPUTE)
        assert cached.exit_code == 0, cached.output
        exported = invoke("export", str(run_copy), "-o", "exp")
        assert exported.exit_code == 0, exported.output
        atomic_write_json(tmp_path / "plain.json", {})
    finally:
        os.umask(old)
    files = [
        p
        for root in (tmp_path / "runs/m", tmp_path / "exp", tmp_path / "cache")
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    ]
    names = {p.name for p in files}
    assert {
        "run.json",
        "model.keras",
        "history.csv",
        "best.h5",
        "manifest.json",
        "export.json",
        "labels.txt",
    } <= names, names
    assert any(n.startswith("train-") and n.endswith(".npy") for n in names)
    for p in [*files, tmp_path / "plain.json"]:
        assert p.stat().st_mode & 0o777 == 0o644, (p, oct(p.stat().st_mode))


# 7. the wheel carries its data


def test_every_data_file_of_the_package_is_declared_for_the_wheel():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config.get("package-data", {}).get("tlkit", [])
    data = [
        p.relative_to(REPO / "tlkit")
        for p in (REPO / "tlkit").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    ]
    assert data  # the recipes at least
    for path in data:
        assert any(path.match(pattern) for pattern in patterns), path
    assert (REPO / ".ci" / "wheel-smoke").is_file()
    assert "wheel-smoke" in (REPO / ".ci" / "run").read_text()


# 8. loading never runs code


def test_the_keras_floor_is_past_every_published_safe_mode_bypass():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(d for d in deps if d.startswith("keras>="))
    assert tuple(int(x) for x in floor.split(">=")[1].split(".")) >= (3, 14)
    import keras

    assert tuple(int(x) for x in keras.__version__.split(".")[:2]) >= (3, 14)


def craft(run: Path, edit) -> None:
    """Rewrite the config.json inside the run's model.keras with `edit`."""
    path = run / "model.keras"
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["config.json"] = json.dumps(edit(json.loads(members["config.json"]))).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def test_a_crafted_keras_file_is_refused_in_one_line(run_copy, tmp_path):
    import keras

    original = shutil.copyfile(run_copy / "model.keras", tmp_path / "original.keras")
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs)).save(tmp_path / "l.keras")
    shutil.copyfile(tmp_path / "l.keras", run_copy / "model.keras")
    result = invoke("eval", str(run_copy), "--name", "crafted")  # the copy has earlier evals
    assert result.exit_code == 5 and "Keras refused to load it" in one_line(result)

    marker = tmp_path / "ran"

    def call_a_module_function(config):
        config["config"]["layers"][1]["config"]["dtype"] = {
            "module": "os",
            "class_name": "system",
            "config": f"touch {marker}",
            "registered_name": "system",
        }
        return config

    shutil.copyfile(original, run_copy / "model.keras")
    craft(run_copy, call_a_module_function)
    write_folder(tmp_path / "data", ["a", "b"], 4)
    for command in (
        ("eval", str(run_copy), "--name", "crafted"),
        (
            "finetune",
            str(tmp_path / "data"),
            "-o",
            "runs/n",
            *FAST[:2],
            "--weights",
            str(run_copy),
            *FAST[4:],
        ),
    ):
        result = invoke(*command)
        assert result.exit_code in (4, 5) and "Keras refused to load it" in one_line(result)
    assert not marker.exists()


# 9. numbers in range, damaged records in one line


def test_every_numeric_option_has_a_range():
    import click

    from tlkit.cli import commands

    for command in commands():
        for p in command.params:
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)):
                assert isinstance(p.type, (click.IntRange, click.FloatRange)), (
                    command.name,
                    p.name,
                )


@pytest.mark.parametrize("command", ["eval", "diagnose", "lr-find"])
def test_a_batch_size_of_zero_is_one_line(tiny_runs, run_copy, command):
    target = tiny_runs[0] / "train" if command == "lr-find" else run_copy
    result = invoke(
        command,
        str(target),
        "--batch-size",
        "0",
        *(["--backbone", TINY, "--weights", "none"] if command == "lr-find" else []),
    )
    assert result.exit_code == 2 and "'--batch-size': 0 is not in the range x>=1" in one_line(
        result
    )


def test_a_damaged_manifest_or_identity_is_one_line(tmp_path):
    (tmp_path / "cache" / "abc").mkdir(parents=True)
    (tmp_path / "cache" / "abc" / "manifest.json").write_text("{ half")
    result = invoke("cache", "ls")  # listed as what it is, and left alone by `cache rm`
    assert result.exit_code == 0 and "Traceback" not in result.output
    assert "not a tlkit cache: abc (not tlkit's: its manifest.json is not valid JSON)" in (
        result.output
    )
    from tlkit.core.errors import CacheError
    from tlkit.features.cache import open_cache

    with pytest.raises(CacheError, match=r"manifest\.json: not valid JSON"):
        open_cache(tmp_path / "cache", "abc")  # what finetune and precompute-features meet
    (tmp_path / "cache" / "abc" / "manifest.json").write_text('{"splits": 3}')
    with pytest.raises(CacheError, match="not a tlkit cache manifest"):
        open_cache(tmp_path / "cache", "abc")
    run = tmp_path / "runs" / "r.incomplete-12345678" / "checkpoints"
    run.mkdir(parents=True)
    (run / "identity.json").write_text("[1, 2")
    result = invoke("finetune", "--resume", "runs/r")
    assert result.exit_code == 5 and "identity.json: not valid JSON" in one_line(result)


# 10. two processes, one shared folder

PRECOMPUTE = [
    "precompute-features",
    "data",
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--input-size",
    "32",
    "--freeze",
    "all",
]


def _start(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.subprocess
def test_two_processes_building_one_cache_and_one_tfds_folder_at_once(tmp_path):
    write_folder(tmp_path / "data", ["a", "b"], 40)
    procs = [_start(tmp_path, "-m", "tlkit", *PRECOMPUTE) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    caches = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(caches) == 1 and (caches[0] / "manifest.json").is_file()
    alone = subprocess.run(
        [sys.executable, "-m", "tlkit", *PRECOMPUTE, "--cache-dir", "solo"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 0, alone.stderr[-1500:]
    shards = sorted(p.name for p in caches[0].glob("*.npy"))
    assert shards and all(
        (caches[0] / n).read_bytes() == (tmp_path / "solo" / caches[0].name / n).read_bytes()
        for n in shards
    )

    script = (
        "import sys, tensorflow_datasets as tfds; from tlkit.data.tfds_source import "
        "materialize\nwith tfds.testing.mock_data(num_examples=300):\n"
        "    print(materialize('tfds:mnist/train'))"
    )
    shared = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    procs = [_start(tmp_path, "-c", script, env=shared) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-1500:] for o in outs]
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 1
    folder = Path(folders.pop())
    solo = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "x2")},
    )
    assert solo.returncode == 0, solo.stderr[-1500:]
    assert tree_digest(folder) == tree_digest(Path(solo.stdout.strip().splitlines()[-1]))
    assert not list(folder.parent.glob("*.incomplete-*"))


def test_cache_rm_all_keeps_the_lock_a_running_build_holds(tmp_path):
    from tlkit.features.cache import build_lock, remove_caches

    root, done, building = tmp_path / "cache", "d" * 20, "b" * 20  # keys as key_of makes them
    (root / done).mkdir(parents=True)
    manifest = {"schema": 1, "key": done, "dtype": "float16", "inputs": {}, "splits": {}}
    (root / done / "manifest.json").write_text(json.dumps(manifest))  # a cache, if empty
    with build_lock(root, building):
        remove_caches(root, None)
        assert (root / f"{building}.lock").is_file()  # a third process must still wait on it
    remove_caches(root, None)
    assert list(root.iterdir()) == []


# 11. memory that does not grow with views or copies


def test_eval_keeps_n_by_classes_per_member_whatever_the_views(tiny_runs, monkeypatch):
    from tlkit.evaluation import evaluate

    kept = []
    real = evaluate.ViewRunner.probs

    def spy(self, paths, modes, batch_size, **reduce):
        out = real(self, paths, modes, batch_size, **reduce)
        kept.extend(p.nbytes for p in out if p is not None)
        return out

    monkeypatch.setattr(evaluate.ViewRunner, "probs", spy)
    data, runs = tiny_runs
    result = evaluate.evaluate(
        evaluate.EvalConfig(
            runs=[str(runs[0])], data=str(data / "test"), multicrop="10", name="mem"
        )
    )
    n, c = 9, 3
    assert result["views"][0]["count"] == 10
    assert max(kept) <= n * 2 * c * 8  # the mean and the centre view, not 10 views


def test_the_colour_pca_decodes_one_image_at_a_time(tmp_path, monkeypatch):
    from tlkit.data import pipeline
    from tlkit.data.datasets import load_dataset

    data = write_folder(tmp_path / "data", ["a", "b"], 20)
    live, peak = [0], [0]

    class Tracked(np.ndarray):
        def __del__(self):
            live[0] -= 1

    real = pipeline.decode_for

    def decode(path, need, max_pixels):
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        decoded = real(path, need, max_pixels)
        return dataclasses.replace(decoded, image=decoded.image.view(Tracked))

    monkeypatch.setattr(pipeline, "decode_for", decode)
    examples = load_dataset(data).splits["train"]
    pca = pipeline.dataset_color_pca(examples, 10**8)
    assert pca.n_images == len(examples) and peak[0] <= 2
