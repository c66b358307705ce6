"""Icons by context across themes, for the accuracy benchmark: Debian's freedesktop icon themes
as an image folder whose class is the icon's context (actions, apps, devices, ...), grouped by
artist family so that a test split can hold out whole families (a change of artist).

    python scripts/fetch_icons.py OUT [--overwrite]

Needs `apt-get` and `dpkg-deb` (Debian or Ubuntu; no root needed for `apt-get download`) and,
to draw the themes that ship only SVG, `pip install cairosvg` (it needs the system's libcairo);
cairosvg is a dependency of this data script only, not of tlkit. Downloads the .debs into
OUT/debs (a package already there is not fetched again; one the archive lacks is skipped with a
line), unpacks them into OUT/unpacked/<package> and writes
OUT/icons/<family>/<theme>/<context>/<name>.png (RGBA) and OUT/icons/themes.json (families,
counts per theme and context, what was dropped and why, package versions). In Debian 12: 24
packages, 287 MB of .debs, 1.5 GB unpacked, about 22,000 icons (90 MB); 3.5 to 6 min.

Choices, so that every image has one true label and each theme counts each picture once:
- Contexts: actions, apps (applications), categories, devices (device), emblems, mimetypes
  (mimes), places (filesystems, GNOME 2's name), status. Others (animations, stock, panel,
  emotes, ...) and symbolic, right-to-left and @2x icons are left out.
- One image per (theme, context, name): a PNG at 48 px, else the PNG nearest to 48 within
  32-128 px (the larger first), kept at its stored size; else an SVG (a 32-128 px folder in the
  same order, then scalable/) drawn at 48 x 48 px. A PNG whose pixels are not 32-128 px (a
  few sit in the wrong folder) and a file that does not decode are left out, counted.
- Duplicates across all themes, in the fixed order of THEMES: two images are the same if their
  RGBA pixels are equal, or their 32 x 32 grey+alpha thumbnails are (a copy at another size);
  the first is kept. An image whose copies sit under two contexts is left out everywhere.
- Families: themes drawn from one another share a family (see THEMES), so a held-out family
  shares no artist with the training families.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ICONS = "usr/share/icons/"
MARK = ".fetch_icons"  # written first; --overwrite rebuilds only a folder that holds it
OURS = {MARK, "debs", "unpacked", "icons"}
SVG_PX = 48
THUMB_PX = 32

# (family, theme, package, folder inside the package), in dedup order: originals before the
# themes that copy from them. Families, from the packages' copyright files:
# tango: GNOME 2.x and MATE (a fork of it) are drawn in Tango by the same artists, GNOME-Colors
#   is "derived from the Tango icon theme"; faenza: Obsidian is Faenza's (same copyright);
# nuovo: Nuovo and YASIS are Silvestre Herrera's, LXDE's nuoveXT2 is named after and draws like
#   Nuovo; paper: Moka, Faba, Paper are Sam Hewitt's, Papirus is "based on" Paper and Numix,
#   so Numix joins; deepin: bloom and Vintage are Deepin's two themes.
THEMES: tuple[tuple[str, str, str, str], ...] = (
    ("tango", "Tango", "tango-icon-theme", ICONS + "Tango"),
    ("tango", "gnome", "gnome-icon-theme", ICONS + "gnome"),
    ("tango", "mate", "mate-icon-theme", ICONS + "mate"),
    ("tango", "gnome-colors", "gnome-colors-common", ICONS + "gnome-colors-common"),
    ("elementary", "elementary", "elementary-icon-theme", ICONS + "elementary"),
    ("elementary", "elementary-xfce", "elementary-xfce-icon-theme", ICONS + "elementary-xfce"),
    ("faenza", "Faenza", "faenza-icon-theme", ICONS + "Faenza"),
    ("faenza", "Obsidian", "obsidian-icon-theme", ICONS + "Obsidian"),
    ("oxygen", "oxygen", "oxygen-icon-theme", ICONS + "oxygen/base"),
    ("breeze", "breeze", "breeze-icon-theme", ICONS + "breeze"),
    ("nuovo", "Nuovo", "gnome-icon-theme-nuovo", ICONS + "Nuovo"),
    ("nuovo", "yasis", "gnome-icon-theme-yasis", ICONS + "yasis"),
    ("nuovo", "nuoveXT2", "lxde-icon-theme", ICONS + "nuoveXT2"),
    ("gartoon", "gartoon", "gnome-icon-theme-gartoon", ICONS + "gartoon"),
    ("suede", "Suede", "gnome-icon-theme-suede", ICONS + "Suede"),
    ("sugar", "sugar", "sugar-icon-theme", ICONS + "sugar"),
    ("paper", "Moka", "moka-icon-theme", ICONS + "Moka"),
    ("paper", "Faba", "faba-icon-theme", ICONS + "Faba"),
    ("paper", "Paper", "paper-icon-theme", ICONS + "Paper"),
    ("paper", "Papirus", "papirus-icon-theme", ICONS + "Papirus"),
    ("paper", "Numix", "numix-icon-theme", ICONS + "Numix"),
    ("paper", "Numix-Circle", "numix-icon-theme-circle", ICONS + "Numix-Circle"),
    ("suru", "suru", "suru-icon-theme", ICONS + "suru"),
    ("deepin", "bloom", "deepin-icon-theme", ICONS + "bloom"),
    ("deepin", "Vintage", "deepin-icon-theme", ICONS + "Vintage"),
)
CONTEXTS = {
    "actions": "actions",
    "apps": "apps",
    "applications": "apps",
    "categories": "categories",
    "devices": "devices",
    "device": "devices",
    "emblems": "emblems",
    "mimetypes": "mimetypes",
    "mimes": "mimetypes",
    "places": "places",
    "filesystems": "places",
    "status": "status",
}
SKIP_DIRS = {"symbolic", "sources", "scalable-up-to-32"}
SIZE_DIR = re.compile(r"^(\d+)(?:x\d+)?$")
ENTITY = re.compile(rb"<!ENTITY\s+(\S+)\s+([\"'])(.*?)\2\s*>", re.S)
DOCTYPE = re.compile(rb"<!DOCTYPE[^\[>]*\[.*?\]\s*>", re.S)


@dataclass(frozen=True)
class Icon:
    family: str
    theme: str
    context: str
    name: str
    source: Path
    keys: tuple[str, str]  # exact pixels, small thumbnail


def prepare(out: Path, overwrite: bool) -> None:
    """Refuse a folder this script did not make; clear only the icons it built before."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out} is a file; give a folder for the icons")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if names and not overwrite:
        raise SystemExit(f"{out} is not empty; pass --overwrite to rebuild a folder it made")
    if names and (MARK not in names or names - OURS):
        stray = ", ".join(sorted(names - OURS)) or f"no {MARK} mark"
        raise SystemExit(f"{out} holds what this script did not make ({stray}); use a new folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).write_text("made by scripts/fetch_icons.py\n")
    if (out / "icons").is_dir():
        shutil.rmtree(out / "icons")


def download(debs: Path, package: str) -> Path | None:
    """The package's .deb in `debs`, fetched unless already there; None if the archive lacks it."""
    have = sorted(debs.glob(f"{package}_*.deb"))
    if have:
        return have[-1]
    done = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True)
    have = sorted(debs.glob(f"{package}_*.deb"))
    if done.returncode or not have:
        why = done.stderr.decode(errors="replace").strip().splitlines()
        print(f"skip {package}: apt-get download failed ({why[-1] if why else 'no .deb'})")
        return None
    return have[-1]


def unpack(deb: Path, dest: Path) -> None:
    """Unpack into a side folder first, so an interrupted run never leaves half a package."""
    if dest.is_dir():
        return
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(part)], check=True)
    part.rename(dest)


def fetch(out: Path) -> dict[str, str]:
    """Download and unpack every package THEMES names; package -> version of those found."""
    debs, unpacked = out / "debs", out / "unpacked"
    debs.mkdir(exist_ok=True)
    unpacked.mkdir(exist_ok=True)
    before = {p.name for p in debs.glob("*.deb")}
    versions: dict[str, str] = {}
    for package in sorted({t[2] for t in THEMES}):
        deb = download(debs, package)
        if deb is None:
            continue
        unpack(deb, unpacked / package)
        field = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True)
        versions[package] = field.stdout.decode().strip()
    found = [p for p in debs.glob("*.deb") if p.name.split("_")[0] in versions]
    new = sum(p.stat().st_size for p in found if p.name not in before)
    total = sum(p.stat().st_size for p in found)
    print(f"{len(versions)} packages: {total / 1e6:.1f} MB of .debs ({new / 1e6:.1f} MB new)")
    return versions


def size_rank(size: int | None) -> int | None:
    """Lower is better: 48 px, then larger up to 128, then smaller down to 32, then scalable."""
    if size is None:
        return 1000
    if not 32 <= size <= 128:
        return None
    return size - 48 if size >= 48 else 100 + 48 - size


def locate(rel: Path) -> tuple[str, str, int] | None:
    """(context, name, rank) of an icon file by its folders inside the theme, or None to skip."""
    name, suffix = rel.stem, rel.suffix
    if suffix not in (".png", ".svg") or name.endswith(("-symbolic", ".symbolic", "-rtl")):
        return None
    dirs = rel.parts[:-1]
    if any(d in SKIP_DIRS or "@" in d for d in dirs):
        return None
    context = next((CONTEXTS[d] for d in dirs if d in CONTEXTS), None)
    sizes = [int(m.group(1)) for d in dirs if (m := SIZE_DIR.match(d))]
    if context is None or (not sizes and "scalable" not in dirs):
        return None
    rank = size_rank(sizes[0] if sizes else None)
    if rank is None or (suffix == ".png" and not sizes):
        return None
    return context, name, rank + (10_000 if suffix == ".svg" else 0)


def pick_sources(root: Path) -> dict[tuple[str, str], Path]:
    """(context, name) -> the best file for it in one theme, walked in sorted order."""
    best: dict[tuple[str, str], tuple[int, Path]] = {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for file in sorted(files):
            path = Path(folder, file)
            found = locate(path.relative_to(root))
            if found is None or not path.exists():  # a dangling symlink
                continue
            context, name, rank = found
            if (context, name) not in best or rank < best[context, name][0]:
                best[context, name] = (rank, path)
    return {key: path for key, (_, path) in sorted(best.items())}


def svg_text(path: Path) -> bytes:
    """The SVG with its internal entities written out: cairosvg refuses entities (Sugar names
    its colours with them, Illustrator its namespaces), and these are plain text values."""
    data = path.read_bytes()
    if b"<!ENTITY" not in data:
        return data
    values = {m.group(1): m.group(3) for m in ENTITY.finditer(data)}
    data = DOCTYPE.sub(b"", data, count=1)
    for name, value in values.items():
        data = data.replace(b"&" + name + b";", value)
    return data


def load(path: Path) -> Image.Image:
    """The icon as RGBA: a PNG as stored, an SVG drawn at SVG_PX square."""
    if path.suffix == ".svg":
        import cairosvg

        text = svg_text(path)
        png = cairosvg.svg2png(bytestring=text, output_width=SVG_PX, output_height=SVG_PX)
        source: Path | io.BytesIO = io.BytesIO(png)
    else:
        source = path
    with Image.open(source) as image:
        return image.convert("RGBA")


def keys(image: Image.Image) -> tuple[str, str]:
    """Hashes of the visible pixels at stored size and of a 32 px grey+alpha thumbnail."""
    rgba = np.asarray(image).copy()
    rgba[rgba[..., 3] == 0] = 0  # colour under full transparency is not part of the picture
    exact = hashlib.sha1(repr(rgba.shape).encode() + rgba.tobytes()).hexdigest()
    clean = Image.fromarray(rgba, "RGBA").convert("LA")
    thumb = np.asarray(clean.resize((THUMB_PX, THUMB_PX), Image.Resampling.BOX)) >> 3
    return "px:" + exact, "thumb:" + hashlib.sha1(thumb.tobytes()).hexdigest()


def examine(source: Path) -> tuple[str, str] | str:
    """The icon's hashes, or why it is left out: a file that does not decode, or a PNG whose
    pixels break its folder's size (a few 512 px or 22 px files sit in 48 px folders)."""
    try:
        image = load(source)
    except Exception as err:  # a broken file in the package, not our bug
        print(f"unreadable {source}: {err}")
        return "unreadable"
    if not 32 <= max(image.size) <= 128:
        return "wrong_size"
    return keys(image)


def theme_icons(family: str, theme: str, root: Path, dropped: Counter[str]) -> list[Icon]:
    """The candidate icons of one theme with their hashes; a file reached under several
    names (symlinks) is decoded once."""
    icons: list[Icon] = []
    done: dict[Path, tuple[str, str] | str] = {}
    for (context, name), source in pick_sources(root).items():
        real = source.resolve()
        if real not in done:
            done[real] = examine(source)
        found = done[real]
        if isinstance(found, str):
            dropped[f"{theme}:{found}"] += 1
            continue
        icons.append(Icon(family, theme, context, name, source, found))
    print(f"{theme}: {len(icons)} candidates")
    return icons


def collect(out: Path, versions: dict[str, str], dropped: Counter[str]) -> list[Icon]:
    """Every candidate icon of every theme found, in THEMES order."""
    icons: list[Icon] = []
    for family, theme, package, inside in THEMES:
        root = out / "unpacked" / package / inside
        if package not in versions or not root.is_dir():
            print(f"skip {theme}: {root} is missing")
            continue
        icons += theme_icons(family, theme, root, dropped)
    return icons


def dedup(icons: list[Icon], dropped: Counter[str]) -> list[Icon]:
    """Keep the first of each picture; drop pictures seen under two contexts everywhere."""
    contexts: dict[str, set[str]] = defaultdict(set)
    for icon in icons:
        for key in icon.keys:
            contexts[key].add(icon.context)
    seen: dict[str, str] = {}  # key -> theme that kept it
    kept: list[Icon] = []
    for icon in icons:
        if any(len(contexts[key]) > 1 for key in icon.keys):
            dropped[f"{icon.theme}:ambiguous"] += 1
            continue
        first = next((seen[key] for key in icon.keys if key in seen), None)
        if first is not None:
            where = "same_theme" if first == icon.theme else "other_theme"
            dropped[f"{icon.theme}:duplicate_{where}"] += 1
            continue
        seen.update(dict.fromkeys(icon.keys, icon.theme))
        kept.append(icon)
    return kept


def write(kept: list[Icon], icons_dir: Path) -> list[Path]:
    """Write every kept icon as an RGBA PNG, then reopen each to check it decodes."""
    written = []
    for icon in kept:
        path = icons_dir / icon.family / icon.theme / icon.context / f"{icon.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        load(icon.source).save(path, format="PNG")
        written.append(path)
    for path in written:
        with Image.open(path) as image:
            image.load()
            if image.mode != "RGBA":
                raise RuntimeError(f"{path} decoded as {image.mode}, not RGBA")
    return written


def tables(kept: list[Icon]) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """families -> themes (with at least one icon) and theme -> context -> count."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    families: dict[str, list[str]] = defaultdict(list)
    for icon in kept:
        counts[icon.theme][icon.context] += 1
        if icon.theme not in families[icon.family]:
            families[icon.family].append(icon.theme)
    return dict(families), {t: dict(sorted(c.items())) for t, c in counts.items()}


def report(families: dict[str, list[str]], counts: dict[str, dict[str, int]]) -> None:
    """Print per theme and context, per family, and per context totals."""
    columns = sorted({c for per in counts.values() for c in per})
    head = "".join(f"{c[:10]:>11}" for c in columns)
    print(f"{'family / theme':<28}{head}{'total':>9}")
    grand: Counter[str] = Counter()
    for family, themes in families.items():
        fam: Counter[str] = Counter()
        for theme in themes:
            row = counts[theme]
            fam.update(row)
            cells = "".join(f"{row.get(c, 0):>11}" for c in columns)
            print(f"  {theme:<26}{cells}{sum(row.values()):>9}")
        cells = "".join(f"{fam.get(c, 0):>11}" for c in columns)
        print(f"{family + ' (family)':<28}{cells}{sum(fam.values()):>9}")
        grand.update(fam)
    cells = "".join(f"{grand.get(c, 0):>11}" for c in columns)
    print(f"{'all':<28}{cells}{sum(grand.values()):>9}")


def check_tools() -> None:
    """Fail early, in one line, on a machine that cannot fetch or draw the themes."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: this script needs Debian or Ubuntu")
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as err:
        raise SystemExit(f"cannot draw SVG icons ({err}); run `pip install cairosvg`") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--overwrite", action="store_true", help="rebuild a folder it made")
    args = parser.parse_args()
    start = time.monotonic()
    check_tools()
    prepare(args.out, args.overwrite)
    versions = fetch(args.out)
    print(f"download and unpack: {time.monotonic() - start:.0f} s")
    dropped: Counter[str] = Counter()
    kept = dedup(collect(args.out, versions, dropped), dropped)
    print(f"read, drew and compared: {time.monotonic() - start:.0f} s")
    written = write(kept, args.out / "icons")
    families, counts = tables(kept)
    dropped_json: dict[str, dict[str, int]] = defaultdict(dict)
    for key, n in sorted(dropped.items()):
        theme, why = key.split(":")
        dropped_json[theme][why] = n
    meta = {"families": families, "counts": counts, "dropped": dropped_json, "packages": versions}
    (args.out / "icons" / "themes.json").write_text(json.dumps(meta, indent=1) + "\n")
    report(families, counts)
    totals: Counter[str] = Counter()
    for key, n in dropped.items():
        totals[key.split(":")[1]] += n
    print(f"dropped: {dict(sorted(totals.items()))}")
    print(f"{len(written)} icons, all decode as RGBA, in {args.out / 'icons'}")
    print(f"took {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
