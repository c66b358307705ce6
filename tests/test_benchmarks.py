"""The accuracy benchmark's smoke mode: every figure it reports is produced, from real runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_quality_benchmark_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "quality.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke",
                             "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    configs = {r["config"] for r in rows}
    assert configs == {"defaults", "recipe small-data", "keras-reference (plain Keras, frozen)",
                       "logreg-probe (sklearn, frozen)"}
    for r in rows:
        assert r["k"] == 5 and r["seed"] == 0
        assert 0.0 <= r["top1"] <= 1.0 and math.isfinite(r["top1"])
    # the table printed for the README has a row per configuration
    for name in configs:
        assert f"| {name} |" in result.stdout
