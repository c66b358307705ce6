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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": 5}, "classes is int 5, not a list of strings"),
        ({"classes": ["a", 7]}, r"classes is list \['a', 7\], not a list of strings"),
        ({"classes": []}, "classes is empty"),
        ({"input_size": "224"}, "input_size is str '224', not an integer"),
        ({"results": [1, 2]}, r"results is list \[1, 2\], not an object"),
        ({"seed": True}, "seed is bool True, not an integer"),
        ({"results": {"best": 5}}, "results.best is int 5, not an object"),
        ({"results": {"test": {"accuracy": [1]}}}, r"results.test.accuracy is list \[1\], not a"),
        ({"freeze": {"request": [], "n_frozen": 0}}, r"freeze.request is list \[\], not a string"),
        # the typed records' keys, named by their whole path (tlkit/core/records.py)
        (
            {"results": {"best": {"val_loss": 0.5, "phase": "head", "epoch": "3"}}},
            "results.best.epoch is str '3', not an integer",
        ),
        ({"results": {"phases": [{"seconds": "9"}]}}, r"results.phases\[0\].seconds is str '9'"),
        (
            {"results": {"best": {"val_loss": None, "phase": "head", "epoch": 3}}},
            "results.best.val_loss is null, not a number",
        ),
        ({"freeze": {"request": "x", "n_frozen": None}}, "freeze.n_frozen is null, not an int"),
        ({"weights": {"source": "none", "sha256": 7}}, "weights.sha256 is int 7, not a string"),
        ({"head": 1}, "head is int 1, not a string"),
        ({"input_size": -5}, "input_size -5 is not a size a model takes"),
        ({"input_size": 10**400}, "input_size <an int of 1329 bits> is not a size"),
    ],
)
def test_a_run_record_of_the_wrong_types_is_one_line(tiny_runs, change, message):
    _data, runs = tiny_runs
    written = json.loads((runs[0] / "run.json").read_text())
    with pytest.raises(RunError, match=message):
        RunRecord.from_dict({**written, **change})


def test_a_damaged_run_is_one_line_and_runs_lists_it_with_the_others(tiny_runs, tmp_path):
    import shutil

    from click.testing import CliRunner

    from tlkit.cli import cli

    _data, runs = tiny_runs
    folder = tmp_path / "runs"
    for name, damage in (("ok", None), ("bad-utf8", b'{"schema": 1, "\xff": 1}'), ("five", 5)):
        shutil.copytree(runs[0], folder / name)
        if damage == 5:
            record = json.loads((folder / name / "run.json").read_text())
            (folder / name / "run.json").write_text(json.dumps({**record, "classes": 5}))
        elif damage is not None:
            (folder / name / "run.json").write_bytes(damage)
    result = CliRunner().invoke(cli, ["eval", str(folder / "bad-utf8")])
    assert result.exit_code == 5 and "run.json: not valid JSON" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    listed = CliRunner().invoke(cli, ["runs", "--runs-dir", str(folder)])
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert set(lines) == {"ok", "bad-utf8", "five"}
    assert "unreadable: " in lines["bad-utf8"] and "not valid JSON" in lines["bad-utf8"]
    assert "classes is int 5" in lines["five"] and "unreadable" not in lines["ok"]
    as_json = json.loads(
        CliRunner().invoke(cli, ["runs", "--runs-dir", str(folder), "--json"]).stdout
    )
    assert {r["run"]: r["status"] for r in as_json} == {
        "ok": "finished",
        "bad-utf8": "unreadable",
        "five": "unreadable",
    }
