"""The run directory: `model.keras`, `run.json`, `history.csv`, `checkpoints/`.

Runs are built in `<name>.incomplete-<id>/` and renamed whole when training ends, so a folder
under runs/ with a plain name is always a finished run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlkit.errors import RunError

RUNS_DIR = "runs"
RUN_SCHEMA = 1


@dataclass(frozen=True)
class Run:
    path: Path
    info: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def input_size(self) -> int:
        return int(self.info["input_size"])

    @property
    def max_pixels(self) -> int:
        from tlkit.decode import DEFAULT_MAX_PIXELS

        return int(self.info["config"].get("audit", {}).get("max_pixels", DEFAULT_MAX_PIXELS))

    def load_model(self) -> Any:
        """The saved classifier, loaded with Keras safe_mode (no arbitrary code)."""
        import keras

        return keras.saving.load_model(self.path / "model.keras", compile=False, safe_mode=True)


def is_finished_run(path: Path) -> bool:
    return (path / "run.json").is_file() and (path / "model.keras").is_file()


def newest_run(runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    runs_dir = Path(runs_dir)
    runs = [p for p in runs_dir.iterdir() if p.is_dir() and is_finished_run(p)] \
        if runs_dir.is_dir() else []
    if not runs:
        raise RunError(
            f"{runs_dir}: no finished runs; train one with `tlkit finetune` or name a run folder"
        )
    return max(runs, key=lambda p: (p / "run.json").stat().st_mtime)


def load_run(path: str | os.PathLike | None = None) -> Run:
    """A finished run; `None` means the newest under runs/."""
    run_path = newest_run() if path is None else Path(path)
    if not run_path.is_dir():
        raise RunError(f"{run_path}: no such run folder")
    if ".incomplete-" in run_path.name or not is_finished_run(run_path):
        raise RunError(
            f"{run_path}: not a finished tlkit run (needs run.json and model.keras); it may "
            "have been interrupted"
        )
    try:
        info = json.loads((run_path / "run.json").read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{run_path / 'run.json'}: not valid JSON ({e})") from None
    if info.get("schema") != RUN_SCHEMA:
        raise RunError(
            f"{run_path / 'run.json'}: run schema {info.get('schema')!r} is not supported by "
            f"this tlkit (expects {RUN_SCHEMA})"
        )
    return Run(run_path, info)


def list_runs(runs_dir: str | os.PathLike = RUNS_DIR) -> list[dict[str, Any]]:
    """Finished runs and interrupted ones (resumable), newest first, for `tlkit runs`."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if not path.is_dir():
            continue
        if is_finished_run(path):
            try:
                info = json.loads((path / "run.json").read_text())
            except json.JSONDecodeError:
                continue  # load_run names the damage when the run is used
            best = info.get("results", {}).get("best") or {}
            rows.append({"run": path.name, "status": "finished",
                         "backbone": info.get("backbone"),
                         "freeze": (info.get("freeze") or {}).get("request"),
                         "best_val_accuracy": best.get("val_accuracy"),
                         "created": info.get("created"), "path": str(path)})
        elif ".incomplete-" in path.name and (path / "checkpoints" / "identity.json").is_file():
            identity = json.loads((path / "checkpoints" / "identity.json").read_text())
            name = path.name.split(".incomplete-")[0]
            rows.append({"run": name, "status": "interrupted",
                         "backbone": identity.get("backbone"),
                         "freeze": None, "best_val_accuracy": None,
                         "created": None, "path": str(path),
                         "resume": f"tlkit finetune --resume {runs_dir / name}"})
    return sorted(rows, key=lambda r: Path(r["path"]).stat().st_mtime, reverse=True)
