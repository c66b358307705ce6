"""check-data: every kind of bad or odd file gets the behaviour the README promises."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import class_image, replace_keeping_size_and_mtime, write_folder
from PIL import Image
from test_decode import rational_strip_tiff

from tlkit.cli import cli
from tlkit.core.errors import DataError
from tlkit.core.settings import Loader
from tlkit.data.audit import AuditConfig, apply_policy, audit_and_filter, audit_folder
from tlkit.data.datasets import load_folder
from tlkit.data.decode import decode_image

RNG = np.random.default_rng(0)


def jpeg_bytes(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (size, size, 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make_messy(root: Path) -> Path:
    """train/{class1,class2,class10} of good PNGs plus one of every troublesome file; val/
    lacks class10 and holds a copy of a training image (leakage)."""
    write_folder(root / "train", ["class1", "class2", "class10"], 6)
    write_folder(root / "val", ["class1", "class2"], 3, seed=1)
    odd = root / "train" / "class1"
    good = jpeg_bytes()
    (odd / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (odd / "junk_tail.jpg").write_bytes(good + b"GARBAGE" * 10)
    (odd / "notes.jpg").write_text("this is not a picture")
    Image.fromarray(class_image(0, RNG)).save(odd / "really_png.jpg", "PNG")
    Image.fromarray(class_image(0, RNG)).save(odd / "photo.webp", "WEBP")
    Image.fromarray(class_image(0, RNG)[..., 0]).save(odd / "gray.png")
    Image.fromarray(np.dstack([class_image(0, RNG), np.full((24, 24), 128, np.uint8)])).save(
        odd / "rgba.png"
    )
    Image.fromarray(class_image(0, RNG)).convert("P").save(odd / "palette.png")
    Image.fromarray(class_image(0, RNG)).convert("CMYK").save(odd / "cmyk.jpg")
    Image.fromarray((np.arange(576).reshape(24, 24) * 100).astype(np.uint16)).save(odd / "deep.png")
    hidden = root / "train" / "class2" / ".ipynb_checkpoints"
    hidden.mkdir()
    (hidden / "img0-checkpoint.png").write_bytes((root / "train/class2/img0.png").read_bytes())
    (root / "train" / "class10" / "Thumbs.db").write_bytes(b"\0" * 64)
    (root / "val" / "class2" / "leak.png").write_bytes(
        (root / "train/class2/img3.png").read_bytes()
    )
    return root


def by_path(rows: list[dict], key: str = "path") -> dict[str, dict]:
    return {r[key].split("/")[-1]: r for r in rows}


def test_every_kind_of_file_gets_its_verdict(tmp_path):
    folder = load_folder(make_messy(tmp_path / "data"))
    assert folder.classes == ("class1", "class2", "class10")  # natural order
    summary = audit_folder(folder, min_size=32).as_dict()

    bad = by_path(summary["bad"])
    assert set(bad) == {"truncated.jpg", "notes.jpg"}
    assert "cannot decode image" in bad["truncated.jpg"]["problem"]
    assert bad["notes.jpg"]["problem"].startswith("not an image (text file)")

    warnings = {w["path"].split("/")[-1]: w["warning"] for w in summary["warnings"]}
    assert "junk after the JPEG end marker" in warnings["junk_tail.jpg"]
    assert warnings["really_png.jpg"] == "content is PNG but the extension is '.jpg'"
    assert set(warnings) == {"junk_tail.jpg", "really_png.jpg"}  # nothing else is odd

    assert summary["formats"]["WEBP"] == 1 and summary["formats"]["JPEG"] == 2
    for mode in ("L", "RGBA", "P", "CMYK", "I;16", "RGB"):
        assert summary["modes"][mode] >= 1, mode
    assert summary["totals"] == {
        "files": 35,
        "ok": 33,
        "bad": 2,
        "warnings": 2,
        "small": 32,
        "memo_reused": 0,
    }  # 24 px images < 32; the 32 px JPEG is not

    assert summary["splits"]["val"]["missing_classes"] == ["class10"]
    assert summary["splits"]["train"]["classes"]["class1"] == {"ok": 14, "bad": 2}
    leak = [g for g in summary["duplicates"] if g["kind"] == "leakage"]
    assert len(leak) == 1
    assert {f["path"] for f in leak[0]["files"]} == {"train/class2/img3.png", "val/class2/leak.png"}
    assert sorted(summary["ignored"]) == [
        "train/class10/Thumbs.db",
        "train/class2/.ipynb_checkpoints",
    ]


def test_a_second_check_reuses_every_result_and_a_changed_file_is_checked_again(tmp_path):
    root = write_folder(tmp_path / "data", ["a", "b"], 5)
    first = audit_folder(load_folder(root, 0.5))
    assert first.reused == 0 and not first.bad
    assert audit_folder(load_folder(root, 0.5)).reused == 10
    victim = root / "a" / "img2.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 100)  # now corrupt
    again = audit_folder(load_folder(root, 0.5))
    assert again.reused == 9
    assert [r["path"] for r in again.bad] == ["a/img2.png"]  # the memo is never stale
    other = root / "b" / "img3.png"
    replace_keeping_size_and_mtime(other, corrupt=True)  # `cp -p` of a broken file
    third = audit_folder(load_folder(root, 0.5))
    assert third.reused == 9
    assert sorted(r["path"] for r in third.bad) == ["a/img2.png", "b/img3.png"]


def test_error_policy_lists_every_bad_file_and_skip_policy_records_them(tmp_path):
    report = audit_folder(load_folder(make_messy(tmp_path / "data")))
    with pytest.raises(DataError) as err:
        apply_policy(report, AuditConfig())
    text = str(err.value)
    assert "2 of 35 files cannot be used" in text and "--on-bad-image skip" in text
    assert "truncated.jpg: cannot decode image" in text and "notes.jpg: not an image" in text

    kept, skipped = apply_policy(report, AuditConfig(on_bad_image="skip"))
    assert sorted(s["path"] for s in skipped) == [
        "train/class1/notes.jpg",
        "train/class1/truncated.jpg",
    ]
    assert all(s["reason"] for s in skipped)
    remaining = {e.relpath for x in kept.splits.values() for e in x}
    assert len(remaining) == 33 and "train/class1/notes.jpg" not in remaining

    with pytest.raises(DataError, match=r"more than --max-bad-fraction 0\.01"):
        apply_policy(report, AuditConfig(on_bad_image="skip", max_bad_fraction=0.01))


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    with pytest.raises(DataError, match=r"big\.png: 200x100 is 0\.0 megapixels, above the limit"):
        decode_image(path, max_pixels=10_000)
    assert decode_image(path, max_pixels=20_000).shape == (100, 200, 3)


def test_check_data_cli_reports_writes_json_and_exits_3_on_bad_files(tmp_path):
    root = make_messy(tmp_path / "data")
    result = CliRunner().invoke(cli, ["check-data", str(root), "-o", "report.json"])
    assert result.exit_code == 3
    assert "2 of 35 files cannot be used" in result.output
    assert "unusable files (2):" in result.output and "leakage:" in result.output
    assert "val: no images of class class10" in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["totals"]["bad"] == 2 and report["schema"] == 1

    clean = write_folder(tmp_path / "clean", ["a", "b"], 5)
    ok = CliRunner().invoke(cli, ["check-data", str(clean), "-o", "report.json"])
    assert ok.exit_code == 0, ok.output  # replacing an earlier report is fine
    assert "10 files, 10 ok, 0 bad" in ok.output

    (tmp_path / "notes.json").write_text("{}")
    refused = CliRunner().invoke(cli, ["check-data", str(clean), "-o", "notes.json"])
    assert refused.exit_code == 7 and "not a tlkit data report" in refused.output
    assert (tmp_path / "notes.json").read_text() == "{}"


def test_check_data_cli_applies_the_pixel_limit(tmp_path):
    root = write_folder(tmp_path / "data", ["a", "b"], 4)
    result = CliRunner().invoke(cli, ["check-data", str(root), "--max-pixels", "100"])
    assert result.exit_code == 3
    assert "24x24 is 0.0 megapixels, above the limit of 0.0001" in result.output


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda r: (write_folder(r, ["a", "b"], 3), (r / "c").mkdir()), r"c: empty class folder"),
        (lambda r: write_folder(r, ["only"], 5), r"only one class \(only\)"),
        (lambda r: r.mkdir(), r"no class folders with images"),
        (
            lambda r: (
                write_folder(r / "train", ["a", "b"], 3),
                write_folder(r / "val", ["a", "z"], 2),
            ),
            r"class 'z' is not among the training classes",
        ),
    ],
)
def test_unusable_layouts_are_one_clear_line(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    result = CliRunner().invoke(cli, ["check-data", str(root)])
    assert result.exit_code == 3
    assert len(result.output.strip().splitlines()) == 1
    assert __import__("re").search(message, result.output), result.output


def test_memo_lives_in_the_user_cache(tmp_path):
    root = write_folder(tmp_path / "data", ["a", "b"], 3)
    audit_folder(load_folder(root, 0.5))
    memos = list((Path(os.environ["XDG_CACHE_HOME"]) / "tlkit" / "audit").glob("*.json"))
    assert len(memos) == 1 and len(json.loads(memos[0].read_text())) == 6


def test_a_file_pillow_raises_typeerror_on_is_counted_bad_and_skip_skips_it(tmp_path):
    """A TIFF whose directory makes Pillow raise TypeError inside exif_transpose ended check-data
    with a traceback, and --on-bad-image skip could not skip it."""
    root = write_folder(tmp_path / "data", ["a", "b"], 6)
    rational_strip_tiff(root / "a" / "odd.tif")
    result = CliRunner().invoke(cli, ["check-data", str(root), "-o", "report.json"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and "13 files, 12 ok, 1 bad" in result.output
    assert "odd.tif: cannot decode image (TypeError: " in result.output
    (bad,) = json.loads((tmp_path / "report.json").read_text())["bad"]
    assert bad["path"] == "a/odd.tif" and bad["problem"].startswith("cannot decode image")
    kept, _, skipped = audit_and_filter(
        load_folder(root), AuditConfig(on_bad_image="skip"), None, Loader(workers=2)
    )
    assert [s["path"] for s in skipped] == ["a/odd.tif"]
    assert len([e for x in kept.splits.values() for e in x]) == 12


def test_a_strip_no_view_can_be_cut_from_is_a_bad_image_not_a_huge_resize(tmp_path):
    """A 200000x1 PNG (667 bytes) passed the pixel limit, then resizing its shorter side to the
    view's scale asked cv2 for 39 GB in training; one a view can be cut from still passes."""
    root = write_folder(tmp_path / "data", ["a", "b"], 6)
    Image.new("RGB", (200_000, 1)).save(root / "a" / "strip.png")
    Image.new("RGB", (1000, 10), (9, 9, 9)).save(root / "b" / "banner.png")  # 100:1 is fine
    result = CliRunner().invoke(cli, ["check-data", str(root), "-o", "report.json"])
    assert result.exit_code == 3, result.output
    assert "14 files, 13 ok, 1 bad" in result.output
    assert "strip.png: 200000x1 is not an image a view can be cut from (sides beyond 100:1)" in (
        result.output
    )
    kept, _, skipped = audit_and_filter(
        load_folder(root), AuditConfig(on_bad_image="skip"), None, Loader(workers=2)
    )
    assert [s["path"] for s in skipped] == ["a/strip.png"]
    assert len([e for x in kept.splits.values() for e in x]) == 13  # the banner stays


@pytest.mark.parametrize(
    "damage", [b"\xff\xfe not utf-8", b"[" * 100_000, b"{ records renamed }", b"[1, 2]"]
)
def test_a_damaged_memo_means_checking_again(tmp_path, damage):
    """The memo is a shortcut: bytes that are not UTF-8, JSON nested past Python's recursion
    limit, or records of the wrong shape mean decoding again, never a traceback."""
    root = write_folder(tmp_path / "data", ["a", "b"], 3)
    assert CliRunner().invoke(cli, ["check-data", str(root)]).exit_code == 0
    (memo,) = (Path(os.environ["XDG_CACHE_HOME"]) / "tlkit" / "audit").glob("*.json")
    text = memo.read_text()
    memo.write_bytes(damage if damage[:1] != b"{" else text.replace('"record"', '"r"').encode())
    again = CliRunner().invoke(cli, ["check-data", str(root)])
    assert again.exit_code == 0, again.output
    assert "6 files, 6 ok, 0 bad, 0 warnings (0 unchanged since the last check)" in again.output
