"""The legacy PyTorch checkpoint reader: real files read right, hostile files refused unrun.

Checkpoints are written here in the legacy layout by a small writer (five pickles, then each
storage as an int64 element count and its bytes), with a stand-in `torch` module so the pickles
name the same globals `torch.save` writes. The writer is checked against the real file that the
weights package ships: both read back to the same structure.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import sys
import types

import numpy as np
import pytest

from tlkit.models.torch_checkpoint import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    CheckpointError,
    read_state_dict,
)


class _Ref:
    """A tensor to pickle: its storage key, the storage's array, and the view into it."""

    def __init__(self, key, storage, offset, shape, stride):
        self.key, self.storage, self.offset, self.shape, self.stride = (
            key,
            storage,
            offset,
            shape,
            stride,
        )


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


def legacy_bytes(torch, tensors, state=None, storage_counts=None):
    """A legacy checkpoint of `tensors` ({name: array}, or _Ref for a view); `state` replaces
    the state dict pickle's object (hostile payloads)."""
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Ref):
                return None
            if isinstance(obj, np.ndarray) and id(obj) in {id(s) for s in storages.values()}:
                key = next(k for k, s in storages.items() if s is obj)
                kind = torch.LongStorage if obj.dtype == np.int64 else torch.FloatStorage
                return ("storage", kind, key, "cpu", obj.size, None)
            return None

    def reduce_ref(ref):
        return (
            torch._utils._rebuild_tensor_v2,
            (
                ref.storage,
                ref.offset,
                tuple(ref.shape),
                tuple(ref.stride),
                False,
                collections.OrderedDict(),
            ),
        )

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
    pickle.dump(list(storages), buf, protocol=2)
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
