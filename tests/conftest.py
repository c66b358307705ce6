"""Fixtures: tiny generated image folders, and a clean Keras state per test."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TLKIT_OFFLINE", "1")  # no test may reach the network

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def class_image(label: int, rng: np.random.Generator, size: int = 24) -> np.ndarray:
    """An RGB image whose colour and stripe direction depend on the label: learnable in 1 epoch."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.int32)
    img[..., label % 3] += 150
    if label % 2:
        img[::4, :, :] = 255
    else:
        img[:, ::4, :] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, classes: list[str], per_class: int, seed: int = 0,
                 size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, rng, size)).save(root / cls / f"img{i}.png")
    return root


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "data", classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 12,
             layout: str = "classes", seed: int = 0) -> Path:
        root = tmp_path / name
        if layout == "classes":
            write_folder(root, list(classes), per_class, seed)
        else:
            write_folder(root / "train", list(classes), per_class, seed)
            write_folder(root / "val", list(classes), max(2, per_class // 4), seed + 1)
            write_folder(root / "test", list(classes), max(2, per_class // 4), seed + 2)
        return root

    return make


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own Keras cache and tlkit cache, and runs in its own folder."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.chdir(tmp_path)
    yield
    if "keras" in __import__("sys").modules:
        import keras

        keras.backend.clear_session()
