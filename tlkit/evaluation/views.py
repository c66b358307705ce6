"""Test-time views: which views a run saw in training, the view sets, and the choice among them.

A view set averages a model's probabilities over several views of each image. It helps only
with views like those the model was trained on: a model that never saw a mirrored or
off-centre image scores its mirrored and corner views as out-of-distribution inputs (on digits,
10-crop halved the accuracy of a centre-trained model). So:

- `views_seen` reads from run.json what the saved weights were trained on: the augmentation of
  the phase they come from (the head phase trains on the eval view unless --head-views K).
- `unseen` says why a view set lies outside that; `--multicrop auto` considers only the sets
  inside it, scores them on the run's validation split and keeps the cheapest within one
  standard error of the best that is not below single-crop there (`choose`).
- `dense` is the VGG paper's dense evaluation: the network runs fully convolutionally over the
  whole image resized to the eval scale and averages its class-score map (`dense_model`).

Crop sets are lists of views (scale index, position, mirrored), so that every cheaper set is a
subset of a larger one and one forward pass over the larger set scores them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tlkit.core.choices import check
from tlkit.data.augment import resize_shorter
from tlkit.data.decode import Need
from tlkit.data.views_seen import ViewsSeen

# the shorter side / input size of each scale: the first crop sets use the eval scale (index 1)
MULTISCALE = (1.0, 1.0, 1.5)  # x (1, 1/crop_fraction, 1/crop_fraction); 224, 256, 384 for 224
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "centre")
CENTRE = 4


def _views(
    scales: Sequence[int], positions: Sequence[int], mirrors: Sequence[bool]
) -> tuple[tuple[int, int, bool], ...]:
    return tuple((s, p, m) for s in scales for m in mirrors for p in positions)


# mode -> its views (scale index, position index, mirrored), in the order they are rendered
CROP_SETS: dict[str, tuple[tuple[int, int, bool], ...]] = {
    "1": ((1, CENTRE, False),),
    "2": ((1, CENTRE, False), (1, CENTRE, True)),
    "5": _views([1], range(5), [False]),
    "10": _views([1], range(5), [False, True]),
    "multiscale": _views([0, 1, 2], range(5), [False, True]),
}
DESCRIPTIONS = {
    "1": "the centre crop (the eval transform)",
    "2": "the centre crop and its mirror",
    "5": "4 corner crops and the centre",
    "10": "4 corners and the centre, and their mirrors",
    "multiscale": "the 10 crops at 3 scales",
    "dense": "the whole image at the eval scale, score map averaged",
}
# candidates of --multicrop auto, cheapest first (forward-pass pixels per image, 4:3 photo)
AUTO_ORDER = ("1", "2", "dense", "5", "10", "multiscale")


def scale_factors(crop_fraction: float) -> tuple[float, ...]:
    """Shorter side / input size of each scale index; index 1 is the eval scale."""
    return tuple(f if i == 0 else f / crop_fraction for i, f in enumerate(MULTISCALE))


def center_index(mode: str) -> int:
    """Where the plain eval view sits in a crop set's views."""
    return CROP_SETS[mode].index((1, CENTRE, False))


def subset(superset: str, mode: str) -> list[int]:
    """Indices of `mode`'s views among `superset`'s."""
    views = CROP_SETS[superset]
    return [views.index(v) for v in CROP_SETS[mode]]


def crop_views(image: np.ndarray, size: int, crop_fraction: float, mode: str) -> np.ndarray:
    """The views of one decoded image, (K, size, size, 3) uint8, in CROP_SETS[mode] order: each
    scale resizes the shorter side to round(size x factor) (never below size) once."""
    check("--multicrop", mode, tuple(CROP_SETS))
    factors = scale_factors(crop_fraction)
    resized: dict[int, np.ndarray] = {}
    out = []
    for s, p, mirrored in CROP_SETS[mode]:
        if s not in resized:
            resized[s] = resize_shorter(image, max(size, round(size * factors[s])))
        img = resized[s]
        h, w = img.shape[:2]
        top = {0: 0, 1: 0, 2: h - size, 3: h - size, 4: (h - size) // 2}[p]
        left = {0: 0, 1: w - size, 2: 0, 3: w - size, 4: (w - size) // 2}[p]
        crop = img[top : top + size, left : left + size]
        out.append(crop[:, ::-1] if mirrored else crop)
    return np.ascontiguousarray(np.stack(out))


def views_need(size: int, crop_fraction: float, mode: str) -> Need:
    """The pixels a view set is cut from: its largest scale (dense: the eval scale)."""
    factors = scale_factors(crop_fraction)
    scales = {1} if mode == "dense" else {s for s, _, _ in CROP_SETS[mode]}
    return Need(shorter=max(max(size, round(size * factors[s])) for s in scales))


def dense_input(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """The whole image, shorter side at the eval scale (what the eval crop is cut from)."""
    return np.ascontiguousarray(resize_shorter(image, max(size, round(size / crop_fraction))))


def unseen(mode: str, seen: ViewsSeen, crop_fraction: float) -> str | None:
    """None when every view of `mode` is like those training showed; else what is not."""
    if mode == "1":
        return None
    factors = scale_factors(crop_fraction)
    # dense sees the whole image at the eval scale: off-centre content, never mirrored here
    # (its mirrored pass is added only when training mirrored)
    views = ((1, 0, False),) if mode == "dense" else CROP_SETS[mode]
    missing = []
    if any(m for _, _, m in views) and not seen.mirror:
        missing.append("mirrored views (training never mirrored)")
    moved = [s for s, p, _ in views if (s, p) != (1, CENTRE)]  # other than the eval view
    if seen.crop == "center":
        if moved:
            missing.append("off-centre content (training saw the centre crop only)")
    elif bad := sorted({factors[s] for s in moved if not seen.scale_seen(factors[s])}):
        missing.append(
            "shorter side " + ", ".join(f"{b:.3g}x" for b in bad) + " the input "
            "size (outside the training crops)"
        )
    return "; ".join(missing) or None


def candidates(seen: ViewsSeen, crop_fraction: float) -> list[str]:
    """The view sets --multicrop auto considers, cheapest first."""
    return [m for m in AUTO_ORDER if unseen(m, seen, crop_fraction) is None]


def choose(scores: dict[str, np.ndarray], labels: np.ndarray) -> tuple[str, list[dict[str, Any]]]:
    """The view set to use, from each candidate's (N, C) validation probabilities (cheapest
    first, "1" among them): `choose_by` on their per-image losses and top-1 hits."""
    from tlkit.core.calibration import per_image_log_loss

    return choose_by(
        {m: per_image_log_loss(p, labels) for m, p in scores.items()},
        {m: p.argmax(1) == labels for m, p in scores.items()},
    )


def choose_by(
    losses: dict[str, np.ndarray], hits: dict[str, np.ndarray]
) -> tuple[str, list[dict[str, Any]]]:
    """The cheapest candidate within one standard error of the lowest log loss among those
    whose top-1 is at least single-crop's, from what that rule reads: each candidate's (N,)
    per-image validation losses and top-1 hits (cheapest first, "1" among them). Returns it
    and every candidate's scores."""
    from tlkit.core.selection import one_se_choice

    top1 = {m: float(np.mean(h)) for m, h in hits.items()}
    eligible = [m for m in losses if top1[m] >= top1["1"]]
    chosen, se_above = one_se_choice([losses[m] for m in eligible])
    rows = [
        {
            "views": m,
            "val_loss": float(losses[m].mean()),
            "val_top1": top1[m],
            "below_single_crop": m not in eligible,
            "se_above_best": _finite(se_above[eligible.index(m)]) if m in eligible else None,
        }
        for m in losses
    ]
    return eligible[chosen], rows


def val_scorer(
    labels: np.ndarray, scored: Sequence[Sequence[tuple[str, list[int] | None]]]
) -> Callable[[int, np.ndarray], np.ndarray]:
    """A `reduce` for ViewRunner.probs that keeps only what `choose_by` reads: member i's
    batch (B, K, C) of views -> (B, 2 x its candidates), per image each candidate's log loss
    and top-1 hit, a candidate being `scored[i]`'s (name, its views' indices, None: all).
    Kept: N x candidates, not N x K x C. Batches come in order, so a count finds the labels."""
    from tlkit.core.calibration import per_image_log_loss

    done = [0] * len(scored)

    def reduce(i: int, p: np.ndarray) -> np.ndarray:
        y = labels[done[i] : done[i] + len(p)]
        done[i] += len(p)
        cols = []
        for _, views in scored[i]:
            mean = p.mean(axis=1) if views is None else p[:, views].mean(axis=1)
            cols += [per_image_log_loss(mean, y), mean.argmax(1) == y]
        return np.stack(cols, axis=1)

    return reduce


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None  # JSON has no infinity


def describe(mode: str, count: int | None = None) -> str:
    """The view set in words; with `count` (views per image), dense says if it mirrored."""
    text = DESCRIPTIONS[mode] + (", and its mirror" if mode == "dense" and count == 2 else "")
    return text + (f"; {count} per image" if count else "")
