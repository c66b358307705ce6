"""Image folders -> labelled examples, the class map, and stable splits.

Two layouts: DATA/<class>/... or DATA/{train,val,test}/<class>/.... Without a val/ folder the
validation split is chosen by a hash of each file's path relative to its split folder, so adding
images never moves an old image between train and val.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from natsort import natsorted

from tlkit.errors import DataError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# Files operating systems drop into folders; never data.
JUNK_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db"}


@dataclass(frozen=True)
class Example:
    path: str  # absolute path of the file
    relpath: str  # path relative to the dataset root, posix separators
    label: int
    class_name: str


@dataclass(frozen=True)
class ImageFolder:
    """A scanned dataset: the class map and the examples of each split."""

    root: str
    layout: str  # "classes" (one folder per class) or "splits" (train/val/test)
    classes: tuple[str, ...]
    splits: dict[str, tuple[Example, ...]] = field(hash=False)
    val_source: str  # "folder" or "hash-split"
    ignored: tuple[str, ...] = ()  # hidden folders and OS junk that were skipped

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: dict(Counter(e.class_name for e in examples))
            for split, examples in self.splits.items()
        }


def _visible(name: str) -> bool:
    return not name.startswith(".") and not name.startswith("__")


def _list_class_files(class_dir: Path, root: Path, ignored: list[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir):
        keep = sorted(d for d in dirnames if _visible(d))
        ignored.extend(str(Path(dirpath, d).relative_to(root)) for d in dirnames if d not in keep)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not _visible(name) or name.lower() in JUNK_FILES:
                ignored.append(str(Path(dirpath, name).relative_to(root)))
                continue
            files.append(Path(dirpath, name))
    return files


def _scan_classes(split_dir: Path, root: Path, ignored: list[str]) -> dict[str, list[Path]]:
    """Class folder -> its files, recursively. Loose files beside class folders are ignored."""
    out: dict[str, list[Path]] = {}
    for entry in sorted(split_dir.iterdir()):
        if not entry.is_dir():
            continue  # e.g. a README at the dataset root
        if not _visible(entry.name):
            ignored.append(str(entry.relative_to(root)))
            continue
        files = _list_class_files(entry, root, ignored)
        if not files:
            raise DataError(
                f"{entry}: empty class folder; add images to it or remove it"
            )
        out[entry.name] = files
    return out


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: the split of a file depends on its path alone."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def load_folder(root: str | os.PathLike, val_fraction: float = 0.2) -> ImageFolder:
    """Scan `root`; raise DataError naming the folder when it cannot be used."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder; pass a folder of class sub-folders")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(
            f"--val-fraction must be between 0 and 1 (exclusive). Received: {val_fraction}"
        )
    ignored: list[str] = []
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and _visible(p.name)]
    split_dirs = {p.name: p for p in subdirs if p.name.lower() in SPLIT_NAMES}
    if split_dirs:
        others = [p.name for p in subdirs if p.name.lower() not in SPLIT_NAMES]
        if others:
            raise DataError(
                f"{root}: has split folders ({', '.join(split_dirs)}) and other folders "
                f"({', '.join(others)}); put every class folder under train/, val/ or test/"
            )
        if not any(SPLIT_NAMES[n.lower()] == "train" for n in split_dirs):
            raise DataError(f"{root}: has {', '.join(split_dirs)} but no train/ folder")
        layout = "splits"
        per_split = {}
        for name, path in split_dirs.items():
            split = SPLIT_NAMES[name.lower()]
            if split in per_split:
                raise DataError(f"{root}: two folders for the {split} split; keep one")
            per_split[split] = (path, _scan_classes(path, root, ignored))
    else:
        layout = "classes"
        per_split = {"train": (root, _scan_classes(root, root, ignored))}
    ignored.extend(p.name for p in sorted(root.iterdir()) if p.is_dir() and not _visible(p.name))

    train_dir, train_classes = per_split["train"]
    if not train_classes:
        raise DataError(
            f"{train_dir}: no class folders with images; expected {train_dir}/<class>/<image>"
        )
    if len(train_classes) < 2:
        raise DataError(
            f"{train_dir}: only one class ({next(iter(train_classes))}); a classifier needs at "
            "least two class folders"
        )
    classes = tuple(natsorted(train_classes))
    index = {c: i for i, c in enumerate(classes)}

    def examples(split_dir: Path, by_class: dict[str, list[Path]]) -> list[Example]:
        out = []
        for cls, files in by_class.items():
            if cls not in index:
                raise DataError(
                    f"{split_dir / cls}: class {cls!r} is not among the training classes "
                    f"({', '.join(classes)}); rename or remove that folder"
                )
            out.extend(
                Example(str(f.resolve()), f.relative_to(root).as_posix(), index[cls], cls)
                for f in files
            )
        return sorted(out, key=lambda e: e.relpath)

    splits: dict[str, tuple[Example, ...]] = {}
    train = examples(train_dir, train_classes)
    if "val" in per_split:
        val_source = "folder"
        splits["train"] = tuple(train)
        splits["val"] = tuple(examples(*per_split["val"]))
    else:
        val_source = "hash-split"

        def key(e: Example) -> str:  # relative to the train folder, so moving DATA is harmless
            return Path(e.path).relative_to(train_dir.resolve()).as_posix()

        splits["train"] = tuple(e for e in train if hash_fraction(key(e)) >= val_fraction)
        splits["val"] = tuple(e for e in train if hash_fraction(key(e)) < val_fraction)
    if "test" in per_split:
        splits["test"] = tuple(examples(*per_split["test"]))
    if not splits["val"]:
        raise DataError(
            f"{root}: the validation split is empty ({len(train)} training images, "
            f"--val-fraction {val_fraction}); add images, raise --val-fraction or add a val/ folder"
        )
    return ImageFolder(str(root), layout, classes, splits, val_source, tuple(ignored))


def split_folders(root: str | os.PathLike) -> dict[str, Path]:
    """{'train'|'val'|'test': folder} for the split folders directly under `root`."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {SPLIT_NAMES[p.name.lower()]: p for p in sorted(root.iterdir())
            if p.is_dir() and p.name.lower() in SPLIT_NAMES}


def load_class_folders(root: str | os.PathLike) -> list[Example]:
    """Every image of a one-folder-per-class tree, labelled in natural class order (the caller
    maps them through its own class map): the evaluation set when DATA has no splits."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder; pass a folder of class sub-folders")
    by_class = _scan_classes(root, root, [])
    if not by_class:
        raise DataError(f"{root}: no class folders with images")
    classes = natsorted(by_class)
    return sorted((Example(str(f.resolve()), f.relative_to(root).as_posix(), i, c)
                   for i, c in enumerate(classes) for f in by_class[c]),
                  key=lambda e: e.relpath)


def fingerprint(folder: ImageFolder) -> str:
    """Hash of every file's split, path, size and mtime: changes whenever the data does."""
    h = hashlib.sha256()
    for split in sorted(folder.splits):
        for e in folder.splits[split]:
            st = os.stat(e.path)
            h.update(f"{split}\0{e.relpath}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
