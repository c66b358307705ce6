"""The run directory: `model.keras`, `run.json`, `history.csv`, `checkpoints/`.

Runs are built in `<name>.incomplete-<id>/` and renamed whole when training ends, so a folder
under runs/ with a plain name is always a finished run.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlkit.core.choices import DEFAULT_MAX_PIXELS, LINEAR_HEAD
from tlkit.core.errors import RunError, TlkitError, did_you_mean, first_line, shown
from tlkit.core.fsutil import (
    final_path,
    find_incomplete,
    folder_bytes,
    is_incomplete,
    is_live,
    read_json_record,
)
from tlkit.core.records import FreezeRecord, Results, WeightsRecord

RUNS_DIR = "runs"
RUN_SCHEMA = 1
RUN_FILE = "run.json"  # the RunRecord
MAX_INPUT_SIZE = 8192
# inner fields of run.json outside its typed records that readers take apart (tlkit runs,
# load_run), with their types; checked where present, so a record edited into another shape is
# one line, never a traceback (the typed records' keys are checked by their annotations)
NESTED: dict[tuple[str, ...], Any] = {
    ("results", "test", "accuracy"): float,
    ("data", "root"): str,
    ("data", "fingerprint"): str,
    ("data", "val_source"): str,
}


@dataclass(frozen=True)
class RunRecord:
    """run.json: written once by `finetune` (train.py), read by every other command through
    this class only. Its parts are typed records (core/records.py), checked for shape when
    read. A key this version does not know is kept (`extra`), so nothing is lost."""

    backbone: str
    weights: WeightsRecord
    freeze: FreezeRecord
    input_size: int
    preprocessing: str
    crop_fraction: float
    classes: tuple[str, ...]
    config: dict[str, Any]  # the settings as asked for (FinetuneConfig.as_dict)
    data: dict[str, Any]  # source, root, layout, val_source, counts, fingerprint, ...
    augment: dict[str, Any] = field(default_factory=dict)  # the augmentation used, its search
    results: Results = field(default_factory=lambda: Results())
    seed: int = 0
    schema: int = RUN_SCHEMA
    tlkit_version: str | None = None
    keras_version: str | None = None
    created: str | None = None
    train_bn: bool = False
    class_weight: dict[str, float] | None = None
    calibration: dict[str, Any] | None = None  # --calibrate: temperature, ECE before/after
    views_seen: dict[str, Any] | None = None  # the geometry the saved weights trained on
    feature_cache: dict[str, Any] | None = None
    distribution: dict[str, Any] | None = None
    lr_used: dict[str, float] | None = None
    phase: str | None = None
    epoch: int | None = None
    optimizer_steps: int | None = None
    resumed: list[str] = field(default_factory=list)
    head: str = LINEAR_HEAD  # tlkit's own, or the Python function's name (finetune(head=...))
    # what the head reads: {"used": "last" | "stages", "taps": [...], "search": scores}; {}
    # in a run from before --head-features: the last layer
    head_features: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def val_fraction(self) -> float:
        return float(self.config.get("val_fraction", 0.2))

    @property
    def max_pixels(self) -> int:
        old = self.config.get("audit", {})  # a run from before the settings' parts
        return int(self.config.get("max_pixels", old.get("max_pixels", DEFAULT_MAX_PIXELS)))

    @property
    def n_frozen(self) -> int:
        return int(self.freeze["n_frozen"])

    def split_signature(self) -> dict[str, Any]:
        """What fixes the train/val split: the data, where val comes from, and its share."""
        sig = {"fingerprint": self.data["fingerprint"], "val_source": self.data["val_source"]}
        if self.data["val_source"] == "hash-split":
            sig["val_fraction"] = self.val_fraction
        return sig

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": self.schema}  # first, as readers check it first
        out.update(
            (f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.name not in ("schema", "extra")
        )
        out["classes"] = list(self.classes)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | os.PathLike[str] = "run.json") -> RunRecord:
        if d.get("schema") != RUN_SCHEMA:
            raise RunError(
                f"{where}: run schema {d.get('schema')!r} is not supported by this "
                f"tlkit (expects {RUN_SCHEMA})"
            )
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
        required = [
            n
            for n, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing := [n for n in required if n not in d]:
            raise RunError(
                f"{where}: lacks {', '.join(missing)}; it was not written by tlkit "
                "finetune, or it was edited"
            )
        known = {k: v for k, v in d.items() if k in fields}
        hints = typing.get_type_hints(cls)
        _check_shape(d, {(name,): hints[name] for name in known} | NESTED, where)
        known["classes"] = tuple(known["classes"])
        return cls(**known, extra={k: v for k, v in d.items() if k not in fields})


Place = tuple[str | int, ...]  # a place in run.json: keys, and indices into lists


def _at(d: dict[str, Any], path: Place) -> Any:
    value: Any = d
    for key in path:
        if isinstance(key, int):
            value = value[key] if isinstance(value, list) and key < len(value) else None
        else:
            value = value.get(key) if isinstance(value, dict) else None
    return value


def _record_of(hint: Any) -> Any:
    """The typed record a hint holds (itself, or in `X | None`), else None."""
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    return next(
        (h for h in (typing.get_args(hint) if union else (hint,)) if typing.is_typeddict(h)), None
    )


def _places(d: dict[str, Any], schema: dict[tuple[str, ...], Any]) -> list[tuple[Place, Any, bool]]:
    """(place, its type, checked when null) for every field of `schema`, and every key that `d`
    holds of a typed record, items of lists of records too: a wrong value is named by its whole
    place (`results.best.epoch`, `results.phases[0].seconds`)."""
    out: list[tuple[Place, Any, bool]] = [(k, h, len(k) == 1) for k, h in schema.items()]
    todo: list[tuple[Place, Any]] = [(k, r) for k, h in schema.items() if (r := _record_of(h))]
    while todo:
        path, record = todo.pop()
        value = _at(d, path)
        if not isinstance(value, dict):
            continue
        for name, hint in typing.get_type_hints(record).items():
            if name not in value:
                continue
            out.append(((*path, name), hint, True))  # a key written null is checked too
            if (inner := _record_of(hint)) is not None:
                todo.append(((*path, name), inner))
            elif typing.get_origin(hint) is list and (item := _record_of(typing.get_args(hint)[0])):
                items = range(len(value[name]) if isinstance(value[name], list) else 0)
                todo += [((*path, name, i), item) for i in items]
                out += [((*path, name, i), item, True) for i in items]
    return out


def _shown_place(path: Place) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")


def _check_shape(d: dict[str, Any], schema: dict[tuple[str, ...], Any], where: Any) -> None:
    """Every field of `schema` present in `d` has its type, and the values readers rely on are
    in range: a record edited into another shape is one line, never a traceback later."""
    for path, hint, nullable_checked in sorted(_places(d, schema), key=lambda p: -len(p[0])):
        value = _at(d, path)
        if (value is not None or nullable_checked) and not _has_type(value, hint):
            got = "null" if value is None else f"{type(value).__name__} {shown(value, 60)}"
            raise RunError(
                f"{where}: {_shown_place(path)} is {got}, not {_type_name(hint)}; it was not "
                "written by tlkit finetune, or it was edited"
            )
    if not d["classes"]:
        raise RunError(f"{where}: classes is empty; it was edited or damaged")
    if not 1 <= d["input_size"] <= MAX_INPUT_SIZE:
        raise RunError(
            f"{where}: input_size {shown(d['input_size'], 40)} is not a size a model takes "
            f"(1 to {MAX_INPUT_SIZE}); it was edited or damaged"
        )


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a RunRecord field's annotation (tuples arrive as lists; a
    typed record is an object here: `_places` checks each of its keys at its own place)."""
    if typing.is_typeddict(hint):
        return isinstance(value, dict)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_has_type(value, h) for h in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            isinstance(k, str) and _has_type(v, args[1]) for k, v in value.items()
        )
    if isinstance(value, bool) and hint is not bool:  # JSON true is no number
        return False
    return isinstance(value, (int, float) if hint is float else hint)


_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _type_name(hint: Any) -> str:
    """A field's annotation as JSON words: `list[str] | None` is "a list of strings or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(h) for h in args)
    if origin in (list, tuple):
        return "a list of strings" if args[0] is str else "a list"
    if origin is dict or typing.is_typeddict(hint):
        return "an object"
    return "null" if hint is type(None) else _JSON_NAMES.get(hint, str(hint))


def read_record(run_path: Path) -> RunRecord:
    path = run_path / RUN_FILE
    try:
        info = read_json_record(path, RunError, "the run folder is damaged")
    except OSError as e:
        raise RunError(f"{path}: cannot read ({e.strerror or e})") from None
    return RunRecord.from_dict(info, path)


@dataclass(frozen=True)
class Run:
    path: Path
    record: RunRecord

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def input_size(self) -> int:
        return int(self.record.input_size)

    @property
    def max_pixels(self) -> int:
        return self.record.max_pixels

    @property
    def members(self) -> list[str]:
        """An ensemble run's members (`--preset best`: folders inside it); [] for one model."""
        ensemble = self.record.extra.get("ensemble")
        return list(ensemble["members"]) if isinstance(ensemble, dict) else []

    def one_model(self, what: str) -> None:
        """One line when `what` needs one backbone's model and this run is an ensemble."""
        if self.members:
            raise RunError(
                f"{self.path}: an ensemble of {len(self.members)} runs (--preset best); {what} "
                f"needs one backbone's model: name one of its members ({self.path}/members/...)"
            )

    def load_model(self) -> Any:
        """The saved classifier, loaded with Keras safe_mode (no arbitrary code)."""
        return load_keras_file(self.path / "model.keras")


def load_keras_file(path: Path, error: type[TlkitError] = RunError) -> Any:
    """A `.keras` file someone else may have made, under Keras safe_mode: a Lambda layer, a
    function or class named in its config from outside Keras, or a damaged archive is refused
    in one line, never run."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many kinds for a refused or damaged archive
        raise error(
            f"{path}: Keras refused to load it ({first_line(e, 300)}); tlkit loads only models "
            "made of Keras layers, never code from a file: use a model trained by tlkit"
        ) from None


def is_finished_run(path: Path) -> bool:
    return (path / RUN_FILE).is_file() and (path / "model.keras").is_file()


def newest_run(runs_dir: str | os.PathLike[str] = RUNS_DIR) -> Path:
    runs_dir = Path(runs_dir)
    runs = (
        [p for p in runs_dir.iterdir() if p.is_dir() and is_finished_run(p)]
        if runs_dir.is_dir()
        else []
    )
    if not runs:
        raise RunError(
            f"{runs_dir}: no finished runs; train one with `tlkit finetune` or name a run folder"
        )
    return max(runs, key=lambda p: (p / RUN_FILE).stat().st_mtime)


def _interrupted_run(path: Path) -> Path | None:
    """The run being built for `path`: the folder itself when it is one, else the newest
    `<path>.incomplete-*` that holds a run (the name tlkit printed while training)."""
    found = [path] if is_incomplete(path) else find_incomplete(path)
    runs = [p for p in found if (p / "checkpoints" / "identity.json").is_file()]
    return runs[-1] if runs else None


def unfinished_run(path: str | os.PathLike[str]) -> RunError | None:
    """The error for a path that names a run not finished yet (interrupted, or training in
    another process), saying what to do; None when `path` names no such run."""
    from tlkit.core.checkpoints import latest_checkpoint

    path = Path(path)
    if is_finished_run(path):
        return None
    folder = _interrupted_run(path)
    if folder is None:
        return None
    name = final_path(folder)
    if is_live(folder):
        return RunError(
            f"{path}: still training ({folder}, another process); wait for it to finish"
        )
    found = latest_checkpoint(folder / "checkpoints")
    where = (
        "before its first epoch ended"
        if found is None
        else f"at {found[1]['phase']} epoch {found[1]['epoch']}"
    )
    return RunError(
        f"{path}: not finished, interrupted {where} ({folder}); "
        f"`tlkit finetune --resume {name}` finishes it first"
    )


def split_runs(paths: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """The run folders among `paths` and the other paths, in order. A path that names an
    unfinished run, or a missing folder beside runs, is refused: never read as data."""
    runs, rest = [], []
    for p in paths:
        if is_finished_run(Path(p)):
            runs.append(p)
            continue
        error = unfinished_run(p)
        if error is not None:
            raise error
        parent = Path(p).parent
        if not Path(p).exists() and parent.is_dir():
            names = [q.name for q in parent.iterdir() if is_finished_run(q)]
            if names:
                raise RunError(
                    f"{p}: no such run.{did_you_mean(Path(p).name, names)} "
                    f"`tlkit runs` lists the runs in {parent}"
                )
        rest.append(p)
    return runs, rest


def load_run(path: str | os.PathLike[str] | None = None) -> Run:
    """A finished run, its record read and checked.

    Args:
        path: the run's folder; None: the newest under runs/.
    """
    run_path = newest_run() if path is None else Path(path)
    error = unfinished_run(run_path)
    if error is not None:
        raise error
    if not run_path.is_dir():
        raise RunError(f"{run_path}: no such run folder")
    if is_incomplete(run_path) or not is_finished_run(run_path):
        raise RunError(
            f"{run_path}: not a finished tlkit run (needs run.json and model.keras); it may "
            "have been interrupted"
        )
    return Run(run_path, read_record(run_path))


def _unreadable_row(path: Path, why: str) -> dict[str, Any]:
    empty = dict.fromkeys(("backbone", "freeze", "best_val_accuracy", "test_accuracy", "created"))
    size = round(folder_bytes(path) / 1e6, 1)
    return {
        "run": path.name,
        "status": "unreadable",
        **empty,
        "size_mb": size,
        "path": str(path),
        "error": why,
    }


def list_runs(runs_dir: str | os.PathLike[str] = RUNS_DIR) -> list[dict[str, Any]]:
    """Finished runs and interrupted ones (resumable), newest first, for `tlkit runs`."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if not path.is_dir():
            continue
        if is_finished_run(path):
            try:
                record = read_record(path)
            except RunError as e:  # listed, so that one damaged folder hides no other run
                rows.append(_unreadable_row(path, str(e)))
                continue
            best: Mapping[str, Any] = record.results.get("best") or {}
            rows.append(
                {
                    "run": path.name,
                    "status": "finished",
                    "backbone": record.backbone,
                    "freeze": record.freeze.get("request"),
                    "best_val_accuracy": best.get("val_accuracy"),
                    "test_accuracy": (record.results.get("test") or {}).get("accuracy"),
                    "size_mb": round(folder_bytes(path) / 1e6, 1),
                    "created": record.created,
                    "path": str(path),
                }
            )
        elif is_incomplete(path) and (path / "checkpoints" / "identity.json").is_file():
            try:
                identity = read_json_record(path / "checkpoints" / "identity.json", RunError, "")
            except RunError:
                identity = {}  # listed; `finetune --resume` names the damage
            name = final_path(path).name
            rows.append(
                {
                    "run": name,
                    "status": "training" if is_live(path) else "interrupted",
                    "backbone": identity.get("backbone"),
                    "freeze": None,
                    "best_val_accuracy": None,
                    "test_accuracy": None,
                    "size_mb": round(folder_bytes(path) / 1e6, 1),
                    "created": None,
                    "path": str(path),
                    "resume": f"tlkit finetune --resume {runs_dir / name}",
                }
            )
    return sorted(rows, key=lambda r: Path(r["path"]).stat().st_mtime, reverse=True)
