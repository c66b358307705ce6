"""Training checkpoints: `last`, the one before it (`previous`) and `best`, in `checkpoints/`.

Each checkpoint is one self-contained HDF5 file: the whole classifier's weights, its random
state (the dropout layer's seed generator, which is a variable but not a weight: without it a
resumed run draws the dropout masks of its first steps again), the optimizer's variables (step
count, learning rate, moments) and the training state as JSON (phase, epoch, early-stopping
counters, best metric, history). Files are written once, under a temporary
name, and only ever renamed afterwards, so a crash at any moment leaves every checkpoint that
existed before it loadable. `best` holds the weights, random and training state of the best
epoch without the optimizer's variables, so a run keeps one full checkpoint (`last`) and one
of about a third of its size with Adam.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.core import selection
from tlkit.core.errors import RunError
from tlkit.core.fsutil import atomic_path, fsync_dir

CHECKPOINT_SCHEMA = 1
INCOMING, LAST, PREVIOUS, BEST = "incoming.h5", "last.h5", "previous.h5", "best.h5"
SEARCH = "search.h5"  # --freeze auto: the search's trained candidate, with its scores


def _numpy(variable: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable))


def random_state(model: Any) -> list[Any]:
    """The model's variables that are not weights: its seed generators' states."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def write_checkpoint(path: Path, model: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """One atomic file; `optimizer` may be None (nothing to resume but the weights)."""
    import h5py

    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["tlkit_checkpoint"] = CHECKPOINT_SCHEMA
        f.attrs["state"] = json.dumps(state)
        for group, values in (
            ("model", model.get_weights()),
            ("random", [_numpy(v) for v in random_state(model)]),
            (
                "optimizer",
                [_numpy(v) for v in optimizer.variables] if optimizer is not None else [],
            ),
        ):
            g = f.create_group(group)
            g.attrs["count"] = len(values)
            for i, value in enumerate(values):
                g.create_dataset(f"{i:05d}", data=value)


def read_state(path: Path) -> dict[str, Any] | None:
    """The training state in a checkpoint, or None when the file is missing or unreadable."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("tlkit_checkpoint") != CHECKPOINT_SCHEMA:
                return None
            state: dict[str, Any] = json.loads(f.attrs["state"])
            return state
    except (OSError, KeyError, ValueError):
        return None


def _arrays(f: Any, group: str) -> list[np.ndarray]:
    g = f[group]
    return [g[f"{i:05d}"][()] for i in range(int(g.attrs["count"]))]


def _assign(path: Path, what: str, variables: list[Any], values: list[np.ndarray]) -> None:
    shapes = [tuple(v.shape) for v in variables]
    saved = [tuple(v.shape) for v in values]
    if shapes != saved:
        raise RunError(
            f"{path}: its {what} has {len(saved)} arrays that do not match this "
            f"model's {len(shapes)}; it was written by a different model"
        )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def load_checkpoint(path: Path, model: Any, optimizer: Any = None) -> dict[str, Any]:
    """Restore the model (and the optimizer, built on its variables first) and return the state."""
    import h5py

    with h5py.File(path, "r") as f:
        state: dict[str, Any] = json.loads(f.attrs["state"])
        _assign(path, "model", model.weights, _arrays(f, "model"))
        if "random" in f:  # checkpoints written before tlkit kept it have none
            _assign(path, "random state", random_state(model), _arrays(f, "random"))
        if optimizer is not None:
            saved = _arrays(f, "optimizer")
            _assign(path, "optimizer state", optimizer.variables, saved)
    return state


def load_weights(path: Path, model: Any) -> None:
    """The model's weights alone (no random or optimizer state): what `set_weights` restores."""
    import h5py

    with h5py.File(path, "r") as f:
        _assign(path, "model", model.weights, _arrays(f, "model"))


def save_epoch(
    directory: Path, model: Any, optimizer: Any, state: dict[str, Any], improved: bool
) -> None:
    """Write this epoch's checkpoint; it becomes `last`, the old `last` becomes `previous`, and
    if it is the best so far, `best` gets its weights and state (no optimizer: nothing resumes
    from it, and Adam's moments would double its size). The order means every crash point
    leaves a complete set: each file is whole before it is renamed in, `best` before `last`."""
    directory.mkdir(parents=True, exist_ok=True)
    incoming = directory / INCOMING
    write_checkpoint(incoming, model, optimizer, state)
    if improved:
        write_checkpoint(directory / BEST, model, None, state)
    if (directory / LAST).exists():
        os.replace(directory / LAST, directory / PREVIOUS)
    os.replace(incoming, directory / LAST)
    fsync_dir(directory)


def latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The most advanced readable checkpoint: a half-written or damaged file is passed over."""
    found = []
    for name in (INCOMING, LAST, PREVIOUS):
        state = read_state(directory / name)
        if state is not None:
            found.append((state["progress"], directory / name, state))
    if not found:
        return None
    _, path, state = max(found, key=lambda t: t[0])
    return path, state


def restore(directory: Path, model: Any) -> tuple[Path, dict[str, Any]] | None:
    """Load the latest checkpoint into `model`; its state, with the best metric taken from
    best.h5 itself (a crash between writing `best` and `last` leaves best ahead of last), so
    a resumed run never replaces `best` with a worse model."""
    found = latest_checkpoint(directory)
    if found is None:
        return None
    path = found[0]
    state = load_checkpoint(path, model)
    on_disk = (read_state(directory / BEST) or {}).get("best")
    if on_disk and (state["best"] is None or selection.CRITERION.improves(on_disk, state["best"])):
        state["best"] = on_disk
    return path, state


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files a killed process left behind (they never replaced anything)."""
    for tmp in directory.glob(".*.tmp*"):
        with contextlib.suppress(OSError):
            tmp.unlink()
