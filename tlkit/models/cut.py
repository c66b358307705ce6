"""Trunk / tail: the frozen part of the model, run once into the feature cache, and the rest.

A cut after the first k backbone layers is usable when exactly one tensor crosses it; inside a
residual or inception block several do. A freeze point N that is not such a cut moves down to
the nearest single-tensor cut k <= N: the frozen layers between k and N then run in the tail,
still frozen. `tlkit inspect` marks the cut points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tlkit.models.model import BACKBONE_LAYER, head_of, pool_maps


def _as_list(x: Any) -> list[Any]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _source_layers(tensor: Any, producer: dict[int, int]) -> set[int]:
    """The layers whose outputs a layer's input is computed from. Usually the one layer that
    made it; an op between layers (MobileNetV3's `x + 3` in its hard sigmoid is a Keras op, not
    a layer) is looked through to the layers that feed it."""
    found, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in producer:
            found.add(producer[id(t)])
            continue
        history = t._keras_history  # the op that made t: Keras 3 has no public accessor
        stack.extend(history.operation._inbound_nodes[history.node_index].input_tensors)
    return found


def crossing_producers(base: Any) -> list[list[int]]:
    """For each k in 0..len(layers): indices of layers[:k] whose output is used by layers[k:]."""
    layers = base.layers
    producer = {id(t): i for i, layer in enumerate(layers) for t in _as_list(layer.output)}
    last_use = [-1] * len(layers)
    for j, layer in enumerate(layers[1:], start=1):
        for t in _as_list(layer.input):
            for i in _source_layers(t, producer):
                last_use[i] = max(last_use[i], j)
    for t in base.outputs:  # the backbone's outputs (its last, and any tap) feed the head
        last_use[producer[id(t)]] = len(layers)
    return [[i for i in range(k) if last_use[i] >= k] for k in range(len(layers) + 1)]


def single_tensor_cuts(base: Any) -> list[int]:
    """Every k >= 1 such that exactly one tensor crosses from layers[:k] to the rest."""
    return [k for k, cross in enumerate(crossing_producers(base)) if k >= 1 and len(cross) == 1]


@dataclass(frozen=True)
class Cut:
    """The trunk is backbone layers[:k]; `layer` produces the one tensor that is cached."""

    k: int
    layer: str
    requested: int  # the freeze point asked for

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "layer": self.layer, "requested": self.requested}


def resolve_cut(base: Any, n_frozen: int) -> Cut | None:
    """The deepest single-tensor cut at or before the freeze point; None if nothing is frozen."""
    if n_frozen < 1:
        return None
    crossing = crossing_producers(base)
    k = max(k for k in range(1, n_frozen + 1) if len(crossing[k]) == 1)
    return Cut(k, base.layers[crossing[k][0]].name, n_frozen)


def build_trunk(model: Any, cut: Cut) -> Any:
    """uint8 images -> cached activations, sharing the classifier's own layers."""
    return trunk_outputs(model, [cut.layer], name="trunk")


def trunk_outputs(model: Any, layers: list[str], pooled: bool = False, name: str = "trunk") -> Any:
    """uint8 images -> the outputs of these backbone layers (and, with `pooled`, the head's
    pooled input last), in one forward pass through the classifier's own layers."""
    import keras

    base = model.get_layer(BACKBONE_LAYER)
    maps = list(base.outputs) if pooled else []
    wanted = [base.get_layer(n).output for n in layers] + maps
    inner = keras.Model(base.input, _one(wanted), name=f"{name}_backbone")
    x = model.input
    for layer in model.layers[1 : model.layers.index(base)]:  # the preprocessing layers
        x = layer(x)
    outs = _as_list(inner(x))
    if pooled:  # the pooling block takes the backbone's maps: one, or the taps and the last
        ends = outs[len(layers) :]
        outs = [*outs[: len(layers)], pool_maps(model, _one(ends))]
    return keras.Model(model.input, _one(outs), name=name)


def _one(xs: list[Any]) -> Any:
    return xs[0] if len(xs) == 1 else xs


def build_tail(model: Any, cut: Cut) -> Any:
    """Cached activations -> class probabilities, sharing (and so training) the model's layers."""
    import keras

    base = model.get_layer(BACKBONE_LAYER)
    crossing = base.get_layer(cut.layer).output
    inputs = keras.Input(crossing.shape[1:], name="features")
    x = inputs
    if cut.k < len(base.layers):
        # a tap at the cut is the cached tensor itself: the tail's input, not an output of
        # its backbone part (Keras cannot make a model whose output is its cloned input)
        later = [t for t in base.outputs if t is not crossing]
        computed = iter(_as_list(keras.Model(crossing, _one(later), name="tail_backbone")(x)))
        x = _one([x if t is crossing else next(computed) for t in base.outputs])
    x = head_of(model)(pool_maps(model, x))
    return keras.Model(inputs, x, name="tail")
