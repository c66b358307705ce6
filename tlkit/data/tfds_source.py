"""`tfds:NAME[:VERSION][/SPLIT]`: a tensorflow-datasets dataset as an ordinary image folder.

The images are written out once, losslessly (PNG), to the user cache under the dataset's name,
version and split, and then read like any folder: the same class map, audit, pipeline and
feature-cache keys. A published version of a tfds dataset never changes, so the folder is
reused whenever it is complete; it is built in an incomplete folder and renamed whole. tfds
reads from its own data_dir (`TFDS_DATA_DIR`, else ~/tensorflow_datasets): offline machines
use a copy prepared elsewhere.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tlkit.core.choices import SPLIT_NAMES
from tlkit.core.errors import DataError, first_line, shown
from tlkit.core.fsutil import (
    atomic_write_json,
    discard,
    hold_lock,
    incomplete_dir,
    publish_dir,
    safe_name,
    user_cache_dir,
)
from tlkit.core.progress import progress

log = logging.getLogger("tlkit")
SPEC = re.compile(
    r"^tfds:(?P<name>[\w-]+(?:/[\w-]+)?)(?::(?P<version>[\d.]+))?"
    r"(?:/(?P<split>[\w\[\]:%-]+))?$"
)


def parse(spec: str) -> tuple[str, str | None, str | None]:
    """(name, version or None, split or None). A config (`name/config`) must come with a
    version, so that `a/b` is read as dataset `a`, split `b`."""
    m = SPEC.match(spec)
    if not m:
        raise DataError(
            f"{shown(spec)}: not a tfds source; write tfds:NAME[:VERSION][/SPLIT], e.g. "
            "tfds:mnist/train"
        )
    name, version, split = m["name"], m["version"], m["split"]
    if "/" in name and version is None and split is None:
        name, split = name.split("/", 1)
    return name, version, split


def _features(info: Any, spec: str) -> tuple[str, str, list[str]]:
    import tensorflow_datasets as tfds

    feats = info.features
    images = [k for k, f in feats.items() if isinstance(f, tfds.features.Image)]
    labels = [k for k, f in feats.items() if isinstance(f, tfds.features.ClassLabel)]
    if not images or not labels:
        raise DataError(
            f"{spec}: tlkit needs an image feature and a class-label feature; this "
            f"dataset has {', '.join(feats.keys())}"
        )
    image = "image" if "image" in images else images[0]
    label = "label" if "label" in labels else labels[0]
    names = list(feats[label].names or [str(i) for i in range(feats[label].num_classes)])
    folders: dict[str, str] = {}
    for n in names:  # a class is a folder: two names that make one folder would merge classes
        if (folder := safe_name(n)) in folders:
            raise DataError(
                f"{spec}: classes {folders[folder]!r} and {n!r} both become the folder "
                f"{folder!r}, which would merge them; tlkit cannot read this dataset's "
                "labels as folders"
            )
        folders[folder] = n
    return image, label, list(folders)


def materialize(spec: str) -> Path:
    """The local folder holding `spec`'s images as class folders (one split) or as
    train/val/test (the whole dataset); written on first use."""
    import tensorflow_datasets as tfds

    name, version, split = parse(spec)
    try:
        builder = tfds.builder(name, version=version)
    except Exception as e:  # tfds raises many kinds for an unknown name or version
        raise DataError(f"{spec}: tensorflow-datasets cannot open it ({first_line(e)})") from None
    info = builder.info
    splits = [split] if split else [s for s in info.splits if s.lower() in SPLIT_NAMES]
    if not splits:
        raise DataError(
            f"{spec}: no train/validation/test splits are prepared in "
            f"{builder.data_dir}; name one (tfds:{name}/SPLIT) or prepare the data"
        )
    image_key, label_key, class_names = _features(info, spec)
    final = (
        user_cache_dir()
        / "tfds"
        / name.replace("/", "--")
        / str(info.version)
        / (split.replace("/", "_") if split else "all")
    )
    if (final / "tlkit-tfds.json").is_file():
        return final
    # one writer per folder: a second process waits, then finds it written
    with hold_lock(final.parent / f"{final.name}.lock"):
        if not (final / "tlkit-tfds.json").is_file():
            tmp = incomplete_dir(final, "tfds", clean=True)
            try:
                counts = {
                    s: _write_split(
                        builder,
                        spec,
                        s,
                        tmp if split else tmp / SPLIT_NAMES[s.lower()],
                        image_key,
                        label_key,
                        class_names,
                    )
                    for s in splits
                }
                atomic_write_json(
                    tmp / "tlkit-tfds.json",
                    {
                        "source": spec,
                        "name": name,
                        "version": str(info.version),
                        "splits": counts,
                        "classes": class_names,
                    },
                )
                publish_dir(tmp, final)
            except BaseException:
                discard(tmp)
                raise
    return final


def _write_split(
    builder: Any,
    spec: str,
    s: str,
    folder: Path,
    image_key: str,
    label_key: str,
    class_names: list[str],
) -> int:
    """Split `s` as class folders of PNGs in `folder`; the number of images written."""
    import numpy as np
    import tensorflow_datasets as tfds
    from PIL import Image

    try:
        ds = builder.as_dataset(split=s, shuffle_files=False)
    except Exception as e:  # not prepared, unknown split, ...
        raise DataError(
            f"{spec}: cannot read split {s!r} from {builder.data_dir} ({first_line(e)}); "
            "prepare the dataset there (tfds build) or set TFDS_DATA_DIR"
        ) from None
    log.info("writing %s split %s as image files in %s", builder.info.name, s, folder)
    n = 0
    info = builder.info
    total = info.splits[s].num_examples if s in info.splits else 0
    with progress(total, f"writing {s}") as advance:
        for n, example in enumerate(tfds.as_numpy(ds), start=1):
            pixels = np.asarray(example[image_key])
            cls = _class_of(int(example[label_key]), class_names, spec, s, n)
            (folder / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
                folder / cls / f"{n - 1:07d}.png"
            )
            advance(1)
    return n


def _class_of(label: int, class_names: list[str], spec: str, split: str, n: int) -> str:
    """The folder of a label; -1 (tfds' "no label") or an id beyond the classes is refused,
    never read as the last class from the end."""
    if not 0 <= label < len(class_names):
        what = "unlabelled (label -1)" if label == -1 else f"labelled {label}"
        raise DataError(
            f"{spec}: example {n} of split {split!r} is {what}, not one of the "
            f"{len(class_names)} classes; train on a labelled split (e.g. tfds:NAME/train)"
        )
    return class_names[label]
