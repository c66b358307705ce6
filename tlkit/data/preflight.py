"""Checks that need neither TensorFlow nor weights, run before either loads: a mistyped folder
or an impossible freeze plan costs its one line in well under a second, not the 5 to 20 s that
importing TensorFlow and checking weights take (`bad_input_seconds` in benchmarks/run.py).

The backbone, the input size and the freeze plan are checked against the registry (its layer
count), the data by listing its files; decoding every image is the data check's job, later.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlkit.data.datasets import ImageFolder, load_dataset
from tlkit.models.backbones import BackboneSpec, get_backbone
from tlkit.models.distribute import read_tf_config
from tlkit.models.freezing import ModelChoice, check_freeze


@dataclass(frozen=True)
class Checked:
    spec: BackboneSpec
    size: int
    data: str
    val_fraction: float
    scanned: ImageFolder | None  # the data's listing; None for tfds: (listed once written out)

    def dataset(self) -> ImageFolder:
        """The listing made here, or for tfds: the copy written out now (TensorFlow's job)."""
        return self.scanned or load_dataset(self.data, self.val_fraction)


def check_inputs(data: str, model: ModelChoice, val_fraction: float) -> Checked:
    """The checks every command that builds a model from data shares, cheapest first."""
    spec = get_backbone(model.backbone)
    size = spec.resolve_input_size(model.input_size)
    check_freeze(model.freeze, spec, spec.n_layers)
    scanned = None if str(data).startswith("tfds:") else load_dataset(data, val_fraction)
    return Checked(spec, size, str(data), val_fraction, scanned)


def is_chief() -> bool:
    """This process writes the outputs: no TF_CONFIG, or its chief (read without TensorFlow)."""
    cluster = read_tf_config()
    return cluster is None or cluster.is_chief
