from __future__ import annotations

import os

import pytest
from conftest import replace_keeping_size_and_mtime, write_folder

from tlkit.core.errors import DataError
from tlkit.data.datasets import fingerprint, load_folder


def test_class_map_is_natural_sorted(make_folder):
    root = make_folder(classes=("class10", "class2", "class1"), per_class=10)
    folder = load_folder(root)
    assert folder.classes == ("class1", "class2", "class10")
    for split in folder.splits.values():
        for e in split:
            assert folder.classes[e.label] == e.class_name


def test_hash_split_is_stable_when_images_are_added(make_folder):
    root = make_folder(per_class=30)
    before = load_folder(root, val_fraction=0.3)
    assert before.val_source == "hash-split"
    n = sum(len(s) for s in before.splits.values())
    assert n == 60 and 0 < len(before.splits["val"]) < 60
    write_folder(root, ["cat", "dog", "owl"], 5, seed=9)  # overwrites img0..4, adds owl
    for cls in ("cat", "dog"):
        for i in range(30, 40):
            (root / cls / f"img{i}.png").write_bytes((root / cls / "img0.png").read_bytes())
    after = load_folder(root, val_fraction=0.3)
    val_after = {e.relpath for e in after.splits["val"]}
    train_after = {e.relpath for e in after.splits["train"]}
    assert {e.relpath for e in before.splits["val"]} <= val_after
    assert {e.relpath for e in before.splits["train"]} <= train_after


def test_split_layout_maps_every_split_through_the_train_classes(make_folder):
    root = make_folder(layout="splits", classes=("b", "a", "c"), per_class=8)
    (root / "test" / "a").rename(root / "test" / "removed")  # make test miss a class...
    import shutil

    shutil.rmtree(root / "test" / "removed")
    folder = load_folder(root)
    assert folder.layout == "splits" and folder.val_source == "folder"
    assert folder.classes == ("a", "b", "c")
    assert {e.class_name for e in folder.splits["test"]} == {"b", "c"}  # missing class is fine
    assert all(folder.classes[e.label] == e.class_name for e in folder.splits["test"])


def test_unknown_class_in_val_is_an_error_naming_it(make_folder):
    root = make_folder(layout="splits", per_class=8)
    write_folder(root / "val", ["zebra"], 2)
    with pytest.raises(DataError, match=r"val/zebra: class 'zebra' is not among"):
        load_folder(root)


def test_stray_files_and_hidden_folders_are_ignored(make_folder):
    root = make_folder(per_class=10)
    (root / "README.md").write_text("about")
    (root / ".ipynb_checkpoints").mkdir()
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0")
    (root / "cat" / "Thumbs.db").write_bytes(b"\0\0")
    folder = load_folder(root)
    assert sum(len(s) for s in folder.splits.values()) == 20
    assert any("Thumbs.db" in p for p in folder.ignored)
    assert ".ipynb_checkpoints" in folder.ignored


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no such data folder"),
        ("empty_class", "empty class folder"),
        ("one_class", "only one class"),
        ("no_classes", "no class folders"),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, case, message):
    root = tmp_path / "d"
    if case != "missing":
        root.mkdir()
    if case == "empty_class":
        write_folder(root, ["a"], 3)
        (root / "b").mkdir()
    if case == "one_class":
        write_folder(root, ["a"], 3)
    with pytest.raises(DataError, match=message):
        load_folder(root)


def test_fingerprint_follows_the_content_even_when_size_and_mtime_are_kept(make_folder):
    from tlkit.data.audit import audit_folder

    def checked() -> str:
        return fingerprint(audit_folder(load_folder(root, val_fraction=0.5)).folder)

    root = make_folder(per_class=6)
    a = checked()
    assert a == checked()
    path = root / "cat" / "img0.png"
    old = replace_keeping_size_and_mtime(path)  # as `cp -p` of another image would
    assert checked() != a
    st = path.stat()
    path.write_bytes(old)
    os.utime(path, ns=(1, st.st_mtime_ns))
    assert checked() == a  # the same bytes again: the same data, whatever the timestamps
