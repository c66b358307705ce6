"""Reads a legacy PyTorch checkpoint (`torch.save` before 1.6, not zip) of a state dict into
numpy arrays, without PyTorch and without running any pickled code.

A pickle can name any importable callable and call it, and its opcodes can make a small file
allocate without limit. So each pickle is first scanned (`pickletools.genops` decodes, it runs
nothing): only the opcodes a state dict uses, only the allow-listed globals, memo indices that
were written, bounded nesting; then exactly the scanned bytes are unpickled, by an unpickler
that resolves only the ordered dict, the tensor rebuild and the storage types. The file is read
once: a sha256 pinned around the read (`pinned_sha256`) is checked on the bytes parsed. Tensors
are rebuilt from their storage here, each view checked against it before any array is made.
This is the one module of tlkit that uses the pickle module.

The legacy layout is five pickles and the raw storages: the magic number, the protocol version,
the system info, the state dict (storages as persistent ids), the list of storage keys, then
per key an int64 element count and the storage's bytes, little-endian.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import hashlib
import io
import math
import os
import pickle
import pickletools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.core.errors import WeightsError, shown

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
# Bounds a state dict stays far inside (EfficientNet-Lite0 to 2: 4 dimensions, nesting 4,
# a stack of 600 items), checked before anything is allocated.
MAX_DIMS = 8
MAX_NESTING = 16  # containers within containers, and open MARKs
MAX_STACK = 10_000  # items on the pickle's stack (Python's pickler batches 1000 pairs)
MAX_INT_BITS = 128  # the magic number has 77
MAX_EMPTY_SPAN = 2**31  # what an empty tensor's nonzero dimensions may multiply to
MAX_GROWTH = 4  # the arrays returned hold at most 4 times the storages' bytes (tied views)

# The opcodes of torch.save's protocol-2 pickles (and Python 2's byte strings). Everything else
# is refused: INST, OBJ, NEWOBJ, EXT*, STACK_GLOBAL, the text opcodes, big ints, sets, bytes.
_TEXT = frozenset({"BINUNICODE", "SHORT_BINSTRING", "BINSTRING"})  # a state dict's keys
_SCALARS = (
    frozenset({"BININT", "BININT1", "BININT2", "LONG1", "NONE", "NEWTRUE", "NEWFALSE", "GLOBAL"})
    | _TEXT
)
_EMPTY = frozenset({"EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT"})
_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_INTO = {"APPEND": 1, "SETITEM": 2, "BUILD": 1}  # pops n items into the container below them
_INTO_MARKED = frozenset({"APPENDS", "SETITEMS"})
_PUT = frozenset({"BINPUT", "LONG_BINPUT"})
_GET = frozenset({"BINGET", "LONG_BINGET"})
_PINS: contextvars.ContextVar[tuple[tuple[str, str, str], ...]] = contextvars.ContextVar(
    "tlkit_checkpoint_pins", default=()
)


class CheckpointError(WeightsError):
    """A checkpoint that is not a plain legacy state dict, or is damaged."""


class _Malformed(Exception):
    """Damage found while scanning or unpickling, where the path is not known."""


class _Refused(_Malformed):
    """What a saved state dict never holds (a global, an opcode, a size beyond the bounds)."""


def _label(text: str) -> str:
    """A name from the file (a key, a global) for a one-line message: as is when short and
    printable, else a bounded repr."""
    return text if len(text) <= 80 and text.isprintable() else shown(text)


class _Sealed:
    """BUILD sets an object's state through its __setstate__: these refuse it, so a pickle
    cannot rewrite a checked view or storage, nor the rebuild function for the process."""

    __slots__ = ()
    what = "object"

    def __setstate__(self, state: Any) -> None:
        raise _Refused(
            f"the pickle sets the state of {self.what} (BUILD), which a saved state dict "
            "never needs"
        )


@dataclass(frozen=True)
class _StorageType(_Sealed):
    what = "a storage type"
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORAGE_DTYPES[self.name])


@dataclass(frozen=True)
class _Storage(_Sealed):
    what = "a storage"
    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    what = "a tensor view"
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _OrderedDict(collections.OrderedDict[Any, Any]):
    """collections.OrderedDict as the pickle gets it: the state BUILD may set is torch's
    `_metadata` (ignored), and its repr stays short in a message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # torch.save writes OrderedDict() and fills it with SETITEMS
            raise _Refused(
                "the pickle builds an ordered dict from arguments (a copy of another object)"
            )
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and set(state) <= {"_metadata"}):
            raise _Refused(
                "the pickle sets the state of an ordered dict beyond its _metadata (BUILD)"
            )

    def __repr__(self) -> str:
        return f"<an ordered dict of {len(self)} items>"


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_rest: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor(_v2): records the view, checked later."""
    if not isinstance(storage, _Storage):
        raise _Malformed(f"a tensor's storage is {shown(storage)}, not a storage")
    ints = [offset, *size, *stride] if type(size) is tuple and type(stride) is tuple else None
    if ints is None or not all(type(v) is int for v in ints) or len(size) != len(stride):
        raise _Malformed(
            f"a tensor has a malformed view (offset {shown(offset)}, size {shown(size)}, "
            f"stride {shown(stride)})"
        )
    if len(size) > MAX_DIMS:
        raise _Refused(f"a tensor has {len(size)} dimensions, more than the {MAX_DIMS} read")
    return _TensorRef(storage, offset, size, stride)


class _Rebuild(_Sealed):
    """The allow-listed rebuild as the pickle gets it: callable, and sealed against BUILD."""

    __slots__ = ()
    what = "the tensor rebuild"

    def __call__(self, *args: Any) -> _TensorRef:
        return _rebuild_tensor(*args)


_REBUILD = _Rebuild()
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _REBUILD,
    ("torch._utils", "_rebuild_tensor"): _REBUILD,
}


def _resolve(module: str, name: str) -> Any:
    """What an allow-listed global stands for; any other name is refused before it runs."""
    if module == "torch" and name in STORAGE_DTYPES:
        return _StorageType(name)
    try:
        return _ALLOWED[(module, name)]
    except KeyError:
        raise _Refused(
            f"the pickle names {_label(f'{module}.{name}')}, which is not "
            "part of a plain state dict (it could run code); only tensors in an ordered "
            "dict are read"
        ) from None


@dataclass(slots=True)
class _Item:
    depth: int  # how many containers deep it nests (0: a scalar)
    fetched: bool = False  # a copy from the memo
    text: bool = False  # a string: the only kind of dict key a state dict has


class _Scan:
    """One pickle's opcodes, checked before anything runs. The stack is simulated as each
    item's nesting depth; a container fetched from the memo may not be changed, so containers
    grow only while on the stack and the depths recorded stay true."""

    def __init__(self) -> None:
        self.stack: list[_Item] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Item] = {}
        self.puts = 0
        self.pos = 0

    def run(self, f: io.BytesIO) -> int:
        """Where the pickle ends, after its STOP."""
        last = ""
        for op, arg, pos in pickletools.genops(f):
            if last == "BUILD" and op.name != "STOP":
                self.refuse("uses BUILD on other than the state dict itself")
            self.pos, last = self.pos if pos is None else pos, op.name
            self.step(op.name, arg)
        return f.tell()

    def step(self, name: str, arg: Any) -> None:
        if name in _SCALARS:
            if name == "GLOBAL":
                _resolve(*arg.split(" ", 1))  # genops gives "module name"
            elif name == "LONG1" and arg.bit_length() > MAX_INT_BITS:
                self.refuse(f"holds an int of {arg.bit_length()} bits")
            self.push(0, text=name in _TEXT)
        elif name in _EMPTY:
            self.push(1)
        elif name == "MARK":
            self.marks.append(len(self.stack))
            if len(self.marks) > MAX_NESTING:
                self.refuse(f"nests more than {MAX_NESTING} MARKs")
        elif name == "TUPLE" or name in _TUPLES:
            items = self.pop_mark() if name == "TUPLE" else self.pop(_TUPLES[name])
            self.push(1 + _deepest(items))
        elif name in _INTO or name in _INTO_MARKED:
            items = self.pop_mark() if name in _INTO_MARKED else self.pop(_INTO[name])
            if name.startswith("SETITEM") and not all(key.text for key in items[::2]):
                self.refuse("uses a dict key that is not text")  # ints can share one hash
            self.add(items)
        elif name == "REDUCE":
            self.push(self.pop(2)[1].depth)  # what the call returns nests no deeper than its args
        elif name == "BINPERSID":
            self.pop(1)
            self.push(0)
        elif name in _PUT or name in _GET:
            self.memo_op(name in _PUT, arg)
        elif name == "STOP":
            if len(self.stack) != 1 or self.marks:
                raise _Malformed(f"the pickle ends at byte {self.pos} with a malformed stack")
        elif name != "PROTO":
            self.refuse(f"uses opcode {name}")

    def refuse(self, what: str) -> None:
        raise _Refused(f"the pickle {what} (byte {self.pos}), which a saved state dict never needs")

    def push(self, depth: int, fetched: bool = False, text: bool = False) -> None:
        if depth > MAX_NESTING:
            self.refuse(f"nests containers more than {MAX_NESTING} deep")
        if len(self.stack) >= MAX_STACK:
            self.refuse(f"holds more than {MAX_STACK} items on its stack")
        self.stack.append(_Item(depth, fetched, text))

    def pop(self, n: int) -> list[_Item]:
        if len(self.stack) - n < (self.marks[-1] if self.marks else 0):
            raise _Malformed(f"the pickle's stack runs out at byte {self.pos}")
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return items

    def pop_mark(self) -> list[_Item]:
        if not self.marks:
            raise _Malformed(f"the pickle's stack has no MARK at byte {self.pos}")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def add(self, items: list[_Item]) -> None:
        """Items put into the container below them (APPEND, SETITEM, BUILD...)."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Malformed(f"the pickle's stack runs out at byte {self.pos}")
        target = self.stack[-1]
        if target.fetched:
            self.refuse("changes an object it fetched from its memo")
        target.depth = max(target.depth, 1 + _deepest(items))
        if target.depth > MAX_NESTING:
            self.refuse(f"nests containers more than {MAX_NESTING} deep")

    def memo_op(self, put: bool, index: int) -> None:
        if not put:
            if index not in self.memo:
                raise _Malformed(f"memo index {index} read before written at byte {self.pos}")
            self.push(self.memo[index].depth, fetched=True, text=self.memo[index].text)
        elif len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _Malformed(f"the pickle's stack runs out at byte {self.pos}")
        elif index > self.puts:
            self.refuse(f"writes memo index {index} out of order")
        else:  # the memo then holds at most twice as many slots as the pickle has PUTs
            self.memo[index] = self.stack[-1]
            self.puts += 1


def _deepest(items: list[_Item]) -> int:
    return max((item.depth for item in items), default=0)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the allow-list and the storage types; every other global is refused unrun."""

    def __init__(self, file: Any, storages: dict[str, _Storage], file_size: int) -> None:
        super().__init__(file)
        self._storages, self._file_size = storages, file_size

    def find_class(self, module: str, name: str) -> Any:
        return _resolve(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage"):
            raise _Malformed(f"unknown persistent id {shown(pid)}")
        _, kind, key, _location, numel, view = pid
        if not (
            isinstance(kind, _StorageType)
            and type(key) is str
            and type(numel) is int
            and numel >= 0
            and view is None
        ):
            raise _Malformed(f"malformed storage reference {shown(pid)}")
        if numel * kind.dtype.itemsize > self._file_size:
            raise _Malformed(
                f"storage {_label(key)} claims {numel} elements, more than the file's "
                f"{self._file_size} bytes hold"
            )
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = _Storage(key, kind.dtype, numel)
        elif (known.dtype, known.numel) != (kind.dtype, numel):
            raise _Malformed(f"storage {_label(key)} is referenced with two types")
        return known


class _Reader:
    """The file's bytes, read once, and where the next part starts."""

    def __init__(self, path: Path, raw: bytes) -> None:
        self.path, self.raw, self.pos = path, raw, 0
        self.storages: dict[str, _Storage] = {}

    def fail(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def pickle(self, what: str) -> Any:
        """The next pickle: scanned, then exactly the scanned bytes unpickled."""
        f = io.BytesIO(self.raw)
        f.seek(self.pos)
        try:
            end = _Scan().run(f)
            piece = io.BytesIO(self.raw[self.pos : end])
            value = _RestrictedUnpickler(piece, self.storages, len(self.raw)).load()
        except _Refused as e:
            raise self.fail(f"refuses to load, {e}") from None
        except _Malformed as e:
            raise self.fail(f"not a readable PyTorch checkpoint ({what}: {e})") from None
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            struct.error,
            MemoryError,  # the last line of defence: the scan's bounds come first
            RecursionError,
            OverflowError,
        ) as e:
            raise self.fail(
                f"not a readable PyTorch checkpoint ({what}: "
                f"{type(e).__name__}: {shown(str(e), 120)})"
            ) from None
        self.pos = end
        return value

    def storage(self, storage: _Storage) -> np.ndarray:
        """The next storage, a view of the file's bytes (the tensors copy what they use)."""
        key = _label(storage.key)
        if len(self.raw) - self.pos < 8:
            raise self.fail(f"truncated, storage {key} is missing; download or reinstall the file")
        (count,) = struct.unpack_from("<q", self.raw, self.pos)
        if count != storage.numel:
            raise self.fail(
                f"storage {key} holds {count} elements where the state dict expects {storage.numel}"
            )
        start, nbytes = self.pos + 8, count * storage.dtype.itemsize
        if len(self.raw) - start < nbytes:
            raise self.fail(
                f"truncated inside storage {key} ({len(self.raw) - start} of {nbytes} bytes); "
                "download or reinstall the file"
            )
        self.pos = start + nbytes
        return np.frombuffer(self.raw, storage.dtype.newbyteorder("<"), count, start)


def _check_view(path: Path, name: str, ref: _TensorRef) -> int:
    """The tensor's element count, once its view proves to stay inside its storage: never
    more elements than the storage holds (no expanded or overlapping views), the largest
    index reached within it. Checked on the numbers, before any array is made."""
    where = f"{path}: tensor {_label(name)} of shape {list(ref.size)}"
    if min((ref.offset, *ref.size, *ref.stride), default=0) < 0:
        raise CheckpointError(f"{where} has a negative size, stride or offset")
    count, numel = math.prod(ref.size), ref.storage.numel
    if count == 0:
        if math.prod(max(n, 1) for n in ref.size) > MAX_EMPTY_SPAN:
            raise CheckpointError(f"{where} is empty yet spans more than {MAX_EMPTY_SPAN}")
        return 0
    if count > numel:
        raise CheckpointError(
            f"{where} has {count} elements, more than the {numel} of its storage (an expanded "
            "or overlapping view, which a saved state dict does not need)"
        )
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True))
    if last >= numel:
        raise CheckpointError(
            f"{where} reaches element {last} of a storage of {numel}; the file is damaged"
        )
    return count


def _materialise(ref: _TensorRef, data: np.ndarray) -> np.ndarray:
    """A native-order copy of a view `_check_view` passed."""
    if 0 in ref.size:
        return np.zeros(ref.size, data.dtype.newbyteorder("="))
    step = data.dtype.itemsize
    strides = [s * step if n > 1 else 0 for n, s in zip(ref.size, ref.stride, strict=True)]
    view = np.lib.stride_tricks.as_strided(data[ref.offset :], shape=ref.size, strides=strides)
    return np.array(view, dtype=data.dtype.newbyteorder("="))


@contextlib.contextmanager
def pinned_sha256(path: str | os.PathLike[str], sha256: str, remedy: str) -> Iterator[None]:
    """While open, `read_state_dict(path)` parses the file only if the bytes it read have this
    sha256: a caller that checked the file hands the check to the one read that is parsed, so
    a file swapped in between never reaches the parser. `remedy` ends the error's line."""
    token = _PINS.set((*_PINS.get(), (os.path.abspath(path), sha256, remedy)))
    try:
        yield
    finally:
        _PINS.reset(token)


def _check_pin(path: Path, raw: bytes) -> None:
    for pinned, sha256, remedy in _PINS.get():
        if pinned == os.path.abspath(path):
            actual = hashlib.sha256(raw).hexdigest()
            if actual != sha256:
                raise CheckpointError(
                    f"{path}: sha256 {actual} of the bytes read does not match the pinned "
                    f"{sha256} (the file changed after it was checked, or was replaced); {remedy}"
                )


def _parse(path: Path, raw: bytes) -> tuple[_Reader, dict[str, _TensorRef], list[str]]:
    """The five pickles, checked: the state dict and the storage keys in file order; the
    reader stands at the first storage."""
    r = _Reader(path, raw)
    if r.pickle("magic number") != MAGIC_NUMBER:
        raise r.fail("not a legacy PyTorch checkpoint (no magic number)")
    version = r.pickle("protocol version")
    if version != PROTOCOL_VERSION:
        raise r.fail(f"PyTorch protocol version {shown(version)}, expected {PROTOCOL_VERSION}")
    info = r.pickle("system info")
    if not (isinstance(info, dict) and info.get("little_endian") is True):
        raise r.fail("written on a big-endian machine or without system info; not supported")
    state = r.pickle("state dict")
    keys = r.pickle("storage keys")
    if not isinstance(state, dict) or not all(
        type(k) is str and isinstance(v, _TensorRef) for k, v in state.items()
    ):
        raise r.fail(
            "not a state dict of tensors (a whole pickled model or an optimizer?); "
            "save model.state_dict()"
        )
    if not (
        type(keys) is list
        and all(type(k) is str for k in keys)
        and sorted(keys) == sorted(r.storages)
    ):
        raise r.fail("its storage list does not match the tensors; the file is damaged")
    return r, dict(state), keys


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by name, as numpy arrays in native byte order. The file is
    read once, and a pin set by `pinned_sha256` is checked on the very bytes parsed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    _check_pin(path, raw)
    if raw[:2] == b"PK":
        raise CheckpointError(
            f"{path}: a zip-format checkpoint (PyTorch 1.6 and later); this "
            "reader takes the legacy format, e.g. torch.save(..., "
            "_use_new_zipfile_serialization=False)"
        )
    r, state, keys = _parse(path, raw)
    data = {key: r.storage(r.storages[key]) for key in keys}
    if r.pos != len(raw):
        raise r.fail("bytes after the last storage; the file is damaged")
    counts = {name: _check_view(path, name, ref) for name, ref in state.items()}
    stored = sum(array.nbytes for array in data.values())
    made = sum(count * state[name].storage.dtype.itemsize for name, count in counts.items())
    if made > MAX_GROWTH * stored:
        raise r.fail(
            f"its tensors would take {made} bytes from {stored} bytes of storage (views "
            f"sharing storages); more than {MAX_GROWTH} times is refused"
        )
    return {name: _materialise(ref, data[ref.storage.key]) for name, ref in state.items()}
