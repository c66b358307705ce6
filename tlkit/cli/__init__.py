"""The `tlkit` command: parses options and calls the Python API; nothing else lives here.

One module per group of commands (models, data, training, runs) over `app` (the group, its
logging and output) and `options` (what several commands share). TensorFlow is imported inside
commands only, so `tlkit --help` answers instantly.
"""

from __future__ import annotations

import click

from tlkit.cli import data_commands, model_commands, run_commands, train_commands  # noqa: F401
from tlkit.cli.app import cli

__all__ = ["RANGES", "cli", "commands", "main"]


def _at_least(n: int) -> click.IntRange:
    return click.IntRange(min=n)


_POSITIVE = click.FloatRange(min=0, min_open=True)


_FRACTION = click.FloatRange(0, 1)


# Every numeric option's range, in one table: click refuses a value outside it in one line
# before any work starts (a test checks that no int or float option is left out).
RANGES: dict[str, click.ParamType] = {
    "batch_size": _at_least(1),
    "batches": _at_least(1),
    "count": _at_least(1),
    "draws": _at_least(1),
    "dropout": click.FloatRange(0, 1, max_open=True),
    "duplicate_similarity": click.FloatRange(0, 1, min_open=True),
    "end_lr": _POSITIVE,
    "epochs": _at_least(0),
    "fine_tune_lr": _POSITIVE,
    "flip_p": _FRACTION,
    "folds": _at_least(2),
    "freeze_blocks": _at_least(0),
    "head_epochs": _at_least(0),
    "head_views": _at_least(1),
    "input_size": _at_least(1),
    "label_smoothing": click.FloatRange(0, 1, max_open=True),
    "lr": _POSITIVE,
    "lr_base_batch": _at_least(1),
    "max_bad_fraction": _FRACTION,
    "max_pixels": _at_least(1),
    "max_workers": _at_least(1),
    "num_shards": _at_least(1),
    "patience": _at_least(1),
    "pca_sigma": click.FloatRange(min=0),
    "prefetch": _at_least(1),
    "seed": click.IntRange(0, 2**32 - 1),
    "shard_index": _at_least(0),
    "stage_lr_decay": click.FloatRange(0, 1, min_open=True),
    "start_lr": _POSITIVE,
    "steps": _at_least(10),
    "top": _at_least(1),
    "top_k": _at_least(1),
    "val_fraction": click.FloatRange(0, 1, min_open=True, max_open=True),
    "views": _at_least(1),
    "warmup_epochs": _at_least(0),
    "weight_decay": click.FloatRange(min=0),
    "workers": _at_least(1),
}


def commands(group: click.Group = cli) -> list[click.Command]:
    """Every command under `group`, sub-groups' included."""
    out: list[click.Command] = []
    for command in group.commands.values():
        out += commands(command) if isinstance(command, click.Group) else [command]
    return out


for _command in commands():
    for _param in _command.params:
        if _param.name in RANGES and isinstance(
            _param.type, (click.types.IntParamType, click.types.FloatParamType)
        ):
            _param.type = RANGES[_param.name]


def main() -> None:
    cli(prog_name="tlkit")
