"""The resized-image store: every image decoded once, kept at the size its views need.

A 12-megapixel photo costs its full decode every epoch although training uses a few hundred
pixels a side of it. The store decodes each file once (at a reduced JPEG scale where the views
allow it) and keeps it as a lossless PNG just big enough for the run's views (`stored_size`).
Epochs then decode small PNGs.

Fixed-scale views (the eval view, the `light` and `alexnet` crops) are kept at exactly their
resize target and cut from the stored image as from the decoded file: the same pixels, bit for
bit. Scale-jittered and random-resized crops resize twice (once into the store, once from it),
so they are kept at twice what they need; on the hardest texture they land about a grey level
from full decode (tests/test_store.py; benchmarks/photos.py `store_parity_*`).

Entries are named by the sha256 of the file's bytes under a folder named by the hash of what
makes the pixels (the views' needs, the decode protocol, the pixel libraries), so a replaced
file or a new library is decoded again and an entry can never be stale; each is written to a
temporary name and renamed, so it is never half-written; Ctrl-C cancels the images not started
and keeps the finished entries. The original image's size travels in the PNG (`FULL_SIZE_KEY`),
so crops drawn in its coordinates land on the same content; the decoder trusts it only in a
store's entries, and only as a plausible downscale of the entry (`decode.in_store`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from tlkit.core.errors import CacheError
from tlkit.core.fsutil import (
    TEMPORARY,
    atomic_path,
    atomic_write_json,
    folder_bytes,
    read_regular,
)
from tlkit.core.progress import progress
from tlkit.data.augment import pixel_libraries, resize_shorter
from tlkit.data.datasets import Example
from tlkit.data.decode import (
    FULL_SIZE_KEY,
    REDUCED_MARGIN,
    STORE_DIR,
    STORE_RECORD,
    Need,
    decode_for,
    decode_protocol,
)

log = logging.getLogger("tlkit")

SCHEMA = 1
PNG_LEVEL = 1  # zlib's fastest: stored once, decoded every epoch
# in a store: a shared flock held by each process that writes or reads the store, until it
# exits; `cache rm` removes a store only when it can lock it exclusively
USERS = ".tlkit-users"
_USING: dict[str, int] = {}  # store folder -> descriptor of its locked USERS file


def store_inputs(need: Need) -> dict[str, object]:
    """Everything that changes a stored image; its hash names the store's folder."""
    return {
        "schema": SCHEMA,
        "need": dataclasses.asdict(need),
        "reduced_margin": REDUCED_MARGIN,
        "decode": decode_protocol(),
        "libraries": pixel_libraries(),
        "format": f"PNG, zlib level {PNG_LEVEL}",
    }


def store_folder(cache_root: Path, need: Need) -> Path:
    return cache_root / STORE_DIR / _name_of(store_inputs(need))


def stored_size(need: Need, width: int, height: int) -> int | None:
    """The stored image's shorter side, or None to keep the decoded image as it is (it is
    already no bigger than the views need). Views that resize to exactly `need.shorter` are
    cut from it as from the file; any other view resizes a second time, which stays close to
    one resize only from REDUCED_MARGIN x the pixels (from 1x, scale-jittered crops were 3.1
    grey levels off on average, random-resized crops 1.9: benchmarks/run.py `store_parity`)."""
    margin = 1 if need.fixed_scale else REDUCED_MARGIN
    fraction = margin * need.fraction(width, height)
    if fraction >= 1:
        return None
    return math.ceil(fraction * min(width, height) - 1e-9)  # the eval scale exactly, not +1


def store_images(
    examples: Sequence[Example],
    digests: dict[str, str],
    need: Need,
    cache_root: Path,
    max_pixels: int | None,
    workers: int | None = None,
    announce: bool = True,
) -> list[Example]:
    """`examples` with each path pointing at its stored image, decoding the files not stored
    yet (in parallel). `digests`: each file's sha256, from the data check. `announce`: log
    what is decoded and the store's size."""
    folder = store_folder(cache_root, need)
    if folder.is_dir():
        _use(folder)  # training reads it for the rest of the run: never removed under it
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    entries = {e.path: folder / f"{digests[e.path]}.png" for e in examples}
    todo = {entries[e.path]: e.path for e in examples if entries[e.path].name not in present}
    say = log.info if announce else log.debug
    if todo:
        say(
            "resized-image store: decoding %d of %d images once into %s",
            len(todo),
            len(examples),
            folder,
        )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            _use(folder)
            atomic_write_json(folder / STORE_RECORD, store_inputs(need))
        except OSError as e:
            raise _unwritable(folder, e) from None
        _store_all(todo, need, max_pixels, workers)
        say("resized-image store: %.1f MB in %s", folder_bytes(folder) / 1e6, folder)
    return [dataclasses.replace(e, path=str(entries[e.path])) for e in examples]


def _use(folder: Path) -> None:
    """Hold a shared lock on the store for the rest of this process (the OS drops it when the
    process ends): many processes may use a store at once, and `cache rm` waits for none."""
    if str(folder) in _USING:
        return
    fd = os.open(folder / USERS, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _USING[str(folder)] = fd


def _lock_out(folder: Path) -> int | None:
    """An exclusive lock on the store's users file, so that nobody starts using the store while
    it is removed (a process that wants it waits in `_use`); None when another live process
    uses it, -1 when no process ever did."""
    if (mine := _USING.pop(str(folder), None)) is not None:
        os.close(mine)  # this process asked for the removal itself
    try:
        fd = os.open(folder / USERS, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _store_all(
    todo: dict[Path, str], need: Need, max_pixels: int | None, workers: int | None
) -> None:
    """Decode `todo` (entry -> source) in parallel. On Ctrl-C or a failed entry the images not
    started are cancelled, as in the data check: control returns once the running ones have
    written their entry (each whole), and the finished entries stay for the next run."""
    with (
        ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool,
        progress(len(todo), "storing resized images") as advance,
    ):
        jobs = [pool.submit(_store_one, s, d, need, max_pixels) for d, s in todo.items()]
        try:
            for job in jobs:
                job.result()
                advance(1)
        finally:
            for job in jobs:
                job.cancel()  # a no-op for those done or running


def _store_one(source: str, entry: Path, need: Need, max_pixels: int | None) -> None:
    decoded = decode_for(source, need, max_pixels)
    short = stored_size(need, *decoded.full)
    image = decoded.image if short is None else resize_shorter(decoded.image, short)
    info = PngImagePlugin.PngInfo()
    info.add_text(FULL_SIZE_KEY, "{}x{}".format(*decoded.full))
    try:
        with atomic_path(entry) as tmp:
            Image.fromarray(np.ascontiguousarray(image)).save(
                tmp, format="PNG", pnginfo=info, compress_level=PNG_LEVEL
            )
    except OSError as e:
        raise _unwritable(entry.parent, e) from None


def _unwritable(folder: Path, e: OSError) -> CacheError:
    return CacheError(
        f"{folder}: cannot write the resized-image store ({e.strerror or e}); free some "
        "space, choose another --cache-dir, or train without --resized-cache"
    )


def list_stores(cache_root: Path) -> list[dict[str, object]]:
    """The resized-image stores under a cache folder, for `tlkit cache ls`: only folders that
    prove to be one (`store_problem`; `foreign_stores` lists the others)."""
    rows = []
    for key, why in _survey(cache_root):
        folder = cache_root / STORE_DIR / key
        if why is None:
            rows.append(
                {
                    "key": key,
                    "images": sum(1 for _ in folder.glob("*.png")),
                    "size_mb": round(folder_bytes(folder) / 1e6, 1),
                }
            )
    return rows


def foreign_stores(cache_root: Path) -> list[tuple[str, str]]:
    """The entries of the stores' folder that are not a store tlkit wrote, each with why."""
    return [(key, why) for key, why in _survey(cache_root) if why is not None]


def _survey(cache_root: Path) -> list[tuple[str, str | None]]:
    base = cache_root / STORE_DIR
    if base.is_symlink() or not base.is_dir():
        return []  # the feature cache's survey names a symlink or a file there
    return [(key, store_problem(cache_root, key)) for key in sorted(os.listdir(base))]


def _name_of(record: object) -> str:
    """A store's folder name: the hash of its record, what makes its pixels."""
    blob = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def store_problem(cache_root: Path, key: str) -> str | None:
    """Why `images/<key>` is not a store tlkit wrote, in words; None when it is one: a real
    folder (not a symlink) whose record (store.json) is a JSON object that hashes to its name,
    as `store_folder` names it, holding only stored images."""
    folder = cache_root / STORE_DIR / key
    try:
        mode = os.lstat(folder).st_mode
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            return "a symlink: never followed" if stat.S_ISLNK(mode) else "a file, not a store"
        record = json.loads(read_regular(folder / STORE_RECORD))
        if not isinstance(record, dict) or _name_of(record) != key:
            return f"not tlkit's: its {STORE_RECORD} is not the record of this store"
        entry = re.compile(rf"[0-9a-f]{{64}}\.png|{re.escape(STORE_RECORD)}|{re.escape(USERS)}")
        for name in sorted(os.listdir(folder)):
            temporary = TEMPORARY.fullmatch(name)
            made = entry.fullmatch(temporary[1] + temporary[2] if temporary else name)
            if not made or not stat.S_ISREG(os.lstat(folder / name).st_mode):
                return f"holds {name}, which a store never holds"
    except FileNotFoundError:
        return f"not tlkit's: holds no {STORE_RECORD}"
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return f"not tlkit's: its {STORE_RECORD} is not valid JSON"
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    return None


def remove_store(cache_root: Path, key: str) -> str | None:
    """Remove store `key` when it proves to be one tlkit wrote (`store_problem`) and no live
    process uses it. None when removed; else why it is left alone, in words."""
    why = store_problem(cache_root, key)
    if why is not None:
        return why
    folder = cache_root / STORE_DIR / key
    lock = _lock_out(folder)
    if lock is None:
        return "in use by a live process (a run training from it); try when it has ended"
    try:
        shutil.rmtree(folder)
    except OSError as e:
        return f"cannot be removed: {e.strerror or e}"
    finally:
        if lock >= 0:
            os.close(lock)
    return None
