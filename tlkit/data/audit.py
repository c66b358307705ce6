"""`check-data`: decode every file once, before any training, and say what is wrong with it.

A corrupt JPEG should stop a run before the first step, naming the file, not at step 47,000.
Each file is decoded with the decoder training uses; the result (with the sha256 of its bytes,
the data's identity everywhere else) is remembered per file by `datasets.file_signature` (size,
mtime, inode, ctime) in the user cache, so auditing an unchanged dataset again is a stat() per
file, and a file replaced by a copy that keeps its size and mtime is read again. The report
also covers what decodes but deserves a look: content that does not match the extension, junk
after a JPEG, tiny images, exact duplicates and train/val/test leakage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlkit.core.choices import DEFAULT_MAX_PIXELS
from tlkit.core.errors import DataError, OutputExistsError
from tlkit.core.fsutil import atomic_write_json, file_hash, user_cache_dir
from tlkit.core.progress import progress
from tlkit.core.settings import SETTINGS, Loader, check_fields, setting
from tlkit.data.datasets import Example, ImageFolder, file_signature
from tlkit.data.decode import probe_image

log = logging.getLogger("tlkit")
REPORT_SCHEMA = 1
MEMO_VERSION = 2  # bump when probe_image learns something new, so old memos are not trusted
IMBALANCE_WARNING = 10.0  # largest / smallest class above this is worth a line


@dataclass(frozen=True)
class AuditConfig:
    """How bad files are treated when a command audits its data before working."""

    on_bad_image: str = setting("on_bad_image")  # "error": list bad files and stop; "skip"
    max_bad_fraction: float = setting("max_bad_fraction")  # skip still stops above this share

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DataReport:
    """The audit of one dataset; `as_dict` is data_report.json."""

    folder: ImageFolder
    files: dict[str, dict[str, Any]]  # absolute path -> probe record
    min_size: int | None
    max_pixels: int
    reused: int  # records taken from the memo

    @property
    def bad(self) -> list[dict[str, Any]]:
        return [r for r in self._rows() if not r["ok"]]

    def _rows(self) -> list[dict[str, Any]]:
        return [
            {**self.files[e.path], "path": e.relpath, "split": split, "class": e.class_name}
            for split, examples in self.folder.splits.items()
            for e in examples
        ]

    def _split_counts(self, examples: Sequence[Example]) -> dict[str, Any]:
        """A split's usable and bad files per class, missing classes, imbalance."""
        per_class: dict[str, Counter[str]] = {}
        for e in examples:
            counts = per_class.setdefault(e.class_name, Counter())
            counts["ok" if self.files[e.path]["ok"] else "bad"] += 1
        usable = [n["ok"] for n in per_class.values() if n["ok"]]
        return {
            "images": len(examples),
            "classes": {
                c: {"ok": per_class[c]["ok"], "bad": per_class[c]["bad"]}
                for c in self.folder.classes
                if c in per_class
            },
            "missing_classes": [c for c in self.folder.classes if c not in per_class],
            "imbalance": round(max(usable) / min(usable), 2) if usable else None,
        }

    def as_dict(self) -> dict[str, Any]:
        rows = self._rows()
        splits = {s: self._split_counts(x) for s, x in self.folder.splits.items()}
        warnings = [
            {"path": r["path"], "split": r["split"], "warning": w}
            for r in rows
            if r["ok"]
            for w in r["warnings"]
        ]
        small = [
            {"path": r["path"], "split": r["split"], "size": [r["width"], r["height"]]}
            for r in rows
            if r["ok"] and self.min_size and min(r["width"], r["height"]) < self.min_size
        ]
        return {
            "schema": REPORT_SCHEMA,
            "root": str(Path(self.folder.root).resolve()),
            "layout": self.folder.layout,
            "val_source": self.folder.val_source,
            "classes": list(self.folder.classes),
            "max_pixels": self.max_pixels,
            "min_size": self.min_size,
            "totals": {
                "files": len(rows),
                "ok": sum(r["ok"] for r in rows),
                "bad": sum(not r["ok"] for r in rows),
                "warnings": len(warnings),
                "small": len(small),
                "memo_reused": self.reused,
            },
            "splits": splits,
            "bad": [
                {
                    "path": r["path"],
                    "split": r["split"],
                    "class": r["class"],
                    "problem": r["problem"],
                }
                for r in rows
                if not r["ok"]
            ],
            "warnings": warnings,
            "small": small,
            "formats": dict(Counter(r["format"] for r in rows if r["ok"]).most_common()),
            "modes": dict(Counter(r["mode"] for r in rows if r["ok"]).most_common()),
            "duplicates": _duplicates(rows),
            "ignored": list(self.folder.ignored),
        }


def _duplicates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups of byte-identical files: 'leakage' across splits is the one that inflates every
    metric; 'conflicting-labels' is the same image under two classes."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["ok"]:
            groups[r["sha256"]].append(r)
    out = []
    for digest, members in groups.items():
        if len(members) < 2:
            continue
        if len({m["split"] for m in members}) > 1:
            kind = "leakage"
        elif len({m["class"] for m in members}) > 1:
            kind = "conflicting-labels"
        else:
            kind = "duplicate"
        out.append(
            {
                "kind": kind,
                "sha256": digest,
                "files": [
                    {"path": m["path"], "split": m["split"], "class": m["class"]} for m in members
                ],
            }
        )
    order = {"leakage": 0, "conflicting-labels": 1, "duplicate": 2}
    return sorted(out, key=lambda g: (order[g["kind"]], g["files"][0]["path"]))


def _probe(path: str, max_pixels: int) -> dict[str, Any]:
    try:
        p = probe_image(path, max_pixels)
    except DataError as e:
        try:  # its bytes still belong to the data's identity
            digest = file_hash(path)
        except OSError:
            digest = "unreadable"
        return {"ok": False, "problem": str(e).removeprefix(f"{path}: "), "sha256": digest}
    return {"ok": True, **dataclasses.asdict(p), "warnings": list(p.warnings)}


def _memo_path(root: str, max_pixels: int) -> Path:
    ident = f"{Path(root).resolve()}\0{max_pixels}\0{MEMO_VERSION}"
    return user_cache_dir() / "audit" / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"


def _load_memo(path: Path) -> dict[str, Any]:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep
        return {}  # a memo is only a shortcut; a missing or damaged one means decode again
    return memo if isinstance(memo, dict) else {}


def audit_folder(
    folder: ImageFolder,
    min_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> DataReport:
    """Probe every file of `folder` (in parallel; unchanged files come from the memo)."""
    examples: list[Example] = [e for split in folder.splits.values() for e in split]
    memo_file = _memo_path(folder.root, max_pixels)
    memo = _load_memo(memo_file)
    files: dict[str, dict[str, Any]] = {}
    signatures: dict[str, str] = {}  # taken before probing: a file changed meanwhile re-checks
    todo: list[str] = []
    for e in examples:
        signatures[e.path] = file_signature(e.path)
        cached = memo.get(e.path)
        if (
            isinstance(cached, dict)
            and cached.get("stat") == signatures[e.path]
            and isinstance(cached.get("record"), dict)
        ):
            files[e.path] = cached["record"]
        else:
            todo.append(e.path)
    reused = len(files)
    if todo:
        log.info(
            "checking %d of %d files (%d unchanged since the last check)",
            len(todo),
            len(examples),
            reused,
        )
        with (
            ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool,
            progress(len(todo), "checking files") as advance,
        ):
            for path, record in zip(
                todo, pool.map(lambda f: _probe(f, max_pixels), todo), strict=True
            ):
                files[path] = record
                advance(1)
        atomic_write_json(
            memo_file, {p: {"stat": signatures[p], "record": files[p]} for p in signatures}
        )
    digests = {path: record["sha256"] for path, record in files.items()}
    return DataReport(
        dataclasses.replace(folder, digests=digests), files, min_size, max_pixels, reused
    )


def apply_policy(
    report: DataReport, config: AuditConfig
) -> tuple[ImageFolder, list[dict[str, Any]]]:
    """The folder to train on and the files left out: stop on any bad file ('error'), or drop
    them and record each with its reason ('skip'), unless too much of the data is bad."""
    bad = report.bad
    if not bad:
        return report.folder, []
    total = sum(len(x) for x in report.folder.splits.values())
    listing = "\n  ".join(f"{Path(report.folder.root) / r['path']}: {r['problem']}" for r in bad)
    if config.on_bad_image == "error":
        raise DataError(
            f"{len(bad)} of {total} files cannot be used; fix or remove them, or "
            f"pass --on-bad-image skip to train without them:\n  {listing}"
        )
    if len(bad) / total > config.max_bad_fraction:
        raise DataError(
            f"{len(bad)} of {total} files ({len(bad) / total:.0%}) cannot be used, "
            f"more than --max-bad-fraction {config.max_bad_fraction:g}; the data "
            f"looks broken, so nothing was started:\n  {listing}"
        )
    keep = {p for p, r in report.files.items() if r["ok"]}
    splits = {s: tuple(e for e in x if e.path in keep) for s, x in report.folder.splits.items()}
    emptied = [
        c for c in report.folder.classes if not any(e.class_name == c for e in splits["train"])
    ]
    if emptied:
        raise DataError(
            f"{report.folder.root}: skipping bad files leaves no training images "
            f"of class {', '.join(emptied)}; fix those files"
        )
    if not splits["val"]:
        raise DataError(f"{report.folder.root}: skipping bad files leaves no validation images")
    for r in bad:
        log.warning("skipped %s: %s", r["path"], r["problem"])
    skipped = [{"path": r["path"], "reason": r["problem"]} for r in bad]
    return dataclasses.replace(report.folder, splits=splits), skipped


def audit_and_filter(
    folder: ImageFolder, config: AuditConfig, min_size: int | None, loader: Loader
) -> tuple[ImageFolder, DataReport, list[dict[str, Any]]]:
    """What finetune and precompute-features run first: audit (under the loader's pixel limit,
    with its threads), log the headlines, apply the bad-image policy."""
    report = audit_folder(folder, min_size, loader.max_pixels, loader.workers)
    summary = report.as_dict()
    for line in summary_lines(summary):
        log.info("%s", line)
    kept, skipped = apply_policy(report, config)
    return kept, report, skipped


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The few lines worth printing before training; the full detail is in data_report.json."""
    t = summary["totals"]
    lines = [
        f"data check: {t['files']} files, {t['ok']} ok, {t['bad']} bad, "
        f"{t['warnings']} warnings ({t['memo_reused']} unchanged since the last check)"
    ]
    for split, info in summary["splits"].items():
        if info["missing_classes"]:
            lines.append(f"  {split}: no images of class {', '.join(info['missing_classes'])}")
        if info["imbalance"] and info["imbalance"] > IMBALANCE_WARNING:
            lines.append(
                f"  {split}: classes are imbalanced {info['imbalance']:g}:1; consider "
                "--class-weight balanced"
            )
    kinds = Counter(g["kind"] for g in summary["duplicates"])
    if kinds["leakage"]:
        lines.append(
            f"  {kinds['leakage']} images appear in more than one split (leakage): "
            "validation and test figures will be optimistic"
        )
    if kinds["conflicting-labels"]:
        lines.append(f"  {kinds['conflicting-labels']} images appear under two classes")
    if summary["small"]:
        lines.append(
            f"  {len(summary['small'])} images are smaller than the backbone's "
            f"minimum {summary['min_size']} px (they are upscaled)"
        )
    return lines


def check_data(
    data: str | os.PathLike[str] = "data",
    backbone: str = SETTINGS["backbone"].default,
    val_fraction: float = SETTINGS["val_fraction"].default,
    max_pixels: int = SETTINGS["max_pixels"].default,
    workers: int | None = None,
) -> DataReport:
    """`tlkit check-data`: every image decoded once, what is wrong reported, nothing trained.

    Args:
        data: a folder of class folders (or train/val/test), a CSV manifest, or `tfds:NAME`.
        backbone: whose minimum input size flags images too small.
        val_fraction: the validation share where DATA has no val/ folder.
        max_pixels: images larger than this are refused (decompression bombs).
        workers: decoding threads (None: all cores).
    """
    from tlkit.data.datasets import load_dataset
    from tlkit.models.backbones import get_backbone

    SETTINGS["max_pixels"].check(max_pixels)
    spec = get_backbone(backbone)
    return audit_folder(load_dataset(data, val_fraction), spec.min_size, max_pixels, workers)


def write_report(summary: dict[str, Any], path: str | os.PathLike[str], overwrite: bool) -> Path:
    """data_report.json; a file there that is not an earlier report is never replaced."""
    path = check_report_path(path, overwrite)
    atomic_write_json(path, summary)
    return path


def check_report_path(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Before the audit starts: a file at `path` that is not an earlier report is refused."""
    path = Path(path)
    if path.exists() and not overwrite:
        try:
            earlier = json.loads(path.read_text())
            ours = isinstance(earlier, dict) and "totals" in earlier and "schema" in earlier
        except (OSError, ValueError, RecursionError):
            ours = False
        if not ours:
            raise OutputExistsError(
                f"{path}: exists and is not a tlkit data report; choose "
                "another -o/--output or pass --overwrite"
            )
    return path
