"""`augment-preview`: a picture of what an augmentation recipe does to real training images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tlkit.core.errors import ConfigError
from tlkit.core.fsutil import atomic_path, refuse_overwrite
from tlkit.core.settings import SETTINGS, check_fields, setting
from tlkit.data.augment import AugmentConfig, resolve_augment
from tlkit.data.datasets import load_dataset
from tlkit.models.backbones import get_backbone

GAP = 4


@dataclass(frozen=True)
class PreviewConfig:
    """Settings of `tlkit augment-preview`: `count` training images, each drawn `draws` times
    with `augment`, at the input size of `backbone` (or `input_size`), into `output` (a PNG)."""

    data: str | os.PathLike[str] = "data"
    augment: AugmentConfig = setting(
        "augment", factory=lambda: resolve_augment(SETTINGS["augment"].default)
    )
    output: str | os.PathLike[str] = "preview.png"
    count: int = setting("count")
    draws: int = setting("draws")
    backbone: str = setting("backbone")
    input_size: int | None = setting("input_size")
    seed: int = setting("seed")
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if Path(self.output).suffix.lower() != ".png":
            raise ConfigError(f"-o/--output must end in .png. Received: {self.output}")


def augment_preview(config: PreviewConfig) -> Path:
    """Write a PNG grid: one row per image, its eval crop then `draws` augmented versions
    (epochs 0..draws-1 of the training pipeline, so exactly what training would see)."""
    from tlkit.data.pipeline import build_train_transform, load_eval_image, load_train_image

    c, output = config, Path(config.output)
    n, draws, seed, augment = c.count, c.draws, c.seed, c.augment
    refuse_overwrite(output, c.overwrite, "choose another -o/--output or pass --overwrite")
    spec = get_backbone(c.backbone)
    size = spec.resolve_input_size(c.input_size)
    train = load_dataset(c.data).splits["train"]
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
        for col, tile in enumerate(tiles):
            y, x = GAP + r * cell, GAP + col * cell
            grid[y : y + size, x : x + size] = tile
    with atomic_path(output) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return output
