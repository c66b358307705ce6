"""`augment-preview`: a picture of what an augmentation recipe does to real training images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from tlkit.core.choices import DEFAULT_BACKBONE
from tlkit.core.errors import ConfigError
from tlkit.core.fsutil import atomic_path, refuse_overwrite
from tlkit.core.settings import SETTINGS
from tlkit.data.augment import AugmentConfig
from tlkit.data.datasets import load_dataset
from tlkit.models.backbones import get_backbone

GAP = 4


def augment_preview(
    data: str | os.PathLike[str],
    augment: AugmentConfig,
    output: str | os.PathLike[str],
    n: int = 16,
    draws: int = 6,
    backbone: str = DEFAULT_BACKBONE,
    input_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a PNG grid: one row per image, its eval crop then `draws` augmented versions
    (epochs 0..draws-1 of the training pipeline, so exactly what training would see)."""
    from tlkit.data.pipeline import build_train_transform, load_eval_image, load_train_image

    output = Path(output)
    if output.suffix.lower() != ".png":
        raise ConfigError(f"-o/--output must end in .png. Received: {output}")
    refuse_overwrite(output, overwrite, "choose another -o/--output or pass --overwrite")
    SETTINGS["count"].check(n)
    SETTINGS["draws"].check(draws)
    spec = get_backbone(backbone)
    size = spec.resolve_input_size(input_size)
    train = load_dataset(data).splits["train"]
    transform = build_train_transform(augment, train, size, spec.crop_fraction)
    index_of = {e.path: i for i, e in enumerate(train)}
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(n, len(train))).astype(int)]
    rows = []
    for e in chosen:
        tiles = [load_eval_image(e.path, size, spec.crop_fraction)]
        tiles += [
            load_train_image(e.path, transform, seed, epoch, index_of[e.path])
            for epoch in range(draws)
        ]
        rows.append(tiles)
    cell = size + GAP
    grid = np.full((len(rows) * cell + GAP, (draws + 1) * cell + GAP, 3), 255, np.uint8)
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            y, x = GAP + r * cell, GAP + c * cell
            grid[y : y + size, x : x + size] = tile
    with atomic_path(output) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return output
