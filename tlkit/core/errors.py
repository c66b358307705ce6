"""Errors a user can fix. Each carries its exit code; the CLI prints one line, no traceback.

Exit codes, one per kind (the README lists them): 1 other, 2 options and recipes, 3 data,
4 weights, 5 runs, 6 feature caches, 7 an output that already exists, 130 interrupted.

Anything that is not a TlkitError is a bug and keeps its traceback.
"""

from __future__ import annotations

import reprlib
from collections.abc import Iterable


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


class _Bounded(reprlib.Repr):
    """reprlib's bounded repr, with huge ints named by size: Python refuses to print them."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 2, limit, limit
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 4

    def repr_int(self, x: int, level: int) -> str:
        bits = x.bit_length()
        return super().repr_int(x, level) if bits <= 128 else f"<an int of {bits} bits>"


def first_line(e: BaseException, limit: int = 200) -> str:
    """A library's exception in a one-line message: its first line, cut (tfds and Keras list
    pages of detail), or its type when it says nothing."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def shown(value: object, limit: int = 80) -> str:
    """`value` as an error message quotes it: a bounded repr (a few items, a few levels, long
    strings cut), so a hostile or huge input cannot make the message itself huge or slow."""
    return _Bounded(limit).repr(value)


class TlkitError(Exception):
    """A mistake in the user's input or environment, explained in one line."""

    exit_code = 1


class ConfigError(TlkitError):
    """An option or recipe value that cannot be used."""

    exit_code = 2


class DataError(TlkitError):
    """A dataset that cannot be read as labelled images."""

    exit_code = 3


class WeightsError(TlkitError):
    """Pretrained weights that are missing, unreadable or do not match their pinned hash."""

    exit_code = 4


class RunError(TlkitError):
    """A run directory that is missing, incomplete or cannot be resumed."""

    exit_code = 5


class CacheError(TlkitError):
    """A feature cache that is missing, locked, corrupt or does not fit on disk."""

    exit_code = 6


class OutputExistsError(TlkitError):
    """The output would replace something already there: never without --overwrite."""

    exit_code = 7


class Interrupted(RunError):
    """Ctrl-C during training: the run stays resumable (128 + SIGINT, as shells report it)."""

    exit_code = 130
