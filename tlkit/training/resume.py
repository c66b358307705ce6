"""Resuming an interrupted run: finding its folder, what it started with (identity.json), and
refusing a resume whose settings, classes or data changed what would be learned."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from tlkit.core.choices import LINEAR_HEAD
from tlkit.core.errors import RunError
from tlkit.core.fsutil import (
    INCOMPLETE,
    final_path,
    find_incomplete,
    is_incomplete,
    read_json_record,
)
from tlkit.core.records import Searched
from tlkit.core.runs import RUN_FILE
from tlkit.training.config import FinetuneConfig

log = logging.getLogger("tlkit")

IDENTITY_FILE = "identity.json"  # in checkpoints/: what a resumed run must still match
# 4: `config` keeps every setting flat, by name (up to 3 the bad-file settings and the pixel
# limit sat under `audit`), so an older tlkit refuses it in one line rather than misreading it;
# 3: it names the classifier head (`head`), so a tlkit that knows no heads of the user's refuses
# to resume one; 2: the record carries its schema; 1: identity.json without one (tlkit up to
# 2026-12-06). Every earlier schema still resumes.
IDENTITY_SCHEMA = 4
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


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a run started with, and what a resume must still match (checkpoints/identity.json):
    the settings as asked for (FinetuneConfig.as_dict), the backbone, its weights, the input
    and its preprocessing, the class map, the data, the fine-tune rate the data chose (None in
    runs started before that rule: nothing to compare), and the `auto` searches' choices and
    scores (kept, not compared: a resume reuses them), and the classifier head's name
    ("linear": tlkit's; a Python function's `module.name`: a resume must pass it again)."""

    config: dict[str, Any]
    backbone: str
    weights_sha256: str | None
    input_size: int
    preprocessing: str
    classes: list[str]
    data_fingerprint: str
    fine_tune_lr: float | None = None
    searched: Searched = dataclasses.field(default_factory=lambda: Searched())
    head: str = LINEAR_HEAD
    schema: int = IDENTITY_SCHEMA

    def compared(self) -> dict[str, Any]:
        """What a resume compares (the head is checked on its own: no force resumes another
        head's weights): everything but the schema, the head and the searches' results."""
        skip = ("schema", "searched", "head")
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        if "audit" in self.config:  # a run from before the settings' parts: audit.max_pixels, ...
            out["config"] = {k: v for k, v in self.config.items() if k != "audit"}
            out["config"].update(self.config["audit"])
        out["config"] = {"head_features": "last", **out["config"]}  # before --head-features
        if self.fine_tune_lr is None:
            del out["fine_tune_lr"]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, **{k: v for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path) -> Identity:
        """identity.json of any schema so far (1 had none); what is missing or foreign is one
        RunError naming the file."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - (set(d) & required))
        fix = f"the run cannot be resumed; remove {path.parent.parent} and train again"
        if missing or not isinstance(d.get("config"), dict):
            raise RunError(f"{path}: not a tlkit identity (missing {', '.join(missing)}); {fix}")
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or schema > IDENTITY_SCHEMA:
            raise RunError(
                f"{path}: an identity of schema {schema!r}, newer than this tlkit reads "
                f"({IDENTITY_SCHEMA}); upgrade tlkit, or {fix}"
            )
        return cls(**{k: v for k, v in d.items() if k in names and k != "schema"}, schema=schema)


def read_identity(tmp_dir: Path) -> Identity:
    """What an interrupted run started with (checkpoints/identity.json)."""
    path = tmp_dir / "checkpoints" / IDENTITY_FILE
    fix = f"the run cannot be resumed; remove {tmp_dir} and train again"
    return Identity.from_dict(read_json_record(path, RunError, fix), path)


def resume_config(path: str | os.PathLike[str], **overrides: Any) -> FinetuneConfig:
    """The settings an interrupted run started with, with `overrides` on top."""
    tmp_dir, _ = find_resumable(path)
    saved = read_identity(tmp_dir)
    return FinetuneConfig.from_dict(saved.config).replace(**overrides)


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
    saved: Identity | None, now: Identity, tmp_dir: Path | None, force_resume: bool
) -> None:
    """A resumed run continues only on the settings, classes and data it started with."""
    if saved is None:
        return
    if saved.head != now.head:
        how = (
            "tlkit's own head: resume without head="
            if saved.head == LINEAR_HEAD
            else f"head {saved.head}: resume from Python, tlkit.finetune(resume=..., head=...)"
        )
        raise RunError(f"{tmp_dir}: cannot resume with head {now.head}; the run started with {how}")
    was, current = saved.compared(), now.compared()
    changed = differences({k: was.get(k) for k in current}, current)
    if changed and not force_resume:
        raise RunError(
            f"{tmp_dir}: cannot resume, the run started with different settings or "
            f"data ({'; '.join(changed)}); restore them, or pass --force-resume to "
            "continue anyway"
        )
    for line in changed:
        log.warning("resuming despite a change (--force-resume): %s", line)
