"""Filesystem helpers that make every write all-or-nothing.

A crash at any point leaves either the old file or the new one, never half of either, which is
what lets a user kill a run at any moment without losing what was already on disk.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tlkit.core.errors import OutputExistsError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it over `path` only if the block succeeds.

    `suffix` keeps the extension for writers that check it (Keras insists on `.keras`). The
    temporary file is created with mode 0666 less the umask, as `open()` would create it
    (`mkstemp`'s 0600 would leave every result unreadable to a colleague or a serving user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    tmp_path = path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write text or bytes to `path` atomically."""
    with atomic_path(path) as tmp:
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(tmp, mode, encoding=None if isinstance(data, bytes) else "utf-8") as f:
            f.write(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_record(
    path: str | os.PathLike[str], error: type[Exception], fix: str
) -> dict[str, Any]:
    """A JSON object tlkit wrote (a manifest, an identity): a damaged or foreign one is the
    `error` in one line that names the file and says `fix`, never a traceback."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise error(f"{path}: not valid JSON ({str(e)[:120]}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a tlkit record (a JSON {type(data).__name__}); {fix}")
    return data


INCOMPLETE = ".incomplete-"  # <final>.incomplete-<id>/: a multi-file artifact being built
WRITER = ".tlkit-writer"  # in an incomplete folder: its kind, locked by the process writing it
# what each kind of artifact holds once finished: the file that says a folder is one
RECORDS = {
    "run": "run.json",
    "export": "export.json",
    "evaluation": "metrics.json",
    "diagnose": "diagnose.json",
    "explanations": None,
    "tfds": "tlkit-tfds.json",
    "cache": "manifest.json",
    "cache part": "part.json",
}
RESUMABLE = ("run", "cache", "cache part")  # interrupted ones are listed, never cleaned
FILE = "file"
# what a library writes for tlkit, as the path of each entry inside the folder (a folder's
# with a trailing /): Keras' TensorBoard callback (as tlkit sets it: no profiler, no
# embeddings) writes one events file per process and phase in train/ and validation/; a
# SavedModel of a Keras model (no asset files) its graph, fingerprint and variables, which
# TensorFlow writes in variables_temp/ first
TENSORBOARD = re.compile(r"(train|validation)/(events\.out\.tfevents\.[^/]+)?")
SAVED_MODEL = re.compile(
    r"saved_model\.pb|fingerprint\.pb|assets/"
    r"|variables/((variables|variables_temp/part-\d+-of-\d+)\.(index|data-\d+-of-\d+))?"
    r"|variables/variables_temp/"
)
# what tlkit writes in a finished artifact of each kind that --overwrite may replace: a name is
# a FILE, a folder a library fills for tlkit (a pattern its every entry matches), a folder of
# only the entries named (a dict), or a folder of earlier artifacts of the kind named (a run's
# evaluations). Anything else in the folder is the user's, so the folder is never replaced.
CONTENTS: dict[str, dict[str, Any]] = {
    "run": {
        "run.json": FILE,
        "model.keras": FILE,
        "history.csv": FILE,
        "training_curves.png": FILE,
        "data_report.json": FILE,
        "search.csv": FILE,
        "checkpoints": dict.fromkeys(
            ("incoming.h5", "last.h5", "previous.h5", "best.h5", "search.h5", "identity.json"), FILE
        ),
        "tensorboard": TENSORBOARD,
        "eval": "evaluation",
        "diagnose": "diagnose",
        "export": "export",
        # --preset best (tlkit.preset): its candidates, each a run, its leaderboard and plan
        "members": "run",
        "leaderboard.csv": FILE,
        "preset.json": FILE,
    },
    "export": {
        "export.json": FILE,
        "labels.txt": FILE,
        "model.keras": FILE,
        "model.tflite": FILE,
        "model.onnx": FILE,
        "saved_model": SAVED_MODEL,
    },
    "evaluation": dict.fromkeys(
        (
            "metrics.json",
            "predictions.csv",
            "confusion_matrix.png",
            "reliability_diagram.png",
            "report.html",
        ),
        FILE,
    ),
    "diagnose": dict.fromkeys(("diagnose.json", "relabel.csv", "report.html"), FILE),
}
# the fields each kind's writer always puts in its record: what tells tlkit's record from any
# file of that name (a run's are RunRecord's required fields; a test holds the two together)
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "run": (
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
    ),
    "export": ("format", "model", "labels", "input", "output"),
    "evaluation": ("images", "top1", "per_class", "confusion_matrix"),
    "diagnose": ("schema", "run", "images", "folds"),
    "cache": ("schema", "key", "dtype", "inputs", "splits"),
    "cache part": ("schema", "key", "index", "count", "pieces", "splits"),
}
# files a desktop drops into a folder a person browses (lower case); never data, never a reason
# to refuse --overwrite
OS_FILES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", ".directory"}
RECORD_BYTES = 1 << 28  # no record tlkit writes comes near; a bigger file is not one
TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp(.*)")  # atomic_path's: .<stem>.<id>.tmp<suffix>
_HELD: dict[str, int] = {}  # folder -> descriptor of its locked writer file, while we write it


BEING_WRITTEN = "being written by a live process"


class FolderBusy(Exception):
    """Another live process holds the folder's writer lock."""


class NotTlkit(Exception):
    """A path that does not prove to be what tlkit wrote; the message says why, in words."""


def incomplete_dir(final: str | os.PathLike[str], kind: str, clean: bool = False) -> Path:
    """A fresh `<final>.incomplete-<id>/` beside `final`, where a multi-file artifact of `kind`
    is built, locked by this process until `publish_dir` (or its end: the OS releases a lock
    when its holder dies). `clean` removes earlier attempts at `final` of the same kind that
    no live process holds and that hold only what the kind writes (`leftover_problem`): for
    kinds that cannot be resumed, whose leftovers are only clutter.
    Liveness is the lock, never the age: a build running for days is not a leftover."""
    if kind not in RECORDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if clean and kind not in RESUMABLE:
        for old in find_incomplete(final):  # a tfds copy's, in tlkit's own cache folder
            if (
                leftover_problem(old, kind) is None
                if kind in CONTENTS
                else writer_kind(old) == kind and not is_live(old)
            ):
                shutil.rmtree(old, ignore_errors=True)
    tmp = final.parent / f"{final.name}{INCOMPLETE}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    claim(tmp, kind)
    return tmp


def claim(folder: str | os.PathLike[str], kind: str | None = None) -> None:
    """Take `folder`'s writer lock for this process (FolderBusy if a live one holds it);
    `kind` is recorded in it for a new folder, an existing one keeps its own."""
    folder = Path(folder)
    if str(folder) in _HELD:
        return
    fd = os.open(folder / WRITER, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(folder) from None
    if kind is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"kind": kind, "pid": os.getpid()}).encode(), 0)
    _HELD[str(folder)] = fd


def release(folder: str | os.PathLike[str]) -> None:
    """Drop the writer lock this process took on `folder`, if it took one."""
    fd = _HELD.pop(str(Path(folder)), None)
    if fd is not None:
        os.close(fd)


def discard(folder: str | os.PathLike[str]) -> None:
    """Give up an artifact being built: its lock, then its folder."""
    release(folder)
    shutil.rmtree(folder, ignore_errors=True)


def read_regular(path: str | os.PathLike[str], limit: int = RECORD_BYTES) -> bytes:
    """The bytes of the regular file `path`, never read through a symlink (OSError ELOOP) nor
    from a pipe or device (OSError EINVAL), and never more than `limit` of them."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise OSError(errno.EINVAL, "not a regular file of a record's size", str(path))
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def load_record(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """The record at `path` of an artifact of `kind`, taken as tlkit's only when it is a regular
    file (a symlink is not) holding a JSON object with every field that kind's writer puts
    there; NotTlkit says why not. A file's name proves nothing."""
    name = Path(path).name
    try:
        data = json.loads(read_regular(path))
    except FileNotFoundError:
        raise NotTlkit(f"holds no {name}") from None
    except OSError as e:
        what = "a symlink" if e.errno == errno.ELOOP else "not a readable file"
        raise NotTlkit(f"its {name} is {what}") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise NotTlkit(f"its {name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise NotTlkit(f"its {name} is not a tlkit {kind} record (a JSON {type(data).__name__})")
    missing = [f for f in RECORD_FIELDS[kind] if f not in data]
    if missing:
        raise NotTlkit(f"its {name} is not a tlkit {kind} record (no {missing[0]!r})")
    return data


def writer_kind(folder: Path) -> str | None:
    """The kind recorded in an incomplete folder; None for one without a readable marker (a
    symlinked one is not read)."""
    try:
        kind = json.loads(read_regular(Path(folder) / WRITER, 4096)).get("kind")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return kind if isinstance(kind, str) else None


def is_live(folder: Path) -> bool:
    """Whether a process (this one included) holds `folder`'s writer lock right now."""
    if str(folder) in _HELD:
        return True
    writer = Path(folder) / WRITER
    if writer.is_symlink() or not writer.is_file():
        return False
    with hold_lock(writer, wait=False) as held:
        return not held


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike[str], wait: bool = True) -> Iterator[bool]:
    """An exclusive `flock` on the file `path` for the block; yields False (without the lock)
    when `wait` is False and another process holds it. The OS releases it if the holder dies,
    so a stale lock cannot exist. A lock file may be removed by whoever holds it (`cache rm`):
    a process that locked the removed file sees that it is no longer at `path` and locks
    the new one, so two holders never coexist."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # removed while we waited: lock the file that is there now
    try:
        yield True
    finally:
        os.close(fd)


def is_incomplete(path: str | os.PathLike[str]) -> bool:
    return INCOMPLETE in Path(path).name


def final_path(path: str | os.PathLike[str]) -> Path:
    """runs/x for runs/x.incomplete-<id>; any other path as it is."""
    path = Path(path)
    return path.parent / path.name.split(INCOMPLETE)[0]


def find_incomplete(final: str | os.PathLike[str]) -> list[Path]:
    """The incomplete attempts at `final`, oldest first."""
    final = Path(final)
    found = final.parent.glob(f"{final.name}{INCOMPLETE}*") if final.parent.is_dir() else []
    return sorted((p for p in found if p.is_dir()), key=lambda p: p.stat().st_mtime)


def tlkit_output(path: Path) -> str | None:
    """What tlkit made the folder `path` as, in words (a run, an export, one being built);
    None for anything else. A finished tfds copy is data, so it does not count."""
    if is_incomplete(path) or (path / WRITER).is_file():
        return f"an unfinished tlkit {writer_kind(path) or 'output'} folder"
    for kind, record in RECORDS.items():
        if record and kind != "tfds" and (path / record).is_file():
            return f"a tlkit {kind} folder ({record})"
    return None


def artifact_problem(path: str | os.PathLike[str], kind: str) -> str | None:
    """Why the folder `path` is not a finished artifact of `kind` that tlkit wrote, in words;
    None when it is one: every entry is one tlkit writes there (`CONTENTS`), none a symlink,
    and its record is that kind's. Entries are checked first: they are what a user would lose."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    if stat.S_ISLNK(mode):
        return "is a symlink"
    if not stat.S_ISDIR(mode):
        return "is a file" if stat.S_ISREG(mode) else "is not a folder"
    if kind not in CONTENTS:
        return f"is not a kind of folder --overwrite replaces ({kind})"
    try:
        foreign = _foreign(path, CONTENTS[kind])
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if foreign:
        n = len(foreign)
        return f"holds {n} {'entry' if n == 1 else 'entries'} not made by tlkit (e.g. {foreign[0]})"
    record = RECORDS[kind]
    if record is None:  # a kind without a record file: its contents said all there is
        return None
    try:
        load_record(path / record, kind)
    except NotTlkit as e:
        return str(e)
    return None


def _foreign(folder: Path, allowed: dict[str, Any]) -> list[str]:
    """The entries of `folder` that tlkit does not write there, inner ones as `a/b`."""
    out: list[str] = []
    for name in sorted(os.listdir(folder)):
        misfit = _misfit(folder / name, _spec(name, allowed))
        if misfit is not None:
            out.append(misfit)
    return out


def _spec(name: str, allowed: dict[str, Any]) -> Any:
    """What `allowed` says an entry called `name` is: its writer file, the temporaries
    atomic_path leaves when killed (`.<stem>.<id>.tmp<suffix>`) and a desktop's files
    (`.DS_Store`) count as files."""
    temporary = TEMPORARY.fullmatch(name)
    if name == WRITER or (temporary and allowed.get(temporary[1] + temporary[2]) == FILE):
        return FILE
    if name.lower() in OS_FILES:
        return FILE
    return allowed.get(name)


def _misfit(entry: Path, spec: Any) -> str | None:
    """`entry`'s name (or an inner entry's, `a/b`) when it is not what `spec` says; None when
    it is. Nothing is followed through a symlink."""
    try:
        mode = os.lstat(entry).st_mode
    except FileNotFoundError:
        return None  # gone while we looked: nothing of the user's to lose there
    if stat.S_ISLNK(mode):
        return f"{entry.name} (a symlink)"
    if spec == FILE:
        return None if stat.S_ISREG(mode) else entry.name
    if spec is None or not stat.S_ISDIR(mode):
        return entry.name
    if isinstance(spec, dict):
        inner = _foreign(entry, spec)
        return f"{entry.name}/{inner[0]}" if inner else None
    if isinstance(spec, re.Pattern):
        unlike = _unlike(entry, spec)
        return f"{entry.name}/{unlike}" if unlike else None
    for child in sorted(os.listdir(entry)):  # earlier artifacts of kind `spec`, or being built
        p = entry / child
        if child.lower() in OS_FILES and stat.S_ISREG(os.lstat(p).st_mode):
            continue
        if is_incomplete(child):
            why = leftover_problem(p, spec)
            if why == BEING_WRITTEN:
                return f"{entry.name}/{child} ({why})"
        else:
            why = artifact_problem(p, spec)
        if why is not None:
            return f"{entry.name}/{child}"
    return None


def _unlike(folder: Path, pattern: re.Pattern[str], inside: str = "") -> str | None:
    """The first entry under `folder`, a library's output, whose path from it (`inside` the
    folders above) `pattern` does not describe: a folder's path is matched with a trailing
    /, so the walk goes only as deep as the pattern allows. None when every entry fits."""
    for name in sorted(os.listdir(folder)):
        path, rel = folder / name, inside + name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode) and pattern.fullmatch(rel + "/"):
            inner = _unlike(path, pattern, rel + "/")
            if inner:
                return inner
        elif not stat.S_ISREG(mode) or not (pattern.fullmatch(rel) or name.lower() in OS_FILES):
            return f"{rel} (a symlink)" if stat.S_ISLNK(mode) else rel
    return None


def leftover_problem(path: str | os.PathLike[str], kind: str) -> str | None:
    """Why the `.incomplete-` folder `path` is not an unfinished artifact of `kind` that tlkit
    may remove, in words; None when it is one: a real folder whose writer file says `kind`,
    whose writer no live process is, holding only entries that kind writes (some may be
    missing: it was cut short), its writer file and temporaries. Its writer file proves
    nothing alone: anyone can write one."""
    path = Path(path)
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return "is a symlink" if path.is_symlink() else "is not a folder"
    except FileNotFoundError:
        return "does not exist"
    if writer_kind(path) != kind:
        return f"holds no writer file of a tlkit {kind}"
    if is_live(path):
        return BEING_WRITTEN
    if kind not in CONTENTS:
        return f"is not a kind of folder tlkit checks ({kind})"
    try:
        foreign = _foreign(path, CONTENTS[kind])
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return f"holds {foreign[0]}, which a tlkit {kind} never holds" if foreign else None


def _holds(path: Path, kind: str) -> str:
    """What stands at `path` instead of an earlier `kind`, in words, for the refusal."""
    for other in CONTENTS:
        if other != kind and artifact_problem(path, other) is None:
            return f"holds a tlkit {other} ({RECORDS[other]})"
    return artifact_problem(path, kind) or f"holds a tlkit {kind}"


def refuse_overwrite(
    path: str | os.PathLike[str],
    overwrite: bool,
    hint: str,
    kind: str | None = None,
    inputs: tuple[str | os.PathLike[str], ...] = (),
) -> None:
    """The one check before writing a user-visible output: `path` is replaced only when asked,
    and only when it proves to be an earlier artifact of the same `kind` (`artifact_problem`:
    its record parses as that kind's, it holds nothing tlkit does not write, no symlink) that
    holds none of the `inputs`; never the data, a run under an export, or anything else."""
    path = Path(path)
    here = path.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source == here or source.is_relative_to(here):
            raise OutputExistsError(
                f"{path}: holds the input {given}, which the output would "
                "replace; choose another output folder"
            )
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise OutputExistsError(f"{path}: already exists; {hint}")
    if kind is not None and artifact_problem(path, kind) is not None:
        raise OutputExistsError(
            f"{path}: {_holds(path, kind)}, not an earlier {kind}; --overwrite "
            f"replaces only a tlkit {kind}: choose another folder"
        )


def publish_dir(
    tmp: str | os.PathLike[str], final: str | os.PathLike[str], overwrite: bool = False
) -> None:
    """Rename a finished directory into place; an old one is removed only after the swap, and
    only if it is an artifact of the same kind (`refuse_overwrite` said why before the work)."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists() or final.is_symlink():
        if not overwrite:
            raise FileExistsError(final)
        refuse_overwrite(final, True, "", kind=writer_kind(tmp) or "unknown kind")
        old = final.parent / f"{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    with contextlib.suppress(FileNotFoundError):
        (final / WRITER).unlink()  # a finished artifact has no writer
    release(tmp)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_inside(root: str | os.PathLike[str], relative: str) -> bool:
    """Whether `root / relative` stays under `root`: a name read from a manifest must not
    reach other files with `..`, an absolute path or a symlink."""
    root = Path(root).resolve()
    return Path(root, relative).resolve().is_relative_to(root)


def safe_name(text: str, limit: int = 100) -> str:
    """`text` as one harmless file-name component: letters, digits and `._+-` kept, anything
    else (separators, `..`, control characters, spaces) an underscore, no leading dot."""
    cleaned = "".join(c if c.isalnum() or c in "._+-" else "_" for c in text)
    return cleaned.lstrip(".")[:limit] or "_"


def user_cache_dir() -> Path:
    """tlkit's per-user cache (XDG): memos that are cheap to lose, never results."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tlkit"


def file_hash(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """A file's hex digest, read in chunks: sha256 for tlkit's own pins, or the algorithm a
    pin uses (Keras pins md5 or sha256 digests)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def folder_bytes(path: str | os.PathLike[str]) -> int:
    """The bytes of every file under `path` (a hard link counted once)."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
