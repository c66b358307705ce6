"""Progress bars for long steps that are not Keras loops (checking files, evaluating, writing a
tfds dataset out). On stderr, only when it is a terminal and tlkit's log shows progress (not
under --quiet), so scripts and --json output never see them."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

MIN_ITEMS = 200  # shorter steps finish before a bar would help


@contextlib.contextmanager
def progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`."""
    show = (
        total >= MIN_ITEMS
        and sys.stderr.isatty()
        and logging.getLogger("tlkit").isEnabledFor(logging.INFO)
    )
    if not show:
        yield lambda n: None
        return
    import click

    with click.progressbar(
        length=total, label=label, file=sys.stderr, show_pos=True, show_eta=True
    ) as bar:
        yield bar.update
