"""Filesystem helpers that make every write all-or-nothing.

A crash at any point leaves either the old file or the new one, never half of either, which is
what lets a user kill a run at any moment without losing what was already on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it over `path` only if the block succeeds.

    `suffix` keeps the extension for writers that check it (Keras insists on `.keras`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(tmp, mode, encoding=None if isinstance(data, bytes) else "utf-8") as f:
            f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


INCOMPLETE = ".incomplete-"  # <final>.incomplete-<id>/: a multi-file artifact being built
STALE_SECONDS = 24 * 3600


def incomplete_dir(final: str | os.PathLike, clean_stale: bool = False) -> Path:
    """A fresh `<final>.incomplete-<id>/` beside `final`, where a multi-file artifact is built.
    `clean_stale` removes earlier attempts at `final` untouched for a day: for artifacts that
    cannot be resumed (evaluations, exports), whose leftovers are only clutter. Interrupted runs
    and cache builds can be resumed, so they are listed (`tlkit runs`, `tlkit cache ls`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        for old in find_incomplete(final):
            if time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
    tmp = final.parent / f"{final.name}{INCOMPLETE}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def is_incomplete(path: str | os.PathLike) -> bool:
    return INCOMPLETE in Path(path).name


def final_path(path: str | os.PathLike) -> Path:
    """runs/x for runs/x.incomplete-<id>; any other path as it is."""
    path = Path(path)
    return path.parent / path.name.split(INCOMPLETE)[0]


def find_incomplete(final: str | os.PathLike) -> list[Path]:
    """The incomplete attempts at `final`, oldest first."""
    final = Path(final)
    found = final.parent.glob(f"{final.name}{INCOMPLETE}*") if final.parent.is_dir() else []
    return sorted((p for p in found if p.is_dir()), key=lambda p: p.stat().st_mtime)


def refuse_overwrite(path: str | os.PathLike, overwrite: bool, hint: str) -> None:
    """The one check before writing a user-visible output: `path` is replaced only when asked."""
    if Path(path).exists() and not overwrite:
        from tlkit.errors import OutputExistsError

        raise OutputExistsError(f"{path}: already exists; {hint}")


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, overwrite: bool = False) -> None:
    """Rename a finished directory into place; an old one is removed only after the swap."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        if not overwrite:
            raise FileExistsError(final)
        old = final.parent / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_inside(root: str | os.PathLike, relative: str) -> bool:
    """Whether `root / relative` stays under `root`: a name read from a manifest must not
    reach other files with `..`, an absolute path or a symlink."""
    root = Path(root).resolve()
    return Path(root, relative).resolve().is_relative_to(root)


def user_cache_dir() -> Path:
    """tlkit's per-user cache (XDG): memos that are cheap to lose, never results."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tlkit"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hash(path: str | os.PathLike, algorithm: str) -> str:
    """Hash with the algorithm a pin uses (Keras pins md5 or sha256 digests)."""
    if algorithm == "sha256":
        return sha256_file(path)
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
