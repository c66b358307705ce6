"""The classifier: raw uint8 images -> backbone preprocessing -> backbone -> pooled head.

Preprocessing is built from stock Keras layers, so `model.keras` loads with plain
`keras.saving.load_model` and train, eval and predict can never disagree about it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tlkit.backbones import BackboneSpec

# keras.applications.imagenet_utils constants, RGB order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
BACKBONE_LAYER = "backbone"


def preprocessing_layers(mode: str) -> list[Any]:
    """Layers equal to `imagenet_utils.preprocess_input(x, mode=mode)` on RGB 0..255 input."""
    import keras

    cast = keras.layers.Rescaling(1.0, dtype="float32", name="to_float")
    if mode == "tf":
        return [cast, keras.layers.Rescaling(1 / 127.5, offset=-1.0, dtype="float32",
                                             name="preprocess_tf")]
    if mode == "torch":
        mean = [255.0 * m for m in TORCH_MEAN]
        var = [(255.0 * s) ** 2 for s in TORCH_STD]
        return [cast, keras.layers.Normalization(mean=mean, variance=var, dtype="float32",
                                                 name="preprocess_torch")]
    if mode == "caffe":
        # RGB -> BGR and mean subtraction as one fixed 1x1 convolution (exact: 0/1 weights).
        kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
        for out_ch, in_ch in enumerate((2, 1, 0)):
            kernel[0, 0, in_ch, out_ch] = 1.0
        conv = keras.layers.Conv2D(3, 1, dtype="float32", name="preprocess_caffe",
                                   trainable=False)
        conv.build((None, None, None, 3))
        conv.set_weights([kernel, -np.array(CAFFE_MEAN_BGR, dtype=np.float32)])
        return [cast, conv]
    raise ValueError(f"unknown preprocessing mode {mode!r}")  # the registry is wrong: a bug


def build_classifier(spec: BackboneSpec, base: Any, num_classes: int, input_size: int,
                     dropout: float = 0.2) -> Any:
    """Wrap a backbone (a keras Model, no top) into the full uint8-in, softmax-out classifier."""
    import keras

    base.name = BACKBONE_LAYER
    inputs = keras.Input((input_size, input_size, 3), dtype="uint8", name="image")
    x = inputs
    for layer in preprocessing_layers(spec.preprocessing):
        x = layer(x)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"tlkit_{spec.name}")


def backbone_of(model: Any) -> Any:
    return model.get_layer(BACKBONE_LAYER)


def count_params(weights: list[Any]) -> int:
    return int(sum(np.prod(w.shape) for w in weights))
