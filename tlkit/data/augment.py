"""Image transforms: train-time augmentation (albumentations underneath) and the eval transform.

Randomness comes only from the generator handed to a transform, and tlkit derives that
generator from (seed, epoch, index): the augmented image of a sample is the same whichever
worker makes it, and different every epoch. Eval transforms take no generator at all.

PCA colour is AlexNet's (Krizhevsky et al. 2012, section 4.1): the eigenvectors P and eigenvalues
lambda of the 3x3 covariance of RGB values (scaled to [0, 1]) over the training set are computed
once; each image gets P @ (alpha * lambda), alpha_i ~ N(0, sigma), added to every pixel (x 255
for uint8). The shift is rounded and applied as two saturating uint8 passes (add the positive
part, subtract the negative part), which equals rounding and clipping the float sum exactly.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tlkit.core.choices import AUTO
from tlkit.core.errors import ConfigError, did_you_mean
from tlkit.core.settings import AUGMENT_PRESETS, check_fields, setting
from tlkit.data.decode import Need


@dataclass(frozen=True)
class ColorPCA:
    """Eigen-decomposition of the training set's RGB covariance, pixel values in [0, 1]."""

    eigvals: tuple[float, ...]  # descending, one a channel
    eigvecs: tuple[tuple[float, ...], ...]  # 3x3, column i is the i-th component
    n_images: int
    n_pixels: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "eigvals": list(self.eigvals),
            "eigvecs": [list(r) for r in self.eigvecs],
            "n_images": self.n_images,
            "n_pixels": self.n_pixels,
        }


def fit_color_pca(
    images: Iterable[np.ndarray], pixels_per_image: int = 2048, seed: int = 0
) -> ColorPCA:
    """PCA of RGB values from a deterministic sample of pixels of the given images. `images`
    may be a generator: only the sampled pixels are kept, one decoded image at a time."""
    rng = np.random.default_rng(seed)
    chunks = []
    for img in images:
        flat = img.reshape(-1, 3)
        take = min(pixels_per_image, len(flat))
        chunks.append(flat[rng.choice(len(flat), take, replace=False)])
    pixels = np.concatenate(chunks).astype(np.float64) / 255.0
    cov = np.cov(pixels, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals, vecs = np.clip(vals[order], 0.0, None), vecs[:, order]
    return ColorPCA(
        tuple(float(v) for v in vals),
        tuple(tuple(float(x) for x in row) for row in vecs),
        len(chunks),
        len(pixels),
    )


def pixel_libraries() -> dict[str, str]:
    """Versions of the libraries that decide the pixels (decoding, resampling, augmentation):
    a new one may change the numbers, so the feature-cache key holds them."""
    from importlib.metadata import version

    import cv2
    import PIL

    return {
        "pillow": PIL.__version__,
        "opencv": cv2.__version__,
        "albumentations": version("albumentations"),
    }


def _albumentations() -> Any:
    import albumentations as A

    return A


def _pca_transform_class() -> Any:
    A = _albumentations()

    class PCAColor(A.ImageOnlyTransform):  # type: ignore[name-defined,misc]
        """AlexNet PCA colour shift with a fixed, dataset-wide PCA (FancyPCA refits per image)."""

        def __init__(self, pca: ColorPCA, sigma: float = 0.1, p: float = 1.0):
            super().__init__(p=p)
            self.pca, self.sigma = pca, sigma
            # 255 * P @ diag(lambda): the shift is this matrix times alpha
            self._basis = 255.0 * np.asarray(pca.eigvecs) * np.asarray(pca.eigvals)[None, :]

        def get_params(self) -> dict[str, Any]:
            return {"alpha": self.random_generator.normal(0.0, self.sigma, 3)}

        def apply(self, img: np.ndarray, alpha: np.ndarray, **params: Any) -> np.ndarray:
            import cv2

            shift = np.clip(np.rint(self._basis @ alpha), -255, 255).astype(int).tolist()
            up = (*(max(s, 0) for s in shift), 0)
            down = (*(max(-s, 0) for s in shift), 0)
            out: np.ndarray = cv2.subtract(cv2.add(img, up), down)  # type: ignore[call-overload]
            return out

    return PCAColor


@dataclass(frozen=True)
class AugmentConfig:
    """A resolved train-time augmentation; `as_dict` is what the run records."""

    preset: str = "none"
    crop: str = setting("crop", "center")  # "center" | "crop" | "resized-crop"
    # crop: shorter side S / input size, drawn uniformly from this range (VGG: 256/224..512/224)
    scale_range: tuple[float, float] = (256 / 224, 256 / 224)
    # resized-crop: fraction of the area and aspect ratio range (Inception)
    area: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = setting("flip_p", 0.0)
    pca_sigma: float = setting("pca_sigma", 0.0)  # 0: no PCA colour
    extra: tuple[tuple[str, str], ...] = field(default=())  # (albumentations name, JSON args)

    def __post_init__(self) -> None:
        check_fields(self)
        lo, hi = self.scale_range
        if not 1.0 <= lo <= hi:
            raise ConfigError(
                f"crop scale range must satisfy 1 <= low <= high (shorter side / "
                f"input size). Received: {self.scale_range}"
            )
        if not 0 < self.area[0] <= self.area[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(
                f"resized-crop area must be in (0, 1] and ratio positive. "
                f"Received: area={self.area}, ratio={self.ratio}"
            )
        for name, args in self.extra:
            build_extra(name, args)  # fail now, not mid-training

    @property
    def random(self) -> bool:
        return self.crop != "center" or self.flip_p > 0 or self.pca_sigma > 0 or bool(self.extra)

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "crop": self.crop,
            "scale_range": list(self.scale_range),
            "area": list(self.area),
            "ratio": list(self.ratio),
            "flip_p": self.flip_p,
            "pca_sigma": self.pca_sigma,
            "extra": [{"name": n, "args": json.loads(a)} for n, a in self.extra],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        """The inverse of `as_dict` (a run's record); the values are validated again."""
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in d.items()
            if k not in ("extra", "pca")
        }
        extra = tuple((e["name"], json.dumps(e["args"], sort_keys=True)) for e in d["extra"])
        return cls(**values, extra=extra)


# name -> the AugmentConfig fields it sets: tlkit.core.settings.AUGMENT_PRESETS, written there
PRESETS: dict[str, dict[str, Any]] = {name: fields for name, (_, fields) in AUGMENT_PRESETS.items()}


# --augment auto (finetune only): the preset is chosen on the validation split (tlkit.training.head)


def resolve_augment(
    preset: str, extra: Sequence[str] = (), allow_auto: bool = False, **overrides: Any
) -> AugmentConfig:
    """A preset by name, then explicit overrides (None means keep the preset's value)."""
    if preset == AUTO:
        if not allow_auto:
            raise ConfigError(
                "--augment auto is chosen while training (`tlkit finetune`); "
                "here name a preset: " + ", ".join(PRESETS)
            )
        if extra or any(v is not None for v in overrides.values()):
            raise ConfigError(
                "--augment auto chooses the whole augmentation; drop --crop, "
                "--flip-p, --pca-sigma and --extra-transform, or name a preset"
            )
        return AugmentConfig(preset=AUTO)
    if preset not in PRESETS:
        hint = did_you_mean(preset, PRESETS)
        raise ConfigError(
            f"unknown --augment preset {preset!r}.{hint} Choose one of: {', '.join(PRESETS)}"
        )
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return AugmentConfig(preset=preset, extra=tuple(parse_extra(e) for e in extra), **values)


def parse_extra(text: str) -> tuple[str, str]:
    """`Name` or `Name:{"json": "args"}` -> (name, canonical JSON args)."""
    name, _, args = text.partition(":")
    try:
        parsed = json.loads(args) if args.strip() else {}
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"--extra-transform {text!r}: arguments are not valid JSON ({e}); "
            'write e.g. Rotate:{"limit": 15}'
        ) from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"--extra-transform {text!r}: arguments must be a JSON object")
    return name.strip(), json.dumps(parsed, sort_keys=True)


def build_extra(name: str, args_json: str) -> Any:
    """An albumentations transform by name; a bad name or argument is a ConfigError."""
    A = _albumentations()
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        names = [
            n
            for n in dir(A)
            if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)
        ]
        hint = did_you_mean(name, names)
        raise ConfigError(f"unknown albumentations transform {name!r}.{hint}")
    args = json.loads(args_json)
    import inspect

    accepted = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    ]
    for arg in args:
        if arg not in accepted:
            hint = did_you_mean(arg, accepted)
            raise ConfigError(
                f"albumentations {name} has no argument {arg!r}.{hint} "
                f"It takes: {', '.join(accepted)}"
            )
    try:
        return cls(**args)
    except Exception as e:  # albumentations validates with pydantic; many error types
        detail = " ".join(line.strip() for line in str(e).strip().splitlines()[:3])
        raise ConfigError(f"albumentations {name}({args_json}): {detail}") from None


class TrainTransform:
    """Decoded image + generator -> augmented uint8 image of the input size.

    Holds one albumentations pipeline per thread, since a pipeline carries its random state.
    """

    def __init__(
        self, config: AugmentConfig, size: int, crop_fraction: float, pca: ColorPCA | None = None
    ):
        if config.pca_sigma > 0 and pca is None:
            raise ValueError("PCA colour needs the dataset's ColorPCA")  # a bug in the caller
        self.config, self.size, self.crop_fraction, self.pca = config, size, crop_fraction, pca
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # for worker processes: rebuild per process
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _build(self) -> Any:
        """The photometric steps; the crop is tlkit's own (`random_crop`, `random_resized_crop`)
        so that it resizes exactly as the eval transform does."""
        A, c = _albumentations(), self.config
        steps: list[Any] = []
        if c.flip_p > 0:
            steps.append(A.HorizontalFlip(p=c.flip_p))
        steps += [build_extra(name, args) for name, args in c.extra]
        if c.pca_sigma > 0:
            steps.append(_pca_transform_class()(self.pca, c.pca_sigma))
        return A.Compose(steps)

    @property
    def need(self) -> Need:
        """What the crop is resized from: the eval scale, the largest scale jitter, or the
        smallest region a random-resized crop may take."""
        c = self.config
        if c.crop == "center":
            return eval_need(self.size, self.crop_fraction)
        if c.crop == "crop":
            low, high = (max(self.size, round(self.size * x)) for x in c.scale_range)
            return Need(shorter=high, fixed_scale=low == high)
        return Need(region=c.area[0] * min(c.ratio[0], 1 / c.ratio[1]), region_side=self.size)

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, full: tuple[int, int] | None = None
    ) -> np.ndarray:
        """`full`: the (width, height) of the whole image when `image` is a reduced decode of
        it, so that a random-resized crop draws the same region at any reduction."""
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = self._build()
        c = self.config
        if c.crop == "center":  # the very eval transform: train and eval agree
            image = eval_transform(image, self.size, self.crop_fraction)
        elif c.crop == "crop":
            image = random_crop(image, self.size, c.scale_range, rng)
        else:
            image = random_resized_crop(image, self.size, c.area, c.ratio, rng, full)
        compose.set_random_state(rng, random.Random(int(rng.integers(2**63))))
        out: np.ndarray = compose(image=image)["image"]
        return out


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one source of randomness for a training sample."""
    return np.random.default_rng((seed, epoch, index))


def resize(
    image: np.ndarray, width: int, height: int, box: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """The one resampling of every path (train crops, eval, multi-crop, cached views): OpenCV's
    area average when shrinking (each output pixel averages the input pixels it covers, so no
    aliasing), bilinear when enlarging. `box` (left, top, right, bottom) resizes a region.
    Pillow's smoothing bilinear gives the same kind of result at twice the cost."""
    import cv2

    if box is not None:
        left, top, right, bottom = box
        image = image[top:bottom, left:right]
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return np.ascontiguousarray(image)
    shrink = width < w or height < h
    return cv2.resize(
        np.ascontiguousarray(image),
        (width, height),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    )


def resize_shorter(image: np.ndarray, short: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = short / min(h, w)
    return resize(image, max(short, round(w * scale)), max(short, round(h * scale)))


def eval_protocol(size: int, crop_fraction: float) -> dict[str, object]:
    """`eval_transform` in words and numbers, written beside every export: accuracy in
    deployment depends on resizing and cropping exactly this way."""
    short = max(size, round(size / crop_fraction))
    return {
        "resize_shorter_side_to": short,
        "crop_fraction": crop_fraction,
        "crop": f"centre {size}x{size}",
        "resampling": "OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging",
        "rounding": "new side = max(target, round(side * target / shorter side)); crop "
        "offset = (side - size) // 2",
    }


def eval_need(size: int, crop_fraction: float) -> Need:
    return Need(shorter=max(size, round(size / crop_fraction)), fixed_scale=True)


def eval_transform(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
    """Resize the shorter side to round(size / crop_fraction), then take the centre size x size.

    This is the single-crop protocol of the VGG/ResNet/Inception papers (crop_fraction 0.875
    means 224 out of 256).
    """
    resized = resize_shorter(image, max(size, round(size / crop_fraction)))
    h, w = resized.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def random_crop(
    image: np.ndarray, size: int, scale_range: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """AlexNet / VGG: shorter side drawn from size x scale_range, then a random size x size
    window. At scale 1/0.875 the window's pixels are the eval view's, shifted."""
    lo, hi = (max(size, round(size * x)) for x in scale_range)
    resized = resize_shorter(image, int(rng.integers(lo, hi + 1)))
    h, w = resized.shape[:2]
    top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


def random_resized_crop(
    image: np.ndarray,
    size: int,
    area: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    full: tuple[int, int] | None = None,
) -> np.ndarray:
    """Inception: a region of random area and aspect ratio, resized to size x size; after 10
    misses, the largest centred region within the ratio range (torchvision's rule). The region
    is drawn in the coordinates of the `full` (width, height) image and scaled onto `image`."""
    w, h = full or image.shape[1::-1]
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = h * w * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        aspect = min(max(w / h, ratio[0]), ratio[1])
        cw, ch = (w, round(w / aspect)) if w / h <= aspect else (round(h * aspect), h)
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    sx, sy = image.shape[1] / w, image.shape[0] / h
    box = (round(left * sx), round(top * sy), round((left + cw) * sx), round((top + ch) * sy))
    return resize(image, size, size, box=box)
