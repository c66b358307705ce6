"""tlkit's speed figures, one JSON object per line on stdout.

    python benchmarks/run.py            # full pass
    python benchmarks/run.py --quick    # fewer steps and images
    python benchmarks/run.py --smoke    # every group once at tiny sizes on the test backbone
                                        # (tests/test_benchmarks.py runs it: figures exist)

Figures compared with each other (frozen vs unfrozen) are measured in the same process, one
after the other, since these machines are noisy; quote ratios rather than absolute numbers.

- cli_help_seconds: wall time of `tlkit --help` in a fresh interpreter (median of 5). Goal < 1 s.
- train_images_per_s_resnet50_224_{frozen,unfrozen}: optimizer steps of the tlkit classifier
  (uint8 input, preprocessing layer, ResNet50 with weights none, pooled softmax head) on batches
  held in memory, so the figure is the model's training speed, not the input pipeline's.
  frozen = whole backbone frozen (the head phase); unfrozen = `--freeze 0` (BatchNorm kept in
  inference mode, the default). Steady state: the first steps (graph build) are not timed.
- train_images_per_s_efficientnet_lite0_224_{frozen,unfrozen}, and
  train_speedup_efficientnet_lite0_over_resnet50_224_unfrozen: the same for tlkit's default
  backbone, in the same process (why it is the default on a CPU).

Input pipeline, on 256 generated 500x375 JPEG photos (smooth random scenes), alexnet preset
(shorter side 256, random 224 crop, mirror, PCA colour), decode included unless said otherwise:
- pca_dataset_shift_speedup_vs_fancypca_per_image: two algorithms, not one implemented twice:
  tlkit's AlexNet colour shift (the PCA fitted once on the dataset) against albumentations'
  FancyPCA, which fits a PCA on every image; each called directly (`t(image=...)`, the same
  albumentations call path) on the same 224x224 images. What choosing the dataset-level
  algorithm saves. Goal >= 50.
- pca_speedup_vs_numpy_same_shift: like with like: the same dataset-level shift, tlkit's
  transform against the plain numpy a user would write (the shift P diag(lambda) alpha, added in
  float, clipped, back to uint8), on the same images. Goal >= 1: not slower than the obvious.
- aug_overhead_ratio: tlkit pipeline (tf.data, 1 worker) images/s / a plain Python loop of
  decode + albumentations Compose of the same transforms (resized with the same OpenCV area
  filter). Goal >= 0.5.
- aug_scaling_efficiency: pipeline images/s with N workers / (N x with 1), N = all cores.
  Goal >= 0.6.
- pipeline_{tfdata_threads,grain_processes}_{1,N}_images_per_s: the same sample function under
  tf.data (thread pool) and grain (worker processes, `pip install grain`), which is how the
  mechanism was chosen (see tlkit/data/pipeline.py).
- input_headroom: pipeline images/s (N workers) / train_images_per_s_resnet50_224_unfrozen.
  Goal on an accelerator >= 1.2; on a CPU-only machine it only says the CPU trains slowly.

Big photos (`--only photos`): reduced JPEG decode and the resized-image store, figures
described in benchmarks/photos.py (decode_eval_images_per_s_*, reduced_decode_speedup_*,
reduced_decode_parity_*, store_parity_*, epoch_images_per_s_jpeg_*, store_epoch_speedup_jpeg,
store_build_images_per_s, store_kb_per_image, pipeline_peak_rss_mb_4_workers,
pipeline_rss_growth_4_workers).

Evaluation's memory (`--only eval_memory`): peak RSS of fresh `tlkit eval` processes against plain
Keras loading model.keras and predicting, on the quickstart's run (EfficientNet-Lite0) and data/,
figures described in benchmarks/eval_memory.py: eval_memory_keras_peak_mb,
eval_memory_{single,multicrop}_peak_mb, eval_memory_single_over_keras (goal <= 1.3),
eval_memory_multicrop_over_keras (goal <= 1.6) and eval_memory_{single,multicrop}_growth_4x
(at 4x the images, goal <= 1.1).

Feature cache (ResNet50, 224 px, --freeze all, weights none, 512 generated JPEGs, no
augmentation, batch 32; epoch times are the second epoch, after graph tracing):
- cache_epoch_speedup: live epoch (frozen trunk computed every step) / epoch from the cache.
  Goal >= 50 on CPU.
- cache_build_ratio: time to build the cache (train split) / one live epoch. Goal <= 1.3.
- eval_rss_growth: peak RSS of a fresh process evaluating 4,000 images / 1,000 images with
  `--multicrop multiscale` (30 views) on a 1,000-class run (the test backbone at 32 px, head
  trained one epoch): what evaluation keeps per image must not grow with views x classes.
  Goal <= 1.2.
- cache_rss_growth: peak RSS of a process training one epoch from a cache of 2,000 images / of
  500 (each row 7x7x2048 float16, 200 KB, as ResNet50 at 224 gives; these caches are written by
  the same build_cache with a cheap stand-in trunk, since only the reader is measured).
  Goal <= 1.2.

Evaluation (ResNet50 at 224, weights none, classifier for 4 classes, 64 generated JPEGs, batch
16, after one warm-up pass):
- multicrop10_cost_ratio: time of the 10-crop evaluation pass / the single-crop pass, same model
  and images (decode included). Goal <= 10, aim <= 8.
- multicrop_dense_cost_ratio: dense evaluation (the whole 500x375 image resized to shorter side
  256 through the fully convolutional model, one pass, as for a model trained without
  mirroring) / the single-crop pass. Its pixels are 1.74x the crop's. Goal <= 2.
  multicrop_dense_mirrored_cost_ratio: the same with the mirrored pass (a model that mirrored).
- ensemble_shared_trunk_ratio: a 3-member ensemble whose members share a frozen trunk
  (--freeze all, same initial weights; each has its own head) / 3 x one member. Goal well under 1.
- eval_retracing_warnings_{traced,predict_on_batch}: TensorFlow "triggered tf.function
  retracing" warnings while a fresh 3-member ensemble evaluates 1, 10 and again 1 view(s) of
  images whose last batch is short, with tlkit's one traced function per model vs Keras'
  predict_on_batch; eval_traced_speedup: predict_on_batch time / traced time for that work,
  tracing included. Goal: 0 warnings traced.

Reliability (512 generated 500x375 JPEGs; all cores):
- audit_overhead_ratio: first `check-data` pass (decode + probe + sha256 + memo write) / the
  same files decoded by decode_image on the same thread count; medians of 3 interleaved
  rounds. Goal <= 1.3.
- audit_memo_speedup: first pass / second pass over unchanged files (answered from the memo).
  Goal >= 50 ("instant").
- data_identity_{cold,warm}_seconds_{photos,digits}: what the data's identity (content sha256
  per file, from the data check, fingerprinted as the cache key and the resume check use it)
  costs on the 512 photos and on the repository's data/ (1,797 digits): cold = the first check
  (every file read, decoded and hashed), warm = the next one (a stat per file against the memo,
  keyed by size, mtime, inode and ctime), each with the fingerprint itself.
- checkpoint_save_seconds_resnet50 / checkpoint_restore_seconds_resnet50: one epoch checkpoint
  of the whole classifier with its Adam state (every layer trainable, 224 px), written and
  rotated as finetune does after every epoch, and loaded back as --resume does.

Distribution (`--only distribute`; each figure from fresh processes, since a strategy must be set
up before TensorFlow starts). Training: the tlkit classifier (ResNet50, weights none, 224 px on
GPUs, 96 px on a CPU-only machine, whole backbone trainable) fitted by Keras on uint8 batches
held in memory, fed through tlkit's per-replica shares (pipeline.run_jobs); global batch 32;
images/s over the timed steps after a warm-up fit.
- dist_train_images_per_s_{default,mirrored}: one device, and MirroredStrategy over every GPU
  (on a CPU-only machine: over 2 logical CPUs, TLKIT_LOGICAL_CPUS=2, which share the same cores,
  so the ratio there is the strategy's overhead, not a speed-up).
- dist_mirrored_speedup: mirrored / default, same model and batch, back to back.
- dist_multiworker_2proc_speedup: two MultiWorkerMirroredStrategy processes on localhost
  (TF_CONFIG), global images/s / default. On one machine they share its cores and devices.
- precompute_sharded_2proc_ratio: wall time of two `precompute-features --num-shards 2` processes
  started together (the last one merges) / one unsharded process, 512 generated JPEGs, ResNet50
  at 96 px, --freeze all. On one machine: the cost of sharding and merging, not a speed-up.
- cache_merge_mb_per_s: `tlkit cache merge` of the parts of a 2-shard cache (re-read, checked,
  written), MB of features per second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Scale:
    """How big each group runs: the full pass, --quick, or --smoke (tiny, test backbone)."""

    backbone: str = "resnet50"
    default_backbone: str = "efficientnet_lite0"  # tlkit's default, against resnet50
    size: int = 224
    photos: int = 256  # pipeline figures
    batches: int = 16  # pipeline batches timed
    cache_images: int = 512
    rss_images: tuple[int, int] = (500, 2000)
    eval_images: int = 64
    audit_images: int = 512
    dist_size: int = 96  # on a CPU-only machine; 224 on GPUs
    dist_steps: int = 8
    merge_images: int = 1000
    eval_rss: tuple[int, int, int] = (1000, 1000, 4000)  # classes; images, 4x the images
    digits: bool = True  # data identity on the repository's data/ as well


FULL = Scale()
QUICK = Scale(
    photos=256,
    batches=4,
    cache_images=128,
    rss_images=(125, 500),
    eval_images=32,
    audit_images=128,
    dist_steps=4,
    merge_images=250,
    eval_rss=(1000, 250, 1000),
)
SMOKE = Scale(
    backbone="test_resnet",
    default_backbone="test_resnet",
    size=32,
    photos=32,
    batches=2,
    cache_images=32,
    rss_images=(40, 80),
    eval_images=8,
    audit_images=16,
    dist_size=32,
    dist_steps=2,
    merge_images=20,
    eval_rss=(20, 10, 40),
    digits=False,
)
S = FULL  # set by main()


def emit(name: str, value: float, unit: str, **extra: object) -> None:
    print(json.dumps({"name": name, "value": round(value, 4), "unit": unit, **extra}), flush=True)


def device() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        kind = f"{len(gpus)} GPU" if gpus else f"CPU x{os.cpu_count()}"
    elif backend == "jax":
        import jax

        kind = str(jax.devices()[0].device_kind)
    else:
        kind = "unknown"
    return f"{kind} ({platform.machine()}), keras {keras.__version__} on {backend}"


def cli_help_seconds(repeats: int = 5) -> None:
    cmd = [sys.executable, "-c", "from tlkit.cli import main; main()", "--help"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    emit("cli_help_seconds", statistics.median(times), "s", repeats=repeats, goal="< 1")


def bad_input_seconds(repeats: int = 5) -> None:
    """How long a mistake takes to get its line: each case a fresh `tlkit finetune` process,
    offline, the slowest case's median. A missing folder with resnet50 (whose weights are
    missing offline too), an impossible --freeze, an empty folder: none may import TensorFlow."""
    with tempfile.TemporaryDirectory() as tmp:
        photo_folder(Path(tmp) / "good", 8)
        (Path(tmp) / "empty").mkdir()
        cases = {
            "missing folder": (["no-such-folder", "--backbone", "resnet50"], 3),
            "freeze 9999": (["good", "--freeze", "9999"], 2),
            "empty folder": (["empty"], 3),
        }
        medians = {}
        for name, (args, code) in cases.items():
            cmd = [sys.executable, "-m", "tlkit", "finetune", *args]
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                done = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                    env={**os.environ, "TLKIT_OFFLINE": "1"},
                )
                times.append(time.perf_counter() - start)
                if done.returncode != code:
                    raise RuntimeError(
                        f"{name}: exit {done.returncode}, not {code}: {done.stderr.strip()}"
                    )
            medians[name] = statistics.median(times)
    worst = max(medians, key=medians.get)
    emit(
        "bad_input_seconds",
        medians[worst],
        "s",
        case=worst,
        repeats=repeats,
        goal="< 1",
        **{k.replace(" ", "_"): round(v, 3) for k, v in medians.items()},
    )


def train_throughput(size: int, batch: int, warmup: int, steps: int) -> dict[str, float]:
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.throughput import model_images_per_s

    results = {}
    for mode, freeze in (("frozen", "all"), ("unfrozen", "0")):
        results[mode] = model_images_per_s(
            S.backbone, size, FreezeRequest(count=freeze), batch, warmup=warmup, steps=steps
        )
        emit(
            f"train_images_per_s_{S.backbone}_{size}_{mode}",
            results[mode],
            "images/s",
            batch=batch,
            steps=steps,
            device=device(),
        )
    emit(
        f"train_speedup_{S.backbone}_{size}_frozen_over_unfrozen",
        results["frozen"] / results["unfrozen"],
        "x",
        note="same process, back to back",
    )
    default = {}
    for mode, freeze in (("frozen", "all"), ("unfrozen", "0")):
        default[mode] = model_images_per_s(
            S.default_backbone, size, FreezeRequest(count=freeze), batch, warmup=warmup, steps=steps
        )
        emit(
            f"train_images_per_s_{S.default_backbone}_{size}_{mode}",
            default[mode],
            "images/s",
            batch=batch,
            steps=steps,
            device=device(),
        )
    emit(
        f"train_speedup_{S.default_backbone}_over_{S.backbone}_{size}_unfrozen",
        default["unfrozen"] / results["unfrozen"],
        "x",
        note="the default backbone against resnet50, same process",
    )
    return results


def photo_folder(root: Path, n: int) -> Path:
    """Smooth random scenes saved as 500x375 JPEGs (what a photo decoder really has to do)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC)
        noisy = np.clip(
            np.asarray(img, np.int16) + rng.integers(-12, 13, (375, 500, 3)), 0, 255
        ).astype(np.uint8)
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(root / f"c{i % 4}" / f"{i}.jpg", quality=90)
    return root


def images_per_s(fn: object, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def pca_speedup(examples: list, quick: bool) -> None:
    import albumentations as A
    import numpy as np

    from tlkit.data.augment import _pca_transform_class
    from tlkit.data.decode import decode_image
    from tlkit.data.pipeline import dataset_color_pca

    pca = dataset_color_pca(examples)
    images = [np.ascontiguousarray(decode_image(e.path)[:224, :224]) for e in examples[:64]]
    ours = _pca_transform_class()(pca, 0.1)
    fancy = A.FancyPCA(alpha=0.1, p=1.0)
    ours.set_random_seed(0)
    fancy.set_random_seed(0)
    basis = 255.0 * np.asarray(pca.eigvecs) * np.asarray(pca.eigvals)[None, :]
    rng = np.random.default_rng(0)

    def plain(image: np.ndarray) -> np.ndarray:  # the same shift, as numpy code
        shift = basis @ rng.normal(0.0, 0.1, 3)
        return np.clip(image + shift, 0, 255).astype(np.uint8)

    reps = 1 if quick else 4
    n = len(images) * reps
    images_per_s(lambda i: ours(image=images[i % len(images)]), 16)  # warm-up
    fancy_ips = images_per_s(lambda i: fancy(image=images[i % len(images)]), n)
    ours_ips = images_per_s(lambda i: ours(image=images[i % len(images)]), n * 10)
    plain_ips = images_per_s(lambda i: plain(images[i % len(images)]), n * 10)
    emit("pca_images_per_s_tlkit", ours_ips, "images/s", size=224)
    emit("pca_images_per_s_fancypca", fancy_ips, "images/s", size=224)
    emit("pca_images_per_s_numpy_same_shift", plain_ips, "images/s", size=224)
    emit(
        "pca_dataset_shift_speedup_vs_fancypca_per_image",
        ours_ips / fancy_ips,
        "x",
        goal=">= 50",
        note="two algorithms: one PCA per dataset against one per image",
    )
    emit("pca_speedup_vs_numpy_same_shift", ours_ips / plain_ips, "x", goal=">= 1")


def pipeline_figures(examples: list, model_ips: float) -> None:
    import albumentations as A
    import cv2

    from tlkit.data.augment import _pca_transform_class, resolve_augment
    from tlkit.data.decode import decode_image
    from tlkit.data.pipeline import TrainSampleLoader, build_train_transform
    from tlkit.training.throughput import pipeline_images_per_s

    cores = os.cpu_count() or 1
    transform = build_train_transform(resolve_augment("alexnet"), examples, S.size, 0.875)
    plain = A.Compose(
        [
            A.SmallestMaxSize(max_size=256, interpolation=cv2.INTER_AREA),
            A.RandomCrop(S.size, S.size),
            A.HorizontalFlip(p=0.5),
            _pca_transform_class()(transform.pca, 0.1),
        ],
        seed=0,
    )
    n = len(examples)
    images_per_s(lambda i: plain(image=decode_image(examples[i].path)), 16)  # warm-up
    loop_ips = images_per_s(lambda i: plain(image=decode_image(examples[i % n].path)), n)
    batches = S.batches
    tf1 = pipeline_images_per_s(examples, transform, 32, 1, batches)
    tfn = pipeline_images_per_s(examples, transform, 32, cores, batches)
    emit("pipeline_loop_images_per_s", loop_ips, "images/s", note="decode + Compose, 1 thread")
    emit("pipeline_tfdata_threads_1_images_per_s", tf1, "images/s")
    emit(f"pipeline_tfdata_threads_{cores}_images_per_s", tfn, "images/s")
    emit("aug_overhead_ratio", tf1 / loop_ips, "x", goal=">= 0.5")
    emit("aug_scaling_efficiency", tfn / (cores * tf1), "x", workers=cores, goal=">= 0.6")
    emit(
        "input_headroom",
        tfn / model_ips,
        "x",
        workers=cores,
        note=f"vs train_images_per_s_{S.backbone}_{S.size}_unfrozen",
        goal=">= 1.2 on an accelerator",
    )
    try:
        import grain
    except ImportError:
        emit("pipeline_grain_processes_skipped", 0, "", note="pip install grain to compare")
        return
    loader = TrainSampleLoader(examples, transform, seed=0)
    for workers in (1, cores):
        ds = (
            grain.MapDataset.range(n)
            .map(_GrainSample(loader))
            .batch(32)
            .to_iter_dataset(grain.ReadOptions(num_threads=1))
            .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        )
        it = iter(ds)
        next(it)  # worker start-up is not timed
        start = time.perf_counter()
        count = sum(len(b) for b in it)
        emit(
            f"pipeline_grain_processes_{workers}_images_per_s",
            count / (time.perf_counter() - start),
            "images/s",
            threads_per_worker=1,
        )


class _GrainSample:
    """Picklable per-index function for grain's worker processes (epoch 0)."""

    def __init__(self, loader: object):
        self.loader = loader

    def __call__(self, index: int) -> object:
        return self.loader(0, index)


def cache_figures() -> None:

    import keras

    from tlkit.core.settings import Loader
    from tlkit.data.augment import resolve_augment
    from tlkit.data.datasets import load_folder
    from tlkit.data.pipeline import build_train_transform, steps_per_epoch, train_dataset
    from tlkit.features.cache import CacheJob, build_cache, cache_dataset, trunk_shape
    from tlkit.features.rows import RowMaker
    from tlkit.models.backbones import get_backbone
    from tlkit.models.cut import Cut, build_tail, build_trunk
    from tlkit.models.freezing import freeze_all
    from tlkit.models.model import build_classifier

    with tempfile.TemporaryDirectory() as tmp:
        examples = list(
            load_folder(photo_folder(Path(tmp) / "p", S.cache_images), val_fraction=0.01).splits[
                "train"
            ]
        )
        spec = get_backbone(S.backbone)
        keras.utils.set_random_seed(0)
        base = spec.build(S.size)
        model = build_classifier(spec, base, 4, S.size)
        freeze_all(base)
        transform = build_train_transform(resolve_augment("none"), examples, S.size, 0.875)
        steps = steps_per_epoch(len(examples), 32)

        def epoch_seconds(fit_model: object, make_ds: object) -> float:
            fit_model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
            fit_model.fit(make_ds(0), steps_per_epoch=steps, epochs=1, verbose=0)
            start = time.perf_counter()
            fit_model.fit(make_ds(1), steps_per_epoch=steps, epochs=1, verbose=0)
            return time.perf_counter() - start

        live = epoch_seconds(
            model, lambda e: train_dataset(examples, transform, Loader(32), range(e, e + 1))
        )
        cut = Cut(len(base.layers), base.layers[-1].name, len(base.layers))
        trunk = build_trunk(model, cut)
        start = time.perf_counter()
        with RowMaker(transform, 0.875, Loader(seed=0)) as make_rows:
            job = CacheJob(
                {"train": examples},
                {"train": 1},
                make_rows,
                trunk.predict_on_batch,
                trunk_shape(trunk),
                "float16",
                32,
            )
            inputs = {"backbone": S.backbone, "cut": {"k": cut.k}, "views": {"train": 1}}
            cache = build_cache(Path(tmp) / "cache", "bench", inputs, job)
        build = time.perf_counter() - start
        cached = epoch_seconds(
            build_tail(model, cut),
            lambda e: cache_dataset(cache, "train", Loader(32), range(e, e + 1)),
        )
    emit("cache_live_epoch_seconds", live, "s", images=len(examples))
    emit("cache_epoch_seconds", cached, "s", images=len(examples))
    emit("cache_epoch_speedup", live / cached, "x", goal=">= 50 on CPU")
    emit("cache_build_ratio", build / live, "x", build_seconds=round(build, 2), goal="<= 1.3")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(S.rss_images)) as pool:  # a process's own peak: side by side
        rss = dict(zip(S.rss_images, pool.map(rss_child_peak, S.rss_images), strict=True))
    small, large = sorted(rss)
    emit("cache_rss_peak_mb", rss[small] / 1e3, "MB", images=small)
    emit("cache_rss_peak_mb", rss[large] / 1e3, "MB", images=large)
    emit("cache_rss_growth", rss[large] / rss[small], "x", goal="<= 1.2")


class _Counter(logging.Handler):
    """Counts TensorFlow's "triggered tf.function retracing" warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "retracing" in record.getMessage()


def eval_figures() -> None:
    from types import SimpleNamespace

    import keras
    import numpy as np

    from tlkit.data.datasets import load_folder
    from tlkit.data.decode import DEFAULT_MAX_PIXELS
    from tlkit.data.views_seen import ViewsSeen
    from tlkit.evaluation.evaluate import ViewRunner
    from tlkit.models.backbones import get_backbone
    from tlkit.models.freezing import freeze_all
    from tlkit.models.model import build_classifier

    class Member:  # what evaluate builds from a run, built here from a fresh model
        def __init__(self, model: object, n_frozen: int, mirror: bool = False):
            self.model, self.size, self.crop = model, S.size, 0.875
            self.seen = ViewsSeen("crop", (1 / 0.875, 1 / 0.875), (0.08, 1.0), mirror, "")
            record = SimpleNamespace(
                backbone=spec.name,
                preprocessing=spec.preprocessing,
                weights={"sha256": "x"},
                n_frozen=n_frozen,
            )
            self.run = SimpleNamespace(
                max_pixels=DEFAULT_MAX_PIXELS, record=record, classes=list("abcd")
            )

    spec = get_backbone(S.backbone)
    members = []
    for i in range(3):
        keras.utils.set_random_seed(0)  # the same trunk weights, as from one ImageNet file
        base = spec.build(S.size)
        model = build_classifier(spec, base, 4, S.size)
        freeze_all(base)
        head = model.get_layer("predictions")
        head.set_weights([w + 0.01 * (i + 1) for w in head.get_weights()])
        members.append(Member(model, len(base.layers)))

    def seconds(runner: ViewRunner, paths: list, mode: str) -> float:
        runner.probs(paths[:4], mode, 16)  # warm-up: each model's one trace
        start = time.perf_counter()
        runner.probs(paths, mode, 16)
        return time.perf_counter() - start

    counter = _Counter()
    tf_log = logging.getLogger("tensorflow")
    tf_log.addHandler(counter)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [
            e.path
            for s in load_folder(
                photo_folder(Path(tmp) / "p", S.eval_images), val_fraction=0.2
            ).splits.values()
            for e in s
        ]
        one_member = ViewRunner(members[:1])
        one = seconds(one_member, paths, "1")
        ten = seconds(one_member, paths, "10")
        dense = seconds(one_member, paths, "dense")  # this member never mirrored: one pass
        mirrored = seconds(ViewRunner([Member(members[0].model, 0, mirror=True)]), paths, "dense")
        emit("multicrop1_seconds", one, "s", images=len(paths))
        emit("multicrop10_seconds", ten, "s", images=len(paths))
        emit("multicrop10_cost_ratio", ten / one, "x", goal="<= 10, aim <= 8")
        emit(
            "multicrop_dense_cost_ratio",
            dense / one,
            "x",
            goal="<= 2",
            note="one pass over the whole 500x375 image at the eval scale",
        )
        emit(
            "multicrop_dense_mirrored_cost_ratio",
            mirrored / one,
            "x",
            note="the whole image and its mirror",
        )
        three = seconds(ViewRunner(members), paths, "1")
        emit("ensemble3_shared_trunk_seconds", three, "s", images=len(paths))
        emit("ensemble_shared_trunk_ratio", three / (3 * one), "x", goal="well under 1")
        # the effect of one trace per model: a 3-member ensemble built afresh, evaluated on
        # 1 and 10 views of a split whose last batch is short, traced vs Keras predict_on_batch
        odd = paths[: max(5, len(paths) - 3)]
        timed = {}
        printing = [h for h in tf_log.handlers if h is not counter]
        for h in printing:  # the old path's warnings are counted in a figure, not printed
            tf_log.removeHandler(h)
        for name, predictor in (
            ("predict_on_batch", lambda m: lambda x: np.asarray(m.predict_on_batch(x))),
            ("traced", None),
        ):
            counter.count = 0
            start = time.perf_counter()
            runner = ViewRunner(members, predictor)
            for mode in ("1", "10", "1"):
                runner.probs(odd, mode, 16)
            timed[name] = time.perf_counter() - start
            emit(
                f"eval_retracing_warnings_{name}",
                counter.count,
                "warnings",
                goal="0" if name == "traced" else None,
            )
        for h in printing:
            tf_log.addHandler(h)
        emit(
            "eval_traced_speedup",
            timed["predict_on_batch"] / timed["traced"],
            "x",
            note="ensemble of 3 on 1, 10, 1 views, first call included",
        )
    tf_log.removeHandler(counter)


def reliability_figures() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tlkit.data.audit import audit_folder
    from tlkit.data.datasets import load_folder
    from tlkit.data.decode import decode_image

    with tempfile.TemporaryDirectory() as tmp:
        folder = load_folder(photo_folder(Path(tmp) / "photos", S.audit_images))
        paths = [e.path for x in folder.splits.values() for e in x]
        cores = os.cpu_count() or 1
        decodes, audits = [], []
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(decode_image, paths[:8]))  # warm-up: imports, plugins, threads
            for round_ in range(3):  # interleaved, medians: this machine is noisy
                start = time.perf_counter()
                list(pool.map(decode_image, paths))
                decodes.append(time.perf_counter() - start)
                os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / f"xdg{round_}")  # no memo yet
                start = time.perf_counter()
                first = audit_folder(folder, workers=cores)
                audits.append(time.perf_counter() - start)
        start = time.perf_counter()
        second = audit_folder(folder, workers=cores)
        memo = time.perf_counter() - start
        if first.reused or second.reused != len(paths):
            raise RuntimeError("the memo did not behave as this benchmark assumes")
        audit, decode = statistics.median(audits), statistics.median(decodes)
        emit("audit_images_per_s", len(paths) / audit, "images/s", workers=cores)
        emit(
            "audit_overhead_ratio",
            audit / decode,
            "x",
            decode_seconds=round(decode, 3),
            goal="<= 1.3",
        )
        emit("audit_memo_seconds", memo, "s", images=len(paths))
        emit("audit_memo_speedup", audit / memo, "x", goal=">= 50")
        data_identity_figures(folder, "photos", Path(tmp) / "xdg-identity")
        digits = ROOT / "examples" / "digits"
        if S.digits and digits.is_dir():
            data_identity_figures(load_folder(digits), "digits", Path(tmp) / "xdg-digits")

    import keras

    from tlkit.core.checkpoints import LAST, restore, save_epoch
    from tlkit.models.backbones import get_backbone
    from tlkit.models.model import build_backbone, build_classifier
    from tlkit.models.weights import resolve_weights

    spec = get_backbone(S.backbone)
    weights = resolve_weights(spec, "none")

    def classifier() -> object:
        model = build_classifier(spec, build_backbone(spec, weights, S.size), 10, S.size)
        model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy")
        model.optimizer.build(model.trainable_variables)
        return model

    model = classifier()
    state = {"progress": 1, "best": {"val_loss": 1.0}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp)
        save_epoch(ckpt, model, model.optimizer, state, improved=True)  # warm-up, and a `last`
        start = time.perf_counter()
        save_epoch(ckpt, model, model.optimizer, {**state, "progress": 2}, improved=True)
        save = time.perf_counter() - start
        size = (ckpt / LAST).stat().st_size
        other = classifier()
        start = time.perf_counter()
        restore(ckpt, other)
        restored = time.perf_counter() - start
    emit(
        f"checkpoint_save_seconds_{S.backbone}",
        save,
        "s",
        mb=round(size / 1e6, 1),
        note="weights + Adam state, rotated, best linked",
    )
    emit(f"checkpoint_restore_seconds_{S.backbone}", restored, "s")


def data_identity_figures(folder: object, name: str, memo_home: Path) -> None:
    from tlkit.data.audit import audit_folder
    from tlkit.data.datasets import fingerprint

    os.environ["XDG_CACHE_HOME"] = str(memo_home)  # no memo yet: the cold pass reads every file
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fingerprint(audit_folder(folder, workers=os.cpu_count()).folder)
        times.append(time.perf_counter() - start)
    files = sum(len(x) for x in folder.splits.values())
    emit(f"data_identity_cold_seconds_{name}", times[0], "s", files=files)
    emit(
        f"data_identity_warm_seconds_{name}",
        times[1],
        "s",
        files=files,
        per_file_us=round(1e6 * times[1] / files, 1),
    )


def eval_rss_figures() -> None:
    """eval_rss_growth: two fresh processes evaluate the same many-class run on n and 4n
    images, side by side."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    classes, small, large = S.eval_rss
    rng = np.random.default_rng(0)

    def write(folder: Path, n: int, n_classes: int) -> None:
        for i in range(n):
            (folder / f"c{i % n_classes:04d}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                folder / f"c{i % n_classes:04d}" / f"{i}.png"
            )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write(root / "data" / "train", classes, classes)
        write(root / "data" / "val", 8, 8)
        finetune(
            FinetuneConfig.of(
                data=str(root / "data"),
                backbone="test_resnet",
                weights="none",
                input_size=32,
                freeze=FreezeRequest(count="all"),
                head_epochs=1,
                epochs=0,
                batch_size=64,
                output=str(root / "run"),
                cache="off",
            ),
            verbose=0,
        )
        for n in (small, large):
            write(root / f"eval{n}", n, 8)

        def peak(n: int) -> int:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--eval-rss-child",
                    str(root / "run"),
                    str(root / f"eval{n}"),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            return int(out.stdout.strip().splitlines()[-1])

        with ThreadPoolExecutor(2) as pool:
            rss = dict(zip((small, large), pool.map(peak, (small, large)), strict=True))
    emit("eval_rss_peak_mb", rss[small] / 1e3, "MB", images=small, classes=classes, views=30)
    emit("eval_rss_peak_mb", rss[large] / 1e3, "MB", images=large, classes=classes, views=30)
    emit("eval_rss_growth", rss[large] / rss[small], "x", goal="<= 1.2")


def eval_rss_child(run: str, data: str) -> None:
    from tlkit.evaluation.evaluate import EvalConfig, evaluate

    evaluate(
        EvalConfig(runs=[run], data=data, multicrop="multiscale", name=Path(data).name, workers=1)
    )
    from benchmarks.common import vm_hwm_kb

    print(vm_hwm_kb())


def rss_child_peak(n_images: int) -> int:
    """Peak RSS (KB) of a fresh process that trains one epoch from a cache another built."""

    with tempfile.TemporaryDirectory() as tmp:
        for step in ("build", "train"):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(n_images), tmp, step],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
    return int(out.stdout.strip().splitlines()[-1])


def stand_in_job(n_images: int) -> object:
    """A cache build of n_images (files that need not exist) through a cheap stand-in trunk
    whose rows are 7x7x2048, ResNet50's at 224, from random images: only the cache's own work
    is measured."""
    import keras
    import numpy as np

    from tlkit.data.datasets import Example
    from tlkit.features.cache import CacheJob, trunk_shape

    examples = [
        Example(f"/nonexistent/{i}.jpg", f"{i}.jpg", i % 4, str(i % 4)) for i in range(n_images)
    ]
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.AveragePooling2D(4)(keras.layers.Rescaling(1 / 255)(inputs))
    trunk = keras.Model(inputs, keras.layers.Conv2D(2048, 2)(x))  # -> 7x7x2048
    rng = np.random.default_rng(0)

    def rows(split: str, view: int, first: int, batch: list) -> object:
        return rng.integers(0, 256, (len(batch), 32, 32, 3), dtype=np.uint8)

    shape = trunk_shape(trunk)
    return CacheJob(
        {"train": examples}, {"train": 1}, rows, trunk.predict_on_batch, shape, "float16", 64
    )


def rss_child(n_images: int, folder: str, step: str) -> None:
    import keras

    from tlkit.core.settings import Loader
    from tlkit.features.cache import build_cache, cache_dataset, open_cache

    job = stand_in_job(n_images)  # made by both steps, so both hold the same before they work
    if step == "build":
        build_cache(Path(folder), "rss", {"n": n_images}, job)
        return
    cache = open_cache(Path(folder), "rss")
    cache.verify()
    features = keras.Input((7, 7, 2048))
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    tail = keras.Model(features, keras.layers.Dense(4, activation="softmax")(pooled))
    tail.compile("adam", "sparse_categorical_crossentropy")
    tail.fit(
        cache_dataset(cache, "train", Loader(32)),
        epochs=1,
        verbose=0,
        steps_per_epoch=-(-n_images // 32),
    )
    from benchmarks.common import vm_hwm_kb

    print(vm_hwm_kb())


def dist_child(strategy: str, backbone: str, size: int, batch: int, steps: int) -> None:
    """Training images/s (over all workers) under `strategy`; printed as the last line."""
    from tlkit.models.distribute import make_placement

    placement = make_placement(strategy)
    import keras
    import numpy as np

    from tlkit.core.settings import Loader
    from tlkit.data.pipeline import BatchMaker, epoch_jobs, run_jobs
    from tlkit.models.backbones import get_backbone
    from tlkit.models.model import build_classifier

    rng = np.random.default_rng(0)
    n = 4 * batch
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()

    def data(first_epoch: int, epochs: int) -> object:
        return placement.dataset(
            lambda share: run_jobs(
                epoch_jobs(n, batch, 0, range(first_epoch, first_epoch + epochs), share.replicas),
                BatchMaker(lambda _, i: x[i], x.shape[1:], "uint8"),
                labels,
                Loader(batch),
                share,
            )
        )

    with placement.strategy.scope():
        keras.utils.set_random_seed(0)
        spec = get_backbone(backbone)
        model = build_classifier(spec, spec.build(size), 10, size)
        model.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy")
        model.fit(data(0, 1), steps_per_epoch=2, epochs=1, verbose=0)  # trace, warm up
        epochs = -(-steps // 4)
        start = time.perf_counter()
        model.fit(data(1, epochs), steps_per_epoch=4, epochs=epochs, verbose=0)
        seconds = time.perf_counter() - start
    print(batch * 4 * epochs / seconds)


def run_dist_child(
    strategy: str, size: int, batch: int, steps: int, env: dict | None = None, workers: int = 1
) -> float:
    import socket

    ports = []
    for _ in range(workers if workers > 1 else 0):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    procs = []
    for i in range(workers):
        extra = dict(env or {})
        if workers > 1:
            extra["TF_CONFIG"] = json.dumps(
                {
                    "cluster": {"worker": [f"localhost:{p}" for p in ports]},
                    "task": {"type": "worker", "index": i},
                }
            )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--dist-child",
                    strategy,
                    S.backbone,
                    str(size),
                    str(batch),
                    str(steps),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env={**os.environ, **extra},
            )
        )
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(err)
    return float(outs[0][0].strip().splitlines()[-1])


def distribute_figures() -> None:

    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    size, batch, steps = (224, 32, 20) if gpus else (S.dist_size, 32, S.dist_steps)
    cpus = None if gpus > 1 else {"TLKIT_LOGICAL_CPUS": "2"}
    where = f"{gpus} GPU(s)" if gpus > 1 else "2 logical CPUs sharing the machine's cores"
    one = run_dist_child("default", size, batch, steps)
    two = run_dist_child("mirrored", size, batch, steps, cpus)
    mw = run_dist_child("multiworker", size, batch, steps, workers=2)
    common = {"size": size, "global_batch": batch, "device": device()}
    emit("dist_train_images_per_s_default", one, "images/s", **common)
    emit("dist_train_images_per_s_mirrored", two, "images/s", over=where, **common)
    emit("dist_mirrored_speedup", two / one, "x", over=where)
    emit("dist_multiworker_2proc_speedup", mw / one, "x", over="2 processes on this one machine")

    n_images = S.audit_images
    with tempfile.TemporaryDirectory() as tmp:
        data = photo_folder(Path(tmp) / "photos", n_images)
        common_args = [
            sys.executable,
            "-m",
            "tlkit",
            "precompute-features",
            str(data),
            "--backbone",
            S.backbone,
            "--weights",
            "none",
            "--input-size",
            str(S.dist_size),
            "--json",
        ]
        start = time.perf_counter()
        subprocess.run(
            [*common_args, "--cache-dir", f"{tmp}/single"], check=True, capture_output=True, cwd=tmp
        )
        single = time.perf_counter() - start
        start = time.perf_counter()
        procs = [
            subprocess.Popen(
                [
                    *common_args,
                    "--cache-dir",
                    f"{tmp}/sharded",
                    "--num-shards",
                    "2",
                    "--shard-index",
                    str(i),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=tmp,
            )
            for i in range(2)
        ]
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(p.stderr.read().decode())
        sharded = time.perf_counter() - start
        emit(
            "precompute_sharded_2proc_ratio",
            sharded / single,
            "x",
            images=n_images,
            single_seconds=round(single, 1),
            sharded_seconds=round(sharded, 1),
            note="both shards on this one machine",
        )
    merge_figure(S.merge_images)


def merge_figure(n_images: int) -> None:
    """`merge_parts` alone, on two parts of 7x7x2048 float16 rows (ResNet50 at 224) written by
    build_part with a cheap stand-in trunk: only the merge is timed."""
    from tlkit.features.cache import build_part, merge_parts

    job = stand_in_job(n_images)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            build_part(Path(tmp), "merge", {"n": n_images}, job, i, 2)
        start = time.perf_counter()
        cache = merge_parts(Path(tmp), "merge")
        seconds = time.perf_counter() - start
        mb = sum(f["bytes"] for f in cache.manifest["splits"]["train"]["shards"]) / 1e6
    emit("cache_merge_mb_per_s", mb / seconds, "MB/s", mb=round(mb, 1), seconds=round(seconds, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description="tlkit benchmarks (JSON lines).")
    parser.add_argument("--quick", action="store_true", help="fewer steps and images")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every group once at tiny sizes on the test backbone: checks that "
        "each figure is produced, measures nothing worth quoting",
    )
    parser.add_argument("--batch", type=int, default=None, help="default 32 (8 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument(
        "--only",
        choices=[
            "train",
            "augment",
            "photos",
            "cache",
            "eval",
            "eval_memory",
            "reliability",
            "distribute",
            "export",
        ],
        help="run one group of figures",
    )
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--dist-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--eval-rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_rss_child:
        eval_rss_child(*args.eval_rss_child)
        return
    if args.dist_child:
        strategy, backbone, size, batch, steps = args.dist_child
        dist_child(strategy, backbone, int(size), int(batch), int(steps))
        return
    if args.rss_child:
        rss_child(int(args.rss_child[0]), args.rss_child[1], args.rss_child[2])
        return
    global S
    S = SMOKE if args.smoke else QUICK if args.quick else FULL
    args.quick = args.quick or args.smoke
    batch = args.batch or (8 if args.quick else 32)
    warmup, steps = (2, 3) if args.quick else (3, 10)
    steps = args.steps or steps
    if args.only in (None, "train", "augment"):
        cli_help_seconds()
        bad_input_seconds(2 if args.smoke else 5)
        model = train_throughput(S.size, batch, warmup, steps)
    if args.only in (None, "augment"):
        from tlkit.data.datasets import load_folder

        with tempfile.TemporaryDirectory() as tmp:
            examples = list(
                load_folder(photo_folder(Path(tmp) / "photos", S.photos)).splits["train"]
            )
            examples += list(load_folder(Path(tmp) / "photos").splits["val"])
            pca_speedup(examples, args.quick)
            pipeline_figures(examples, model["unfrozen"])
    if args.only in (None, "photos"):
        from benchmarks.photos import photo_figures

        photo_figures(emit, args.smoke, os.cpu_count() or 1)
    if args.only in (None, "cache"):
        cache_figures()
    if args.only in (None, "eval"):
        eval_figures()
        eval_rss_figures()
    if args.only in (None, "eval_memory"):
        from benchmarks.eval_memory import eval_memory_figures

        eval_memory_figures(emit, args.smoke)
    if args.only in (None, "reliability"):
        reliability_figures()
    if args.only in (None, "distribute"):
        distribute_figures()
    if args.only in (None, "export"):
        from benchmarks.export_figures import export_figures

        export_figures(emit, args.smoke)


if __name__ == "__main__":
    main()
