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
  BatchNorm in inference mode and horizontal flips, up to 10 epochs (stopped after 3 without
  a better validation loss), keeping an epoch only when it lowers the validation loss below
  the head's. Pixels come from PIL: alpha over white, shorter side 256, centre 224.
- logreg-probe: scikit-learn logistic regression (L-BFGS to convergence, C chosen on the
  validation split) on those pooled features.
- scratch: the same network from random weights, every layer trained on the k images.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import CANDIDATE, CANDIDATE_FLAGS, clear, log, logreg_probe, tlkit

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
    CANDIDATE: CANDIDATE_FLAGS,
    "defaults + label smoothing 0.1": ["--label-smoothing", "0.1"],
    "defaults + stage rate decay 0.5": ["--stage-lr-decay", "0.5"],
    "defaults + AdamW weight decay 0.05": ["--weight-decay", "0.05"],
}
OPTIONS = [n for n in CONFIGS if n.startswith("defaults + ")]  # the options left off
# what runs: tier -> k -> (configurations, extras). The core holds every goal (k = MAIN_K);
# --sweep holds the rest and does not re-run the core. Extras: "views" (--multicrop modes on
# the defaults' run), "ensemble", "reference" (keras-reference frozen + logreg probe),
# "background" (the probe over mid-grey), "fine-tuned reference", "scratch".
MAIN_K = 10
PLANS: dict[str, dict[int, tuple[list[str], set[str]]]] = {
    "core": {
        MAIN_K: (
            ["defaults", "--freeze auto", "--augment auto", HEAD_ONLY],
            {"views", "ensemble", "reference", "background", "fine-tuned reference", "scratch"},
        )
    },
    "sweep": {
        5: (["defaults", HEAD_ONLY], {"reference"}),
        MAIN_K: (
            [
                "recipe small-data",
                "recipe medium-data",
                "recipe large-data",
                "recipe alexnet-augment",
                LAST_STAGES,
                CANDIDATE,
                *OPTIONS,
            ],
            set(),
        ),
        20: (["defaults", HEAD_ONLY, LAST_STAGES], {"reference"}),
    },
}
SKIPPED_RECIPES = ("vgg16", "inception_v3", "resnet50")
VIEW_MODES = ("1", "auto", "10", "dense")  # `tlkit eval --multicrop` on the defaults' run
ENSEMBLE_SEEDS = (1000, 2000)  # two more defaults runs: seed + these
SCRATCH_EPOCHS = 10
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


def split_files(task: Path, split: str) -> tuple[list[Path], Any]:
    import numpy as np

    files, labels = [], []
    for i, c in enumerate(CLASSES):
        these = sorted((task / split / c).glob("*.png"))
        files += these
        labels += [i] * len(these)
    return files, np.array(labels)


GREY = (128, 128, 128)  # the background check's other choice


def pixels(files: Sequence[Path], background: tuple[int, int, int] | None = None) -> Any:
    """What a hand-written script does: PIL, alpha over `background` (default tlkit's decode
    choice, white), shorter side 256, centre 224."""
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
        scale = SIZE * 8 / 7 / min(im.size)  # 256 for 224: the eval view's 0.875
        im = im.resize(
            (max(SIZE, round(im.width * scale)), max(SIZE, round(im.height * scale))),
            Image.Resampling.BILINEAR,
        )
        left, top = (im.width - SIZE) // 2, (im.height - SIZE) // 2
        out.append(np.asarray(im.crop((left, top, left + SIZE, top + SIZE))))
    return np.stack(out).astype(np.float32)


class KeepBest:
    """Keras callback: keep the weights of the epoch with the lowest validation loss, starting
    from a given loss (so that an epoch is kept only when it beats what came before)."""

    def __new__(cls, best: float) -> Any:
        import keras

        class _KeepBest(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.best, self.weights = best, None

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                if logs["val_loss"] < self.best:
                    self.best, self.weights = logs["val_loss"], self.model.get_weights()

            def on_train_end(self, logs: Any = None) -> None:
                if self.weights is not None:
                    self.model.set_weights(self.weights)

        return _KeepBest()


def keras_reference(
    task: Path, backbone: str, seed: int, extras: set[str], record: Callable[..., None], k: int
) -> None:
    """The Keras guide's two stages (the second if "fine-tuned reference" is in `extras`), the
    probe on the stage-1 features, and the probe over mid-grey if "background" is."""
    import keras

    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import ensure_imagenet

    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    (ftr, y), (fva, yv) = split_files(task, "train"), split_files(task, "val")
    x, xv = pixels(ftr), pixels(fva)
    spec = get_backbone(backbone)
    base = spec.build(SIZE, weights=str(ensure_imagenet(spec)) if spec.weights_file else None)
    base.trainable = False
    inputs = keras.Input((SIZE, SIZE, 3))
    flipped = keras.layers.RandomFlip("horizontal")(inputs)
    scaled = keras.layers.Rescaling(1 / 128, offset=-127 / 128)(flipped)  # Lite0's (x-127)/128
    pooled = keras.layers.GlobalAveragePooling2D()(base(scaled, training=False))
    dropout = keras.layers.Dropout(0.2)
    dense = keras.layers.Dense(len(CLASSES), activation="softmax")
    model = keras.Model(inputs, dense(dropout(pooled)))
    features = keras.Model(inputs, pooled)
    f, fv = (features.predict(a, batch_size=32, verbose=0) for a in (x, xv))
    head = keras.Sequential([keras.Input(f.shape[1:]), dropout, dense])
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    stop = keras.callbacks.EarlyStopping(patience=20, restore_best_weights=True)
    history = head.fit(
        f,
        y,
        batch_size=32,
        epochs=REFERENCE_EPOCHS,
        validation_data=(fv, yv),
        callbacks=[stop],
        verbose=0,
    )
    head_loss = min(history.history["val_loss"])
    frozen_s = time.perf_counter() - start
    test_files, yt = split_files(task, "test")
    xt = pixels(test_files)
    ft = features.predict(xt, batch_size=32, verbose=0)
    record(
        "keras-reference, frozen (head on features)",
        k,
        seed,
        float((head.predict(ft, verbose=0).argmax(1) == yt).mean()),
        seconds=frozen_s,
    )
    record(
        "logreg-probe (sklearn, same features)",
        k,
        seed,
        logreg_probe({"train": (f, y), "val": (fv, yv), "test": (ft, yt)}),
    )
    if "background" in extras:  # the same probe on drawings composited over mid-grey
        grey = {
            split: (features.predict(pixels(files, GREY), batch_size=32, verbose=0), labels)
            for split, files, labels in (
                ("train", ftr, y),
                ("val", fva, yv),
                ("test", test_files, yt),
            )
        }
        record("logreg-probe, alpha over mid-grey instead of white", k, seed, logreg_probe(grey))
    if "fine-tuned reference" in extras:
        base.trainable = True  # the guide: unfreeze, BatchNorm stays in inference mode
        model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy")
        stop = keras.callbacks.EarlyStopping(patience=FINE_TUNE_PATIENCE)
        model.fit(
            x,
            y,
            batch_size=32,
            epochs=FINE_TUNE_EPOCHS,
            validation_data=(xv, yv),
            callbacks=[stop, KeepBest(head_loss)],
            verbose=0,
        )
        seconds = time.perf_counter() - start
        record(
            "keras-reference, fine-tuned (the guide's 2 stages)",
            k,
            seed,
            float((model.predict(xt, batch_size=32, verbose=0).argmax(1) == yt).mean()),
            seconds=seconds,
        )
    clear()


def finetune(task: Path, out: Path, flags: Sequence[str]) -> float:
    start = time.perf_counter()
    tlkit("finetune", str(task), "--workers", "2", *flags, "-o", str(out))
    seconds = time.perf_counter() - start
    clear()
    return seconds


def evaluate(
    runs: Sequence[Path], task: Path, multicrop: str = "1", name: str = "test"
) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    m = tlkit(
        "eval",
        *map(str, runs),
        str(task),
        "--split",
        "test",
        "--multicrop",
        multicrop,
        "--name",
        name,
    )
    seconds = time.perf_counter() - start
    clear()
    return m, seconds


def run_seed(
    work: Path,
    drawings: dict[str, list[Path]],
    k: int,
    seed: int,
    names: Sequence[str],
    extras: set[str],
    record: Callable[..., None],
    smoke: bool = False,
) -> None:
    """One seed's task at k: each named configuration trained and tested, then `extras`."""
    task = make_task(work / f"real-k{k}-s{seed}", drawings, k, seed)
    base_flags = (
        ["--backbone", "test_resnet", "--weights", "none", "--input-size", "32"] if smoke else []
    )
    configs = SMOKE_CONFIGS if smoke else CONFIGS
    runs: dict[str, Path] = {}
    one = 0.0  # seconds of the defaults' one-crop eval
    for name in names:
        out = work / "runs" / f"real-k{k}-s{seed}-{len(runs)}"
        seconds = finetune(task, out, [*base_flags, "--seed", str(seed), *configs[name]])
        runs[name] = out
        m, eval_s = evaluate([out], task)
        record(name, k, seed, m["top1"], seconds=seconds, protocol="real")
        log(f"real k={k} seed={seed} {name}: {m['top1']:.4f} ({seconds:.0f} s)")
        if name == "defaults" and "views" in extras:  # that eval is --multicrop 1
            one = eval_s
            views_row(k, seed, "1", m, eval_s, one, record)
    if "defaults" not in runs:  # --only left it out: nothing to view or ensemble
        extras = extras - {"views", "ensemble"}
    if "views" in extras:
        for mode in VIEW_MODES[1:]:
            m, eval_s = evaluate([runs["defaults"]], task, mode, f"views-{mode}")
            views_row(k, seed, mode, m, eval_s, one, record)
    if "ensemble" in extras:
        members = [runs["defaults"]]
        for extra in ENSEMBLE_SEEDS:
            out = work / "runs" / f"real-k{k}-s{seed}-member{extra}"
            finetune(task, out, [*base_flags, "--seed", str(seed + extra), *configs["defaults"]])
            members.append(out)
        m, _ = evaluate(members, task, "1", "ensemble")
        record(
            "ensemble of 3 defaults runs (seeds s, s+1000, s+2000)",
            k,
            seed,
            m["top1"],
            protocol="real",
        )
        record(
            "its best member",
            k,
            seed,
            max(r["single_crop_top1"] for r in m["comparison"][:3]),
            protocol="real",
        )
    if "reference" in extras:
        keras_reference(
            task,
            "test_resnet" if smoke else "efficientnet_lite0",
            seed,
            extras,
            lambda *a, **kw: record(*a, **kw, protocol="real"),
            k,
        )
    if "scratch" in extras:
        out = work / "runs" / f"real-scratch-k{k}-s{seed}"
        epochs = "2" if smoke else str(SCRATCH_EPOCHS)
        seconds = finetune(
            task,
            out,
            [
                *base_flags,
                "--seed",
                str(seed),
                "--weights",
                "none",
                "--freeze",
                "0",
                "--head-epochs",
                "0",
                "--epochs",
                epochs,
                "--lr",
                "1e-3",
                "--fine-tune-lr",
                "1e-3",
                "--patience",
                epochs,
            ],
        )
        m, _ = evaluate([out], task)
        record(
            f"scratch (random init, every layer, {epochs} epochs)",
            k,
            seed,
            m["top1"],
            seconds=seconds,
            protocol="real",
        )
    shutil.rmtree(work / "runs", ignore_errors=True)
    shutil.rmtree(task, ignore_errors=True)


def views_row(
    k: int,
    seed: int,
    mode: str,
    m: dict[str, Any],
    seconds: float,
    one: float,
    record: Callable[..., None],
) -> None:
    views = m["views"][0]
    record(
        f"defaults, --multicrop {mode}",
        k,
        seed,
        m["top1"],
        seconds=seconds,
        protocol="real-views",
        chosen=views["views"],
        count=views["count"],
        cost=round(seconds / one, 2),
    )
    log(
        f"real seed={seed} --multicrop {mode}: {m['top1']:.4f} ({views['views']}, "
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


def run_real(
    root: Path | None,
    work: Path,
    seeds: Sequence[int],
    sweep: bool,
    only: Sequence[str] | None,
    record: Callable[..., None],
    smoke: bool = False,
) -> None:
    """The core plan, or with `sweep` the sweep's; `only`: configuration names (substrings),
    as in `--only recipe` (the recipes' rows)."""
    global VAL, SIZE, REFERENCE_EPOCHS, FINE_TUNE_EPOCHS
    plan = PLANS["sweep" if sweep else "core"]
    if smoke:
        VAL, SIZE, REFERENCE_EPOCHS, FINE_TUNE_EPOCHS = 2, 32, 20, 2
        drawings = smoke_drawings(work / "smoke-drawings")
        plan = {4: (list(SMOKE_CONFIGS), PLANS["core"][MAIN_K][1])}
    else:
        assert root is not None
        drawings = pool(root)
    if only:  # a k left without a configuration is skipped, its extras too
        plan = {
            k: (kept, extras)
            for k, (names, extras) in plan.items()
            if (kept := [n for n in names if any(o in n for o in only)])
        }
    for seed in seeds:
        for k, (names, extras) in sorted(plan.items()):
            run_seed(work, drawings, k, seed, names, extras, record, smoke)


def real_table(rows: list[dict[str, Any]], ks: Sequence[int]) -> str:
    """Configuration x k: test top-1 mean ± sd over seeds, seconds to train at MAIN_K (or the
    smallest k, if it did not run)."""
    import statistics

    at = MAIN_K if MAIN_K in ks else min(ks)
    lines = [
        "| real pictures: configuration | "
        + " | ".join(f"k={k}" for k in ks)
        + f" | train s (k={at}) |",
        "| --- |" + " --- |" * (len(ks) + 1),
    ]
    for name in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for k in ks:
            accs = [100 * r["top1"] for r in rows if r["config"] == name and r["k"] == k]
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


def views_cost_table(rows: list[dict[str, Any]]) -> str:
    """The defaults' run under each `--multicrop` mode: top-1, eval seconds, cost over 1."""
    import statistics

    if not rows:
        return ""
    k = rows[0]["k"]
    lines = [
        f"| real pictures, k={k}: defaults evaluated with | test top-1 % | eval s | "
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
