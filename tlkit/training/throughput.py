"""Throughput measurements shared by `tlkit bench-input` and benchmarks/run.py.

`bench-input` answers the planning question: with this machine's cores, does the augmentation
pipeline feed the model as fast as it trains, how many workers does that take, or is the model
so fast (frozen trunk, accelerator) that precomputed features are the way?
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
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
    from tlkit.data.pipeline import train_dataset

    needed = (batches + 1) * batch_size
    pool = list(examples) * max(1, -(-needed // len(examples)))
    ds = train_dataset(
        pool[:needed],
        transform,
        batch_size,
        seed=0,
        first_epoch=0,
        epochs=1,
        workers=workers,
        prefetch=prefetch,
    )
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
    model_steps: int = 5,
) -> dict[str, Any]:
    """Pipeline images/s for 1..N workers against the model's training images/s."""
    max_workers = max_workers or os.cpu_count() or 1
    rows = [
        {
            "workers": w,
            "images_per_s": pipeline_images_per_s(examples, transform, batch_size, w, batches),
        }
        for w in range(1, max_workers + 1)
    ]
    model_ips = model_images_per_s(backbone, transform.size, freeze, batch_size, steps=model_steps)
    needed, verdict = input_verdict(rows, model_ips)
    best = max(r["images_per_s"] for r in rows)
    return {
        "pipeline": rows,
        "model_images_per_s": model_ips,
        "headroom": best / model_ips,
        "workers_needed": needed,
        "verdict": verdict,
    }


def input_verdict(rows: Sequence[dict[str, Any]], model_ips: float) -> tuple[int | None, str]:
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
    return None, (
        f"input-bound: the model trains at {model_ips:.1f} images/s but the pipeline "
        f"gives at most {best['images_per_s']:.1f} with {best['workers']} worker(s). "
        "Freeze more of the backbone and precompute the frozen part's features once, "
        "use a lighter augmentation, or more CPU cores"
    )
