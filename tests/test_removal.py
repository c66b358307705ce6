"""What `cache rm` and `--overwrite` may remove: only what proves to be tlkit's (a record that
parses as its kind's, naming the folder), nothing a live process is writing, nothing through a
symlink, and never a folder that holds the user's files (issue 38)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, write_folder

from tlkit.cli import cli
from tlkit.core.errors import OutputExistsError
from tlkit.core.fsutil import refuse_overwrite
from tlkit.data.datasets import Example
from tlkit.features.cache import CacheJob, build_cache, key_of

FAST = ["--backbone", TINY, "--weights", "none", "--input-size", "32", "--batch-size", "8"]
FAST += ["--head-epochs", "1", "--epochs", "0", "--freeze", "all", "--no-cache"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def error_line(result) -> str:
    assert "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error")]
    return line


def digest(root: Path) -> str:
    """Every entry under `root`, links as links (never followed), files with their bytes."""
    h = hashlib.sha256()
    for top, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(top, name)
            h.update(str(p.relative_to(root)).encode())
            if p.is_symlink():
                h.update(os.readlink(p).encode())
            elif p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def examples(n: int) -> list[Example]:
    return [Example(f"/x/{i}.png", f"ab/{i}.png", i % 2, "ab"[i % 2]) for i in range(n)]


def real_cache(root: Path, tag: str):
    """A cache the real builder publishes; the trunk's numbers are made up (no model needed)."""
    inputs = {"test": tag}
    job = CacheJob(
        {"train": examples(4)},
        {"train": 1},
        lambda split, view, start, e: np.zeros((len(e), 1), np.uint8),
        lambda x: np.ones((len(x), 2)),
        (2,),
        "float16",
        2,
    )
    return build_cache(root, key_of(inputs), inputs, job)


def real_store(root: Path, data: Path) -> Path:
    from tlkit.data.audit import audit_folder
    from tlkit.data.augment import eval_need
    from tlkit.data.datasets import load_dataset
    from tlkit.data.store import store_folder, store_images

    folder = audit_folder(load_dataset(data)).folder
    every = [e for split in folder.splits.values() for e in split]
    need = eval_need(32, 0.875)
    store_images(every, folder.digests, need, root, None, workers=1, announce=False)
    return store_folder(root, need)


# 1. `cache rm` removes only what proves to be tlkit's


def test_cache_rm_all_removes_only_what_proves_to_be_tlkits(tmp_path):
    root = tmp_path / "C"
    cache = real_cache(root, "a")
    store = real_store(root, write_folder(tmp_path / "data", ["a", "b"], 2))
    (root / "thesis").mkdir()
    (root / "thesis" / "main.tex").write_text("years of work")
    (root / "photos" / "cat").mkdir(parents=True)
    (root / "photos" / "cat" / "1.jpg").write_bytes(b"a photo")
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "keep.txt").write_text("keep")
    (root / "linked").symlink_to(mine, target_is_directory=True)
    shutil.copytree(cache.path, root / f"{cache.key}-backup")  # a manifest of another key
    (root / "fake").mkdir()
    (root / "fake" / "manifest.json").write_text("not even json")
    stuffed = real_cache(root, "b").path
    (stuffed / "notes.txt").write_text("mine")  # a real cache the user put a file in
    odd_store = root / "images" / ("0" * 20)
    odd_store.mkdir()
    (odd_store / "store.json").write_text("{}")  # its record does not name this folder
    kept = {p.name: digest(p) for p in [root / "thesis", root / "photos", mine, stuffed]}

    result = invoke("cache", "rm", "--all", "--cache-dir", str(root))
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert not cache.path.exists() and not store.exists()
    assert f"removed {cache.key}" in result.output
    assert f"removed images/{store.name}" in result.output
    for name, why in [
        ("thesis", "not tlkit's: holds no manifest.json"),
        ("photos", "not tlkit's: holds no manifest.json"),
        ("linked", "a symlink: never followed"),
        (f"{cache.key}-backup", f"is the record of key '{cache.key}'"),
        ("fake", "its manifest.json is not valid JSON"),
        (stuffed.name, "a cache never holds (e.g. notes.txt)"),
        (f"images/{odd_store.name}", "store.json is not the record of this store"),
    ]:
        line = next(x for x in result.output.splitlines() if x.startswith(f"left alone: {name} ("))
        assert why in line, line
    assert {p.name: digest(p) for p in [root / "thesis", root / "photos", mine, stuffed]} == kept
    assert (root / "linked").is_symlink()
    listing = invoke("cache", "ls", "--cache-dir", str(root))
    assert "not a tlkit cache: thesis (not tlkit's: holds no manifest.json)" in listing.output


def test_cache_rm_key_leaves_a_users_folder_named_after_the_key(tmp_path):
    root = tmp_path / "cache"
    cache = real_cache(root, "a")
    backup = root / f"{cache.key}.backup"  # `rm KEY` took every `KEY.*`
    shutil.copytree(cache.path, backup)
    (backup / "why.txt").write_text("the cache of my thesis' figures")
    before = digest(backup)
    result = invoke("cache", "rm", cache.key, "--cache-dir", str(root))
    assert result.exit_code == 0, result.output
    assert f"removed {cache.key}\n" in result.output and not cache.path.exists()
    assert f"left alone: {backup.name} (not tlkit's: its manifest.json is the record of key" in (
        result.output
    )
    assert digest(backup) == before
    again = invoke("cache", "rm", cache.key, "--cache-dir", str(root))
    assert again.exit_code == 6  # nothing removable under that key: one error line
    assert f"{backup.name} is left alone" in error_line(again)


# 2. a folder a live process is writing is never removed

BUILDER = """
import sys, time
from pathlib import Path
import numpy as np
from tlkit.data.datasets import Example
from tlkit.features.cache import CacheJob, build_part

root, key, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

def predict(x):
    print("BUILDING", flush=True)
    while not go.exists():
        time.sleep(0.02)
    return np.ones((len(x), 2))

ex = [Example(f"/x/{i}.png", f"ab/{i}.png", i % 2, "ab"[i % 2]) for i in range(4)]
rows = lambda split, view, start, e: np.zeros((len(e), 1), np.uint8)
job = CacheJob({"train": ex}, {"train": 1}, rows, predict, (2,), "float16", 2)
part = build_part(root, key, {}, job, 0, 2)
print("DONE", part.name, flush=True)
"""


def test_cache_rm_never_removes_a_shard_another_process_is_building(tmp_path):
    root, key, go = tmp_path / "cache", "a" * 20, tmp_path / "go"
    builder = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(root), key, str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert builder.stdout.readline().strip() == "BUILDING", builder.stderr.read()[-2000:]
        (building,) = root.glob(f"{key}.part-0-of-2.incomplete-*")
        result = invoke("cache", "rm", key, "--cache-dir", str(root))
        assert result.exit_code == 6 and building.is_dir()
        assert f"{building.name} is left alone, being built by a live process" in error_line(result)
        every = invoke("cache", "rm", "--all", "--cache-dir", str(root))
        assert every.exit_code == 0 and building.is_dir()
        assert f"left alone: {building.name} (being built by a live process)" in every.output
        assert (root / f"{key}.lock").is_file()  # the lock of a key with a folder left stays
        listing = invoke("cache", "ls", "--cache-dir", str(root)).output
        assert f"unfinished: {building.name} (being built by a live process" in listing
        assert "`tlkit cache rm` leaves it alone while it runs" in listing
    finally:
        go.touch()
        out, err = builder.communicate(timeout=120)
    assert builder.returncode == 0 and out.split()[-1] == f"{key}.part-0-of-2", err[-2000:]
    done = invoke("cache", "rm", key, "--cache-dir", str(root))  # finished: it may go now
    assert done.exit_code == 0 and f"removed {key}.part-0-of-2" in done.output
    assert not list(root.iterdir())


def test_cache_rm_leaves_a_key_another_process_builds_and_goes_on(tmp_path):
    """A running build holds its key's lock: its folders stay, the others go, no traceback."""
    root = tmp_path / "cache"
    busy, idle = real_cache(root, "busy"), real_cache(root, "idle")
    code = (
        "import sys, time; from pathlib import Path; from tlkit.features.cache import build_lock\n"
        "with build_lock(Path(sys.argv[1]), sys.argv[2]):\n"
        "    print('HELD', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(root), busy.key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "HELD"
        result = invoke("cache", "rm", "--all", "--cache-dir", str(root))
    finally:
        holder.communicate("", timeout=60)
    assert result.exit_code == 0, result.output
    assert f"left alone: {busy.key} (being built by a live process)" in result.output
    assert busy.path.is_dir() and not idle.path.exists()


# 3. --overwrite replaces only a record that parses as its kind's, beside nothing of the user's


def test_overwrite_refuses_a_fake_record_beside_the_users_files(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 6)
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes(b"a photo")
    (out / "run.json").write_text("not even json")
    (out / "thesis.tex").write_text("years of work")
    before = digest(out)
    result = invoke("finetune", str(data), "-o", str(out), "--overwrite", *FAST)
    assert result.exit_code == 7
    assert "holds 2 entries not made by tlkit (e.g. photos), not an earlier run" in error_line(
        result
    )
    assert digest(out) == before
    only = tmp_path / "only"
    only.mkdir()
    for text, why in [
        ("not even json", "its run.json is not valid JSON"),
        ('{"schema": 1}', "its run.json is not a tlkit run record (no 'backbone')"),
        ("[1, 2]", "its run.json is not a tlkit run record (a JSON list)"),
    ]:
        (only / "run.json").write_text(text)
        result = invoke("finetune", str(data), "-o", str(only), "--overwrite", *FAST)
        assert result.exit_code == 7 and f"{why}, not an earlier run" in error_line(result)
        assert (only / "run.json").read_text() == text


def test_overwrite_refuses_a_symlinked_record_or_folder(tmp_path):
    system = tmp_path / "etc" / "metrics.json"  # what a link may point at: not tlkit's to touch
    system.parent.mkdir()
    record = {"images": 9, "top1": 1.0, "per_class": {}, "confusion_matrix": [], "calibration": {}}
    system.write_text(json.dumps(record))  # every field an evaluation's record has
    linked = tmp_path / "eval" / "linked"
    linked.mkdir(parents=True)
    (linked / "metrics.json").symlink_to(system)
    with pytest.raises(OutputExistsError, match=r"e\.g\. metrics\.json \(a symlink\)"):
        refuse_overwrite(linked, True, "", kind="evaluation")
    real = tmp_path / "eval" / "real"
    real.mkdir()
    shutil.copyfile(system, real / "metrics.json")
    refuse_overwrite(real, True, "", kind="evaluation")  # the same record, not linked: replaced
    (tmp_path / "eval" / "alias").symlink_to(real, target_is_directory=True)
    with pytest.raises(OutputExistsError, match="alias: is a symlink, not an earlier"):
        refuse_overwrite(tmp_path / "eval" / "alias", True, "", kind="evaluation")
    (real / "export.json").write_text(json.dumps({"format": "keras"}))
    with pytest.raises(OutputExistsError, match=r"e\.g\. export\.json\), not an earlier"):
        refuse_overwrite(real, True, "", kind="evaluation")  # a file an evaluation never holds
    assert system.read_text() and (linked / "metrics.json").is_symlink()


def test_a_run_evaluated_diagnosed_and_exported_is_still_replaced(tiny_runs, tmp_path):
    """What tlkit writes into a run later (eval/, diagnose/, export/, a killed write's
    temporary) keeps it replaceable; one file of the user's among them does not."""
    data, runs = tiny_runs
    later = shutil.ignore_patterns("eval", "diagnose", "export")  # what other tests added
    run = Path(shutil.copytree(runs[0], tmp_path / "runs" / "r", ignore=later))
    for args in (["eval", str(run)], ["diagnose", str(run)], ["export", str(run)]):
        assert invoke(*args).exit_code == 0
    (run / "checkpoints" / ".last.0123456789ab.tmp.h5").write_bytes(b"killed mid-write")
    (evaluation,) = (run / "eval").iterdir()
    (evaluation / "notes.txt").write_text("mine")
    args = ["finetune", str(data), "-o", str(run), "--overwrite", *FAST]
    refused = invoke(*args)
    assert refused.exit_code == 7
    assert f"(e.g. eval/{evaluation.name}), not an earlier run" in error_line(refused)
    (evaluation / "notes.txt").unlink()
    for browsed in (run, run / "eval", evaluation):  # a desktop's files are not the user's work
        (browsed / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (run / "Thumbs.db").write_bytes(b"\xd0\xcf")
    replaced = invoke(*args)
    assert replaced.exit_code == 0, replaced.output
    assert not (run / "eval").exists() and (run / "run.json").is_file()


def test_a_run_record_proves_itself_by_what_run_record_requires():
    """fsutil (below core/runs.py) keeps its own list of a run record's fields; it must be
    what RunRecord requires, or a genuine run would be refused (or a stranger taken)."""
    from tlkit.core.fsutil import RECORD_FIELDS
    from tlkit.core.runs import RunRecord

    required = {
        f.name
        for f in dataclasses.fields(RunRecord)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert set(RECORD_FIELDS["run"]) == required | {"schema"}


USER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_removal import real_store
real_store(Path(sys.argv[1]), Path(sys.argv[2]))
print("USING", flush=True)
sys.stdin.read()
"""


def test_cache_rm_leaves_a_store_a_live_run_uses(tmp_path):
    """A process that builds or reads a resized-image store holds it until it ends: a run
    training from the store never has its images removed under it."""
    root, data = tmp_path / "cache", write_folder(tmp_path / "data", ["a", "b"], 2)
    user = subprocess.Popen(
        [sys.executable, "-c", USER, str(root), str(data), str(Path(__file__).parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert user.stdout.readline().strip() == "USING", user.stderr.read()[-2000:]
        (store,) = (root / "images").iterdir()
        result = invoke("cache", "rm", "--all", "--cache-dir", str(root))
        assert result.exit_code == 0 and store.is_dir(), result.output
        assert f"left alone: images/{store.name} (in use by a live process" in result.output
    finally:
        user.communicate("", timeout=60)
    assert invoke("cache", "rm", "--all", "--cache-dir", str(root)).exit_code == 0
    assert not store.exists()  # the process ended: its lock went with it


# 4. what a library fills for tlkit (TensorBoard's logs, a SavedModel) is described, not trusted


def test_overwrite_refuses_a_users_file_among_tensorboards_logs(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 6)
    run = tmp_path / "run"
    args = ["finetune", str(data), "-o", str(run), *FAST[:-5], "--epochs", "1", "--no-cache"]
    assert invoke(*args, "--tensorboard").exit_code == 0  # the logs Keras' callback writes
    assert list((run / "tensorboard" / "validation").glob("events.out.tfevents.*"))
    for mine in ("thesis.tex", "train/thesis.tex", "notes/a.txt"):
        path = run / "tensorboard" / mine
        path.parent.mkdir(exist_ok=True)
        path.write_text("years of work")
        before = digest(run)
        refused = invoke(*args, "--overwrite")
        assert refused.exit_code == 7, refused.output
        named = "tensorboard/notes" if mine.startswith("notes") else f"tensorboard/{mine}"
        assert f"(e.g. {named}), not an earlier run" in error_line(refused)
        assert digest(run) == before
        shutil.rmtree(path.parent) if mine.startswith("notes") else path.unlink()
    replaced = invoke(*args, "--overwrite")  # the logs alone: tlkit's to replace
    assert replaced.exit_code == 0, replaced.output


def test_overwrite_refuses_a_users_file_in_a_saved_model(tiny_runs, tmp_path):
    _, runs = tiny_runs
    later = shutil.ignore_patterns("eval", "diagnose", "export")
    run = Path(shutil.copytree(runs[0], tmp_path / "r", ignore=later))
    assert invoke("export", str(run), "--format", "savedmodel").exit_code == 0
    saved = run / "export" / "savedmodel" / "saved_model"
    assert (saved / "variables" / "variables.index").is_file()  # what a real export holds
    assert invoke("export", str(run), "--format", "keras").exit_code == 0
    (run / "export" / "keras" / "saved_model").mkdir()  # a keras export holds no SavedModel
    for where, fmt in ((saved, "savedmodel"), (saved / "variables", "savedmodel")):
        (where / "thesis.tex").write_text("years of work")
        refused = invoke("export", str(run), "--format", fmt, "--overwrite")
        assert refused.exit_code == 7 and (where / "thesis.tex").is_file()
        inner = where.relative_to(saved.parent) / "thesis.tex"
        assert f"(e.g. {inner}), not an earlier export" in error_line(refused)
        (where / "thesis.tex").unlink()
    (run / "export" / "keras" / "saved_model" / "thesis.tex").write_text("years of work")
    refused = invoke("export", str(run), "--format", "keras", "--overwrite")
    assert refused.exit_code == 7
    assert "(e.g. saved_model/thesis.tex), not an earlier export" in error_line(refused)
    again = invoke("export", str(run), "--format", "savedmodel", "--overwrite")
    assert again.exit_code == 0, again.output  # a genuine SavedModel is still replaced


# 5. an evaluation being built is looked into, and left alone while its writer lives

WRITER_ALIVE = """
import sys
from pathlib import Path
from tlkit.core.fsutil import incomplete_dir
print(incomplete_dir(Path(sys.argv[1]), "evaluation"), flush=True)
sys.stdin.read()
"""


def test_overwrite_looks_inside_an_evaluation_being_built(tiny_runs, tmp_path):
    from tlkit.core.fsutil import discard, incomplete_dir

    data, runs = tiny_runs
    later = shutil.ignore_patterns("eval", "diagnose", "export")
    run = Path(shutil.copytree(runs[0], tmp_path / "r", ignore=later))
    mine = run / "eval" / "mine.incomplete-x"
    mine.mkdir(parents=True)
    (mine / ".tlkit-writer").write_text('{"kind": "evaluation"}')  # says so; proves nothing
    (mine / "thesis.tex").write_text("years of work")
    args = ["finetune", str(data), "-o", str(run), "--overwrite", *FAST]
    refused = invoke(*args)
    assert refused.exit_code == 7 and (mine / "thesis.tex").is_file()
    assert "(e.g. eval/mine.incomplete-x), not an earlier run" in error_line(refused)
    discard(incomplete_dir(run / "eval" / "mine", "evaluation", clean=True))  # eval --name mine
    assert (mine / "thesis.tex").is_file()
    shutil.rmtree(mine)
    holder = subprocess.Popen(
        [sys.executable, "-c", WRITER_ALIVE, str(run / "eval" / "live")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live = Path(holder.stdout.readline().strip())
        (live / "metrics.json").write_text("{}")  # partly written, by its live writer
        refused = invoke(*args)
        assert refused.exit_code == 7 and live.is_dir(), refused.output
        assert f"eval/{live.name} (being written by a live process)" in error_line(refused)
    finally:
        holder.communicate("", timeout=60)
    (live / ".predictions.0123456789ab.tmp.csv").write_text("killed mid-write")
    replaced = invoke(*args)  # its writer died: a leftover of tlkit's, partial or not
    assert replaced.exit_code == 0, replaced.output
    assert not (run / "eval").exists()


# 6. a record nested past Python's recursion limit is a damaged record, not a traceback


def test_deeply_nested_records_are_damaged_records(tiny_runs, tmp_path):
    data, runs = tiny_runs
    nested = "[" * 5000 + "]" * 5000
    later = shutil.ignore_patterns("eval", "diagnose", "export")
    run = Path(shutil.copytree(runs[0], tmp_path / "runs" / "r", ignore=later))
    (run / "run.json").write_text(nested)
    listing = invoke("runs", "--runs-dir", str(run.parent))
    assert listing.exit_code == 0 and "Traceback" not in listing.output
    assert "unreadable" in listing.output
    assert invoke("eval", str(run)).exit_code == 5
    assert "run.json: not valid JSON" in error_line(invoke("eval", str(run)))
    refused = invoke("finetune", str(data), "-o", str(run), "--overwrite", *FAST)
    assert refused.exit_code == 7 and "its run.json is not valid JSON" in error_line(refused)
    root = tmp_path / "cache"
    cache = real_cache(root, "a")
    (cache.path / "manifest.json").write_text(nested)
    building = root / f"{'b' * 20}.incomplete-1"
    building.mkdir()
    (building / ".tlkit-writer").write_text(nested[:4000])
    listed = invoke("cache", "ls", "--cache-dir", str(root))
    assert listed.exit_code == 0 and "Traceback" not in listed.output
    assert f"not a tlkit cache: {cache.key} (not tlkit's: its manifest.json is not valid" in (
        listed.output
    )
    removed = invoke("cache", "rm", "--all", "--cache-dir", str(root))
    assert removed.exit_code == 0 and "Traceback" not in removed.output
    assert cache.path.is_dir() and building.is_dir()


# 7. `cache rm` touches nothing outside the cache folder, and no lock file of the user's


def test_cache_rm_key_is_a_name_and_user_lock_files_stay(tmp_path):
    root = tmp_path / "cache"
    cache = real_cache(root, "a")
    assert (root / f"{cache.key}.lock").is_file()  # its build lock
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "important.lock").touch()  # empty, as many lock files are
    for key in ("../outside/important", str(outside / "important"), "..", "a/b"):
        refused = invoke("cache", "rm", key, "--cache-dir", str(root))
        assert refused.exit_code == 2, refused.output
        assert "not a cache key" in error_line(refused)
    assert (outside / "important.lock").is_file() and cache.path.is_dir()
    (root / "notes.lock").touch()
    (root / f"{'c' * 20}.lock").touch()  # a lock of a key built and removed earlier
    listed = invoke("cache", "ls", "--cache-dir", str(root))
    assert "not a tlkit cache: notes.lock (a file, not a cache folder)" in listed.output
    removed = invoke("cache", "rm", "--all", "--cache-dir", str(root))
    assert removed.exit_code == 0, removed.output
    assert "left alone: notes.lock (a file, not a cache folder)" in removed.output
    assert sorted(p.name for p in root.iterdir()) == ["notes.lock"]
    assert invoke("cache", "rm", "notes", "--cache-dir", str(root)).exit_code == 6
    assert (root / "notes.lock").is_file()


# 8. a damaged store record is listed, never a traceback


def test_cache_ls_lists_a_damaged_store(tmp_path):
    root = tmp_path / "cache"
    store = real_store(root, write_folder(tmp_path / "data", ["a", "b"], 2))
    for name, text, why in [
        ("0" * 20, "not json", "its store.json is not valid JSON"),
        ("1" * 20, "[1]", "its store.json is not the record of this store"),
        ("2" * 20, "[" * 5000 + "]" * 5000, "its store.json is not valid JSON"),
    ]:
        (root / "images" / name).mkdir()
        (root / "images" / name / "store.json").write_text(text)
        listed = invoke("cache", "ls", "--cache-dir", str(root))
        assert listed.exit_code == 0 and "Traceback" not in listed.output, listed.output
        assert f"not a tlkit cache: images/{name} (not tlkit's: {why})" in listed.output
        assert f"resized-image store {store.name}: " in listed.output
    removed = invoke("cache", "rm", "--all", "--cache-dir", str(root))
    assert removed.exit_code == 0 and not store.exists()
    assert removed.output.count(f"left alone: images/{'0' * 20} (") == 1
