"""run.json through RunRecord: every reader and the writer share it; old files keep loading."""

from __future__ import annotations

import json

import pytest

from tlkit.core.errors import RunError
from tlkit.core.runs import RunRecord, load_run


def test_a_written_record_round_trips_and_an_older_leaner_one_still_loads(tiny_runs, tmp_path):
    _data, runs = tiny_runs
    written = json.loads((runs[0] / "run.json").read_text())
    record = load_run(runs[0]).record
    assert record.as_dict() == written  # nothing lost, nothing added
    assert next(iter(written)) == "schema"

    lean = {
        k: written[k]
        for k in (
            "schema",
            "backbone",
            "weights",
            "freeze",
            "input_size",
            "preprocessing",
            "crop_fraction",
            "classes",
            "config",
            "data",
        )
    }
    lean["from_a_later_version"] = {"x": 1}
    old = RunRecord.from_dict(lean)
    assert old.results == {} and old.resumed == [] and old.val_fraction == 0.2
    assert old.as_dict()["from_a_later_version"] == {"x": 1}  # kept, not dropped

    with pytest.raises(RunError, match="lacks classes, config"):
        RunRecord.from_dict({k: v for k, v in lean.items() if k not in ("classes", "config")})
    with pytest.raises(RunError, match="run schema 2 is not supported"):
        RunRecord.from_dict({**lean, "schema": 2})
