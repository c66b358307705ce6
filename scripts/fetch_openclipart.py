"""Real pictures for the accuracy benchmark: Debian's `openclipart-png` (public domain drawings
filed by subject) as an image folder, one class per subject.

    python scripts/fetch_openclipart.py OUT [--min-images 30]

Needs `apt-get` (Debian or Ubuntu; no root needed for `apt-get download`). Downloads the .deb
(131 MB) into OUT/.deb, unpacks it, and links every drawing of each subject with at least
--min-images drawings into OUT/<topic>_<subject>/. A drawing filed under two subjects (the
package files about 1,200 by symlink) is left out of both, so no image has two labels.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

PACKAGE = "openclipart-png"
PNG_ROOT = Path("usr/share/openclipart/png")


def unpack(out: Path) -> Path:
    deb_dir = out / ".deb"
    deb_dir.mkdir(parents=True, exist_ok=True)
    if not list(deb_dir.glob(f"{PACKAGE}_*.deb")):
        subprocess.run(["apt-get", "download", PACKAGE], cwd=deb_dir, check=True)
    root = deb_dir / "x"
    if not (root / PNG_ROOT).is_dir():
        deb = next(deb_dir.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / PNG_ROOT


def subjects(png: Path, min_images: int) -> dict[str, list[Path]]:
    """topic_subject -> its drawings, filed there only."""
    filed: dict[Path, list[str]] = {}
    for path in sorted(png.glob("*/*/*.png")):
        subject = f"{path.parent.parent.name}_{path.parent.name}"
        filed.setdefault(path.resolve(), []).append(subject)
    once = {real: names[0] for real, names in filed.items() if len(set(names)) == 1}
    counts = Counter(once.values())
    keep = {s for s, n in counts.items() if n >= min_images}
    out: dict[str, list[Path]] = {}
    for real, subject in once.items():
        if subject in keep:
            out.setdefault(subject, []).append(real)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--min-images", type=int, default=30)
    args = parser.parse_args()
    chosen = subjects(unpack(args.out), args.min_images)
    for subject, files in sorted(chosen.items()):
        folder = args.out / "images" / subject
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            link = folder / f.name
            if not link.exists():
                os.symlink(f, link)
    total = sum(len(f) for f in chosen.values())
    print(f"{len(chosen)} subjects, {total} drawings in {args.out / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
