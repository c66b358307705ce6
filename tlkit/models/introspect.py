"""What `tlkit backbones` and `tlkit inspect` print: built from real Keras models, not tables.

Parameter counts with the ImageNet top need the 1000-class model built once (about 25 s for all
ten on two cores), so they are cached per Keras version under ~/.cache/tlkit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tlkit.core.fsutil import atomic_write_json, user_cache_dir
from tlkit.models.backbones import REGISTRY, get_backbone, stage_of_layers


def _cache_file() -> Path:
    import keras

    return user_cache_dir() / f"backbones-keras-{keras.__version__}.json"


def backbone_stats(name: str) -> dict[str, int]:
    """Parameter count with the ImageNet top, and layer count of the headless backbone."""
    import keras

    spec = get_backbone(name)
    full = spec.build(include_top=True)
    params_top = int(full.count_params())
    headless = spec.build(spec.default_size)
    stats = {
        "params_with_top": params_top,
        "params_no_top": int(headless.count_params()),
        "layers": len(headless.layers),
    }
    del full, headless
    keras.backend.clear_session()
    return stats


def backbone_table() -> list[dict[str, Any]]:
    cache = _cache_file()
    known: dict[str, Any] = {}
    if cache.is_file():
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError, RecursionError):  # a memo: damaged means measure again
            known = {}
        if not isinstance(known, dict):
            known = {}
    rows, changed = [], False
    for spec in REGISTRY.values():
        if spec.name not in known:
            known[spec.name] = backbone_stats(spec.name)
            changed = True
        rows.append(
            {
                "name": spec.name,
                **known[spec.name],
                "default_size": spec.default_size,
                "min_size": spec.min_size,
                "preprocessing": spec.preprocessing,
                "stages": len(spec.stages),
            }
        )
    if changed:
        atomic_write_json(cache, known)
    return rows


def layer_table(name: str, input_size: int | None = None) -> list[dict[str, Any]]:
    """Every backbone layer with its index as `--freeze N` counts it."""
    spec = get_backbone(name)
    size = spec.resolve_input_size(input_size)
    base = spec.build(size)
    from tlkit.models.cut import single_tensor_cuts

    names = [layer.name for layer in base.layers]
    stages = stage_of_layers(spec, names)
    cuts = set(single_tensor_cuts(base))
    rows = []
    for i, layer in enumerate(base.layers):
        shape = layer.output.shape if hasattr(layer, "output") else None
        rows.append(
            {
                "index": i,
                "name": layer.name,
                "type": type(layer).__name__,
                "output_shape": list(shape) if shape is not None else None,
                "params": int(layer.count_params()) if layer.built else 0,
                "stage": stages[i],
                "cut": (i + 1) in cuts,
            }
        )
    return rows
