"""CSV manifests and tensorflow-datasets as DATA: the same class map, audit and pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
            r"labels\.csv:3: 'images/class1/img0\.png' is already listed on line 2",
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
    long = CliRunner().invoke(cli, ["check-data", "tfds:" + "x/" * 2500])
    assert long.exit_code == 3 and "not a tfds source" in long.output and len(long.output) < 400


def test_tfds_unlabelled_examples_are_refused_not_read_as_the_last_class(tmp_path):
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def with_unlabelled(*_args, **_kwargs):
        images = np.zeros((4, 28, 28, 1), np.uint8)
        labels = np.array([3, 1, -1, 2], np.int64)
        return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})

    with tfds.testing.mock_data(as_dataset_fn=with_unlabelled):
        result = CliRunner().invoke(cli, ["check-data", "tfds:mnist/train"])
    assert result.exit_code == 3, result.output
    error = result.output.strip().splitlines()[-1]  # after the "writing ..." log line
    assert error.startswith("Error: tfds:mnist/train: example 3 of split 'train' is unlabelled")
    written = tmp_path / "xdg_cache" / "tlkit" / "tfds" / "mnist"
    assert not [p for p in written.rglob("*") if p.suffix == ".png"]  # nothing half-written kept


def test_tfds_class_names_that_make_one_folder_are_refused():
    from types import SimpleNamespace

    import tensorflow_datasets as tfds

    from tlkit.core.errors import DataError
    from tlkit.data.tfds_source import _features

    label = tfds.features.ClassLabel(names=["a/b", "c", "a b", "a_b"])
    info = SimpleNamespace(features={"image": tfds.features.Image(), "label": label})
    with pytest.raises(DataError, match="classes 'a/b' and 'a b' both become the folder 'a_b'"):
        _features(info, "tfds:x")
    ok = tfds.features.ClassLabel(names=["a/b", "c"])
    assert _features(SimpleNamespace(features={"i": tfds.features.Image(), "l": ok}), "t")[2] == [
        "a_b",
        "c",
    ]


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"path,label\nimages/class1/img\0.png,class1\n",
            r"labels\.csv:2: path 'images/class1/img\\x00\.png' has a control character",
        ),
        (b"path,label\nimages/class1/img0.png,class1\nimages/\xff.png,class1\n", "not UTF-8 text"),
        (
            b"path,label\nimages/class1/" + b"x" * 200_000 + b".png,class1\n",
            r"labels\.csv:2: not a readable CSV row \(field larger than field limit",
        ),
        (
            b"path,label\nimages/class1/" + b"y" * 100_000 + b".png,class1\n",
            r"labels\.csv:2: path 'images/class1/yyy.*\.\.\.yyy.*: File name too long",
        ),
    ],
)
def test_damaged_manifests_are_one_line_through_the_cli(tmp_path, content, message):
    import re

    path = manifest(tmp_path, [])
    Path(path).write_bytes(content)
    result = CliRunner().invoke(cli, ["check-data", path])
    assert result.exit_code == 3, result.output
    assert re.search(message, result.output) and len(result.output) < 1000, result.output[:300]


def test_a_folder_and_a_manifest_follow_the_same_links(tmp_path):
    """One rule for links: followed in both layouts, out of the root too; a loop is read once."""
    outside = write_folder(tmp_path / "elsewhere", ["class2", "class10"], 3, seed=1)
    data = write_folder(tmp_path / "data", ["class1", "class2"], 3)
    (data / "class2" / "more").symlink_to(outside / "class2")  # a linked folder
    (data / "class10").symlink_to(outside / "class10")  # a linked class
    write_folder(tmp_path / "loose", ["x"], 1, seed=2)
    (data / "class1" / "linked.png").symlink_to(tmp_path / "loose" / "x" / "img0.png")  # a file
    (data / "class1" / "loop").symlink_to(data / "class1")  # back to itself
    folder = load_folder(data)
    rows = sorted(e.relpath for s in ("train", "val") for e in folder.splits[s])
    assert len(rows) == 3 + 1 + 3 + 3 + 3 and "class2/more/img2.png" in rows
    assert "class1/loop" in folder.ignored
    csv = data / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"{r},{r.split('/')[0]}\n" for r in rows))
    from_csv = load_dataset(csv)
    assert sorted(e.relpath for s in ("train", "val") for e in from_csv.splits[s]) == rows
    assert from_csv.classes == folder.classes == ("class1", "class2", "class10")
