"""Several runs as one Keras model: `tlkit export RUN1 RUN2 ...`.

Members may differ in backbone, input size and eval crop (EfficientNet-Lite0 at 224 px, Lite2
at 260). The one model takes the view that holds every member's: the eval view (decode, shorter
side to S / crop, centre S x S) at the largest member crop fraction, at a size S that no member
has to enlarge. Each member's branch cuts its own share of that view from the centre and
resizes it to its input size, which is its own eval view up to one resampling; the members'
probabilities are then averaged with the ensemble's weights. Only stock Keras layers are used
(CenterCrop, Resizing, Rescaling, Add), so plain Keras loads it in safe mode and it converts to
SavedModel and TFLite like a single run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tlkit.core.runs import Run
from tlkit.data.datasets import Example

if TYPE_CHECKING:
    import keras

    from tlkit.evaluation.evaluate import Member

BATCH = 32  # images a batch, for the validation passes of an export
STEEP_SHRINK = 1.3  # a branch that shrinks more than this aliases under plain bilinear
log = logging.getLogger("tlkit")


@dataclass(frozen=True)
class Branch:
    """One member's way from the ensemble's input to its own: the centre `crop` x `crop`
    pixels, resized to `size` (both equal to the input's side: nothing to do)."""

    crop: int
    size: int


@dataclass(frozen=True)
class Geometry:
    """The ensemble's input view: `size` x `size` at `crop_fraction`, and each member's
    branch from it."""

    size: int
    crop_fraction: float
    branches: tuple[Branch, ...]


def ensemble_geometry(runs: Sequence[Run]) -> Geometry:
    """The smallest input from which every member's eval view is a centre crop that is only
    ever shrunk, never enlarged."""
    crops = [float(r.record.crop_fraction) for r in runs]
    widest = max(crops)  # the view that covers the most of the image holds the others
    size = max(
        math.ceil(r.input_size * widest / c - 1e-9) for r, c in zip(runs, crops, strict=True)
    )
    branches = tuple(
        Branch(min(size, round(size * c / widest)), r.input_size)
        for r, c in zip(runs, crops, strict=True)
    )
    for r, b in zip(runs, branches, strict=True):
        if b.crop > STEEP_SHRINK * b.size:
            log.warning(
                "%s: its branch shrinks %d px to %d (bilinear, no area filter: TFLite has "
                "none), so it sees a coarser view than its own; the validation check in "
                "export.json says how far that moves the ensemble. Members of similar input "
                "sizes avoid it",
                r.path,
                b.crop,
                b.size,
            )
    return Geometry(size, widest, branches)


def ensemble_model(models: Sequence[keras.Model], geometry: Geometry, weights: np.ndarray) -> Any:
    """uint8 RGB at the geometry's size -> the weighted mean of the members' probabilities.

    A resized view is float; each member's input is uint8, which Keras truncates to, so half a
    level is added first and the cast rounds."""
    import keras

    image = keras.Input((geometry.size, geometry.size, 3), dtype="uint8", name="image")
    outputs = []
    for i, (model, branch, w) in enumerate(zip(models, geometry.branches, weights, strict=True)):
        if w == 0:
            continue  # greedy selection left it out: not in the exported model at all
        x = image
        if branch.crop != geometry.size:
            x = keras.layers.CenterCrop(branch.crop, branch.crop, name=f"crop_{i}")(x)
        if branch.size != branch.crop:
            # bilinear: TFLite has no antialiased resize; a branch shrinks by 15% at most for
            # the Lite family, where a filter would change little
            x = keras.layers.Resizing(branch.size, branch.size, name=f"resize_{i}")(x)
        if x is not image:
            x = keras.layers.Rescaling(1.0, offset=0.5, name=f"round_{i}")(x)
        member = keras.Model(model.input, model.output, name=f"member_{i}")
        probs = member(x, training=False)  # a fixed graph: no dropout op left for TFLite
        outputs.append(keras.layers.Rescaling(float(w), name=f"weight_{i}")(probs))
    mixed = outputs[0] if len(outputs) == 1 else keras.layers.Add(name="ensemble")(outputs)
    return keras.Model(image, mixed, name="tlkit_ensemble")


def member_val_probs(members: Sequence[Member], val: Sequence[Example]) -> list[np.ndarray]:
    """(N, C) per member: its probabilities of its own eval view (one crop) of each image."""
    from tlkit.evaluation.evaluate import ViewRunner

    probs = ViewRunner(list(members)).probs([e.path for e in val], "1", BATCH)
    return [p[:, 0] for p in probs if p is not None]


def val_check(
    model: Any,
    geometry: Geometry,
    val: Sequence[Example],
    own: list[np.ndarray],
    weights: np.ndarray,
    max_pixels: int,
) -> dict[str, Any]:
    """The one model against the members run one by one on their own views, on the
    validation split: how far a resampled view moves the figures (written to export.json)."""
    from tlkit.core.settings import Loader
    from tlkit.data.pipeline import eval_dataset

    labels = np.array([e.label for e in val])
    data = eval_dataset(
        val, geometry.size, geometry.crop_fraction, Loader(BATCH, max_pixels=max_pixels)
    )
    exported = np.concatenate([np.asarray(model(x, training=False)) for x, _ in data])
    mixed = sum(w * p for w, p in zip(weights, own, strict=True))
    return {
        "val_images": len(val),
        "val_top1_exported": float((exported.argmax(1) == labels).mean()),
        "val_top1_members_one_by_one": float((mixed.argmax(1) == labels).mean()),
        "val_same_top1": float((exported.argmax(1) == mixed.argmax(1)).mean()),
        "val_max_probability_difference": float(np.abs(exported - mixed).max()),
    }


def build_ensemble(runs: Sequence[Run], rule: str) -> tuple[Any, Geometry, dict[str, Any]]:
    """(the one model, its input geometry, export.json's `ensemble` record): the members'
    weights fitted by `rule` on their validation split, and the model checked there."""
    from tlkit.core.errors import DataError
    from tlkit.evaluation.evaluate import Member, eval_examples, member_weights

    geometry = ensemble_geometry(runs)
    try:
        val_set = eval_examples(runs[0], None, "val")
    except DataError as e:
        raise DataError(
            f"{e} (an ensemble export reads the members' validation split, where they were "
            "trained, for its weights and its check: export where that data is)"
        ) from None
    loaded = [Member(r) for r in runs]
    val = val_set.examples
    own = member_val_probs(loaded, val)
    weights, used = member_weights(own, np.array([e.label for e in val]), rule)
    model = ensemble_model([m.model for m in loaded], geometry, weights)
    max_pixels = max(r.max_pixels for r in runs)
    record = {
        "members": [str(r.path) for r in runs],  # the keys `tlkit eval` writes
        "member_weights": [float(w) for w in weights],
        "member_weights_rule": rule if rule != "auto" else f"auto: {used}",
        "member_weights_fitted_on": val_set.source if rule != "equal" else None,
        "branches": [
            {"run": str(r.path), "crop": b.crop, "size": b.size, "in_model": bool(w > 0)}
            for r, b, w in zip(runs, geometry.branches, weights, strict=True)
        ],
        **val_check(model, geometry, val, own, weights, max_pixels),
    }
    return model, geometry, record
