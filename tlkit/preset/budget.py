"""What `--preset best` can afford: the time limit, each candidate's cost measured here, and
which candidates fit.

A candidate's cost is estimated from rates measured on this machine before anything trains:
each backbone's forward pass and training step per image, and the seconds it takes to build.
The estimate is then corrected as candidates finish (the ratio of the seconds they took to
what was estimated), so the tail of the plan is priced by what the head of it really cost.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkit.core.errors import ConfigError

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")
MEASURE_BATCH = 8  # images a timed batch: enough to time, small enough for any machine
RUN_OVERHEAD_S = 10.0  # a run's fixed seconds beyond two model builds: records, figures, save
VIEWS = 10  # the largest crop set the one model's views may be chosen among


def parse_duration(text: str, flag: str = "--time-limit") -> float:
    """Seconds from `20m`, `1h30m`, `90s`, `1.5h`."""
    found = _DURATION.fullmatch(text.strip().lower()) if text else None
    if not text or found is None or not any(found.groups()):
        raise ConfigError(
            f"{flag} must be a duration with its unit, such as 20m, 1h30m or 90s. "
            f"Received: {text!r}"
        )
    hours, minutes, seconds = (float(g) if g else 0.0 for g in found.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"{flag} must be longer than 0. Received: {text!r}")
    return total


def minutes(seconds: float) -> str:
    """`17 min`, `40 s`: a duration as the estimate and the leaderboard say it."""
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass(frozen=True)
class Rates:
    """One backbone at its size, measured here: seconds to build it, and per image its
    forward pass and its training step (everything trainable: the dearest fine-tune)."""

    build_s: float
    forward_s: float
    train_s: float

    def as_dict(self) -> dict[str, float]:
        return {"build_s": self.build_s, "forward_s": self.forward_s, "train_s": self.train_s}


def measure(backbone: str, size: int, num_classes: int) -> Rates:
    """Rates of the tlkit classifier on `backbone` (random weights: the architecture sets the
    time), a traced call first, then one timed batch each way."""
    import keras

    from tlkit.models.backbones import get_backbone
    from tlkit.models.model import build_classifier
    from tlkit.training.throughput import timed_train_steps

    spec = get_backbone(backbone)
    keras.backend.clear_session(free_memory=False)
    start = time.perf_counter()
    model = build_classifier(spec, spec.build(size), num_classes, size)
    build = time.perf_counter() - start
    x = np.zeros((MEASURE_BATCH, size, size, 3), np.uint8)
    y = np.arange(MEASURE_BATCH) % num_classes
    model.predict_on_batch(x)  # traced
    start = time.perf_counter()
    model.predict_on_batch(x)
    forward = (time.perf_counter() - start) / MEASURE_BATCH
    model.compile(keras.optimizers.Adam(1e-5), "sparse_categorical_crossentropy")
    timed_train_steps(model, x, y, MEASURE_BATCH, 1)  # traced
    train = timed_train_steps(model, x, y, MEASURE_BATCH, 1) / MEASURE_BATCH
    keras.backend.clear_session(free_memory=False)
    return Rates(build, forward, train)


@dataclass(frozen=True)
class Images:
    """How many images each split holds: what every pass over them costs."""

    train: int
    val: int
    test: int


def head_seconds(rates: Rates, images: Images) -> float:
    """A head-only run: build, one pass over train and val (the head's features, the probes),
    the saved model's validation and test scores, the records."""
    passes = images.train + 2 * images.val + images.test
    return 2 * rates.build_s + passes * rates.forward_s + RUN_OVERHEAD_S


def fine_tune_seconds(rates: Rates, images: Images, epochs: int) -> float:
    """A fine-tune run: its head phase, then `epochs` of training steps and a validation pass
    each (an upper bound: early stopping often ends it sooner)."""
    epoch = images.train * rates.train_s + images.val * rates.forward_s
    return head_seconds(rates, images) + epochs * epoch


def share(rates: Rates, images: Images) -> float:
    """One member's part of the step after the candidates: loaded, its validation
    probabilities, the one model's validation check and its single-crop validation and test
    scores (three validation passes and a test pass through it)."""
    return rates.build_s + (3 * images.val + images.test) * rates.forward_s


def views_seconds(rates: list[Rates], images: Images) -> float:
    """The one model's test-time views scored on the validation split: up to 10 crops each."""
    return VIEWS * images.val * sum(r.forward_s for r in rates)


def fits(
    estimates: list[tuple[str, float]], budget: float
) -> tuple[list[str], list[tuple[str, float]]]:
    """(the candidates that fit, in order; those left out with their estimates): each is taken
    in priority order when its estimate still fits what the ones before it left."""
    kept, left, spent = [], [], 0.0
    for name, seconds in estimates:
        if spent + seconds <= budget:
            kept.append(name)
            spent += seconds
        else:
            left.append((name, seconds))
    return kept, left


class Clock:
    """The budget as the run spends it: seconds used (this process's and earlier ones', for a
    resumed run), and the correction the candidates so far say the estimates need."""

    def __init__(self, limit_s: float, spent_before: float = 0.0, ratios: Any = ()):
        self.limit_s, self.spent_before = limit_s, spent_before
        self.started = time.monotonic()
        self.ratios: list[float] = list(ratios)

    @property
    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    @property
    def left(self) -> float:
        return self.limit_s - self.spent

    def correction(self) -> float:
        """How far the finished candidates ran from their estimates (1 before any): the
        median ratio, never below a half (a fast first run must not make the rest look free)."""
        return max(0.5, float(np.median(self.ratios))) if self.ratios else 1.0

    def record(self, estimated: float, took: float) -> None:
        if estimated > 0:
            self.ratios.append(took / estimated)
