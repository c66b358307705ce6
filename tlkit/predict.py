"""`predict`: top-k labels for image files from one run or an ensemble of runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.errors import ConfigError
from tlkit.runs import Run


def predict(runs: Run | str | os.PathLike | Sequence[Run | str | os.PathLike] | None,
            images: Sequence[str | os.PathLike], top_k: int = 5, multicrop: str = "1",
            batch_size: int = 32) -> list[dict[str, Any]]:
    """One dict per image: path and the top-k (label, probability), highest first."""
    if not images:
        raise ConfigError("no images given; pass one or more image files")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1. Received: {top_k}")
    if runs is None:
        runs = []
    elif isinstance(runs, (Run, str, os.PathLike)):
        runs = [runs]
    paths = [r.path if isinstance(r, Run) else r for r in runs]
    classes, probs = predict_images(paths, [str(p) for p in images], multicrop, batch_size)
    k = min(top_k, len(classes))
    out = []
    for path, p in zip(images, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        out.append({"path": str(path),
                    "top": [{"label": classes[i], "probability": float(p[i])} for i in order]})
    return out


def predict_images(run_paths: Sequence[str], images: Sequence[str], multicrop: str = "1",
                   batch_size: int = 32) -> tuple[list[str], np.ndarray]:
    """(classes, ensemble probabilities (N, C)) for image files."""
    from tlkit.evaluate import Member, load_members, member_view_probs

    runs = load_members(run_paths)
    members = [Member(r) for r in runs]
    probs = member_view_probs(members, list(images), multicrop, batch_size, None)
    return runs[0].classes, sum(p.mean(axis=1) for p in probs) / len(probs)

