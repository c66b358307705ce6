"""The feature cache: trunk activations computed once, read back every epoch.

`cache/<key>/` holds per-split shards (`.npy`, float16 by default) of activations at the cut,
labels, relative paths and `manifest.json` (counts, shapes, dtype, per-file sha256 and every key
input). The key hashes everything that changes the numbers, so a cache can never be stale: change
the data, the weights, the cut, the size, the augmentation or the seed, and it is a new key.

Never half a cache: shards are written into `<key>.incomplete-<id>/` and the folder is renamed
into place only after the manifest is written; an interrupted build resumes from the shards it
finished (each recorded with its checksum). One builder per key: a `flock` on `<key>.lock`, which
the OS releases if the builder dies, so a stale lock cannot exist. Reading verifies every file's
checksum first and then streams rows with `os.pread`: memory does not grow with the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlkit.core.choices import CACHE_DTYPES, check
from tlkit.core.errors import CacheError, ConfigError, shown
from tlkit.core.fsutil import (
    TEMPORARY,
    WRITER,
    FolderBusy,
    NotTlkit,
    atomic_path,
    atomic_write_json,
    claim,
    discard,
    file_hash,
    find_incomplete,
    hold_lock,
    incomplete_dir,
    is_incomplete,
    is_inside,
    is_live,
    load_record,
    publish_dir,
    read_json_record,
    release,
    writer_kind,
)
from tlkit.core.settings import Loader
from tlkit.data.datasets import Example

if TYPE_CHECKING:
    from tlkit.data.augment import AugmentConfig
    from tlkit.data.datasets import ImageFolder
    from tlkit.models.backbones import BackboneSpec
    from tlkit.models.cut import Cut
    from tlkit.models.distribute import Share
    from tlkit.models.weights import ResolvedWeights

SCHEMA = 1
CACHE_DIR = "cache"
SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class TrunkSource:
    """The model a cache's activations come from: its backbone (a BackboneSpec), weights (a
    ResolvedWeights), the built Keras model, where it is cut (a Cut) and the input size."""

    spec: BackboneSpec
    weights: ResolvedWeights
    model: Any
    cut: Cut
    size: int


def cache_inputs(
    source: TrunkSource,
    trunk: Any,
    folder: ImageFolder,
    augment: AugmentConfig,
    pca: dict[str, Any] | None,
    build: tuple[int, int, str],
) -> dict[str, Any]:
    """Everything that changes the cached numbers, gathered here and nowhere else; its hash
    (`key_of`) is the cache key."""
    from tlkit.data.augment import pixel_libraries
    from tlkit.data.datasets import fingerprint
    from tlkit.data.decode import decode_protocol
    from tlkit.models.model import compute_dtypes

    spec, weights, cut, size = source.spec, source.weights, source.cut, source.size
    views, seed, dtype = build
    return {
        "schema": SCHEMA,
        "backbone": spec.name,
        "weights_sha256": weights.sha256,
        "trunk_weights_sha256": weights_digest(trunk.get_weights()),
        "cut": {"k": cut.k, "requested": cut.requested},
        "input_size": size,
        "preprocessing": spec.preprocessing,
        "eval_crop_fraction": spec.crop_fraction,
        "views": {"train": views, "val": 1, "test": 1},
        "augment": augment.as_dict(),
        "pca": pca,
        "seed": seed if views > 1 else None,
        "classes": list(folder.classes),
        "files_sha256": fingerprint(folder),
        "dtype": dtype,
        "compute_dtypes": compute_dtypes(trunk),
        "libraries": pixel_libraries(),
        "decode": decode_protocol(),  # the alpha background among it
    }


KEY = re.compile(r"[0-9a-f]{20}")  # what key_of makes: every cache folder's name starts so


def key_of(inputs: dict[str, Any]) -> str:
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """sha256 of the trunk's weights: the cache is keyed by the numbers it was made with."""
    h = hashlib.sha256()
    for w in weights:
        a = np.ascontiguousarray(w)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@contextmanager
def build_lock(root: Path, key: str, wait: bool = True) -> Iterator[None]:
    """One builder per key: the others wait (or, with `wait` False, are told so)."""
    with hold_lock(root / f"{key}.lock", wait) as held:
        if not held:
            raise CacheError(
                f"{root / key}: another process is building this cache; wait for it to "
                "finish and try again"
            )
        yield


@dataclass(frozen=True)
class FeatureCache:
    path: Path
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        for split in self.manifest["splits"].values():
            for f in [*split["shards"], split["labels"]]:
                if not isinstance(f.get("file"), str) or not is_inside(self.path, f["file"]):
                    raise CacheError(
                        f"{self.path / 'manifest.json'}: names a file outside the "
                        f"cache ({f.get('file')!r}); remove the cache with "
                        f"`tlkit cache rm {self.key}`"
                    )

    @property
    def key(self) -> str:
        return self.path.name

    def verify(self) -> None:
        """Every file against its recorded sha256; a truncated or altered shard is never read."""
        for split in self.manifest["splits"].values():
            for f in [*split["shards"], split["labels"]]:
                path = self.path / f["file"]
                if (
                    not path.is_file()
                    or os.path.getsize(path) != f["bytes"]
                    or file_hash(path) != f["sha256"]
                ):
                    raise CacheError(
                        f"{path}: missing or corrupt (checksum mismatch); remove the cache with "
                        f"`tlkit cache rm {self.key}` and build it again"
                    )

    def reader(self, split: str) -> SplitReader:
        return SplitReader(self.path, self.manifest["splits"][split], self.manifest["dtype"])


class SplitReader:
    """Rows (one image, all its views) read by offset from the shard files: one descriptor per
    shard, opened once and shared by the reading threads (`os.pread` is positional, so they
    never disturb each other), closed with the reader."""

    def __init__(self, root: Path, info: dict[str, Any], dtype: str):
        self.count, self.views = info["count"], info["views"]
        self.shape = tuple(info["shape"])
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.views * int(np.prod(self.shape)) * self.dtype.itemsize
        self.files, self.starts = [], []
        start = 0
        for shard in info["shards"]:
            path = root / shard["file"]
            with open(path, "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f)
                offset = f.tell()
            self.files.append((str(path), offset))
            self.starts.append(start)
            start += shard["rows"]
        self.labels = np.load(root / info["labels"]["file"], allow_pickle=False)
        self._fds = [os.open(path, os.O_RDONLY) for path, _ in self.files]
        self._closer = weakref.finalize(self, _close_all, list(self._fds))

    def close(self) -> None:
        self._closer()

    def read(self, index: int, view: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        _, offset = self.files[shard]
        row_offset = offset + (index - self.starts[shard]) * self.row_bytes
        view_bytes = self.row_bytes // self.views
        data = os.pread(self._fds[shard], view_bytes, row_offset + view * view_bytes)
        return np.frombuffer(data, self.dtype).reshape(self.shape)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir or CACHE_DIR)


def open_cache(root: Path, key: str) -> FeatureCache | None:
    path = root / key
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    fix = (
        f"`tlkit cache rm` removes only a folder its manifest proves tlkit's: move {path} "
        "out of the cache folder and build the cache again"
    )
    info = read_json_record(manifest, CacheError, fix)
    try:
        return FeatureCache(path, info)
    except (KeyError, TypeError, AttributeError):
        raise CacheError(
            f"{manifest}: not a tlkit cache manifest (fields missing); {fix}"
        ) from None


def estimate_bytes(
    counts: dict[str, int], views: dict[str, int], shape: Sequence[int], dtype: str
) -> int:
    per = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return sum(counts[s] * views[s] * per for s in counts)


def _layout(
    counts: dict[str, int], views: dict[str, int], shape: Sequence[int], dtype: str
) -> dict[str, list[tuple[str, int, int]]]:
    """Per split, its shard files as (name, first row, end row): about SHARD_BYTES each."""
    row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    out = {}
    for split, n in counts.items():
        rows = max(1, SHARD_BYTES // (row_bytes * views[split]))
        out[split] = [
            (f"{split}-{s:05d}.npy", start, min(start + rows, n))
            for s, start in enumerate(range(0, n, rows))
        ]
    return out


def _batches(
    layout: dict[str, list[tuple[str, int, int]]], batch_size: int
) -> list[tuple[str, str, int, int]]:
    """(split, shard file, first row, end row) of every batch, in cache order. Batches never
    cross a shard file, so a row is computed in the same batch however the work is divided."""
    return [
        (split, name, b, min(b + batch_size, stop))
        for split, files in layout.items()
        for name, start, stop in files
        for b in range(start, stop, batch_size)
    ]


@dataclass(frozen=True)
class CacheJob:
    """What a cache build computes: each split's examples and its views of each, how a batch
    of them becomes images (`make_rows(split, view, first_index, examples)`: the eval transform,
    or augmented view `view`) and activations (`predict`, images -> rows of `shape`), computed
    `batch_size` images at a time and stored as `dtype`; `progress(n_images)` hears of it."""

    splits: Mapping[str, Sequence[Example]]
    views: dict[str, int]
    make_rows: Callable[[str, int, int, Sequence[Example]], Any]
    predict: Callable[[Any], Any]
    shape: tuple[int, ...]
    dtype: str
    batch_size: int
    progress: Callable[[int], None] | None = None

    def contents(self) -> Contents:
        return Contents(
            self.views,
            {s: [e.label for e in x] for s, x in self.splits.items()},
            {s: [e.relpath for e in x] for s, x in self.splits.items()},
            self.shape,
            self.dtype,
        )


@dataclass(frozen=True)
class Contents:
    """What a finished cache's rows are: per split, the views of each image, the labels and
    the paths; one view's activation shape and the stored dtype."""

    views: dict[str, int]
    labels: dict[str, list[int]]
    paths: dict[str, list[str]]
    shape: tuple[int, ...]
    dtype: str


def trunk_shape(trunk: Any) -> tuple[int, ...]:
    """One image's activations out of `trunk` (a Keras model), the batch axis left out."""
    return tuple(int(d) for d in trunk.output.shape[1:])


def _compute_batches(job: CacheJob, split: str, batches: list[tuple[int, int]]) -> np.ndarray:
    """The rows of consecutive (start, stop) batches of a split, one array."""
    views, examples = job.views[split], job.splits[split]
    first = batches[0][0] if batches else 0
    out = np.empty(((batches[-1][1] if batches else 0) - first, views, *job.shape), job.dtype)
    for start, stop in batches:
        block = out[start - first : stop - first]
        for v in range(views):
            images = job.make_rows(split, v, start, examples[start:stop])
            block[:, v] = np.asarray(job.predict(images)).astype(job.dtype)
        if job.progress is not None:
            job.progress((stop - start) * views)
    return out


def _record(path: Path, **extra: Any) -> dict[str, Any]:
    return {"file": path.name, **extra, "bytes": path.stat().st_size, "sha256": file_hash(path)}


def _publish(
    work: Path,
    root: Path,
    key: str,
    inputs: dict[str, Any],
    contents: Contents,
    shards: dict[str, list[dict[str, Any]]],
) -> FeatureCache:
    """Labels, paths and the manifest next to finished shards in `work`; then rename it to
    `root/key` whole."""
    c = contents
    manifest_splits = {}
    for split in shards:
        labels_file = work / f"{split}-labels.npy"
        with atomic_path(labels_file) as tmp:
            np.save(tmp, np.asarray(c.labels[split], np.int32), allow_pickle=False)
        atomic_write_json(work / f"{split}-paths.json", list(c.paths[split]))
        manifest_splits[split] = {
            "count": len(c.labels[split]),
            "views": c.views[split],
            "shape": list(c.shape),
            "shards": shards[split],
            "labels": _record(labels_file),
            "paths": f"{split}-paths.json",
        }
    manifest = {
        "schema": SCHEMA,
        "key": key,
        "dtype": c.dtype,
        "inputs": inputs,
        "splits": manifest_splits,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # every file was hashed from disk, so the manifest describes exactly what is published
    atomic_write_json(work / "manifest.json", manifest)
    publish_dir(work, root / key)
    return FeatureCache(root / key, manifest)


def _intact(path: Path, record: dict[str, Any] | None) -> bool:
    """A shard an interrupted build finished: on disk with the checksum it recorded."""
    return isinstance(record, dict) and path.is_file() and file_hash(path) == record.get("sha256")


def build_cache(
    root: Path, key: str, inputs: dict[str, Any], job: CacheJob, wait: bool = True
) -> FeatureCache:
    """Compute and publish the cache for `key` (or return it if another process just did)."""
    check("--dtype", job.dtype, CACHE_DTYPES)
    with build_lock(root, key, wait):
        done = open_cache(root, key)
        if done is not None:
            return done
        previous = find_incomplete(root / key)  # resumed: its finished shards are kept
        work = previous[-1] if previous else incomplete_dir(root / key, "cache")
        claim(work, "cache")  # under the build lock, so no live process holds it
        with _released_if_failed(work):
            shards = _compute_shards(work, _job_layout(job), job)
            return _publish(work, root, key, inputs, job.contents(), shards)


def _job_layout(job: CacheJob) -> dict[str, list[tuple[str, int, int]]]:
    counts = {s: len(x) for s, x in job.splits.items()}
    return _layout(counts, job.views, job.shape, job.dtype)


@contextmanager
def _released_if_failed(work: Path) -> Iterator[None]:
    """A build that stops (an error, Ctrl-C in a notebook) drops its writer lock as a dying
    process would, so `cache ls` and `cache rm` see it interrupted, not running; a finished
    one is released by `publish_dir`."""
    try:
        yield
    except BaseException:
        release(work)
        raise


def _progress(path: Path) -> dict[str, Any]:
    """The shards an interrupted build finished; a damaged record only means computing them
    again (each shard's checksum is verified before it is kept anyway)."""
    try:
        finished = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, RecursionError):
        return {}
    return finished if isinstance(finished, dict) else {}


def _compute_shards(
    work: Path, layout: dict[str, list[tuple[str, int, int]]], job: CacheJob
) -> dict[str, list[dict[str, Any]]]:
    """Every shard file of `layout` in `work`, those an interrupted build finished kept (each
    recorded with its checksum in progress.json as it is done); their records, per split."""
    progress_file = work / "progress.json"
    finished = _progress(progress_file)
    shards: dict[str, list[dict[str, Any]]] = {}
    size = job.batch_size
    for split, files in layout.items():
        shards[split] = []
        for name, start, stop in files:
            record: dict[str, Any] = finished.get(name) or {}
            if not _intact(work / name, record):
                batches = [(b, min(b + size, stop)) for b in range(start, stop, size)]
                out = _compute_batches(job, split, batches)
                with atomic_path(work / name) as tmp:
                    np.save(tmp, out, allow_pickle=False)
                record = _record(work / name, rows=stop - start)
                finished[name] = record
                atomic_write_json(progress_file, finished)
            elif job.progress is not None:
                job.progress((stop - start) * job.views[split])
            shards[split].append(record)
    progress_file.unlink()
    return shards


PART_FILE = "part.json"


def part_path(root: Path, key: str, index: int, count: int) -> Path:
    return root / f"{key}.part-{index}-of-{count}"


def build_part(
    root: Path, key: str, inputs: dict[str, Any], job: CacheJob, index: int, count: int
) -> Path:
    """Compute shard `index` of `count`: a contiguous run of the cache's batches, published
    whole as `<key>.part-<index>-of-<count>/` for `merge_parts`. A finished part is kept.
    Parts of one key are built side by side, so none takes the key's build lock: each holds
    the writer lock of its `.incomplete-` folder from its creation to its publication, and
    `cache rm` leaves a folder whose writer lock a live process holds alone."""
    final = part_path(root, key, index, count)
    if (final / PART_FILE).is_file():
        return final
    units = _batches(_job_layout(job), job.batch_size)
    mine = units[index * len(units) // count : (index + 1) * len(units) // count]
    root.mkdir(parents=True, exist_ok=True)
    work = incomplete_dir(final, "cache part")
    with _released_if_failed(work):
        pieces = _compute_pieces(work, mine, job)
        c = job.contents()
        record = {
            "schema": SCHEMA,
            "key": key,
            "index": index,
            "count": count,
            "dtype": c.dtype,
            "shape": list(c.shape),
            "inputs": inputs,
            "pieces": pieces,
            "splits": {
                s: {"views": c.views[s], "labels": c.labels[s], "paths": c.paths[s]}
                for s in c.views
            },
        }
        atomic_write_json(work / PART_FILE, record)
    try:
        publish_dir(work, final)
    except OSError:  # the same part finished elsewhere first: keep that one
        discard(work)
    return final


def _compute_pieces(
    work: Path, mine: list[tuple[str, str, int, int]], job: CacheJob
) -> list[dict[str, Any]]:
    """A part's batches in `work`, one piece file per run of consecutive batches of one shard
    file; their records."""
    pieces: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for split, name, start, stop in mine:  # consecutive batches of one shard file: one piece
        groups.setdefault((split, name), []).append((start, stop))
    for (split, name), batches in groups.items():
        first, end = batches[0][0], batches[-1][1]
        out = _compute_batches(job, split, batches)
        path = work / f"{name[:-4]}.rows-{first}-{end}.npy"
        with atomic_path(path) as tmp:
            np.save(tmp, out, allow_pickle=False)
        pieces.append(_record(path, split=split, shard=name, start=first, stop=end))
    return pieces


def read_parts(root: Path, key: str) -> tuple[int, dict[int, dict[str, Any]]]:
    """(shard count, {index: part record}) of the finished parts of `key`."""
    parts: dict[int, dict[str, Any]] = {}
    for path in root.glob(f"{key}.part-*-of-*"):
        if is_incomplete(path) or not (path / PART_FILE).is_file():
            continue
        info = read_json_record(
            path / PART_FILE, CacheError, f"remove {path} and run that shard again"
        )
        info["path"] = path
        parts[info["index"]] = info
    counts = {p["count"] for p in parts.values()}
    if len(counts) > 1:
        raise CacheError(
            f"{root / key}: parts from runs with different --num-shards "
            f"({sorted(counts)}); remove the wrong ones (`tlkit cache rm {key}` "
            "removes all) and run the shards again"
        )
    return (counts.pop() if counts else 0), parts


def pending_parts(root: Path) -> list[str]:
    """Keys that have finished parts and no published cache."""
    keys = (
        {p.name.split(".", 1)[0] for p in root.glob("*.part-*-of-*") if not is_incomplete(p)}
        if root.is_dir()
        else set()
    )
    return sorted(k for k in keys if open_cache(root, k) is None)


def _check_parts(parts: dict[int, dict[str, Any]]) -> None:
    """Every part made from the same inputs as the first, and every piece whole."""
    first = parts[0]
    for p in parts.values():
        if any(p[f] != first[f] for f in ("inputs", "splits", "dtype", "shape")):
            raise CacheError(
                f"{p['path']}: was computed with other settings or data than "
                f"{first['path']}; remove it and run that shard again"
            )
        for piece in p["pieces"]:
            path = p["path"] / piece["file"]
            if (
                not is_inside(p["path"], piece["file"])
                or not path.is_file()
                or file_hash(path) != piece["sha256"]
            ):
                raise CacheError(
                    f"{path}: missing or corrupt (checksum mismatch); remove "
                    f"{p['path']} and run shard {p['index']} again"
                )


def _finished_parts(root: Path, key: str) -> dict[int, dict[str, Any]]:
    """Every part of `key`, all finished and made alike; else one line saying what is not."""
    count, parts = read_parts(root, key)
    if not parts:
        raise CacheError(
            f"{root / key}: no finished shards to merge; `tlkit "
            "precompute-features --num-shards N --shard-index I` makes them"
        )
    missing = sorted(set(range(count)) - set(parts))
    if missing:
        raise CacheError(
            f"{root / key}: shard(s) {', '.join(map(str, missing))} of {count} "
            "not finished yet; run `tlkit precompute-features` with the same "
            f"options and --num-shards {count} --shard-index I for each"
        )
    _check_parts(parts)
    return parts


def merge_parts(root: Path, key: str) -> FeatureCache:
    """Check every part of `key` (all present, same inputs, checksums, rows covered exactly
    once) and publish the cache they make, the same bytes a one-process build writes.

    Args:
        root: the cache folder (`--cache-dir`; `cache_root(None)` is the default, ./cache).
        key: the cache's key, the name of its folder (what `precompute-features --shard` names).
    """
    with build_lock(root, key):
        done = open_cache(root, key)
        if done is not None:
            return done
        parts = _finished_parts(root, key)
        first = parts[0]
        splits, shape, dtype = first["splits"], first["shape"], first["dtype"]
        views = {s: v["views"] for s, v in splits.items()}
        layout = _layout({s: len(v["labels"]) for s, v in splits.items()}, views, shape, dtype)
        by_file: dict[str, list[tuple[dict[str, Any], Path]]] = {}
        for p in parts.values():
            for piece in p["pieces"]:
                by_file.setdefault(piece["shard"], []).append((piece, p["path"]))
        work = incomplete_dir(root / key, "cache")
        shards: dict[str, list[dict[str, Any]]] = {}
        for split, files in layout.items():
            shards[split] = []
            for name, start, stop in files:
                out = np.empty((stop - start, views[split], *shape), dtype)
                row = start
                for piece, folder in sorted(by_file.get(name, []), key=lambda x: x[0]["start"]):
                    if piece["start"] != row:
                        break
                    out[row - start : piece["stop"] - start] = np.load(
                        folder / piece["file"], allow_pickle=False
                    )
                    row = piece["stop"]
                if row != stop:
                    discard(work)
                    raise CacheError(
                        f"{root / key}: the parts do not cover rows {row}.."
                        f"{stop - 1} of {name} exactly once; remove the parts and "
                        "run the shards again"
                    )
                with atomic_path(work / name) as tmp:
                    np.save(tmp, out, allow_pickle=False)
                shards[split].append(_record(work / name, rows=stop - start))
        labels = {s: v["labels"] for s, v in splits.items()}
        paths = {s: v["paths"] for s, v in splits.items()}
        contents = Contents(views, labels, paths, tuple(shape), dtype)
        cache = _publish(work, root, key, first["inputs"], contents, shards)
        for p in parts.values():
            shutil.rmtree(p["path"])
        return cache


# the files a cache, a build or a shard part holds: shards, labels, paths, its records
CACHE_ENTRY = re.compile(
    r"(train|val|test)-(\d{5,}(\.rows-\d+-\d+)?\.npy|labels\.npy|paths\.json)"
    r"|manifest\.json|part\.json|progress\.json"
)
BEING_BUILT = "being built by a live process"


@dataclass(frozen=True)
class Found:
    """An entry of the cache root and what it proves to be: `kind` is "cache", "interrupted
    build" or "shard part", or None for anything not tlkit's, with `why` in words."""

    name: str
    kind: str | None
    why: str = ""

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[0]


def survey(root: Path) -> list[Found]:
    """Every entry of the cache root but the store folder and the lock files, each with what
    it proves to be. Nothing is taken from a name alone and no symlink is followed."""
    from tlkit.data.decode import STORE_DIR

    found = []
    for name in sorted(os.listdir(root)) if root.is_dir() else []:
        path = root / name
        real_dir = path.is_dir() and not path.is_symlink()
        if (name == STORE_DIR and real_dir) or _lock_file(path):
            continue
        found.append(_classify(path))
    return found


def _lock_file(path: Path) -> bool:
    """A build lock tlkit made: `<key>.lock` of a key as key_of makes it, an empty regular file
    (never written to). Any other `.lock` is not tlkit's."""
    if path.suffix != ".lock" or not KEY.fullmatch(path.stem):
        return False
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        return stat.S_ISREG(st.st_mode) and st.st_size == 0
    return False


def _classify(path: Path) -> Found:
    """What the entry `path` proves to be, by the record tlkit wrote in it: a manifest whose key
    is the folder's name, a part record naming the part, or the writer file of a cache build;
    and it holds only files a cache holds."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return Found(path.name, None, "gone while we looked")
    if stat.S_ISLNK(mode):
        return Found(path.name, None, "a symlink: never followed")
    if not stat.S_ISDIR(mode):
        return Found(path.name, None, "a file, not a cache folder")
    try:
        kind = _proven_kind(path)
        foreign = [n for n in sorted(os.listdir(path)) if not _cache_file(path / n)]
    except NotTlkit as e:
        return Found(path.name, None, f"not tlkit's: {e}")
    except OSError as e:
        return Found(path.name, None, f"cannot be read: {e.strerror or e}")
    if foreign:
        n = len(foreign)
        return Found(
            path.name,
            None,
            f"holds {n} {'entry' if n == 1 else 'entries'} a cache never holds (e.g. {foreign[0]})",
        )
    return Found(path.name, kind)


def _proven_kind(path: Path) -> str:
    """The kind `path` proves to be by its record; NotTlkit says why it proves none. Every
    folder tlkit makes there is named after a key as key_of makes it."""
    name = path.name
    if is_incomplete(name):
        if writer_kind(path) not in ("cache", "cache part"):
            raise NotTlkit("no writer file of a cache build in it")
        kind = "interrupted build"
    elif ".part-" in name:
        info = load_record(path / PART_FILE, "cache part")
        if name != part_path(path.parent, info["key"], info["index"], info["count"]).name:
            raise NotTlkit(f"its {PART_FILE} is the record of another part")
        kind = "shard part"
    else:
        info = load_record(path / "manifest.json", "cache")
        if info["key"] != name:
            raise NotTlkit(f"its manifest.json is the record of key {str(info['key'])[:40]!r}")
        kind = "cache"
    if not KEY.fullmatch(name.split(".", 1)[0]):
        raise NotTlkit("its name does not start with a cache key (20 hex digits)")
    return kind


def _cache_file(path: Path) -> bool:
    """A regular file a cache, a build or a part holds (or atomic_path's temporary of one)."""
    name, temporary = path.name, TEMPORARY.fullmatch(path.name)
    named = (
        name == WRITER
        or CACHE_ENTRY.fullmatch(name) is not None
        or (temporary is not None and CACHE_ENTRY.fullmatch(temporary[1] + temporary[2]))
    )
    return bool(named) and stat.S_ISREG(os.lstat(path).st_mode)


def list_caches(root: Path) -> list[dict[str, Any]]:
    """The finished caches under `root`, for `cache ls`: only folders that prove to be one."""
    rows = []
    for found in survey(root):
        if found.kind != "cache":
            continue
        path = root / found.name
        try:
            inputs = load_record(path / "manifest.json", "cache")["inputs"]
        except NotTlkit:
            continue  # changed since the survey
        inputs = inputs if isinstance(inputs, dict) else {}
        cut, views = inputs.get("cut"), inputs.get("views")
        files = [f.stat() for f in path.iterdir()]
        rows.append(
            {
                "key": path.name,
                "backbone": str(inputs.get("backbone", "?")),
                "freeze": cut.get("k", "?") if isinstance(cut, dict) else "?",
                "views": views.get("train", "?") if isinstance(views, dict) else "?",
                "size_mb": round(sum(f.st_size for f in files) / 1e6, 1),
                "last_used": datetime.fromtimestamp(max(f.st_atime for f in files)).strftime(
                    "%Y-%m-%d %H:%M"
                ),
            }
        )
    return rows


def list_unfinished(root: Path) -> list[dict[str, Any]]:
    """Interrupted builds and unmerged shard parts: kept, since they resume, but listed by
    `cache ls` so they do not pile up unseen; one a live process is writing says so."""
    rows = []
    for found in survey(root):
        if found.kind not in ("interrupted build", "shard part"):
            continue
        path = root / found.name
        live = found.kind == "interrupted build" and is_live(path)
        rows.append(
            {
                "folder": found.name,
                "key": found.key,
                "size_mb": round(sum(f.stat().st_size for f in path.iterdir()) / 1e6, 1),
                "kind": BEING_BUILT if live else found.kind,
                "live": live,
                "last_written": datetime.fromtimestamp(path.stat().st_mtime).strftime(
                    "%Y-%m-%d %H:%M"
                ),
            }
        )
    return rows


def list_foreign(root: Path) -> list[Found]:
    """What `cache rm` leaves alone under `root` because it is not tlkit's, with why: entries of
    the root, and of the resized-image stores' folder (`images/NAME`)."""
    from tlkit.data.decode import STORE_DIR
    from tlkit.data.store import foreign_stores

    stores = [Found(f"{STORE_DIR}/{name}", None, why) for name, why in foreign_stores(root)]
    return [f for f in survey(root) if f.kind is None] + stores


def touch(cache: FeatureCache) -> None:
    """Record a use, for `cache ls`."""
    now = time.time()
    os.utime(cache.path / "manifest.json", (now, os.stat(cache.path / "manifest.json").st_mtime))


@dataclass
class Removal:
    """What `cache rm` removed, and what it left alone with why (names under the root)."""

    removed: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)


def remove_caches(root: Path, key: str | None) -> Removal:
    """Remove one cache (or all, key None) with its interrupted builds and shard parts, and the
    resized-image store of that key: only what proves to be tlkit's (`survey`) and no live
    process is writing. The rest is left alone and named with why; a KEY of which nothing is
    removed is an error line, and a KEY that is not a name (a path) one before anything."""
    if key is not None and (Path(key).name != key or key in (".", "..") or "\0" in key):
        raise ConfigError(
            f"{shown(key)}: not a cache key, which names a folder in {root} and is never a "
            "path; `tlkit cache ls` lists the keys"
        )
    found = [f for f in survey(root) if key is None or f.key == key]
    out = Removal(left=[(f.name, f.why) for f in found if f.kind is None])
    for k in sorted({f.key for f in found if f.kind is not None}):
        _remove_key(root, k, [f for f in found if f.kind is not None and f.key == k], out)
    _remove_stores(root, key, out)
    _remove_locks(root, key)
    if key is not None and not out.removed:
        if not out.left:
            raise CacheError(f"{root / key}: no such cache; `tlkit cache ls` lists them")
        name, why = out.left[0]
        more = f" (and {len(out.left) - 1} more)" if len(out.left) > 1 else ""
        raise CacheError(f"{root / key}: nothing removed: {name} is left alone, {why}{more}")
    return out


def _remove_locks(root: Path, key: str | None) -> None:
    """The build locks (`_lock_file`) of KEY, or of every key, that has nothing of tlkit's left;
    one a running build holds stays: a third process must wait on it."""
    left = {f.key for f in survey(root) if f.kind is not None}
    every = sorted(os.listdir(root)) if root.is_dir() else []
    for lock in (root / name for name in ([f"{key}.lock"] if key is not None else every)):
        if _lock_file(lock) and lock.stem not in left:
            with hold_lock(lock, wait=False) as held:
                if held:
                    lock.unlink()


def _remove_key(root: Path, key: str, found: list[Found], out: Removal) -> None:
    """Remove `found`, the folders of `key`, under its build lock: a build or merge running
    holds it, and then all of them stay."""
    try:
        with hold_lock(root / f"{key}.lock", wait=False) as held:
            for f in found:
                why = _remove_one(root / f.name) if held else BEING_BUILT
                if why:
                    out.left.append((f.name, why))
                else:
                    out.removed.append(f.name)
    except OSError as e:  # the lock file cannot be made or opened
        out.left += [(f.name, f"its lock cannot be taken: {e.strerror or e}") for f in found]


def _remove_one(path: Path) -> str | None:
    """Remove the folder `path`; why not, in words, when a live process is writing it (its
    writer lock, held by us while we remove; a part just published keeps it until its writer
    file is gone) or it cannot be removed."""
    claimed = False
    try:
        if os.path.lexists(path / WRITER):
            if is_live(path):  # this process's own builds too
                return BEING_BUILT
            claim(path)
            claimed = True
        shutil.rmtree(path)
    except FolderBusy:
        return BEING_BUILT
    except OSError as e:
        return f"cannot be removed: {e.strerror or e}"
    finally:
        if claimed:
            release(path)
    return None


def _remove_stores(root: Path, key: str | None, out: Removal) -> None:
    """The resized-image stores: one KEY, or every one and then their folder if left empty."""
    from tlkit.data.decode import STORE_DIR
    from tlkit.data.store import remove_store

    base = root / STORE_DIR
    if base.is_symlink() or not base.is_dir():
        return  # `survey` names a symlink or a file there
    names = sorted(os.listdir(base)) if key is None else [key]  # a KEY is a name
    for name in names:
        if os.path.lexists(base / name):
            why = remove_store(root, name)
            label = f"{STORE_DIR}/{name}"
            if why:
                out.left.append((label, why))
            else:
                out.removed.append(label)
    if key is None:
        with contextlib.suppress(OSError):
            base.rmdir()  # only when empty


def cache_dataset(
    cache: FeatureCache,
    split: str,
    loader: Loader,
    epochs: range | None = range(1),
    share: Share | None = None,
    sample_weights: Sequence[float] | None = None,
) -> Any:
    """(features, labels) batches from the cache, shared between replicas exactly like the
    image pipeline: the epochs `epochs` shuffled as it shuffles them, or (None) one pass in
    order."""
    from tlkit.data.augment import sample_rng
    from tlkit.data.pipeline import BatchMaker, epoch_jobs, ordered_jobs, run_jobs
    from tlkit.models.distribute import WHOLE

    share = share or WHOLE
    reader = cache.reader(split)
    seed = loader.seed

    def make_batch(epoch: Any, indices: np.ndarray) -> np.ndarray:
        rows = []
        for i in indices:
            view = (
                0
                if reader.views == 1
                else int(sample_rng(seed, int(epoch), int(i)).integers(reader.views))
            )
            rows.append(reader.read(int(i), view))
        return np.stack(rows).astype(np.float32)

    jobs = (
        epoch_jobs(reader.count, loader.batch_size, seed, epochs, share.replicas)
        if epochs is not None
        else ordered_jobs(reader.count, loader.batch_size)
    )
    maker = BatchMaker(make_batch, tuple(reader.shape), "float32")
    return run_jobs(jobs, maker, reader.labels.tolist(), loader, share, sample_weights)
