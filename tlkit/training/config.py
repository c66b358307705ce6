"""`finetune`'s settings as a frozen dataclass, validated when it is made, before any work.

Each command's settings live beside the code that uses them, all frozen dataclasses checked in
`__post_init__`: FinetuneConfig here; PrecomputeConfig in precompute.py; EvalConfig in
evaluate.py; AuditConfig (bad-image policy, pixel limit) in audit.py; AugmentConfig in
augment.py. The values a flag may take are in choices.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tlkit.core.choices import (
    CACHE_DTYPES,
    CACHE_MODES,
    CLASS_WEIGHTS,
    DEFAULT_BACKBONE,
    FINE_TUNE_LR_BY_DATA,
    SCHEDULES,
    STRATEGIES,
    check,
    fine_tune_lr_rule,
    rate_text,
)
from tlkit.core.errors import ConfigError, did_you_mean
from tlkit.data.audit import AuditConfig
from tlkit.data.augment import AugmentConfig, resolve_augment
from tlkit.data.datasets import check_val_fraction
from tlkit.models.freezing import FreezeRequest


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `tlkit finetune`; defaults are the CLI's defaults."""

    data: str = "data"
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    input_size: int | None = None  # None: the backbone's default
    # Keras guide default: after the head phase, fine-tune the whole backbone.
    freeze: FreezeRequest = field(default_factory=lambda: FreezeRequest(count="0"))
    # None: frozen, except under random weights whose signal fades without it (features/rows.py)
    train_bn: bool | None = None
    augment: AugmentConfig = field(default_factory=lambda: resolve_augment("light"))
    batch_size: int = 32
    head_epochs: int = 5
    # the head phase's features: 1 = the eval view (a linear probe), K = K augmented views
    head_views: int = 1
    epochs: int = 10
    lr: float = 1e-3
    fine_tune_lr: float | None = None  # None: from the data (FINE_TUNE_LR_BY_DATA)
    dropout: float = 0.2
    patience: int = 3
    val_fraction: float = 0.2
    seed: int = 0
    output: str | None = None  # None: runs/<backbone>-<time>
    overwrite: bool = False
    mixed_precision: bool = False
    workers: int | None = None  # None: all cores
    prefetch: int | None = None  # batches kept ready; None: tf.data autotunes
    cache: str = "auto"  # "auto": use a matching feature cache; "build": make it; "off"
    views: int = 1  # augmented views per training image in the feature cache
    cache_dir: str | None = None  # None: cache/
    cache_dtype: str = "float16"
    # decode every image once into the resized-image store (tlkit.data.store) under cache_dir
    resized_cache: bool = False
    audit: AuditConfig = field(default_factory=AuditConfig)
    class_weight: str = "none"  # "balanced": weight each class by n / (classes * count)
    recipe: str | None = None  # the recipe these settings came from, for the record
    tensorboard: bool = False  # TensorBoard logs in RUN/tensorboard/
    calibrate: bool = False  # temperature scaling fitted on val, folded into the softmax
    strategy: str = "auto"  # tf.distribute: auto | default | mirrored | multiworker
    # linear scaling rule: --lr and --fine-tune-lr are for a batch of lr_base_batch images
    scale_lr: bool = False
    lr_base_batch: int = 32
    # the fine-tune phase as timm and fastai run it (tlkit.training.optim): rate schedule, warmup,
    # decoupled weight decay, a lower rate for each earlier stage; label smoothing (both phases)
    schedule: str = "constant"
    warmup_epochs: int = 0
    weight_decay: float = 0.0
    stage_lr_decay: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1", self.batch_size),
            (self.head_epochs >= 0, "--head-epochs must be 0 or more", self.head_epochs),
            (self.epochs >= 0, "--epochs must be 0 or more", self.epochs),
            (self.head_views >= 1, "--head-views must be at least 1", self.head_views),
            (
                self.head_epochs + self.epochs > 0,
                "nothing to train: --head-epochs and --epochs are both 0",
                self.epochs,
            ),
            (self.lr > 0, "--lr must be positive", self.lr),
            (0 <= self.dropout < 1, "--dropout must be in [0, 1)", self.dropout),
            (self.patience >= 1, "--patience must be at least 1", self.patience),
            (
                self.workers is None or self.workers >= 1,
                "--workers must be at least 1",
                self.workers,
            ),
            (
                self.prefetch is None or self.prefetch >= 1,
                "--prefetch must be at least 1",
                self.prefetch,
            ),
            (self.views >= 1, "--views must be at least 1", self.views),
            (self.lr_base_batch >= 1, "--lr-base-batch must be at least 1", self.lr_base_batch),
            (self.warmup_epochs >= 0, "--warmup-epochs must be 0 or more", self.warmup_epochs),
            (self.weight_decay >= 0, "--weight-decay must be 0 or more", self.weight_decay),
            (
                0 < self.stage_lr_decay <= 1,
                "--stage-lr-decay must be in (0, 1]",
                self.stage_lr_decay,
            ),
            (
                0 <= self.label_smoothing < 1,
                "--label-smoothing must be in [0, 1)",
                self.label_smoothing,
            ),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ConfigError(f"{message}. Received: {value}")
        check_val_fraction(self.val_fraction)
        for flag, value, choices in (
            ("--cache", self.cache, CACHE_MODES),
            ("--cache-dtype", self.cache_dtype, CACHE_DTYPES),
            ("--class-weight", self.class_weight, CLASS_WEIGHTS),
            ("--strategy", self.strategy, STRATEGIES),
            ("--schedule", self.schedule, SCHEDULES),
        ):
            check(flag, value, choices)
        self._check_fine_tune_lr()

    def _check_fine_tune_lr(self) -> None:
        """Unset (the data decides) or positive, and not above --lr."""
        if self.fine_tune_lr is None:
            return
        if self.fine_tune_lr <= 0:
            raise ConfigError(f"--fine-tune-lr must be positive. Received: {self.fine_tune_lr}")
        if self.fine_tune_lr > self.lr:
            raise ConfigError(
                f"--fine-tune-lr should be lower than --lr (fine-tuning a pretrained backbone at "
                f"a high rate destroys what it learned). Received: --lr {self.lr}, "
                f"--fine-tune-lr {self.fine_tune_lr}"
            )

    @property
    def tune_lr(self) -> float:
        """The fine-tune phase's rate, once `with_data_defaults` has set it."""
        if self.fine_tune_lr is None:
            raise RuntimeError("fine_tune_lr is unset: call with_data_defaults first")
        return self.fine_tune_lr

    def with_data_defaults(self, n_train: int, n_classes: int) -> tuple[FinetuneConfig, str]:
        """These settings with the defaults that follow the data set (the fine-tune rate,
        FINE_TUNE_LR_BY_DATA, never above --lr), and the log line that says why."""
        per_class = n_train // max(n_classes, 1)
        head = f"{n_train} training images, {per_class} a class"
        if self.fine_tune_lr is not None:
            given = "given: --fine-tune-lr or a recipe"
            return self, f"{head}: fine-tune rate {rate_text(self.fine_tune_lr)} ({given})"
        rate = next(r for n, r in FINE_TUNE_LR_BY_DATA if per_class >= n)
        rule = "the default for this much data: " + fine_tune_lr_rule()
        if rate > self.lr:
            rate, rule = self.lr, f"{rule}; capped at --lr"
        note = f"{head}: fine-tune rate {rate_text(rate)} ({rule})"
        return dataclasses.replace(self, fine_tune_lr=rate), note

    def lr_scale(self) -> float:
        """What --lr and --fine-tune-lr are multiplied by: global batch / base batch under
        --scale-lr (Goyal et al. 2017, linear scaling rule), else 1."""
        return self.batch_size / self.lr_base_batch if self.scale_lr else 1.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["augment"] = self.augment.as_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """The inverse of `as_dict`: how `--resume` gets back the settings a run started with."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in names:
                raise ConfigError(f"unknown finetune setting {key!r}.{did_you_mean(key, names)}")
        values = dict(d)
        values["freeze"] = FreezeRequest(**d["freeze"])
        values["augment"] = AugmentConfig.from_dict(d["augment"])
        values["audit"] = AuditConfig(**d.get("audit", {}))
        return cls(**values)
