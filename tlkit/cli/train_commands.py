"""`tlkit finetune` and `lr-find`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from tlkit.cli.app import JSON_OPTION, cli, verbosity
from tlkit.cli.options import (
    MIXED_PRECISION_OPTION,
    STRATEGY_OPTION,
    audit_options,
    augment_config,
    augment_options,
    freeze_request,
    model_options,
    option,
    recipe_option,
)
from tlkit.core.settings import SETTINGS

if TYPE_CHECKING:
    from tlkit.core.runs import Run


@cli.command()
@recipe_option
@model_options(freeze_default="0")
@option("train_bn")
@option("batch_size")
@option("head_epochs")
@option("head_views")
@option("epochs")
@option("lr")
@option("fine_tune_lr")
@option("schedule")
@option("warmup_epochs")
@option("weight_decay")
@option("stage_lr_decay")
@option("label_smoothing")
@option("dropout")
@option("patience")
@option("val_fraction")
@option("seed")
@click.option("-o", "--output", type=click.Path(), help="Run folder (default runs/BACKBONE-TIME).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@MIXED_PRECISION_OPTION
@augment_options
@option("workers")
@option("prefetch")
@option("cache")
@option("views")
@option("cache_dir", type=click.Path(file_okay=False))
@option("cache_dtype")
@option("resized_cache")
@option("class_weight")
@audit_options
@click.option(
    "--resume",
    type=click.Path(),
    metavar="RUN",
    help="Continue an interrupted run (runs/NAME) from its last checkpoint, with the "
    "settings it started with.",
)
@click.option(
    "--force-resume",
    is_flag=True,
    help="Resume even though settings, classes or data changed since the run began.",
)
@option("tensorboard")
@option("calibrate")
@STRATEGY_OPTION
@option("scale_lr")
@option("lr_base_batch")
@option("preset")
@option("time_limit")
@JSON_OPTION
def finetune(
    data: str,
    freeze: str | None,
    freeze_to: str | None,
    freeze_blocks: int | None,
    resume: str | None,
    force_resume: bool,
    as_json: bool,
    **options: Any,
) -> None:
    """Fine-tune a pretrained backbone on DATA (default data/): class folders, or train/val/test."""
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.resume import resume_config
    from tlkit.training.train import finetune as run_finetune

    ctx = click.get_current_context()
    preset, time_limit = options.pop("preset"), options.pop("time_limit")
    typed = {n for n in ctx.params if ctx.get_parameter_source(n) == _COMMANDLINE}
    if resume is not None and _preset_run(resume, typed):
        _finetune_best(None, time_limit, resume, (verbosity(ctx), force_resume), as_json)
        return
    _check_preset(preset, typed)
    request = freeze_request(ctx, default="0")
    recipe = ctx.meta.get("tlkit.recipe")
    augment = augment_config(options, allow_auto=True)
    config = FinetuneConfig.of(
        data=data,
        freeze=request,
        augment=augment,
        recipe=recipe.name if recipe else None,
        **options,
    )
    if preset is not None:
        _finetune_best(config, time_limit, None, (verbosity(ctx), False), as_json)
        return
    if resume is not None:  # the saved settings, changed only where a flag was typed
        given = config.settings()
        typed = {
            SETTINGS[name].field if name in SETTINGS else name
            for name in ctx.params
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        } & set(given)  # not --resume, --force-resume or --json: how to run, not what
        config = resume_config(resume, **{f: given[f] for f in typed})
    run = run_finetune(config, verbose=verbosity(ctx), resume=resume, force_resume=force_resume)
    _echo_run(run, as_json)


_COMMANDLINE = click.core.ParameterSource.COMMANDLINE
_HOW_TO_RUN = {"resume", "force_resume", "as_json"}  # not what is learned
# settings --preset best decides for each candidate (typed with it: refused)
_PRESET_OWN = ("backbone", "weights", "input_size", "freeze", "freeze_to", "freeze_blocks")


def _check_preset(preset: str | None, typed: set[str]) -> None:
    from tlkit.core.errors import ConfigError

    if preset is None and "time_limit" in typed:
        raise ConfigError(
            "--time-limit is the budget of --preset best; add --preset best, or leave it out"
        )
    clash = [SETTINGS[n].flag for n in (*_PRESET_OWN, "head_features") if n in typed]
    if preset is not None and clash:
        raise ConfigError(
            f"--preset best chooses {', '.join(clash)} for each candidate itself; leave "
            f"{'it' if len(clash) == 1 else 'them'} out, or train one model without --preset"
        )


def _preset_run(resume: str, typed: set[str]) -> bool:
    """Whether --resume names an interrupted --preset best run; one that is refuses settings
    typed beside it (it resumes with those it started with, its --time-limit too)."""
    from tlkit.core.errors import ConfigError
    from tlkit.preset.best import find_preset

    if find_preset(resume) is None:
        return False
    flags = [SETTINGS[n].flag if n in SETTINGS else n for n in sorted(typed - _HOW_TO_RUN)]
    if flags:
        raise ConfigError(
            f"--resume {resume}: a --preset best run resumes with the settings and the "
            f"--time-limit it started with; leave out {', '.join(flags)}"
        )
    return True


def _finetune_best(
    config: Any,
    time_limit: str,
    resume: str | None,
    how: tuple[int | str, bool],
    as_json: bool,
) -> None:
    """--preset best: the candidates, the leaderboard, the ensemble as one run."""
    from tlkit.preset.best import BestConfig, best, leaderboard_lines

    verbose, force_resume = how
    if resume is not None:
        run = best(None, verbose, resume, force_resume)
    else:
        run = best(BestConfig(config, time_limit), verbose)
    ensemble = run.record.extra["ensemble"]
    if as_json:
        results = run.record.results
        found = {
            "run": str(run.path),
            "best": results["best"],
            "leaderboard": ensemble["candidates"],
        }
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"leaderboard (validation split; {run.path / 'leaderboard.csv'}):")
    for line in leaderboard_lines(run):
        click.echo("  " + line)
    click.echo(f"run: {run.path}")


def _echo_run(run: Run | None, as_json: bool) -> None:
    if run is None:  # a worker other than the chief: it trained, the chief wrote the run
        click.echo(
            json.dumps({"run": None, "chief_writes": True})
            if as_json
            else "done: this worker is not the chief; the chief writes the run"
        )
    elif as_json:
        results = run.record.results
        found = {
            "run": str(run.path),
            "best": results["best"],
            "phases": results["phases"],
            "optimizer_steps": run.record.optimizer_steps,
        }
        click.echo(json.dumps(found, indent=2))
    else:
        click.echo(f"run: {run.path}")


@cli.command("lr-find")
@recipe_option
@model_options(freeze_default="0")
@option("phase")
@option("start_lr")
@option("end_lr")
@option("steps")
@option("batch_size")
@option("val_fraction")
@option("seed")
@option("workers")
@click.option(
    "-o",
    "--output",
    default="lr_find.png",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The plot of loss against rate.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing plot.")
@JSON_OPTION
def lr_find(
    data: str,
    freeze: str | None,
    freeze_to: str | None,
    freeze_blocks: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """The learning-rate range test on DATA: a plot of loss against rate, and a rate to use."""
    from tlkit.training.lr_find import LrFindConfig
    from tlkit.training.lr_find import lr_find as run_lr_find

    freeze = freeze_request(click.get_current_context(), "0")
    config = LrFindConfig.of(data=data, freeze=freeze, **options)
    found = run_lr_find(config)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(
        f"lowest smoothed loss at {found['min_loss_lr']:.2g}; steepest descent at "
        f"{found['steepest']:.2g}"
    )
    if found["suggestion"] is None:
        click.echo(f"no suggestion: {found['note']}   (plot: {found['output']})")
    else:
        click.echo(
            f"suggested: {found['flag']} {found['suggestion']:.2g}   (plot: {found['output']})"
        )
