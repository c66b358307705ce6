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
    root = cli.make_context(
        "tlkit", [], resilient_parsing=True, terminal_width=100, max_content_width=100
    )
    for ctx in _walk(root):
        name = ctx.command_path
        parts.append(f"\n## `{name}`\n\n```\n{ctx.command.get_help(ctx)}\n```\n")
    return "".join(parts)


def _walk(ctx: click.Context) -> list[click.Context]:
    """The context of every command under `ctx`'s, as the command line makes them (so each
    inherits the group's settings: -h, the width)."""
    out = [ctx]
    group = ctx.command
    if isinstance(group, click.Group):
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            if command is not None:
                sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
                out += _walk(sub)
    return out


if __name__ == "__main__":
    click.echo(command_reference(), nl=False)
