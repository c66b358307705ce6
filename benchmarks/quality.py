"""tlkit's accuracy benchmark: does transfer with tlkit give good classifiers on real data?

    python benchmarks/quality.py             # the core table: k=10, 3 seeds (under 30 min, 2 cores)
    python benchmarks/quality.py --sweep     # and k=5, 20, every preset and recipe
    python benchmarks/quality.py --smoke     # one seed, k=5, two configurations, test backbone
    python benchmarks/quality.py --multicrop # test-time views per augment preset (k=10, 3 seeds)
    python benchmarks/quality.py --json F    # every measurement, for scripts
    python benchmarks/quality.py --quickstart  # data/ as shipped: the quickstart command,
                                                # the head on ImageNet and on random features
                                                # and a probe (about 7 min a seed)
    python benchmarks/quality.py --pictures DIR  # real drawings (scripts/fetch_openclipart.py):
                                                # probes on each backbone's features
    python benchmarks/quality.py --real DIR      # the real-picture protocol on those drawings:
                                                # tlkit's configurations against references
                                                # (benchmarks/real_pictures.py); --sweep:
                                                # its other rows (k = 5, 20, recipes)

Real data that ships offline: the 1,797 handwritten digits in examples/digits/ (8x8 PNGs,
upscaled to 32 px). No ImageNet weights can be downloaded here, so the "pretrained" backbone is
made the honest way, by self-transfer:

1. Source task: tlkit trains a ResNet50 from scratch (weights none, 32 px) on digits 0-4
   (its train and val folders of those classes). That run is the trunk every transfer starts from.
2. Target tasks: digits 5-9, k = 5, 10, 20 training images per class and as many validation
   images per class (both drawn by the seed from its train and val folders), tested on every
   other 5-9 digit (its test folder plus the unsampled train images: about 700).
3. Every configuration is run through tlkit's own CLI, in-process (exactly a command a user
   types), and evaluated with `tlkit eval` on the test folder. Three seeds: the seed draws the
   k images and seeds training. Mean and spread (sample standard deviation) over seeds.

References, written here independently of tlkit:
- keras-reference: keras.applications.ResNet50 with the trunk's weights, GlobalAveragePooling +
  Dropout + Dense softmax on its frozen features, no augmentation: the Keras "feature
  extraction" recipe, trained with Adam to early stopping on validation loss (best weights).
- logreg-probe: scikit-learn LogisticRegression (L-BFGS to convergence) on the same frozen,
  pooled features, C chosen on the validation images: the sharpest yardstick for a head.
- scratch: ResNet50 from random weights on the k images per class, every layer (BatchNorm kept
  at its initial identity, tlkit's --weights none), trained to convergence: early stopping on
  validation, the rate chosen on validation (common.next_scratch_rate).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    CANDIDATE,
    CANDIDATE_FLAGS,
    clear,
    fit_folder,
    log,
    logreg_probe,
    scratch,
    tlkit,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DATA = ROOT / "examples" / "digits"
QUICKSTART_DATA = ROOT / "data"  # what the README's quickstart trains on: 400 drawings
SOURCE_CLASSES = ("0", "1", "2", "3", "4")
TARGET_CLASSES = ("5", "6", "7", "8", "9")
SIZE = 32
BACKBONE = "resnet50"  # --smoke: tlkit's test backbone, so that the smoke test takes a minute
REFERENCE_EPOCHS = 1000  # the plain-Keras reference stops early long before; --smoke: 20
COMMON = ["--input-size", str(SIZE), "--workers", "2"]
SCRATCH_BUDGET = [100, 20]  # epochs, patience: converged (the smoke's k = 5 runs no scratch)

# name -> (finetune flags, k values, seeds: "all" or only the first). The budget decides: on
# 2 cores ResNet50 trains at about 14 images/s at 32 px, so a configuration that fine-tunes
# backbone layers costs minutes. The core table (default) is k = 10 with every seed; --sweep
# adds k = 5 and 20 for the head-only configurations, and every preset and recipe on one seed.
ALL_K = (5, 10, 20)
HEAD = ["--freeze", "all", "--epochs", "0"]
VIEWS = ["--head-views", "5"]
CORE: dict[str, tuple[list[str], tuple[int, ...], str]] = {
    "defaults": ([], (10,), "all"),
    CANDIDATE: (CANDIDATE_FLAGS, (10,), "all"),
    "head only (--freeze all --epochs 0)": (HEAD, ALL_K, "all"),
    "head on 5 views, --augment light": ([*HEAD, *VIEWS, "--augment", "light"], (10,), "all"),
    "--freeze auto": (["--freeze", "auto"], (10,), "all"),
    "recipe small-data": (["--recipe", "small-data"], ALL_K, "all"),
}
SWEEP: dict[str, tuple[list[str], tuple[int, ...], str]] = {
    f"head on 5 views, --augment {preset}": ([*HEAD, *VIEWS, "--augment", preset], (10,), "first")
    for preset in ("none", "standard", "alexnet", "vgg", "auto")
} | {
    "recipe medium-data": (["--recipe", "medium-data"], (10,), "first"),
    "recipe large-data": (["--recipe", "large-data"], (10,), "first"),
    "recipe alexnet-augment": (["--recipe", "alexnet-augment"], (10,), "first"),
    # what the head reads (docs/training.md): the stages beside the last layer, or the probe's pick
    "defaults, --head-features stages": (["--head-features", "stages"], (10,), "all"),
    "defaults, --head-features auto": (["--head-features", "auto"], (10,), "all"),
}
# Not run: they set another backbone and input size (VGG16 / InceptionV3 at 224 / 299 px), for
# which there is no self-transfer trunk here, and which a 2-core CPU cannot train in budget.
SKIPPED_RECIPES = ("vgg16", "inception_v3", "resnet50")
# --multicrop: the defaults with each augment preset, each run evaluated with these views
PRESETS = ("none", "light", "standard", "alexnet", "vgg")
VIEW_MODES = ("1", "auto", "10", "dense")
ENSEMBLE = (
    "head on 5 views, --augment light",
    "head only (--freeze all --epochs 0)",
    "recipe small-data",
)


def digits(split: str, label: str, root: Path = DATA) -> list[Path]:
    return sorted((root / split / label).glob("*.png"))


def copy_files(files: Sequence[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, folder / f.name)


def make_source(root: Path) -> Path:
    for split in ("train", "val"):
        for c in SOURCE_CLASSES:
            copy_files(digits(split, c), root / split / c)
    return root


def make_task(root: Path, k: int, seed: int) -> Path:
    """k train and k val images per target class, drawn by the seed; the rest is the test set."""
    rng = random.Random(seed)
    for c in TARGET_CLASSES:
        train_pool, val_pool = digits("train", c), digits("val", c)
        train = rng.sample(train_pool, k)
        val = rng.sample(val_pool, min(k, len(val_pool)))
        copy_files(train, root / "train" / c)
        copy_files(val, root / "val" / c)
        copy_files([f for f in train_pool if f not in train] + digits("test", c), root / "test" / c)
    return root


def train_trunk(work: Path, out: Path, epochs: int) -> Path:
    """The source model: tlkit trains ResNet50 from scratch on digits 0-4."""
    tlkit(
        "finetune",
        str(make_source(work / "source")),
        "--weights",
        "none",
        *COMMON,
        "--augment",
        "none",
        "--freeze",
        "0",
        "--head-epochs",
        "0",
        "--epochs",
        str(epochs),
        "--lr",
        "1e-3",
        "--fine-tune-lr",
        "1e-3",
        "--patience",
        str(epochs),
        "-o",
        str(out),
    )
    clear()
    return out


def evaluate(run: Path, task: Path, multicrop: str = "1") -> dict[str, Any]:
    m = tlkit("eval", str(run), str(task), "--split", "test", "--multicrop", multicrop)
    clear()
    return m


def load_images(files: Sequence[Path]) -> Any:
    """What a hand-written Keras script does: PIL RGB, resized to the input size."""
    import numpy as np
    from PIL import Image

    return np.stack(
        [
            np.asarray(
                Image.open(f).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR),
                dtype=np.float32,
            )
            for f in files
        ]
    )


def split_files(task: Path, split: str) -> tuple[list[Path], Any]:
    import numpy as np

    files, labels = [], []
    for i, c in enumerate(TARGET_CLASSES):
        these = sorted((task / split / c).glob("*.png"))
        files += these
        labels += [i] * len(these)
    return files, np.array(labels)


def reference_features(trunk: Path, task: Path) -> dict[str, tuple[Any, Any]]:
    """Frozen ResNet50 features (pooled) of every split, with the trunk's weights."""
    import keras

    source = keras.saving.load_model(trunk / "model.keras")
    if BACKBONE == "resnet50":
        base = keras.applications.ResNet50(
            weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), pooling="avg"
        )
        preprocess = keras.applications.resnet50.preprocess_input
    else:  # --smoke: the test backbone has no keras.applications twin
        from tlkit.models.backbones import get_backbone

        spec = get_backbone(BACKBONE)
        inner = spec.build(SIZE)
        base = keras.Model(inner.input, keras.layers.GlobalAveragePooling2D()(inner.output))
        preprocess = lambda x: keras.applications.imagenet_utils.preprocess_input(  # noqa: E731
            x, mode=spec.preprocessing
        )
    base.set_weights(source.get_layer("backbone").get_weights())
    out = {}
    for split in ("train", "val", "test"):
        files, labels = split_files(task, split)
        x = preprocess(load_images(files))
        out[split] = (base.predict(x, batch_size=64, verbose=0), labels)
    clear()
    return out


def keras_reference(feats: dict[str, tuple[Any, Any]], seed: int) -> float:
    """Keras feature extraction: Dropout + Dense on the frozen features, early stopping."""
    import keras

    keras.utils.set_random_seed(seed)
    (x, y), (xv, yv), (xt, yt) = feats["train"], feats["val"], feats["test"]
    model = keras.Sequential(
        [
            keras.Input(x.shape[1:]),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(len(TARGET_CLASSES), activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    stop = keras.callbacks.EarlyStopping(patience=30, restore_best_weights=True)
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=REFERENCE_EPOCHS,
        validation_data=(xv, yv),
        callbacks=[stop],
        verbose=0,
    )
    acc = float((model.predict(xt, verbose=0).argmax(1) == yt).mean())
    clear()
    return acc


def run_task(
    work: Path,
    trunk: Path,
    k: int,
    seed: int,
    first_seed: bool,
    configs: dict[str, Any],
    multicrop_config: str,
    record: Callable[..., None],
    references: bool = True,
) -> None:
    task = make_task(work / f"task-k{k}-s{seed}", k, seed)
    runs: dict[str, Path] = {}
    vals: dict[str, float] = {}  # validation top-1 of each run's kept epoch
    for name, (flags, ks, seeds) in configs.items():
        if k not in ks or (seeds == "first" and not first_seed):
            continue
        out = work / "runs" / f"k{k}-s{seed}-{len(runs)}"
        start = time.perf_counter()
        result = tlkit(
            "finetune", str(fit_folder(task)), "--weights", str(trunk), *COMMON, "--seed",
            str(seed), *flags, "-o", str(out),
        )  # fmt: skip
        train_s = time.perf_counter() - start
        clear()
        runs[name] = out
        mode = "10" if name == multicrop_config and k == 10 else "1"
        m = evaluate(out, task, mode)
        row = m["comparison"][0]
        val = vals[name] = result["best"]["val_accuracy"]
        record(
            name, k, seed, row["single_crop_top1"], seconds=train_s, val=val,
            kept=result["best"]["phase"],
        )  # fmt: skip
        if mode == "10":
            record("defaults, 10-crop eval", k, seed, row["multicrop_top1"])
        log(f"k={k} seed={seed} {name}: {row['single_crop_top1']:.4f} ({train_s:.0f} s)")
    members = [n for n in ENSEMBLE if n in runs]
    if len(members) == 3:
        paths = [str(runs[n]) for n in members]
        m = tlkit("eval", *paths, str(task), "--split", "test", "--name", "ens")
        clear()
        record("ensemble of 3 head-only runs", k, seed, m["top1"])
        best = max(range(3), key=lambda i: vals[members[i]])  # chosen on validation
        top1 = m["comparison"][best]["single_crop_top1"]
        record("its best member on validation", k, seed, top1, val=vals[members[best]])
    if not references:
        shutil.rmtree(work / "runs", ignore_errors=True)
        shutil.rmtree(task, ignore_errors=True)
        return
    start = time.perf_counter()
    feats = reference_features(trunk, task)
    record(
        "keras-reference (plain Keras, frozen)",
        k,
        seed,
        keras_reference(feats, seed),
        seconds=time.perf_counter() - start,
    )
    probe = logreg_probe(feats)
    record("logreg-probe (sklearn, frozen)", k, seed, probe.test, val=probe.val)
    if k == 10:
        r = scratch(task, work / "runs", [*COMMON, "--seed", str(seed)], *SCRATCH_BUDGET)
        record(
            "scratch (ResNet50, random init, converged, rate chosen on val)",
            k,
            seed,
            r["test"],
            seconds=r["seconds"],
            val=r["val"],
            lr=r["lr"],
            epochs_run=r["epochs_run"],
            classes_hit=r["classes_hit"],
            budget=r["budget"],
            rates=r["rates"],
        )
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(task, ignore_errors=True)


def run_views_task(
    work: Path, trunk: Path, seed: int, presets: Sequence[str], record: Callable[..., None]
) -> None:
    """Per augment preset: the defaults trained once, then `tlkit eval` with every view mode."""
    task = make_task(work / f"task-views-s{seed}", 10, seed)
    for preset in presets:
        out = work / "runs" / f"views-s{seed}-{preset}"
        tlkit(
            "finetune",
            str(task),
            "--weights",
            str(trunk),
            *COMMON,
            "--seed",
            str(seed),
            "--augment",
            preset,
            "-o",
            str(out),
        )
        clear()
        seen = json.loads((out / "run.json").read_text())["views_seen"]
        for mode in VIEW_MODES:
            start = time.perf_counter()
            m = tlkit(
                "eval",
                str(out),
                str(task),
                "--split",
                "test",
                "--multicrop",
                mode,
                "--name",
                f"views-{mode}",
            )
            seconds = time.perf_counter() - start
            clear()
            views = m["views"][0]
            record(
                f"--augment {preset}",
                10,
                seed,
                m["top1"],
                seconds=seconds,
                views=mode,
                chosen=views["views"],
                count=views["count"],
                seen=seen["why"],
            )
            log(
                f"seed={seed} --augment {preset} --multicrop {mode}: {m['top1']:.4f} "
                f"({views['views']}, {views['count']} views, {seconds:.0f} s)"
            )
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(task, ignore_errors=True)


# The quickstart protocol: data/ exactly as shipped (400 drawings, 10 classes; its train, val
# and test folders), at the backbones' default 224 px. The README's command itself (defaults,
# --freeze 10), then the head alone (--freeze all --epochs 0) on the default backbone's ImageNet
# features, on random ones, and on the old default (resnet50) as it runs offline, without its
# weights; then the probe on the default's pooled ImageNet features.
QUICKSTART_COMMAND = "the quickstart: --freeze 10, every other option its default"
QUICKSTART = {
    QUICKSTART_COMMAND: ("efficientnet_lite0", "imagenet", ["--freeze", "10"]),
    "efficientnet_lite0, ImageNet weights, head only": ("efficientnet_lite0", "imagenet", HEAD),
    "efficientnet_lite0, random weights, head only": ("efficientnet_lite0", "none", HEAD),
    "resnet50, random weights, head only (the old default, offline)": ("resnet50", "none", HEAD),
}


def quickstart_features(run: Path) -> dict[str, tuple[Any, Any]]:
    """The run's pooled features, through plain Keras and PIL: the model loaded from
    model.keras (its preprocessing inside), the images decoded as a hand-written script would
    (real_pictures.pixels: alpha over white, centre crop)."""
    import keras
    import numpy as np
    from real_pictures import pixels

    model = keras.saving.load_model(run / "model.keras", safe_mode=True)
    pooled = keras.Model(model.input, model.get_layer("pool").output)
    info = json.loads((run / "run.json").read_text())
    classes, size = info["classes"], info["input_size"]
    out = {}
    for split in ("train", "val", "test"):
        files = [f for c in classes for f in digits(split, c, QUICKSTART_DATA)]
        labels = np.array([classes.index(f.parent.name) for f in files])
        x = pixels(files, size) if size == 224 else load_images(files)
        out[split] = (pooled.predict(x.astype(np.uint8), batch_size=32, verbose=0), labels)
    clear()
    return out


def run_quickstart(
    work: Path,
    seeds: Sequence[int],
    smoke: bool,
    record: Callable[..., None],
    only: Sequence[str] | None = None,
) -> None:
    configs = {n: c for n, c in QUICKSTART.items() if not only or any(o in n for o in only)}
    size: list[str] = []
    if smoke:  # the mechanics at 32 px: the test backbone's head
        configs = {"test_resnet, random weights, head only": ("test_resnet", "none", HEAD)}
        size = ["--input-size", str(SIZE)]
    probed: Path | None = None
    for seed in seeds:
        for name, (backbone, weights, flags) in configs.items():
            out = work / "runs" / f"quickstart-{backbone}-{weights}-{len(flags)}-s{seed}"
            start = time.perf_counter()
            tlkit(
                "finetune",
                str(QUICKSTART_DATA),
                "--backbone",
                backbone,
                "--weights",
                weights,
                *size,
                "--workers",
                "2",
                *flags,
                "--seed",
                str(seed),
                "-o",
                str(out),
            )
            seconds = time.perf_counter() - start
            clear()
            m = tlkit("eval", str(out), str(QUICKSTART_DATA), "--split", "test")
            clear()
            record(name, 0, seed, m["top1"], seconds=seconds, protocol="quickstart")
            log(f"quickstart seed={seed} {name}: {m['top1']:.4f} ({seconds:.0f} s)")
            if flags == HEAD and probed is None:
                probed = out
    if probed is not None:  # the probe is deterministic: one fit on the first head's features
        name = next(n for n, c in configs.items() if c[2] == HEAD)
        record(
            f"logreg-probe on the features of {name.split(', head')[0]}",
            0,
            seeds[0],
            logreg_probe(quickstart_features(probed)).test,
            protocol="quickstart",
        )


# Real pictures: one class per folder of DIR (scripts/fetch_openclipart.py), at most
# PICTURES_CAP drawings each (a seeded draw, the same for every seed), k training and
# PICTURES_VAL validation drawings per class drawn by the seed, the rest tested. The features
# are computed here, independently of tlkit's pipeline: tlkit's decode (alpha over white), the
# shorter side resized to 256 and the centre 224 cropped with PIL, each backbone's own
# preprocessing, global average pooling; then the probe. Raw pixels (32x32) for comparison.
PICTURES_CAP, PICTURES_VAL, PICTURES_SIZE = 60, 5, 224
PICTURE_FEATURES = {  # name -> (backbone, weights)
    "efficientnet_lite0, ImageNet weights (the default)": ("efficientnet_lite0", "imagenet"),
    "efficientnet_lite0, random weights": ("efficientnet_lite0", "none"),
    "resnet50, random weights (the old default, offline)": ("resnet50", "none"),
}


def picture_files(root: Path) -> tuple[list[Path], Any]:
    import numpy as np

    rng = random.Random(0)
    files, labels = [], []
    for i, folder in enumerate(sorted(d for d in root.iterdir() if d.is_dir())):
        these = sorted(folder.glob("*.png"))
        rng.shuffle(these)
        files += these[:PICTURES_CAP]
        labels += [i] * len(these[:PICTURES_CAP])
    return files, np.array(labels)


def picture_pixels(files: Sequence[Path]) -> tuple[Any, list[int]]:
    """The 224 px centre crops, and which files gave one: drawings over tlkit's pixel limit
    (a few openclipart posters exceed 100 megapixels) are left out, and counted."""
    import numpy as np
    from PIL import Image

    from tlkit.core.errors import DataError
    from tlkit.data.decode import decode_image

    out, kept = [], []
    for i, f in enumerate(files):
        try:
            im = Image.fromarray(decode_image(f))
        except DataError as e:
            log(f"pictures: left out {e}")
            continue
        kept.append(i)
        scale = 256 / min(im.size)
        im = im.resize(
            (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
            Image.Resampling.BILINEAR,
        )
        left, top = (im.width - PICTURES_SIZE) // 2, (im.height - PICTURES_SIZE) // 2
        out.append(np.asarray(im.crop((left, top, left + PICTURES_SIZE, top + PICTURES_SIZE))))
    return np.stack(out), kept


def picture_features(pixels: Any, backbone: str, weights: str) -> Any:
    import keras
    import numpy as np

    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import ensure_imagenet

    keras.utils.set_random_seed(0)
    if backbone == "resnet50":
        base = keras.applications.ResNet50(
            weights=None,
            include_top=False,
            pooling="avg",
            input_shape=(PICTURES_SIZE, PICTURES_SIZE, 3),
        )
        x = keras.applications.resnet50.preprocess_input(pixels.astype(np.float32))
    else:
        spec = get_backbone(backbone)
        inner = spec.build(
            PICTURES_SIZE, weights=str(ensure_imagenet(spec)) if weights == "imagenet" else None
        )
        base = keras.Model(inner.input, keras.layers.GlobalAveragePooling2D()(inner.output))
        x = pixels.astype(np.float32)
        x = (
            (x - 127) / 128
            if spec.preprocessing == "lite"  # EfficientNet-Lite's
            else keras.applications.imagenet_utils.preprocess_input(x, mode=spec.preprocessing)
        )
    features = base.predict(x, batch_size=32, verbose=0)
    clear()
    return features


def smoke_pictures(root: Path) -> Path:
    """Three classes of 16 small RGBA drawings (a coloured disc on transparency) for --smoke."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(16):
            img = np.zeros((30, 40, 4), np.uint8)
            yy, xx = np.mgrid[:30, :40]
            disc = (yy - 15) ** 2 + (xx - 20) ** 2 < rng.integers(40, 150)
            img[disc, c] = 255
            img[disc, 3] = 255
            Image.fromarray(img, "RGBA").save(root / f"c{c}" / f"{i}.png")
    return root


def run_pictures(
    root: Path,
    seeds: Sequence[int],
    k: int,
    record: Callable[..., None],
    backbones: dict[str, tuple[str, str]] = PICTURE_FEATURES,
) -> None:
    import numpy as np
    from PIL import Image

    files, labels = picture_files(root)
    start = time.perf_counter()
    pixels, kept = picture_pixels(files)
    files, labels = [files[i] for i in kept], labels[kept]
    log(
        f"pictures: {len(files)} drawings of {labels.max() + 1} classes decoded in "
        f"{time.perf_counter() - start:.0f} s"
    )
    small = np.stack([np.asarray(Image.fromarray(p).resize((32, 32))) for p in pixels])
    small = small.reshape(len(pixels), -1).astype(np.float32)
    features = {"raw pixels (32x32)": small}
    for name, (backbone, weights) in backbones.items():
        start = time.perf_counter()
        features[name] = picture_features(pixels, backbone, weights)
        log(f"pictures: {name} features in {time.perf_counter() - start:.0f} s")
    for seed in seeds:
        rng = np.random.default_rng(seed)
        split = np.full(len(files), "test", dtype=object)
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            split[members[:k]] = "train"
            split[members[k : k + PICTURES_VAL]] = "val"
        for name, x in features.items():
            feats = {s: (x[split == s], labels[split == s]) for s in ("train", "val", "test")}
            top1 = logreg_probe(feats).test
            record(f"logreg-probe on {name}", k, seed, top1, protocol="pictures")
            log(f"pictures seed={seed} k={k} {name}: {top1:.4f}")


def quickstart_table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"| {title} | test top-1 % | train s |", "| --- | --- | --- |"]
    for name in dict.fromkeys(r["config"] for r in rows):
        hits = [r for r in rows if r["config"] == name]
        accs = [100 * r["top1"] for r in hits]
        acc = (
            f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}"
            if len(accs) > 1
            else f"{accs[0]:.1f}"
        )
        secs = [r["seconds"] for r in hits if r["seconds"] is not None]
        lines.append(
            f"| {name} | {acc} | {statistics.mean(secs):.0f} |" if secs else f"| {name} | {acc} | |"
        )
    return "\n".join(lines)


def views_table(rows: list[dict[str, Any]]) -> str:
    """Preset x view mode: test top-1 mean ± sd over seeds, and eval seconds."""
    lines = [
        "| --augment | "
        + " | ".join(f"--multicrop {m}" for m in VIEW_MODES)
        + " | auto chose | eval s: "
        + " / ".join(VIEW_MODES)
        + " |",
        "| --- |" + " --- |" * (len(VIEW_MODES) + 2),
    ]
    for config in dict.fromkeys(r["config"] for r in rows):
        cells, secs = [], []
        for mode in VIEW_MODES:
            hits = [r for r in rows if r["config"] == config and r["views"] == mode]
            accs = [100 * r["top1"] for r in hits]
            cells.append(
                f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}"
                if len(accs) > 1
                else f"{accs[0]:.1f}"
            )
            secs.append(f"{statistics.mean(r['seconds'] for r in hits):.0f}")
        chose = ", ".join(
            r["chosen"] for r in rows if r["config"] == config and r["views"] == "auto"
        )
        lines.append(
            f"| {config.split()[-1]} | "
            + " | ".join(cells)
            + f" | {chose} | "
            + " / ".join(secs)
            + " |"
        )
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], ks: Sequence[int]) -> str:
    names = list(dict.fromkeys(r["config"] for r in rows))
    lines = [
        "| configuration | " + " | ".join(f"k={k}" for k in ks) + " | train s (k=10) |",
        "| --- | " + " | ".join("---" for _ in ks) + " | --- |",
    ]
    for name in names:
        cells = []
        for k in ks:
            accs = [r["top1"] for r in rows if r["config"] == name and r["k"] == k]
            if not accs:
                cells.append("")
                continue
            if len(accs) > 1:
                cells.append(
                    f"{100 * statistics.mean(accs):.1f} ± {100 * statistics.stdev(accs):.1f}"
                )
            else:
                cells.append(f"{100 * accs[0]:.1f} (1 seed)")
        secs = [
            r["seconds"]
            for r in rows
            if r["config"] == name and r["k"] == 10 and r.get("seconds") is not None
        ]
        cells.append(f"{statistics.mean(secs):.0f}" if secs else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        help="default 10; with --sweep 5 10 20; with --real or --icons, which of their plan's k",
    )
    parser.add_argument("--trunk-epochs", type=int, default=6)
    parser.add_argument(
        "--trunk", type=Path, help="the trunk run: reused if it exists, else trained there and kept"
    )
    parser.add_argument(
        "--sweep", action="store_true", help="also k = 5 and 20, every preset and recipe (one seed)"
    )
    parser.add_argument(
        "--only", nargs="+", help="configurations to run: substrings of names, or =NAME alone"
    )
    parser.add_argument(
        "--no-references",
        action="store_true",
        help="skip the plain-Keras, logistic-regression and scratch rows",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one seed, k=5, two configurations, a one-epoch trunk on the "
        "test backbone: checks the figures are produced, nothing more",
    )
    parser.add_argument(
        "--multicrop",
        action="store_true",
        help="instead of the core table: the defaults with every augment "
        "preset, each evaluated with --multicrop 1, auto, 10 and dense",
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument(
        "--quickstart",
        action="store_true",
        help="only the quickstart protocol: data/ as shipped, 224 px",
    )
    parser.add_argument(
        "--pictures",
        type=Path,
        help="only the real-picture probes, on this folder of class folders "
        "(scripts/fetch_openclipart.py OUT makes OUT/images)",
    )
    parser.add_argument(
        "--real",
        type=Path,
        help="only the real-picture protocol (benchmarks/real_pictures.py) on "
        "this folder of class folders: its core (every goal, k = 10); "
        "with --sweep its sweep instead (k = 5 and 20, recipes, depths)",
    )
    parser.add_argument(
        "--icons",
        type=Path,
        help="only the icons protocol (benchmarks/icons.py) on this folder "
        "(scripts/fetch_icons.py OUT makes OUT/icons): its core (k = 200); with "
        "--sweep k = 10 and 50, and the fine-tune rates at 50 and 200",
    )
    args = parser.parse_args(argv)
    plan_ks = args.k  # --real, --icons: which of their plan's k (PLANS in their modules)
    configs = {**CORE, **SWEEP} if args.sweep else dict(CORE)
    args.k = args.k or (list(ALL_K) if args.sweep else [10])
    if args.only:
        from real_pictures import matches

        configs = {n: c for n, c in configs.items() if any(matches(o, n) for o in args.only)}
    if args.smoke:
        global BACKBONE, REFERENCE_EPOCHS
        BACKBONE, REFERENCE_EPOCHS = "test_resnet", 20
        args.seeds, args.k, args.trunk_epochs = [0], [5], 1
        configs = {
            "defaults": ([], (5,), "all"),
            "recipe small-data": (["--recipe", "small-data"], (5,), "all"),
        }
    COMMON.extend(["--backbone", BACKBONE])  # the trunk's architecture, not tlkit's default
    rows: list[dict[str, Any]] = []

    def record(
        config: str, k: int, seed: int, top1: float, seconds: float | None = None, **extra: Any
    ) -> None:
        row = {
            "config": config,
            "k": k,
            "seed": seed,
            "top1": round(top1, 4),
            "seconds": None if seconds is None else round(seconds, 1),
            **extra,
        }
        if row.get("val") is not None:  # the validation top-1 that chooses
            row["val"] = round(row["val"], 4)
        rows.append(row)
        print(json.dumps(row), flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tlkit-quality-") as tmp:
        work = Path(tmp)
        if args.quickstart or args.smoke:
            run_quickstart(work, [0] if args.smoke else args.seeds, args.smoke, record, args.only)
        if args.pictures:
            run_pictures(args.pictures, args.seeds, (args.k or [10])[0], record)
            args.quickstart = True  # nothing else to run
        if args.real or args.smoke:
            from real_pictures import run_real

            run_real(
                args.real,
                work,
                [0] if args.smoke else args.seeds,
                args.sweep,
                args.only,
                record,
                args.smoke,
                plan_ks,
            )
            args.quickstart = args.quickstart or bool(args.real)
        if args.icons or args.smoke:
            from icons import run_icons

            seeds = [0] if args.smoke else args.seeds
            run_icons(args.icons, work, seeds, args.sweep, args.only, record, args.smoke, plan_ks)
            args.quickstart = args.quickstart or bool(args.icons)
        if args.smoke:
            run_pictures(
                smoke_pictures(work / "pictures"),
                [0],
                4,
                record,
                {"test_resnet, random weights": ("test_resnet", "none")},
            )
        trunk = args.trunk or work / "trunk"
        if not args.quickstart and not (trunk / "run.json").is_file():
            log(
                f"training the trunk: {BACKBONE} from scratch on digits 0-4, "
                f"{args.trunk_epochs} epochs"
            )
            t = time.perf_counter()
            train_trunk(work, trunk, args.trunk_epochs)
            log(f"trunk trained in {time.perf_counter() - t:.0f} s")
        for seed in [] if args.quickstart else args.seeds:
            if args.multicrop or args.smoke:  # the smoke runs both tables, one preset here
                run_views_task(work, trunk, seed, ["light"] if args.smoke else PRESETS, record)
            if args.multicrop:
                continue
            for k in args.k:
                run_task(
                    work,
                    trunk,
                    k,
                    seed,
                    seed == args.seeds[0],
                    configs,
                    "defaults",
                    record,
                    not args.no_references,
                )
    total = time.perf_counter() - started
    views_rows = [r for r in rows if "views" in r and r.get("protocol") != "real-views"]
    quick_rows = [r for r in rows if r.get("protocol") in ("quickstart", "pictures")]
    real_rows = [r for r in rows if r.get("protocol") == "real"]
    if real_rows or any(r.get("protocol") == "real-views" for r in rows):
        from real_pictures import real_table, views_cost_table

        ks = sorted({r["k"] for r in real_rows})
        print(real_table(real_rows, ks))
        print(real_table(real_rows, ks, "val", "real pictures, VALIDATION top-1 (what chooses)"))
        print(views_cost_table([r for r in rows if r.get("protocol") == "real-views"]))
    icon_rows = [r for r in rows if r.get("protocol") == "icons"]
    if icon_rows:
        from real_pictures import real_table

        ks = sorted({r["k"] for r in icon_rows})
        print(real_table(icon_rows, ks, title="icons, unseen themes"))
        print(real_table(icon_rows, ks, "val", "icons, VALIDATION top-1 (what chooses)"))
    for protocol, title in (
        ("quickstart", "data/ as shipped (drawings), 224 px"),
        ("pictures", f"drawings, {PICTURES_SIZE} px, probes"),
    ):
        these = [r for r in quick_rows if r["protocol"] == protocol]
        if these:
            print(quickstart_table(these, title))
    if views_rows:
        print(views_table(views_rows))
    if not args.multicrop and not args.quickstart:
        print(
            table(
                [
                    r
                    for r in rows
                    if "views" not in r
                    and r not in quick_rows
                    and not r.get("protocol", "").startswith("real")
                ],
                args.k,
            )
        )
    if args.quickstart:
        print(f"\n{len(args.seeds)} seed(s), {total / 60:.1f} min in all")
    else:
        print(
            f"\n{len(args.seeds)} seed(s), {total / 60:.1f} min in all (trunk included), "
            f"recipes not run here: {', '.join(SKIPPED_RECIPES)} (another backbone and size)"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "minutes": round(total / 60, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
