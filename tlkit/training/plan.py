"""Everything `finetune` decides before its first step, in the order that fails fastest: the
weights before decoding the data, the data before any model, then the freeze point, the
`auto` searches, the augmentation and whether a feature cache serves the run."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from tlkit.core.choices import AUTO
from tlkit.core.errors import ConfigError
from tlkit.data.audit import DataReport, audit_and_filter
from tlkit.data.datasets import Example, ImageFolder, fingerprint
from tlkit.data.preflight import Checked
from tlkit.models.distribute import Placement
from tlkit.models.freezing import FreezePlan, nothing_to_train, resolve_freeze
from tlkit.models.weights import ResolvedWeights, resolve_weights
from tlkit.training.config import FinetuneConfig
from tlkit.training.resume import check_unchanged
from tlkit.training.timing import log_estimate

if TYPE_CHECKING:
    import keras

    from tlkit.data.augment import ColorPCA, TrainTransform
    from tlkit.features.cache import FeatureCache
    from tlkit.features.rows import Features
    from tlkit.models.backbones import BackboneSpec

log = logging.getLogger("tlkit")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `finetune` trains, then records."""

    config: FinetuneConfig  # with --augment auto resolved
    requested: dict[str, Any]  # the settings as asked for: run.json keeps `auto`
    spec: BackboneSpec
    size: int
    weights: ResolvedWeights
    folder: ImageFolder  # the data to train on (bad files left out under --on-bad-image skip)
    report: DataReport  # the data check of every file
    skipped: list[dict[str, Any]]
    identity: dict[str, Any]  # what a resumed run must still match
    model: keras.Model
    base: keras.Model
    freeze: FreezePlan
    searched: dict[str, Any]  # --augment auto / --freeze auto: choices and scores
    head_features: Features | None  # computed by a search; the head phase can reuse them
    weights_by_class: dict[int, float] | None
    sample_weights: list[float] | None
    transform: TrainTransform
    cache: FeatureCache | None
    fit_model: keras.Model  # the classifier, or its tail over the feature cache
    cache_note: str

    @property
    def fingerprint(self) -> str:
        return self.identity["data_fingerprint"]

    def split(self, name: str) -> list[Example]:
        return self.folder.splits[name]

    def schedule(self) -> list[tuple[str, int, float]]:
        """(phase, epochs, learning rate) of the head and fine-tune phases."""
        config, scale = self.config, self.config.lr_scale()
        tune_epochs = config.epochs
        if (
            "freeze" in self.searched
            and self.freeze.n_frozen == self.freeze.n_layers
            and tune_epochs
        ):
            log.info(
                "--freeze auto chose head only: no fine-tune phase (it would train "
                "nothing but the head again)"
            )
            tune_epochs = 0
        schedule = [
            ("head", config.head_epochs, config.lr * scale),
            ("fine-tune", tune_epochs, config.fine_tune_lr * scale),
        ]
        if config.scale_lr:
            log.info(
                "--scale-lr: batch %d / base batch %d = x%g: head lr %g, fine-tune lr %g",
                config.batch_size,
                config.lr_base_batch,
                scale,
                schedule[0][2],
                schedule[1][2],
            )
        return schedule


def seed_everything(seed: int) -> None:
    """Same seed, same CPU run: Python, NumPy and TF RNGs plus deterministic TF kernels."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU"):  # GPUs lack some deterministic kernels
        tf.config.experimental.enable_op_determinism()


def class_weights(examples: list[Example], n_classes: int) -> dict[int, float]:
    """'balanced' (scikit-learn's rule): n / (classes * count), so every class weighs the same."""
    counts = [0] * n_classes
    for e in examples:
        counts[e.label] += 1
    total = sum(counts)
    return {i: total / (n_classes * c) for i, c in enumerate(counts) if c}


def make_plan(
    config: FinetuneConfig,
    checked: Checked,
    placement: Placement,
    saved: dict[str, Any] | None,
    tmp_dir: Any,
    force_resume: bool,
    verbose: int,
) -> Plan:
    """Weights, the data check, the model, freeze point, `auto` choices, augmentation and the
    cache decision (the data's listing was checked before TensorFlow loaded)."""
    from tlkit.data.pipeline import build_train_transform
    from tlkit.models.model import backbone_of, build_model

    spec, size = checked.spec, checked.size
    weights = resolve_weights(spec, config.weights)
    folder, report, skipped, data_fingerprint = _load_data(config, checked, placement)
    identity = {
        "config": config.as_dict(),
        "backbone": spec.name,
        "weights_sha256": weights.as_dict().get("sha256"),
        "input_size": size,
        "preprocessing": spec.preprocessing,
        "classes": list(folder.classes),
        "data_fingerprint": data_fingerprint,
    }
    check_unchanged(saved, identity, tmp_dir, force_resume)
    seed_everything(config.seed)
    model = build_model(
        spec,
        weights,
        size,
        len(folder.classes),
        config.seed,
        config.dropout,
        config.mixed_precision,
    )
    base = backbone_of(model)
    by_class, sample_weights = _weights_of(config, folder)
    requested = config.as_dict()
    config, freeze, searched, head_features = _resolve_auto(
        config, placement, saved, model, spec, folder, size, sample_weights
    )
    idle = nothing_to_train(base, freeze, config.train_bn) if config.epochs else None
    if idle is not None:
        log.warning("%s", idle)
    transform = build_train_transform(
        config.augment,
        folder.splits["train"],
        size,
        spec.crop_fraction,
        max_pixels=config.audit.max_pixels,
    )
    if transform.pca is not None:
        log.info(
            "PCA colour: eigenvalues %s from %d images",
            ", ".join(f"{v:.4f}" for v in transform.pca.eigvals),
            transform.pca.n_images,
        )
    cache, fit_model, note = _select_cache(
        config, spec, weights, model, base, freeze, size, folder, transform.pca, verbose, placement
    )
    log.info("feature cache: %s", note)
    placement.check_same(
        "feature caches",
        cache.key if cache else "000000",
        "build the cache on every worker (`tlkit precompute-features`), or train with --no-cache",
    )
    return Plan(
        config,
        requested,
        spec,
        size,
        weights,
        folder,
        report,
        skipped,
        identity,
        model,
        base,
        freeze,
        searched,
        head_features,
        by_class,
        sample_weights,
        transform,
        cache,
        fit_model,
        note,
    )


def _load_data(
    config: FinetuneConfig, checked: Checked, placement: Placement
) -> tuple[ImageFolder, DataReport, list[dict[str, Any]], str]:
    """(the folder to train on, the data check, the files skipped, the fingerprint of every
    file, usable or not)."""
    scanned = checked.dataset()
    log.info(
        "data: %s (%s layout), %d classes; %s",
        scanned.root,
        scanned.layout,
        len(scanned.classes),
        ", ".join(f"{s} {len(x)}" for s, x in scanned.splits.items()),
    )
    if scanned.ignored:
        log.info(
            "ignored %d hidden or system entries (e.g. %s)",
            len(scanned.ignored),
            scanned.ignored[0],
        )
    folder, report, skipped = audit_and_filter(
        scanned, config.audit, checked.spec.min_size, config.workers
    )
    data_fingerprint = fingerprint(report.folder)
    placement.check_same(
        "data",
        data_fingerprint,
        "every worker needs the same files at the same path (a copy, or a shared filesystem)",
    )
    return folder, report, skipped, data_fingerprint


def _weights_of(
    config: FinetuneConfig, folder: ImageFolder
) -> tuple[dict[int, float] | None, list[float] | None]:
    """--class-weight: (weight of each class, weight of each training image), or Nones."""
    if config.class_weight != "balanced":
        return None, None
    train = folder.splits["train"]
    by_class = class_weights(train, len(folder.classes))
    log.info(
        "class weights (balanced): %s",
        ", ".join(f"{folder.classes[i]} {w:.3f}" for i, w in by_class.items()),
    )
    return by_class, [by_class[e.label] for e in train]


def _resolve_auto(
    config: FinetuneConfig,
    placement: Placement,
    identity: dict[str, Any] | None,
    model: keras.Model,
    spec: BackboneSpec,
    folder: ImageFolder,
    size: int,
    sample_weights: list[float] | None,
) -> tuple[FinetuneConfig, FreezePlan, dict[str, Any], Features | None]:
    """--augment auto, then --freeze auto: (config with the chosen augmentation, the freeze
    plan, {setting: {chosen, scores}}, features the head phase can reuse or None). A resumed
    run reuses the choices its first start recorded."""
    from tlkit.data.augment import AugmentConfig
    from tlkit.models.model import backbone_of
    from tlkit.training.freeze_search import search_freeze
    from tlkit.training.head import feature_views, search_augment

    train, val = folder.splits["train"], folder.splits["val"]
    searched: dict[str, Any] = dict((identity or {}).get("searched") or {})
    wanted = [
        flag
        for flag, on in (
            ("--augment auto", config.augment.preset == AUTO),
            ("--freeze auto", config.freeze.count == AUTO),
        )
        if on
    ]
    if wanted and placement.replicas > 1:
        raise ConfigError(
            f"{wanted[0]} runs on one device; name a value (--augment light, "
            "--freeze all, ...) under --strategy mirrored or multiworker"
        )
    estimates = [lambda per_image, total: log_estimate(per_image, total, len(train), config.epochs)]
    head_features = None
    if config.augment.preset == AUTO:
        if "augment" in searched:
            chosen = AugmentConfig.from_dict(searched["augment"]["chosen"])
            log.info("--augment auto: %s, as chosen when the run started", chosen.preset)
        else:
            chosen, scores, head_features = search_augment(
                model,
                train,
                val,
                size,
                spec.crop_fraction,
                config,
                sample_weights,
                on_first_batch=estimates.pop(),
            )
            searched["augment"] = {"chosen": chosen.as_dict(), "scores": scores}
        config = dataclasses.replace(config, augment=chosen)
    if config.freeze.count != AUTO:
        base = backbone_of(model)
        return (
            config,
            resolve_freeze(config.freeze, spec, [x.name for x in base.layers]),
            searched,
            head_features,
        )
    if "freeze" in searched:
        plan = FreezePlan(**searched["freeze"]["chosen"])
        log.info("%s, as chosen when the run started", plan.request)
        return config, plan, searched, head_features
    plan, scores, pooled = search_freeze(
        model,
        spec,
        train,
        val,
        size,
        spec.crop_fraction,
        config,
        sample_weights,
        on_first_batch=estimates.pop() if estimates else None,
    )
    searched["freeze"] = {"chosen": plan.as_dict(), "scores": scores}
    if (
        head_features is None
        and feature_views(
            config.augment.random, config.head_views, len(train), pooled.train.shape[1]
        )
        == 1
    ):
        head_features = pooled
    return config, plan, searched, head_features


def _select_cache(
    config: FinetuneConfig,
    spec: BackboneSpec,
    weights: ResolvedWeights,
    model: keras.Model,
    base: keras.Model,
    plan: FreezePlan,
    size: int,
    folder: ImageFolder,
    pca: ColorPCA | None,
    verbose: int,
    placement: Placement,
) -> tuple[FeatureCache | None, keras.Model, str]:
    """(cache or None, the model to fit, why): train the tail from cached activations when a
    cache matches these exact settings (or --cache builds one)."""
    from tlkit.features.cache import cache_root, open_cache, touch
    from tlkit.features.precompute import BuildSettings, build_with_progress, prepare_cache
    from tlkit.models.cut import build_tail, resolve_cut

    if config.cache == "off":
        return None, model, "not used (--no-cache)"
    cut = resolve_cut(base, plan.n_frozen)
    if cut is None:
        return None, model, "not used (nothing is frozen)"
    if config.views == 1 and config.augment.random:
        return (
            None,
            model,
            (
                f"not used: --augment {config.augment.preset} is random and a "
                "one-view cache holds no augmentation; use --views K (K > 1) or "
                "--augment none to train from a cache"
            ),
        )
    trunk, key, inputs, transform = prepare_cache(
        spec,
        weights,
        model,
        cut,
        size,
        config.views,
        config.augment,
        config.seed,
        folder,
        config.cache_dtype,
        pca,
        config.audit.max_pixels,
    )
    root = cache_root(config.cache_dir)
    cache = open_cache(root, key)
    moved = (
        ""
        if cut.k == plan.n_frozen
        else (
            f"; freeze point {plan.n_frozen} is inside a block, cached at the single-tensor cut "
            f"after layer {cut.k - 1} ({cut.layer}), the frozen layers after it run live"
        )
    )
    if cache is None and config.cache == "build":
        if placement.workers > 1:
            raise ConfigError(
                "--cache build under --strategy multiworker: build the cache "
                "first with `tlkit precompute-features --strategy multiworker` "
                "(each worker computes a shard), then train from it"
            )
        settings = BuildSettings(
            config.views,
            config.seed,
            config.cache_dtype,
            config.batch_size,
            config.workers,
            config.audit.max_pixels,
            verbose,
        )
        cache = build_with_progress(
            root,
            key,
            inputs,
            trunk,
            folder,
            transform,
            spec.crop_fraction,
            settings,
            placement.predictor(trunk),
        )
        note = f"built and used {root / key}{moved}"
    elif cache is None:
        return (
            None,
            model,
            (
                f"not used: no cache for these settings ({root / key}); "
                "`tlkit precompute-features` with the same options, or --cache, "
                "builds it"
            ),
        )
    else:
        note = f"using {root / key}{moved}"
    cache.verify()
    touch(cache)
    return cache, build_tail(model, cut), note
