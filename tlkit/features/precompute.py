"""`precompute_features` and training inputs read from the feature cache.

With K views (`--views K`), the training split stores K augmented versions of every image (view v
is epoch v of the augmentation pipeline: seed, view and index fix it) and training reads one view
per image per epoch, drawn from (seed, epoch, index). With one view, the cache stores the eval
transform and training from it has no augmentation, so `finetune` uses a one-view cache only
when its own `--augment` is `none`.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, cast, overload

import numpy as np

from tlkit.core.errors import CacheError, ConfigError, WeightsError
from tlkit.core.settings import SETTINGS, Composed, Loader, check_fields, part, setting
from tlkit.data.audit import AuditConfig, audit_and_filter
from tlkit.data.augment import (
    AugmentConfig,
    ColorPCA,
    TrainTransform,
    resolve_augment,
)
from tlkit.data.datasets import ImageFolder
from tlkit.data.preflight import Checked, check_inputs
from tlkit.features.cache import (
    CacheJob,
    FeatureCache,
    TrunkSource,
    build_cache,
    build_part,
    cache_inputs,
    cache_root,
    estimate_bytes,
    key_of,
    merge_parts,
    open_cache,
    read_parts,
    trunk_shape,
)
from tlkit.features.rows import RowMaker, resolve_random_bn
from tlkit.models.backbones import BackboneSpec
from tlkit.models.cut import Cut, build_trunk, resolve_cut
from tlkit.models.distribute import (
    NEEDS_TF_CONFIG,
    make_placement,
    read_tf_config,
    resolve_strategy,
)
from tlkit.models.freezing import FreezeRequest, ModelChoice, resolve_freeze
from tlkit.models.weights import ResolvedWeights, resolve_weights

log = logging.getLogger("tlkit")


@dataclass(frozen=True)
class PrecomputeConfig(Composed):
    """Settings of `tlkit precompute-features`; the defaults freeze the whole backbone."""

    command: ClassVar[str] = "precompute-features"

    data: str = "data"
    model: ModelChoice = part(ModelChoice, freeze=FreezeRequest(count="all"))
    loader: Loader = part(Loader)
    audit: AuditConfig = part(AuditConfig)
    views: int = setting("views")
    augment: AugmentConfig = setting(
        "augment", factory=lambda: resolve_augment(SETTINGS["augment"].default)
    )
    dtype: str = setting("dtype")
    cache_dir: str | None = setting("cache_dir")
    val_fraction: float = setting("val_fraction")
    dry_run: bool = setting("dry_run")
    mixed_precision: bool = setting("mixed_precision")  # float16, as `finetune` may compute
    strategy: str = setting("strategy")  # multiworker: shards from TF_CONFIG; mirrored: batches
    num_shards: int | None = setting("num_shards")  # one part of the cache: shard_index of these
    shard_index: int | None = setting("shard_index")

    def __post_init__(self) -> None:
        check_fields(self)
        self.model.chosen(self.command)
        if (self.num_shards is None) != (self.shard_index is None):
            raise ConfigError(
                "--num-shards and --shard-index go together. Received: "
                f"--num-shards {self.num_shards}, --shard-index {self.shard_index}"
            )
        if self.num_shards is not None and (self.shard_index or 0) >= self.num_shards:
            raise ConfigError(
                "--shard-index must be in 0..num-shards-1. Received: --num-shards "
                f"{self.num_shards}, --shard-index {self.shard_index}"
            )

    def build_settings(self, verbose: int = 1) -> BuildSettings:
        return BuildSettings(self.views, self.dtype, self.loader, verbose)


def view_augment(views: int, augment: AugmentConfig) -> AugmentConfig:
    """What the training views hold: the eval transform for one view, else the augmentation."""
    return augment if views > 1 else resolve_augment("none")


@dataclass(frozen=True)
class BuildSettings:
    """How a cache build runs: what `precompute-features` and `finetune --cache` both give."""

    views: int
    dtype: str
    loader: Loader  # batches, threads, pixel limit, and the seed of the augmented views
    verbose: int = 1


@dataclass(frozen=True)
class Prepared:
    """A cache made ready to open or build: the trunk that computes it, its key and the inputs
    the key hashes, and the transform of its training views."""

    trunk: Any
    key: str
    inputs: dict[str, Any]
    transform: TrainTransform


def prepare_cache(
    source: TrunkSource,
    folder: ImageFolder,
    augment: AugmentConfig,
    settings: BuildSettings,
    pca: ColorPCA | None = None,
) -> Prepared:
    """The trunk, key and transform of the cache of `source` cut where it says; `pca`, when
    the caller has it already, saves computing the dataset PCA twice."""
    from tlkit.data.pipeline import build_train_transform

    trunk = build_trunk(source.model, source.cut)
    aug = view_augment(settings.views, augment)
    transform = build_train_transform(
        aug,
        folder.splits["train"],
        source.size,
        source.spec.crop_fraction,
        pca if aug.pca_sigma > 0 else None,
        settings.loader.max_pixels,
    )
    pca_dict = transform.pca.as_dict() if transform.pca is not None else None
    build = (settings.views, settings.loader.seed, settings.dtype)
    inputs = cache_inputs(source, trunk, folder, aug, pca_dict, build)
    return Prepared(trunk, key_of(inputs), inputs, transform)


def _progress_bar(total: int, verbose: int) -> Callable[[int], None]:
    """`progress(n_images)`: a Keras progress bar with the images computed a second."""
    import keras

    bar = keras.utils.Progbar(
        total, stateful_metrics=["images/s"], unit_name="image", verbose=verbose
    )
    start, done = time.perf_counter(), [0]

    def progress(n_images: int) -> None:
        done[0] += n_images
        rate = done[0] / max(time.perf_counter() - start, 1e-9)
        bar.update(min(done[0], total), values=[("images/s", rate)])

    return progress


@overload
def build_with_progress(
    root: Path,
    prepared: Prepared,
    folder: ImageFolder,
    settings: BuildSettings,
    predict: Any = None,
    shard: None = None,
) -> FeatureCache: ...


@overload
def build_with_progress(
    root: Path,
    prepared: Prepared,
    folder: ImageFolder,
    settings: BuildSettings,
    predict: Any,
    shard: tuple[int, int],
) -> Path: ...


def build_with_progress(
    root: Path,
    prepared: Prepared,
    folder: ImageFolder,
    settings: BuildSettings,
    predict: Any = None,
    shard: tuple[int, int] | None = None,
) -> FeatureCache | Path:
    """The cache (or, given `shard` (index, count), that part of it: its folder), with a
    progress bar; `predict` runs the trunk (default: predict_on_batch)."""
    views = {s: (settings.views if s == "train" else 1) for s in folder.splits}
    total = sum(len(x) * views[s] for s, x in folder.splits.items())
    if shard is not None:
        total = -(-total // shard[1])  # about: parts are whole batches
    t = prepared.transform
    with RowMaker(t, t.crop_fraction, settings.loader) as make_rows:
        job = CacheJob(
            folder.splits,
            views,
            make_rows,
            predict or prepared.trunk.predict_on_batch,
            trunk_shape(prepared.trunk),
            settings.dtype,
            settings.loader.batch_size,
            _progress_bar(total, settings.verbose),
        )
        if shard is not None:
            return build_part(root, prepared.key, prepared.inputs, job, *shard)
        return build_cache(root, prepared.key, prepared.inputs, job)


def _shard_and_strategy(config: PrecomputeConfig) -> tuple[tuple[int, int] | None, str]:
    """((index, count) or None, the strategy to make). Under multiworker each worker of
    TF_CONFIG computes its own shard: the work needs no collective ops, so none are set up."""
    cluster = read_tf_config()
    resolved = resolve_strategy(config.strategy, cluster)
    if resolved != "multiworker":
        if config.num_shards is None or config.shard_index is None:
            return None, resolved
        return (config.shard_index, config.num_shards), resolved
    if config.num_shards is not None:
        raise ConfigError(
            "--num-shards with --strategy multiworker: use one or the other "
            "(under multiworker every worker of TF_CONFIG computes one shard)"
        )
    if cluster is None:
        raise ConfigError(NEEDS_TF_CONFIG)
    return (cluster.index, cluster.workers), "default"


def precompute_features(
    config: PrecomputeConfig, verbose: int = 1
) -> FeatureCache | dict[str, Any]:
    """Build (or find) the feature cache of `config`'s settings.

    Args:
        config: the settings (PrecomputeConfig). With `dry_run`, the plan is returned and
            nothing is written; with a shard (`num_shards`, `shard_index`), only that part is
            computed: the last part to finish publishes the cache, the others return what is
            still missing.
        verbose: 0 hides the progress bar.
    """
    checked = check_inputs(config.data, config.model, config.val_fraction)
    shard, strategy = _shard_and_strategy(config)
    placement = make_placement(strategy)
    if placement.replicas > 1:
        log.info("strategy: %s", placement.describe())
    with placement.strategy.scope():
        return _precompute(config, checked, shard, placement.predictor, verbose)


def _seconds_per_image(predict: Any, batch_size: int, size: int) -> float:
    """The trunk's time per image on one batch, after a first call that traces it."""
    probe = np.zeros((batch_size, size, size, 3), np.uint8)
    predict(probe)
    t0 = time.perf_counter()
    predict(probe)
    return (time.perf_counter() - t0) / batch_size


def _dry_run_weights(spec: BackboneSpec, requested: str) -> tuple[ResolvedWeights, str | None]:
    """A dry run needs only the architecture: without the weights it measures on random ones
    and says that the cache key waits for them."""
    try:
        return resolve_weights(spec, requested), None
    except WeightsError as e:
        return resolve_weights(spec, "none"), str(e)


def _cut_of(config: PrecomputeConfig, spec: BackboneSpec, base: Any) -> Cut:
    """Where the trunk whose outputs are cached ends: the freeze point, or the nearest
    single-tensor cut before it."""
    from tlkit.models.model import backbone_taps

    plan = resolve_freeze(config.model.freeze, spec, [layer.name for layer in base.layers])
    cut = resolve_cut(base, plan.n_frozen)
    if cut is None:
        raise ConfigError(
            f"{plan.request} freezes nothing, so there is nothing to cache; "
            "freeze some layers (the default is --freeze all)"
        )
    if cut.k != plan.n_frozen:
        why = (
            "the head also reads the stages from there on (--head-features stages)"
            if cut.layer in backbone_taps(base)[:1]
            else "it ends inside a block (several tensors cross it)"
        )
        log.info(
            "cut: %s: %s; caching at the nearest single-tensor cut, after layer %d (%s)",
            plan.request,
            why,
            cut.k - 1,
            cut.layer,
        )
    return cut


def _model_of(
    config: PrecomputeConfig,
    spec: BackboneSpec,
    size: int,
    weights: ResolvedWeights,
    folder: ImageFolder,
) -> Any:
    """The classifier whose trunk is cached; random weights' BatchNorm is resolved as
    `finetune` resolves it by default (so a cache made here is its cache)."""
    from tlkit.models.model import Top, build_model

    n, seed, half = len(folder.classes), config.loader.seed, config.mixed_precision
    taps = config.model.taps(spec)
    model = build_model(spec, weights, size, n, seed, half, Top(taps=taps))
    train, max_pixels = folder.splits["train"], config.loader.max_pixels
    resolve_random_bn(model, weights.source, train, size, spec.crop_fraction, max_pixels, None)
    return model


def _precompute(
    config: PrecomputeConfig,
    checked: Checked,
    shard: tuple[int, int] | None,
    predictor: Any,
    verbose: int,
) -> FeatureCache | dict[str, Any]:
    from tlkit.models.model import backbone_of

    spec, size = checked.spec, checked.size
    if config.dry_run:
        weights, missing = _dry_run_weights(spec, config.model.weights)
    else:
        weights, missing = resolve_weights(spec, config.model.weights), None
    scanned = checked.dataset()
    folder, _, _ = audit_and_filter(scanned, config.audit, spec.min_size, config.loader)
    model = _model_of(config, spec, size, weights, folder)
    cut = _cut_of(config, spec, backbone_of(model))
    settings = config.build_settings(verbose)
    prepared = prepare_cache(
        TrunkSource(spec, weights, model, cut, size), folder, config.augment, settings
    )
    trunk, key = prepared.trunk, prepared.key
    predict = predictor(trunk)
    root = cache_root(config.cache_dir)
    existing = open_cache(root, key)
    counts = {s: len(x) for s, x in folder.splits.items()}
    views = {s: (config.views if s == "train" else 1) for s in folder.splits}
    shape = trunk_shape(trunk)
    needed = estimate_bytes(counts, views, shape, config.dtype)
    if config.dry_run:
        images = sum(counts[s] * views[s] for s in counts)
        seconds = _seconds_per_image(predict, config.loader.batch_size, size) * images
        # the key names the weights' hash: unknown without them
        place = _place(root, None, None) if missing is not None else _place(root, key, existing)
        estimate = {"bytes": needed, "images": images, "estimated_seconds": round(seconds, 1)}
        return {
            **place,
            **estimate,
            "weights_missing": missing,
            "shape": list(shape),
            "dtype": config.dtype,
            "cut": cut.as_dict(),
        }
    if existing is not None:
        log.info("feature cache %s already complete (%s)", key, root / key)
        return existing
    _check_space(root, needed if shard is None else 2 * -(-needed // shard[1]))  # part + merge
    what = "feature cache" if shard is None else f"shard {shard[0]} of {shard[1]} of cache"
    mb = needed / 1e6
    log.info(
        "building %s %s: %s images x views, %s %s per image, %.1f MB in all",
        *(what, key, counts, shape, config.dtype, mb),
    )
    built = build_with_progress(root, prepared, folder, settings, predict, shard)
    if shard is not None:
        return _after_part(root, key, shard, built)
    return cast(FeatureCache, built)  # a whole build gives the cache, a part its folder


def _place(root: Path, key: str | None, existing: FeatureCache | None) -> dict[str, Any]:
    """Where --dry-run's cache would go (written nowhere): its key and folder, whether it is
    there already, and the space free there."""
    free_on = root if root.exists() else root.parent.resolve()
    return {
        "key": key,
        "exists": existing is not None,
        "path": str(root / key) if key else None,
        "free_bytes": shutil.disk_usage(free_on).free,
    }


def _check_space(root: Path, needed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise CacheError(
            f"{root}: the cache needs {needed / 1e9:.2f} GB but only {free / 1e9:.2f} GB is "
            "free; free space or pass --cache-dir elsewhere"
        )


def _after_part(
    root: Path, key: str, shard: tuple[int, int], built: FeatureCache | Path
) -> FeatureCache | dict[str, Any]:
    """The last part to finish publishes the cache; the others say what is still missing."""
    count, parts = read_parts(root, key)
    missing = sorted(set(range(count)) - set(parts))
    if not missing:
        log.info("shard %d of %d done, and every part is finished: merging", *shard)
        return merge_parts(root, key)
    log.info(
        "shard %d of %d done (%s); waiting for shard(s) %s; the last to finish, or "
        "`tlkit cache merge %s`, publishes the cache",
        shard[0],
        shard[1],
        built,
        ", ".join(map(str, missing)),
        key,
    )
    return {
        "key": key,
        "shard": shard[0],
        "num_shards": shard[1],
        "part": str(built),
        "missing_shards": missing,
        "path": str(root / key),
    }
