"""tlkit's speed figures, one JSON object per line on stdout.

    python benchmarks/run.py            # full pass
    python benchmarks/run.py --quick    # fewer steps, for a smoke check

Figures compared with each other (frozen vs unfrozen) are measured in the same process, one
after the other, since these machines are noisy; quote ratios rather than absolute numbers.

- cli_help_seconds: wall time of `tlkit --help` in a fresh interpreter (median of 5). Goal < 1 s.
- train_images_per_s_resnet50_224_{frozen,unfrozen}: optimizer steps of the tlkit classifier
  (uint8 input, preprocessing layer, ResNet50 with weights none, pooled softmax head) on batches
  held in memory, so the figure is the model's training speed, not the input pipeline's.
  frozen = whole backbone frozen (the head phase); unfrozen = `--freeze 0` (BatchNorm kept in
  inference mode, the default). Steady state: the first steps (graph build) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def emit(name: str, value: float, unit: str, **extra: object) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}),
          flush=True)


def device() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        kind = f"{len(gpus)} GPU" if gpus else f"CPU x{os.cpu_count()}"
    elif backend == "jax":
        import jax

        kind = str(jax.devices()[0].device_kind)
    else:
        kind = "unknown"
    return f"{kind} ({platform.machine()}), keras {keras.__version__} on {backend}"


def cli_help_seconds(repeats: int = 5) -> None:
    cmd = [sys.executable, "-c", "from tlkit.cli import main; main()", "--help"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    emit("cli_help_seconds", statistics.median(times), "s", repeats=repeats, goal="< 1")


def timed_steps(model: object, x: object, y: object, batch: int, n: int) -> float:
    """Seconds for n optimizer steps, cycling through the batches held in memory."""
    import keras

    start = time.perf_counter()
    for i in range(n):
        j = (i % 4) * batch
        model.train_on_batch(x[j : j + batch], y[j : j + batch])
    keras.ops.convert_to_numpy(model.optimizer.iterations)  # wait for queued device work
    return time.perf_counter() - start


def train_throughput(size: int, batch: int, warmup: int, steps: int) -> None:
    import keras
    import numpy as np

    from tlkit.backbones import get_backbone
    from tlkit.freezing import FreezeRequest, apply_freeze, freeze_all, resolve_freeze
    from tlkit.model import build_classifier

    spec = get_backbone("resnet50")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch * 4, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, batch * 4)
    results = {}
    for mode in ("frozen", "unfrozen"):
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        base = spec.build(size)
        model = build_classifier(spec, base, 10, size)
        if mode == "frozen":
            freeze_all(base)
        else:
            names = [layer.name for layer in base.layers]
            apply_freeze(base, resolve_freeze(FreezeRequest(count="0"), spec, names))
        model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")

        timed_steps(model, x, y, batch, warmup)
        seconds = timed_steps(model, x, y, batch, steps)
        results[mode] = batch * steps / seconds
        emit(f"train_images_per_s_resnet50_{size}_{mode}", results[mode], "images/s",
             batch=batch, steps=steps, device=device())
    emit(f"train_speedup_resnet50_{size}_frozen_over_unfrozen",
         results["frozen"] / results["unfrozen"], "x", note="same process, back to back")


def main() -> None:
    parser = argparse.ArgumentParser(description="tlkit benchmarks (JSON lines).")
    parser.add_argument("--quick", action="store_true", help="fewer steps; a smoke check")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    args = parser.parse_args()
    cli_help_seconds()
    batch = args.batch or (8 if args.quick else 32)
    warmup, steps = (2, 3) if args.quick else (3, 10)
    steps = args.steps or steps
    train_throughput(224, batch, warmup, steps)


if __name__ == "__main__":
    main()
