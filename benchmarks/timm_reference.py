"""A fine-tuning reference as a user of timm's train.py runs it, in plain Keras 3 and numpy.

Written independently of tlkit's training code, to tell whether tlkit's fine-tuning is as good
as the usual modern recipe. `timm_reference` trains the whole network (backbone with its
pretrained weights, a new head) from the first step:

- Optimizer: AdamW, decoupled weight decay 0.05, betas (0.9, 0.999), eps 1e-8 (PyTorch's), no
  decay on 1-D variables (biases, BatchNorm gamma/beta). That is timm fine-tuning practice
  (`--opt adamw --weight-decay 0.05`, and 0.05 is the default of timm's
  `param_groups_layer_decay`, which excludes 1-D parameters the same way); train.py's own
  defaults (`--opt sgd --weight-decay 2e-5`) are for training from scratch. Done here with
  Keras's `exclude_from_weight_decay(var_list=...)` on every variable of rank <= 1.
- Layer-wise rate decay 0.75 (`--layer-decay 0.75`; off in train.py's defaults, 0.75 is
  `param_groups_layer_decay`'s default, from BEiT): the head gets the rate, each earlier group
  the rate times 0.75 per group between it and the head. Groups are the backbone's stages, from
  its layer names (`stage_groups`): stem, block1, block2, ..., the head last. Simplified:
  timm's EfficientNet matcher (`group_matcher(coarse=False)`) makes a group of every block
  (block2a, block2b, ...) and one of conv_head, so its decay is steeper (about 0.75^18 at
  Lite0's stem, here 0.75^8); here a layer without a block number (efficientnet's top_*)
  joins the group before it.
- Schedule: linear warmup over `warmup_epochs` (from 0, so the first update is at rate 0;
  timm starts from `--warmup-lr 1e-5`) then cosine to 0 (`--sched cosine
  --min-lr 0`), stepped on every update (train.py's `--sched-on-updates`; by default it steps
  once per epoch, too coarse at a few updates per epoch). Keras's CosineDecay with warmup
  counts the cosine after the warmup (timm's `--warmup-prefix`); train.py's default counts it
  from step 0, a difference of warmup/epochs in the cosine's phase.
- Label smoothing 0.1 (`--smoothing 0.1`, a train.py default), from logits.
- Augmentation: horizontal flip (`--hflip 0.5`) and a random resized crop with the aspect
  ratio of timm's default (`--ratio 3/4 4/3`) but area (0.4, 1) instead of `--scale 0.08 1`:
  with ten images a class and a few dozen epochs, crops of 8% of a drawing often lose the
  object, and the mild range keeps it in view (a judgement, not measured here). Crops are
  clipped to the image instead of timm's ten rejection tries. No colour jitter (train.py's
  `--color-jitter 0.4`): colour can be what tells classes of drawings apart.
- Head: global average pooling, Dropout 0.2, a new Dense. train.py's `--drop` defaults to 0,
  but timm's efficientnet_lite0 notes "for train, drop_rate should be 0.2, drop_path_rate
  should be 0.2" (keras.applications' EfficientNet top has the same dropout). Simplified: no
  stochastic depth (drop path), no EMA, no mixup (all three off in train.py's defaults).
- BatchNorm trains (batch statistics, moving statistics updated), as timm does, with
  PyTorch's moving-average momentum 0.1 (Keras momentum 0.9; timm's efficientnet_lite0 keeps
  PyTorch's default): at Keras's 0.99 a few dozen updates leave the moving statistics mostly
  at their starting values while the weights have moved to the batch statistics.
- Model selection as timm's checkpoint saver (`--eval-metric top1`): each epoch is validated,
  the best validation top-1 is kept (ties: lower unsmoothed validation loss, timm's
  `validate` loss); the learning rate is the one whose kept epoch is best by the same rule.
- Batches of 32; the last partial batch of an epoch is kept (timm drops it: with ten images a
  class that wastes a fifth of the data each epoch).

Why one optimizer per group: Adam(W) divides each gradient by its running RMS, so scaling a
group's gradients (or its loss) leaves its updates unchanged. Layer-wise decay has to scale the
learning rate itself, and Keras 3 optimizers have one rate for all their variables: each group
gets its own AdamW, its schedule times the group's factor (which also scales its decoupled
weight decay, as in timm, where decay is lr * wd per group), all applied in one
`tf.GradientTape` step.

Default grid (1e-4, 3e-4, 1e-3) at batch 32: timm scales a base rate to the batch, by
sqrt(batch / base size) for Adam-family optimizers; AdamW fine-tuning base rates of 5e-4 per 512
images to 1e-3 per 256 give 1.3e-4 and 3.5e-4 at 32, and the grid spans a decade around them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

HEAD = "head"
BLOCK = re.compile(r"block(\d+)")
CROP_AREA, CROP_RATIO = (0.4, 1.0), (3 / 4, 4 / 3)
DROPOUT = 0.2
LITE0_SIZE = 224  # the CLI's backbone, efficientnet_lite0, at its input size
BN_MOMENTUM = 0.9  # PyTorch's momentum 0.1 in Keras's convention (Keras's default is 0.99)


def stage_groups(layer_names: Sequence[str]) -> dict[str, str]:
    """Each layer's group: "blockN" for a name starting blockN, "stem" for the layers before
    the first block, and the previous layer's group for any other name (top_*, an add)."""
    out, group = {}, "stem"
    for name in layer_names:
        found = BLOCK.match(name)
        if found:
            group = f"block{int(found.group(1))}"
        out[name] = group
    return out


def group_rates(layer_names: Sequence[str], layer_decay: float) -> dict[str, float]:
    """Each group's rate factor, in order from the stem to the head: the head 1, each group
    before it layer_decay times the next."""
    order = [*dict.fromkeys(stage_groups(layer_names).values()), HEAD]
    last = len(order) - 1
    return {group: layer_decay ** (last - i) for i, group in enumerate(order)}


def variable_groups(model: Any, base: Any, layer_decay: float) -> list[tuple[str, float, list]]:
    """The trainable variables of `model` by group, with each group's factor: the backbone's by
    `stage_groups` of its layers, everything else (the new classifier) in the head group."""
    names = [layer.name for layer in base.layers]
    groups, rates = stage_groups(names), group_rates(names, layer_decay)
    members: dict[str, list] = {group: [] for group in rates}
    seen: set[int] = set()
    for layer in base.layers:
        for v in layer.trainable_variables:
            if id(v) not in seen:
                seen.add(id(v))
                members[groups[layer.name]].append(v)
    members[HEAD] = [v for v in model.trainable_variables if id(v) not in seen]
    return [(g, rates[g], vs) for g, vs in members.items() if vs]


def classifier(build_base: Callable[[], Any], preprocess: Any, num_classes: int) -> tuple:
    """(model, base): pixels -> preprocess -> backbone -> GAP -> Dropout -> Dense logits, the
    backbone's BatchNorm moving averages at PyTorch's momentum (BN_MOMENTUM)."""
    import keras

    base = build_base()
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    inputs = keras.Input(base.input_shape[1:])
    pooled = keras.layers.GlobalAveragePooling2D()(base(preprocess(inputs)))
    logits = keras.layers.Dense(num_classes)(keras.layers.Dropout(DROPOUT)(pooled))
    return keras.Model(inputs, logits), base


def make_augment(size: int) -> Callable[[Any], Any]:
    """A batch -> its random resized crops (area CROP_AREA, aspect CROP_RATIO, bilinear), each
    flipped left-right with probability 1/2 (a box with x1 > x2 is read mirrored)."""
    import math

    import keras
    import tensorflow as tf

    gen = keras.random.SeedGenerator()  # drawn from keras.utils.set_random_seed's seed

    def augment(x: Any) -> Any:
        n = tf.shape(x)[0]

        def draw(lo: float, hi: float) -> Any:
            return keras.random.uniform((n,), lo, hi, seed=gen)

        area = draw(*CROP_AREA)
        ratio = tf.exp(draw(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = tf.minimum(1.0, tf.sqrt(area * ratio))
        h = tf.minimum(1.0, tf.sqrt(area / ratio))
        y0, x0 = draw(0.0, 1.0) * (1 - h), draw(0.0, 1.0) * (1 - w)
        flip = draw(0.0, 1.0) < 0.5
        left, right = tf.where(flip, x0 + w, x0), tf.where(flip, x0, x0 + w)
        boxes = tf.stack([y0, left, y0 + h, right], axis=1)
        return tf.image.crop_and_resize(x, boxes, tf.range(n), (size, size))

    return augment


def optimizers(groups: list, peak: float, steps: int, warmup: int, weight_decay: float) -> list:
    """One AdamW per group: warmup from 0 to peak x factor, then cosine to 0 at `steps`."""
    import keras

    out = []
    for _, factor, variables in groups:
        target = peak * factor
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else target,
            decay_steps=steps - warmup,
            alpha=0.0,
            warmup_target=target if warmup else None,
            warmup_steps=warmup,
        )
        opt = keras.optimizers.AdamW(schedule, weight_decay=weight_decay, epsilon=1e-8)
        opt.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
        opt.build(variables)
        out.append((opt, variables))
    return out


def make_step(model: Any, pairs: list, augment: Callable, num_classes: int, smoothing: float):
    """The training step: augment, forward in training mode (BatchNorm updates its moving
    statistics), smoothed cross-entropy, each group's gradients to its own optimizer."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing)
    flat = [v for _, variables in pairs for v in variables]

    @tf.function(reduce_retracing=True)
    def step(x: Any, y: Any) -> Any:
        x = augment(x)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(tf.one_hot(y, num_classes), logits)
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, flat)
        i = 0
        for opt, variables in pairs:
            opt.apply(grads[i : i + len(variables)], variables)
            i += len(variables)
        return loss

    return step


def scores(model: Any, x: Any, y: Any, batch_size: int) -> tuple[float, float]:
    """(top-1, mean unsmoothed cross-entropy) of `model` on (x, y), predicted in batches."""
    import numpy as np

    logits = model.predict(x, batch_size=batch_size, verbose=0).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float((logits.argmax(1) == y).mean()), float(-logp[np.arange(len(y)), y].mean())


def better(a: tuple[float, float], b: tuple[float, float] | None) -> bool:
    """Whether (top-1, loss) `a` beats `b`: higher top-1, ties to the lower loss."""
    return b is None or a[0] > b[0] or (a[0] == b[0] and a[1] < b[1])


@dataclass
class Run:
    """One learning rate's run: its kept epoch (1-based), that epoch's validation (top-1,
    loss), its weights (`model.get_weights()` order) and their variable paths."""

    lr: float
    epoch: int
    val: tuple[float, float]
    weights: list
    paths: list[str]
    seconds: float


def train_run(
    data: dict[str, tuple[Any, Any]],
    build_base: Callable[[], Any],
    preprocess: Any,
    num_classes: int,
    seed: int,
    lr: float,
    settings: dict[str, Any],
) -> Run:
    """One learning rate from a fresh model and `seed`: `settings["epochs"]` epochs, the best
    validated epoch kept. `settings`: epochs, batch_size, warmup_epochs, smoothing,
    weight_decay, layer_decay, log."""
    import keras
    import numpy as np

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    (x, y), (xv, yv) = data["train"], data["val"]
    batch, epochs = settings["batch_size"], settings["epochs"]
    per_epoch = -(-len(x) // batch)
    model, base = classifier(build_base, preprocess, num_classes)
    groups = variable_groups(model, base, settings["layer_decay"])
    pairs = optimizers(
        groups,
        lr,
        per_epoch * epochs,
        per_epoch * settings["warmup_epochs"],
        settings["weight_decay"],
    )
    step = make_step(model, pairs, make_augment(x.shape[1]), num_classes, settings["smoothing"])
    rng = np.random.default_rng(seed)
    best: Run | None = None
    for epoch in range(1, epochs + 1):
        order, began = rng.permutation(len(x)), time.perf_counter()
        losses = [
            float(step(x[order[i : i + batch]], y[order[i : i + batch]]))
            for i in range(0, len(x), batch)
        ]
        took = time.perf_counter() - began
        val = scores(model, xv, yv, batch)
        settings["log"](
            f"timm-reference lr {lr:g} epoch {epoch}/{epochs}: train loss "
            f"{np.mean(losses):.4f} ({took:.1f} s), val top-1 {val[0]:.4f}, val loss {val[1]:.4f}"
        )
        if better(val, best and best.val):
            paths = [v.path for v in model.weights]
            best = Run(lr, epoch, val, model.get_weights(), paths, 0.0)
    assert best is not None  # epochs >= 1, checked by timm_reference
    best.seconds = time.perf_counter() - start
    return best


def check_settings(data: dict, lrs: Sequence[float], epochs: int, warmup_epochs: int) -> None:
    """One line for a setting the run cannot use."""
    missing = [s for s in ("train", "val", "test") if s not in data]
    if missing:
        raise SystemExit(f"timm_reference: data has no {', '.join(missing)} split; give all 3")
    if not lrs or any(lr < 0 for lr in lrs):
        raise SystemExit(f"timm_reference: lrs must be rates >= 0; received {tuple(lrs)}")
    if epochs < 1 or not 0 <= warmup_epochs < epochs:
        raise SystemExit(
            f"timm_reference: need epochs >= 1 and 0 <= warmup_epochs < epochs; received "
            f"epochs={epochs}, warmup_epochs={warmup_epochs}"
        )


def timm_reference(
    data: dict[str, tuple[Any, Any]],
    build_base: Callable[[], Any],
    preprocess: Any,
    num_classes: int,
    seed: int,
    *,
    lrs: Sequence[float] = (1e-4, 3e-4, 1e-3),
    epochs: int = 20,
    batch_size: int = 32,
    warmup_epochs: int = 2,
    smoothing: float = 0.1,
    weight_decay: float = 0.05,
    layer_decay: float = 0.75,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The recipe of the module docstring for each rate in `lrs`; the rate whose kept epoch is
    best on validation is tested. `data`: {"train", "val", "test"} -> (float32 pixels 0..255,
    int labels). "seconds": every grid run (builds, steps, per-epoch validation), not the
    test pass."""
    import keras

    check_settings(data, lrs, epochs, warmup_epochs)
    settings = {
        "epochs": epochs,
        "batch_size": batch_size,
        "warmup_epochs": warmup_epochs,
        "smoothing": smoothing,
        "weight_decay": weight_decay,
        "layer_decay": layer_decay,
        "log": log,
    }
    chosen: Run | None = None
    seconds = 0.0
    for lr in lrs:
        run = train_run(data, build_base, preprocess, num_classes, seed, lr, settings)
        seconds += run.seconds
        log(f"timm-reference lr {lr:g}: kept epoch {run.epoch}, val {run.val}, {run.seconds:.0f} s")
        if better(run.val, chosen and chosen.val):
            chosen = run
    assert chosen is not None
    keras.backend.clear_session()
    model, _ = classifier(build_base, preprocess, num_classes)
    model.set_weights(chosen.weights)
    xt, yt = data["test"]
    test_top1, _ = scores(model, xt, yt, batch_size)
    keras.backend.clear_session()
    return {
        "val_top1": chosen.val[0],
        "test_top1": test_top1,
        "lr": chosen.lr,
        "epoch": chosen.epoch,
        "seconds": seconds,
    }


def load_split(root: Any, split: str, per_class: int | None) -> tuple[Any, Any, list[str]]:
    """A class-folder split as (pixels, labels, class names), as real_pictures.pixels makes
    them (224 px), the first `per_class` files of each class if given."""
    import numpy as np
    from real_pictures import pixels  # run as a script: benchmarks/ is on sys.path

    folder = root / split
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    if not classes:
        raise SystemExit(f"{folder}: no class folders; give a folder with train/, val/, test/")
    files, labels = [], []
    for i, c in enumerate(classes):
        these = sorted(f for f in (folder / c).iterdir() if f.is_file())[:per_class]
        files += these
        labels += [i] * len(these)
    return pixels(files, size=LITE0_SIZE), np.array(labels), classes


def main(argv: Sequence[str] | None = None) -> None:
    """`python benchmarks/timm_reference.py data/`: the reference on efficientnet_lite0 with
    its ImageNet weights at 224 px, on a folder of train/, val/, test/ class folders; prints
    the result as JSON."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--lrs", default="1e-4,3e-4,1e-3", help="comma-separated rates")
    parser.add_argument("--per-class", type=int, default=None, help="train images per class")
    args = parser.parse_args(argv)
    try:
        lrs = tuple(float(v) for v in args.lrs.split(","))
    except ValueError:
        raise SystemExit(f"--lrs: give comma-separated numbers; received {args.lrs!r}") from None
    import keras

    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import ensure_imagenet

    spec = get_backbone("efficientnet_lite0")
    weights = str(ensure_imagenet(spec))
    splits = {
        s: load_split(args.folder, s, args.per_class if s == "train" else None)
        for s in ("train", "val", "test")
    }
    classes = splits["train"][2]
    for s, (_, _, names) in splits.items():
        if names != classes:
            raise SystemExit(f"{args.folder / s}: its class folders differ from train/'s")
    data = {s: (x, y) for s, (x, y, _) in splits.items()}
    result = timm_reference(
        data,
        lambda: spec.build(LITE0_SIZE, weights=weights),
        keras.layers.Rescaling(1 / 128, offset=-127 / 128),  # Lite0's (x - 127) / 128
        len(classes),
        args.seed,
        lrs=lrs,
        epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
    )
    print(json.dumps({"train_images": len(data["train"][1]), **result}))


if __name__ == "__main__":
    main()
