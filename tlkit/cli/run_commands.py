"""`tlkit eval`, `diagnose`, `predict`, `export`, `runs` and `recipes`: what is done with
trained runs."""

from __future__ import annotations

import json
from typing import Any

import click

from tlkit.cli.app import JSON_OPTION, cli
from tlkit.cli.options import (
    MULTICROP_OPTION,
    STRATEGY_OPTION,
    option,
    recipe_commands,
    recipe_option,
)


@cli.command()
@recipe_option
@click.argument("paths", nargs=-1, type=click.Path())
@option("folds")
@option("duplicate_similarity")
@option("top")
@click.option(
    "--name", default="diagnose", show_default=True, help="Output folder under RUN/diagnose/."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing diagnose folder.")
@option("batch_size")
@option("workers")
@JSON_OPTION
def diagnose(paths: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Likely label errors, near-duplicates and top losses in [DATA] (default: the run's own
    data), seen through [RUN]'s features (default: the newest run)."""
    from tlkit.core.runs import split_runs
    from tlkit.evaluation.diagnose import DiagnoseConfig, relabel_hint, summary_lines
    from tlkit.evaluation.diagnose import diagnose as run_diagnose

    runs, rest = split_runs(paths)
    if len(runs) > 1 or len(rest) > 1:
        raise click.UsageError("expected at most one run folder and one DATA folder")
    found = run_diagnose(
        DiagnoseConfig(run=runs[0] if runs else None, data=rest[0] if rest else None, **options)
    )
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for line in summary_lines(found):
        click.echo(line)
    click.echo(relabel_hint(found["output"]))
    click.echo(f"report: {found['output']}/report.html")


def _weights_line(metrics: dict[str, Any]) -> str:
    """An ensemble's member weights and how they were set: `(greedy on DATA): run 0.60, ...`."""
    fitted = metrics["member_weights_fitted_on"]
    rule = f"{metrics['member_weights_rule']} on {fitted}" if fitted else "equal"
    shares = zip(metrics["members"], metrics["member_weights"], strict=True)
    return f"({rule}): " + ", ".join(f"{m} {w:.2f}" for m, w in shares)


@cli.command("eval")
@recipe_option
@click.argument("paths", nargs=-1, type=click.Path())
@MULTICROP_OPTION
@option("ensemble_weights")
@option("split")
@click.option("--name", help="Output folder under RUN/eval/ (default: from split and crops).")
@option("batch_size")
@option("workers")
@click.option("--overwrite", is_flag=True, help="Replace an existing evaluation folder.")
@STRATEGY_OPTION
@JSON_OPTION
def eval_(paths: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Evaluate [RUN...] (default: the newest run) on [DATA] (default: the run's test split).

    Several runs form an ensemble: their probabilities are averaged.
    """
    from tlkit.core.runs import split_runs
    from tlkit.evaluation.evaluate import EvalConfig, evaluate
    from tlkit.evaluation.views import describe

    runs, rest = split_runs(paths)
    if len(rest) > 1:
        raise click.UsageError(
            f"expected run folders and at most one DATA folder; these are "
            f"not runs: {', '.join(rest)}"
        )
    metrics = evaluate(EvalConfig(runs=tuple(runs), data=rest[0] if rest else None, **options))
    if as_json:
        click.echo(
            json.dumps(
                {k: v for k, v in metrics.items() if k not in ("confusion_matrix",)}, indent=2
            )
        )
        return
    click.echo(
        f"{metrics['source']}: {metrics['images']} images"
        + (f"; views resolved for {metrics['views_rule']}" if len(metrics["views"]) > 1 else "")
    )
    for views in metrics["views"]:
        click.echo(
            f"  views of {views['run']}: {views['views']} ("
            f"{describe(views['views'], views['count'])}): {views['why']}"
        )
        for c in views["candidates"]:
            click.echo(
                f"    {c['views']:<11} val loss {c['val_loss']:.4f}  top-1 "
                f"{c['val_top1']:.4f}" + ("  below single-crop" if c["below_single_crop"] else "")
            )
    for note in metrics["notes"]:
        click.echo(f"  note: {note}")
    if len(metrics["members"]) > 1:
        click.echo(f"  member weights {_weights_line(metrics)}")
    chosen = [v["views"] for v in metrics["views"]]
    for row, views in zip(metrics["comparison"], [*chosen, "per member"], strict=False):
        click.echo(
            f"  {row['model']:<40} single-crop top-1 {row['single_crop_top1']:.4f}   "
            f"multi-crop ({views}) top-1 {row['multicrop_top1']:.4f}"
        )
    line = f"top-1 {metrics['top1']:.4f}"
    if "top5" in metrics:
        line += f", top-5 {metrics['top5']:.4f}"
    line += f", macro F1 {metrics['macro']['f1']:.4f}, ECE {metrics['calibration']['ece']:.4f}"
    if "member_disagreement" in metrics:
        line += f", members disagree on {metrics['member_disagreement']:.1%}"
    click.echo(line)
    if "output" in metrics:  # only the chief writes
        click.echo(f"report: {metrics['output']}/report.html")


@cli.command()
@recipe_option
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@option("top_k", "-k")
@MULTICROP_OPTION
@click.option(
    "--explain",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="Write a class-activation overlay of each image's top-1 class into DIR "
    "(a new folder): where the model looks.",
)
@JSON_OPTION
def predict(
    paths: tuple[str, ...], top_k: int, multicrop: str, explain: str | None, as_json: bool
) -> None:
    """Label images: RUN... IMAGE... (several runs average as an ensemble; no run: the newest)."""
    from tlkit.core.runs import split_runs
    from tlkit.evaluation.predict import predict as run_predict

    runs, images = split_runs(paths)
    results = run_predict(runs, images, top_k=top_k, multicrop=multicrop, explain=explain)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["path"])
        for rank, t in enumerate(r["top"], 1):
            click.echo(f"  {rank}. {t['label']:<24}{t['probability']:>8.2%}")
        if "explanation" in r:
            click.echo(f"  where it looks: {r['explanation']}")


@cli.command()
@click.argument("runs", nargs=-1, type=click.Path())
@option("format")
@option("ensemble_weights")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Default: RUN/export/FORMAT/ (several runs: FIRST_RUN/export/ensemble-FORMAT/).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
def export(
    runs: tuple[str, ...], format: str, ensemble_weights: str, output: str | None, overwrite: bool
) -> None:
    """Export RUN (default: the newest) for deployment, preprocessing and class names included.
    Several RUNS: one model that averages them (their weights as --ensemble-weights says)."""
    from tlkit.core.errors import ConfigError
    from tlkit.evaluation.export import export_ensemble, export_run

    if len(runs) > 1:
        out = export_ensemble(runs, format, ensemble_weights, output, overwrite)
        record = json.loads((out / "export.json").read_text())["ensemble"]
        kept = sum(b["in_model"] for b in record["branches"])
        click.echo(f"exported an ensemble of {kept} of {len(runs)} runs as {format} to {out}")
        click.echo("member weights " + _weights_line(record))
        fitted = "" if ensemble_weights == "equal" else ", where the weights were fitted"
        click.echo(
            f"validation top-1 ({record['val_images']} images{fitted}): "
            f"{record['val_top1_exported']:.2%} as one model, "
            f"{record['val_top1_members_one_by_one']:.2%} with each member on its own view "
            f"({record['val_same_top1']:.2%} same top class)"
        )
        return
    typed = click.get_current_context().get_parameter_source("ensemble_weights")
    if typed == click.core.ParameterSource.COMMANDLINE:
        raise ConfigError(
            f"--ensemble-weights {ensemble_weights} weighs the runs of an ensemble; name two "
            "runs or more. Received: one run"
        )
    run = runs[0] if runs else None
    out = export_run(run, format, output, overwrite)
    click.echo(f"exported {run or 'the newest run'} as {format} to {out}")


@cli.command()
@click.option("--runs-dir", default="runs", show_default=True, type=click.Path(file_okay=False))
@JSON_OPTION
def runs(runs_dir: str, as_json: bool) -> None:
    """List runs, newest first: backbone, freeze, best validation accuracy, date; interrupted
    ones with the command that resumes them."""
    from tlkit.core.runs import list_runs

    rows = list_runs(runs_dir)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{runs_dir}: no runs yet; `tlkit finetune DATA` makes one")
        return
    width = max(3, *(len(r["run"]) for r in rows)) + 2
    click.echo(
        f"{'run':<{width}}{'backbone':<20}{'MB':>8}  {'freeze':<26}{'best val acc':>13}"
        f"{'test acc':>10}  created"
    )
    for r in rows:
        head = f"{r['run']:<{width}}{r['backbone'] or '?':<20}{r['size_mb']:>8.1f}  "
        if r["status"] == "unreadable":
            click.echo(f"{head}unreadable: {r['error']}")
            continue
        if r["status"] in ("interrupted", "training"):
            click.echo(
                head
                + (
                    "training now (another process)"
                    if r["status"] == "training"
                    else f"interrupted: {r['resume']}"
                )
            )
            continue
        acc, test = (
            ("-" if v is None else f"{v:.4f}") for v in (r["best_val_accuracy"], r["test_accuracy"])
        )
        click.echo(f"{head}{r['freeze'] or '-':<26}{acc:>13}{test:>10}  {r['created']}")


@cli.command()
@JSON_OPTION
def recipes(as_json: bool) -> None:
    """List the recipes (./recipes/*.yaml, then tlkit's own) with what each is for."""
    from tlkit.cli.recipes import list_recipes

    rows = list_recipes(recipe_commands())
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "name": r.name,
                        "path": str(r.path),
                        "description": r.description,
                        "sections": r.sections,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return
    if not rows:  # an install without tlkit/recipes/*.yaml: broken packaging, not bad input
        raise RuntimeError(
            "no recipes found, not even tlkit's own (tlkit/recipes/*.yaml); "
            "this install is incomplete: reinstall tlkit"
        )
    width = max(len(r.name) for r in rows) + 2
    for r in rows:
        click.echo(f"{r.name:<{width}}{r.description}")
    click.echo("use: tlkit finetune --recipe NAME DATA (flags typed on the command line win)")
