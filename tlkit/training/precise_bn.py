"""Precise BatchNorm for training from random weights: the statistics recomputed from training
images before each validation, since the moving averages lag weights that move this fast and
validation would judge (and the best-keeper save) a model whose normalization no longer fits it
(docs/training.md measures both). Imported only when a run trains BatchNorm from random weights.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from tlkit.models.freezing import recompute_bn_statistics


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before each validation pass inside fit(), every BatchNorm layer's moving statistics are
    set to those of `batches` under the current weights."""

    def __init__(self, extractor: Any, batches: list[np.ndarray]):
        super().__init__()
        self.extractor, self.batches = extractor, batches  # no head: its dropout stays idle

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        recompute_bn_statistics(self.extractor, self.batches)
