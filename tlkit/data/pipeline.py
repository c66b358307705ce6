"""Examples -> batches of uint8 images for Keras: decode and augment in parallel CPU workers.

Mechanism, chosen by measurement (`python benchmarks/run.py`, figures `pipeline_*`): tf.data
hands whole batches to a pool of `workers` threads, each decoding and augmenting its batch in
Python, and keeps `prefetch` finished batches ahead of training. Pillow decoding and OpenCV
resizing release the GIL and are nearly all of the work, so threads scale; the process-based
grain loader (one process per worker) measured slower on the same sample function (README,
"Benchmarks") and adds inter-process copies and a spawn start that re-imports the user's script.
tf.data also plugs straight into `Model.fit` on the TensorFlow backend.

Determinism: a training sample's randomness depends only on (seed, epoch, index-in-dataset), and
the shuffled order only on (seed, epoch), so results do not depend on the number of workers.

Under a tf.distribute strategy (`Share`), every global batch is still made of the same images;
replica r of R takes its rows r, r+R, ..., and each process decodes only its own replicas' rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkit.core.choices import DEFAULT_MAX_PIXELS
from tlkit.core.errors import ConfigError, DataError
from tlkit.core.settings import Loader
from tlkit.data.augment import (
    AugmentConfig,
    ColorPCA,
    TrainTransform,
    eval_need,
    eval_transform,
    fit_color_pca,
    sample_rng,
)
from tlkit.data.datasets import Example
from tlkit.data.decode import Need, decode_for
from tlkit.models.distribute import WHOLE, Share

PCA_MAX_IMAGES = 256
PCA_PIXELS_PER_IMAGE = 1024


def _checked(image: np.ndarray, path: str, size: int) -> np.ndarray:
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise DataError(
            f"{path}: the transforms produced an image of shape {image.shape} and dtype "
            f"{image.dtype}; every sample must be uint8 ({size}, {size}, 3). Check the extra "
            "transforms, which must not change the size"
        )
    return image


def load_eval_image(
    path: str, size: int, crop_fraction: float, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    decoded = decode_for(path, eval_need(size, crop_fraction), max_pixels)
    return _checked(eval_transform(decoded.image, size, crop_fraction), path, size)


def load_train_image(
    path: str,
    transform: TrainTransform,
    seed: int,
    epoch: int,
    index: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    decoded = decode_for(path, transform.need, max_pixels)
    image = transform(decoded.image, sample_rng(seed, epoch, index), decoded.full)
    return _checked(image, path, transform.size)


class TrainSampleLoader:
    """(epoch, index) -> augmented uint8 image: plain data, so any thread or process can run it."""

    def __init__(
        self,
        examples: Sequence[Example],
        transform: TrainTransform,
        seed: int,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.paths = [e.path for e in examples]
        self.transform, self.seed, self.max_pixels = transform, seed, max_pixels

    def __call__(self, epoch: int, index: int) -> np.ndarray:
        return load_train_image(
            self.paths[index], self.transform, self.seed, epoch, index, self.max_pixels
        )


def dataset_color_pca(
    examples: Sequence[Example], max_pixels: int = DEFAULT_MAX_PIXELS, need: Need | None = None
) -> ColorPCA:
    """AlexNet's RGB PCA from a deterministic sample: up to 256 images evenly spaced in path
    order, 1024 pixels each (seed 0). Same files, same numbers. `need`: the scale the network
    sees (AlexNet's PCA was over its 256 px images), which spares decoding big JPEGs in full."""
    ordered = sorted(examples, key=lambda e: e.relpath)
    step = max(1, len(ordered) // PCA_MAX_IMAGES)
    chosen = ordered[::step][:PCA_MAX_IMAGES]
    return fit_color_pca(
        (decode_for(e.path, need, max_pixels).image for e in chosen),  # one at a time
        PCA_PIXELS_PER_IMAGE,
        seed=0,
    )


def build_train_transform(
    augment: AugmentConfig,
    examples: Sequence[Example],
    size: int,
    crop_fraction: float,
    pca: ColorPCA | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> TrainTransform:
    """The train transform, with the dataset PCA if needed, tried once on a real image now so a
    bad recipe fails before training rather than mid-epoch."""
    if augment.pca_sigma > 0 and pca is None:
        pca = dataset_color_pca(examples, max_pixels, eval_need(size, crop_fraction))
    transform = TrainTransform(augment, size, crop_fraction, pca)
    try:
        load_train_image(examples[0].path, transform, 0, 0, 0, max_pixels)
    except DataError as e:
        raise ConfigError(str(e)) from None
    return transform


def steps_per_epoch(n: int, batch_size: int, replicas: int = 1) -> int:
    """Training batches per epoch. The last, smaller batch is kept unless it holds fewer images
    than there are replicas (a replica would get none); the shuffle differs every epoch, so no
    image is left out for good."""
    full, rest = divmod(n, batch_size)
    return full + (rest >= replicas if rest else 0)


def train_dataset(
    examples: Sequence[Example],
    transform: TrainTransform,
    loader: Loader,
    epochs: range,
    share: Share = WHOLE,
    sample_weights: Sequence[float] | None = None,
) -> Any:
    """The epochs `epochs` (numbers: each draws its own shuffle and augmentations) of shuffled,
    augmented batches; pass steps_per_epoch(n, b, replicas) to fit. Each epoch ends with its
    own (possibly smaller) last batch."""
    samples = TrainSampleLoader(examples, transform, loader.seed, loader.max_pixels)

    def make(epoch: Any, indices: np.ndarray) -> np.ndarray:
        return np.stack([samples(int(epoch), int(i)) for i in indices])

    jobs = epoch_jobs(len(examples), loader.batch_size, loader.seed, epochs, share.replicas)
    size = transform.size
    maker = BatchMaker(make, (size, size, 3), "uint8")
    return run_jobs(jobs, maker, [e.label for e in examples], loader, share, sample_weights)


def epoch_jobs(n: int, batch_size: int, seed: int, epochs: range, replicas: int = 1) -> Any:
    """(epoch, indices) for each batch; the order of an epoch depends on (seed, epoch) only.
    A last batch smaller than `replicas` is left out (see steps_per_epoch)."""
    import tensorflow as tf

    def batches_of(epoch: Any) -> Any:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .batch(batch_size)
            .map(lambda indices: (epoch, indices))
        )

    jobs = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(batches_of)
    return jobs.filter(lambda _, indices: tf.size(indices) >= replicas) if replicas > 1 else jobs


def eval_dataset(
    examples: Sequence[Example],
    size: int,
    crop_fraction: float,
    loader: Loader,
    share: Share = WHOLE,
) -> Any:
    """Batches in file order with the deterministic eval transform; none is left out (a
    replica may get an empty part of the last batch)."""
    paths, max_pixels = [e.path for e in examples], loader.max_pixels

    def make(_: Any, indices: np.ndarray) -> np.ndarray:
        return np.stack(
            [load_eval_image(paths[int(i)], size, crop_fraction, max_pixels) for i in indices]
        )

    jobs = ordered_jobs(len(examples), loader.batch_size)
    maker = BatchMaker(make, (size, size, 3), "uint8")
    return run_jobs(jobs, maker, [e.label for e in examples], loader, share)


def ordered_jobs(n: int, batch_size: int) -> Any:
    import tensorflow as tf

    return tf.data.Dataset.range(n).batch(batch_size).map(lambda i: (tf.constant(0, tf.int64), i))


@dataclass(frozen=True)
class BatchMaker:
    """`make(epoch, indices)` -> the batch of those samples, each of `shape` and `dtype`."""

    make: Callable[[Any, np.ndarray], np.ndarray]
    shape: tuple[int, ...]
    dtype: str


def run_jobs(
    jobs: Any,
    maker: BatchMaker,
    labels: Sequence[int],
    loader: Loader,
    share: Share = WHOLE,
    sample_weights: Sequence[float] | None = None,
) -> Any:
    """(epoch, indices) jobs -> (inputs, labels[, sample weights]) batches built by
    `loader.workers` threads; under a `share`, this process's replicas' parts of each batch,
    one after another.

    One Python call per batch, not per image: tf.data's per-element overhead would otherwise
    cost more than the augmentation (measured: 290 vs 460 images/s on one worker).
    """
    import tensorflow as tf

    label_tensor = tf.constant(np.asarray(labels, np.int32))
    weight_tensor = (
        tf.constant(np.asarray(sample_weights, np.float32)) if sample_weights is not None else None
    )
    if share.replicas > 1:
        local, replicas = tf.constant(share.local, tf.int64), share.replicas
        jobs = jobs.flat_map(
            lambda epoch, indices: tf.data.Dataset.from_tensor_slices(local).map(
                lambda r: (epoch, indices[r::replicas])
            )
        )

    shape, dtype = maker.shape, maker.dtype

    def make(epoch: Any, indices: np.ndarray) -> np.ndarray:
        if len(indices) == 0:  # this replica's part of a last batch smaller than the replicas
            return np.zeros((0, *shape), dtype)
        return maker.make(epoch, indices)

    def tf_make(epoch: Any, indices: Any) -> tuple[Any, ...]:
        inputs = tf.numpy_function(make, [epoch, indices], tf.as_dtype(dtype), stateful=False)
        inputs.set_shape((None, *shape))
        if weight_tensor is None:
            return inputs, tf.gather(label_tensor, indices)
        return inputs, tf.gather(label_tensor, indices), tf.gather(weight_tensor, indices)

    parallel = loader.workers or tf.data.AUTOTUNE
    ds = jobs.map(tf_make, num_parallel_calls=parallel, deterministic=True)
    return ds.prefetch(loader.prefetch or tf.data.AUTOTUNE)
