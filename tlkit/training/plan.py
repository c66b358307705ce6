"""Everything `finetune` decides before its first step, in the order that fails fastest: the
weights before decoding the data, the data before any model, then the freeze point, the
`auto` searches, the augmentation and whether a feature cache serves the run."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tlkit.core import selection
from tlkit.core.choices import AUTO
from tlkit.core.errors import ConfigError
from tlkit.core.records import Found, Searched
from tlkit.core.settings import SETTINGS
from tlkit.data.audit import DataReport, audit_and_filter
from tlkit.data.datasets import Example, ImageFolder, fingerprint
from tlkit.data.preflight import Checked
from tlkit.models.distribute import WHOLE, Placement, Share
from tlkit.models.freezing import FreezePlan, nothing_to_train, resolve_freeze
from tlkit.models.weights import ResolvedWeights, resolve_weights
from tlkit.training.config import FinetuneConfig
from tlkit.training.resume import Identity, check_unchanged
from tlkit.training.timing import log_estimate

if TYPE_CHECKING:
    from pathlib import Path

    import keras
    import numpy as np

    from tlkit.data.augment import ColorPCA, TrainTransform
    from tlkit.features.cache import FeatureCache, TrunkSource
    from tlkit.features.rows import Features, FirstBatch
    from tlkit.models.backbones import BackboneSpec
    from tlkit.models.model import Head, Top
    from tlkit.training.head import ProbeData

log = logging.getLogger("tlkit")


@dataclasses.dataclass(frozen=True)
class Start:
    """What a run starts from, before any choice: the backbone, its weights, the checked data
    and the model built on them."""

    spec: BackboneSpec
    size: int
    weights: ResolvedWeights
    folder: ImageFolder  # the data to train on (bad files left out under --on-bad-image skip)
    report: DataReport  # the data check of every file
    skipped: list[dict[str, Any]]
    identity: Identity  # what a resumed run must still match
    model: keras.Model
    base: keras.Model  # the backbone inside `model`
    head: Head  # what builds the head (tlkit's linear one, or the user's function)


@dataclasses.dataclass(frozen=True)
class Chosen:
    """What the freeze request and the `auto` searches decided."""

    freeze: FreezePlan
    searched: Searched  # --augment auto / --freeze auto: choices and scores
    head_features: Features | None  # computed by a search; the head phase can reuse them
    # --freeze auto: the search's chosen tail, trained; the run's end keeps it if it scores best
    search_model: list[np.ndarray] | None


@dataclasses.dataclass(frozen=True)
class Feed:
    """How the training reaches its examples, and how much each one counts."""

    transform: TrainTransform
    cache: FeatureCache | None
    fit_model: keras.Model  # the classifier, or its tail over the feature cache
    cache_note: str
    stored: dict[str, list[Example]]  # splits read from the resized-image store, if any
    weights_by_class: dict[int, float] | None
    sample_weights: list[float] | None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `finetune` trains, then records: the settings, what the run starts from, what was
    chosen, how training is fed."""

    config: FinetuneConfig  # with --augment auto resolved
    requested: dict[str, Any]  # the settings as asked for: run.json keeps `auto` and unset rates
    start: Start
    chosen: Chosen
    feed: Feed

    def inputs(self, name: str) -> Sequence[Example]:
        """What the pipeline decodes for a split: its files, or their stored resized copies."""
        return self.feed.stored.get(name) or self.split(name)

    @property
    def fingerprint(self) -> str:
        return self.start.identity.data_fingerprint

    def split(self, name: str) -> Sequence[Example]:
        return self.start.folder.splits[name]

    def eval_dataset(self, name: str, share: Share = WHOLE) -> Any:
        """A split's eval views in batches, as the run's settings say (one pass)."""
        from tlkit.data.pipeline import eval_dataset

        loader = self.config.loader
        return eval_dataset(
            self.inputs(name), self.start.size, self.start.spec.crop_fraction, loader, share
        )

    def schedule(self) -> list[tuple[str, int, float]]:
        """(phase, epochs, learning rate) of the head and fine-tune phases."""
        config, scale = self.config, self.config.lr_scale()
        tune_epochs = config.fit.epochs
        if (
            "freeze" in self.chosen.searched
            and self.chosen.freeze.n_frozen == self.chosen.freeze.n_layers
            and tune_epochs
        ):
            log.info(
                "--freeze auto chose head only: no fine-tune phase (it would train "
                "nothing but the head again)"
            )
            tune_epochs = 0
        schedule = [
            ("head", config.fit.head_epochs, config.fit.lr * scale),
            ("fine-tune", tune_epochs, config.fit.tune_lr * scale),
        ]
        if config.fit.scale_lr:
            log.info(
                "--scale-lr: batch %d / base batch %d = x%g: head lr %g, fine-tune lr %g",
                config.loader.batch_size,
                config.fit.lr_base_batch,
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


def class_weights(examples: Sequence[Example], n_classes: int) -> dict[int, float]:
    """'balanced' (scikit-learn's rule): n / (classes * count), so every class weighs the same."""
    counts = [0] * n_classes
    for e in examples:
        counts[e.label] += 1
    total = sum(counts)
    return {i: total / (n_classes * c) for i, c in enumerate(counts) if c}


@dataclasses.dataclass(frozen=True)
class Call:
    """What one finetune() call brings beside its settings (none of it is a setting): Keras'
    verbosity, a forced resume, the user's Keras callbacks and head."""

    verbose: int
    force_resume: bool = False
    callbacks: tuple[Any, ...] = ()
    head: Head | None = None


def make_plan(
    config: FinetuneConfig,
    checked: Checked,
    placement: Placement,
    saved: Identity | None,
    tmp_dir: Path | None,
    call: Call,
) -> Plan:
    """Weights, the data check, the model, freeze point, `auto` choices, augmentation and the
    cache decision (the data's listing was checked before TensorFlow loaded)."""
    from tlkit.features.rows import resolve_random_bn
    from tlkit.models.model import (
        backbone_of,
        build_model,
        check_user_head,
        head_name,
        linear_head,
        softmax_layer,
    )

    spec, size = checked.spec, checked.size
    weights = resolve_weights(spec, config.model.weights)
    folder, report, skipped, data_fingerprint = _load_data(config, checked, placement)
    requested = config.as_dict()
    config, note = config.with_data_defaults(len(folder.splits["train"]), len(folder.classes))
    log.info("%s", note)
    seed_everything(config.loader.seed)
    head = call.head or linear_head(config.fit.dropout)
    n, seed, half = len(folder.classes), config.loader.seed, config.mixed_precision
    model = build_model(spec, weights, size, n, seed, half, _top(config, spec, saved, head))
    # the rate the data chose: a rule changed by an upgrade shows on resume (a run started
    # before the rule has its rate in its config, and nothing here to compare)
    chosen = config.fit.fine_tune_lr if saved is None or saved.fine_tune_lr is not None else None
    identity = Identity(
        requested,
        spec.name,
        weights.as_dict().get("sha256"),
        size,
        spec.preprocessing,
        list(folder.classes),
        data_fingerprint,
        chosen,
        head=head_name(call.head, model),
    )
    check_unchanged(saved, identity, tmp_dir, call.force_resume)
    if call.head is not None:  # refused now, not after the training
        check_user_head(model)
        if config.fit.dropout != SETTINGS["dropout"].default:
            log.warning("--dropout %g: unused, the head is %s", config.fit.dropout, identity.head)
    if config.calibrate:
        softmax_layer(model, "--calibrate")
    train, crop, max_pixels = folder.splits["train"], spec.crop_fraction, config.loader.max_pixels
    bn = resolve_random_bn(
        model, weights.source, train, size, crop, max_pixels, config.fit.train_bn
    )
    config = config.replace(train_bn=bn)
    base = backbone_of(model)
    start = Start(spec, size, weights, folder, report, skipped, identity, model, base, head)
    return _plan_training(config, placement, saved, start, call.verbose)


def _top(config: FinetuneConfig, spec: BackboneSpec, saved: Identity | None, head: Head) -> Top:
    """The head and what it reads besides the last layer, with their scales: what a resumed
    run's first start chose and measured, else --head-features' (`auto` builds the stages'
    for its search to probe both; their scales are measured before training)."""
    from tlkit.models.backbones import stage_taps
    from tlkit.models.model import Top

    earlier = saved.searched.get("head_features") if saved is not None else None
    if earlier is None:
        return Top(head, config.model.taps(spec))
    chosen = earlier["chosen"]
    return Top(head, stage_taps(spec, chosen["head_features"]), tuple(chosen["scales"]) or None)


def _plan_training(
    config: FinetuneConfig,
    placement: Placement,
    saved: Identity | None,
    start: Start,
    verbose: int,
) -> Plan:
    """With the model built: the `auto` choices, the augmentation and the cache decision."""
    spec, size, folder = start.spec, start.size, start.folder
    by_class, sample_weights = _weights_of(config, folder)
    requested = start.identity.config
    config, chosen, start = _resolve_auto(config, placement, saved, start, sample_weights)
    freeze = chosen.freeze
    idle = nothing_to_train(start.base, freeze, config.fit.bn_trains) if config.fit.epochs else None
    if idle is not None:
        log.warning("%s", idle)
    transform = _train_transform(config, folder, size, spec)
    cache, fit_model, note = _select_cache(config, start, freeze, transform.pca, verbose, placement)
    log.info("feature cache: %s", note)
    placement.check_same(
        "feature caches",
        cache.key if cache else "000000",
        "build the cache on every worker (`tlkit precompute-features`), or train with --no-cache",
    )
    stored = _store(config, start, transform, decoded=cache is None)
    feed = Feed(transform, cache, fit_model, note, stored, by_class, sample_weights)
    return Plan(config, requested, start, chosen, feed)


def _store(
    config: FinetuneConfig, start: Start, transform: TrainTransform, decoded: bool
) -> dict[str, list[Example]]:
    """--resized-cache: each split's images in the store at the size its views need (the
    training split only when training decodes images, not cached features)."""
    if not config.storage.resized_cache:
        return {}
    from tlkit.data.augment import eval_need
    from tlkit.data.store import store_images
    from tlkit.features.cache import cache_root

    view = eval_need(start.size, start.spec.crop_fraction)
    needs = {
        name: transform.need if name == "train" else view
        for name in start.folder.splits
        if decoded or name != "train"
    }
    stored: dict[str, list[Example]] = {}
    for need in dict.fromkeys(needs.values()):  # one store per need: the log says it once
        names = [name for name in needs if needs[name] == need]
        examples = [e for name in names for e in start.folder.splits[name]]
        entries = store_images(
            examples,
            start.report.folder.digests or {},
            need,
            cache_root(config.storage.cache_dir),
            config.loader.max_pixels,
            config.loader.workers,
        )
        for name in names:
            n = len(start.folder.splits[name])
            stored[name], entries = entries[:n], entries[n:]
    return stored


def _train_transform(
    config: FinetuneConfig, folder: ImageFolder, size: int, spec: BackboneSpec
) -> TrainTransform:
    from tlkit.data.pipeline import build_train_transform

    transform = build_train_transform(
        config.augment,
        folder.splits["train"],
        size,
        spec.crop_fraction,
        max_pixels=config.loader.max_pixels,
    )
    if transform.pca is not None:
        eigenvalues = ", ".join(f"{v:.4f}" for v in transform.pca.eigvals)
        log.info("PCA colour: eigenvalues %s from %d images", eigenvalues, transform.pca.n_images)
    return transform


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
        scanned, config.audit, checked.spec.min_size, config.loader
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
    if config.fit.class_weight != "balanced":
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
    identity: Identity | None,
    start: Start,
    sample_weights: list[float] | None,
) -> tuple[FinetuneConfig, Chosen, Start]:
    """--head-features auto, --augment auto, then --freeze auto: the config with the chosen
    head features and augmentation, what was chosen (the freeze plan, {setting: {chosen,
    scores}}, features the head phase can reuse or None, the freeze search's trained model or
    None), and the start (its model rebuilt when the head reads other features). A resumed
    run reuses the choices its first start recorded."""
    spec, folder, size = start.spec, start.folder, start.size
    train = folder.splits["train"]
    searched: Searched = identity.searched.copy() if identity is not None else {}
    auto = [
        flag
        for flag, on in (
            ("--head-features auto", config.model.head_features == AUTO),
            ("--augment auto", config.augment.preset == AUTO),
            ("--freeze auto", config.model.freeze.count == AUTO),
        )
        if on
    ]
    if auto and placement.replicas > 1:
        raise ConfigError(
            f"{auto[0]} runs on one device; name a value (--augment light, "
            "--freeze all, ...) under --strategy mirrored or multiworker"
        )
    # the first search to run times the forward pass and says how long the head phase takes
    timed = [lambda per_image, total: log_estimate(per_image, total, len(train), config.fit.epochs)]
    search = _Search(start.model, spec, folder, size, sample_weights, searched, timed)
    head_features = None
    if config.model.head_features != "last":
        config, start, probed = search.head_features(config, start)
        if config.augment.preset != AUTO:
            head_features = _reusable(config, len(train), probed)
    if config.augment.preset == AUTO:
        config, head_features = search.augment(config)
    if config.model.freeze.count != AUTO:
        names = [x.name for x in start.base.layers]
        plan = resolve_freeze(config.model.freeze, spec, names)
        return config, Chosen(plan, searched, head_features, None), start
    plan, pooled, search_model = search.freeze(config)
    head_features = head_features or _reusable(config, len(train), pooled)
    return config, Chosen(plan, searched, head_features, search_model), start


def _reusable(config: FinetuneConfig, n_train: int, found: Features | None) -> Features | None:
    """A search's eval-view features, where the head phase trains on the eval view alone."""
    from tlkit.training.head import feature_views

    if found is None:
        return None
    views = feature_views(
        config.augment.random, config.fit.head_views, n_train, found.train.shape[1]
    )
    return found if views == 1 else None


@dataclasses.dataclass
class _Search:
    """--head-features, --augment auto and --freeze auto on one model: each records its
    choice and scores in `searched`, or takes the choice a resumed run's first start recorded
    there."""

    model: keras.Model
    spec: BackboneSpec
    folder: ImageFolder
    size: int
    sample_weights: list[float] | None
    searched: Searched
    timed: list[Any]  # the forward-pass timer, taken by the first search that runs

    def _data(self, on_first_batch: FirstBatch | None) -> ProbeData:
        from tlkit.training.head import ProbeData

        splits = self.folder.splits
        return ProbeData(
            self.model,
            splits["train"],
            splits["val"],
            self.size,
            self.spec.crop_fraction,
            self.sample_weights,
            on_first_batch,
        )

    def head_features(
        self, config: FinetuneConfig, start: Start
    ) -> tuple[FinetuneConfig, Start, Features | None]:
        """--head-features stages or auto: the stages measured on the eval view of the
        training images (their scales, `tap_scales`), then under auto the head probes. The
        config with the choice, the start with its model (built again as the chosen setting
        builds it, the backbone's weights kept) and the chosen candidate's eval-view
        features."""
        from tlkit.models.model import Top, backbone_of, rescaled, retapped, tap_scales, taps_of
        from tlkit.training.head import eval_view_features, search_head_features

        if "head_features" in self.searched:
            chosen = self.searched["head_features"]["chosen"]["head_features"]
            log.info("--head-features %s, as chosen when the run started", chosen)
            return config.replace(head_features=chosen), start, None
        c, taps, spec, weights = config, taps_of(start.model), start.spec, start.weights
        data = self._data(self.timed.pop() if self.timed else None)
        measured, measured_on = eval_view_features(data, config)
        whole = len(measured_on.train) == len(data.train)
        scales = tap_scales(start.model, measured.train)
        log.info(
            "--head-features: %s pooled beside the last layer, scaled by %s to its size",
            ", ".join(taps),
            ", ".join(f"{x:.3g}" for x in scales),
        )
        top = Top(start.head, taps, tuple(scales))
        model = retapped(start.model, spec, weights, top, c.mixed_precision, c.loader.seed)
        features = dataclasses.replace(
            measured,
            train=rescaled(model, measured.train, scales),
            val=rescaled(model, measured.val, scales),
        )
        chosen, scores = "stages", list[dict[str, Any]]()
        if config.model.head_features == AUTO:
            top = Top(start.head)
            last = retapped(model, spec, weights, top, c.mixed_precision, c.loader.seed)
            data = dataclasses.replace(measured_on, model=model, on_first_batch=None)
            chosen, scores, features = search_head_features(data, last, features, config)
            model = last if chosen == "last" else model
        self.searched["head_features"] = {
            "chosen": {"head_features": chosen, "scales": scales if chosen == "stages" else []},
            "scores": scores,
        }
        self.model = model
        start = dataclasses.replace(start, model=model, base=backbone_of(model))
        return config.replace(head_features=chosen), start, features if whole else None

    def augment(self, config: FinetuneConfig) -> tuple[FinetuneConfig, Features | None]:
        from tlkit.data.augment import AugmentConfig
        from tlkit.training.head import search_augment

        if "augment" in self.searched:
            chosen = AugmentConfig.from_dict(self.searched["augment"]["chosen"])
            log.info("--augment auto: %s, as chosen when the run started", chosen.preset)
            return dataclasses.replace(config, augment=chosen), None
        data = self._data(self.timed.pop() if self.timed else None)  # the first search's
        chosen, scores, features = search_augment(data, config)
        self.searched["augment"] = {"chosen": chosen.as_dict(), "scores": scores}
        return dataclasses.replace(config, augment=chosen), features

    def freeze(
        self, config: FinetuneConfig
    ) -> tuple[FreezePlan, Features | None, list[np.ndarray] | None]:
        """(the fine-tune phase's plan, the search's pooled features, the chosen tail's trained
        model). Where a tail beat the head, fine-tuning pays on this data: the fine-tune phase
        then trains the whole network, which nothing cached can stand in for, and the run keeps
        whichever of the head, the tail and the whole network scores best on validation."""
        from tlkit.models.freezing import FreezeRequest
        from tlkit.models.model import backbone_of
        from tlkit.training.freeze_search import search_freeze

        if "freeze" in self.searched:
            earlier = self.searched["freeze"]
            plan = FreezePlan(**earlier.get("fine_tune", earlier["chosen"]))
            log.info("%s, as chosen when the run started", plan.request)
            return plan, None, None
        data = self._data(self.timed.pop() if self.timed else None)
        chosen, scores, pooled, trained = search_freeze(data, self.spec, config)
        plan = dataclasses.replace(chosen, request=f"--freeze auto ({chosen.request})")
        found: Found = {"chosen": dict(plan.as_dict()), "scores": scores}
        if trained is not None:
            names = [x.name for x in backbone_of(self.model).layers]
            whole = resolve_freeze(FreezeRequest(count="0"), self.spec, names)
            plan = dataclasses.replace(
                whole, request=f"--freeze auto (the whole network, against {chosen.request})"
            )
            found["fine_tune"] = dict(plan.as_dict())
            log.info(
                "--freeze auto: %s beat the head, so the fine-tune phase trains the whole "
                "network, and the run keeps the best of the three (%s)",
                chosen.request,
                selection.CRITERION.describe(),
            )
        self.searched["freeze"] = found
        return plan, pooled, trained


def _select_cache(
    config: FinetuneConfig,
    start: Start,
    plan: FreezePlan,
    pca: ColorPCA | None,
    verbose: int,
    placement: Placement,
) -> tuple[FeatureCache | None, keras.Model, str]:
    """(cache or None, the model to fit, why): train the tail from cached activations when a
    cache matches these exact settings (or --cache builds one)."""
    from tlkit.features.cache import TrunkSource, touch
    from tlkit.models.cut import build_tail, resolve_cut

    model = start.model
    if config.storage.cache == "off":
        return None, model, "not used (--no-cache)"
    cut = resolve_cut(start.base, plan.n_frozen)
    if cut is None:
        return None, model, "not used (nothing is frozen)"
    if config.storage.views == 1 and config.augment.random:
        why = (
            f"not used: --augment {config.augment.preset} is random and a one-view cache holds "
            "no augmentation; use --views K (K > 1) or --augment none to train from a cache"
        )
        return None, model, why
    source = TrunkSource(start.spec, start.weights, model, cut, start.size)
    cache, note = _open_or_build(config, source, start.folder, pca, verbose, placement)
    if cache is None:
        return None, model, note
    if cut.k != plan.n_frozen:
        note += (
            f"; freeze point {plan.n_frozen} is inside a block, cached at the single-tensor cut "
            f"after layer {cut.k - 1} ({cut.layer}), the frozen layers after it run live"
        )
    cache.verify()
    touch(cache)
    return cache, build_tail(model, cut), note


def _open_or_build(
    config: FinetuneConfig,
    source: TrunkSource,
    folder: ImageFolder,
    pca: ColorPCA | None,
    verbose: int,
    placement: Placement,
) -> tuple[FeatureCache | None, str]:
    """The cache for these settings, built first under --cache; None and why when there is
    none."""
    from tlkit.features.cache import cache_root, open_cache
    from tlkit.features.precompute import BuildSettings, build_with_progress, prepare_cache

    c = config
    settings = BuildSettings(c.storage.views, c.storage.cache_dtype, c.loader, verbose)
    prepared = prepare_cache(source, folder, c.augment, settings, pca)
    key = prepared.key
    root = cache_root(c.storage.cache_dir)
    cache = open_cache(root, key)
    if cache is not None:
        return cache, f"using {root / key}"
    if c.storage.cache != "build":
        return None, (
            f"not used: no cache for these settings ({root / key}); `tlkit precompute-features` "
            "with the same options, or --cache, builds it"
        )
    if placement.workers > 1:
        raise ConfigError(
            "--cache build under --strategy multiworker: build the cache first with `tlkit "
            "precompute-features --strategy multiworker` (each worker computes a shard), then "
            "train from it"
        )
    cache = build_with_progress(
        root, prepared, folder, settings, placement.predictor(prepared.trunk)
    )
    return cache, f"built and used {root / key}"
