"""An ensemble exported as one model beside a single member: file size and TFLite latency.

Three runs are trained briefly (a head epoch on a small generated folder: the figures are about
the exported graph, not its accuracy) on EfficientNet-Lite0, -Lite1 and -Lite2 at their own
sizes (224, 240, 260; the test backbone at 32, 36 and 40 px under --smoke), then exported to
TFLite one by one and as one ensemble. Latency is one image at a time in the TFLite interpreter
on this machine's CPU (the median of the timed calls), as an app would call it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MEMBERS = (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260))
SMOKE_MEMBERS = (("test_resnet", 32), ("test_resnet", 36), ("test_resnet", 40))


def _folder(root: Path, per_class: int, seed: int) -> None:
    """Three classes of 64 px pictures, a colour each with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, colour in enumerate(((200, 40, 40), (40, 200, 40), (40, 40, 200))):
        folder = root / "abc"[label]
        folder.mkdir(parents=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (64, 64, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def _train(data: Path, backbone: str, size: int, out: Path, smoke: bool) -> Path:
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    config = FinetuneConfig.of(
        data=str(data),
        backbone=backbone,
        weights="none" if smoke else "imagenet",
        input_size=size,
        freeze=FreezeRequest(count="all"),
        head_epochs=1,
        epochs=0,
        fine_tune_lr=1e-5,
        batch_size=8,
        output=str(out),
        cache="off",
    )
    return finetune(config, verbose=0).path


def tflite_ms(path: Path, calls: int) -> float:
    """The median milliseconds of one single-image call, after a warm-up call."""
    import numpy as np
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    image = np.random.default_rng(0).integers(0, 256, inp["shape"], dtype=np.uint8)
    times = []
    for i in range(calls + 1):
        start = time.perf_counter()
        interpreter.set_tensor(inp["index"], image)
        interpreter.invoke()
        interpreter.get_tensor(out["index"])
        if i:  # the first call allocates
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def export_figures(emit: Callable[..., None], smoke: bool) -> None:
    from tlkit.evaluation.export import export_ensemble, export_run

    members = SMOKE_MEMBERS if smoke else MEMBERS
    calls = 3 if smoke else 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        _folder(data / "train", 8, seed=0)
        _folder(data / "val", 3, seed=1)
        runs = [
            _train(data, name, size, root / f"run{i}", smoke)
            for i, (name, size) in enumerate(members)
        ]
        singles = [export_run(r, "tflite", root / f"single{i}") for i, r in enumerate(runs)]
        ensemble = export_ensemble(runs, "tflite", output=root / "ensemble")
        sizes = [(p / "model.tflite").stat().st_size / 2**20 for p in singles]
        times = [tflite_ms(p / "model.tflite", calls) for p in singles]
        one_mb = (ensemble / "model.tflite").stat().st_size / 2**20
        one_ms = tflite_ms(ensemble / "model.tflite", calls)
    what = ", ".join(f"{n} {s}" for n, s in members)
    emit("export_single_tflite_mb", sizes[0], "MiB", model=f"{members[0][0]} {members[0][1]} px")
    emit("export_single_tflite_ms", times[0], "ms", model=f"{members[0][0]}", batch=1)
    emit("export_ensemble3_tflite_mb", one_mb, "MiB", members=what)
    emit("export_ensemble3_tflite_ms", one_ms, "ms", members=what, batch=1)
    emit("export_ensemble3_size_over_members", one_mb / sum(sizes), "ratio", members=what)
    emit("export_ensemble3_latency_over_members", one_ms / sum(times), "ratio", members=what)
