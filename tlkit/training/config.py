"""`finetune`'s settings as frozen dataclasses, validated when they are made, before any work.

A command's config is composed of parts that other commands share: `ModelChoice` (backbone,
weights, size, freeze; models/freezing.py), `Loader` (batching, decoding, seed; core/settings.py),
`AuditConfig` (bad files; data/audit.py), and here `Fit` (how the two phases train) and `Storage`
(what is kept on disk between runs). Code takes the part it needs, not its fields. Every field
that is a setting is declared with `setting(name)`, so its default, range and choices are
tlkit.core.settings'; `__post_init__` adds only the checks that join two settings.

`FinetuneConfig.of(epochs=3, batch_size=16)` builds one from flat settings, named as the CLI,
recipes and run.json name them; `settings()` / `as_dict()` give them back flat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from tlkit.core.choices import FINE_TUNE_LR_BY_DATA, fine_tune_lr_rule, rate_text
from tlkit.core.errors import ConfigError
from tlkit.core.settings import (
    SETTINGS,
    Composed,
    Loader,
    check_fields,
    part,
    setting,
)
from tlkit.data.audit import AuditConfig
from tlkit.data.augment import AugmentConfig, resolve_augment
from tlkit.models.freezing import FreezeRequest, ModelChoice


@dataclass(frozen=True)
class Fit:
    """How the head phase and the fine-tune phase train."""

    head_epochs: int = setting("head_epochs")
    # the head phase's features: 1 = the eval view (a linear probe), K = K augmented views
    head_views: int = setting("head_views")
    epochs: int = setting("epochs")
    lr: float = setting("lr")
    fine_tune_lr: float | None = setting("fine_tune_lr")  # None: from the data
    dropout: float = setting("dropout")
    patience: int = setting("patience")
    class_weight: str = setting("class_weight")
    # None: frozen, except under random weights whose signal fades without it (features/rows.py)
    train_bn: bool | None = setting("train_bn")
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

    @property
    def bn_trains(self) -> bool:
        """--train-bn once the plan has resolved it (None: as the weights say, make_plan)."""
        if self.train_bn is None:
            raise RuntimeError("--train-bn read before the plan resolved it")  # a bug
        return self.train_bn


@dataclass(frozen=True)
class Storage:
    """What a run keeps on disk for the next: the feature cache and the resized-image store."""

    cache: str = setting("cache")  # "auto": use a matching feature cache; "build": make it; "off"
    views: int = setting("views")  # augmented views per training image in the feature cache
    cache_dir: str | None = setting("cache_dir")  # None: cache/
    cache_dtype: str = setting("cache_dtype")
    # decode every image once into the resized-image store (tlkit.data.store) under cache_dir
    resized_cache: bool = setting("resized_cache")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class FinetuneConfig(Composed):
    """Settings of `tlkit finetune`, composed of parts (module docstring). Build one from flat
    settings with `FinetuneConfig.of(...)`."""

    command: ClassVar[str] = "finetune"

    data: str = "data"
    model: ModelChoice = part(ModelChoice)
    loader: Loader = part(Loader)
    audit: AuditConfig = part(AuditConfig)
    fit: Fit = part(Fit)
    storage: Storage = part(Storage)
    augment: AugmentConfig = setting(
        "augment", factory=lambda: resolve_augment(SETTINGS["augment"].default)
    )
    val_fraction: float = setting("val_fraction")
    output: str | None = None  # None: runs/<backbone>-<time>
    overwrite: bool = False
    mixed_precision: bool = setting("mixed_precision")
    recipe: str | None = None  # the recipe these settings came from, for the record
    tensorboard: bool = setting("tensorboard")  # TensorBoard logs in RUN/tensorboard/
    calibrate: bool = setting("calibrate")  # temperature scaling on val, folded into the softmax
    strategy: str = setting("strategy")  # tf.distribute: auto | default | mirrored | multiworker

    def __post_init__(self) -> None:
        check_fields(self)

    def with_data_defaults(self, n_train: int, n_classes: int) -> tuple[FinetuneConfig, str]:
        """These settings with the defaults that follow the data set (the fine-tune rate,
        FINE_TUNE_LR_BY_DATA, never above --lr), and the log line that says why."""
        per_class = n_train // max(n_classes, 1)
        head = f"{n_train} training images, {per_class} a class"
        fit = self.fit
        if fit.fine_tune_lr is not None:
            given = "given: --fine-tune-lr or a recipe"
            return self, f"{head}: fine-tune rate {rate_text(fit.fine_tune_lr)} ({given})"
        rate = next(r for n, r in FINE_TUNE_LR_BY_DATA if per_class >= n)
        rule = "the default for this much data: " + fine_tune_lr_rule()
        if rate > fit.lr:
            rate, rule = fit.lr, f"{rule}; capped at --lr"
        note = f"{head}: fine-tune rate {rate_text(rate)} ({rule})"
        return self.replace(fine_tune_lr=rate), note

    def lr_scale(self) -> float:
        """What --lr and --fine-tune-lr are multiplied by: global batch / base batch under
        --scale-lr (Goyal et al. 2017, linear scaling rule), else 1."""
        fit = self.fit
        return self.loader.batch_size / fit.lr_base_batch if fit.scale_lr else 1.0

    def as_dict(self) -> dict[str, Any]:
        """The settings as run.json keeps them: flat, by their names."""
        out = self.settings()
        out["freeze"] = dataclasses.asdict(self.model.freeze)
        out["augment"] = self.augment.as_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        """The inverse of `as_dict`: how `--resume` gets back the settings a run started with
        (a run.json from before the parts kept its bad-file settings under `audit`; one from
        before --head-features read the last layer)."""
        values = {k: v for k, v in d.items() if k != "audit"}
        values.update(d.get("audit", {}))  # before the parts
        values.setdefault("head_features", "last")  # before --head-features: the last layer
        values["freeze"] = FreezeRequest(**d["freeze"])
        values["augment"] = AugmentConfig.from_dict(d["augment"])
        return cls.of(**values)
