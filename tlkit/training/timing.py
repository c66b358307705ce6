"""How long a phase will take, said before it runs: the head phase from the measured forward
pass, the fine-tune phase from its own first training steps."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("tlkit")

# Training steps timed at the start of a phase. The first traces the graph, and the next few
# find batches the input pipeline prefetched meanwhile, which makes them look cheap.
SKIPPED_STEPS, TIMED_STEPS = 3, 8


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def log_estimate(per_image: float, head_images: int, n_train: int, epochs: int) -> None:
    """The head phase's time from the measured forward pass, said before it runs; the fine-tune
    phase is timed on its own first training steps (`step_timer`), since what a step costs
    depends on the freeze point, the cache and the input pipeline, not only on the model."""
    later = (
        f"; the fine-tune phase ({epochs} epoch(s) of {n_train} images) is timed on its "
        "first training steps"
        if epochs
        else ""
    )
    log.info(
        "estimate from the first batches (%.1f ms per image through the model): head phase "
        "about %s (%d forward passes)%s.",
        1000 * per_image,
        duration(per_image * head_images),
        head_images,
        later,
    )


def _say(
    phase: str,
    estimate: dict[str, Any],
    count: int,
    steps: int,
    val_seconds: float | None,
    epochs: int,
) -> None:
    """The fine-tune phase's estimate (`step_timer`'s record of it), with what makes a long one
    shorter."""
    step, epoch = estimate["step_seconds"], estimate["epoch_seconds"]
    total = estimate["phase_seconds"]
    advice = ""
    if total > 1800:
        advice = (
            " That is long: --freeze all (head only) or a higher --freeze, a "
            "smaller --input-size, fewer --epochs or a GPU make it shorter."
        )
    val = (
        f" and a validation pass of about {duration(val_seconds)}"
        if val_seconds is not None
        else ", plus validation"
    )
    log.info(
        "phase %s: %.0f ms per training step (timed over %d step(s)): %d steps%s "
        "an epoch, about %s; up to about %s for %d epoch(s), early stopping may "
        "end it sooner.%s",
        phase,
        1000 * step,
        count,
        steps,
        val,
        duration(epoch),
        duration(total),
        epochs,
        advice,
    )


def step_timer(
    phase: str,
    epochs: int,
    initial: int,
    steps: int,
    val_seconds: float | None,
    estimates: dict[str, dict[str, Any]],
) -> Any:
    """Times real training steps at the start of a fit() phase and says how long the phase
    will take: steps x epochs, plus the validation pass. Recorded in `estimates` (the training
    state's) so run.json shows the estimate beside the measured time."""
    import keras

    warm = min(SKIPPED_STEPS, steps - 1) if steps > 4 else min(1, steps - 1)
    count = max(1, min(TIMED_STEPS, steps - warm))

    class StepTimer(keras.callbacks.Callback):
        start: float | None = None
        first: float | None = None  # when the first step began: its tracing is paid once
        done = False

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if self.first is None:
                self.first = time.perf_counter()
            if not self.done and batch == warm and self.start is None:
                self.start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if self.done or self.start is None or batch < warm + count - 1:
                return
            self.done = True
            step = (time.perf_counter() - self.start) / count
            epoch = step * steps + (val_seconds or 0.0)
            first = self.start if self.first is None else self.first  # set by then
            tracing = max(0.0, (self.start - first) - warm * step)
            total = epoch * (epochs - initial) + tracing
            estimates[phase] = {
                "step_seconds": round(step, 4),
                "epoch_seconds": round(epoch, 3),
                "phase_seconds": round(total, 2),
                "validation_included": val_seconds is not None,
            }
            _say(phase, estimates[phase], count, steps, val_seconds, epochs - initial)

    return StepTimer()
