from __future__ import annotations

import numpy as np
import pytest

from tlkit.core.errors import ConfigError
from tlkit.core.settings import Loader
from tlkit.data.augment import resolve_augment
from tlkit.data.datasets import load_folder
from tlkit.data.pipeline import (
    build_train_transform,
    dataset_color_pca,
    eval_dataset,
    steps_per_epoch,
    train_dataset,
)


def epochs_of(ds, n_batches_per_epoch: int):
    batches = [(np.asarray(x), np.asarray(y)) for x, y in ds]
    return [
        batches[i : i + n_batches_per_epoch] for i in range(0, len(batches), n_batches_per_epoch)
    ]


@pytest.fixture
def train_examples(make_folder):
    return load_folder(make_folder(per_class=11), val_fraction=0.1).splits["train"]


def test_output_does_not_depend_on_the_number_of_workers(train_examples):
    transform = build_train_transform(resolve_augment("alexnet"), train_examples, 32, 0.875)
    runs = []
    for workers in (1, 3):
        ds = train_dataset(
            train_examples, transform, Loader(4, workers, prefetch=1, seed=5), range(2)
        )
        runs.append([(np.asarray(x), np.asarray(y)) for x, y in ds])
    assert len(runs[0]) == len(runs[1]) == 2 * steps_per_epoch(len(train_examples), 4)
    for (x1, y1), (x2, y2) in zip(*runs, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_each_epoch_sees_every_image_once_with_new_augmentations(train_examples):
    n = len(train_examples)
    transform = build_train_transform(resolve_augment("alexnet"), train_examples, 32, 0.875)
    ds = train_dataset(train_examples, transform, Loader(4, workers=2, seed=0), range(2))
    e0, e1 = epochs_of(ds, steps_per_epoch(n, 4))
    for epoch in (e0, e1):
        labels = np.concatenate([y for _, y in epoch])
        assert len(labels) == n  # the last, smaller batch is kept
        assert sorted(labels.tolist()) == sorted(e.label for e in train_examples)
        images = np.concatenate([x for x, _ in epoch])
        assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
    x0 = np.concatenate([x for x, _ in e0])
    x1 = np.concatenate([x for x, _ in e1])
    assert not any(np.array_equal(a, b) for a in x0 for b in x1)  # nothing repeats


def test_a_transform_that_changes_the_size_fails_before_training(train_examples):
    aug = resolve_augment("standard", extra=['Resize:{"height": 10, "width": 10}'])
    with pytest.raises(
        ConfigError,
        match=r"img\d+\.png: the transforms produced an image of "
        r"shape \(10, 10, 3\)",
    ):
        build_train_transform(aug, train_examples, 32, 0.875)


def test_dataset_pca_is_deterministic(train_examples):
    a = dataset_color_pca(train_examples)
    assert a == dataset_color_pca(list(reversed(train_examples)))
    assert a.eigvals[0] >= a.eigvals[1] >= a.eigvals[2] > 0


def test_eval_dataset_keeps_file_order(train_examples):
    """Each image, under 3 workers, is the eval transform of its own file, in file order."""
    from PIL import Image

    from tlkit.data.augment import eval_transform

    ds = eval_dataset(train_examples, 32, 0.875, Loader(5, workers=3))
    batches = [(np.asarray(x), np.asarray(y)) for x, y in ds]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert labels.tolist() == [e.label for e in train_examples]
    assert len(images) == len(train_examples)
    for e, image in zip(train_examples, images, strict=True):
        expected = eval_transform(np.asarray(Image.open(e.path).convert("RGB")), 32, 0.875)
        np.testing.assert_array_equal(image, expected, err_msg=e.path)
