"""What the accuracy benchmark's protocols share: tlkit run as typed on a command line, the
log, the converged logistic-regression probe, and the timm-style candidate row."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

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


def clear() -> None:
    import keras

    keras.backend.clear_session()


def logreg_probe(feats: dict[str, tuple[Any, Any]]) -> float:
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
    return float((best[1].predict(xt) == yt).mean())
