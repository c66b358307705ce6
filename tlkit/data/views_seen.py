"""What the saved weights were trained on (run.json `views_seen`): the geometry of the
images of the phase they come from. Training records it; test-time views (tlkit.evaluation.views)
read it, since a view set helps only with views like those training showed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlkit.data.augment import AugmentConfig

if TYPE_CHECKING:
    from tlkit.core.runs import RunRecord


@dataclass(frozen=True)
class ViewsSeen:
    """The geometry of the images the saved weights were trained on (run.json `views_seen`)."""

    crop: str  # "center" (the eval view only) | "crop" | "resized-crop"
    scale_range: tuple[float, float]  # crop: shorter side / input size
    area: tuple[float, float]  # resized-crop: fraction of the image's area
    mirror: bool
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "crop": self.crop,
            "scale_range": list(self.scale_range),
            "area": list(self.area),
            "mirror": self.mirror,
            "why": self.why,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewsSeen:
        return cls(
            d["crop"], tuple(d["scale_range"]), tuple(d["area"]), bool(d["mirror"]), d["why"]
        )

    def scale_seen(self, factor: float) -> bool:
        """Whether training saw content at this scale (shorter side = factor x input size)."""
        tol = 1e-6
        if self.crop == "crop":
            return self.scale_range[0] - tol <= factor <= self.scale_range[1] + tol
        if self.crop == "resized-crop":  # a size x size window covers 1/factor^2 of a square
            return self.area[0] - tol <= 1.0 / factor**2 <= self.area[1] + tol
        return False


def views_trained_on(augment: AugmentConfig, augmented: bool, why: str) -> ViewsSeen:
    """What training showed the saved weights: the augmentation's geometry when they were
    trained on augmented images, else the eval view alone."""
    if not augmented:
        return ViewsSeen("center", (1.0, 1.0), (1.0, 1.0), False, why)
    mirror = augment.flip_p > 0 or any(name == "HorizontalFlip" for name, _ in augment.extra)
    (s0, s1), (a0, a1) = augment.scale_range, augment.area
    return ViewsSeen(augment.crop, (s0, s1), (a0, a1), mirror, why)


def views_seen(record: RunRecord) -> ViewsSeen:
    """From run.json; a run recorded before tlkit wrote `views_seen` is taken to have seen
    its augmentation."""
    if record.views_seen is not None:
        return ViewsSeen.from_dict(record.views_seen)
    augment = AugmentConfig.from_dict({k: v for k, v in record.augment.items() if k != "search"})
    return views_trained_on(
        augment,
        augment.random,
        "run.json has no views_seen (an older tlkit): taken from its augmentation",
    )
