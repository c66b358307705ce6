"""`finetune`'s settings as a frozen dataclass, validated when it is made, before any work.

Each command's config lives beside the code that uses it (PrecomputeConfig in precompute.py,
EvalConfig in evaluate.py, AuditConfig in audit.py, AugmentConfig in augment.py, ...); every
field that is a setting is declared with `setting(name)`, so its default, range and choices are
tlkit.core.settings' and `check_fields` checks them. `__post_init__` adds only the checks that
join two settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tlkit.core.choices import FINE_TUNE_LR_BY_DATA, fine_tune_lr_rule, rate_text
from tlkit.core.errors import ConfigError, did_you_mean
from tlkit.core.settings import SETTINGS, Loader, check_fields, setting
from tlkit.data.audit import AuditConfig
from tlkit.data.augment import AugmentConfig, resolve_augment
from tlkit.models.freezing import FreezeRequest


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of `tlkit finetune`. Each field that is a setting takes its default, range and
    choices from tlkit.core.settings, as the CLI's flags do."""

    data: str = "data"
    backbone: str = setting("backbone")
    weights: str = setting("weights")
    input_size: int | None = setting("input_size")  # None: the backbone's default
    # Keras guide default: after the head phase, fine-tune the whole backbone.
    freeze: FreezeRequest = setting("freeze", factory=lambda: FreezeRequest(count="0"))
    # None: frozen, except under random weights whose signal fades without it (features/rows.py)
    train_bn: bool | None = setting("train_bn")
    augment: AugmentConfig = setting(
        "augment", factory=lambda: resolve_augment(SETTINGS["augment"].default)
    )
    batch_size: int = setting("batch_size")
    head_epochs: int = setting("head_epochs")
    # the head phase's features: 1 = the eval view (a linear probe), K = K augmented views
    head_views: int = setting("head_views")
    epochs: int = setting("epochs")
    lr: float = setting("lr")
    fine_tune_lr: float | None = setting("fine_tune_lr")  # None: from the data
    dropout: float = setting("dropout")
    patience: int = setting("patience")
    val_fraction: float = setting("val_fraction")
    seed: int = setting("seed")
    output: str | None = None  # None: runs/<backbone>-<time>
    overwrite: bool = False
    mixed_precision: bool = setting("mixed_precision")
    workers: int | None = setting("workers")  # None: all cores
    prefetch: int | None = setting("prefetch")  # batches kept ready; None: tf.data autotunes
    cache: str = setting("cache")  # "auto": use a matching feature cache; "build": make it; "off"
    views: int = setting("views")  # augmented views per training image in the feature cache
    cache_dir: str | None = setting("cache_dir")  # None: cache/
    cache_dtype: str = setting("cache_dtype")
    # decode every image once into the resized-image store (tlkit.data.store) under cache_dir
    resized_cache: bool = setting("resized_cache")
    audit: AuditConfig = field(default_factory=AuditConfig)
    class_weight: str = setting("class_weight")
    recipe: str | None = None  # the recipe these settings came from, for the record
    tensorboard: bool = setting("tensorboard")  # TensorBoard logs in RUN/tensorboard/
    calibrate: bool = setting("calibrate")  # temperature scaling on val, folded into the softmax
    strategy: str = setting("strategy")  # tf.distribute: auto | default | mirrored | multiworker
    # linear scaling rule: --lr and --fine-tune-lr are for a batch of lr_base_batch images
    scale_lr: bool = setting("scale_lr")
    lr_base_batch: int = setting("lr_base_batch")
    # the fine-tune phase as timm and fastai run it (tlkit.training.optim): rate schedule, warmup,
    # decoupled weight decay, a lower rate for each earlier stage; label smoothing (both phases)
    schedule: str = setting("schedule")
    warmup_epochs: int = setting("warmup_epochs")
    weight_decay: float = setting("weight_decay")
    stage_lr_decay: float = setting("stage_lr_decay")
    label_smoothing: float = setting("label_smoothing")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.head_epochs + self.epochs == 0:
            raise ConfigError(
                "nothing to train: --head-epochs and --epochs are both 0. Received: 0, 0"
            )
        self._check_fine_tune_lr()

    def _check_fine_tune_lr(self) -> None:
        """Unset (the data decides) or not above --lr."""
        if self.fine_tune_lr is not None and self.fine_tune_lr > self.lr:
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

    @property
    def loader(self) -> Loader:
        """How this run reads and batches its images."""
        return Loader(
            self.batch_size, self.workers, self.prefetch, self.audit.max_pixels, self.seed
        )

    @property
    def bn_trains(self) -> bool:
        """--train-bn once the plan has resolved it (None: as the weights say, make_plan)."""
        if self.train_bn is None:
            raise RuntimeError("--train-bn read before the plan resolved it")  # a bug
        return self.train_bn

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
