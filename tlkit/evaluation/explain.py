"""Where the model looks: class activation maps (CAM, Zhou et al. 2016).

A classifier with tlkit's own head ends in global average pooling, dropout (identity at
inference) and one dense softmax layer, so a class's logit is exactly the mean over positions of
sum_k w_k,c * A_k(x, y) plus a bias, where A is the backbone's last feature map. That per-position
sum is the class activation map: an exact decomposition of the logit, with no gradients and no
approximation. Grad-CAM (Selvaraju et al. 2017) reduces to it for this architecture (its
gradient weights are w_k,c / (h * w) at every position) and costs a backward pass more; it is
needed only when a network has layers after its last convolution, which tlkit's own head
never has; a head passed from Python (`finetune(head=...)`) is refused with one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.models.model import POOL_LAYER

MAPS = "activation maps"


def no_maps(model: Any) -> str | None:
    """Why the activation maps cannot be drawn for this model, or None when they can: they
    read the weights of tlkit's linear head (see `softmax_layer`)."""
    from tlkit.core.errors import RunError
    from tlkit.models.model import one_backbone, softmax_layer

    if not one_backbone(model):
        return f"{MAPS} left out: an ensemble of several runs has no one backbone's maps"
    try:
        softmax_layer(model, MAPS, linear=True)
    except RunError:
        return (
            f"{MAPS} left out: they read the weights of tlkit's linear head (a softmax Dense "
            "on the pooled features), and this run's head is another"
        )
    return None


def feature_map_model(model: Any) -> Any:
    """Raw images -> the maps the pooling averages: the backbone's last, and under
    --head-features stages each tapped map before it."""
    import keras

    from tlkit.models.model import taps_of

    n = len(taps_of(model)) + 1
    if n == 1:
        return keras.Model(model.input, model.get_layer(POOL_LAYER).input)
    return keras.Model(model.input, [model.get_layer(f"pool_{i}").input for i in range(n)])


def class_maps(
    model: Any, images: np.ndarray, classes: Sequence[int], maps_model: Any = None
) -> np.ndarray:
    """(N, h, w) float32: the logit contribution of each position for the given class of each
    image (its mean plus the bias is the logit). Under --head-features stages each map's
    contribution (its slice of the head's weights, times its scale) is brought to the finest
    map's grid by repeating cells, which keeps its mean, and the maps are summed."""
    from tlkit.models.distribute import traced_outputs
    from tlkit.models.model import scales_of, softmax_layer

    maps = traced_outputs(maps_model or feature_map_model(model))
    kernel, _ = softmax_layer(model, MAPS, linear=True).get_weights()
    # one traced function: called eagerly, Keras keeps every layer's output until the call
    # ends (2.3 GB more than traced for 32 EfficientNet-Lite0 images); not predict(): under a
    # multi-worker strategy it would start collective ops that the other workers, done with
    # the evaluation, never join
    chunks = [maps(images[i : i + 32]) for i in range(0, len(images), 32)]
    feats = [
        np.concatenate([np.asarray(c[j], np.float32) for c in chunks])
        for j in range(len(chunks[0]))
    ]
    scales = scales_of(model)
    weights = np.asarray(kernel)[:, np.asarray(classes)].T  # (N, K)
    height, width = max(f.shape[1] for f in feats), max(f.shape[2] for f in feats)
    total, start = np.zeros((len(images), height, width), np.float32), 0
    for f, scale in zip(feats, [*scales, 1.0], strict=True):
        part = np.einsum("nhwk,nk->nhw", f, weights[:, start : start + f.shape[-1]]) * scale
        start += f.shape[-1]
        total += _to_grid(part, height, width)
    return total


def _to_grid(part: np.ndarray, height: int, width: int) -> np.ndarray:
    """A coarser map on the finest map's grid: each cell repeated (its mean kept) where the
    grids divide, as a stride-2 network's do; nearest-neighbour resizing where they do not."""
    h, w = part.shape[1:]
    if height % h == 0 and width % w == 0:
        return np.repeat(np.repeat(part, height // h, axis=1), width // w, axis=2)
    import cv2

    return np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in part])


def upsample(cam: np.ndarray, size: int) -> np.ndarray:
    """A map brought to the input's size (bilinear), positive evidence only, scaled to 0..1."""
    import cv2

    up = np.asarray(
        cv2.resize(
            np.maximum(cam, 0).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR
        )
    )
    top = float(up.max())
    return up / top if top > 0 else up


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The input view with the 0..1 map drawn over it in a colour scale (uint8 RGB)."""
    import matplotlib

    colours = (np.asarray(matplotlib.colormaps["jet"](heat))[..., :3] * 255).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colours, 0, 255).astype(
        np.uint8
    )


def explain_images(model: Any, views: np.ndarray, classes: Sequence[int]) -> list[np.ndarray]:
    """Overlays (uint8 RGB, the views' size) of the map of `classes[i]` on `views[i]`."""
    size = views.shape[1]
    maps = class_maps(model, views, classes)
    return [overlay(v, upsample(m, size)) for v, m in zip(views, maps, strict=True)]


def explain_paths(
    model: Any,
    paths: Sequence[str],
    classes: Sequence[int],
    size: int,
    crop_fraction: float,
    max_pixels: int,
) -> list[np.ndarray]:
    """Overlays for image files, on the same eval view the model classified."""
    from tlkit.data.pipeline import load_eval_image

    if not paths:
        return []
    views = np.stack([load_eval_image(p, size, crop_fraction, max_pixels) for p in paths])
    return explain_images(model, views, classes)
