"""Regenerate data/: 400 public-domain drawings from Debian's `openclipart-png`, 10 subjects.

    python scripts/fetch_openclipart.py /tmp/clipart      # downloads and files the package
    python scripts/make_drawings.py /tmp/clipart [--out data] [--overwrite]

Each subject gives 40 drawings: the first 40 distinct files of at most 25 MP in the order of
a hash of the file name, split by position in that order (24 train, 8 val, 8 test per class),
so rerunning gives the same files. Each is shrunk to at most 256 px on its longer side
(Lanczos, alpha kept: tlkit composites it over white when it decodes), so the folder stays
small enough to ship.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
from pathlib import Path

from PIL import Image

# class folder -> openclipart topic_subject
SUBJECTS = {
    "birds": "animals_birds",
    "bugs": "animals_bugs",
    "mammals": "animals_mammals",
    "fruit": "food_fruit",
    "desserts": "food_desserts",
    "computers": "computer_hardware",
    "music": "recreation_music",
    "sports": "recreation_sports",
    "road_signs": "transportation_roadsigns",
    "vehicles": "transportation_vehicles",
}
PER_SPLIT = {"train": 24, "val": 8, "test": 8}
LONGER_SIDE = 256
MAX_PIXELS = 25_000_000  # a few drawings are posters of up to 600 MP: left out, not decoded
Image.MAX_IMAGE_PIXELS = None  # the package's own files; the size check above bounds them


def order(path: Path) -> str:
    return hashlib.sha256(path.name.encode()).hexdigest()


def pixels(path: Path) -> int:
    with Image.open(path) as image:  # reads the header only
        return image.width * image.height


def shrink(source: Path) -> bytes:
    with Image.open(source) as image:
        image = image.convert("RGBA")
        scale = LONGER_SIDE / max(image.size)
        if scale < 1:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clipart", type=Path, help="the OUT folder of fetch_openclipart.py")
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    for split in PER_SPLIT:
        if (args.out / split).exists():
            if not args.overwrite:
                raise SystemExit(f"{args.out / split}: exists; pass --overwrite to regenerate")
            shutil.rmtree(args.out / split)
    total = sum(PER_SPLIT.values())
    # the package holds the same drawing under several names (a copy, a larger rendering):
    # identical once shrunk, such a pair would leak between the splits, so only the first stays
    seen: set[str] = set()
    for label, subject in SUBJECTS.items():
        files: list[tuple[Path, bytes]] = []
        for f in sorted((args.clipart / "images" / subject).glob("*.png"), key=order):
            if len(files) == total:
                break
            if pixels(f) <= MAX_PIXELS:
                png = shrink(f)
                if hashlib.sha256(png).hexdigest() not in seen:
                    seen.add(hashlib.sha256(png).hexdigest())
                    files.append((f, png))
        if len(files) < total:
            raise SystemExit(f"{subject}: {len(files)} drawings, {total} needed")
        start = 0
        for split, n in PER_SPLIT.items():
            for f, png in files[start : start + n]:
                (args.out / split / label).mkdir(parents=True, exist_ok=True)
                (args.out / split / label / f.name).write_bytes(png)
            start += n
    print(f"wrote {total * len(SUBJECTS)} drawings under {args.out}/")


if __name__ == "__main__":
    main()
