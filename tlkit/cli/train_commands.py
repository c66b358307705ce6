"""`tlkit finetune` and `lr-find`."""

from __future__ import annotations

import json
from typing import Any

import click

from tlkit.cli.app import JSON_OPTION, cli, verbosity
from tlkit.cli.options import (
    MIXED_PRECISION_OPTION,
    PARAM_FIELDS,
    STRATEGY_OPTION,
    audit_config,
    audit_options,
    augment_config,
    augment_options,
    freeze_request,
    model_options,
    recipe_option,
)
from tlkit.core import choices


@cli.command()
@recipe_option
@model_options(freeze_default="0")
@click.option(
    "--train-bn/--no-train-bn",
    default=None,
    help="Let BatchNorm layers after the freeze point update their statistics [default: only "
    "under --weights none, and there only where the random network's signal fades without it].",
)
@click.option("--batch-size", default=32, show_default=True)
@click.option(
    "--head-epochs",
    default=5,
    show_default=True,
    help="Phase 1, the head alone: it trains max(500, this many epochs) optimizer "
    "steps on the backbone's cached features.",
)
@click.option(
    "--head-views",
    default=1,
    show_default=True,
    help="Phase 1 trains on the features of this many views of each training "
    "image: 1 = the eval view (a linear probe), K = K augmented views.",
)
@click.option(
    "--epochs",
    default=10,
    show_default=True,
    help="Phase 2: epochs training everything after the freeze point.",
)
@click.option("--lr", default=1e-3, show_default=True, help="Phase 1 learning rate (Adam).")
@click.option(
    "--fine-tune-lr",
    type=float,
    help=f"Phase 2 learning rate. Default: from the data, {choices.fine_tune_lr_rule()}.",
)
@click.option(
    "--schedule",
    type=click.Choice(choices.SCHEDULES),
    default="constant",
    show_default=True,
    help="Phase 2's rate: constant, or a cosine decay to 0 over --epochs.",
)
@click.option(
    "--warmup-epochs",
    default=0,
    show_default=True,
    help="Phase 2 raises its rate linearly to --fine-tune-lr over this many epochs.",
)
@click.option(
    "--weight-decay",
    default=0.0,
    show_default=True,
    help="Phase 2: decoupled weight decay on kernels (AdamW); 0 = plain Adam.",
)
@click.option(
    "--stage-lr-decay",
    default=1.0,
    show_default=True,
    help="Phase 2: discriminative rates. The backbone's last stage trains at this "
    "fraction of --fine-tune-lr, each earlier stage at this fraction of the next.",
)
@click.option(
    "--label-smoothing",
    default=0.0,
    show_default=True,
    help="Both phases train on labels smoothed by this much (validation losses stay "
    "plain cross-entropy).",
)
@click.option("--dropout", default=0.2, show_default=True)
@click.option(
    "--patience",
    default=3,
    show_default=True,
    help="Early stopping: epochs without a better validation loss.",
)
@click.option(
    "--val-fraction",
    default=0.2,
    show_default=True,
    help="Validation share when DATA has no val/ folder (stable hash split).",
)
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Run folder (default runs/BACKBONE-TIME).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@MIXED_PRECISION_OPTION
@augment_options
@click.option("--workers", type=int, help="CPU threads decoding and augmenting (default: all).")
@click.option("--prefetch", type=int, help="Batches kept ready ahead of training (default: auto).")
@click.option(
    "--cache/--no-cache",
    "cache",
    default=None,
    help="--cache: train from the feature cache, building it first if needed. "
    "--no-cache: never. Default: use a matching cache if there is one.",
)
@click.option(
    "--views",
    default=1,
    show_default=True,
    help="Augmented views per training image in the feature cache.",
)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Default: cache/.")
@click.option(
    "--cache-dtype", type=click.Choice(choices.CACHE_DTYPES), default="float16", show_default=True
)
@click.option(
    "--resized-cache",
    is_flag=True,
    help="Decode every image once into a store of PNGs at the size the views need (under "
    "--cache-dir), so that later epochs decode small images: for big photos, when "
    "`tlkit bench-input` says training waits for its input.",
)
@click.option(
    "--class-weight",
    type=click.Choice(choices.CLASS_WEIGHTS),
    default="none",
    show_default=True,
    help="balanced: weight classes by n / (classes x count).",
)
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
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs to RUN/tensorboard/.")
@click.option(
    "--calibrate",
    is_flag=True,
    help="Fit temperature scaling on the validation split after training, so the "
    "saved model's probabilities match its accuracy (accuracy is unchanged).",
)
@STRATEGY_OPTION
@click.option(
    "--scale-lr",
    is_flag=True,
    help="Linear scaling rule: multiply --lr and --fine-tune-lr by BATCH_SIZE / "
    "LR_BASE_BATCH (the global batch over the batch the rates were chosen for).",
)
@click.option(
    "--lr-base-batch",
    default=32,
    show_default=True,
    help="The batch size --lr and --fine-tune-lr were chosen for (with --scale-lr).",
)
@JSON_OPTION
def finetune(
    data: str,
    weights_: str,
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
    request = freeze_request(ctx, default="0")
    recipe = ctx.meta.get("tlkit.recipe")
    augment = augment_config(options, allow_auto=True)
    audit = audit_config(options)
    cache = options.pop("cache")
    config = FinetuneConfig(
        data=data,
        weights=weights_,
        freeze=request,
        augment=augment,
        audit=audit,
        cache={None: "auto", True: "build", False: "off"}[cache],
        recipe=recipe.name if recipe else None,
        **options,
    )
    if resume is not None:  # the saved settings, changed only where a flag was typed
        typed = {
            PARAM_FIELDS.get(name, name)
            for name in ctx.params
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
            and name not in ("resume", "force_resume")
        }
        config = resume_config(resume, **{f: getattr(config, f) for f in typed})
    run = run_finetune(config, verbose=verbosity(ctx), resume=resume, force_resume=force_resume)
    _echo_run(run, as_json)


def _echo_run(run: Any, as_json: bool) -> None:
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
@click.option(
    "--phase",
    type=click.Choice(choices.LR_FIND_PHASES),
    default="head",
    show_default=True,
    help="head: suggests --lr; fine-tune: suggests --fine-tune-lr "
    "(after a head trained first, as finetune does).",
)
@click.option("--start-lr", type=float, help="Default: 1e-6 (head), 1e-8 (fine-tune).")
@click.option("--end-lr", type=float, help="Default: 10 (head), 0.1 (fine-tune).")
@click.option("--steps", default=100, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", type=int, help="CPU threads decoding (default: all).")
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
    weights_: str,
    freeze: str | None,
    freeze_to: str | None,
    freeze_blocks: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """The learning-rate range test on DATA: a plot of loss against rate, and a rate to use."""
    from tlkit.training.lr_find import LrFindConfig
    from tlkit.training.lr_find import lr_find as run_lr_find

    config = LrFindConfig(
        data=data,
        weights=weights_,
        freeze=freeze_request(click.get_current_context(), "0"),
        **options,
    )
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
