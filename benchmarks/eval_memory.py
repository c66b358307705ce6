"""Evaluation's peak memory against plain Keras (`benchmarks/run.py --only eval_memory`).

Every figure is the peak resident memory (VmHWM) of a fresh process, measured one process at a
time, on the same run and images:

- eval_memory_keras_peak_mb: plain Keras, the floor any evaluation pays (TensorFlow, the model,
  one batch's activations): keras.saving.load_model(model.keras), the images decoded with
  Pillow to the eval view (shorter side to input size / crop fraction, centre crop) and
  model.predict(batch_size=32).
- eval_memory_{single,multicrop}_peak_mb: `tlkit eval RUN DATA` and `tlkit eval RUN DATA
  --multicrop` (auto: every view set training showed scored on the validation split, then the
  chosen one over DATA), batch 32; `views` says what auto chose.
- eval_memory_single_over_keras: single crop / plain Keras. Goal <= 1.3.
- eval_memory_multicrop_over_keras: --multicrop / plain Keras. Goal <= 1.6.
- eval_memory_{single,multicrop}_growth_4x: the same at 4x the images / at 1x. Goal <= 1.1.

Full size (also --quick): the quickstart's run, EfficientNet-Lite0 with its ImageNet weights
and its head trained on 2 augmented views of each image of data/ (`--freeze all --epochs 0
--head-views 2`: it saw crops and mirrors, so auto scores 1, 2, dense, 5 and 10), evaluated on
data/test (80 drawings of 49 sizes) and on data/train + data/test (320). --smoke: test_resnet
at 32 px on a few generated images of many sizes (measures nothing worth quoting).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"single": 1.3, "multicrop": 1.6, "growth": 1.1}


def _child(*args: str) -> dict:
    """A fresh process of this file; its last stdout line, as JSON."""
    out = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def keras_child(run: str, data: str) -> None:
    """Plain Keras: load model.keras, decode the images to the eval view, predict."""
    import keras
    import numpy as np
    from PIL import Image

    from benchmarks.common import vm_hwm_kb

    model = keras.saving.load_model(Path(run) / "model.keras", compile=False)
    size = int(model.input.shape[1])
    shorter = round(size / json.loads((Path(run) / "run.json").read_text())["crop_fraction"])
    views = []
    for path in sorted(p for p in Path(data).rglob("*") if p.is_file()):
        im = Image.open(path).convert("RGB")
        scale = max(shorter, size) / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))))
        a = np.asarray(im)
        top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
        views.append(a[top : top + size, left : left + size])
    model.predict(np.stack(views), batch_size=32, verbose=0)
    print(json.dumps({"peak_kb": vm_hwm_kb(), "images": len(views)}))


def tlkit_child(*args: str) -> None:
    """A tlkit command as typed, in this process; then its peak and what eval chose."""
    from benchmarks.common import tlkit, vm_hwm_kb

    result = tlkit(*args)
    views = [v["views"] for v in result.get("views", [])]
    print(json.dumps({"peak_kb": vm_hwm_kb(), "images": result.get("images"), "views": views}))


def _generated(root: Path, counts: dict[str, int], seed: int) -> None:
    """Class folders of random images of many sizes (dense evaluation sees each size)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for i in range(n):
            folder = root / split / f"c{i % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = (int(x) for x in rng.integers(24, 72, 2))
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(folder / f"{i}.png")


def _data(root: Path, smoke: bool) -> tuple[Path, Path, Path]:
    """(data to train on, the images at 1x, at 4x): the quickstart's data/ or generated."""
    if smoke:
        _generated(root / "data", {"train": 12, "val": 6, "test": 6}, 0)
        _generated(root / "x4", {"all": 24}, 1)
        return root / "data", root / "data" / "test", root / "x4" / "all"
    data = ROOT / "data"
    for split in ("train", "test"):  # 240 + 80: 4x the test split, every image distinct
        for folder in (data / split).iterdir():
            if folder.is_dir():
                shutil.copytree(folder, root / "x4" / folder.name, dirs_exist_ok=True)
    return data, data / "test", root / "x4"


def eval_memory_figures(emit: Callable[..., None], smoke: bool) -> None:
    """Train the run in a child, then each peak in its own fresh process: one at a time, or
    side by side in the smoke run, which measures nothing."""
    from concurrent.futures import ThreadPoolExecutor

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, one, four = _data(root, smoke)
        run = str(root / "run")
        model = ["--backbone", "test_resnet", "--weights", "none", "--input-size", "32"]
        flags = ["--freeze", "all", "--epochs", "0", "--head-views", "2", "--no-cache"]
        _child("--tlkit-child", "finetune", str(data), *(model if smoke else []), *flags, "-o", run)
        jobs = {"keras": ("--keras-child", run, str(one))}
        for kind, extra in (("single", []), ("multicrop", ["--multicrop"])):
            for n, folder in (("1x", one), ("4x", four)):
                jobs[kind, n] = ("--tlkit-child", "eval", run, str(folder), *extra)
                jobs[kind, n] += ("--name", f"mem-{kind}-{n}")
        with ThreadPoolExecutor(len(jobs) if smoke else 1) as pool:
            peaks = dict(zip(jobs, pool.map(lambda a: _child(*a), jobs.values()), strict=True))
    keras = peaks["keras"]["peak_kb"]
    emit("eval_memory_keras_peak_mb", keras / 1024, "MiB", images=peaks["keras"]["images"])
    for kind in ("single", "multicrop"):
        one_x, four_x = peaks[kind, "1x"], peaks[kind, "4x"]
        emit(
            f"eval_memory_{kind}_peak_mb",
            one_x["peak_kb"] / 1024,
            "MiB",
            images=one_x["images"],
            views=one_x["views"],
            at_4x_mib=round(four_x["peak_kb"] / 1024, 1),
        )
        _ratio(emit, f"eval_memory_{kind}_over_keras", one_x["peak_kb"] / keras, kind)
        growth = four_x["peak_kb"] / one_x["peak_kb"]
        _ratio(emit, f"eval_memory_{kind}_growth_4x", growth, "growth")


def _ratio(emit: Callable[..., None], name: str, value: float, goal: str) -> None:
    emit(name, value, "x", goal=f"<= {GOALS[goal]}", met=bool(value <= GOALS[goal]))


if __name__ == "__main__" and sys.argv[1:2] in (["--keras-child"], ["--tlkit-child"]):
    sys.path.insert(0, str(ROOT))
    (keras_child if sys.argv[1] == "--keras-child" else tlkit_child)(*sys.argv[2:])
