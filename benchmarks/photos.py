"""Feeding training from big photos: reduced JPEG decode and the resized-image store.

Called by benchmarks/run.py (`--only photos`); figures, each measured in one process so that
ratios hold on a noisy machine:

- decode_eval_images_per_s_{jpeg,png}_{full,reduced}, reduced_decode_speedup_{jpeg,png}: one
  thread decoding a file and making its 224 px eval view, with the full decode then one area
  resize, and as tlkit does it (a JPEG decoded at 1/2, 1/4 or 1/8, keeping 2x the pixels the
  view needs; PNGs are always decoded whole). On generated 4000x3000 photos (a smooth scene
  with camera-like grain, JPEG quality 90, about 3 MB) and 4000x3000 PNG drawings. Goal for
  JPEG >= 4.
- reduced_decode_parity_{eval,light,vgg,standard,10crop}: mean absolute difference in grey
  levels between the views of a reduced decode and of the full decode of a textured 4000x3000
  JPEG (fine noise over a scene with sharp edges, the hardest case for a box filter; the photo
  of tests/test_reduced_decode.py), 224 px, 16 draws for the random presets. Goal <= 1.
  store_parity_{light,vgg,standard}: the same for views made from the resized-image store.
- epoch_images_per_s_jpeg_{files,store}, store_epoch_speedup_jpeg: the training pipeline
  (`light` preset, 224 px, all cores) over the 4000x3000 JPEGs, decoding the files against
  reading the store; store_build_images_per_s and store_kb_per_image: making the store once.
  Goal >= 5.
- pipeline_peak_rss_mb_4_workers: peak resident memory of a fresh process running the training
  pipeline with 4 workers over the JPEGs (before_pipeline_mb: its peak before the first batch,
  TensorFlow loaded); pipeline_rss_growth_4_workers: that peak for 3x the batches / for 1x
  (bounded: ~1).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PHOTO = (4000, 3000)
SIZE = 224


def textured_photo(width: int, height: int) -> np.ndarray:
    """Fine texture (what separates resampling filters) over a smooth scene."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    scene = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], -1)
    noise = rng.integers(-60, 61, (height, width, 3))
    return np.clip(scene + noise, 0, 255).astype(np.uint8)


def camera_photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth random scene with grain of +-12 grey levels: a phone photo's file size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    scene = np.asarray(low.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    return np.clip(scene + rng.integers(-12, 13, (height, width, 3)), 0, 255).astype(np.uint8)


def drawing(width: int, height: int, seed: int) -> np.ndarray:
    """Flat colour regions with hard edges, as a scanned or exported drawing has."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    return np.asarray(low.resize((width, height), Image.Resampling.NEAREST))


def write_photos(root: Path, n: int, size: tuple[int, int]) -> list[Path]:
    from PIL import Image

    paths = []
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        path = root / f"c{i % 2}" / f"{i}.jpg"
        Image.fromarray(camera_photo(*size, seed=i)).save(path, quality=90)
        paths.append(path)
    return paths


def rate(fn: Callable[[Path], object], paths: list[Path], rounds: int) -> float:
    fn(paths[0])  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        for p in paths:
            fn(p)
    return rounds * len(paths) / (time.perf_counter() - start)


def decode_figures(
    emit: Callable[..., None], jpegs: list[Path], root: Path, pngs: int, size: tuple[int, int]
) -> None:
    from PIL import Image

    from tlkit.data.augment import eval_transform
    from tlkit.data.decode import decode_image
    from tlkit.data.pipeline import load_eval_image

    drawings = []
    for i in range(pngs):
        drawings.append(root / f"drawing{i}.png")
        Image.fromarray(drawing(*size, seed=i)).save(drawings[-1])
    mb = np.mean([p.stat().st_size for p in jpegs]) / 1e6
    for kind, paths in (("jpeg", jpegs), ("png", drawings)):
        full = rate(lambda p: eval_transform(decode_image(p), SIZE, 0.875), paths, 2)
        reduced = rate(lambda p: load_eval_image(str(p), SIZE, 0.875), paths, 2)
        size = "x".join(map(str, Image.open(paths[0]).size))
        emit(f"decode_eval_images_per_s_{kind}_full", full, "images/s", image=size, threads=1)
        emit(f"decode_eval_images_per_s_{kind}_reduced", reduced, "images/s", image=size)
        goal = {"goal": ">= 4", "mb_per_file": round(mb, 2)} if kind == "jpeg" else {}
        emit(f"reduced_decode_speedup_{kind}", reduced / full, "x", **goal)


def parity_figures(emit: Callable[..., None], root: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    from tlkit.data.augment import (
        TrainTransform,
        eval_need,
        eval_transform,
        resolve_augment,
        sample_rng,
    )
    from tlkit.data.datasets import Example
    from tlkit.data.decode import decode_for, decode_image
    from tlkit.data.store import store_images
    from tlkit.evaluation.views import crop_views, views_need

    path = root / "textured.jpg"
    Image.fromarray(textured_photo(*size)).save(path, quality=90)
    full = decode_image(path)

    def mad(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(int) - b).mean())

    eval_view = eval_transform(decode_for(path, eval_need(SIZE, 0.875)).image, SIZE, 0.875)
    emit("reduced_decode_parity_eval", mad(eval_view, eval_transform(full, SIZE, 0.875)), "grey")
    ten = crop_views(decode_for(path, views_need(SIZE, 0.875, "10")).image, SIZE, 0.875, "10")
    emit("reduced_decode_parity_10crop", mad(ten, crop_views(full, SIZE, 0.875, "10")), "grey")
    example = Example(str(path), path.name, 0, "x")
    for preset in ("light", "vgg", "standard"):
        t = TrainTransform(resolve_augment(preset, pca_sigma=0.0), SIZE, 0.875)
        decoded = decode_for(path, t.need)
        store = root / f"store-{preset}"
        entry = store_images([example], {str(path): "p"}, t.need, store, None, 1, False)[0]
        stored = decode_for(entry.path, None)
        pairs = [(t(full, sample_rng(0, 0, i)), i) for i in range(16)]
        reduced = [mad(t(decoded.image, sample_rng(0, 0, i), decoded.full), v) for v, i in pairs]
        kept = [mad(t(stored.image, sample_rng(0, 0, i), stored.full), v) for v, i in pairs]
        k = t.need.reduction(*size)
        emit(f"reduced_decode_parity_{preset}", np.mean(reduced), "grey", worst=max(reduced), k=k)
        emit(f"store_parity_{preset}", np.mean(kept), "grey", worst=round(max(kept), 3))


def epoch_figures(emit: Callable[..., None], jpegs: list[Path], root: Path, workers: int) -> None:
    from tlkit.core.fsutil import file_hash, folder_bytes
    from tlkit.data.augment import TrainTransform, resolve_augment
    from tlkit.data.datasets import Example
    from tlkit.data.store import store_images
    from tlkit.training.throughput import pipeline_images_per_s

    examples = [Example(str(p), p.name, i % 2, "x") for i, p in enumerate(jpegs)]
    t = TrainTransform(resolve_augment("light"), SIZE, 0.875)
    batch = min(8, len(examples) // 2)
    batches = len(examples) // batch - 1  # one epoch, after one batch of warm-up
    files = pipeline_images_per_s(examples, t, batch, workers, batches)
    digests = {e.path: file_hash(e.path) for e in examples}
    start = time.perf_counter()
    stored = store_images(examples, digests, t.need, root / "store", None, workers, False)
    build = len(examples) / (time.perf_counter() - start)
    kb = folder_bytes(root / "store") / len(examples) / 1e3
    from_store = pipeline_images_per_s(stored, t, batch, workers, batches)
    emit("epoch_images_per_s_jpeg_files", files, "images/s", workers=workers, preset="light")
    emit("epoch_images_per_s_jpeg_store", from_store, "images/s", workers=workers)
    emit("store_epoch_speedup_jpeg", from_store / files, "x", goal=">= 5")
    emit("store_build_images_per_s", build, "images/s", workers=workers)
    emit("store_kb_per_image", kb, "kB", note="light preset at 224: shorter side 256")


def rss_figures(emit: Callable[..., None], folder: Path, batches: int) -> None:
    def peak(n: int) -> tuple[float, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--rss-child", str(folder), str(n)],
            capture_output=True,
            text=True,
            check=True,
        )
        before, after = map(float, out.stdout.split()[-2:])
        return before, after

    before, one = peak(batches)
    _, three = peak(3 * batches)
    emit(
        "pipeline_peak_rss_mb_4_workers",
        one,
        "MB",
        batches=batches,
        batch=8,
        before_pipeline_mb=round(before),
    )
    emit("pipeline_rss_growth_4_workers", three / one, "x", goal="~1 (bounded)")


def rss_child(folder: str, batches: int) -> None:
    """Print this process's peak RSS in MB before the pipeline ran and after."""
    from tlkit.core.settings import Loader
    from tlkit.data.augment import TrainTransform, resolve_augment
    from tlkit.data.datasets import Example
    from tlkit.data.pipeline import train_dataset

    paths = sorted(Path(folder).rglob("*.jpg"))
    examples = [Example(str(p), p.name, i % 2, "x") for i, p in enumerate(paths)]
    t = TrainTransform(resolve_augment("light"), SIZE, 0.875)
    epochs = -(-batches * 8 // len(examples))
    ds = train_dataset(examples, t, Loader(8, workers=4, seed=0), range(epochs))
    from benchmarks.common import vm_hwm_kb

    before = vm_hwm_kb() / 1024
    for _ in zip(range(batches), ds, strict=False):
        pass
    print(before, vm_hwm_kb() / 1024)


def photo_figures(emit: Callable[..., None], smoke: bool, workers: int) -> None:
    """All of the above; `smoke`: small images, a few of them."""
    size = (1368, 1024) if smoke else PHOTO  # smoke: still 1/2 for the 224 px eval view
    n = 4 if smoke else 32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jpegs = write_photos(root / "photos", n, size)
        decode_figures(emit, jpegs[:8], root, 2 if smoke else 4, size)
        parity_figures(emit, root, size)
        epoch_figures(emit, jpegs, root, workers)
        rss_figures(emit, root / "photos", 2 if smoke else 12)


if __name__ == "__main__" and sys.argv[1:2] == ["--rss-child"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    rss_child(sys.argv[2], int(sys.argv[3]))
