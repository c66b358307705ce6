"""docs/commands.md, written from the click commands themselves, so the reference cannot drift
from `--help` (tests/test_docs.py compares them). `python -m tlkit.cli.reference > docs/commands.md`
writes it again."""

from __future__ import annotations

import click

from tlkit.cli import cli

HEADER = """# Command reference

Every `tlkit` command with its `--help`, generated from the commands themselves by
`python -m tlkit.cli.reference > docs/commands.md` (a test fails when this page and the code
differ). The overview, conventions and exit codes are in [cli.md](cli.md).
"""


def command_reference() -> str:
    parts = [HEADER]
    for path, command in _walk(cli, ["tlkit"]):
        with click.Context(
            command, info_name=" ".join(path), terminal_width=100, max_content_width=100
        ) as ctx:
            text = command.get_help(ctx)
        parts.append(f"\n## `{' '.join(path)}`\n\n```\n{text}\n```\n")
    return "".join(parts)


def _walk(group: click.Group, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out: list[tuple[list[str], click.Command]] = [(path, group)]
    for name in group.list_commands(click.Context(group)):
        command = group.get_command(click.Context(group), name)
        if isinstance(command, click.Group):
            out += _walk(command, [*path, name])
        elif command is not None:
            out.append(([*path, name], command))
    return out


if __name__ == "__main__":
    click.echo(command_reference(), nl=False)
