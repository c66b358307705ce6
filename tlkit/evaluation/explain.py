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
    read the weights of tlkit's linear head on the last layer's pooled features (see
    `softmax_layer`)."""
    from tlkit.core.errors import RunError
    from tlkit.models.model import softmax_layer, taps_of

    try:
        softmax_layer(model, MAPS, linear=True)
    except RunError:
        other = (
            "this run's head also reads earlier stages (--head-features stages)"
            if taps_of(model)
            else "this run's head is another"
        )
        return (
            f"{MAPS} left out: they read the weights of tlkit's linear head on the last "
            f"layer's pooled features, and {other}"
        )
    return None


def feature_map_model(model: Any) -> Any:
    """Raw images -> the backbone's last feature map (what the pooling layer averages)."""
    import keras

    return keras.Model(model.input, model.get_layer(POOL_LAYER).input)


def class_maps(
    model: Any, images: np.ndarray, classes: Sequence[int], maps_model: Any = None
) -> np.ndarray:
    """(N, h, w) float32: the logit contribution of each position for the given class of each
    image (its mean plus the bias is the logit)."""
    from tlkit.models.distribute import traced_predictor
    from tlkit.models.model import softmax_layer

    maps = traced_predictor(maps_model or feature_map_model(model))
    kernel, _ = softmax_layer(model, MAPS, linear=True).get_weights()
    # one traced function: called eagerly, Keras keeps every layer's output until the call
    # ends (2.3 GB more than traced for 32 EfficientNet-Lite0 images); not predict(): under a
    # multi-worker strategy it would start collective ops that the other workers, done with
    # the evaluation, never join
    feats = np.concatenate(
        [np.asarray(maps(images[i : i + 32]), np.float32) for i in range(0, len(images), 32)]
    )
    weights = np.asarray(kernel)[:, np.asarray(classes)].T  # (N, K)
    return np.asarray(np.einsum("nhwk,nk->nhw", feats, weights), np.float32)


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
