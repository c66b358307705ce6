"""CSV manifests and tensorflow-datasets as DATA: the same class map, audit and pipeline."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from conftest import TINY, write_folder

from tlkit.cli import cli
from tlkit.core.errors import DataError
from tlkit.data.datasets import load_dataset, load_folder

FAST = [
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--batch-size",
    "8",
    "--head-epochs",
    "1",
    "--epochs",
    "0",
    "--freeze",
    "all",
]


def manifest(tmp_path, rows: list[str], header: str = "path,label") -> str:
    write_folder(tmp_path / "images", ["class1", "class2", "class10"], 6)
    path = tmp_path / "labels.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def all_rows(split: str | None = None) -> list[str]:
    return [
        f"images/{c}/img{i}.png,{c}" + (f",{split}" if split else "")
        for c in ("class1", "class2", "class10")
        for i in range(6)
    ]


def test_a_csv_manifest_gives_the_same_examples_as_the_folder(tmp_path):
    images = write_folder(tmp_path / "images", ["class1", "class2", "class10"], 6)
    csv = images / "labels.csv"  # beside the class folders: the same relative paths
    csv.write_text(
        "path,label\n"
        + "".join(
            f"{c}/img{i}.png,{c}\n" for c in ("class10", "class2", "class1") for i in range(6)
        )
    )
    from_csv, folder = load_dataset(csv), load_folder(images)
    assert from_csv.classes == folder.classes == ("class1", "class2", "class10")
    assert from_csv.layout == "csv" and from_csv.root == str(csv)
    for split in ("train", "val"):  # the stable hash split keys on the same relative paths
        assert [(e.path, e.label) for e in from_csv.splits[split]] == [
            (e.path, e.label) for e in folder.splits[split]
        ]


def test_a_split_column_sets_the_splits(tmp_path):
    split_of = {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
    rows = [
        f"images/{c}/img{i}.png,{c},{split_of[i]}"
        for c in ("class1", "class2", "class10")
        for i in range(6)
    ]
    data = load_dataset(manifest(tmp_path, rows, "path,label,split"))
    assert {s: len(x) for s, x in data.splits.items()} == {"train": 12, "val": 3, "test": 3}
    assert data.val_source == "csv"
    assert {e.relpath for e in data.splits["test"]} == {
        "images/class1/img5.png",
        "images/class2/img5.png",
        "images/class10/img5.png",
    }


@pytest.mark.parametrize(
    "rows, message",
    [
        (["/etc/passwd,class1"], r"labels\.csv:2: path '/etc/passwd' is outside the CSV's folder"),
        (["../secret.png,class1"], r"labels\.csv:2: path '\.\./secret\.png' is outside"),
        (["images/class1/nope.png,class1"], r"labels\.csv:2: no such file .*nope\.png"),
        (
            ["images/class1/img0.png,class1", "images/class1/img0.png,class2"],
            r"labels\.csv:3: images/class1/img0\.png is already listed on line 2",
        ),
        (["images/class1/img0.png,"], r"labels\.csv:2: empty path or label"),
    ],
)
def test_bad_manifest_rows_are_named_by_line(tmp_path, rows, message):
    with pytest.raises(DataError, match=message):
        load_dataset(manifest(tmp_path, rows))


def test_bad_manifest_shapes(tmp_path):
    with pytest.raises(DataError, match="needs the columns path and label"):
        load_dataset(manifest(tmp_path, ["a,b"], header="file,class"))
    with pytest.raises(DataError, match=r"labels\.csv:2: split 'holdout' is not train, val"):
        load_dataset(
            manifest(tmp_path, ["images/class1/img0.png,class1,holdout"], header="path,label,split")
        )
    val_only_class = [*all_rows("train")[:12], "images/class10/img0.png,class10,val"]
    with pytest.raises(DataError, match=r"class 'class10' is not among the training classes"):
        load_dataset(manifest(tmp_path, val_only_class, header="path,label,split"))


def test_finetune_check_data_and_eval_on_a_csv(tmp_path):
    csv = manifest(tmp_path, all_rows())
    runner = CliRunner()
    assert runner.invoke(cli, ["check-data", csv]).exit_code == 0
    result = runner.invoke(cli, ["finetune", csv, "-o", "runs/csv", *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "runs/csv/run.json").read_text())
    assert info["data"]["source"] == csv and info["data"]["layout"] == "csv"
    evaluated = runner.invoke(cli, ["eval", "runs/csv", "--json"], catch_exceptions=False)
    assert evaluated.exit_code == 0, evaluated.output  # re-reads the run's CSV: its val split
    assert json.loads(evaluated.stdout)["split"] == "val"


def test_tfds_source_is_written_once_and_trains_and_evaluates(tmp_path):
    import tensorflow_datasets as tfds

    runner = CliRunner()
    with tfds.testing.mock_data(num_examples=40):
        result = runner.invoke(
            cli, ["finetune", "tfds:mnist/train", "-o", "runs/m", *FAST], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        folder = tmp_path / "xdg_cache" / "tlkit" / "tfds" / "mnist" / "3.0.1" / "train"
        assert json.loads((folder / "tlkit-tfds.json").read_text())["splits"] == {"train": 40}
        stamp = os.stat(folder / "tlkit-tfds.json").st_mtime_ns
        info = json.loads((tmp_path / "runs/m/run.json").read_text())
        assert info["data"]["source"] == "tfds:mnist/train"
        assert set(info["classes"]) <= {str(d) for d in range(10)}
        assert (
            sum(info["data"]["counts"]["train"].values())
            + sum(info["data"]["counts"]["val"].values())
            == 40
        )
        evaluated = runner.invoke(
            cli, ["eval", "runs/m", "tfds:mnist/test", "--json"], catch_exceptions=False
        )
        assert evaluated.exit_code == 0, evaluated.output
        assert json.loads(evaluated.stdout)["images"] == 40
        again = runner.invoke(cli, ["check-data", "tfds:mnist/train", "--json"])
        assert again.exit_code == 0
        assert os.stat(folder / "tlkit-tfds.json").st_mtime_ns == stamp  # not written again


def test_a_bad_tfds_spec_is_one_line():
    result = CliRunner().invoke(cli, ["check-data", "tfds:"])
    assert result.exit_code == 3 and "not a tfds source; write tfds:NAME" in result.output
