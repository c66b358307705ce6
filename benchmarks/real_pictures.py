"""The real-picture protocol of the accuracy benchmark: ImageNet features on drawings of objects.

    python scripts/fetch_openclipart.py /tmp/clipart                 # once: 131 MB, 1 min
    python benchmarks/quality.py --real /tmp/clipart/images          # the core: every goal
    python benchmarks/quality.py --real /tmp/clipart/images --sweep  # the rest: k = 5, 20,
                                                                     # recipes, depths

Data: Debian's openclipart-png, public domain drawings filed by subject (scripts/
fetch_openclipart.py links one class folder per subject). The class set is CLASSES: twelve
subjects of objects with at least 40 drawings each. Drawings over tlkit's pixel limit (100
megapixels, a few posters) are left out and counted: tlkit refuses them, as it should. Each
class is capped at CAP drawings (a seeded draw, the same for every seed). Per seed: k training
and VAL validation drawings per class drawn by the seed, every other drawing of the capped set
is the test split. Each configuration is a `tlkit finetune` on that folder, as a user types it
(default backbone, efficientnet_lite0 with its ImageNet weights, at its 224 px), then `tlkit
eval --split test`. PLANS says what runs where: the core (k = 10) holds every goal, the sweep
the rows that inform rather than decide, so that each fits its time on 2 cores.

References, written here independently of tlkit's training code:
- keras-reference: the same backbone and ImageNet weights, GAP + Dropout + Dense, fitted as the
  Keras transfer-learning guide does: the head on the frozen backbone's features (Adam 1e-3,
  early stopping on validation loss, best weights), then the whole network at Adam 1e-5 with
  each BatchNorm layer non-trainable (inference mode; checked: `bn_moved`) and horizontal
  flips, up to 10 epochs (stopped after 3 without a better validation loss), keeping an epoch
  only when it lowers the validation loss below the head's, else the head. Pixels come from
  PIL: alpha over white, shorter side size / 0.875, centre size.
- logreg-probe: scikit-learn logistic regression (L-BFGS to convergence, C chosen on the
  validation split) on those pooled features.
- timm-style reference (timm_reference.py): the whole network fine-tuned as timm's train.py
  users do, its rate chosen on validation.
- scratch (common.scratch): the same network from random weights, converged, its rate chosen
  on validation.
Every row records its validation top-1 (`val`): choices are made on it, test is reported.
Seconds count decoding the training and validation pictures and training, on both sides.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

CLASSES = (
    "animals_birds",
    "animals_bugs",
    "animals_mammals",
    "computer_hardware",
    "food_desserts",
    "food_fruit",
    "people_stickmen",
    "recreation_music",
    "recreation_sports",
    "signs_and_symbols_flags",
    "transportation_roadsigns",
    "transportation_vehicles",
)
CAP, VAL, SIZE = 50, 5, 224
MAX_PIXELS = 100_000_000  # tlkit's default --max-pixels
HEAD_ONLY = "frozen: head only (--freeze all --epochs 0)"
LAST_STAGES = "fine-tune the last 3 stages (--freeze-blocks 6)"
TIMM_LIKE = "tlkit with the timm reference's settings"
CONFIGS: dict[str, list[str]] = {  # name -> `tlkit finetune` flags
    "defaults": [],
    "--freeze auto": ["--freeze", "auto"],
    "--augment auto": ["--augment", "auto"],
    "recipe small-data": ["--recipe", "small-data"],
    "recipe medium-data": ["--recipe", "medium-data"],
    "recipe large-data": ["--recipe", "large-data"],
    "recipe alexnet-augment": ["--recipe", "alexnet-augment"],
    HEAD_ONLY: ["--freeze", "all", "--epochs", "0"],
    LAST_STAGES: ["--freeze-blocks", "6"],
    "--freeze-blocks 4": ["--freeze-blocks", "4"],
    "--freeze-blocks 2": ["--freeze-blocks", "2"],
    CANDIDATE: CANDIDATE_FLAGS,
    "defaults + label smoothing 0.1": ["--label-smoothing", "0.1"],
    # the timm-style reference's recipe as tlkit's flags, at one rate (the epoch kept by loss)
    TIMM_LIKE: shlex.split(
        "--fine-tune-lr 3e-4 --epochs 20 --patience 20 --schedule cosine --warmup-epochs 2 "
        "--weight-decay 0.05 --stage-lr-decay 0.75 --label-smoothing 0.1 --train-bn "
        "--augment standard"
    ),
    "defaults + stage rate decay 0.5": ["--stage-lr-decay", "0.5"],
    "defaults + AdamW weight decay 0.05": ["--weight-decay", "0.05"],
    # the fine-tune rate, chosen on validation at each k (the rule: tlkit/core/choices.py)
    "defaults, --fine-tune-lr 3e-4": ["--fine-tune-lr", "3e-4"],
    "defaults, --fine-tune-lr 1e-4": ["--fine-tune-lr", "1e-4"],
    "defaults, --fine-tune-lr 3e-5": ["--fine-tune-lr", "3e-5"],
    "defaults, --fine-tune-lr 1e-5": ["--fine-tune-lr", "1e-5"],
    "defaults, --fine-tune-lr 3e-6": ["--fine-tune-lr", "3e-6"],
    # the other installed backbones, each at its own size (what the default backbone is chosen
    # against: accuracy and the time a user waits)
    "defaults, Lite1 at 240 px": ["--backbone", "efficientnet_lite1", "--input-size", "240"],
    "defaults, Lite2 at 260 px": ["--backbone", "efficientnet_lite2", "--input-size", "260"],
    # what the head reads: the pooled ends of the 3 stages before the last beside it, always or
    # where the head probe says so on validation
    "defaults, --head-features stages": ["--head-features", "stages"],
    "defaults, --head-features auto": ["--head-features", "auto"],
    "head only, --head-features stages": [
        "--freeze",
        "all",
        "--epochs",
        "0",
        "--head-features",
        "stages",
    ],
    "head only, --head-features auto": [
        "--freeze",
        "all",
        "--epochs",
        "0",
        "--head-features",
        "auto",
    ],
}
# tlkit's budgeted search: the three Lites, head only and fine-tuned, each at its own size, and
# the greedy ensemble of them as one model (so no --input-size: the preset takes none)
PRESET = "preset best --time-limit 20m"
CONFIGS[PRESET] = ["--preset", "best", "--time-limit", "20m"]
PRESET_SHORT = "preset best --time-limit 5m"  # where the budget binds on 2 cores
CONFIGS[PRESET_SHORT] = ["--preset", "best", "--time-limit", "5m"]
BACKBONES = [n for n in CONFIGS if n.startswith("defaults, Lite")]
OPTIONS = [n for n in CONFIGS if n.startswith("defaults + ")]  # the options left off
RATES = [n for n in CONFIGS if n.startswith("defaults, --fine-tune-lr")]
RECIPES = [n for n in CONFIGS if n.startswith("recipe ")]
HEAD_FEATURES = [n for n in CONFIGS if "--head-features" in n]
# what runs: tier -> k -> (configurations, extras). The core holds every goal (k = MAIN_K);
# --sweep holds the rest and does not re-run the core. Extras: "views" (--multicrop modes on
# the defaults' run), "ensemble", "reference" (keras-reference frozen + logreg probe),
# "background" (the probe over mid-grey), "fine-tuned reference", "timm reference" (these
# three run inside the reference), "scratch" (converged, its rate chosen on validation).
MAIN_K = 10
PLANS: dict[str, dict[int, tuple[list[str], set[str]]]] = {
    "core": {
        MAIN_K: (
            ["defaults", "--freeze auto", "--augment auto", HEAD_ONLY],
            {
                "views",
                "ensemble",
                "reference",
                "background",
                "fine-tuned reference",
            },
        )
    },
    "sweep": {
        5: (["defaults", HEAD_ONLY], {"reference"}),
        MAIN_K: (
            [
                *RECIPES,
                LAST_STAGES,
                CANDIDATE,
                *OPTIONS,
                *RATES,
                *BACKBONES,
                *HEAD_FEATURES,
                PRESET,
                PRESET_SHORT,
            ],
            # 3 rates each: 15 and 9 min a seed; the three Lites' ensemble
            {"scratch", "timm reference", "backbones", "stages probe"},
        ),
        20: (["defaults", HEAD_ONLY, LAST_STAGES], {"reference"}),
    },
}
SKIPPED_RECIPES = ("vgg16", "inception_v3", "resnet50")
VIEW_MODES = ("1", "auto", "10", "dense")  # `tlkit eval --multicrop` on the defaults' run
ENSEMBLE_SEEDS = (1000, 2000)  # two more defaults runs: seed + these
REFERENCE_EXTRAS = {"background", "fine-tuned reference", "timm reference", "stages probe"}
SCRATCH_BUDGET = (100, 15)  # epochs, patience: converged, well past the best epoch
SCRATCH_ROW = "scratch (random init, converged, rate chosen on val)"
TIMM_EPOCHS = 20  # per rate of the timm-style reference's grid; --smoke: 3
TIMM_ROW = "timm-style reference (AdamW, cosine, smoothing, layer decay; rate on val from 3)"
REFERENCE_EPOCHS = 1000  # the head's early stopping ends it long before; --smoke: 20
FINE_TUNE_EPOCHS, FINE_TUNE_PATIENCE = 10, 3  # the guide's stage 2; --smoke: 2


def pool(root: Path) -> dict[str, list[Path]]:
    """CLASSES' drawings within the pixel limit, capped at CAP by a seeded draw."""
    from PIL import Image

    missing = [c for c in CLASSES if not (root / c).is_dir()]
    if missing:
        raise SystemExit(
            f"{root}: no class folder {', '.join(missing)}; make it with "
            "python scripts/fetch_openclipart.py OUT (then --real OUT/images)"
        )
    out, over = {}, 0
    rng = random.Random(0)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None  # header only: the size, to leave the posters out
        for c in CLASSES:
            files = []
            for f in sorted((root / c).glob("*.png")):
                with Image.open(f) as im:
                    if im.width * im.height > MAX_PIXELS:
                        over += 1
                        continue
                files.append(f)
            rng.shuffle(files)
            out[c] = sorted(files[:CAP])
    Image.MAX_IMAGE_PIXELS = limit
    log(
        f"real: {sum(map(len, out.values()))} drawings of {len(out)} classes ({over} over "
        f"{MAX_PIXELS / 1e6:.0f} megapixels left out)"
    )
    return out


def make_task(root: Path, drawings: dict[str, list[Path]], k: int, seed: int) -> Path:
    """train/val/test class folders of symlinks: k and VAL per class drawn by the seed."""
    rng = random.Random(seed)
    for c, files in drawings.items():
        files = list(files)
        rng.shuffle(files)
        for split, part in (
            ("train", files[:k]),
            ("val", files[k : k + VAL]),
            ("test", files[k + VAL :]),
        ):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for f in part:
                os.symlink(f.resolve(), root / split / c / f.name)
    return root


@dataclass(frozen=True)
class Task:
    """One seed's task folder (train/val/test class folders) and how it is run."""

    root: Path
    k: int
    seed: int
    size: int = SIZE
    protocol: str = "real"

    @property
    def classes(self) -> list[str]:
        return sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())


def split_files(task: Task, split: str) -> tuple[list[Path], Any]:
    import numpy as np

    files, labels = [], []
    for i, c in enumerate(task.classes):
        these = sorted((task.root / split / c).glob("*.png"))
        files += these
        labels += [i] * len(these)
    return files, np.array(labels)


GREY = (128, 128, 128)  # the background check's other choice


def pixels(files: Sequence[Path], size: int, background: tuple[int, int, int] | None = None) -> Any:
    """What a hand-written script does: PIL, alpha over `background` (default tlkit's decode
    choice, white), shorter side size / 0.875, centre size."""
    import numpy as np
    from PIL import Image

    from tlkit.data.decode import BACKGROUND

    background = background or BACKGROUND
    out = []
    for f in files:
        with Image.open(f) as im:
            rgba = im.convert("RGBA")
        under = Image.new("RGBA", rgba.size, (*background, 255))
        im = Image.alpha_composite(under, rgba).convert("RGB")
        scale = size * 8 / 7 / min(im.size)  # 256 for 224: the eval view's 0.875
        im = im.resize(
            (max(size, round(im.width * scale)), max(size, round(im.height * scale))),
            Image.Resampling.BILINEAR,
        )
        left, top = (im.width - size) // 2, (im.height - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return np.stack(out).astype(np.float32)


class KeepBest:
    """Keras callback: keep the weights of the epoch with the lowest validation loss, starting
    from a given loss: an epoch is kept only when it beats what came before, and when none
    does the weights training started from are restored (the guide's head, for stage 2)."""

    def __new__(cls, best: float) -> Any:
        import keras

        class _KeepBest(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.best, self.weights = best, None

            def on_train_begin(self, logs: Any = None) -> None:
                self.weights = self.model.get_weights()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                if logs["val_loss"] < self.best:
                    self.best, self.weights = logs["val_loss"], self.model.get_weights()

            def on_train_end(self, logs: Any = None) -> None:
                self.model.set_weights(self.weights)

        return _KeepBest()


def build_base(backbone: str, size: int) -> Any:
    """The backbone with its ImageNet weights (random for the smoke's test backbone)."""
    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import ensure_imagenet

    spec = get_backbone(backbone)
    return spec.build(size, weights=str(ensure_imagenet(spec)) if spec.weights_file else None)


def preprocess() -> Any:
    import keras

    return keras.layers.Rescaling(1 / 128, offset=-127 / 128)  # Lite0's (x - 127) / 128


def bn_statistics(base: Any) -> list[Any]:
    import keras

    return [
        w.numpy().copy()
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for w in (layer.moving_mean, layer.moving_variance)
    ]


def unfreeze_but_batch_norm(base: Any) -> None:
    """The Keras guide's fine-tune: the backbone trainable, each BatchNorm layer not. Calling
    the base with training=False is not enough in Keras 3: fit() passes training=True into
    nested models, and BatchNorm runs in inference mode only when it is not trainable."""
    import keras

    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


STAGES_PROBE_ROW = "logreg-probe on the last layer and the 3 stage ends before it, pooled"


def stage_features(base: Any, backbone: str) -> Any:
    """Pixels -> the last layer's pooled features and those of the ends of the three stages
    before it (the registry's stage names), concatenated: what a Head2Toe-style probe reads."""
    import keras

    from tlkit.models.backbones import get_backbone

    ends = [end for _, end in get_backbone(backbone).stages[:-1]][-3:]
    inputs = keras.Input(base.input.shape[1:])
    inner = keras.Model(base.input, [base.get_layer(e).output for e in ends] + [base.output])
    maps = inner(preprocess()(inputs), training=False)
    pooled = [keras.layers.GlobalAveragePooling2D()(m) for m in maps]
    return keras.Model(inputs, keras.layers.Concatenate()(pooled))


def accuracy(model: Any, x: Any, y: Any) -> float:
    return float((model.predict(x, batch_size=32, verbose=0).argmax(1) == y).mean())


def keras_reference(
    task: Task, backbone: str, extras: set[str], record: Callable[..., None]
) -> None:
    """The Keras guide's two stages (the second if "fine-tuned reference" is in `extras`), the
    probe on the stage-1 features, the probe over mid-grey if "background" is, the timm-style
    reference if "timm reference" is. Seconds count each reference's own work: decoding its
    training and validation pictures, then training; decoding the test split is not counted."""
    import keras

    keras.utils.set_random_seed(task.seed)
    start = time.perf_counter()
    (ftr, y), (fva, yv) = split_files(task, "train"), split_files(task, "val")
    x, xv = pixels(ftr, task.size), pixels(fva, task.size)
    decode_s = time.perf_counter() - start
    guide = GuideModel(build_base(backbone, task.size), len(task.classes), task.size)
    f, fv = (guide.features.predict(a, batch_size=32, verbose=0) for a in (x, xv))
    head_loss = guide.fit_head(f, y, fv, yv)
    frozen_s = time.perf_counter() - start
    test_files, yt = split_files(task, "test")
    xt = pixels(test_files, task.size)
    ft = guide.features.predict(xt, batch_size=32, verbose=0)
    val, test = accuracy(guide.head, fv, yv), accuracy(guide.head, ft, yt)
    record("keras-reference, frozen (head on features)", test, val=val, seconds=frozen_s)
    probe = logreg_probe({"train": (f, y), "val": (fv, yv), "test": (ft, yt)})
    record("logreg-probe (sklearn, same features)", probe.test, val=probe.val)
    if "stages probe" in extras:  # the same probe on what --head-features stages reads
        stages = stage_features(guide.base, backbone)
        data = {
            split: (stages.predict(a, batch_size=32, verbose=0), labels)
            for split, a, labels in (("train", x, y), ("val", xv, yv), ("test", xt, yt))
        }
        probe = logreg_probe(data)
        record(STAGES_PROBE_ROW, probe.test, val=probe.val)
    if "background" in extras:  # the same probe on drawings composited over mid-grey
        grey = {
            split: (
                guide.features.predict(pixels(files, task.size, GREY), batch_size=32, verbose=0),
                labels,
            )
            for split, files, labels in (
                ("train", ftr, y),
                ("val", fva, yv),
                ("test", test_files, yt),
            )
        }
        probe = logreg_probe(grey)
        record("logreg-probe, alpha over mid-grey instead of white", probe.test, val=probe.val)
    if "fine-tuned reference" in extras:
        start = time.perf_counter()
        moved = guide.fine_tune(x, y, xv, yv, head_loss)
        seconds = frozen_s + time.perf_counter() - start
        record(
            "keras-reference, fine-tuned (the guide's 2 stages)",
            accuracy(guide.model, xt, yt),
            val=accuracy(guide.model, xv, yv),
            seconds=seconds,
            bn_moved=moved,
        )
    clear()
    if "timm reference" in extras:
        from timm_reference import timm_reference

        data = {"train": (x, y), "val": (xv, yv), "test": (xt, yt)}
        r = timm_reference(
            data,
            lambda: build_base(backbone, task.size),
            preprocess(),
            len(task.classes),
            task.seed,
            epochs=TIMM_EPOCHS,
            log=log,
        )
        record(
            TIMM_ROW, r["test_top1"], val=r["val_top1"], seconds=decode_s + r["seconds"],
            lr=r["lr"], epoch=r["epoch"],
        )  # fmt: skip
        clear()


class GuideModel:
    """The Keras transfer-learning guide's network: flips, the frozen base, GAP, Dropout 0.2,
    Dense; `head` shares the Dropout and Dense layers and trains on cached features."""

    def __init__(self, base: Any, classes: int, size: int) -> None:
        import keras

        self.base = base
        base.trainable = False
        inputs = keras.Input((size, size, 3))
        flipped = keras.layers.RandomFlip("horizontal")(inputs)
        pooled = keras.layers.GlobalAveragePooling2D()(base(preprocess()(flipped), training=False))
        dropout = keras.layers.Dropout(0.2)
        dense = keras.layers.Dense(classes, activation="softmax")
        self.model = keras.Model(inputs, dense(dropout(pooled)))
        self.features = keras.Model(inputs, pooled)
        self.head = keras.Sequential([keras.Input(pooled.shape[1:]), dropout, dense])

    def fit_head(self, f: Any, y: Any, fv: Any, yv: Any) -> float:
        """Stage 1: Adam 1e-3 to early stopping, best weights; its best validation loss."""
        import keras

        self.head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        stop = keras.callbacks.EarlyStopping(patience=20, restore_best_weights=True)
        history = self.head.fit(
            f, y, batch_size=32, epochs=REFERENCE_EPOCHS, validation_data=(fv, yv),
            callbacks=[stop], verbose=0,
        )  # fmt: skip
        return min(history.history["val_loss"])

    def fine_tune(self, x: Any, y: Any, xv: Any, yv: Any, head_loss: float) -> bool:
        """Stage 2: the whole network at Adam 1e-5, BatchNorm in inference mode, an epoch kept
        only if it beats the head's validation loss; whether BatchNorm's statistics moved."""
        import keras
        import numpy as np

        before = bn_statistics(self.base)
        unfreeze_but_batch_norm(self.base)
        self.model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy")
        stop = keras.callbacks.EarlyStopping(patience=FINE_TUNE_PATIENCE)
        self.model.fit(
            x, y, batch_size=32, epochs=FINE_TUNE_EPOCHS, validation_data=(xv, yv),
            callbacks=[stop, KeepBest(head_loss)], verbose=0,
        )  # fmt: skip
        after = bn_statistics(self.base)
        return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def finetune(task: Task, out: Path, flags: Sequence[str]) -> tuple[float, dict[str, Any]]:
    """`tlkit finetune` as typed, on the task's train and val splits only (so that, like the
    references, it decodes no test picture): its seconds (decoding and training, TensorFlow's
    start-up when it is the process's first) and the kept model's record (`best`: its phase,
    validation top-1 and loss)."""
    start = time.perf_counter()
    result = tlkit("finetune", str(fit_folder(task.root)), "--workers", "2", *flags, "-o", str(out))
    seconds = time.perf_counter() - start
    clear()
    return seconds, result["best"]


def evaluate(
    runs: Sequence[Path],
    task: Task,
    multicrop: str = "1",
    name: str = "test",
    weights: str = "equal",
) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    m = tlkit(
        "eval", *map(str, runs), str(task.root), "--split", "test", "--multicrop", multicrop,
        "--name", name, "--ensemble-weights", weights,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    clear()
    return m, seconds


def run_seed(
    work: Path,
    task: Task,
    names: Sequence[str],
    extras: set[str],
    record: Callable[..., None],
    smoke: bool = False,
) -> None:
    """One seed's task: each named configuration trained and tested, then `extras`."""

    def rec(name: str, top1: float, **kw: Any) -> None:
        record(name, task.k, task.seed, top1, protocol=task.protocol, **kw)

    configs = SMOKE_CONFIGS if smoke else CONFIGS
    size = SMOKE_FLAGS if smoke else ["--input-size", str(task.size)]
    base = [*size, "--seed", str(task.seed)]
    runs: dict[str, tuple[Path, float]] = {}
    for name in names:
        out = work / "runs" / f"{task.root.name}-{len(runs)}"
        own_size = "--preset" in configs[name]  # each candidate at its backbone's size
        flags = [*(base[-2:] if own_size else base), *configs[name]]
        seconds, best = finetune(task, out, flags)
        val = best["val_accuracy"]
        runs[name] = (out, val)
        m, eval_s = evaluate([out], task)
        rec(name, m["top1"], val=val, seconds=seconds, kept=best["phase"])
        log(f"{task.root.name} {name}: {m['top1']:.4f} (val {val:.4f}, {seconds:.0f} s)")
        if name == "defaults" and "views" in extras:  # that eval is --multicrop 1
            views_rows(work, task, out, (m, eval_s), record)
    if "defaults" in runs and "ensemble" in extras:
        ensemble_rows(work, task, runs["defaults"], [*size, *configs["defaults"]], rec)
    if "backbones" in extras and all(n in runs for n in BACKBONES):
        backbone_ensemble_rows(work, task, runs, base, rec)
    if extras & {"reference", *REFERENCE_EXTRAS}:  # the frozen stage and probe run first
        backbone = "test_resnet" if smoke else "efficientnet_lite0"
        keras_reference(task, backbone, extras, rec)
    if "scratch" in extras:
        epochs, patience = (2, 1) if smoke else SCRATCH_BUDGET
        r = scratch(task.root, work / "runs", base, epochs, patience, widen=not smoke)
        rec(
            SCRATCH_ROW, r["test"], val=r["val"], seconds=r["seconds"], lr=r["lr"],
            epochs_run=r["epochs_run"], classes_hit=r["classes_hit"], budget=r["budget"],
            rates=r["rates"],
        )  # fmt: skip
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(task.root, ignore_errors=True)


def ensemble_rows(
    work: Path, task: Task, defaults: tuple[Path, float], flags: list[str], rec: Callable[..., None]
) -> None:
    """Two more defaults runs (seeds s + ENSEMBLE_SEEDS) and the ensemble of the three, beside
    the member a user would keep alone: the best on validation."""
    members = [defaults]
    for extra in ENSEMBLE_SEEDS:
        out = work / "runs" / f"{task.root.name}-member{extra}"
        val = finetune(task, out, [*flags, "--seed", str(task.seed + extra)])[1]["val_accuracy"]
        members.append((out, val))
    m, _ = evaluate([run for run, _ in members], task, "1", "ensemble")
    rec("ensemble of 3 defaults runs (seeds s, s+1000, s+2000)", m["top1"])
    chosen = max(range(len(members)), key=lambda i: members[i][1])  # the first of equals
    rec(
        "its best member on validation",
        m["comparison"][chosen]["single_crop_top1"],
        val=members[chosen][1],
    )


def backbone_ensemble_rows(
    work: Path,
    task: Task,
    runs: dict[str, tuple[Path, float]],
    flags: list[str],
    rec: Callable[..., None],
) -> None:
    """The three installed backbones' defaults runs (Lite0's trained here when this tier did
    not), their ensemble with equal weights and with Caruana's greedy selection on validation,
    beside the member a user would keep alone: the best on validation."""
    if "defaults" not in runs:
        out = work / "runs" / f"{task.root.name}-lite0"
        runs = {**runs, "defaults": (out, finetune(task, out, flags)[1]["val_accuracy"])}
    members = [runs[n] for n in ("defaults", *BACKBONES)]
    paths = [run for run, _ in members]
    for weights in ("equal", "greedy"):
        m, _ = evaluate(paths, task, "1", f"lites-{weights}", weights)
        rec(
            f"ensemble of the three Lites, {weights} weights",
            m["top1"],
            weights=m["member_weights"],
        )
    top1, check = exported_top1(paths, task, work / "exported" / task.root.name, "greedy")
    rec("the greedy ensemble exported as one model", top1, **check)
    chosen = max(range(len(members)), key=lambda i: members[i][1])  # the first of equals
    best = m["comparison"][chosen]["single_crop_top1"]
    rec("the three Lites' best member on validation", best, val=members[chosen][1])


def exported_top1(
    runs: Sequence[Path], task: Task, out: Path, weights: str
) -> tuple[float, dict[str, Any]]:
    """`tlkit export RUN... --format keras`: the one model's test top-1, each file turned
    into its input as export.json says (tlkit's eval view at the ensemble's size and crop),
    and the export's own validation check."""
    import json

    import keras
    import numpy as np

    from tlkit.core.settings import Loader
    from tlkit.data.datasets import load_dataset
    from tlkit.data.pipeline import eval_dataset
    from tlkit.evaluation.export import export_ensemble

    folder = export_ensemble(runs, "keras", weights, out, overwrite=True)
    record = json.loads((folder / "export.json").read_text())
    size = record["input"]["shape"][1]
    crop = record["input"]["from_a_file"]["crop_fraction"]
    model = keras.saving.load_model(folder / "model.keras", safe_mode=True)
    test = load_dataset(str(task.root)).splits["test"]
    hits = [
        np.asarray(model(x, training=False)).argmax(1) == np.asarray(y)
        for x, y in eval_dataset(test, size, crop, Loader(32))
    ]
    clear()
    ensemble = record["ensemble"]
    check = {k: ensemble[k] for k in ensemble if k.startswith("val_")}
    return float(np.concatenate(hits).mean()), {"input": size, **check}


def views_rows(
    work: Path,
    task: Task,
    run: Path,
    one: tuple[dict[str, Any], float],
    record: Callable[..., None],
) -> None:
    """The defaults' run under each --multicrop mode, its cost over the one-crop eval."""
    for mode in VIEW_MODES:
        m, seconds = one if mode == "1" else evaluate([run], task, mode, f"views-{mode}")
        views = m["views"][0]
        record(
            f"defaults, --multicrop {mode}",
            task.k,
            task.seed,
            m["top1"],
            seconds=seconds,
            protocol=f"{task.protocol}-views",
            chosen=views["views"],
            count=views["count"],
            cost=round(seconds / one[1], 2),
        )
        log(
            f"{task.root.name} --multicrop {mode}: {m['top1']:.4f} ({views['views']}, "
            f"{views['count']} views, {seconds:.1f} s)"
        )


def smoke_drawings(root: Path) -> dict[str, list[Path]]:
    """CLASSES as 12 folders of 8 small RGBA drawings each (a disc whose colour and size say
    the class, on transparency), for --smoke: checks that the figures are produced."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = {}
    for i, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(8):
            img = np.zeros((30, 40, 4), np.uint8)
            yy, xx = np.mgrid[:30, :40]
            disc = (yy - 15) ** 2 + (xx - 20) ** 2 < 20 + 10 * (i % 4) + rng.integers(0, 10)
            img[disc, i % 3] = 255
            img[disc, 3] = 255
            Image.fromarray(img, "RGBA").save(root / c / f"{j}.png")
        out[c] = sorted((root / c).glob("*.png"))
    return out


SMOKE_CONFIGS = {"defaults": ["--epochs", "1"], HEAD_ONLY: CONFIGS[HEAD_ONLY]}
SMOKE_FLAGS = ["--backbone", "test_resnet", "--weights", "none", "--input-size", "32"]


def plan_for(
    plans: dict[str, dict[int, tuple[list[str], set[str]]]],
    sweep: bool,
    only: Sequence[str] | None,
    ks: Sequence[int] | None = None,
) -> dict[int, tuple[list[str], set[str]]]:
    """The core or sweep plan; `only` keeps the configurations and extras whose names hold one
    of its substrings (`--only recipe`: the recipes' rows; `--only scratch`; `--only
    reference`: every reference, the probe too) or is named whole (`--only =defaults`), `ks`
    the plan's k among these. A k left empty is skipped."""
    plan = plans["sweep" if sweep else "core"]
    if ks:
        if missing := sorted(set(ks) - set(plan)):
            raise SystemExit(f"--k {' '.join(map(str, missing))}: this plan has k = {sorted(plan)}")
        plan = {k: v for k, v in plan.items() if k in ks}
    if not only:
        return plan
    kept = {}
    for k, (names, extras) in plan.items():
        names = [n for n in names if any(matches(o, n) for o in only)]
        chosen = {e for e in extras if any(matches(o, e) for o in only)}
        if names or chosen:
            kept[k] = (names, chosen)
    if not kept:
        raise SystemExit(f"--only {' '.join(only)}: no configuration or extra of this plan")
    return kept


def matches(only: str, name: str) -> bool:
    """`--only` holds substrings of names, or a whole name after "=" (`=defaults`)."""
    return only[1:] == name if only.startswith("=") else only in name


def run_real(
    root: Path | None,
    work: Path,
    seeds: Sequence[int],
    sweep: bool,
    only: Sequence[str] | None,
    record: Callable[..., None],
    smoke: bool = False,
    ks: Sequence[int] | None = None,
) -> None:
    """The core plan, or with `sweep` the sweep's, of the drawings' protocol (`ks`: only
    these of its k)."""
    global VAL, REFERENCE_EPOCHS, FINE_TUNE_EPOCHS, TIMM_EPOCHS
    plan = plan_for(PLANS, sweep, only, ks)
    size = SIZE
    if smoke:
        VAL, REFERENCE_EPOCHS, FINE_TUNE_EPOCHS, TIMM_EPOCHS, size = 2, 20, 2, 3, 32
        drawings = smoke_drawings(work / "smoke-drawings")
        extras = {"scratch", "timm reference", "stages probe"}
        plan = {4: (list(SMOKE_CONFIGS), PLANS["core"][MAIN_K][1] | extras)}
    else:
        assert root is not None
        drawings = pool(root)
    for seed in seeds:
        for k, (names, extras) in sorted(plan.items()):
            task = Task(make_task(work / f"real-k{k}-s{seed}", drawings, k, seed), k, seed, size)
            run_seed(work, task, names, extras, record, smoke)


def real_table(
    rows: list[dict[str, Any]], ks: Sequence[int], field: str = "top1", title: str = "real pictures"
) -> str:
    """Configuration x k: `field` (test top-1, or val: the validation top-1 that chooses) mean
    ± sd over seeds, seconds to train at MAIN_K (or the smallest k, if it did not run)."""
    import statistics

    at = MAIN_K if MAIN_K in ks else min(ks)
    lines = [
        f"| {title}: configuration | "
        + " | ".join(f"k={k}" for k in ks)
        + f" | train s (k={at}) |",
        "| --- |" + " --- |" * (len(ks) + 1),
    ]
    for name in dict.fromkeys(r["config"] for r in rows if r.get(field) is not None):
        cells = []
        for k in ks:
            accs = [
                100 * r[field]
                for r in rows
                if r["config"] == name and r["k"] == k and r.get(field) is not None
            ]
            cells.append(
                ""
                if not accs
                else f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}"
                if len(accs) > 1
                else f"{accs[0]:.1f} (1 seed)"
            )
        secs = [
            r["seconds"]
            for r in rows
            if r["config"] == name and r["k"] == at and r.get("seconds") is not None
        ]
        cells.append(f"{statistics.mean(secs):.0f}" if secs else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def views_cost_table(rows: list[dict[str, Any]], title: str = "real pictures") -> str:
    """The defaults' run under each `--multicrop` mode: top-1, eval seconds, cost over 1."""
    import statistics

    if not rows:
        return ""
    k = rows[0]["k"]
    lines = [
        f"| {title}, k={k}: defaults evaluated with | test top-1 % | eval s | "
        "cost / one crop | views |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode in VIEW_MODES:
        hits = [r for r in rows if r["config"].endswith(f"--multicrop {mode}")]
        if not hits:
            continue
        accs = [100 * r["top1"] for r in hits]
        acc = (
            f"{statistics.mean(accs):.1f} ± {statistics.stdev(accs):.1f}"
            if len(accs) > 1
            else f"{accs[0]:.1f}"
        )
        chose = ", ".join(sorted({f"{r['chosen']} ({r['count']})" for r in hits}))
        lines.append(
            f"| --multicrop {mode} | {acc} | "
            f"{statistics.mean(r['seconds'] for r in hits):.1f} | "
            f"{statistics.mean(r['cost'] for r in hits):.2f} | {chose} |"
        )
    return "\n".join(lines)
