"""The training state every checkpoint carries: history rows, the best epoch, where each phase
stands and its early-stopping counters. Typed in memory; a plain dict in the checkpoint
(`as_dict` / `from_dict`), so a checkpoint stays JSON that any tlkit can read."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Any

from tlkit.core import selection
from tlkit.core.fsutil import atomic_write
from tlkit.core.records import Best, HeadProbe, HistoryRow, PhaseSummary
from tlkit.training.timing import duration

HISTORY_FIELDS = (
    "phase",
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "seconds",
    # the training steps' time waiting for input and in the model (tlkit.training.input_wait)
    "input_seconds",
    "model_seconds",
    "input_share",
)
SCHEMA = 1
# (phase, epochs, learning rate) of the head and fine-tune phases
Schedule = list[tuple[str, int, float]]


@dataclasses.dataclass
class TrainingState:
    """Updated in place by the epoch recorder and the head probe, saved with every epoch."""

    rows: list[HistoryRow] = dataclasses.field(default_factory=list)  # HISTORY_FIELDS
    best: Best | None = None
    phase_steps: dict[str, int] = dataclasses.field(default_factory=dict)  # optimizer steps
    progress: int = 0  # epochs finished over both phases: what a resumed run skips
    phase: str | None = None
    phase_index: int = -1
    phase_done: bool = True
    epoch: int = 0  # epochs finished in the current phase
    wait: int = 0  # epochs since the phase's best (early stopping)
    phase_best: float = math.inf
    resumed: list[str] = dataclasses.field(default_factory=list)  # when, ISO times
    head_probe: HeadProbe | None = None  # how the head phase trained, when a probe
    estimates: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainingState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def advance(self, row: HistoryRow, patience: int) -> tuple[bool, bool]:
        """Add an epoch's row: (stop early, best so far), by the selection criterion.
        `phase_best` is the phase's best rank (`Criterion.rank`), a number, so that the
        checkpoint stays plain JSON."""
        rank = selection.CRITERION.rank(row)
        if rank < self.phase_best:
            self.phase_best, self.wait = rank, 0
        else:
            self.wait += 1
        improved = self.best is None or selection.CRITERION.improves(row, self.best)
        if improved:
            self.best = {
                "val_loss": row.get("val_loss", math.inf),
                "val_accuracy": row.get("val_accuracy"),
                "phase": row["phase"],
                "epoch": row["epoch"],
            }
        self.rows.append(row)
        return self.wait >= patience, improved

    def rows_of(self, phase: str) -> list[HistoryRow]:
        return [r for r in self.rows if r["phase"] == phase]

    def phase_summaries(self, schedule: Schedule) -> list[PhaseSummary]:
        """Per phase, from the checkpointed history: the same whether or not the run was
        resumed."""
        out: list[PhaseSummary] = []
        for phase, epochs, _ in schedule:
            rows = self.rows_of(phase)
            if not rows:
                continue
            top = selection.CRITERION.best(rows) or rows[0]
            out.append(
                {
                    "phase": phase,
                    "epochs_run": len(rows),
                    "best_epoch": top["epoch"],
                    "best_val_loss": top.get("val_loss"),
                    "best_val_accuracy": top.get("val_accuracy"),
                    "seconds": round(sum(r["seconds"] for r in rows), 1),
                    "early_stopped": len(rows) < epochs,
                    "estimated_seconds": self.estimates.get(phase, {}).get("phase_seconds"),
                    "optimizer_steps": self.phase_steps[phase],
                }
            )
        return out

    def fine_tune_wasted(self) -> str | None:
        """A warning when fine-tuning ran yet never beat the head (or --freeze auto's searched
        stages): the saved model is that one, so its time bought nothing."""
        rows = self.rows_of("fine-tune")
        if not rows or self.best is None or self.best["phase"] == "fine-tune":
            return None
        seconds = sum(r["seconds"] for r in rows)
        if self.best["phase"] == "freeze-search":
            return (
                f"the whole network's fine-tune phase never beat the stage(s) --freeze auto's "
                f"search trained: {len(rows)} epochs, {duration(seconds)}; the model saved is "
                "the search's"
            )
        return (
            f"the fine-tune phase never beat the head: {len(rows)} epochs, "
            f"{duration(seconds)}, and the best ({selection.CRITERION.describe()}) stayed "
            f"head epoch {self.best['epoch']}'s, the model saved. --epochs 0 skips the phase; "
            "--freeze auto tries it on validation first and skips it when it does not pay"
        )


def write_history(path: Path, rows: list[HistoryRow]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue())
