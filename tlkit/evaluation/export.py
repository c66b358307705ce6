"""`tlkit export RUN --format keras|savedmodel|tflite|onnx`: a run's model for deployment.

The model already starts with its preprocessing (uint8 RGB in, probabilities out), so every
export takes raw images exactly as `model.keras` does. Each export folder holds the model,
`labels.txt` (one class per line, in output order) and `export.json` (input shape and dtype,
classes, where it came from). Folders are built whole and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlkit import _version
from tlkit.core.choices import ENSEMBLE_WEIGHTS, EXPORT_FORMATS, check
from tlkit.core.errors import ConfigError
from tlkit.core.fsutil import (
    atomic_write,
    atomic_write_json,
    discard,
    incomplete_dir,
    publish_dir,
    refuse_overwrite,
)
from tlkit.core.runs import Run, load_run
from tlkit.core.settings import SETTINGS
from tlkit.data.augment import eval_protocol
from tlkit.data.decode import decode_protocol
from tlkit.evaluation.evaluate import check_same_split, load_members

log = logging.getLogger("tlkit")
MODEL_FILES = {
    "keras": "model.keras",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
    "onnx": "model.onnx",
}


def _savedmodel(model: Any, path: Path) -> None:
    model.export(str(path), format="tf_saved_model", verbose=False)  # endpoint `serve`


def _tflite(model: Any, path: Path) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        _savedmodel(model, Path(tmp) / "sm")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "sm"))
        path.write_bytes(converter.convert())


def _onnx(model: Any, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import tf2onnx  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs tf2onnx and onnx: pip install 'tlkit[onnx]'") from None
    import numpy as np

    _, height, width, channels = model.input_shape
    model(np.zeros((1, height, width, channels), np.uint8))  # Keras exports only called models
    with warnings.catch_warnings():  # Keras' tf2onnx shim probes np.object, which numpy flags
        warnings.filterwarnings("ignore", r"In the future `np\.object`", FutureWarning)
        model.export(str(path), format="onnx", verbose=False)


def _export_record(
    loaded: Run, fmt: str, size: int | None = None, crop: float | None = None
) -> dict[str, Any]:
    """export.json: the model file, its labels, and what its input and output are (`size` and
    `crop`: an ensemble's input view, else the run's)."""
    size = size or loaded.input_size
    crop = crop or float(loaded.record.crop_fraction)
    return {
        "format": fmt,
        "model": MODEL_FILES[fmt],
        "labels": "labels.txt",
        "input": {
            "shape": [None, size, size, 3],
            "dtype": "uint8",
            "channels": "RGB",
            "preprocessing": "inside the model",
            # what turns a file into that input, as tlkit's eval does it
            "from_a_file": {
                **decode_protocol(),
                **eval_protocol(size, crop),
            },
        },
        "output": {
            "shape": [None, len(loaded.classes)],
            "meaning": "class probabilities",
            "classes": loaded.classes,
        },
        "run": str(loaded.path.resolve()),
        "backbone": loaded.record.backbone,
        "tlkit_version": _version.__version__,
    }


def export_run(
    run: str | os.PathLike[str] | None,
    fmt: str,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a run for deployment, its preprocessing and class names included.

    Args:
        run: the run's folder (None: the newest under runs/).
        fmt: keras, savedmodel, tflite or onnx.
        output: a new folder (default RUN/export/<format>/).
        overwrite: replace an existing export folder.
    """
    check("--format", fmt, EXPORT_FORMATS)
    loaded: Run = load_run(run)
    out = Path(output) if output else loaded.path / "export" / fmt
    refuse_overwrite(
        out,
        overwrite,
        "pass --overwrite or choose another -o/--output",
        kind="export",
        inputs=(loaded.path,),
    )
    tmp = incomplete_dir(out, "export", clean=True)
    try:
        target = tmp / MODEL_FILES[fmt]
        if fmt == "keras":
            shutil.copyfile(loaded.path / "model.keras", target)
        else:
            _WRITERS[fmt](loaded.load_model(), target)
        _write_labels_and_record(tmp, loaded.classes, _export_record(loaded, fmt))
    except BaseException:
        discard(tmp)
        raise
    publish_dir(tmp, out, overwrite=overwrite)
    return out


def _keras(model: Any, path: Path) -> None:
    model.save(str(path))


_WRITERS = {"keras": _keras, "savedmodel": _savedmodel, "tflite": _tflite, "onnx": _onnx}


def _write_labels_and_record(tmp: Path, classes: Sequence[str], record: dict[str, Any]) -> None:
    atomic_write(tmp / "labels.txt", "".join(f"{c}\n" for c in classes))
    atomic_write_json(tmp / "export.json", record)


def export_ensemble(
    runs: Sequence[str | os.PathLike[str]],
    fmt: str,
    weights: str = SETTINGS["ensemble_weights"].default,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Export several runs as one model: each member's view cut from one input, their
    probabilities averaged with the ensemble's weights (tlkit.evaluation.ensemble).

    Args:
        runs: two run folders or more, trained on the same classes and split.
        fmt: keras, savedmodel, tflite or onnx.
        weights: equal; val (fitted on the members' validation split, lowest log loss); or
            greedy (Caruana et al.'s selection with replacement there), as `tlkit eval`'s
            --ensemble-weights. A member greedy leaves out is not in the model.
        output: a new folder (default FIRST_RUN/export/ensemble-<format>/).
        overwrite: replace an existing export folder.
    """
    from tlkit.evaluation.ensemble import build_ensemble

    check("--format", fmt, EXPORT_FORMATS)
    check("--ensemble-weights", weights, ENSEMBLE_WEIGHTS)
    if len(runs) < 2:
        raise ConfigError(f"an ensemble export needs two runs or more. Received: {len(runs)}")
    members = load_members(runs)
    seen: dict[Path, str] = {}
    for given, m in zip(runs, members, strict=True):
        if (where := m.path.resolve()) in seen:
            raise ConfigError(
                f"{given}: the same run as {seen[where]}; an exported ensemble runs each "
                "member once (name each run once)"
            )
        seen[where] = str(given)
    check_same_split(members)
    first = members[0]
    out = Path(output) if output else first.path / "export" / f"ensemble-{fmt}"
    inputs = tuple(m.path for m in members)
    refuse_overwrite(
        out, overwrite, "pass --overwrite or choose another -o/--output", "export", inputs
    )
    model, geometry, ensemble = build_ensemble(members, weights)
    tmp = incomplete_dir(out, "export", clean=True)
    try:
        _WRITERS[fmt](model, tmp / MODEL_FILES[fmt])
        record = _export_record(first, fmt, geometry.size, geometry.crop_fraction)
        record["backbone"] = [m.record.backbone for m in members]
        record["run"] = [str(m.path.resolve()) for m in members]
        record["ensemble"] = ensemble
        _write_labels_and_record(tmp, first.classes, record)
    except BaseException:
        discard(tmp)
        raise
    publish_dir(tmp, out, overwrite=overwrite)
    return out
