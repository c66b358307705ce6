"""Run folders written by earlier tlkits still load, evaluate, predict, transfer and resume:
tests/fixtures/runs-2c26047 (before the settings schema) and runs-a4b7965 (before the settings'
parts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlkit.cli import cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
IDENTITY_SCHEMAS = {"2c26047": 1, "a4b7965": 3}  # the commit that wrote the runs -> its schema


@pytest.fixture(params=sorted(IDENTITY_SCHEMAS))
def old_runs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of a fixture as the working folder: its runs name their data as `data`."""
    work = tmp_path / request.param
    shutil.copytree(FIXTURES / f"runs-{request.param}", work)
    monkeypatch.chdir(work)
    return work


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_an_old_finished_run_loads_evaluates_and_predicts(old_runs):
    from tlkit.core.runs import load_run

    run = load_run("finished")
    assert list(run.classes) == ["blue", "red"] and run.record.input_size == 32
    recorded = run.record.results["best"]
    metrics = json.loads(invoke("eval", "finished", "--json").output)
    assert metrics["images"] == 6 and 0.0 <= metrics["top1"] <= 1.0
    # the model scores the validation split as the run recorded it did
    val = json.loads(invoke("eval", "finished", "--split", "val", "--json").output)
    assert val["top1"] == pytest.approx(recorded["val_accuracy"])
    found = json.loads(invoke("predict", "finished", "data/test/red/red0.png", "--json").output)
    top = found[0]["top"]
    assert sorted(p["label"] for p in top) == ["blue", "red"]
    assert sum(p["probability"] for p in top) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow  # about 15 s a fixture: a resume and a tiny training
def test_an_old_interrupted_run_resumes_and_an_old_run_transfers(old_runs):
    from tlkit.core.runs import load_run
    from tlkit.training.resume import IDENTITY_SCHEMA

    found = json.loads(invoke("finetune", "--resume", "interrupted", "--json").stdout)
    run = load_run("interrupted")
    assert found["run"] == str(run.path)
    tuned = [p for p in run.record.results["phases"] if p["phase"] == "fine-tune"]
    # every epoch it was given ran, the last ones after the kill
    assert tuned[0]["epochs_run"] == run.record.config["epochs"] and run.record.resumed
    invoke(
        "finetune",
        "data",
        "--weights",
        "finished",
        "--backbone",
        "test_resnet",
        "--input-size",
        "32",
        "--batch-size",
        "4",
        "--head-epochs",
        "1",
        "--epochs",
        "0",
        "-o",
        "transferred",
    )
    assert load_run("transferred").record.weights["source"] == "run"
    written = json.loads(Path("transferred/checkpoints/identity.json").read_text())
    assert written["schema"] == IDENTITY_SCHEMA and written["backbone"] == "test_resnet"


def test_identities_of_every_schema_read_and_a_foreign_one_is_one_line(old_runs):
    """identity.json (what a resume must match): schema 1 (no `schema` key, 2c26047's), 2 and 3
    (a4b7965's) read alike; a record that is not an identity, or one from a newer tlkit, is
    refused in one line naming the file."""
    from tlkit.training.resume import IDENTITY_SCHEMA, Identity, read_identity

    folder = next(old_runs.glob("interrupted.incomplete-*"))
    old = read_identity(folder)
    assert old.schema == IDENTITY_SCHEMAS[old_runs.name] and old.backbone == "test_resnet"
    assert old.fine_tune_lr == 1e-5
    path = folder / "checkpoints" / "identity.json"
    again = Identity.from_dict(json.loads(json.dumps(old.as_dict())), path)
    assert again.compared() == old.compared() and again.as_dict()["schema"] == old.schema
    for text, complaint in (
        ("{}", "not a tlkit identity (missing backbone, classes, config"),
        (json.dumps({**old.as_dict(), "schema": IDENTITY_SCHEMA + 1}), "newer than this tlkit"),
    ):
        path.write_text(text)
        result = CliRunner().invoke(cli, ["finetune", "--resume", "interrupted"])
        assert result.exit_code == 5 and complaint in result.output, result.output
        assert "Traceback" not in result.output
