"""How tlkit chooses on its validation split, in one place.

- `CRITERION`: what "best" means wherever a best is kept (the head's checks, the fine-tune's
  epochs, the run across phases and resumes, the freeze search's tails, the curves' mark): one
  history column and its direction, as Keras' ModelCheckpoint and timm's CheckpointSaver name
  them. `Keeper` is the one object that keeps a best with it.
- `one_se_choice`: the rule every `auto` chooses by (`--augment auto`, `--freeze auto`,
  `--multicrop auto`): Breiman's one-standard-error rule over per-image validation losses, so
  that noise on a small validation split does not pick a riskier setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

# what every history row and the run's stored best carry (tlkit.training.state)
MONITORS = ("val_loss", "val_accuracy")
Row = Mapping[str, Any]  # a history row or Keras logs: {"val_loss": ..., "val_accuracy": ...}
T = TypeVar("T")
R = TypeVar("R", bound=Row)


@dataclass(frozen=True)
class Criterion:
    """A validation metric (`monitor`, one of MONITORS) and whether lower or higher is better
    (`mode`). A row without a finite value of it ranks below every row that has one."""

    monitor: str = "val_loss"
    mode: str = "min"  # "min" | "max"

    def __post_init__(self) -> None:
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}. Received: {self.monitor!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'. Received: {self.mode!r}")

    def rank(self, row: Row | None) -> float:
        """Lower is better, for every mode: the metric, negated under "max"; +inf without it."""
        value = None if row is None else row.get(self.monitor)
        if value is None or not math.isfinite(float(value)):
            return math.inf
        return float(value) if self.mode == "min" else -float(value)

    def improves(self, row: Row | None, best: Row | None) -> bool:
        """Whether `row` is strictly better than `best` (None: nothing yet, which any finite
        row beats)."""
        return self.rank(row) < self.rank(best)

    def best(self, rows: Iterable[R]) -> R | None:
        """The best row (the first of equals), None for none."""
        return min(rows, key=self.rank, default=None)

    def best_index(self, rows: Sequence[Row]) -> int:
        return min(range(len(rows)), key=lambda i: self.rank(rows[i]))

    def describe(self) -> str:
        return f"{'lowest' if self.mode == 'min' else 'highest'} {self.monitor}"


# The one criterion: the lowest plain cross-entropy on the validation split (tlkit.training.optim
# keeps val_loss unsmoothed under label smoothing), which ranks by confidence as well as by
# top-1, where top-1 on a few dozen validation images ties often.
CRITERION = Criterion()


class Keeper(Generic[T]):
    """The best row offered so far (by CRITERION unless told), what was kept with it
    (weights), and the offers since it (for early stopping)."""

    def __init__(self, best: Row | None = None, criterion: Criterion | None = None) -> None:
        self.criterion = criterion or CRITERION  # looked up now: a test may swap CRITERION
        self.best, self.wait = best, 0
        self.kept: T | None = None

    def offer(self, row: Row, keep: Callable[[], T] | None = None) -> bool:
        """Take `row` (and `keep()`) if it is better than the best; True if it was."""
        if not self.criterion.improves(row, self.best):
            self.wait += 1
            return False
        self.best, self.wait = dict(row), 0
        self.kept = keep() if keep is not None else None
        return True


TIE = 1e-9  # mean per-image loss differences below this are float rounding, not a difference


def one_se_choice(losses: Sequence[np.ndarray]) -> tuple[int, list[float]]:
    """Breiman's one-standard-error rule over candidates ordered simplest first: the first
    whose per-image validation losses are within one standard error of the best's (paired
    differences), so that noise on a small validation split does not pick a riskier setting.
    (index chosen, each candidate's mean excess over the best in standard errors)."""
    means = [float(np.mean(x)) if np.all(np.isfinite(x)) else math.inf for x in losses]
    best = int(np.argmin(means))
    excess = []
    for x, m in zip(losses, means, strict=True):
        if not math.isfinite(m):
            excess.append(math.inf)
            continue
        d = x - losses[best]
        if abs(float(np.mean(d))) <= TIE:  # the same losses but for rounding: a tie
            excess.append(0.0)
            continue
        se = float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
        excess.append(float(np.mean(d) / se) if se > 0 else (0.0 if np.mean(d) <= 0 else math.inf))
    chosen = next(i for i, e in enumerate(excess) if e <= 1.0)
    return chosen, excess
