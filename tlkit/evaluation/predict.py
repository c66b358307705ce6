"""`predict`: top-k labels for image files from one run or an ensemble of runs."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.core.errors import ConfigError
from tlkit.core.runs import Run
from tlkit.core.settings import SETTINGS


def predict(
    runs: Run | str | os.PathLike[str] | Sequence[Run | str | os.PathLike[str]] | None,
    images: Sequence[str | os.PathLike[str]],
    top_k: int = SETTINGS["top_k"].default,
    multicrop: str = SETTINGS["multicrop"].default,
    batch_size: int = SETTINGS["batch_size"].default,
    explain: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """One dict per image: its path and the top-k (label, probability), highest first.

    Args:
        runs: a run (or its folder), several (an ensemble: probabilities averaged), or None
            for the newest under runs/.
        images: image files.
        top_k: labels listed per image.
        multicrop: test-time views averaged per image (`tlkit eval --multicrop`'s choices).
        batch_size: images a batch.
        explain: a new folder for a class-activation overlay of each image's top-1 class (from
            the first run of an ensemble), each named in its dict.
    """
    if not images:
        raise ConfigError("no images given; pass one or more image files")
    SETTINGS["top_k"].check(top_k)
    if runs is None:
        runs = []
    elif isinstance(runs, (Run, str, os.PathLike)):
        runs = [runs]
    paths = [r.path if isinstance(r, Run) else r for r in runs]
    explained = _explained_run(paths) if explain is not None else None  # refused before the work
    classes, probs = predict_images(paths, [str(p) for p in images], multicrop, batch_size)
    k = min(top_k, len(classes))
    out = []
    for path, p in zip(images, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        out.append(
            {
                "path": str(path),
                "top": [{"label": classes[i], "probability": float(p[i])} for i in order],
            }
        )
    if explain is not None and explained is not None:
        _write_overlays(explained, images, probs.argmax(axis=1), classes, explain, out)
    return out


def _explained_run(run_paths: Sequence[Any]) -> tuple[Run, Any]:
    """The run whose activation maps --explain draws (the first) and its model, loaded once;
    refused when its head is not one the maps can read."""
    from tlkit.core.errors import RunError
    from tlkit.core.runs import load_run
    from tlkit.evaluation.explain import no_maps

    run = load_run(run_paths[0] if run_paths else None)
    model = run.load_model()
    if why := no_maps(model):
        raise RunError(f"{run.path}: --explain: {why}. Predict without --explain")
    return run, model


def _write_overlays(
    explained: tuple[Run, Any],
    images: Sequence[str | os.PathLike[str]],
    top: np.ndarray,
    classes: Sequence[str],
    folder: str | os.PathLike[str],
    out: list[dict[str, Any]],
) -> None:
    from pathlib import Path

    from PIL import Image

    from tlkit.core.fsutil import (
        atomic_path,
        incomplete_dir,
        publish_dir,
        refuse_overwrite,
        safe_name,
    )
    from tlkit.evaluation.explain import explain_paths

    refuse_overwrite(folder, False, "choose another --explain folder")
    run, model = explained
    overlays = explain_paths(
        model,
        [str(p) for p in images],
        top.tolist(),
        run.input_size,
        float(run.record.crop_fraction),
        run.max_pixels,
    )
    tmp = incomplete_dir(folder, "explanations")
    for i, (image, picture) in enumerate(zip(images, overlays, strict=True)):
        name = f"{i:04d}-{safe_name(Path(image).stem)}-{safe_name(classes[top[i]])}.png"
        with atomic_path(tmp / name) as dest:
            Image.fromarray(picture).save(dest, format="PNG")
        out[i]["explanation"] = str(Path(folder) / name)
    publish_dir(tmp, folder)


def predict_images(
    run_paths: Sequence[str | os.PathLike[str]],
    images: Sequence[str],
    multicrop: str = SETTINGS["multicrop"].default,
    batch_size: int = SETTINGS["batch_size"].default,
) -> tuple[list[str], np.ndarray]:
    """(classes, ensemble probabilities (N, C)) for image files."""
    from tlkit.evaluation.evaluate import Member, ViewRunner, load_members, resolve_views

    runs = load_members(run_paths)
    runner = ViewRunner([Member(r) for r in runs])
    modes = [c.views for c in resolve_views(runner, multicrop, batch_size)]
    probs = runner.probs(
        list(images), modes, batch_size, reduce=lambda i, p: p.mean(axis=1)
    )  # N x C kept, whatever the views
    every = [p for p in probs if p is not None]  # every member has a mode
    return runs[0].classes, functools.reduce(np.add, every) / len(every)
