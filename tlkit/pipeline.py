"""Examples -> batches of uint8 images for Keras, decoded in parallel on the CPU.

tf.data runs the Pillow decode in its thread pool (Pillow releases the GIL while decoding and
resizing) and prefetches, so the model never waits on a single-threaded loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.augment import eval_transform
from tlkit.datasets import Example
from tlkit.decode import decode_image


def load_eval_image(path: str, size: int, crop_fraction: float) -> np.ndarray:
    image = eval_transform(decode_image(path), size, crop_fraction)
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise ValueError(f"{path}: transform produced {image.shape} {image.dtype}")  # a bug
    return image


def make_dataset(
    examples: Sequence[Example],
    size: int,
    crop_fraction: float,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    workers: int | None = None,
) -> Any:
    """A tf.data.Dataset of (uint8 images, int labels); order is fixed unless `shuffle`."""
    import tensorflow as tf

    paths = np.array([e.path for e in examples])
    labels = np.array([e.label for e in examples], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if shuffle:
        ds = ds.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)

    def load(path: Any) -> np.ndarray:
        return load_eval_image(path.decode("utf-8"), size, crop_fraction)

    def tf_load(path: Any, label: Any) -> tuple[Any, Any]:
        image = tf.numpy_function(load, [path], tf.uint8, stateful=False)
        image.set_shape((size, size, 3))
        return image, label

    ds = ds.map(tf_load, num_parallel_calls=workers or tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
