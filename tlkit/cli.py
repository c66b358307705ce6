"""The `tlkit` command: parses options and calls the Python API; nothing else lives here.

TensorFlow is imported inside commands only, so `tlkit --help` answers instantly.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import click

from tlkit.errors import TlkitError

BACKBONE_HELP = "Backbone name (`tlkit backbones` lists them)."


class TlkitGroup(click.Group):
    """Turns a TlkitError into one line on stderr and its exit code; bugs keep tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TlkitError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


class _EchoHandler(logging.Handler):
    """Progress messages through click.echo, which finds the current stdout at each call."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=record.levelno >= logging.WARNING)


def _setup_logging() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logger = logging.getLogger("tlkit")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        logger.addHandler(_EchoHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


@click.group(cls=TlkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tlkit")
def cli() -> None:
    """Transfer learning for image classification on Keras 3.

    \b
    Start here:
      tlkit finetune --freeze 10 data/     train a classifier on a folder of images
      tlkit predict runs/NAME image.jpg    label new images
      tlkit inspect resnet50               choose a freeze point
    """
    _setup_logging()


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backbones(as_json: bool) -> None:
    """List the registered backbones (parameter counts include the ImageNet top)."""
    from tlkit.introspect import backbone_table

    rows = backbone_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':<22}{'params':>9}{'no top':>9}{'layers':>8}{'size':>6}{'min':>5}  prep")
    for r in rows:
        click.echo(f"{r['name']:<22}{r['params_with_top'] / 1e6:>8.1f}M"
                   f"{r['params_no_top'] / 1e6:>8.1f}M{r['layers']:>8}{r['default_size']:>6}"
                   f"{r['min_size']:>5}  {r['preprocessing']}")


@cli.command()
@click.argument("name")
@click.option("--input-size", type=int,
              help="Input size for the output shapes (default: the backbone's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(name: str, input_size: int | None, as_json: bool) -> None:
    """Print every layer of backbone NAME with the index that --freeze counts."""
    from tlkit.introspect import layer_table

    rows = layer_table(name, input_size)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'index':>5}  {'name':<28}{'type':<24}{'output shape':<22}{'params':>10}  stage")
    for r in rows:
        shape = "x".join("?" if d is None else str(d) for d in (r["output_shape"] or [])[1:])
        click.echo(f"{r['index']:>5}  {r['name']:<28}{r['type']:<24}{shape:<22}"
                   f"{r['params']:>10,}  {r['stage']}")
    click.echo(f"--freeze N freezes layers 0..N-1 (N={len(rows)} or 'all' freezes every layer).")


@cli.group(cls=TlkitGroup)
def weights() -> None:
    """Pretrained weight files in the Keras cache."""


@weights.command("list")
def weights_list() -> None:
    """Show which ImageNet weight files are cached, and where."""
    from tlkit.weights import cached_weights

    for r in cached_weights():
        state = f"cached {r['size_mb']} MB" if r["cached"] else "missing"
        click.echo(f"{r['backbone']:<22}{state:<18}{r['path']}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a file already in the cache.")
def weights_import(file: str, overwrite: bool) -> None:
    """Verify a downloaded ImageNet weights FILE against its pinned hash and cache it."""
    from tlkit.weights import import_weights

    spec, target = import_weights(file, overwrite=overwrite)
    click.echo(f"{file}: verified as {spec.name} ImageNet weights; placed at {target}")


def _freeze_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from tlkit.freezing import parse_freeze_count

    if value is None:
        return None
    try:
        return parse_freeze_count(value)
    except TlkitError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@click.argument("data", default="data", type=click.Path())
@click.option("--backbone", default="resnet50", show_default=True, help=BACKBONE_HELP)
@click.option("--weights", "weights_", default="imagenet", show_default=True,
              help="'imagenet', 'none', a weights file, or a tlkit run folder to transfer from.")
@click.option("--input-size", type=int, help="Square input size (default: the backbone's).")
@click.option("--freeze", callback=_freeze_option,
              help="Freeze backbone layers [:N] ('all'; negative N keeps the last |N| trainable). "
                   "Default 0.")
@click.option("--freeze-to", help="Freeze up to and including this layer name.")
@click.option("--freeze-blocks", type=int, help="Freeze the first K stages.")
@click.option("--train-bn", is_flag=True,
              help="Let BatchNorm layers after the freeze point update their statistics.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--head-epochs", default=5, show_default=True,
              help="Phase 1: epochs training only the new head.")
@click.option("--epochs", default=10, show_default=True,
              help="Phase 2: epochs training everything after the freeze point.")
@click.option("--lr", default=1e-3, show_default=True, help="Phase 1 learning rate (Adam).")
@click.option("--fine-tune-lr", default=1e-5, show_default=True, help="Phase 2 learning rate.")
@click.option("--dropout", default=0.2, show_default=True)
@click.option("--patience", default=3, show_default=True,
              help="Early stopping: epochs without a better validation loss.")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Validation share when DATA has no val/ folder (stable hash split).")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Run folder (default runs/BACKBONE-TIME).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@click.option("--mixed-precision", is_flag=True, help="float16 compute (GPUs).")
@click.option("--workers", type=int, help="CPU workers for decoding (default: all cores).")
def finetune(data: str, weights_: str, freeze: str | None, freeze_to: str | None,
             freeze_blocks: int | None, **options: Any) -> None:
    """Fine-tune a pretrained backbone on DATA (default data/): class folders, or train/val/test."""
    from tlkit.config import FinetuneConfig
    from tlkit.freezing import FreezeRequest
    from tlkit.train import finetune as run_finetune

    if freeze is None and freeze_to is None and freeze_blocks is None:
        freeze = "0"
    request = FreezeRequest(count=freeze, to_layer=freeze_to, blocks=freeze_blocks)
    config = FinetuneConfig(data=data, weights=weights_, freeze=request, **options)
    run = run_finetune(config)
    click.echo(f"run: {run.path}")


@cli.command()
@click.argument("run", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("-k", "--top-k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def predict(run: str, images: tuple[str, ...], top_k: int, as_json: bool) -> None:
    """Label IMAGES with the model of RUN (a run folder)."""
    from tlkit.predict import predict as run_predict

    results = run_predict(run, list(images), top_k=top_k)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for r in results:
        click.echo(r["path"])
        for rank, t in enumerate(r["top"], 1):
            click.echo(f"  {rank}. {t['label']:<24}{t['probability']:>8.2%}")


def main() -> None:
    cli(prog_name="tlkit")
