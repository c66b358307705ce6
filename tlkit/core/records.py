"""What run.json, identity.json and every checkpoint carry, as typed records.

They stay JSON on disk, in the shape tlkit has always written (a run folder or an interrupted
run of an earlier tlkit still loads and resumes: tests/test_compat.py), and are TypedDicts in
memory, so that the type checker holds every reader and writer to the same keys. The file
each lives in has its own schema number (run.json: `RUN_SCHEMA`, core/runs.py; identity.json:
`IDENTITY_SCHEMA`, training/resume.py; a checkpoint's state: `SCHEMA`, training/state.py).
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class HistoryRow(TypedDict):
    """One validation check: a line of history.csv (the head probe's checks, the epochs)."""

    phase: str  # "head" | "fine-tune"
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    # the training steps' time waiting for input and in the model (training/input_wait.py):
    # epochs trained with fit() only
    input_seconds: NotRequired[float | None]
    model_seconds: NotRequired[float | None]
    input_share: NotRequired[float | None]


class Best(TypedDict):
    """The check whose weights the run saves (by the selection rule, core/selection.py)."""

    val_loss: float
    val_accuracy: float | None
    phase: str  # "head" | "fine-tune" | "freeze-search"
    epoch: int


class PhaseSummary(TypedDict):
    """A phase as run.json sums it up (`TrainingState.phase_summaries`)."""

    phase: str
    epochs_run: int
    best_epoch: int
    best_val_loss: float | None
    best_val_accuracy: float | None
    seconds: float
    early_stopped: bool
    estimated_seconds: float | None
    optimizer_steps: int


class HeadProbe(TypedDict):
    """How the head phase trained when it ran as a probe on pooled features."""

    views: int
    augment: str
    feature_rows: int
    steps: int
    feature_seconds: float


class Results(TypedDict, total=False):
    """run.json's `results` (every key written since the first release; an edited or hand-made
    record may lack them, so readers ask with `.get`)."""

    best: Best | None
    phases: list[PhaseSummary]
    head_probe: HeadProbe | None
    test: dict[str, Any] | None  # the saved model's single-crop test score, with a test split


class Found(TypedDict):
    """One `auto` search's outcome: the choice (an AugmentConfig's or a FreezePlan's dict), the
    candidates' scores, and for --freeze auto the plan the fine-tune phase trains."""

    chosen: dict[str, Any]
    scores: list[dict[str, Any]]
    fine_tune: NotRequired[dict[str, Any]]


class Searched(TypedDict, total=False):
    """What `--augment auto` / `--freeze auto` found (identity.json keeps it, so a resume reuses
    it rather than searching again)."""

    head_features: Found
    augment: Found
    freeze: Found


class WeightsRecord(TypedDict):
    """run.json's `weights`: where the backbone's starting weights came from."""

    source: str  # "imagenet" | "none" | "file" | "run" | ...
    path: str | None
    sha256: str | None


class FreezeRecord(TypedDict):
    """run.json's `freeze`: the freeze plan trained (models/freezing.py) and its search."""

    request: str
    n_frozen: int
    n_layers: int
    last_frozen: str | None
    search: NotRequired[list[dict[str, Any]] | None]
