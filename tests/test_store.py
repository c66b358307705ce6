"""The resized-image store: the views of the files, never stale, never half-written."""

from __future__ import annotations

import csv
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin

from benchmarks.photos import textured_photo
from tests.conftest import TINY, class_image
from tlkit.cli import cli
from tlkit.core.errors import DataError
from tlkit.data import store
from tlkit.data.audit import audit_folder
from tlkit.data.augment import TrainTransform, eval_need, resolve_augment
from tlkit.data.datasets import load_dataset
from tlkit.data.decode import decode_for
from tlkit.data.pipeline import load_eval_image, load_train_image
from tlkit.data.store import USERS, store_folder, store_images


def jpeg_folder(root: Path, per_class: int = 6, size: tuple[int, int] = (256, 192)) -> Path:
    """Learnable classes as JPEGs big enough to be stored smaller (and decoded reduced)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = class_image(label, rng, 32)
            big = Image.fromarray(small).resize(size, Image.Resampling.NEAREST)
            big.save(root / name / f"img{i}.jpg", quality=90)
    return root


def stored(root: Path, cache: Path, need) -> tuple[list, list]:
    folder = audit_folder(load_dataset(root)).folder
    examples = [e for split in folder.splits.values() for e in split]
    return examples, store_images(examples, folder.digests, need, cache, None, workers=2)


def test_fixed_scale_views_from_the_store_are_the_files_views_bit_for_bit(tmp_path):
    root = tmp_path / "data"
    jpeg_folder(root, per_class=2, size=(1600, 1200))
    Image.fromarray(textured_photo(900, 700)).save(root / "cat" / "big.png")
    light = TrainTransform(resolve_augment("light"), 64, 0.875)
    assert light.need == eval_need(64, 0.875)
    examples, entries = stored(root, tmp_path / "cache", light.need)
    for e, s in zip(examples, entries, strict=True):
        assert Path(s.path).parent == store_folder(tmp_path / "cache", light.need)
        assert Image.open(s.path).size[1] == 73  # the eval scale round(64 / 0.875)
        np.testing.assert_array_equal(
            load_eval_image(s.path, 64, 0.875), load_eval_image(e.path, 64, 0.875)
        )
        for epoch in range(3):
            np.testing.assert_array_equal(
                load_train_image(s.path, light, 0, epoch, 1),
                load_train_image(e.path, light, 0, epoch, 1),
            )


def test_random_resized_crops_from_the_store_stay_close_to_the_files(tmp_path):
    """The store resizes once more, from twice the pixels; crops are drawn in the whole image's
    coordinates. On this noise, the worst case for resampling, measured 1.07 grey levels on
    average from the file's own (reduced-decode) crops; 1.9 when the store kept 1x."""
    path = tmp_path / "data" / "cat" / "photo.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(textured_photo(2000, 1500)).save(path, quality=90)
    (tmp_path / "data" / "dog").mkdir()
    Image.fromarray(textured_photo(400, 300)).save(tmp_path / "data" / "dog" / "d.jpg")
    standard = TrainTransform(resolve_augment("standard"), 64, 0.875)
    examples, entries = stored(tmp_path / "data", tmp_path / "cache", standard.need)
    i = next(i for i, e in enumerate(examples) if e.path == str(path))
    image = Image.open(entries[i].path)
    assert image.info["tlkit-full-size"] == "2000x1500" and image.size[1] < 1500
    diffs = [
        np.abs(
            load_train_image(entries[i].path, standard, 0, 0, n).astype(int)
            - load_train_image(str(path), standard, 0, 0, n)
        ).mean()
        for n in range(12)
    ]
    assert np.mean(diffs) <= 1.25, diffs


def test_a_replaced_file_is_decoded_again(tmp_path):
    root = jpeg_folder(tmp_path / "data", per_class=2)
    need = eval_need(32, 0.875)
    examples, first = stored(root, tmp_path / "cache", need)
    target = examples[0].path
    Image.fromarray(textured_photo(256, 192)).save(target, quality=90)  # new content
    examples, second = stored(root, tmp_path / "cache", need)
    assert second[0].path != first[0].path and second[1:] == first[1:]
    np.testing.assert_array_equal(
        load_eval_image(second[0].path, 32, 0.875), load_eval_image(target, 32, 0.875)
    )


def test_an_interrupted_store_is_never_half_written(tmp_path, monkeypatch):
    root = jpeg_folder(tmp_path / "data", per_class=3)
    need = eval_need(32, 0.875)
    real_save, calls = Image.Image.save, []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            Path(fp).write_bytes(b"\x89PNG half")  # the process dies mid-write
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        stored(root, tmp_path / "cache", need)
    monkeypatch.setattr(Image.Image, "save", real_save)
    folder = store_folder(tmp_path / "cache", need)
    names = sorted(p.name for p in folder.iterdir())
    assert all(n.endswith(".png") or n in ("store.json", USERS) for n in names), names
    for name in names:
        if name.endswith(".png"):
            Image.open(folder / name).load()  # every entry present is whole
    _, entries = stored(root, tmp_path / "cache", need)  # and the rest is made
    assert len({e.path for e in entries}) == 6


def test_finetune_with_the_store_trains_the_same_model(tmp_path, monkeypatch):
    """With fixed-scale views the store changes nothing but the time: the same weights. The
    history says how much of each step waited for input."""
    monkeypatch.chdir(tmp_path)
    jpeg_folder(tmp_path / "data")
    common = ["finetune", "data", "--backbone", TINY, "--weights", "none", "--input-size", "32"]
    common += ["--epochs", "2", "--head-epochs", "1", "--batch-size", "4", "--seed", "1"]
    runner = CliRunner()
    plain = runner.invoke(cli, [*common, "-o", "runs/plain"])
    assert plain.exit_code == 0, plain.output
    result = runner.invoke(cli, [*common, "-o", "runs/stored", "--resized-cache"])
    assert result.exit_code == 0, result.output
    assert "resized-image store: decoding 12 of 12 images once" in result.output
    assert "input wait" in result.output
    again = runner.invoke(cli, [*common, "-o", "runs/again", "--resized-cache"])
    assert again.exit_code == 0 and "decoding" not in again.output  # nothing decoded twice
    import keras

    a = keras.saving.load_model("runs/plain/model.keras").get_weights()
    b = keras.saving.load_model("runs/stored/model.keras").get_weights()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    with open("runs/stored/history.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["phase"] == "fine-tune"]
    assert len(rows) == 2
    for r in rows:
        assert 0 <= float(r["input_share"]) <= 1 and float(r["model_seconds"]) > 0
    config = json.loads(Path("runs/stored/run.json").read_text())["config"]
    assert config["resized_cache"] is True
    (key,) = [p.name for p in Path("cache/images").iterdir()]  # train and val share one need
    listing = runner.invoke(cli, ["cache", "ls"])
    assert f"resized-image store {key}: 12 images" in listing.output
    removed = runner.invoke(cli, ["cache", "rm", key])
    assert removed.exit_code == 0 and not Path("cache/images", key).exists()


def test_a_store_that_cannot_be_written_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jpeg_folder(tmp_path / "data", per_class=3)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "images").write_text("a file where the store's folder should be")
    args = ["finetune", "data", "--backbone", TINY, "--weights", "none", "--input-size", "32"]
    args += ["--epochs", "0", "--head-epochs", "1", "--resized-cache", "--cache-dir", "blocked"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 6, result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    assert line.startswith("Error: blocked/images/") and "cannot write the resized-image" in line
    assert "choose another --cache-dir" in line
    assert "Traceback" not in result.output and not list(Path("runs").glob("*"))


def test_a_store_entry_is_trusted_only_as_a_plausible_downscale(tmp_path):
    """A user's PNG claiming a full size is stored at its real size; a store entry whose
    recorded size cannot be its original's is refused in one line, never divided by."""
    root = jpeg_folder(tmp_path / "data", per_class=2)
    info = PngImagePlugin.PngInfo()
    info.add_text("tlkit-full-size", "40000x1")
    Image.fromarray(textured_photo(300, 200)).save(root / "cat" / "claims.png", pnginfo=info)
    standard = TrainTransform(resolve_augment("standard"), 32, 0.875)
    examples, entries = stored(root, tmp_path / "cache", standard.need)
    i = next(i for i, e in enumerate(examples) if e.path.endswith("claims.png"))
    entry = Path(entries[i].path)
    assert Image.open(entry).info["tlkit-full-size"] == "300x200"
    assert decode_for(entry, standard.need).full == (300, 200)  # honoured in the store
    pixels = Image.open(entry)
    for recorded in ("0x0", "40000x1", "300x100", "junk"):
        damaged = PngImagePlugin.PngInfo()
        damaged.add_text("tlkit-full-size", recorded)
        pixels.save(entry, pnginfo=damaged)
        with pytest.raises(DataError, match=r"damaged resized-image store entry") as caught:
            load_train_image(str(entry), standard, 0, 0, 0)
        assert str(caught.value).startswith(f"{entry}: ") and "\n" not in str(caught.value)


def test_ctrl_c_while_storing_returns_at_once_and_keeps_the_finished_entries(tmp_path, monkeypatch):
    """Ctrl-C during the build waited for every submitted image (40 of 40 decoded, 10 s); now
    the images not started are cancelled, the running ones finish, and every entry is whole."""
    root = jpeg_folder(tmp_path / "data", per_class=20, size=(64, 48))
    need = eval_need(32, 0.875)
    folder = audit_folder(load_dataset(root)).folder
    examples = [e for split in folder.splits.values() for e in split]
    main, lock = threading.main_thread().ident, threading.Lock()
    started, done, interrupted = [], [], []
    real = store._store_one

    def slow(source, entry, need, max_pixels):
        with lock:
            started.append(source)
            if len(started) == 5:  # Ctrl-C, as the terminal sends it
                interrupted.append(time.monotonic())
                signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.25)
        real(source, entry, need, max_pixels)
        done.append(entry)

    monkeypatch.setattr(store, "_store_one", slow)
    # Python's own Ctrl-C handler, whoever started pytest: a shell that starts it in the
    # background leaves SIGINT ignored, and the signal would then do nothing
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            store_images(examples, folder.digests, need, tmp_path / "cache", None, workers=2)
    finally:
        signal.signal(signal.SIGINT, previous)
    returned = time.monotonic() - interrupted[0]
    assert returned < 1.0, f"{returned:.1f} s after Ctrl-C"
    assert len(started) < 10 and len(done) == len(started), (started, done)  # none left running
    entries = sorted(store_folder(tmp_path / "cache", need).iterdir())
    assert sorted(p.name for p in entries if p.suffix == ".png") == sorted(p.name for p in done)
    assert {p.suffix for p in entries if p.name != USERS} == {".png", ".json"}  # no temporary
    for entry in done:
        assert Image.open(entry).size[1] == 37  # whole, at the eval scale
    monkeypatch.setattr(store, "_store_one", real)
    _, stored_all = stored(root, tmp_path / "cache", need)
    assert len({e.path for e in stored_all}) == 40  # and the next run makes the rest
