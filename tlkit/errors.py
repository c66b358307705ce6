"""Errors a user can fix. Each carries its exit code; the CLI prints one line, no traceback.

Anything that is not a TlkitError is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


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
    """A run directory that is missing, incomplete, or would be overwritten."""

    exit_code = 5
