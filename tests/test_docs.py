"""The manual stays true: the command reference is the commands' own --help, every link in the
README and docs/ leads somewhere, and the README stays a page a newcomer reads in minutes."""

from __future__ import annotations

import re

from conftest import REPO

DOCS = REPO / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_command_reference_is_the_commands_help():
    from tlkit.cli.reference import command_reference

    written = (DOCS / "commands.md").read_text()
    assert written == command_reference(), (
        "docs/commands.md differs from the commands: python -m tlkit.cli.reference > "
        "docs/commands.md"
    )


def test_the_reference_holds_every_command_and_option():
    from tlkit.cli import commands

    written = (DOCS / "commands.md").read_text()
    for command in commands():
        assert f" {command.name}`\n" in written, command.name
        for param in command.params:
            for flag in getattr(param, "opts", []):
                if flag.startswith("-"):
                    assert flag in written, (command.name, flag)


def test_every_link_leads_to_a_file():
    pages = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
    assert len(pages) > 10
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_the_readme_is_short_and_leads_to_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for page in DOCS.glob("*.md"):
        assert f"(docs/{page.name})" in readme, page.name
    for command in (
        "tlkit finetune --freeze 10 data/",
        "tlkit precompute-features",
        "tlkit eval --multicrop",
        "python -m pytest",
    ):
        assert command in readme
