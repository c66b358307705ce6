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
import shutil
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.core.choices import CACHE_DTYPES, check
from tlkit.core.errors import CacheError
from tlkit.core.fsutil import (
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
    publish_dir,
    read_json_record,
)
from tlkit.data.datasets import Example

SCHEMA = 1
CACHE_DIR = "cache"
SHARD_BYTES = 256 << 20


def cache_inputs(
    spec: Any,
    weights: Any,
    trunk: Any,
    cut: Any,
    size: int,
    views: int,
    augment: Any,
    pca: dict[str, Any] | None,
    seed: int,
    folder: Any,
    dtype: str,
) -> dict[str, Any]:
    """Everything that changes the cached numbers, gathered here and nowhere else; its hash
    (`key_of`) is the cache key."""
    from tlkit.data.augment import pixel_libraries
    from tlkit.data.datasets import fingerprint
    from tlkit.data.decode import decode_protocol
    from tlkit.models.model import compute_dtypes

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


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir or CACHE_DIR)


def open_cache(root: Path, key: str) -> FeatureCache | None:
    path = root / key
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    fix = f"remove the cache with `tlkit cache rm {key}` and build it again"
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


def _compute_batches(
    predict: Any,
    make_rows: Any,
    split: str,
    views: int,
    examples: Sequence[Example],
    batches: list[tuple[int, int]],
    shape: Sequence[int],
    dtype: str,
    progress: Any,
) -> np.ndarray:
    """The rows of consecutive (start, stop) batches of a split, one array."""
    first = batches[0][0] if batches else 0
    out = np.empty(((batches[-1][1] if batches else 0) - first, views, *shape), dtype)
    for start, stop in batches:
        out[start - first : stop - first] = _compute(
            predict, make_rows, split, views, start, examples[start:stop], shape, dtype
        )
        if progress is not None:
            progress((stop - start) * views)
    return out


def _labels_and_paths(
    splits: dict[str, Sequence[Example]],
) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    labels = {s: [e.label for e in x] for s, x in splits.items()}
    return labels, {s: [e.relpath for e in x] for s, x in splits.items()}


def _compute(
    predict: Any,
    make_rows: Any,
    split: str,
    views: int,
    start: int,
    examples: Sequence[Example],
    shape: Sequence[int],
    dtype: str,
) -> np.ndarray:
    out = np.empty((len(examples), views, *shape), dtype)
    for v in range(views):
        out[:, v] = np.asarray(predict(make_rows(split, v, start, examples))).astype(dtype)
    return out


def _record(path: Path, **extra: Any) -> dict[str, Any]:
    return {"file": path.name, **extra, "bytes": path.stat().st_size, "sha256": file_hash(path)}


def _publish(
    work: Path,
    root: Path,
    key: str,
    inputs: dict[str, Any],
    dtype: str,
    shape: Sequence[int],
    views: dict[str, int],
    labels: dict[str, Sequence[int]],
    paths: dict[str, Sequence[str]],
    shards: dict[str, list[dict[str, Any]]],
) -> FeatureCache:
    """Labels, paths and the manifest next to finished shards in `work`; then rename it to
    `root/key` whole."""
    manifest_splits = {}
    for split in shards:
        labels_file = work / f"{split}-labels.npy"
        with atomic_path(labels_file) as tmp:
            np.save(tmp, np.asarray(labels[split], np.int32), allow_pickle=False)
        atomic_write_json(work / f"{split}-paths.json", list(paths[split]))
        manifest_splits[split] = {
            "count": len(labels[split]),
            "views": views[split],
            "shape": list(shape),
            "shards": shards[split],
            "labels": _record(labels_file),
            "paths": f"{split}-paths.json",
        }
    manifest = {
        "schema": SCHEMA,
        "key": key,
        "dtype": dtype,
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
    return record is not None and path.is_file() and file_hash(path) == record["sha256"]


def build_cache(
    root: Path,
    key: str,
    inputs: dict[str, Any],
    trunk: Any,
    splits: dict[str, Sequence[Example]],
    views: dict[str, int],
    make_rows: Any,
    dtype: str,
    batch_size: int,
    progress: Any = None,
    wait: bool = True,
    predict: Any = None,
) -> FeatureCache:
    """Compute and publish the cache for `key` (or return it if another process just did).

    make_rows(split, view, first_index, examples) -> uint8 images of those examples (whose
    indices in the split start at first_index): the eval transform, or augmented view `view`.
    `predict` (images -> activations) defaults to the trunk's predict_on_batch.
    """
    check("--dtype", dtype, CACHE_DTYPES)
    predict = predict or trunk.predict_on_batch
    shape = tuple(int(d) for d in trunk.output.shape[1:])
    with build_lock(root, key, wait):
        done = open_cache(root, key)
        if done is not None:
            return done
        previous = find_incomplete(root / key)  # resumed: its finished shards are kept
        work = previous[-1] if previous else incomplete_dir(root / key, "cache")
        claim(work, "cache")  # under the build lock, so no live process holds it
        progress_file = work / "progress.json"
        finished = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
        layout = _layout({s: len(x) for s, x in splits.items()}, views, shape, dtype)
        shards: dict[str, list[dict[str, Any]]] = {}
        for split, files in layout.items():
            k, examples = views[split], splits[split]
            shards[split] = []
            for name, start, stop in files:
                record = finished.get(name)
                if not _intact(work / name, record):
                    batches = [
                        (b, min(b + batch_size, stop)) for b in range(start, stop, batch_size)
                    ]
                    out = _compute_batches(
                        predict, make_rows, split, k, examples, batches, shape, dtype, progress
                    )
                    with atomic_path(work / name) as tmp:
                        np.save(tmp, out, allow_pickle=False)
                    record = _record(work / name, rows=stop - start)
                    finished[name] = record
                    atomic_write_json(progress_file, finished)
                elif progress is not None:
                    progress((stop - start) * k)
                shards[split].append(record)
        progress_file.unlink()
        labels, paths = _labels_and_paths(splits)
        return _publish(work, root, key, inputs, dtype, shape, views, labels, paths, shards)


PART_FILE = "part.json"


def part_path(root: Path, key: str, index: int, count: int) -> Path:
    return root / f"{key}.part-{index}-of-{count}"


def build_part(
    root: Path,
    key: str,
    inputs: dict[str, Any],
    trunk: Any,
    splits: dict[str, Sequence[Example]],
    views: dict[str, int],
    make_rows: Any,
    dtype: str,
    batch_size: int,
    index: int,
    count: int,
    progress: Any = None,
    predict: Any = None,
) -> Path:
    """Compute shard `index` of `count`: a contiguous run of the cache's batches, published
    whole as `<key>.part-<index>-of-<count>/` for `merge_parts`. A finished part is kept."""
    predict = predict or trunk.predict_on_batch
    shape = tuple(int(d) for d in trunk.output.shape[1:])
    final = part_path(root, key, index, count)
    if (final / PART_FILE).is_file():
        return final
    units = _batches(
        _layout({s: len(x) for s, x in splits.items()}, views, shape, dtype), batch_size
    )
    mine = units[index * len(units) // count : (index + 1) * len(units) // count]
    root.mkdir(parents=True, exist_ok=True)
    work = incomplete_dir(final, "cache part")
    pieces: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for split, name, start, stop in mine:  # consecutive batches of one shard file: one piece
        groups.setdefault((split, name), []).append((start, stop))
    for (split, name), batches in groups.items():
        first, end = batches[0][0], batches[-1][1]
        out = _compute_batches(
            predict, make_rows, split, views[split], splits[split], batches, shape, dtype, progress
        )
        path = work / f"{name[:-4]}.rows-{first}-{end}.npy"
        with atomic_path(path) as tmp:
            np.save(tmp, out, allow_pickle=False)
        pieces.append(_record(path, split=split, shard=name, start=first, stop=end))
    labels, paths = _labels_and_paths(splits)
    record = {
        "schema": SCHEMA,
        "key": key,
        "index": index,
        "count": count,
        "dtype": dtype,
        "shape": list(shape),
        "inputs": inputs,
        "pieces": pieces,
        "splits": {s: {"views": views[s], "labels": labels[s], "paths": paths[s]} for s in splits},
    }
    atomic_write_json(work / PART_FILE, record)
    try:
        publish_dir(work, final)
    except OSError:  # the same part finished elsewhere first: keep that one
        discard(work)
    return final


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
    once) and publish the cache they make, the same bytes a one-process build writes."""
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
        cache = _publish(
            work, root, key, first["inputs"], dtype, shape, views, labels, paths, shards
        )
        for p in parts.values():
            shutil.rmtree(p["path"])
        return cache


def list_caches(root: Path) -> list[dict[str, Any]]:
    rows = []
    for manifest in sorted(root.glob("*/manifest.json")):
        path = manifest.parent
        if is_incomplete(path):
            continue
        info = read_json_record(
            manifest, CacheError, f"remove it with `tlkit cache rm {path.name}`"
        )
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        last = max(f.stat().st_atime for f in path.iterdir())
        inputs = info["inputs"]
        rows.append(
            {
                "key": path.name,
                "backbone": inputs["backbone"],
                "freeze": inputs["cut"]["k"],
                "views": inputs["views"]["train"],
                "size_mb": round(size / 1e6, 1),
                "last_used": datetime.fromtimestamp(last).strftime("%Y-%m-%d %H:%M"),
            }
        )
    return rows


def list_unfinished(root: Path) -> list[dict[str, Any]]:
    """Interrupted builds and unmerged shard parts: kept, since they resume, but listed by
    `cache ls` so they do not pile up unseen."""
    rows = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_dir() and (is_incomplete(path) or ".part-" in path.name):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            rows.append(
                {
                    "folder": path.name,
                    "key": path.name.split(".", 1)[0],
                    "size_mb": round(size / 1e6, 1),
                    "kind": "interrupted build" if is_incomplete(path) else "shard part",
                    "last_written": datetime.fromtimestamp(path.stat().st_mtime).strftime(
                        "%Y-%m-%d %H:%M"
                    ),
                }
            )
    return rows


def touch(cache: FeatureCache) -> None:
    """Record a use, for `cache ls`."""
    now = time.time()
    os.utime(cache.path / "manifest.json", (now, os.stat(cache.path / "manifest.json").st_mtime))


def remove_caches(root: Path, key: str | None) -> list[str]:
    """Remove one cache (or all, key None) with any incomplete build or shard of it."""
    targets = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if key is not None:
        targets = [p for p in targets if p.name.split(".", 1)[0] == key]
        if not targets:
            raise CacheError(f"{root / key}: no such cache; `tlkit cache ls` lists them")
    removed = []
    for p in targets:
        with build_lock(root, p.name.split(".", 1)[0], wait=False):
            shutil.rmtree(p)
        removed.append(p.name)
    for lock in root.glob("*.lock") if key is None else []:
        with hold_lock(lock, wait=False) as held:
            if held:  # one a running build holds stays
                lock.unlink()
    return removed


def cache_dataset(
    cache: FeatureCache,
    split: str,
    batch_size: int,
    seed: int,
    first_epoch: int = 0,
    epochs: int = 1,
    shuffle: bool = True,
    workers: int | None = None,
    prefetch: int | None = None,
    share: Any = None,
    sample_weights: Sequence[float] | None = None,
) -> Any:
    """(features, labels) batches from the cache; shuffled and shared between replicas exactly
    like the image pipeline."""
    from tlkit.data.augment import sample_rng
    from tlkit.data.pipeline import WHOLE, epoch_jobs, ordered_jobs, run_jobs

    share = share or WHOLE
    reader = cache.reader(split)

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
        epoch_jobs(reader.count, batch_size, seed, first_epoch, epochs, share.replicas)
        if shuffle
        else ordered_jobs(reader.count, batch_size)
    )
    return run_jobs(
        jobs,
        make_batch,
        reader.labels.tolist(),
        reader.shape,
        "float32",
        workers,
        prefetch,
        share,
        sample_weights,
    )
