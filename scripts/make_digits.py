"""Regenerate examples/digits/: the 1,797 handwritten digits scikit-learn bundles, as PNGs.

    pip install scikit-learn && python scripts/make_digits.py [--out examples/digits] [--overwrite]

Each 8x8 image (16 grey levels) is saved as an 8-bit grayscale PNG, scaled 0..16 -> 0..255.
The split is fixed by a hash of the sample index (70% train, 15% val, 15% test), so rerunning the
script gives the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def split_of(index: int) -> str:
    u = int.from_bytes(hashlib.sha256(f"digit-{index}".encode()).digest()[:8], "big") / 2.0**64
    return "train" if u < 0.70 else "val" if u < 0.85 else "test"


def main() -> None:
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/digits")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    digits = load_digits()
    for split in ("train", "val", "test"):
        if (out / split).exists():
            if not args.overwrite:
                raise SystemExit(f"{out / split}: exists; pass --overwrite to regenerate")
            shutil.rmtree(out / split)
    for i, (image, target) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        path = out / split_of(i) / str(target) / f"digit-{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, mode="L").save(path)
    print(f"wrote {len(digits.images)} images under {out}/")


if __name__ == "__main__":
    main()
