"""The icons protocol of the accuracy benchmark: more data, and a test split by other artists.

    python scripts/fetch_icons.py /tmp/icons                       # once (apt-get download)
    python benchmarks/quality.py --icons /tmp/icons/icons          # the core: every goal
    python benchmarks/quality.py --icons /tmp/icons/icons --sweep  # the rest of the curve

Data: the freedesktop icon themes Debian ships, drawn by many artists (scripts/fetch_icons.py:
one image per theme, context and icon name, deduplicated by content across every theme, themes
drawn from one another grouped into one family). Class = the icon's context (CONTEXTS). The
families of TEST_FAMILIES are the test split, never seen in training: a change of artist, as a
user meets it when the pictures to classify come from elsewhere than the training set. Per
seed, k training and val(k) validation icons a class are drawn by the seed from the other
families; the test split is the same for every seed (at most TEST_CAP icons a class, a fixed
draw). Each row is a `tlkit finetune` as typed (default backbone, EfficientNet-Lite0 with its
ImageNet weights, at SIZE px: the icons are drawn at 48 px, and 224 would spend three times
the work on upsampling), then `tlkit eval --split test`; the references are real_pictures.py's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from real_pictures import (
    HEAD_FEATURES,
    HEAD_ONLY,
    LAST_STAGES,
    RATES,
    RECIPES,
    TIMM_LIKE,
    Task,
    plan_for,
    run_seed,
)

# the contexts that hold enough icons for k = 200 and a test split (categories and emblems, about
# 330 each in all, do not), and the held-out families: KDE's two themes, one glossy and one
# flat, which share no artist with the GNOME, Faenza or Paper lines
CONTEXTS = ("actions", "apps", "devices", "mimetypes", "places", "status")
TEST_FAMILIES = ("breeze", "oxygen")
SIZE = 128
TEST_CAP = 100
DEPTHS = ["--freeze-blocks 2", "--freeze-blocks 4", LAST_STAGES]  # of Lite0's 9 stages
# the core's depths at k = 200: the defaults (no freezing) and two more, to keep the core
# under 45 minutes on 2 cores; the third is in the sweep
CORE_DEPTHS = DEPTHS[1:]
PLANS: dict[str, dict[int, tuple[list[str], set[str]]]] = {
    "core": {
        200: (
            ["defaults", HEAD_ONLY, *CORE_DEPTHS, "--freeze auto"],
            {"reference", "fine-tuned reference"},
        ),
    },
    "sweep": {
        10: (
            ["defaults", HEAD_ONLY, *DEPTHS, "--freeze auto"],
            {"fine-tuned reference", "scratch"},
        ),
        50: (
            [
                "defaults",
                HEAD_ONLY,
                *DEPTHS,
                "--freeze auto",
                *RATES,
                *RECIPES,
                TIMM_LIKE,
                *HEAD_FEATURES,
            ],
            {"fine-tuned reference", "timm reference", "scratch", "stages probe"},
        ),
        # does the best fine-tune rate move with k, and where does it start to?
        100: ([HEAD_ONLY, *(r for r in RATES if r.endswith(("1e-5", "3e-5", "1e-4")))], set()),
        # where between 100 and 200 a class the rule's two rates change places
        150: ([HEAD_ONLY, *(r for r in RATES if r.endswith(("1e-5", "1e-4")))], set()),
        200: (
            [*DEPTHS[:1], *RATES, *RECIPES],
            # each about 40 min a seed on 2 cores (scratch: its three to five rates, more)
            {"timm reference", "scratch"},
        ),
    },
}


def val_count(k: int) -> int:
    """Validation icons a class: tlkit's default split (a fifth of the labelled images) for k
    training images, at least 5."""
    return max(5, k // 4)


def pools(root: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per context: every icon of the training families, and TEST_CAP of the held-out
    families' (a fixed draw). Families take turns (`interleave`): Paper's
    themes hold 74% of the apps, and a draw by icon would teach Papirus's style for "apps"."""
    index = root / "themes.json"
    if not index.is_file():
        raise SystemExit(
            f"{root}: no themes.json; make it with python scripts/fetch_icons.py OUT "
            "(then --icons OUT/icons)"
        )
    families = json.loads(index.read_text())["families"]
    missing = [f for f in TEST_FAMILIES if f not in families]
    if missing:
        raise SystemExit(f"{index}: no family {', '.join(missing)}; fetch_icons.py makes them")
    train: dict[str, dict[str, list[Path]]] = {c: {} for c in CONTEXTS}
    test: dict[str, dict[str, list[Path]]] = {c: {} for c in CONTEXTS}
    for family, themes in sorted(families.items()):
        side = test if family in TEST_FAMILIES else train
        for c in CONTEXTS:
            side[c][family] = [
                f for theme in themes for f in sorted((root / family / theme / c).glob("*.png"))
            ]
    return (
        {c: [f for family in sorted(train[c]) for f in train[c][family]] for c in CONTEXTS},
        {c: sorted(interleave(test[c], 0)[:TEST_CAP]) for c in CONTEXTS},
    )


def interleave(by_family: dict[str, list[Path]], seed: int) -> list[Path]:
    """Each family's icons shuffled by `seed`, then one from each family in turn while it has
    any: the first n of the result spread over the families."""
    rng = random.Random(seed)
    queues = []
    for family in sorted(by_family):
        files = list(by_family[family])
        rng.shuffle(files)
        queues.append(files)
    out: list[Path] = []
    for i in range(max(map(len, queues), default=0)):
        out += [q[i] for q in queues if i < len(q)]
    return out


def make_task(
    root: Path, train: dict[str, list[Path]], test: dict[str, list[Path]], k: int, seed: int
) -> Path:
    """train/val/test class folders of symlinks: k + val_count(k) icons a context drawn by the
    seed, the families taking turns, then split at random between train and val."""
    import os

    val = val_count(k)
    for c in CONTEXTS:
        if len(train[c]) < k + val:
            raise SystemExit(
                f"{c}: {len(train[c])} icons in the training families, k={k} needs {k + val}"
            )
        by_family: dict[str, list[Path]] = {}
        for f in train[c]:
            by_family.setdefault(f.parent.parent.parent.name, []).append(f)
        drawn = interleave(by_family, seed)[: k + val]
        random.Random(seed).shuffle(drawn)
        for split, part in (("train", drawn[:k]), ("val", drawn[k:]), ("test", test[c])):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for f in part:  # names are unique within a theme, not across themes
                os.symlink(f.resolve(), root / split / c / f"{f.parent.parent.name}--{f.name}")
    return root


def run_icons(
    root: Path,
    work: Path,
    seeds: Sequence[int],
    sweep: bool,
    only: Sequence[str] | None,
    record: Callable[..., None],
    smoke: bool = False,
    ks: Sequence[int] | None = None,
) -> None:
    """The core plan, or with `sweep` the sweep's, of the icons' protocol (`ks`: only these of
    its k); `smoke`: head only at k = 4 on generated icons, the test backbone (checks the split
    by family)."""
    plan = {4: ([HEAD_ONLY], set())} if smoke else plan_for(PLANS, sweep, only, ks)
    size = 32 if smoke else SIZE
    if smoke:
        root = smoke_icons(work / "smoke-icons")
    train, test = pools(root)
    counts = {c: (len(train[c]), len(test[c])) for c in CONTEXTS}
    print(json.dumps({"icons": counts}), flush=True)
    for seed in seeds:
        for k, (names, extras) in sorted(plan.items()):
            folder = make_task(work / f"icons-k{k}-s{seed}", train, test, k, seed)
            run_seed(work, Task(folder, k, seed, size, "icons"), names, extras, record, smoke)


def smoke_icons(root: Path) -> Path:
    """fetch_icons.py's layout in small: two training families and TEST_FAMILIES, 5 icons a
    context each (a square whose colour says the context; icons differ in its size)."""
    import numpy as np
    from PIL import Image

    families = {"train-a": ["a1"], "train-b": ["b1"], **{f: [f] for f in TEST_FAMILIES}}
    for j, (family, themes) in enumerate(families.items()):
        for i, c in enumerate(CONTEXTS):
            folder = root / family / themes[0] / c
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(5):
                img = np.zeros((24, 24, 4), np.uint8)
                lo = 2 + (j + n) % 4
                img[lo:-lo, lo:-lo] = (*np.eye(3, dtype=np.uint8)[i % 3] * 255, 255)
                img[lo:-lo, lo:-lo, 1] = 32 * i
                Image.fromarray(img, "RGBA").save(folder / f"icon{n}.png")
    (root / "themes.json").write_text(json.dumps({"families": families}))
    return root
