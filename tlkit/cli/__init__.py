"""The `tlkit` command: parses options and calls the Python API; nothing else lives here.

One module per group of commands (models, data, training, runs) over `app` (the group, its
logging and output) and `options` (each setting's click option, made from tlkit.core.settings).
TensorFlow is imported inside commands only, so `tlkit --help` answers instantly.
"""

from __future__ import annotations

import click

from tlkit.cli import data_commands, model_commands, run_commands, train_commands  # noqa: F401
from tlkit.cli.app import cli

__all__ = ["cli", "commands", "main"]


def commands(group: click.Group = cli) -> list[click.Command]:
    """Every command under `group`, sub-groups' included."""
    out: list[click.Command] = []
    for command in group.commands.values():
        out += commands(command) if isinstance(command, click.Group) else [command]
    return out


def main() -> None:
    cli(prog_name="tlkit")
