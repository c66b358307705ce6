"""Image folders -> labelled examples, the class map, and stable splits.

Two layouts: DATA/<class>/... or DATA/{train,val,test}/<class>/.... Without a val/ folder the
validation split is chosen by a hash of each file's path relative to its split folder, so adding
images never moves an old image between train and val.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from natsort import natsorted

from tlkit.core.choices import MAX_NAME_BYTES, SPLIT_NAMES
from tlkit.core.errors import DataError, shown
from tlkit.core.fsutil import OS_FILES, tlkit_output
from tlkit.core.settings import SETTINGS

# characters that reorder the text around them when printed (after U+202E the rest of a name
# prints backwards): a class name holding one would read differently in every report
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


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
    # path -> sha256 of the file's bytes, filled in by the data check (tlkit.data.audit)
    digests: dict[str, str] | None = field(default=None, hash=False, compare=False, repr=False)

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: dict(Counter(e.class_name for e in examples))
            for split, examples in self.splits.items()
        }


def _visible(name: str) -> bool:
    return not name.startswith(".") and not name.startswith("__")


def _list_class_files(class_dir: Path, root: Path, ignored: list[str]) -> list[Path]:
    """Every visible file under a class folder. Symbolic links are followed, to files and to
    folders, as a CSV manifest's are (the one rule for both: the user's links are the user's
    data); a link back to a folder already read is listed as ignored, never walked twice."""
    files = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a link loop (a folder linked into itself)
            ignored.append(str(Path(dirpath).relative_to(root)))
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        keep = sorted(d for d in dirnames if _visible(d))
        ignored.extend(str(Path(dirpath, d).relative_to(root)) for d in dirnames if d not in keep)
        dirnames[:] = keep
        for name in sorted(filenames):
            if not _visible(name) or name.lower() in OS_FILES:
                ignored.append(str(Path(dirpath, name).relative_to(root)))
                continue
            files.append(Path(dirpath, name))
    return files


def check_class_name(name: str, where: str) -> str:
    """A class name becomes a folder, a line of labels.txt and part of file names: one with a
    path separator, `..`, or a control character (a newline shifts labels.txt) is refused."""
    bad = (
        "a path separator"
        if "/" in name or "\\" in name
        else "a control character"
        if any(unicodedata.category(c) == "Cc" or c in BIDI_CONTROLS for c in name)
        else f"more than {MAX_NAME_BYTES} bytes"
        if len(name.encode()) > MAX_NAME_BYTES
        else "only dots"
        if set(name) <= {"."}
        else "spaces at an end"
        if name != name.strip()
        else None
    )
    if bad:
        raise DataError(
            f"{where}: class name {shown(name)} has {bad}; rename it (letters, digits, "
            "spaces inside, '-', '_', '.')"
        )
    return name


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
            raise DataError(f"{entry}: empty class folder; add images to it or remove it")
        out[check_class_name(entry.name, str(entry))] = files
    return out


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string: the split of a file depends on its path alone."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def check_val_fraction(val_fraction: float) -> None:
    """--val-fraction's check where a folder is split without a config (the Python API)."""
    SETTINGS["val_fraction"].check(val_fraction)


def load_folder(
    root: str | os.PathLike[str], val_fraction: float = SETTINGS["val_fraction"].default
) -> ImageFolder:
    """Scan `root`; raise DataError naming the folder when it cannot be used."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder; pass a folder of class sub-folders")
    made = tlkit_output(root)
    if made is not None:
        raise DataError(f"{root}: {made}, not data; pass a folder of class sub-folders")
    check_val_fraction(val_fraction)
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
    return _assemble(
        root,
        layout,
        {
            split: _Split(by_class, path, f"{path}/{{cls}}", "rename or remove that folder")
            for split, (path, by_class) in per_split.items()
        },
        val_fraction,
        ignored,
    )


@dataclass(frozen=True)
class _Split:
    """One split of a source, before the class map: files by class, and how to name them."""

    by_class: dict[str, list[Path]]
    base: Path  # hash-split keys are paths relative to this, so moving DATA is harmless
    where: str  # names a class's place in messages: "{cls}" is replaced
    fix: str  # what to do about an unknown class


def _assemble(
    root: Path,
    layout: str,
    per_split: dict[str, _Split],
    val_fraction: float,
    ignored: list[str],
    rel_root: Path | None = None,
) -> ImageFolder:
    """Class map, labelled examples and the stable validation split: the same rules for every
    source. `rel_root` is what Example.relpath is relative to (default: `root`)."""
    rel_root = rel_root or root
    train = per_split["train"]  # callers check it has two classes or more, in their own words
    classes = tuple(natsorted(train.by_class))
    index = {c: i for i, c in enumerate(classes)}
    hash_keys: dict[str, str] = {}

    def examples(split: _Split) -> list[Example]:
        out = []
        for cls, files in split.by_class.items():
            if cls not in index:
                raise DataError(
                    f"{split.where.format(cls=cls)}: class {cls!r} is not among the training "
                    f"classes ({', '.join(classes)}); {split.fix}"
                )
            for f in files:
                e = Example(str(f.resolve()), f.relative_to(rel_root).as_posix(), index[cls], cls)
                hash_keys[e.path] = f.relative_to(split.base).as_posix()
                out.append(e)
        return sorted(out, key=lambda e: e.relpath)

    splits: dict[str, tuple[Example, ...]] = {}
    train_examples = examples(train)
    if "val" in per_split:
        val_source = "folder" if layout != "csv" else "csv"
        splits["train"] = tuple(train_examples)
        splits["val"] = tuple(examples(per_split["val"]))
    else:
        val_source = "hash-split"
        held_out = {
            e.path for e in train_examples if hash_fraction(hash_keys[e.path]) < val_fraction
        }
        splits["train"] = tuple(e for e in train_examples if e.path not in held_out)
        splits["val"] = tuple(e for e in train_examples if e.path in held_out)
    if "test" in per_split:
        splits["test"] = tuple(examples(per_split["test"]))
    if not splits["val"]:
        raise DataError(
            f"{root}: the validation split is empty ({len(train_examples)} training images, "
            f"--val-fraction {val_fraction}); add images, raise --val-fraction or add a val/ "
            "folder"
        )
    return ImageFolder(str(root), layout, classes, splits, val_source, tuple(ignored))


def _csv_row(row: dict[str, str], where: str, base: Path) -> tuple[Path, str, str]:
    """(file, label, split name) of one manifest row, each checked; `where` is file:line."""
    rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
    split_name = (row.get("split") or "train").strip().lower()
    if not rel or not label:
        raise DataError(f"{where}: empty path or label; every row needs both")
    check_class_name(label, where)
    if any(unicodedata.category(c) == "Cc" for c in rel):  # a NUL byte, a line break
        raise DataError(f"{where}: path {shown(rel)} has a control character; fix the row")
    if split_name not in SPLIT_NAMES:
        raise DataError(f"{where}: split {shown(split_name)} is not train, val or test")
    # the path as written stays inside; links on disk are followed, as in a folder dataset
    if Path(rel).is_absolute() or os.path.normpath(rel).split(os.sep)[0] == "..":
        raise DataError(
            f"{where}: path {shown(rel)} is outside the CSV's folder {base}; "
            "paths must be relative to it and stay inside"
        )
    file = base / rel
    try:
        found = file.is_file()
    except OSError as e:  # a name too long for the file system
        raise DataError(f"{where}: path {shown(rel)}: {e.strerror}; fix the row") from None
    if not found:
        raise DataError(f"{where}: no such file {shown(str(file), 200)}")
    return file, label, split_name


def _read_manifest(csv_path: Path, base: Path) -> dict[str, dict[str, list[Path]]]:
    """The manifest's rows as split -> class -> files; a file that is not CSV text (NUL bytes,
    not UTF-8, a field past the csv module's limit) is one line naming where it broke."""
    import csv

    first_line: dict[Path, int] = {}
    by_split: dict[str, dict[str, list[Path]]] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        try:
            columns = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in columns]
            if missing:
                raise DataError(
                    f"{csv_path}: needs the columns path and label (and optionally "
                    f"split); it has {shown(', '.join(columns) or 'none', 200)}"
                )
            for line, row in enumerate(reader, start=2):
                file, label, split_name = _csv_row(row, f"{csv_path}:{line}", base)
                if file.resolve() in first_line:
                    raise DataError(
                        f"{csv_path}:{line}: {shown(row['path'].strip())} is already listed "
                        f"on line {first_line[file.resolve()]}; list each image once"
                    )
                first_line[file.resolve()] = line
                by_split.setdefault(SPLIT_NAMES[split_name], {}).setdefault(label, []).append(file)
        except UnicodeDecodeError as e:
            raise DataError(
                f"{csv_path}: not UTF-8 text (byte {e.object[e.start : e.start + 1]!r} after "
                f"line {reader.line_num}); save the manifest as UTF-8 CSV"
            ) from None
        except csv.Error as e:
            raise DataError(
                f"{csv_path}:{reader.line_num + 1}: not a readable CSV row ({str(e)[:120]}); "
                "a manifest is plain text, one `path,label` row per image"
            ) from None
    return by_split


def load_csv(
    path: str | os.PathLike[str], val_fraction: float = SETTINGS["val_fraction"].default
) -> ImageFolder:
    """A CSV manifest: `path,label` columns (an optional `split` column: train/val/test), paths
    relative to the CSV's folder and never outside it. Every row is checked; the first bad one
    is named by its line number."""
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV manifest")
    check_val_fraction(val_fraction)
    base = csv_path.parent
    by_split = _read_manifest(csv_path, base)
    train = by_split.get("train", {})
    if len(train) < 2:
        raise DataError(
            f"{csv_path}: the training rows have {len(train)} class(es) "
            f"({shown(', '.join(train) or 'none', 200)}); a classifier needs at least two"
        )
    return _assemble(
        csv_path,
        "csv",
        {
            split: _Split(
                classes, base, f"{csv_path} ({split} rows labelled {{cls}})", "fix those rows"
            )
            for split, classes in by_split.items()
        },
        val_fraction,
        [],
        rel_root=base,
    )


def load_dataset(
    source: str | os.PathLike[str], val_fraction: float = SETTINGS["val_fraction"].default
) -> ImageFolder:
    """DATA as the user names it, its splits and class map.

    Args:
        source: a folder, a CSV manifest (`*.csv`), or a tensorflow-datasets dataset
            (`tfds:NAME[:VERSION][/SPLIT]`, written out once as image files).
        val_fraction: the validation share where the data has no val split (a stable hash of
            each file's path decides).
    """
    text = str(source)
    if text.startswith("tfds:"):
        from tlkit.data.tfds_source import materialize

        return load_folder(materialize(text), val_fraction)
    if text.lower().endswith(".csv"):
        return load_csv(text, val_fraction)
    return load_folder(text, val_fraction)


def split_folders(root: str | os.PathLike[str]) -> dict[str, Path]:
    """{'train'|'val'|'test': folder} for the split folders directly under `root`."""
    root = Path(root)
    if not root.is_dir():
        return {}
    return {
        SPLIT_NAMES[p.name.lower()]: p
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name.lower() in SPLIT_NAMES
    }


def load_class_folders(root: str | os.PathLike[str]) -> list[Example]:
    """Every image of a one-folder-per-class tree, labelled in natural class order (the caller
    maps them through its own class map): the evaluation set when DATA has no splits."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder; pass a folder of class sub-folders")
    by_class = _scan_classes(root, root, [])
    if not by_class:
        raise DataError(f"{root}: no class folders with images")
    classes = natsorted(by_class)
    return sorted(
        (
            Example(str(f.resolve()), f.relative_to(root).as_posix(), i, c)
            for i, c in enumerate(classes)
            for f in by_class[c]
        ),
        key=lambda e: e.relpath,
    )


def file_signature(path: str | os.PathLike[str]) -> str:
    """What says a file is unchanged without reading it: size and mtime, which `cp -p` and
    `rsync -a` copy over, plus inode and ctime, which no user call can set back (git's index
    uses the same four). Any change or replacement of the file changes one of them."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def fingerprint(folder: ImageFolder) -> str:
    """Hash of every file's split, path, class and content (sha256): the data's identity in the
    feature-cache key, the resume check and run.json. Content, not timestamps, so that it holds
    on another machine and cannot be fooled by a copy that keeps size and mtime."""
    if folder.digests is None:
        raise RuntimeError("fingerprint() needs the data check's digests (tlkit.data.audit)")  # bug
    h = hashlib.sha256()
    for split in sorted(folder.splits):
        for e in folder.splits[split]:
            h.update(f"{split}\0{e.relpath}\0{e.class_name}\0{folder.digests[e.path]}\n".encode())
    return h.hexdigest()
