"""Pooled feature rows: the frozen backbone run once over a split, for the head probe, the
freeze search, diagnose and lr-find. One home below training and evaluation, which both read
features this way.

`RowMaker` turns examples into model inputs (view v of the augmentation for training rows, the
eval transform otherwise) on a thread pool; `forward` overlaps decoding the next batch with the
model's work on this one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from tlkit.core.settings import Loader
from tlkit.data.augment import TrainTransform, resolve_augment
from tlkit.data.datasets import Example
from tlkit.models.model import POOL_LAYER, backbone_of

# told (seconds an image, images in all) once the first batch is through: the time of the rest
FirstBatch = Callable[[float, int], None]

log = logging.getLogger("tlkit")


class RowMaker:
    """(split, view, first index, examples) -> the model inputs of those images: view `view` of
    the augmentation for training rows, the eval transform otherwise, decoded by a thread pool
    that leaving the `with` block ends (not whenever the garbage collector gets to it)."""

    def __init__(self, transform: TrainTransform, crop_fraction: float, loader: Loader):
        """`loader`: the augmentation's seed, the decoding threads and the pixel limit."""
        self.transform, self.crop_fraction = transform, crop_fraction
        self.seed, self.max_pixels = loader.seed, loader.max_pixels
        self._pool = ThreadPoolExecutor(max_workers=loader.workers or os.cpu_count() or 1)

    def __call__(
        self, split: str, view: int, first: int, examples: Sequence[Example]
    ) -> np.ndarray:
        from tlkit.data.pipeline import load_eval_image, load_train_image

        t = self.transform
        jobs: list[Callable[[], np.ndarray]]
        if split == "train" and t.config.random:
            jobs = [
                partial(load_train_image, e.path, t, self.seed, view, first + j, self.max_pixels)
                for j, e in enumerate(examples)
            ]
        else:
            jobs = [
                partial(load_eval_image, e.path, t.size, self.crop_fraction, self.max_pixels)
                for e in examples
            ]
        return np.stack(list(self._pool.map(lambda f: f(), jobs)))

    def __enter__(self) -> RowMaker:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class Features:
    """Pooled backbone features: `train` holds `views` blocks of n rows, view-major."""

    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    views: int
    seconds: float


def pooled_extractor(model: Any) -> Any:
    """The classifier up to its pooling layer: raw images in, the head's input out."""
    import keras

    return keras.Model(model.inputs, model.get_layer(POOL_LAYER).output)


def extract(
    extractor: Any,
    train: Sequence[Example],
    val: Sequence[Example],
    transform: TrainTransform,
    views: int,
    loader: Loader,
    on_first_batch: FirstBatch | None = None,
) -> Features:
    """Features of the val images (eval crop) and of every training image: its eval view when
    `views` is 1 (whatever the augmentation), else `views` augmented views."""
    start = time.perf_counter()
    crop_fraction = transform.crop_fraction
    if views == 1 and transform.config.random:
        transform = TrainTransform(resolve_augment("none"), transform.size, crop_fraction)
    rows = RowMaker(transform, crop_fraction, loader)
    with rows as make_rows:
        out = forward(extractor, make_rows, train, val, views, loader.batch_size, on_first_batch)
    labels = np.array([e.label for e in train], np.int32)
    return Features(
        out["train"][0],
        np.tile(labels, views),
        out["val"][0] if len(val) else np.zeros((0, 1), np.float32),
        np.array([e.label for e in val], np.int32),
        views,
        time.perf_counter() - start,
    )


def forward(
    extractor: Any,
    make_rows: RowMaker,
    train: Sequence[Example],
    val: Sequence[Example],
    views: int,
    batch_size: int,
    on_first_batch: FirstBatch | None = None,
) -> dict[str, list[np.ndarray]]:
    """Each output of `extractor` (one model, or several outputs) over `views` views of the
    training images and one of the val images, per split. Decoding the next batch overlaps with
    the model's work on this one; a short last batch is padded, so the graph is traced once."""
    jobs = [
        ("train", v, i, list(train[i : i + batch_size]))
        for v in range(views)
        for i in range(0, len(train), batch_size)
    ]
    jobs += [("val", 0, i, list(val[i : i + batch_size])) for i in range(0, len(val), batch_size)]
    out: dict[str, list[list[np.ndarray]]] = {"train": [], "val": []}

    def rows_of(job: tuple[str, int, int, list[Example]]) -> np.ndarray:
        return np.asarray(make_rows(*job))

    with ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(rows_of, jobs[0])
        for n, (split, _, _, _) in enumerate(jobs):
            rows = pending.result()
            if n + 1 < len(jobs):
                pending = ahead.submit(rows_of, jobs[n + 1])
            t = time.perf_counter()
            padded = (
                np.concatenate(
                    [rows, np.zeros((batch_size - len(rows), *rows.shape[1:]), rows.dtype)]
                )
                if len(rows) < batch_size
                else rows
            )
            result = extractor.predict_on_batch(padded)
            outputs = result if isinstance(result, (list, tuple)) else [result]
            out[split].append([np.asarray(o, np.float32)[: len(rows)] for o in outputs])
            if n == 1 and on_first_batch is not None:  # the first call traced the graph
                on_first_batch((time.perf_counter() - t) / len(rows), views * len(train) + len(val))
    return {
        split: [np.concatenate(parts) for parts in zip(*batches, strict=True)]
        for split, batches in out.items()
    }


def pooled_features(
    model: Any, examples: Sequence[Example], size: int, crop_fraction: float, loader: Loader
) -> np.ndarray:
    """(N, D) float32: each image's eval view through the model up to its pooling layer,
    `loader.batch_size` at a time."""
    plain = TrainTransform(resolve_augment("none"), size, crop_fraction)
    with RowMaker(plain, crop_fraction, loader) as make_rows:
        batch = loader.batch_size
        out = forward(pooled_extractor(model), make_rows, list(examples), [], 1, batch)
    return np.asarray(out["train"][0], np.float32)


BN_IMAGES, BN_BATCH = 256, 32  # random weights' BatchNorm statistics: images, batch size
FADED = 1e-6  # features that spread less at initialization: the signal is lost (float32)


def bn_batches(
    examples: Sequence[Example], size: int, crop_fraction: float, max_pixels: int
) -> Iterator[np.ndarray]:
    """The eval view of up to BN_IMAGES training images, evenly spaced over the split and
    shuffled (a fixed seed), in batches of BN_BATCH and a last shorter one, decoded as they are
    asked for. The split is sorted by class: spaced, each class is in by its share; shuffled,
    each batch holds several. The batch size is fixed, so that a cache's trunk does not move with
    --batch-size."""
    from tlkit.data.pipeline import load_eval_image

    for part in bn_indices(len(examples)):
        yield np.stack(
            [load_eval_image(examples[j].path, size, crop_fraction, max_pixels) for j in part]
        )


def bn_indices(n: int) -> list[np.ndarray]:
    """bn_batches' choice among n rows: up to BN_IMAGES evenly spaced, shuffled (seed 0), in
    batches of BN_BATCH."""
    chosen = np.unique(np.linspace(0, n - 1, min(n, BN_IMAGES)).round().astype(int))
    np.random.default_rng(0).shuffle(chosen)
    return [chosen[i : i + BN_BATCH] for i in range(0, len(chosen), BN_BATCH)]


def resolve_random_bn(
    model: Any,
    source: str,
    examples: Sequence[Example],
    size: int,
    crop_fraction: float,
    max_pixels: int,
    train_bn: bool | None,
) -> bool:
    """Whether BatchNorm trains (`train_bn`; None: decided here), and under random weights
    (`source` "none") where it trains, its statistics set from `bn_batches` first.

    Random weights' BatchNorm starts as an identity (mean 0, variance 1). Where the signal
    survives it at initialization (ResNet50), it stays so, frozen: measured better than
    training it on the digits (docs/training.md). Where the signal fades to nothing
    (EfficientNet-Lite0: outputs of about 4e-12), nothing trains unless BatchNorm normalizes,
    so it trains, from statistics of the data (models/freezing.py, recompute_bn_statistics).
    """
    from tlkit.models.freezing import recompute_bn_statistics

    if source != "none" or train_bn is False:
        return bool(train_bn)
    batches = bn_batches(examples, size, crop_fraction, max_pixels)
    first = next(batches)  # decides; the rest is decoded only if BatchNorm trains
    extractor = pooled_extractor(model)
    if train_bn is None:  # on the last layer's features, whatever else the head reads
        width = int(backbone_of(model).outputs[-1].shape[-1])
        spread = float(np.std(np.asarray(extractor([first], training=False))[:, -width:]))
        train_bn = not spread >= FADED  # a NaN spread (overflow) is no signal either
        log.info(
            "random weights: features' spread at initialization %.2g, %s",
            spread,
            "faded: BatchNorm trains" if train_bn else "BatchNorm stays frozen at its identity",
        )
    if train_bn:
        start = time.perf_counter()
        seen = [first, *batches]
        layers = recompute_bn_statistics(extractor, seen)
        log.info(
            "random weights: %d BatchNorm layers take their statistics from %d training "
            "images (%.1f s), so that inference mode normalizes",
            layers,
            sum(len(b) for b in seen),
            time.perf_counter() - start,
        )
    return train_bn
