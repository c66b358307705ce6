"""What tlkit reads cannot run code, reach outside its folder, or exhaust memory."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO
from PIL import Image, ImageFile

from tlkit.core.errors import CacheError, DataError
from tlkit.data.decode import decode_image
from tlkit.features.cache import open_cache

SOURCES = sorted((REPO / "tlkit").rglob("*.py"))


def calls(pattern: str) -> list[tuple[str, str]]:
    """(file, call text up to its closing line) for every match in tlkit's sources."""
    out = []
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(pattern, text):
            end = text.find(")", m.end())
            out.append((path.name, text[m.start() : text.find("\n", end) + 1]))
    return out


def test_no_pickle_and_every_loader_is_the_safe_one():
    assert SOURCES
    for path in SOURCES:
        if path.name == "torch_checkpoint.py":  # the restricted unpickler: test_torch_checkpoint
            continue
        assert not re.search(
            r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", path.read_text(), re.M
        ), path.name
    np_loads = calls(r"\bnp\.load\(")
    assert np_loads  # the cache reads labels with it
    for name, call in np_loads:
        assert "allow_pickle=False" in call, (name, call)
    model_loads = calls(r"\b(saving|models)\.load_model\(")
    assert model_loads
    for name, call in model_loads:
        assert "safe_mode=True" in call, (name, call)
    assert not calls(r"\byaml\.(unsafe_)?load\("), "use yaml.safe_load"


def test_a_manifest_naming_files_outside_the_cache_is_refused(tmp_path):
    key = tmp_path / "cache" / "k"
    key.mkdir(parents=True)
    (tmp_path / "secret.npy").write_bytes(b"\x93NUMPY")
    manifest = {
        "splits": {
            "train": {
                "shards": [{"file": "../../secret.npy", "bytes": 6, "sha256": "x", "rows": 1}],
                "labels": {"file": "train-labels.npy"},
            }
        }
    }
    (key / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=r"names a file outside the cache \('../../secret.npy'\)"):
        open_cache(tmp_path / "cache", "k")
    manifest["splits"]["train"]["shards"][0]["file"] = "/etc/passwd"
    (key / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="outside the cache"):
        open_cache(tmp_path / "cache", "k")


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12_000, 12_000)).save(bomb)  # 144 megapixels in a few hundred kB
    assert bomb.stat().st_size < 1_000_000

    def must_not_decode(*args, **kwargs):
        raise AssertionError("the bomb's pixels were loaded")

    # the tripwire is on the first pixel load itself: Pillow's ImageFile.load (what
    # Image.load, convert, transpose and tobytes call first)
    monkeypatch.setattr(ImageFile.ImageFile, "load", must_not_decode)
    with pytest.raises(
        DataError,
        match=r"bomb\.png: 12000x12000 is 144\.0 megapixels, above "
        r"the limit of 100 \(a decompression bomb\?\)",
    ):
        decode_image(bomb)
    huge = tmp_path / "huge.png"
    Image.new("1", (20_000, 20_000)).save(huge)  # beyond Pillow's own hard limit as well
    with pytest.raises(DataError, match=r"huge\.png: refused as a possible decompression bomb"):
        decode_image(huge)
