"""tf.distribute on one CPU machine: MirroredStrategy over two logical CPUs, two
MultiWorkerMirroredStrategy workers on localhost, and sharded feature precompute.

Strategies need TensorFlow unstarted, so those runs are real `tlkit` subprocesses.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, replace_keeping_size_and_mtime, write_folder
from test_resume import progress

from tlkit.cli import cli
from tlkit.core.errors import ConfigError
from tlkit.models.distribute import read_tf_config

ARGS = [
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--batch-size",
    "4",
    "--head-epochs",
    "0",
    "--epochs",
    "3",
    "--freeze",
    "11",
    "--dropout",
    "0",
    "--patience",
    "10",
]
# --head-epochs 0: on one device the head phase is a probe on features (training/head.py), under
# several replicas it runs live, so the epochs compared across strategies are fine-tune epochs
TWO_CPUS = {"TLKIT_LOGICAL_CPUS": "2"}


def tlkit(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tlkit", *args],
        cwd=cwd,
        text=True,
        env={**os.environ, **(env or {})},
        capture_output=True,
        timeout=timeout,
    )


def history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def assert_same_training(a: Path, b: Path, rel: float = 1e-3) -> None:
    ha, hb = history(a), history(b)
    assert [(r["phase"], r["epoch"]) for r in ha] == [(r["phase"], r["epoch"]) for r in hb]
    for ra, rb in zip(ha, hb, strict=True):
        for key in ("loss", "val_loss", "val_accuracy"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=rel, abs=1e-4), (key, ra)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps(
        {
            "cluster": {"worker": [f"localhost:{p}" for p in ports]},
            "task": {"type": "worker", "index": index},
        }
    )


def test_tf_config_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                "task": {"type": "worker", "index": 1},
            }
        ),
    )
    spec = read_tf_config()
    assert (spec.workers, spec.index, spec.is_chief, spec.task) == (3, 2, False, "worker:1")
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 0))
    assert read_tf_config().is_chief
    for bad, match in (
        ("{nope", "not valid JSON"),
        ('{"cluster": {}}', "needs a"),
        (tf_config([1, 2], 2), "is not one of"),
    ):
        monkeypatch.setenv("TF_CONFIG", bad)
        with pytest.raises(ConfigError, match=match):
            read_tf_config()
    monkeypatch.delenv("TF_CONFIG")
    assert read_tf_config() is None


def test_bad_strategy_settings_are_one_line_errors(make_folder, monkeypatch, tmp_path):
    data = make_folder(per_class=4)
    runner = CliRunner()
    monkeypatch.delenv("TF_CONFIG", raising=False)
    cases = [
        (["finetune", str(data), *ARGS, "--strategy", "multiworker"], "needs TF_CONFIG"),
        (
            ["precompute-features", str(data), "--weights", "none", "--num-shards", "2"],
            "go together",
        ),
        (
            [
                "precompute-features",
                str(data),
                "--weights",
                "none",
                "--num-shards",
                "2",
                "--shard-index",
                "2",
            ],
            "--shard-index must be in 0..num-shards-1",
        ),
        (["finetune", str(data), *ARGS, "--lr-base-batch", "0"], "--lr-base-batch"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    monkeypatch.setenv("TF_CONFIG", "{nope")
    result = runner.invoke(cli, ["eval", "--strategy", "multiworker"])
    assert result.exit_code == 2 and "TF_CONFIG: not valid JSON" in result.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_the_multiworker_patch_matches_the_installed_keras(monkeypatch):
    """The multiworker fix replaces private Keras internals: this fails loudly the day CI's
    Keras leaves the checked releases or renames what the fix replaces, so that someone checks
    the patch before users meet it. Outside them, multiworker is refused in one line."""
    import keras

    from tlkit.models import distribute

    assert distribute.keras_internals_match() is None, distribute.keras_internals_match()
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    assert "Keras 3.99.0 is outside the checked 3.14-3.15" in distribute.keras_internals_match()
    with pytest.raises(ConfigError, match="--strategy multiworker needs tlkit's fix"):
        distribute._fix_keras_multiworker()


def test_replicas_share_every_batch_and_see_the_same_augmentation(make_folder):
    from tlkit.core.settings import Loader
    from tlkit.data.augment import resolve_augment
    from tlkit.data.datasets import load_dataset
    from tlkit.data.pipeline import build_train_transform, steps_per_epoch, train_dataset
    from tlkit.models.distribute import Share

    examples = load_dataset(str(make_folder(per_class=7)), 0.2).splits["train"]
    n = len(examples)
    transform = build_train_transform(resolve_augment("standard"), examples, 32, 0.875)
    whole = list(
        train_dataset(examples, transform, Loader(4, seed=3), range(2))
        .take(2 * steps_per_epoch(n, 4))
        .as_numpy_iterator()
    )
    weights = [0.5 + e.label for e in examples]
    parts = [
        list(
            train_dataset(
                examples, transform, Loader(4, seed=3), range(2), Share(2, (r,)), weights
            ).as_numpy_iterator()
        )
        for r in (0, 1)
    ]
    steps = steps_per_epoch(n, 4, replicas=2)
    assert len(parts[0]) == len(parts[1]) == 2 * steps
    if n % 4 == 1:  # a last batch of one image cannot feed two replicas: it is left out
        assert steps == n // 4
    kept = [b for i, b in enumerate(whole) if i % steps_per_epoch(n, 4) < steps]
    for (x, y), (x0, y0, w0), (x1, y1, w1) in zip(kept, *parts, strict=True):
        assert np.array_equal(x[0::2], x0) and np.array_equal(x[1::2], x1)  # same pixels
        assert np.array_equal(y[0::2], y0) and np.array_equal(y[1::2], y1)
        assert np.allclose(w0, 0.5 + y0) and np.allclose(w1, 0.5 + y1)


def test_shards_merge_into_the_bytes_of_a_one_process_build(make_folder, monkeypatch):
    import tlkit.features.cache as cache_mod
    import tlkit.features.precompute as precompute
    from tlkit.features.cache import part_path
    from tlkit.features.precompute import PrecomputeConfig, precompute_features

    data = make_folder(per_class=10)
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 3 * 4 * 4 * 32 * 2)  # 3 rows per shard file

    def config(cache_dir: str, **kw) -> PrecomputeConfig:
        return PrecomputeConfig.of(
            data=str(data),
            backbone=TINY,
            weights="none",
            input_size=32,
            batch_size=2,
            cache_dir=cache_dir,
            **kw,
        )

    single = precompute_features(config("single"))
    first = precompute_features(config("sharded", num_shards=3, shard_index=0))
    assert first["missing_shards"] == [1, 2] and first["key"] == single.key
    second = precompute_features(config("sharded", num_shards=3, shard_index=2))
    assert second["missing_shards"] == [1]
    early = CliRunner().invoke(cli, ["cache", "merge", single.key, "--cache-dir", "sharded"])
    assert early.exit_code == 6 and "shard(s) 1 of 3 not finished" in early.output

    def dies(*args):  # the last shard is killed after publishing its part, before merging
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute, "merge_parts", dies)
    with pytest.raises(KeyboardInterrupt):
        precompute_features(config("sharded", num_shards=3, shard_index=1))
    root = data.parent / "sharded"
    assert part_path(root, single.key, 1, 3).is_dir() and not (root / single.key).exists()
    merged = CliRunner().invoke(cli, ["cache", "merge", "--cache-dir", "sharded"])
    assert merged.exit_code == 0, merged.output
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [single.key]  # parts gone
    assert_same_cache(single.path, root / single.key, shard_files=6)


def assert_same_cache(a: Path, b: Path, shard_files: int = 2) -> None:
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert sum(f.endswith(".npy") and "-labels" not in f for f in files) >= shard_files
    for name in files:
        if name == "manifest.json":
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            ma.pop("created"), mb.pop("created")
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_tampered_part_is_refused(make_folder):
    from tlkit.features.precompute import PrecomputeConfig, precompute_features

    data = make_folder(per_class=4)
    config = dict(
        data=str(data), backbone=TINY, weights="none", input_size=32, batch_size=2, num_shards=2
    )
    part = Path(precompute_features(PrecomputeConfig.of(**config, shard_index=0))["part"])
    piece = next(part.glob("*.npy"))
    blob = piece.read_bytes()
    piece.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))  # the last byte, surely changed
    result = CliRunner().invoke(
        cli,
        [
            "precompute-features",
            str(data),
            "--backbone",
            TINY,
            "--weights",
            "none",
            "--input-size",
            "32",
            "--batch-size",
            "2",
            "--num-shards",
            "2",
            "--shard-index",
            "1",
        ],
    )
    assert result.exit_code == 6 and "missing or corrupt" in result.output
    assert str(part) in result.output and "run shard 0 again" in result.output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted one-device run, the reference both strategies are compared with;
    (its data, the run)."""
    root = tmp_path_factory.mktemp("reference")
    data = write_folder(root / "data" / "train", ["a", "b"], 12).parent  # 24: batches of 4
    write_folder(data / "val", ["a", "b"], 3, seed=1)
    single = tlkit(
        ["finetune", str(data), "-o", "runs/single", *ARGS, "--strategy", "default"], root
    )
    assert single.returncode == 0, single.stderr
    return data, root / "runs" / "single"


@pytest.mark.subprocess
def test_mirrored_over_two_cpus_matches_one_device_and_resumes(tmp_path, reference):
    data, single = reference
    mirrored = tlkit(
        [
            "finetune",
            str(data),
            "-o",
            "runs/mirrored",
            *ARGS,
            "--strategy",
            "mirrored",
            "--class-weight",
            "balanced",
        ],
        tmp_path,
        TWO_CPUS,
    )
    assert mirrored.returncode == 0, mirrored.stderr
    assert "mirrored: 2 replicas" in mirrored.stdout and "Traceback" not in mirrored.stderr
    assert "ran out of data" not in mirrored.stderr
    info = json.loads((tmp_path / "runs/mirrored/run.json").read_text())
    assert info["distribution"] == {
        "strategy": "mirrored",
        "replicas": 2,
        "workers": 1,
        "per_replica_batch": 2,
    }
    assert info["optimizer_steps"] == 3 * 6
    assert_same_training(single, tmp_path / "runs/mirrored")

    procs = {
        name: subprocess.Popen(  # side by side: the comparison is of their outputs
            [
                sys.executable,
                "-m",
                "tlkit",
                "eval",
                "runs/mirrored",
                str(data),
                "--split",
                "val",
                "--multicrop",
                "5",
                "--name",
                name,
                "--strategy",
                strategy,
                "--json",
            ],
            cwd=tmp_path,
            text=True,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, strategy, env in (("one", "default", None), ("two", "mirrored", TWO_CPUS))
    }
    evals = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        evals[name] = json.loads(out)
    assert evals["two"]["strategy"]["replicas"] == 2 and evals["two"]["images"] == 6
    assert evals["one"]["top1"] == evals["two"]["top1"]
    assert evals["one"]["log_loss"] == pytest.approx(evals["two"]["log_loss"], rel=1e-5)

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tlkit",
            "finetune",
            str(data),
            "-o",
            "runs/resumed",
            *ARGS,
            "--strategy",
            "mirrored",
        ],
        cwd=tmp_path,
        env={**os.environ, **TWO_CPUS},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while progress(tmp_path, "resumed") < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = tlkit(["finetune", "--resume", "runs/resumed"], tmp_path, TWO_CPUS)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing at epoch 3 of 3" in resumed.stdout
    assert json.loads((tmp_path / "runs/resumed/run.json").read_text())["optimizer_steps"] == 18
    assert_same_training(tmp_path / "runs/mirrored", tmp_path / "runs/resumed", rel=1e-2)


@pytest.mark.subprocess
def test_two_multiworker_processes_train_and_only_the_chief_writes(tmp_path, reference):
    data, single = reference
    homes = [tmp_path / f"worker{i}" for i in range(2)]
    for home in homes:
        home.mkdir()
    outputs = two_workers(
        ["finetune", str(data), "-o", "runs/mw", *ARGS, "--strategy", "multiworker"], homes
    )
    assert "run: runs/mw" in outputs[0] and "not the chief" in outputs[1]
    info = json.loads((homes[0] / "runs/mw/run.json").read_text())
    assert info["distribution"]["workers"] == 2 and info["distribution"]["replicas"] == 2
    assert list(homes[1].iterdir()) == []  # worker 1 wrote nothing at all
    assert_same_training(single, homes[0] / "runs/mw")

    run = homes[0] / "runs/mw"  # every worker evaluates it; the images are split between them
    outputs = two_workers(
        ["eval", str(run), "--split", "val", "--strategy", "multiworker", "--json"], homes
    )
    chief, other = (json.loads(out) for out in outputs)
    reference = tlkit(["eval", str(run), "--split", "val", "--name", "one", "--json"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    one = json.loads(reference.stdout)
    assert chief["images"] == other["images"] == one["images"] == 6
    assert chief["log_loss"] == other["log_loss"] == pytest.approx(one["log_loss"], rel=1e-5)
    assert "output" in chief and "output" not in other and list(homes[1].iterdir()) == []

    # workers that see different files stop, all of them, with one line (no hang)
    shutil.copytree(data, tmp_path / "data")  # worker 0's copy, mtimes kept
    shutil.copytree(data, homes[1] / "data")  # worker 1's own copy, mtimes kept
    replace_keeping_size_and_mtime(tmp_path / "data" / "train" / "a" / "img0.png")  # new bytes
    bad = two_workers(
        ["finetune", "data", "-o", "runs/bad", *ARGS, "--strategy", "multiworker"],
        [tmp_path, homes[1]],
        expect=2,
    )
    assert all("the workers see different data" in err and "Traceback" not in err for err in bad)
    assert not (tmp_path / "runs" / "bad").exists()


def two_workers(args: list[str], homes: list[Path], expect: int = 0) -> list[str]:
    """Run `tlkit ARGS` as the two workers of a localhost cluster; their stdout (or, when
    they are expected to fail, their stderr)."""
    ports = free_ports(2)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tlkit", *args],
            cwd=home,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "TF_CONFIG": tf_config(ports, i)},
        )
        for i, home in enumerate(homes)
    ]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == expect, err
    return [out if expect == 0 else err for out, err in outputs]


@pytest.mark.subprocess
def test_sharded_precompute_in_two_processes_is_byte_identical(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b", "c"], 8)
    common = [
        "precompute-features",
        str(data),
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--input-size",
        "32",
        "--batch-size",
        "4",
        "--json",
    ]
    single = tlkit([*common, "--cache-dir", "single"], tmp_path)
    assert single.returncode == 0, single.stderr
    key = json.loads(single.stdout)["key"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tlkit",
                *common,
                "--cache-dir",
                "sharded",
                "--num-shards",
                "2",
                "--shard-index",
                str(i),
            ],
            cwd=tmp_path,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert_same_cache(tmp_path / "single" / key, tmp_path / "sharded" / key)

    mirrored = tlkit(
        [*common, "--cache-dir", "mirrored", "--strategy", "mirrored"], tmp_path, TWO_CPUS
    )
    assert mirrored.returncode == 0, mirrored.stderr
    assert json.loads(mirrored.stdout)["key"] == key
    for split in ("train", "val"):
        a, b = (np.load(tmp_path / d / key / f"{split}-00000.npy") for d in ("single", "mirrored"))
        assert np.allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-2, atol=1e-3)


def test_multiworker_precompute_computes_one_shard_per_worker(make_folder, monkeypatch):
    from tlkit.features.precompute import PrecomputeConfig, precompute_features

    data = make_folder(per_class=4)
    config = PrecomputeConfig.of(
        data=str(data),
        backbone=TINY,
        weights="none",
        input_size=32,
        batch_size=2,
        strategy="multiworker",
    )
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 1))
    first = precompute_features(config)
    assert (first["shard"], first["num_shards"], first["missing_shards"]) == (1, 2, [0])
    monkeypatch.setenv("TF_CONFIG", tf_config([1, 2], 0))
    cache = precompute_features(config)  # the last to finish publishes
    cache.verify()
    assert (
        cache.manifest["splits"]["train"]["count"] + cache.manifest["splits"]["val"]["count"] == 8
    )
    with pytest.raises(ConfigError, match="use one or the other"):
        precompute_features(
            PrecomputeConfig.of(
                data=str(data),
                backbone=TINY,
                weights="none",
                strategy="multiworker",
                num_shards=2,
                shard_index=0,
            )
        )
