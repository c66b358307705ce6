"""Reads a legacy PyTorch checkpoint (`torch.save` before 1.6, not zip) of a state dict into
numpy arrays, without PyTorch and without running any pickled code.

A pickle can name any importable callable and call it. This reader's unpickler resolves only the
few globals a state dict needs (the ordered dict, the tensor rebuild, the storage types) and
refuses every other name before anything runs. Tensors are rebuilt from their storage here, each
view's size, stride and offset checked against it. This is the one module of tlkit that uses the
pickle module.

The legacy layout is five pickles and the raw storages: the magic number, the protocol version,
the system info, the state dict (storages as persistent ids), the list of storage keys, then
per key an int64 element count and the storage's bytes, little-endian.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.core.errors import WeightsError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class CheckpointError(WeightsError):
    """A checkpoint that is not a plain legacy state dict, or is damaged."""


class _Malformed(Exception):
    """Raised inside the unpickler, where the path is not known; reported with it."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor(_v2): records the view, checked later."""
    if not isinstance(storage, _Storage):
        raise _Malformed(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    ints = (
        [offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else None
    )
    if ints is None or not all(type(v) is int for v in ints) or len(size) != len(stride):
        raise _Malformed(
            f"a tensor has a malformed view (offset {offset!r}, size {size!r}, stride {stride!r})"
        )
    return _TensorRef(storage, offset, size, stride)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the allow-list and the storage types; every other global is refused unrun."""

    def __init__(self, file: Any, path: Path, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self._path, self._storages = path, storages

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._path}: refuses to load, the pickle names {module}.{name}, which is not "
                "part of a plain state dict (it could run code); only tensors in an ordered "
                "dict are read"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unknown persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel, view = pid
        if not (
            isinstance(kind, _StorageType)
            and isinstance(key, str)
            and type(numel) is int
            and numel >= 0
            and view is None
        ):
            raise CheckpointError(f"{self._path}: malformed storage reference {str(pid)[:80]}")
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = _Storage(key, kind.dtype, numel)
        elif (known.dtype, known.numel) != (kind.dtype, numel):
            raise CheckpointError(f"{self._path}: storage {key} is referenced with two types")
        return known


def _load_one(f: Any, path: Path, storages: dict[str, _Storage], what: str) -> Any:
    try:
        return _RestrictedUnpickler(f, path, storages).load()
    except CheckpointError:
        raise
    except _Malformed as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
    ) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({what}: "
            f"{type(e).__name__}: {str(e)[:120]})"
        ) from None


def _read_storage(f: Any, path: Path, storage: _Storage) -> np.ndarray:
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(
            f"{path}: truncated, storage {storage.key} is missing; download or reinstall the file"
        )
    (count,) = struct.unpack("<q", head)
    if count != storage.numel:
        raise CheckpointError(
            f"{path}: storage {storage.key} holds {count} elements where the "
            f"state dict expects {storage.numel}"
        )
    nbytes = count * storage.dtype.itemsize
    data = f.read(nbytes)
    if len(data) < nbytes:
        raise CheckpointError(
            f"{path}: truncated inside storage {storage.key} ({len(data)} of "
            f"{nbytes} bytes); download or reinstall the file"
        )
    return np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))


def _materialise(path: Path, name: str, ref: _TensorRef, data: np.ndarray) -> np.ndarray:
    if any(s < 0 for s in ref.size) or any(s < 0 for s in ref.stride) or ref.offset < 0:
        raise CheckpointError(f"{path}: tensor {name} has a negative size, stride or offset")
    if 0 in ref.size:
        return np.zeros(ref.size, data.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= data.size:
        raise CheckpointError(
            f"{path}: tensor {name} of shape {list(ref.size)} reaches element {last} of a "
            f"storage of {data.size}; the file is damaged"
        )
    step = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :], shape=ref.size, strides=[s * step for s in ref.stride]
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="))


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by name, as numpy arrays in native byte order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw[:2] == b"PK":
        raise CheckpointError(
            f"{path}: a zip-format checkpoint (PyTorch 1.6 and later); this "
            "reader takes the legacy format, e.g. torch.save(..., "
            "_use_new_zipfile_serialization=False)"
        )
    f = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    if _load_one(f, path, storages, "magic number") != MAGIC_NUMBER:
        raise CheckpointError(f"{path}: not a legacy PyTorch checkpoint (no magic number)")
    version = _load_one(f, path, storages, "protocol version")
    if version != PROTOCOL_VERSION:
        raise CheckpointError(
            f"{path}: PyTorch protocol version {version!r}, expected {PROTOCOL_VERSION}"
        )
    info = _load_one(f, path, storages, "system info")
    if not (isinstance(info, dict) and info.get("little_endian") is True):
        raise CheckpointError(
            f"{path}: written on a big-endian machine or without system info; not supported"
        )
    state = _load_one(f, path, storages, "state dict")
    keys = _load_one(f, path, storages, "storage keys")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path}: not a state dict of tensors (a whole pickled model or "
            "an optimizer?); save model.state_dict()"
        )
    if not (isinstance(keys, list) and sorted(keys) == sorted(storages)):
        raise CheckpointError(
            f"{path}: its storage list does not match the tensors; the file is damaged"
        )
    data = {key: _read_storage(f, path, storages[key]) for key in keys}
    if f.read(1):
        raise CheckpointError(f"{path}: bytes after the last storage; the file is damaged")
    return {
        name: _materialise(path, name, ref, data[ref.storage.key]) for name, ref in state.items()
    }
