"""Whether a model's probabilities mean what they say, and temperature scaling to make them.

ECE (Naeini et al. 2015; Guo et al. 2017's protocol): predictions binned by confidence into 15
equal-width bins; the weighted mean gap between each bin's accuracy and its mean confidence.
Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted on the
validation split's log loss; it never changes which class wins, so accuracy stays the same.
tlkit folds T into the softmax layer's kernel and bias (softmax((xW + b) / T) is
softmax(x W/T + b/T)), so every user of `model.keras` (predict, eval, ensembles, every export)
gets calibrated probabilities without knowing T exists.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

ECE_BINS = 15


def _confidence(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(np.float64)


def reliability_bins(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin (lo, hi]: how many predictions, their mean confidence, accuracy."""
    conf, correct = _confidence(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        member = index == b
        n = int(member.sum())
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": n,
                "confidence": float(conf[member].mean()) if n else math.nan,
                "accuracy": float(correct[member].mean()) if n else math.nan,
            }
        )
    return out


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    total = len(labels)
    return float(
        sum(
            b["count"] / total * abs(b["accuracy"] - b["confidence"])
            for b in reliability_bins(probs, labels, bins)
            if b["count"]
        )
    )


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as dividing the logits by T."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


# Keras's epsilon: the floor its cross-entropy clips probabilities at, so that the losses tlkit
# computes (head checks, every `auto` choice, reports) equal the val_loss Keras's fit() reports.
EPSILON = 1e-7


def per_image_log_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log p(true class) of each image: the one per-image loss that training checks, the
    `auto` choices and the reports all use."""
    out: np.ndarray = -np.log(np.clip(probs[np.arange(len(labels)), labels], EPSILON, 1.0))
    return out


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(per_image_log_loss(probs, labels).mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the log loss of softmax(log p / T): golden-section search
    on log T (the loss is convex in 1/T, so unimodal here)."""

    def loss(log_t: float) -> float:
        return log_loss(apply_temperature(probs, math.exp(log_t)), labels)

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def fold_temperature(dense: Any, temperature: float) -> None:
    """Divide a softmax Dense layer's kernel and bias by T, in place: its softmax is then
    the temperature-scaled one."""
    dense.set_weights([w / temperature for w in dense.get_weights()])


def summary(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"ece": expected_calibration_error(probs, labels), "log_loss": log_loss(probs, labels)}
