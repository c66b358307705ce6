"""Every closed set of values a flag takes, written once. Dependency-free: the CLI builds its
`click.Choice`s from here without importing TensorFlow, and the configs check their values with
`check`, so a choice, its default list and its error message cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence

from tlkit.core.errors import ConfigError, did_you_mean

# 100 megapixels: above any camera a classifier is trained from, far below a bomb's billions.
# Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS, about 179 MP) still applies above it.
DEFAULT_MAX_PIXELS = 100_000_000
# the folder names a split may have, and the split each stands for
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
SCHEDULES = ("constant", "cosine")  # the fine-tune rate over the phase (tlkit.training.optim)
CACHE_DTYPES = ("float16", "float32")
CACHE_MODES = ("auto", "build", "off")
CLASS_WEIGHTS = ("none", "balanced")
CROP_STYLES = ("center", "crop", "resized-crop")
MULTICROP_MODES = ("1", "2", "5", "10", "multiscale", "dense", "auto")  # tlkit.evaluation.views
ENSEMBLE_WEIGHTS = ("equal", "val", "greedy", "auto")
EVAL_SPLITS = ("train", "val", "test")
EXPORT_FORMATS = ("keras", "savedmodel", "tflite", "onnx")
BAD_IMAGE_POLICIES = ("error", "skip")
HEAD_FEATURES = ("last", "stages", "auto")  # what the head reads (tlkit.models.model.stage_taps)
LR_FIND_PHASES = ("head", "fine-tune")
RUN_PRESETS = ("best",)  # finetune --preset (tlkit.preset)
# --preset best's candidates: the three backbones whose ImageNet weights every install has
BEST_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
LINEAR_HEAD = "linear"  # the head's name in a run when it is tlkit's own (models/model.py)
AUTO = "auto"  # --augment auto, --freeze auto: chosen on the validation split
# --fine-tune-lr's default follows the amount of data, as measured on the icons benchmark
# (docs/accuracy.md, "The fine-tune rate along the curve"): (training images a class, on
# average, at least; rate), the first row that holds. A user's --fine-tune-lr always wins.
FINE_TUNE_LR_BY_DATA: tuple[tuple[int, float], ...] = ((200, 1e-4), (0, 1e-5))


def fine_tune_lr_rule() -> str:
    """FINE_TUNE_LR_BY_DATA in words, for --help and the log."""
    return ", ".join(
        f"{rate_text(r)} from {n} training images a class" if n else f"{rate_text(r)} below"
        for n, r in FINE_TUNE_LR_BY_DATA
    )


def rate_text(x: float) -> str:
    """1e-4 and 2.5e-5, not 0.0001 and 2.5e-05: a learning rate as it is typed."""
    mantissa, exponent = f"{x:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def check(flag: str, value: object, choices: Sequence[str]) -> None:
    """A ConfigError in the one form every choice uses, when `value` is not among `choices`."""
    if value not in choices:
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ConfigError(
            f"{flag} must be one of {', '.join(choices)}. Received: {value!r}.{hint}".rstrip(".")
        )


# The smallest of the three backbones whose ImageNet weights every install has (packages ship
# EfficientNet-Lite0, -Lite1 and -Lite2): the quickstart does real transfer learning offline.
# resnet50 and the others are one flag away.
DEFAULT_BACKBONE = "efficientnet_lite0"


MAX_NAME_BYTES = 200  # a file system takes 255, and a folder is built as <name>.incomplete-<id>


def check_folder_name(flag: str, value: str) -> str:
    """A name that becomes one folder inside a run (`--name`): never a path that leaves it."""
    if (
        not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
        or len(value.encode()) > MAX_NAME_BYTES
    ):
        raise ConfigError(
            f"{flag} must be a plain folder name (no '/', '..' or control characters, at most "
            f"{MAX_NAME_BYTES} bytes), the output goes inside the run. Received: "
            f"{value[:80]!r}{'...' if len(value) > 80 else ''}"
        )
    return value
