"""Throughput measurements shared by `tlkit bench-input` and benchmarks/run.py.

`bench-input` answers the planning question: with this machine's cores, does the augmentation
pipeline feed the model as fast as it trains, how many workers does that take, would the
resized-image store (`--resized-cache`) close the gap, or is the model so fast (frozen trunk,
accelerator) that precomputed features are the way?
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.data.augment import TrainTransform
from tlkit.data.datasets import Example
from tlkit.models.freezing import FreezeRequest

HEADROOM_GOAL = 1.2  # the pipeline should outrun the model by 20%, to absorb jitter


def pipeline_images_per_s(
    examples: Sequence[Example],
    transform: TrainTransform,
    batch_size: int,
    workers: int,
    batches: int,
    prefetch: int | None = None,
) -> float:
    """Images/s of the training pipeline (decode + augment + batch) with `workers` threads."""
    from tlkit.core.settings import Loader
    from tlkit.data.pipeline import train_dataset

    needed = (batches + 1) * batch_size
    pool = list(examples) * max(1, -(-needed // len(examples)))
    loader = Loader(batch_size, workers, prefetch, seed=0)
    ds = train_dataset(pool[:needed], transform, loader, range(1))
    it = iter(ds)
    next(it)  # warm-up: thread pool, first albumentations build
    start = time.perf_counter()
    count = sum(int(images.shape[0]) for images, _ in it)
    return count / (time.perf_counter() - start)


def timed_train_steps(model: Any, x: np.ndarray, y: np.ndarray, batch: int, n: int) -> float:
    """Seconds for n optimizer steps, cycling through batches held in memory."""
    import keras

    start = time.perf_counter()
    batches = len(x) // batch
    for i in range(n):
        j = (i % batches) * batch
        model.train_on_batch(x[j : j + batch], y[j : j + batch])
    keras.ops.convert_to_numpy(model.optimizer.iterations)  # wait for queued device work
    return time.perf_counter() - start


def model_images_per_s(
    backbone: str,
    size: int,
    freeze: FreezeRequest,
    batch: int,
    warmup: int = 2,
    steps: int = 5,
    num_classes: int = 10,
) -> float:
    """Training images/s of the tlkit classifier (weights none) on batches held in memory."""
    import keras

    from tlkit.models.backbones import get_backbone
    from tlkit.models.freezing import apply_freeze, resolve_freeze
    from tlkit.models.model import build_classifier

    spec = get_backbone(backbone)
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    base = spec.build(size)
    model = build_classifier(spec, base, num_classes, size)
    apply_freeze(base, resolve_freeze(freeze, spec, [layer.name for layer in base.layers]))
    model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * 2, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, num_classes, batch * 2)
    timed_train_steps(model, x, y, batch, warmup)
    return batch * steps / timed_train_steps(model, x, y, batch, steps)


def plan_input(
    examples: Sequence[Example],
    transform: TrainTransform,
    backbone: str,
    freeze: FreezeRequest,
    batch_size: int,
    max_workers: int | None = None,
    batches: int = 8,
) -> dict[str, Any]:
    """Pipeline images/s for 1..N workers, and from the resized-image store with N, against
    the model's training images/s."""
    max_workers = max_workers or os.cpu_count() or 1
    needed = (batches + 1) * batch_size
    sample = [examples[i % len(examples)] for i in range(min(needed, len(examples)))]
    rows = [
        {
            "workers": w,
            "images_per_s": pipeline_images_per_s(examples, transform, batch_size, w, batches),
        }
        for w in range(1, max_workers + 1)
    ]
    store = store_images_per_s(sample, transform, batch_size, max_workers, batches)
    model_ips = model_images_per_s(backbone, transform.size, freeze, batch_size)
    workers, verdict = input_verdict(rows, model_ips, store["images_per_s"])
    best = max(r["images_per_s"] for r in rows)
    return {
        "images": image_sizes(sample, transform),
        "pipeline": rows,
        "store": store,
        "model_images_per_s": model_ips,
        "headroom": best / model_ips,
        "workers_needed": workers,
        "verdict": verdict,
    }


def image_sizes(examples: Sequence[Example], transform: TrainTransform) -> dict[str, Any]:
    """What the sampled files are: formats, median megapixels, the JPEG reduction their views
    allow (read from the headers only)."""
    from PIL import Image

    formats: dict[str, int] = {}
    pixels, reductions = [], []
    for e in examples:
        with Image.open(e.path) as im:
            kind = im.format or "unknown"
            formats[kind] = formats.get(kind, 0) + 1
            pixels.append(im.size[0] * im.size[1])
            if im.format in ("JPEG", "MPO"):
                reductions.append(transform.need.reduction(*im.size))
    return {
        "formats": formats,
        "median_megapixels": round(statistics.median(pixels) / 1e6, 3),
        "jpeg_reduction": int(statistics.median(reductions)) if reductions else None,
    }


def store_images_per_s(
    examples: Sequence[Example],
    transform: TrainTransform,
    batch_size: int,
    workers: int,
    batches: int,
) -> dict[str, float]:
    """The pipeline fed from a resized-image store of `examples`, made in a temporary folder
    (bench-input leaves nothing behind): the store's images/s, what making it costs, and its
    size per image."""
    from tlkit.core.fsutil import file_hash, folder_bytes
    from tlkit.data.store import store_images

    digests = {e.path: file_hash(e.path) for e in examples}
    with tempfile.TemporaryDirectory(prefix="tlkit-bench-store-") as tmp:
        start = time.perf_counter()
        stored = store_images(examples, digests, transform.need, Path(tmp), None, workers, False)
        build = len(examples) / (time.perf_counter() - start)
        size = folder_bytes(tmp) / len(set(digests.values()))
        rate = pipeline_images_per_s(stored, transform, batch_size, workers, batches)
    return {
        "workers": workers,
        "images_per_s": rate,
        "build_images_per_s": build,
        "bytes_per_image": round(size),
    }


def input_verdict(
    rows: Sequence[dict[str, Any]], model_ips: float, store_ips: float | None = None
) -> tuple[int | None, str]:
    """(the fewest workers whose pipeline outruns the model by HEADROOM_GOAL, or None; what to
    do about it)."""
    best = max(rows, key=lambda r: r["images_per_s"])
    enough = [r["workers"] for r in rows if r["images_per_s"] >= HEADROOM_GOAL * model_ips]
    if enough:
        return enough[0], (
            f"the input keeps up: {enough[0]} worker(s) give >= {HEADROOM_GOAL}x "
            f"the model's {model_ips:.1f} images/s; train with --workers "
            f"{enough[0]} or more"
        )
    bound = (
        f"input-bound: the model trains at {model_ips:.1f} images/s but the pipeline "
        f"gives at most {best['images_per_s']:.1f} with {best['workers']} worker(s)"
    )
    if store_ips is not None and store_ips >= HEADROOM_GOAL * model_ips:
        return None, (
            f"{bound}. From the resized-image store it gives {store_ips:.1f} "
            f"(>= {HEADROOM_GOAL}x): train with --resized-cache"
        )
    store = f"; the resized-image store gives {store_ips:.1f}" if store_ips is not None else ""
    return None, (
        f"{bound}{store}. Freeze more of the backbone and precompute the frozen part's features "
        "once, use a lighter augmentation, or more CPU cores"
    )
