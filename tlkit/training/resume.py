"""Resuming an interrupted run: finding its folder, what it started with (identity.json), and
refusing a resume whose settings, classes or data changed what would be learned."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from tlkit.core.errors import RunError
from tlkit.core.fsutil import (
    INCOMPLETE,
    final_path,
    find_incomplete,
    is_incomplete,
    read_json_record,
)
from tlkit.core.runs import RUN_FILE
from tlkit.training.config import FinetuneConfig

log = logging.getLogger("tlkit")

IDENTITY_FILE = "identity.json"  # in checkpoints/: what a resumed run must still match
# Settings a resumed run may change freely: they decide where and how fast, not what is learned.
RESUME_FREE = (
    "output",
    "overwrite",
    "workers",
    "prefetch",
    "cache_dir",
    "recipe",
    "tensorboard",
    "strategy",
    # the same pixels for fixed-scale views, within about a grey level for jittered ones
    "resized_cache",
)


def find_resumable(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(folder being built, final run folder) for `--resume PATH`: PATH is the run's name
    (runs/x) or its `runs/x.incomplete-<id>` folder."""
    path = Path(path)
    if is_incomplete(path):
        candidates = [path] if (path / "checkpoints" / IDENTITY_FILE).is_file() else []
        final = final_path(path)
    else:
        if (path / RUN_FILE).is_file():
            raise RunError(
                f"{path}: this run finished; there is nothing to resume (train a new "
                "one with -o, or evaluate it with `tlkit eval`)"
            )
        final = path
        candidates = [
            c for c in find_incomplete(path) if (c / "checkpoints" / IDENTITY_FILE).is_file()
        ]
    if not candidates:
        raise RunError(
            f"{path}: no interrupted run to resume (expected a folder "
            f"{final.name}{INCOMPLETE}<id> holding checkpoints/{IDENTITY_FILE})"
        )
    chosen = max(candidates, key=lambda c: (c / "checkpoints").stat().st_mtime)
    if len(candidates) > 1:
        log.info(
            "%d interrupted attempts of %s; resuming the newest, %s",
            len(candidates),
            final,
            chosen.name,
        )
    return chosen, final


def read_identity(tmp_dir: Path) -> dict[str, Any]:
    """What an interrupted run started with (checkpoints/identity.json)."""
    return read_json_record(
        tmp_dir / "checkpoints" / IDENTITY_FILE,
        RunError,
        f"the run cannot be resumed; remove {tmp_dir} and train again",
    )


def resume_config(path: str | os.PathLike[str], **overrides: Any) -> FinetuneConfig:
    """The settings an interrupted run started with, with `overrides` on top."""
    tmp_dir, _ = find_resumable(path)
    saved = read_identity(tmp_dir)
    return dataclasses.replace(FinetuneConfig.from_dict(saved["config"]), **overrides)


def differences(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b and not (prefix == "config." and key in RESUME_FREE):
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out


def check_unchanged(
    saved: dict[str, Any] | None, now: dict[str, Any], tmp_dir: Path | None, force_resume: bool
) -> None:
    """A resumed run continues only on the settings, classes and data it started with."""
    if saved is None:
        return
    changed = differences({k: saved.get(k) for k in now}, now)
    if changed and not force_resume:
        raise RunError(
            f"{tmp_dir}: cannot resume, the run started with different settings or "
            f"data ({'; '.join(changed)}); restore them, or pass --force-resume to "
            "continue anyway"
        )
    for line in changed:
        log.warning("resuming despite a change (--force-resume): %s", line)
