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

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.datasets import Example
from tlkit.errors import ConfigError, TlkitError
from tlkit.fsutil import atomic_path, atomic_write_json, is_inside, sha256_file

SCHEMA = 1
CACHE_DIR = "cache"
SHARD_BYTES = 256 << 20
DTYPES = ("float16", "float32")


class CacheError(TlkitError):
    """A cache that is missing, locked, corrupt or does not fit on disk."""

    exit_code = 6


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


def files_digest(splits: dict[str, Sequence[Example]]) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        for e in splits[split]:
            st = os.stat(e.path)
            h.update(f"{split}\0{e.relpath}\0{e.label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@contextmanager
def build_lock(root: Path, key: str, wait: bool = True) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise CacheError(
                f"{root / key}: another process is building this cache; wait for it to "
                "finish and try again"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class FeatureCache:
    path: Path
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        for split in self.manifest["splits"].values():
            for f in [*split["shards"], split["labels"]]:
                if not isinstance(f.get("file"), str) or not is_inside(self.path, f["file"]):
                    raise CacheError(f"{self.path / 'manifest.json'}: names a file outside the "
                                     f"cache ({f.get('file')!r}); remove the cache with "
                                     f"`tlkit cache rm {self.key}`")

    @property
    def key(self) -> str:
        return self.path.name

    def verify(self) -> None:
        """Every file against its recorded sha256; a truncated or altered shard is never read."""
        for split in self.manifest["splits"].values():
            for f in [*split["shards"], split["labels"]]:
                path = self.path / f["file"]
                if not path.is_file() or os.path.getsize(path) != f["bytes"] \
                        or sha256_file(path) != f["sha256"]:
                    raise CacheError(
                        f"{path}: missing or corrupt (checksum mismatch); remove the cache with "
                        f"`tlkit cache rm {self.key}` and build it again"
                    )

    def reader(self, split: str) -> SplitReader:
        return SplitReader(self.path, self.manifest["splits"][split], self.manifest["dtype"])


class SplitReader:
    """Rows (one image, all its views) read by offset from the shard files."""

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

    def read(self, index: int, view: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        path, offset = self.files[shard]
        row_offset = offset + (index - self.starts[shard]) * self.row_bytes
        view_bytes = self.row_bytes // self.views
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, view_bytes, row_offset + view * view_bytes)
        finally:
            os.close(fd)
        return np.frombuffer(data, self.dtype).reshape(self.shape)


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir or CACHE_DIR)


def open_cache(root: Path, key: str) -> FeatureCache | None:
    path = root / key
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None
    return FeatureCache(path, json.loads(manifest.read_text()))


def estimate_bytes(counts: dict[str, int], views: dict[str, int], shape: Sequence[int],
                   dtype: str) -> int:
    per = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return sum(counts[s] * views[s] * per for s in counts)


def build_cache(root: Path, key: str, inputs: dict[str, Any], trunk: Any,
                splits: dict[str, Sequence[Example]], views: dict[str, int], make_rows: Any,
                dtype: str, batch_size: int, progress: Any = None,
                wait: bool = True) -> FeatureCache:
    """Compute and publish the cache for `key` (or return it if another process just did).

    make_rows(split, view, first_index, examples) -> uint8 images of those examples (whose
    indices in the split start at first_index): the eval transform, or augmented view `view`.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}. Received: {dtype!r}")
    with build_lock(root, key, wait):
        done = open_cache(root, key)
        if done is not None:
            return done
        previous = sorted(root.glob(f"{key}.incomplete-*"))
        work = previous[0] if previous else root / f"{key}.incomplete-{os.getpid()}"
        work.mkdir(parents=True, exist_ok=True)
        progress_file = work / "progress.json"
        finished = json.loads(progress_file.read_text()) if progress_file.is_file() else {}
        shape = tuple(int(d) for d in trunk.output.shape[1:])
        row_bytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        manifest_splits = {}
        for split, examples in splits.items():
            k = views[split]
            rows_per_shard = max(1, SHARD_BYTES // (row_bytes * k))
            shards = []
            for s, start in enumerate(range(0, len(examples), rows_per_shard)):
                name = f"{split}-{s:05d}.npy"
                chunk = examples[start : start + rows_per_shard]
                record = finished.get(name)
                if record is None or not (work / name).is_file() \
                        or sha256_file(work / name) != record["sha256"]:
                    out = np.empty((len(chunk), k, *shape), dtype)
                    for b in range(0, len(chunk), batch_size):
                        batch = chunk[b : b + batch_size]
                        for v in range(k):
                            images = make_rows(split, v, start + b, batch)
                            out[b : b + len(batch), v] = np.asarray(
                                trunk.predict_on_batch(images)).astype(dtype)
                        if progress is not None:
                            progress(len(batch) * k)
                    with atomic_path(work / name) as tmp:
                        np.save(tmp, out, allow_pickle=False)
                    record = {"file": name, "rows": len(chunk),
                              "bytes": (work / name).stat().st_size,
                              "sha256": sha256_file(work / name)}
                    finished[name] = record
                    atomic_write_json(progress_file, finished)
                elif progress is not None:
                    progress(len(chunk) * k)
                shards.append(record)
            labels_name = f"{split}-labels.npy"
            with atomic_path(work / labels_name) as tmp:
                np.save(tmp, np.array([e.label for e in examples], np.int32), allow_pickle=False)
            paths_name = f"{split}-paths.json"
            atomic_write_json(work / paths_name, [e.relpath for e in examples])
            manifest_splits[split] = {
                "count": len(examples), "views": k, "shape": list(shape), "shards": shards,
                "labels": {"file": labels_name, "bytes": (work / labels_name).stat().st_size,
                           "sha256": sha256_file(work / labels_name)},
                "paths": paths_name,
            }
        manifest = {"schema": SCHEMA, "key": key, "dtype": dtype, "inputs": inputs,
                    "splits": manifest_splits,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # every file was hashed from disk (new shards after writing, resumed ones on reuse),
        # so the manifest describes exactly what is published
        atomic_write_json(work / "manifest.json", manifest)
        progress_file.unlink()
        os.replace(work, root / key)
        return FeatureCache(root / key, manifest)


def list_caches(root: Path) -> list[dict[str, Any]]:
    rows = []
    for manifest in sorted(root.glob("*/manifest.json")):
        path = manifest.parent
        if ".incomplete-" in path.name:
            continue
        info = json.loads(manifest.read_text())
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        last = max(f.stat().st_atime for f in path.iterdir())
        inputs = info["inputs"]
        rows.append({"key": path.name, "backbone": inputs["backbone"],
                     "freeze": inputs["cut"]["k"], "views": inputs["views"]["train"],
                     "size_mb": round(size / 1e6, 1),
                     "last_used": datetime.fromtimestamp(last).strftime("%Y-%m-%d %H:%M")})
    return rows


def touch(cache: FeatureCache) -> None:
    """Record a use, for `cache ls`."""
    now = time.time()
    os.utime(cache.path / "manifest.json", (now, os.stat(cache.path / "manifest.json").st_mtime))


def remove_caches(root: Path, key: str | None) -> list[str]:
    """Remove one cache (or all, key None) with any incomplete build of it."""
    targets = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if key is not None:
        targets = [p for p in targets if p.name == key or p.name.startswith(f"{key}.incomplete-")]
        if not targets:
            raise CacheError(f"{root / key}: no such cache; `tlkit cache ls` lists them")
    removed = []
    for p in targets:
        with build_lock(root, p.name.split(".incomplete-")[0], wait=False):
            shutil.rmtree(p)
        removed.append(p.name)
    for lock in root.glob("*.lock") if key is None else []:
        lock.unlink()
    return removed
