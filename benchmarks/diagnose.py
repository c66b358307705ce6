"""What `diagnose`, the class activation maps and `lr-find` find, measured; JSON lines on stdout.

    python benchmarks/diagnose.py           # the figures in the README (about 6 min, 2 cores)
    python benchmarks/diagnose.py --smoke   # every figure once at tiny sizes (tests run it)

- label_noise_{rate}_recall_at_{N,2N} / precision_at_{N,2N}: the bundled digits 5-9 with a
  share of the training labels flipped at random, seen through a trunk trained by tlkit on the
  clean digits 0-4 (it never saw these labels, as an ImageNet backbone would not); a head-only
  run on the noisy data, then `diagnose`: how many of the N flipped images are among its first
  N and 2N suggestions (flagged issues, then the next most suspicious). Mean over seeds.
- near_duplicates_found / near_duplicates_false_pairs: 300 generated 500x375 photos in
  train/val/test, 30 test images copied into train re-encoded (JPEG q70), resized by 0.9 or
  cropped by 4 px; a head-only run on a randomly initialised test backbone at 64 px; the share
  of copies `diagnose` pairs with their original, and the pairs it reports between distinct
  photos, at the default --duplicate-similarity.
- cam_peak_in_patch: 64 px images of grey noise whose class is the colour of a 16 px square at a
  random place; the test backbone trained on them; the share of correctly classified new images
  whose class activation map peaks inside the square.
- lr_find_over_best_fixed: the head's suggested rate / the best of a sweep of fixed rates
  (Adam, 100 steps, 10^-4 .. 10^0.5) on separable synthetic features; per seed.
- diagnose_seconds_digits: `diagnose` of a head-only ResNet50 run (32 px, weights none) on
  data/ (1,797 images), features computed from the images (no cache used).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def emit(name: str, value: float, unit: str = "", **extra: object) -> None:
    print(
        json.dumps({"name": name, "value": round(float(value), 4), "unit": unit, **extra}),
        flush=True,
    )


def _subset(dst: Path, classes: str) -> Path:
    for split in ("train", "val", "test"):
        for c in classes:
            shutil.copytree(ROOT / "examples" / "digits" / split / c, dst / split / c)
    return dst


def label_noise(work: Path, rates: list[float], seeds: list[int], epochs: int) -> None:
    from tlkit.data.augment import resolve_augment
    from tlkit.evaluation.diagnose import DiagnoseConfig, diagnose
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    common = dict(
        backbone="test_resnet",
        input_size=32,
        augment=resolve_augment("none"),
        batch_size=32,
        cache="off",
    )
    trunk = finetune(
        FinetuneConfig.of(
            data=str(_subset(work / "src", "01234")),
            weights="none",
            freeze=FreezeRequest(count="0" if epochs else "all"),
            head_epochs=1,
            epochs=epochs,
            lr=3e-3,
            fine_tune_lr=2e-3,
            patience=5,
            output=str(work / "trunk"),
            **common,
        ),
        verbose=0,
    )
    for rate in rates:
        scores: dict[str, list[float]] = {}
        for seed in seeds:
            target = _subset(work / f"t{rate}-{seed}", "56789")
            rng = np.random.default_rng(seed)
            files = sorted((target / "train").rglob("*.png"))
            planted = set()
            for i in rng.choice(len(files), max(1, round(rate * len(files))), replace=False):
                f = files[i]
                dest = target / "train" / rng.choice([c for c in "56789" if c != f.parent.name])
                shutil.move(f, dest / f"flipped-{f.name}")
                planted.add(str((dest / f"flipped-{f.name}").relative_to(target)))
            run = finetune(
                FinetuneConfig.of(
                    data=str(target),
                    weights=str(trunk.path),
                    freeze=FreezeRequest(count="all"),
                    head_epochs=5,
                    epochs=0,
                    output=str(work / f"r{rate}-{seed}"),
                    **common,
                ),
                verbose=0,
            )
            found = diagnose(DiagnoseConfig(run=str(run.path), seed=seed))
            ranked = [r["path"] for r in found["label_issues"] + found["review_next"]]
            n = len(planted)
            for k, at in ((n, "N"), (2 * n, "2N")):
                hits = len(set(ranked[:k]) & planted)
                scores.setdefault(f"recall_at_{at}", []).append(hits / n)
                scores.setdefault(f"precision_at_{at}", []).append(
                    hits / max(1, min(k, len(ranked)))
                )
        for key, values in scores.items():
            emit(
                f"label_noise_{rate:g}_{key}",
                float(np.mean(values)),
                "",
                per_seed=[round(v, 3) for v in values],
                planted=n,
            )


def near_duplicates(work: Path, photos: int, copies: int) -> None:
    from PIL import Image
    from run import photo_folder

    from tlkit.data.augment import resolve_augment
    from tlkit.evaluation.diagnose import DiagnoseConfig, diagnose
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    source = photo_folder(work / "photos-src", photos)
    data = work / "photos"
    for i, f in enumerate(sorted(source.rglob("*.jpg"))):
        split = ("test", "val", "train", "train", "train")[i % 5]
        (data / split / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, data / split / f.parent.name / f.name)
    rng = np.random.default_rng(0)
    tests = sorted((data / "test").rglob("*.jpg"))
    pairs = set()
    for k, i in enumerate(rng.choice(len(tests), copies, replace=False)):
        im = Image.open(tests[i]).convert("RGB")
        w, h = im.size
        if k % 3 == 0:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=70)
            new = Image.open(buf).convert("RGB")
        elif k % 3 == 1:
            new = im.resize((round(w * 0.9), round(h * 0.9)), Image.Resampling.BILINEAR)
        else:
            new = im.crop((4, 4, w - 4, h - 4))
        dest = data / "train" / tests[i].parent.name / f"copy{k}-{tests[i].name}"
        new.save(dest, quality=90)
        pairs.add(frozenset((str(tests[i].relative_to(data)), str(dest.relative_to(data)))))
    run = finetune(
        FinetuneConfig.of(
            data=str(data),
            backbone="test_resnet",
            weights="none",
            input_size=64,
            freeze=FreezeRequest(count="all"),
            augment=resolve_augment("none"),
            head_epochs=1,
            epochs=0,
            cache="off",
            output=str(work / "photorun"),
        ),
        verbose=0,
    )
    found = diagnose(DiagnoseConfig(run=str(run.path)))
    reported = {frozenset((d["a"]["path"], d["b"]["path"])) for d in found["near_duplicates"]}
    emit(
        "near_duplicates_found",
        len(reported & pairs) / len(pairs),
        "",
        copies=len(pairs),
        threshold=found["duplicate_similarity"],
    )
    emit("near_duplicates_false_pairs", len(reported - pairs), "pairs", images=found["images"])


def cam_hit_rate(work: Path, n_train: int, epochs: int) -> None:
    from PIL import Image

    from tlkit.data.augment import eval_transform, resolve_augment
    from tlkit.evaluation.explain import class_maps, upsample
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    def patches(n: int, rng: np.random.Generator) -> tuple:
        images = rng.integers(60, 140, (n, 64, 64, 3)).astype(np.uint8)
        labels = rng.integers(0, 3, n)
        boxes = []
        for img, label in zip(images, labels, strict=True):
            y, x = rng.integers(10, 38, 2)
            img[y : y + 16, x : x + 16] = 40
            img[y : y + 16, x : x + 16, label] = 230
            boxes.append((y, x))
        return images, labels, boxes

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_train // 4)):
        images, labels, _ = patches(n, rng)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            (work / "patches" / split / f"c{label}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(work / "patches" / split / f"c{label}" / f"{i}.png")
    run = finetune(
        FinetuneConfig.of(
            data=str(work / "patches"),
            backbone="test_resnet",
            weights="none",
            input_size=64,
            freeze=FreezeRequest(count="0"),
            augment=resolve_augment("none"),
            head_epochs=1,
            epochs=epochs,
            lr=3e-3,
            fine_tune_lr=2e-3,
            batch_size=32,
            patience=4,
            cache="off",
            output=str(work / "camrun"),
        ),
        verbose=0,
    )
    model = run.load_model()
    images, labels, boxes = patches(200, rng)
    views = np.stack([eval_transform(img, 64, 0.875) for img in images])
    right = np.flatnonzero(model.predict(views, verbose=0).argmax(1) == labels)
    scale, shift = 73 / 64, (73 - 64) // 2
    inside = 0
    for m, i in zip(class_maps(model, views[right], labels[right]), right, strict=True):
        py, px = np.unravel_index(upsample(m, 64).argmax(), (64, 64))
        top, left = boxes[i][0] * scale - shift, boxes[i][1] * scale - shift
        inside += top <= py <= top + 16 * scale and left <= px <= left + 16 * scale
    emit(
        "cam_peak_in_patch",
        inside / max(1, len(right)),
        "",
        correctly_classified=len(right),
        of=len(labels),
    )


SWEEP = 10.0 ** np.arange(-4, 1.0, 0.5)  # the fixed rates lr-find's suggestion is judged by


def lr_find_ratio(seeds: list[int], rates: np.ndarray = SWEEP) -> None:
    import keras
    import tensorflow as tf

    from tlkit.training.lr_find import head_range_test

    for seed in seeds:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 4, 800)
        x = (rng.normal(0, 1, (4, 32))[labels] + rng.normal(0, 1, (800, 32))).astype(np.float32)
        found = head_range_test(x, labels, 4, (1e-6, 10.0), 100, 32, 0)
        sweep = {}
        for lr in rates:
            keras.utils.set_random_seed(0)
            dense = keras.layers.Dense(4, activation="softmax")
            dense.build((None, 32))
            opt, loss_fn = keras.optimizers.Adam(lr), keras.losses.SparseCategoricalCrossentropy()

            @tf.function
            def step(xb, yb, dense=dense, opt=opt, loss_fn=loss_fn):
                with tf.GradientTape() as tape:
                    loss = loss_fn(yb, dense(xb))
                opt.apply_gradients(
                    zip(
                        tape.gradient(loss, dense.trainable_weights),
                        dense.trainable_weights,
                        strict=True,
                    )
                )
                return loss

            order = np.random.default_rng(0).permutation(800)
            losses = [
                float(step(x[idx], labels[idx].astype(np.int32)))
                for idx in (order[np.arange(i * 32, (i + 1) * 32) % 800] for i in range(100))
            ]
            sweep[lr] = np.mean(losses[-20:]) if np.isfinite(losses).all() else np.inf
        best = min(sweep, key=sweep.get)
        emit(
            f"lr_find_over_best_fixed_seed{seed}",
            found["suggestion"] / best,
            "x",
            suggestion=found["suggestion"],
            best_fixed=float(best),
        )


def diagnose_seconds(work: Path, backbone: str, run_path: Path | None = None) -> None:
    """`run_path` (smoke): time an existing run's diagnose instead of training one on data/."""
    from tlkit.evaluation.diagnose import DiagnoseConfig, diagnose
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    if run_path is None:
        run_path = finetune(
            FinetuneConfig.of(
                data=str(ROOT / "examples" / "digits"),
                backbone=backbone,
                weights="none",
                input_size=32,
                freeze=FreezeRequest(count="all"),
                head_epochs=1,
                epochs=0,
                cache="off",
                output=str(work / "digitsrun"),
            ),
            verbose=0,
        ).path
    start = time.perf_counter()
    found = diagnose(DiagnoseConfig(run=str(run_path), name="timed"))
    emit(
        "diagnose_seconds_digits",
        time.perf_counter() - start,
        "s",
        images=found["images"],
        backbone=backbone,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every figure once, tiny sizes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.smoke:
            label_noise(work / "noise", [0.1], [0], epochs=0)
            near_duplicates(work / "dups", photos=12, copies=3)
            cam_hit_rate(work / "cam", n_train=12, epochs=1)
            lr_find_ratio([0], rates=10.0 ** np.arange(-2, 1.0, 1.0))
            diagnose_seconds(work / "time", "test_resnet", work / "noise" / "r0.1-0")
            return
        label_noise(work / "noise", [0.03, 0.1], [0, 1, 2], epochs=15)
        near_duplicates(work / "dups", photos=300, copies=30)
        cam_hit_rate(work / "cam", n_train=240, epochs=12)
        lr_find_ratio([0, 1, 2])
        diagnose_seconds(work / "time", "resnet50")


if __name__ == "__main__":
    main()
