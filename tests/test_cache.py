from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, replace_keeping_size_and_mtime

from tlkit.cli import cli
from tlkit.core.errors import CacheError
from tlkit.core.settings import Loader
from tlkit.data.augment import resolve_augment
from tlkit.features.cache import build_lock, cache_dataset, open_cache
from tlkit.features.precompute import PrecomputeConfig, precompute_features


def config(data, **kw):
    base = dict(
        data=str(data),
        backbone=TINY,
        weights="none",
        input_size=32,
        batch_size=8,
        cache_dir="cache",
    )
    return PrecomputeConfig.of(**{**base, **kw})


def test_precompute_writes_a_verified_cache_with_manifest(make_folder):
    data = make_folder(layout="splits", per_class=6)
    cache = precompute_features(config(data))
    m = cache.manifest
    assert m["dtype"] == "float16" and m["inputs"]["cut"]["k"] == 17
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {"train": 12, "val": 4, "test": 4}
    assert m["splits"]["train"]["shape"] == [4, 4, 32]  # the test backbone's output at 32 px
    cache.verify()
    reader = cache.reader("val")
    assert reader.read(0, 0).shape == (4, 4, 32) and reader.labels.tolist() == [0, 0, 1, 1]
    assert not list((data.parent / "cache").glob("*.incomplete-*"))
    again = precompute_features(config(data))  # found, not rebuilt
    assert again.path == cache.path


def test_the_key_changes_with_anything_that_changes_the_numbers(make_folder, monkeypatch):
    data = make_folder(per_class=6)
    key = precompute_features(config(data, dry_run=True))["key"]
    assert precompute_features(config(data, dry_run=True))["key"] == key
    assert precompute_features(config(data, dry_run=True, seed=1))["key"] != key  # weights
    assert precompute_features(config(data, dry_run=True, input_size=40))["key"] != key
    assert precompute_features(config(data, dry_run=True, dtype="float32"))["key"] != key
    assert precompute_features(config(data, dry_run=True, views=2))["key"] != key
    # float16 activations are other numbers: never reused by a float32 run, or the reverse
    assert precompute_features(config(data, dry_run=True, mixed_precision=True))["key"] != key
    with monkeypatch.context() as m:  # a new Pillow / OpenCV / albumentations may move pixels
        m.setattr("tlkit.data.augment.pixel_libraries", lambda: {"pillow": "0.0"})
        assert precompute_features(config(data, dry_run=True))["key"] != key
    replace_keeping_size_and_mtime(data / "cat" / "img0.png")  # as `cp -p` would
    assert precompute_features(config(data, dry_run=True))["key"] != key


def test_dry_run_writes_nothing(make_folder, tmp_path):
    data = make_folder(per_class=4)
    plan = precompute_features(config(data, dry_run=True))
    assert plan["bytes"] == 8 * 512 * 2 and plan["images"] == 8 and not plan["exists"]
    assert not (tmp_path / "cache").exists()


def test_interrupted_build_resumes_and_is_never_read_half_done(make_folder, monkeypatch):
    import tlkit.features.cache as cache_mod
    import tlkit.features.precompute as precompute

    data = make_folder(per_class=10)
    monkeypatch.setattr(cache_mod, "SHARD_BYTES", 4 * 512 * 2)  # 4 rows per shard
    real = precompute.RowMaker
    calls = {"n": 0}

    class Failing(real):
        def __call__(self, split, view, first, examples):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt  # the process dies mid-build
            return super().__call__(split, view, first, examples)

    monkeypatch.setattr(precompute, "RowMaker", Failing)
    with pytest.raises(KeyboardInterrupt):
        precompute_features(config(data, batch_size=4))
    root = data.parent / "cache"
    partial = list(root.glob("*.incomplete-*"))
    assert len(partial) == 1 and not [
        p for p in root.iterdir() if p.is_dir() and ".incomplete-" not in p.name
    ]
    done = sorted(p.name for p in partial[0].glob("train-0*.npy"))
    assert done == ["train-00000.npy", "train-00001.npy"]
    stamp = (partial[0] / "train-00000.npy").stat().st_mtime_ns
    listing = CliRunner().invoke(cli, ["cache", "ls", "--cache-dir", str(root)])
    assert f"unfinished: {partial[0].name} (interrupted build" in listing.output
    monkeypatch.setattr(precompute, "RowMaker", real)
    cache = precompute_features(config(data, batch_size=4))
    assert (cache.path / "train-00000.npy").stat().st_mtime_ns == stamp  # kept, not redone
    cache.verify()


def test_corrupt_shard_is_detected(make_folder):
    cache = precompute_features(config(make_folder(per_class=4)))
    shard = cache.path / cache.manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="corrupt"):
        open_cache(cache.path.parent, cache.key).verify()


def test_a_second_builder_is_refused_while_the_lock_is_held(tmp_path):
    code = (
        "import sys; from pathlib import Path; from tlkit.features.cache import build_lock\n"
        "try:\n    with build_lock(Path(sys.argv[1]), 'k', wait=False): print('GOT')\n"
        "except Exception as e: print('REFUSED', e)"
    )
    with build_lock(tmp_path, "k"):
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
        ).stdout
    assert out.startswith("REFUSED") and "another process is building" in out
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("GOT")  # released with its holder: no stale lock


def test_views_hold_distinct_augmentations_and_training_reads_one(make_folder):
    data = make_folder(per_class=4)
    cache = precompute_features(
        config(data, views=3, augment=resolve_augment("alexnet"), dtype="float32")
    )
    reader = cache.reader("train")
    assert reader.views == 3
    v = [reader.read(0, i) for i in range(3)]
    assert not np.array_equal(v[0], v[1]) and not np.array_equal(v[1], v[2])
    ds = cache_dataset(cache, "train", Loader(4, seed=0), range(2))
    batches = [np.asarray(x) for x, _ in ds]
    assert sum(len(b) for b in batches) == 2 * reader.count
    assert batches[0].dtype == np.float32 and batches[0].shape[1:] == (4, 4, 32)
    # every row is exactly one stored view of one image; each epoch reads each image once
    stored = {(i, k): reader.read(i, k) for i in range(reader.count) for k in range(3)}
    rows = np.concatenate(batches)
    drawn = []
    for row in rows:
        match = [key for key, view in stored.items() if np.array_equal(row, view)]
        assert len(match) == 1
        drawn.append(match[0])
    epochs = [dict(drawn[: reader.count]), dict(drawn[reader.count :])]
    assert all(sorted(e) == list(range(reader.count)) for e in epochs)
    assert any(epochs[0][i] != epochs[1][i] for i in range(reader.count))  # a new view


def test_cache_ls_and_rm(make_folder):
    data = make_folder(per_class=4)
    cache = precompute_features(config(data))
    runner = CliRunner()
    listing = runner.invoke(cli, ["cache", "ls", "--cache-dir", str(cache.path.parent)])
    assert cache.key in listing.output and TINY in listing.output
    bad = runner.invoke(cli, ["cache", "rm", "nope", "--cache-dir", str(cache.path.parent)])
    assert bad.exit_code == 6 and "no such cache" in bad.output
    assert runner.invoke(cli, ["cache", "rm"]).exit_code == 2
    gone = runner.invoke(cli, ["cache", "rm", cache.key, "--cache-dir", str(cache.path.parent)])
    assert gone.exit_code == 0 and not cache.path.exists()


@pytest.mark.slow  # about 10 s: three runs (live, building the cache, reusing it)
def test_training_from_the_cache_matches_the_live_path(make_folder, tmp_path):
    """Augmentation off, same seed: the cached path gives the live path's predictions."""
    import keras

    data = make_folder(per_class=8)
    common = [
        "finetune",
        str(data),
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--freeze",
        "all",
        "--augment",
        "none",
        "--head-epochs",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--cache-dtype",
        "float32",
    ]
    runner = CliRunner()
    live = runner.invoke(cli, [*common, "--no-cache", "-o", "runs/live"])
    assert live.exit_code == 0, live.output
    assert "feature cache: not used (--no-cache)" in live.output
    cached = runner.invoke(cli, [*common, "--cache", "-o", "runs/cached"])
    assert cached.exit_code == 0, cached.output
    assert "feature cache: built and used cache/" in cached.output
    info = json.loads((tmp_path / "runs/cached/run.json").read_text())
    assert info["feature_cache"]["used"] is True
    reuse = runner.invoke(cli, [*common, "-o", "runs/reuse"])
    assert "feature cache: using cache/" in reuse.output
    x = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3)).astype("uint8")
    a = keras.saving.load_model(tmp_path / "runs/live/model.keras").predict(x, verbose=0)
    b = keras.saving.load_model(tmp_path / "runs/cached/model.keras").predict(x, verbose=0)
    np.testing.assert_allclose(a, b, atol=1e-4)
    live_hist = (tmp_path / "runs/live/history.csv").read_text().splitlines()
    cached_hist = (tmp_path / "runs/cached/history.csv").read_text().splitlines()
    for l1, l2 in zip(live_hist[1:], cached_hist[1:], strict=True):
        np.testing.assert_allclose(
            [float(v) for v in l1.split(",")[2:6]],
            [float(v) for v in l2.split(",")[2:6]],
            rtol=1e-3,
        )


def test_random_augmentation_with_one_view_does_not_use_a_cache(make_folder):
    data = make_folder(per_class=4)
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
            "--head-epochs",
            "1",
            "--epochs",
            "0",
            "-o",
            "runs/x",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "feature cache: not used: --augment light is random" in result.output


@pytest.mark.slow  # about 11 s: two runs in float16, which a CPU only emulates
def test_mixed_precision_on_the_cache_path_scales_the_loss_like_the_live_path(make_folder):
    """The tail trained from the cache computes in float16 too; without loss scaling its small
    gradients underflow to zero. Its optimizer must carry the same state as the live path's,
    which Keras wraps in a LossScaleOptimizer (step counter and dynamic scale)."""
    import h5py

    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    data = make_folder(per_class=6)
    counts, used = {}, {}
    for cache in ("off", "build"):
        cfg = FinetuneConfig.of(
            data=str(data),
            backbone=TINY,
            weights="none",
            input_size=32,
            freeze=FreezeRequest(blocks=2),
            augment=resolve_augment("none"),
            head_epochs=1,
            epochs=1,
            batch_size=8,
            mixed_precision=True,
            cache=cache,
            cache_dir="cache",
            output=f"runs/{cache}",
        )
        run = finetune(cfg, verbose=0)
        used[cache] = run.record.feature_cache["used"]
        with h5py.File(run.path / "checkpoints" / "last.h5", "r") as f:
            counts[cache] = int(f["optimizer"].attrs["count"])
    assert used == {"off": False, "build": True}
    assert counts["build"] == counts["off"]


def test_the_reader_holds_one_descriptor_per_shard_and_the_row_maker_its_threads(make_folder):
    import threading

    from tlkit.data.augment import resolve_augment
    from tlkit.data.pipeline import build_train_transform
    from tlkit.features.rows import RowMaker

    data = make_folder(per_class=6)
    cache = precompute_features(config(data))

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    reader = cache.reader("train")
    held = open_fds() - before
    assert held == len(reader.files)
    rows = [reader.read(i, 0) for i in range(reader.count) for _ in range(3)]
    assert open_fds() - before == held and len(rows) == 3 * reader.count  # none per row
    reader.close()
    assert open_fds() == before

    from tlkit.data.datasets import load_dataset

    val = list(load_dataset(str(data)).splits["val"])
    before_threads = set(threading.enumerate())
    transform = build_train_transform(resolve_augment("none"), val, 32, 0.875)
    with RowMaker(transform, 0.875, Loader(workers=2, max_pixels=10**8, seed=0)) as make_rows:
        assert len(make_rows("val", 0, 0, val)) == len(val)
        pool_threads = set(threading.enumerate()) - before_threads
        assert pool_threads
    assert make_rows is not None  # still referenced: its threads ended with the block
    assert not any(t.is_alive() for t in pool_threads)
