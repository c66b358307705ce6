"""The `tlkit` group: one line for a user's mistake, logging through click, --json and
--quiet, and TensorFlow's load-time noise kept off the terminal.

TensorFlow is imported inside commands only, so `tlkit --help` answers instantly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

import click

from tlkit.core.errors import TlkitError


class TlkitGroup(click.Group):
    """Turns a TlkitError into one line on stderr and its exit code; bugs keep tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TlkitError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


class _EchoHandler(logging.Handler):
    """Progress messages through click.echo, which finds the current stdout at each call; on
    stderr under --json, so that stdout holds the JSON alone."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = click.get_current_context(silent=True)
        to_stderr = record.levelno >= logging.WARNING or (
            ctx is not None and ctx.meta.get(JSON_OUTPUT)
        )
        click.echo(self.format(record), err=bool(to_stderr))


JSON_OUTPUT = "tlkit.json"  # ctx.meta key: this command prints JSON on stdout


QUIET = "tlkit.quiet"  # ctx.meta key: --quiet


# What TensorFlow's C++ side prints while it loads, before its logging starts (so
# TF_CPP_MIN_LOG_LEVEL cannot hide it): noise on every command, filtered out of stderr.
TF_LOAD_NOISE = (
    "WARNING: All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized",
    "To enable the following instructions:",
)


class _QuietTensorFlowLoad(importlib.abc.MetaPathFinder):
    """Loads `tensorflow`, wherever it is first imported, with stderr (fd 2) in a file, then
    writes back every line but the known start-up noise; a failed import shows everything."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            sys.stderr.flush()
            saved = os.dup(2)
            with tempfile.TemporaryFile() as caught:
                os.dup2(caught.fileno(), 2)
                try:
                    execute(module)
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
                    caught.seek(0)
                    for line in caught.read().decode(errors="replace").splitlines(True):
                        if not line.startswith("I0000") and not any(
                            n in line for n in TF_LOAD_NOISE
                        ):
                            sys.stderr.write(line)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _setup_logging(quiet: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowLoad) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowLoad())
    logger = logging.getLogger("tlkit")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    # Pillow's warnings about what tlkit handles itself (its own pixel limit, palette
    # transparency) would repeat each finding. Set by the command, never at import: a program
    # that imports tlkit keeps its own filters. (Filters, not warnings.catch_warnings, which
    # is not thread-safe: decoding runs in threads.)
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    warnings.filterwarnings("ignore", message="Palette images with Transparency")


def _json_output(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[JSON_OUTPUT] = True
    return value


def verbosity(ctx: click.Context) -> int:
    """Keras progress: none under --quiet or --json (stdout is for the JSON), a bar on a
    terminal, else one plain line per epoch (a bar's escape codes would litter a log file)."""
    if ctx.meta.get(QUIET) or ctx.meta.get(JSON_OUTPUT):
        return 0
    return 1 if sys.stdout.isatty() else 2


JSON_OPTION = click.option(
    "--json",
    "as_json",
    is_flag=True,
    callback=_json_output,
    help="Print the result as JSON on stdout (progress goes to stderr).",
)


@click.group(cls=TlkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tlkit")
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="Only warnings, errors and results: no progress lines or bars.",
)
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Transfer learning for image classification on Keras 3.

    \b
    Start here:
      tlkit finetune --freeze 10 data/     train a classifier on a folder of images
      tlkit predict runs/NAME image.jpg    label new images
      tlkit inspect resnet50               choose a freeze point
    """
    ctx.meta[QUIET] = quiet
    _setup_logging(quiet)
