"""The one rule every `auto` chooses by (`--augment auto`, `--freeze auto`, `--multicrop auto`):
Breiman's one-standard-error rule over per-image validation losses, so that noise on a small
validation split does not pick a riskier setting."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def one_se_choice(losses: Sequence[np.ndarray]) -> tuple[int, list[float]]:
    """Breiman's one-standard-error rule over candidates ordered simplest first: the first
    whose per-image validation losses are within one standard error of the best's (paired
    differences), so that noise on a small validation split does not pick a riskier setting.
    (index chosen, each candidate's mean excess over the best in standard errors)."""
    means = [float(np.mean(x)) if np.all(np.isfinite(x)) else math.inf for x in losses]
    best = int(np.argmin(means))
    excess = []
    for x, m in zip(losses, means, strict=True):
        if not math.isfinite(m):
            excess.append(math.inf)
            continue
        d = x - losses[best]
        se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        excess.append(float(np.mean(d) / se) if se > 0 else (0.0 if np.mean(d) <= 0 else math.inf))
    chosen = next(i for i, e in enumerate(excess) if e <= 1.0)
    return chosen, excess
