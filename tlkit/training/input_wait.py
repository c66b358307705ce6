"""Where a training step's time goes: waiting for its batch, or in the model.

Each batch is stamped as the training loop takes it: a pass-through step after the pipeline's
prefetch buffer, which runs on the loop's own thread when the step asks for its batch (tf.data
is told neither to add a prefetch after it nor to run it in parallel). A step that finds its
batch ready gets the stamp at once; one that waits gets it when the batch is made. So for each
step, stamp - begin is the wait for input and end - stamp the model's time (forward, backward,
update).

Under a strategy that copies batches to its devices ahead of time (mirrored over several GPUs),
the stamp comes when the batch is copied, inside some other step: such steps are not counted.
Nor is the first step of each fit(), which also traces and compiles the training function.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import numpy as np


class InputClock:
    """The stamps of one run's training batches, and the time of each training step."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []  # appended by tf.data's thread: list.append is atomic
        self.steps: list[tuple[float, float]] = []  # (begin, end) of this epoch's steps

    def stamped(self, dataset: Any) -> Any:
        """`dataset` with a stamp as each batch is taken."""
        import tensorflow as tf

        def arrive(_: Any) -> np.int64:
            self.arrivals.append(time.perf_counter())
            return np.int64(0)

        def mark(inputs: Any, labels: Any, *rest: Any) -> Any:
            # Declared stateless, fed the labels (no constant to fold) and added to them (+0):
            # a stateful op would make TensorFlow's op determinism turn the pipeline's
            # parallel map sequential, and a stateless one nothing depends on is pruned.
            token = tf.numpy_function(arrive, [labels], tf.int64, stateful=False)
            token.set_shape(())
            return (inputs, labels + tf.cast(token, labels.dtype), *rest)

        options = tf.data.Options()  # the stamp must run when the loop takes the batch:
        options.experimental_optimization.inject_prefetch = False  # no buffer after it,
        options.experimental_optimization.map_parallelization = False  # nor ahead of it
        return dataset.map(mark).with_options(options)

    def epoch_figures(self) -> dict[str, float]:
        """Seconds of this epoch's steps spent waiting for input and in the model, and the
        input's share; empty when no step could be timed."""
        wait = model = 0.0
        for begin, end in self.steps:
            i = bisect.bisect_left(self.arrivals, begin)
            if i == len(self.arrivals) or self.arrivals[i] > end:
                continue  # stamped outside the step (a device prefetch): not counted
            wait += self.arrivals[i] - begin
            model += end - self.arrivals[i]
        if wait + model == 0:
            return {}
        return {
            "input_seconds": round(wait, 3),
            "model_seconds": round(model, 3),
            "input_share": round(wait / (wait + model), 3),
        }

    def callback(self) -> Any:
        """The Keras callback that times the steps; put it first, so others' work between
        steps is not counted as the model's."""
        import keras

        clock = self

        class StepClock(keras.callbacks.Callback):
            begin = 0.0
            traced = False  # the first step of a fit() traces the training function

            def on_train_begin(self, logs: Any = None) -> None:
                self.traced = False

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                clock.steps.clear()
                clock.arrivals.clear()  # every stamp falls inside a step

            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                self.begin = time.perf_counter()

            def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                if self.traced:
                    clock.steps.append((self.begin, time.perf_counter()))
                self.traced = True

        return StepClock()


def describe(figures: dict[str, float]) -> str:
    """One line for the log."""
    if not figures:
        return "input wait: not measured (batches are copied to the devices ahead of time)"
    share = figures["input_share"]
    line = (
        f"input wait {share:.0%} of the training steps' time "
        f"({figures['input_seconds']:.2f} s; the model {figures['model_seconds']:.2f} s)"
    )
    if share >= INPUT_BOUND_SHARE:
        line += (
            "; training waits for its input: `tlkit bench-input` measures what would help "
            "(more --workers, --resized-cache)"
        )
    return line


INPUT_BOUND_SHARE = 0.25  # above this, the log points at bench-input
