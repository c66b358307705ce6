"""Where a command runs: one device, several on this machine, or several machines.

tlkit does not distribute anything itself: it picks a `tf.distribute` strategy (MirroredStrategy
over this machine's GPUs, MultiWorkerMirroredStrategy over the machines named in `TF_CONFIG`)
and feeds it. Every global batch is split between the replicas by position (replica r of R takes
rows r, r+R, ...), and each worker decodes only its own replicas' rows, so the workers read
distinct parts of every epoch while the batch, its order and its augmentation stay those of a
one-device run.

`TLKIT_LOGICAL_CPUS=N` splits the CPU into N logical devices before TensorFlow starts: a way to
try `--strategy mirrored` on a machine without GPUs (the tests do).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkit.core.choices import STRATEGIES, check
from tlkit.core.errors import ConfigError


@dataclass(frozen=True)
class Share:
    """This process's part of every global batch: replica r of `replicas` takes rows r,
    r + replicas, ...; `local` are the replicas this process feeds, in the order it feeds them."""

    replicas: int = 1
    local: tuple[int, ...] = (0,)


WHOLE = Share()

log = logging.getLogger("tlkit")

LOGICAL_CPUS_ENV = "TLKIT_LOGICAL_CPUS"
NEEDS_TF_CONFIG = (
    "--strategy multiworker needs TF_CONFIG, naming every worker and this "
    'process\'s task; see README, "Several GPUs, several machines"'
)


@dataclass(frozen=True)
class ClusterSpec:
    """This process's place among the workers of `TF_CONFIG` (a chief counts as a worker)."""

    workers: int
    index: int  # 0 is the chief
    task: str  # e.g. "worker:1", as TF_CONFIG names it

    @property
    def is_chief(self) -> bool:
        return self.index == 0


def read_tf_config() -> ClusterSpec | None:
    """The cluster in `TF_CONFIG`, checked; None when the variable is unset or empty."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    fix = (
        'set TF_CONFIG to JSON like {"cluster": {"worker": ["host1:port", '
        '"host2:port"]}, "task": {"type": "worker", "index": 0}}'
    )
    try:
        config = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG: not valid JSON ({e}); {fix}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if (
        not isinstance(cluster, dict)
        or not isinstance(cluster.get("worker", []), list)
        or not isinstance(task, dict)
    ):
        raise ConfigError(
            f'TF_CONFIG: needs a "cluster" mapping and a "task". Received: {raw[:200]}; {fix}'
        )
    chiefs, workers = cluster.get("chief", []), cluster.get("worker", [])
    kind, index = task.get("type"), task.get("index")
    if (
        kind not in ("chief", "worker")
        or not isinstance(index, int)
        or not 0 <= index < len(chiefs if kind == "chief" else workers)
        or len(chiefs) > 1
    ):
        raise ConfigError(
            f"TF_CONFIG: task {json.dumps(task)} is not one of the cluster's "
            f"{len(chiefs)} chief and {len(workers)} worker entries (at most one "
            f"chief); {fix}"
        )
    position = index if kind == "chief" else len(chiefs) + index
    return ClusterSpec(workers=len(chiefs) + len(workers), index=position, task=f"{kind}:{index}")


def split_cpu() -> None:
    """Honour TLKIT_LOGICAL_CPUS: must run before TensorFlow initialises its devices."""
    raw = os.environ.get(LOGICAL_CPUS_ENV)
    if not raw:
        return
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(
            f"{LOGICAL_CPUS_ENV} must be a positive number of logical CPU "
            f"devices. Received: {raw!r}"
        )
    import tensorflow as tf

    n = int(raw)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)]
        )
    except RuntimeError:  # already initialised: fine if it was split the same way
        have = len(tf.config.list_logical_devices("CPU"))
        if have != n:
            raise ConfigError(
                f"{LOGICAL_CPUS_ENV}={n}, but TensorFlow already started with "
                f"{have} CPU device(s); set it before anything imports "
                "TensorFlow"
            ) from None


@dataclass(frozen=True)
class Placement:
    """A resolved strategy and this process's share of it."""

    strategy: Any  # tf.distribute.Strategy
    name: str  # default | mirrored | multiworker
    replicas: int  # in sync, over all workers
    local: tuple[int, ...]  # this worker's replica ids among the `replicas`
    workers: int = 1
    worker: int = 0

    @property
    def is_chief(self) -> bool:
        """Only the chief writes runs, checkpoints and reports."""
        return self.worker == 0

    def describe(self) -> str:
        if self.name == "default":
            return "default (one device)"
        where = f"{len(self.local)} device(s)"
        if self.workers > 1:
            where += f" on each of {self.workers} workers; this is worker {self.worker}" + (
                " (chief)" if self.is_chief else ""
            )
        return f"{self.name}: {self.replicas} replicas, {where}"

    @property
    def share(self) -> Share:
        return Share(self.replicas, self.local)

    def dataset(self, build: Callable[[Share], Any]) -> Any:
        """`build(share)` -> the per-replica batches this worker feeds, in the order of its
        replicas; handed to them as they are (the share is the sharding)."""
        if self.replicas == 1:
            return build(self.share)
        return self.strategy.distribute_datasets_from_function(lambda _: build(self.share))

    def check_same(self, what: str, value: str, fix: str) -> None:
        """Stop every worker with one clear line when `value` (a digest) differs between them:
        workers that disagree on their data or cache would train different models in lockstep."""
        if self.workers == 1:
            return
        import tensorflow as tf

        v = int(value[:6], 16)  # 24 bits: sums of squares stay exact in int64
        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant([v, v * v], tf.int64)
        )
        total, squares = (
            int(x) for x in np.asarray(self.strategy.reduce("SUM", per_replica, axis=None))
        )
        n = self.replicas
        if total * total != n * squares:  # not all equal (Cauchy-Schwarz)
            raise ConfigError(
                f"worker {self.worker}: the workers see different {what} (this "
                f"worker: {value[:12]}); {fix}"
            )

    def predictor(self, model: Any) -> Callable[[np.ndarray], np.ndarray]:
        """A batch -> the model's outputs, the batch split across every replica (of every
        worker) and the outputs gathered back in order on each worker."""
        if self.replicas == 1:
            return traced_predictor(model)
        import tensorflow as tf

        strategy, replicas = self.strategy, self.replicas

        @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]
        def step(values: Any) -> Any:
            out = strategy.run(lambda x: model(x, training=False), args=(values,))
            return strategy.gather(out, axis=0)

        def predict(x: np.ndarray) -> np.ndarray:
            n = len(x)
            per = -(-n // replicas)
            padded = np.concatenate([x, np.repeat(x[-1:], per * replicas - n, axis=0)])
            values = strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(
                    padded[
                        ctx.replica_id_in_sync_group * per : (ctx.replica_id_in_sync_group + 1)
                        * per
                    ]
                )
            )
            return np.asarray(step(values))[:n]

        return predict


def traced_predictor(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A batch -> the model's output through one tf.function traced once (`traced_outputs`)."""
    outputs = traced_outputs(model)

    def predict(x: np.ndarray) -> np.ndarray:
        return outputs(x)[0]

    predict.traces = outputs.traces  # type: ignore[attr-defined]
    return predict


def traced_outputs(model: Any) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A batch -> the model's outputs, as a list, through one tf.function traced once: the
    batch dimension (and any dimension the model leaves open) is unknown in its signature, so
    a short last batch, another view set or another split reuses the trace (`traces()` counts
    them). Keras' predict_on_batch traces again for each new batch shape, and an ensemble's
    many models then warn of retracing."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.input.shape[1:]), model.input.dtype)
    # a partial, not a lambda: TensorFlow counts traces per code object, so one lambda shared
    # by an ensemble's models would read as one function retraced and warn
    step = tf.function(functools.partial(model.__call__, training=False), input_signature=[spec])

    def predict(x: np.ndarray) -> list[np.ndarray]:
        out = step(x)
        return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]

    predict.traces = step.experimental_get_tracing_count  # type: ignore[attr-defined]
    return predict


def resolve_strategy(name: str, cluster: ClusterSpec | None) -> str:
    """auto: several workers in TF_CONFIG -> multiworker; several GPUs -> mirrored; else default."""
    check("--strategy", name, STRATEGIES)
    if name != "auto":
        return name
    if cluster is not None and cluster.workers > 1:
        return "multiworker"
    import tensorflow as tf

    return "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "default"


def make_placement(name: str = "auto") -> Placement:
    """Create the strategy; call it before any other TensorFlow work (collective ops and
    logical devices can only be set up before TensorFlow starts)."""
    cluster = read_tf_config()
    resolved = resolve_strategy(name, cluster)
    import tensorflow as tf

    if resolved == "default":
        return Placement(tf.distribute.get_strategy(), "default", 1, (0,))
    if resolved == "mirrored":
        split_cpu()
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
        n = strategy.num_replicas_in_sync
        if n == 1:
            log.warning(
                "--strategy mirrored found one device (%s): training runs as on one device",
                devices[0].name,
            )
        return Placement(strategy, "mirrored", n, tuple(range(n)))
    if cluster is None:
        raise ConfigError(NEEDS_TF_CONFIG)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _fix_keras_multiworker()
    n = strategy.num_replicas_in_sync
    per_worker = n // cluster.workers
    first = cluster.index * per_worker
    return Placement(
        strategy,
        "multiworker",
        n,
        tuple(range(first, first + per_worker)),
        cluster.workers,
        cluster.index,
    )


# The Keras releases whose private trainer internals `_fix_keras_multiworker` was checked
# against (major, minor), and the names it replaces there. tests/test_distribute.py fails when
# the installed Keras leaves this range or renames them: check the patch, then widen the range.
KERAS_CHECKED = ((3, 14), (3, 15))
PATCHED = (
    "reduce_per_replica",
    "_collective_all_reduce_multi_worker",
    "TensorFlowTrainer._maybe_symbolic_build",
)


def keras_internals_match() -> str | None:
    """None when the installed Keras is one the patch was checked on and still has what it
    replaces; else what differs."""
    import keras
    from keras.src.backend.tensorflow import trainer

    version = tuple(int(x) for x in keras.__version__.split(".")[:2])
    if not KERAS_CHECKED[0] <= version <= KERAS_CHECKED[1]:
        return (
            f"Keras {keras.__version__} is outside the checked "
            f"{'.'.join(map(str, KERAS_CHECKED[0]))}-{'.'.join(map(str, KERAS_CHECKED[1]))}"
        )
    for name in PATCHED:
        owner = trainer
        for part in name.split("."):
            owner = getattr(owner, part, None)
        if owner is None:
            return f"Keras {keras.__version__} has no keras.src.backend.tensorflow.trainer.{name}"
    return None


def _fix_keras_multiworker() -> None:
    """Keras 3's `fit` fails under MultiWorkerMirroredStrategy (keras-team/keras#20585, open in
    Keras 3.15): it all-reduces the first input batch (uint8 images included) to build the
    model, and averages the per-replica scalar metrics with `axis=0`. Two narrow corrections,
    applied only when a multiworker strategy is made: build from this worker's own batch, and
    average scalars across replicas with `axis=None`."""
    import tensorflow as tf
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    differs = keras_internals_match()
    if differs is not None:
        raise ConfigError(
            f"--strategy multiworker needs tlkit's fix of keras-team/keras#20585, "
            f"which patches Keras internals, and {differs}; install a checked "
            "Keras (pip install 'keras>=3.14,<3.16') or use --strategy mirrored"
        )
    if getattr(trainer, "_tlkit_multiworker_fix", False):
        return
    is_multiworker = trainer._collective_all_reduce_multi_worker
    original_reduce = trainer.reduce_per_replica
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction in ("auto", "mean") and is_multiworker(strategy):
            return tree.map_structure(
                lambda v: (
                    strategy.reduce("MEAN", v, axis=None)
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v
                ),
                values,
            )
        return original_reduce(values, strategy, reduction)

    def maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self.distribute_strategy
        if iterator is not None and is_multiworker(strategy):
            for _, _, it in iterator:
                data_batch = tree.map_structure(
                    lambda v: (
                        strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues)
                        else v
                    ),
                    next(it),
                )
                break
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    trainer.reduce_per_replica = reduce_per_replica
    trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build
    trainer._tlkit_multiworker_fix = True
