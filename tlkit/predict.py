"""`predict`: top-k labels for image files from a finished run."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.errors import ConfigError
from tlkit.runs import Run, load_run


def predict(run: Run | str | os.PathLike | None, images: Sequence[str | os.PathLike],
            top_k: int = 5, batch_size: int = 32) -> list[dict[str, Any]]:
    """One dict per image: path and the top-k (label, probability), highest first."""
    from tlkit.pipeline import load_eval_image

    if not isinstance(run, Run):
        run = load_run(run)
    if not images:
        raise ConfigError("no images given; pass one or more image files")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1. Received: {top_k}")
    k = min(top_k, len(run.classes))
    size, crop = run.input_size, float(run.info["crop_fraction"])
    batch = np.stack([load_eval_image(str(p), size, crop) for p in images])  # bad file: DataError
    model = run.load_model()
    probs = model.predict(batch, batch_size=batch_size, verbose=0)
    out = []
    for path, p in zip(images, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:k]
        out.append({"path": str(path),
                    "top": [{"label": run.classes[i], "probability": float(p[i])} for i in order]})
    return out
