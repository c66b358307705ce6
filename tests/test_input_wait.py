"""Where a training step's time goes: the input wait of each epoch, measured inside fit()."""

from __future__ import annotations

import time

import numpy as np

from tlkit.training.input_wait import InputClock, describe


def fit(slow_input: bool, slow_model: bool) -> list[dict[str, float]]:
    """Three epochs of 6 steps: a pipeline that sleeps 60 ms a batch (2 workers: 30 ms a step)
    against a model of 1 or 6 convolutions."""
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x, y = rng.random((8, 32, 32, 3)).astype("float32"), np.zeros(8, "int32")

    def make(_: np.int64) -> tuple[np.ndarray, np.ndarray]:
        if slow_input:
            time.sleep(0.06)
        return x, y

    ds = (
        tf.data.Dataset.range(100)
        .map(
            lambda i: tf.numpy_function(make, [i], (tf.float32, tf.int32)),
            num_parallel_calls=2,
        )
        .map(lambda a, b: (tf.ensure_shape(a, x.shape), tf.ensure_shape(b, y.shape)))
        .prefetch(2)
    )
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for _ in range(6 if slow_model else 1):
        h = keras.layers.Conv2D(64 if slow_model else 4, 3, padding="same")(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clock, figures = InputClock(), []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: object = None) -> None:
            figures.append(clock.epoch_figures())

    model.fit(
        clock.stamped(ds),
        epochs=3,
        steps_per_epoch=6,
        callbacks=[clock.callback(), Record()],
        verbose=0,
        shuffle=False,
    )
    return figures


def test_a_slow_pipeline_shows_as_input_wait_and_a_slow_model_does_not():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()  # as finetune runs on a CPU
    starved = fit(slow_input=True, slow_model=False)
    busy = fit(slow_input=False, slow_model=True)
    for figures in starved[1:]:  # the first epoch also starts the pipeline's threads
        assert figures["input_share"] > 0.6, starved
    for figures in busy:
        assert figures["input_share"] < 0.3, busy
        assert figures["model_seconds"] > figures["input_seconds"]
    assert "training waits for its input" in describe(starved[-1])
    assert "waits" not in describe(busy[-1])


def test_the_stamp_keeps_the_pipeline_parallel_under_op_determinism():
    """A stateful stamp would make TensorFlow's op determinism run the pipeline's parallel map
    one batch at a time (measured: twice the time); the stamp is stateless, and still runs
    once per batch taken."""
    import threading

    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    lock, active, peak = threading.Lock(), [0], [0]

    def work(i: np.int64) -> np.int64:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return i

    def batch(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        value = tf.numpy_function(work, [i], tf.int64, stateful=False)
        value.set_shape(())
        return tf.fill([2, 2], value), tf.fill([2], value)

    clock = InputClock()
    stamped = clock.stamped(tf.data.Dataset.range(8).map(batch, num_parallel_calls=2))
    labels = [b.numpy().tolist() for _, b in stamped]
    assert labels == [[i, i] for i in range(8)] and len(clock.arrivals) == 8
    assert peak[0] == 2  # two batches made at once
