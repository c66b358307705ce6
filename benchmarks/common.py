"""What the accuracy benchmark's protocols share: tlkit run as typed on a command line, the
log, the converged logistic-regression probe, honest training from scratch, and the timm-style
candidate row."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

# the fine-tune phase as timm runs it, the candidate the defaults were measured against (a row
# of both protocols); the table did not support it, so it is not the default
CANDIDATE = "timm-style fine-tune (--fine-tune-lr 1e-4 --schedule cosine --warmup-epochs 1)"
CANDIDATE_FLAGS = ["--fine-tune-lr", "1e-4", "--schedule", "cosine", "--warmup-epochs", "1"]


def vm_hwm_kb() -> int:
    """This process's peak resident memory in kB (VmHWM): its own, whereas ru_maxrss carries
    the parent's peak over fork + exec on Linux."""
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tlkit(*args: str) -> dict[str, Any]:
    """Run a tlkit command in this process, as typed on a command line; its --json result."""
    from click.testing import CliRunner

    from tlkit.cli import cli

    result = CliRunner().invoke(cli, ["-q", *args, "--json"], catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"tlkit {' '.join(args)} exited {result.exit_code}: {result.output}")
    out = result.stdout
    return json.loads(out[out.index("{") :])


def fit_folder(task: Path) -> Path:
    """A sibling of the task folder holding only its train/ and val/ (links), for `tlkit
    finetune`: given a test/ split it also scores it at the end, work the references' timers
    do not count (they decode and predict the test split outside their timed part)."""
    fit = task.with_name(f"{task.name}-fit")
    if not fit.is_dir():
        fit.mkdir()
        for split in ("train", "val"):
            (fit / split).symlink_to((task / split).resolve(), target_is_directory=True)
    return fit


def clear() -> None:
    import keras

    keras.backend.clear_session()


class Scores(NamedTuple):
    """Top-1 on the validation split, which chooses, and on the test split, which reports."""

    val: float
    test: float


def logreg_probe(feats: dict[str, tuple[Any, Any]]) -> Scores:
    """L-BFGS logistic regression to convergence, C picked by validation log loss."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (x, y), (xv, yv), (xt, yt) = feats["train"], feats["val"], feats["test"]
    best = None
    for c in (0.001, 0.01, 0.1, 1.0, 10.0):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        clf.fit(x, y)
        loss = log_loss(yv, clf.predict_proba(xv), labels=np.unique(y))
        if best is None or loss < best[0]:
            best = (loss, clf)
    clf = best[1]
    return Scores(float((clf.predict(xv) == yv).mean()), float((clf.predict(xt) == yt).mean()))


# Training from random weights, converged (not a strawman): every layer, BatchNorm as tlkit's
# --weights none sets it (kept at its initial identity where the network's signal survives it,
# as ResNet50's does; trained, with its statistics recomputed before each validation, where the
# signal fades, as EfficientNet-Lite0's does: docs/training.md), tlkit's default augmentation,
# early stopping on the validation loss with generous patience, the rate chosen on validation:
# three around Adam's usual 1e-3 first, then one step further along the ladder while the best
# is an edge of those tried, so that a grid never caps it.
SCRATCH_LADDER = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
SCRATCH_FIRST = (3e-3, 1e-3, 3e-4)


def next_scratch_rate(ranks: dict[float, tuple[float, float]], widen: bool) -> float | None:
    """The next rate to try given each tried rate's rank (higher is better): SCRATCH_FIRST in
    turn, then (when `widen`) the untried neighbour on the ladder of the best; None: done."""
    untried = [lr for lr in SCRATCH_FIRST if lr not in ranks]
    if untried or not widen:
        return untried[0] if untried else None
    i = SCRATCH_LADDER.index(max(ranks, key=lambda lr: ranks[lr]))
    edge = [SCRATCH_LADDER[j] for j in (i - 1, i + 1) if 0 <= j < len(SCRATCH_LADDER)]
    return next((lr for lr in edge if lr not in ranks), None)


def scratch(
    task: Path, runs: Path, flags: Sequence[str], epochs: int, patience: int, widen: bool = True
) -> dict[str, Any]:
    """One `tlkit finetune --weights none` per rate next_scratch_rate gives; the one with the
    best validation top-1 (then loss) is tested. Seconds: every rate's command, the whole
    budget."""
    tried: list[dict[str, Any]] = []
    while (lr := next_scratch_rate({t["lr"]: t["rank"] for t in tried}, widen)) is not None:
        out, start = runs / f"scratch-lr{lr:g}", time.perf_counter()
        result = tlkit(
            "finetune", str(fit_folder(task)), *flags, "--weights", "none", "--freeze", "0",
            "--head-epochs", "0", "--epochs", str(epochs), "--patience", str(patience),
            "--lr", f"{lr:g}", "--fine-tune-lr", f"{lr:g}", "-o", str(out),
        )  # fmt: skip
        clear()
        best = result["best"]
        tried.append(
            {
                "rank": (best["val_accuracy"], -best["val_loss"]),
                "lr": lr,
                "out": out,
                "seconds": time.perf_counter() - start,
                "epochs_run": result["phases"][-1]["epochs_run"],
            }
        )
    chosen = max(tried, key=lambda t: t["rank"])
    out = chosen["out"]
    m = tlkit("eval", str(out), str(task), "--split", "test", "--name", "scratch")
    clear()
    return {
        "val": chosen["rank"][0],
        "test": m["top1"],
        "lr": chosen["lr"],
        "epochs_run": chosen["epochs_run"],
        "classes_hit": sum(v["recall"] > 0 for v in m["per_class"].values()),
        "seconds": sum(t["seconds"] for t in tried),
        "rates": [t["lr"] for t in tried],
        "budget": f"{len(tried)} rates x up to {epochs} epochs (patience {patience})",
    }
