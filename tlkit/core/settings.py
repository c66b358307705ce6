"""Every setting a command takes, written once: its default, type, range or choices, and help.

The click options (`tlkit.cli.options.option`), the configs' defaults and range checks
(`setting` and `check_fields`), the resume mapping (`Setting.feeds`) and docs/commands.md are
derived from SETTINGS, so a default or a range cannot differ between the CLI and the Python API.
Dependency-free (no numpy, no click), like choices.py: `tlkit --help` imports it.

The augmentation presets live here too (AUGMENT_PRESETS): a preset made of existing settings
is one entry below and a line in docs/augmentation.md.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeVar

from tlkit.core import choices
from tlkit.core.errors import ConfigError, did_you_mean

T = TypeVar("T")

# name -> (what it does, for --help; the AugmentConfig fields it sets). `none` sets nothing.
AUGMENT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("the eval view, no augmentation", {}),
    # fine-tuning default: the eval view's scale (shorter side size / 0.875), a random
    # size x size window of it (up to 12.5% shift), mirror. Milder than ImageNet-from-scratch
    # crops, which cut small or low-resolution images down to fragments.
    "light": ("random crop at the eval scale + mirror", {"crop": "crop", "flip_p": 0.5}),
    # timm / Inception default: random area and aspect ratio, then resize; mirror.
    "standard": (
        "Inception's random resized crop + mirror",
        {"crop": "resized-crop", "flip_p": 0.5},
    ),
    # AlexNet: shorter side 256 (for 224), random 224 crop, mirror, PCA colour.
    "alexnet": (
        "crop + mirror + PCA colour",
        {"crop": "crop", "flip_p": 0.5, "pca_sigma": 0.1},
    ),
    # VGG scale jittering: shorter side drawn from [256, 512] (for 224), crop, mirror, PCA colour.
    "vgg": (
        "alexnet with scale jitter",
        {"crop": "crop", "scale_range": (256 / 224, 512 / 224), "flip_p": 0.5, "pca_sigma": 0.1},
    ),
}


@dataclass(frozen=True)
class Setting:
    """One setting. `default` None means unset: the command decides (the help says how).
    `low`/`high` bound a number (`*_open`: the bound itself is refused); `choices` close a
    string. `feeds` names the setting a flag feeds when it is not its own (--crop feeds
    `augment`, --freeze-to `freeze`). `switch` makes a --x/--no-x flag whose three states are
    these values."""

    name: str
    help: str
    default: Any = None
    type: type = str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    feeds: str | None = None
    switch: tuple[str, str, str] | None = None  # (unset, --x, --no-x)
    bare: str | None = None  # the value of the flag given without one (--multicrop)
    short: str | None = None  # the only flag, where a setting has no long one (-n)

    @property
    def flag(self) -> str:
        return self.short or "--" + self.name.replace("_", "-")

    @property
    def field(self) -> str:
        """The setting (by its flat name) this flag's value goes to."""
        return self.feeds or self.name

    def bounds_text(self) -> str:
        """The range in words, as every error and --help says it."""
        lo, hi = self.low, self.high
        if hi is None:
            if lo == 0:
                return "positive" if self.low_open else "0 or more"
            return f"above {lo:g}" if self.low_open else f"at least {lo:g}"
        left = "(" if self.low_open else "["
        right = ")" if self.high_open else "]"
        return f"in {left}{lo:g}, {hi:g}{right}"

    def within(self, value: float) -> bool:
        lo, hi = self.low, self.high
        above = lo is None or (value > lo if self.low_open else value >= lo)
        below = hi is None or (value < hi if self.high_open else value <= hi)
        return above and below

    def check(self, value: object) -> None:
        """The one check of this setting's value, for the Python API (click checks the CLI's
        with the same bounds and choices, before a config is made). None: unset."""
        if value is None:
            return
        if self.choices:
            choices.check(self.flag, value, self.choices)
        elif self.type in (int, float) and not isinstance(value, numbers.Real):
            raise ConfigError(f"{self.flag} must be a number. Received: {value!r}")
        elif isinstance(value, numbers.Real) and not self.within(float(value)):
            raise ConfigError(f"{self.flag} must be {self.bounds_text()}. Received: {value}")


_AT_LEAST_1: dict[str, Any] = {"type": int, "low": 1}
_POSITIVE: dict[str, Any] = {"type": float, "low": 0, "low_open": True}
_FRACTION: dict[str, Any] = {"type": float, "low": 0, "high": 1}
_WORKERS = "CPU threads decoding (and augmenting, where the command does) images (default: all)."


def _augment_help() -> str:
    listed = ", ".join(f"{name} ({text})" for name, (text, _) in AUGMENT_PRESETS.items())
    return (
        f"Preset: {listed}. finetune also takes auto: the preset whose head probe scores best "
        "on the validation split."
    )


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # the model
        Setting(
            "backbone", "Backbone name (`tlkit backbones` lists them).", choices.DEFAULT_BACKBONE
        ),
        Setting(
            "weights",
            "'imagenet', 'none', a weights file, or a tlkit run folder to transfer from.",
            "imagenet",
        ),
        Setting("input_size", "Square input size (default: the backbone's).", **_AT_LEAST_1),
        Setting(
            "freeze",
            "Freeze backbone layers [:N] ('all'; negative N keeps the last |N| trainable; "
            "finetune: 'auto' scores head only and the last 1-2 stages on the validation split, "
            "and where a stage beats the head also the whole network, keeping the best).",
            feeds="freeze",
        ),
        Setting("freeze_to", "Freeze up to and including this layer name.", feeds="freeze"),
        Setting("freeze_blocks", "Freeze the first K stages.", type=int, low=0, feeds="freeze"),
        Setting(
            "train_bn",
            "Let BatchNorm layers after the freeze point update their statistics [default: only "
            "under --weights none, and there only where the random network's signal fades "
            "without it].",
            type=bool,
        ),
        Setting(
            "head_features",
            "What the head reads: last (the last layer's pooled features), stages (those and "
            "the pooled ends of the 3 stages before it, concatenated); finetune also takes auto: "
            "whichever head probe scores better on the validation split.",
            "last",
            choices=choices.HEAD_FEATURES,
        ),
        Setting(
            "dropout",
            "Dropout before the classifier.",
            0.2,
            type=float,
            low=0,
            high=1,
            high_open=True,
        ),
        Setting(
            "mixed_precision",
            "float16 compute (GPUs); part of the feature-cache key, so finetune and "
            "precompute-features must agree on it.",
            False,
            type=bool,
        ),
        # the data and its loader
        Setting(
            "val_fraction",
            "Validation share when DATA has no val/ folder (stable hash split).",
            0.2,
            type=float,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
        ),
        Setting(
            "seed",
            "Seed of every random draw (split, augmentation, initialisation).",
            0,
            type=int,
            low=0,
            high=2**32 - 1,
        ),
        Setting("batch_size", "Images a batch.", 32, **_AT_LEAST_1),
        Setting("workers", _WORKERS, **_AT_LEAST_1),
        Setting("prefetch", "Batches kept ready ahead of training (default: auto).", **_AT_LEAST_1),
        Setting(
            "on_bad_image",
            "error: list every unusable file and start nothing; skip: leave them out and record "
            "each in the run.",
            "error",
            choices=choices.BAD_IMAGE_POLICIES,
        ),
        Setting(
            "max_bad_fraction",
            "With --on-bad-image skip, still stop when more than this share of the files is "
            "unusable.",
            0.1,
            **_FRACTION,
        ),
        Setting(
            "max_pixels",
            "Refuse images larger than this many pixels, a defence against decompression bombs.",
            choices.DEFAULT_MAX_PIXELS,
            **_AT_LEAST_1,
        ),
        Setting(
            "class_weight",
            "balanced: weight classes by n / (classes x count).",
            "none",
            choices=choices.CLASS_WEIGHTS,
        ),
        # augmentation
        Setting("augment", _augment_help(), "light", feeds="augment"),
        Setting(
            "crop",
            "Override the preset's crop style.",
            choices=choices.CROP_STYLES,
            feeds="augment",
        ),
        Setting("flip_p", "Override the mirroring probability.", feeds="augment", **_FRACTION),
        Setting(
            "pca_sigma",
            "Override the PCA colour strength (0 turns it off).",
            type=float,
            low=0,
            feeds="augment",
        ),
        Setting(
            "extra_transform",
            "An albumentations transform after crop and flip, e.g. 'Rotate:{\"limit\": 15}'. "
            "Repeatable.",
            (),
            feeds="augment",
        ),
        # training
        Setting(
            "head_epochs",
            "Phase 1, the head alone: it trains max(500, this many epochs) optimizer steps on "
            "the backbone's cached features.",
            5,
            type=int,
            low=0,
        ),
        Setting(
            "head_views",
            "Phase 1 trains on the features of this many views of each training image: 1 = the "
            "eval view (a linear probe), K = K augmented views.",
            1,
            **_AT_LEAST_1,
        ),
        Setting(
            "epochs",
            "Phase 2: epochs training everything after the freeze point.",
            10,
            type=int,
            low=0,
        ),
        Setting("lr", "Phase 1 learning rate (Adam).", 1e-3, **_POSITIVE),
        Setting(
            "fine_tune_lr",
            f"Phase 2 learning rate. Default: from the data, {choices.fine_tune_lr_rule()}.",
            **_POSITIVE,
        ),
        Setting(
            "schedule",
            "Phase 2's rate: constant, or a cosine decay to 0 over --epochs.",
            "constant",
            choices=choices.SCHEDULES,
        ),
        Setting(
            "warmup_epochs",
            "Phase 2 raises its rate linearly to --fine-tune-lr over this many epochs.",
            0,
            type=int,
            low=0,
        ),
        Setting(
            "weight_decay",
            "Phase 2: decoupled weight decay on kernels (AdamW); 0 = plain Adam.",
            0.0,
            type=float,
            low=0,
        ),
        Setting(
            "stage_lr_decay",
            "Phase 2: discriminative rates. The backbone's last stage trains at this fraction of "
            "--fine-tune-lr, each earlier stage at this fraction of the next.",
            1.0,
            type=float,
            low=0,
            high=1,
            low_open=True,
        ),
        Setting(
            "label_smoothing",
            "Both phases train on labels smoothed by this much (validation losses stay plain "
            "cross-entropy).",
            0.0,
            type=float,
            low=0,
            high=1,
            high_open=True,
        ),
        Setting(
            "patience",
            "Early stopping: epochs without a better validation score.",
            3,
            **_AT_LEAST_1,
        ),
        Setting(
            "scale_lr",
            "Linear scaling rule: multiply --lr and --fine-tune-lr by BATCH_SIZE / "
            "LR_BASE_BATCH (the global batch over the batch the rates were chosen for).",
            False,
            type=bool,
        ),
        Setting(
            "lr_base_batch",
            "The batch size --lr and --fine-tune-lr were chosen for (with --scale-lr).",
            32,
            **_AT_LEAST_1,
        ),
        Setting(
            "preset",
            "best: within --time-limit, train the candidates that fit (EfficientNet-Lite0, -1 "
            "and -2, each with its head alone, fine-tuned whole, its last stages fine-tuned; "
            "head features chosen on the validation split), save their leaderboard, and keep "
            "their ensemble (weighted on the validation split) as one model. --backbone, "
            "--weights, --input-size, --freeze and --head-features are the preset's.",
            choices=choices.RUN_PRESETS,
        ),
        Setting(
            "time_limit",
            "--preset best's budget for the whole command (measuring, training, ensembling), "
            "e.g. 20m, 1h30m, 90s.",
            "20m",
        ),
        Setting("tensorboard", "Write TensorBoard logs to RUN/tensorboard/.", False, type=bool),
        Setting(
            "calibrate",
            "Fit temperature scaling on the validation split after training, so the saved "
            "model's probabilities match its accuracy (accuracy is unchanged).",
            False,
            type=bool,
        ),
        Setting(
            "strategy",
            "tf.distribute: mirrored = every GPU of this machine; multiworker = the machines in "
            "TF_CONFIG; auto = multiworker if TF_CONFIG names several workers, else mirrored if "
            "several GPUs, else default (one device).",
            "auto",
            choices=choices.STRATEGIES,
        ),
        # the feature cache
        Setting(
            "cache",
            "--cache: train from the feature cache, building it first if needed. --no-cache: "
            "never. Default: use a matching cache if there is one.",
            "auto",
            choices=choices.CACHE_MODES,
            switch=("auto", "build", "off"),
        ),
        Setting(
            "views",
            "Augmented views per training image in the feature cache (1: the eval "
            "view, no augmentation).",
            1,
            **_AT_LEAST_1,
        ),
        Setting(
            "cache_dir", "Where feature caches and resized-image stores live (default: cache/)."
        ),
        Setting(
            "cache_dtype",
            "The feature cache's float type.",
            "float16",
            choices=choices.CACHE_DTYPES,
        ),
        Setting(
            "dtype", "The feature cache's float type.", "float16", choices=choices.CACHE_DTYPES
        ),
        Setting(
            "resized_cache",
            "Decode every image once into a store of PNGs at the size the views need (under "
            "--cache-dir), so that later epochs decode small images: for big photos, when "
            "`tlkit bench-input` says training waits for its input.",
            False,
            type=bool,
        ),
        Setting(
            "num_shards", "Split the work into N shards (N machines or jobs) ...", **_AT_LEAST_1
        ),
        Setting(
            "shard_index",
            "... and compute shard I (0..N-1). The last shard to finish, or `tlkit cache merge`, "
            "publishes the cache.",
            type=int,
            low=0,
        ),
        Setting("dry_run", "Print size and time estimates; write nothing.", False, type=bool),
        # lr-find
        Setting(
            "phase",
            "head: suggests --lr; fine-tune: suggests --fine-tune-lr (after a head trained "
            "first, as finetune does).",
            "head",
            choices=choices.LR_FIND_PHASES,
        ),
        Setting("start_lr", "Default: 1e-6 (head), 1e-8 (fine-tune).", **_POSITIVE),
        Setting("end_lr", "Default: 10 (head), 0.1 (fine-tune).", **_POSITIVE),
        Setting("steps", "Optimizer steps of the range test.", 100, type=int, low=10),
        # evaluation
        Setting(
            "multicrop",
            "Test-time views averaged per image: 1 (the centre crop), 2 (and its mirror), 5 "
            "(corners and centre), 10 (and their mirrors), multiscale (10 at 3 scales), dense "
            "(the whole image, fully convolutional), auto (the bare flag: the views the model "
            "saw in training, chosen on its validation split, never below single-crop there).",
            "1",
            choices=choices.MULTICROP_MODES,
            bare="auto",
        ),
        Setting(
            "ensemble_weights",
            "Member weights: 'val' fits them on the validation split (the lowest log loss), "
            "'greedy' selects members with replacement there (Caruana et al. 2004: each round "
            "adds the member that lowers the ensemble's log loss most; weights are the "
            "counts); 'auto' takes greedy where its log loss out of fold (5 folds of the "
            "validation split) beats equal weights' by more than one standard error, else equal.",
            "equal",
            choices=choices.ENSEMBLE_WEIGHTS,
        ),
        Setting(
            "split", "Split to evaluate (default: test, else val).", choices=choices.EVAL_SPLITS
        ),
        Setting("top_k", "Classes listed per image.", 5, **_AT_LEAST_1),
        Setting("format", "The export format.", "savedmodel", choices=choices.EXPORT_FORMATS),
        # diagnose
        Setting("folds", "Out-of-fold heads for the label-error search.", 5, type=int, low=2),
        Setting(
            "duplicate_similarity",
            "Cosine of the centred pooled features at or above which two images are "
            "near-duplicates.",
            0.97,
            type=float,
            low=0,
            high=1,
            low_open=True,
        ),
        Setting("top", "Rows of each list in the report.", 50, **_AT_LEAST_1),
        # previews and input benchmarks
        Setting("count", "Training images to show.", 16, short="-n", **_AT_LEAST_1),
        Setting("draws", "Augmented versions per image.", 6, **_AT_LEAST_1),
        Setting("max_workers", "Measure 1..N workers (default: all cores).", **_AT_LEAST_1),
        Setting("batches", "Timed batches per measurement.", 8, **_AT_LEAST_1),
    )
}


def setting(name: str, default: Any = dataclasses.MISSING, *, factory: Any = None) -> Any:
    """A config field that is setting `name`, checked by `check_fields`. Its default is the
    setting's, unless this field holds a resolved value (`default`: AugmentConfig.flip_p is 0
    where an unset --flip-p keeps the preset's) or a composite (`factory`: `freeze`)."""
    meta = {"setting": SETTINGS[name]}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if default is dataclasses.MISSING:
        default = SETTINGS[name].default
    return dataclasses.field(default=default, metadata=meta)


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass that is a setting, by the setting's own rule."""
    for f in dataclasses.fields(config):
        known = f.metadata.get("setting")
        if known is not None:
            known.check(getattr(config, f.name))


def part(cls: type[T], **defaults: Any) -> T:
    """A config field that is itself a config of settings (a part: `Loader`, `ModelChoice`, ...),
    shared by the commands that read it; `defaults` are this command's own (precompute freezes
    `all`). `compose` fills it from the same flat settings as the rest."""
    meta = {"part": (cls, defaults)}
    made: T = dataclasses.field(default_factory=lambda: cls(**defaults), metadata=meta)
    return made


def _part_of(f: dataclasses.Field[Any]) -> tuple[type, dict[str, Any]] | None:
    found: tuple[type, dict[str, Any]] | None = f.metadata.get("part")
    return found


def setting_names(cls: type) -> list[str]:
    """The settings a config takes, by their flat names: its own fields and its parts'."""
    names: list[str] = []
    for f in dataclasses.fields(cls):
        found = _part_of(f)
        names += setting_names(found[0]) if found else [f.name]
    if len(names) != len(set(names)):  # a bug: two parts may not share a name
        raise RuntimeError(f"{cls.__name__}: a setting in two parts: {sorted(names)}")
    return names


def compose(cls: type[T], values: Mapping[str, Any], command: str) -> T:
    """A config made from flat settings, as the CLI, recipes and run.json name them: each part
    takes the names it declares. An unknown name is refused with the nearest known one."""
    names = setting_names(cls)
    for key in values:
        if key not in names:
            raise ConfigError(f"unknown {command} setting {key!r}.{did_you_mean(key, names)}")
    return _build(cls, values)


def _build(cls: type[T], values: Mapping[str, Any]) -> T:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        found = _part_of(f)
        if found is not None:
            kwargs[f.name] = _build(found[0], {**found[1], **values})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def flat_settings(config: Any) -> dict[str, Any]:
    """The inverse of `compose`: every setting of a config by its flat name, parts opened."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out.update(flat_settings(value) if _part_of(f) else {f.name: value})
    return out


class Composed:
    """A command's config made of parts: built from flat settings as the CLI, recipes and
    run.json name them (`of`), changed by flat name (`replace`), given back flat (`settings`).
    Build one with `of`: a part made by hand has the part's defaults, not the command's."""

    command: ClassVar[str]  # as errors name it: "unknown finetune setting ..."

    @classmethod
    def of(cls, **settings: Any) -> Self:
        """Settings by their flat names (`epochs=3`, `batch_size=16`); the rest keep their
        defaults."""
        return compose(cls, settings, cls.command)

    def replace(self, **settings: Any) -> Self:
        """These settings with some changed, by flat name."""
        return compose(type(self), {**self.settings(), **settings}, self.command)

    def settings(self) -> dict[str, Any]:
        return flat_settings(self)


@dataclass(frozen=True)
class Loader:
    """How a command reads and batches images, the settings every reader of images shares:
    images a batch, decoding threads, batches kept ready, the pixel limit, and the seed of the
    shuffle and of every augmentation draw."""

    batch_size: int = setting("batch_size")
    workers: int | None = setting("workers")
    prefetch: int | None = setting("prefetch")
    max_pixels: int = setting("max_pixels")
    seed: int = setting("seed")

    def __post_init__(self) -> None:
        check_fields(self)
