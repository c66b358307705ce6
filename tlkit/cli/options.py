"""The options several commands share (model, augmentation, data check, strategy, views) and
recipes as click defaults: CLI flag > recipe > default."""

from __future__ import annotations

from typing import Any

import click

from tlkit.cli.app import BACKBONE_HELP, cli
from tlkit.core import choices
from tlkit.core.errors import TlkitError


def option_group(*options: Any) -> Any:
    """One decorator for flags that several commands share."""

    def apply(command: Any) -> Any:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


STRATEGY_OPTION = click.option(
    "--strategy",
    type=click.Choice(choices.STRATEGIES),
    default="auto",
    show_default=True,
    help="tf.distribute: mirrored = every GPU of this machine; multiworker = the machines in "
    "TF_CONFIG; auto = multiworker if TF_CONFIG names several workers, else mirrored if "
    "several GPUs, else default (one device).",
)


# The augmentation flags shared by finetune, precompute-features, augment-preview, bench-input.
augment_options = option_group(
    click.option(
        "--augment",
        "augment_preset",
        default="light",
        show_default=True,
        help="Preset: none, light (random crop at the eval scale + mirror), standard "
        "(Inception's random resized crop + mirror), alexnet (crop + mirror + PCA "
        "colour), vgg (alexnet with scale jitter). finetune also takes auto: the "
        "preset whose head probe scores best on the validation split.",
    ),
    click.option(
        "--crop", type=click.Choice(choices.CROP_STYLES), help="Override the preset's crop style."
    ),
    click.option("--flip-p", type=float, help="Override the mirroring probability."),
    click.option(
        "--pca-sigma", type=float, help="Override the PCA colour strength (0 turns it off)."
    ),
    click.option(
        "--extra-transform",
        multiple=True,
        metavar="NAME[:JSON]",
        help="An albumentations transform after crop and flip, e.g. "
        "'Rotate:{\"limit\": 15}'. Repeatable.",
    ),
)


MAX_PIXELS_OPTION = click.option(
    "--max-pixels",
    type=int,
    help="Refuse images larger than this many pixels, a defence "
    "against decompression bombs. Default: 100 million.",
)


# How finetune and precompute-features treat files that cannot be used.
audit_options = option_group(
    click.option(
        "--on-bad-image",
        type=click.Choice(choices.BAD_IMAGE_POLICIES),
        default="error",
        show_default=True,
        help="error: list every unusable file and start nothing; skip: leave them "
        "out and record each in the run.",
    ),
    click.option(
        "--max-bad-fraction",
        type=float,
        default=0.1,
        show_default=True,
        help="With --on-bad-image skip, still stop when more than this share of the "
        "files is unusable.",
    ),
    MAX_PIXELS_OPTION,
)


def augment_config(options: dict[str, Any], allow_auto: bool = False) -> Any:
    from tlkit.data.augment import resolve_augment

    return resolve_augment(
        options.pop("augment_preset"),
        options.pop("extra_transform"),
        allow_auto,
        crop=options.pop("crop"),
        flip_p=options.pop("flip_p"),
        pca_sigma=options.pop("pca_sigma"),
    )


def audit_config(options: dict[str, Any]) -> Any:
    from tlkit.data.audit import AuditConfig

    max_pixels = options.pop("max_pixels")
    return AuditConfig(
        options.pop("on_bad_image"),
        options.pop("max_bad_fraction"),
        **({"max_pixels": max_pixels} if max_pixels is not None else {}),
    )


def _apply_recipe(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--recipe (eager): the recipe's section for this command becomes click's default_map, so
    typed flags still win. Option names and values are checked here, before anything runs."""
    if value is None:
        return None
    from tlkit.cli.recipes import load_recipe
    from tlkit.core.errors import ConfigError, did_you_mean, shown

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
            raise ConfigError(
                f"{recipe.path}: `tlkit {ctx.info_name}` has no option {shown(key)}."
                f"{did_you_mean(key[:80], names)} Its options: {', '.join(names)}"
            )
        try:
            _exact(p, raw)
            p.type_cast_value(ctx, raw)
        except (click.BadParameter, TypeError, ValueError, OverflowError) as e:  # a list, .inf
            text = e.message if isinstance(e, click.BadParameter) else f"not a {p.type.name}"
            problem = text.splitlines()[0][:200].rstrip(".")
            raise ConfigError(
                f"{recipe.path}: {ctx.info_name}.{key}: {problem}. Received: {shown(raw)}"
            ) from None
        defaults[p.name] = raw
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["tlkit.recipe"] = recipe
    return value


def _exact(p: click.Parameter, raw: object) -> None:
    """click turns 1.7 and `true` into the integer 1; a recipe's number is taken as written."""
    if isinstance(p.type, click.types.IntParamType) and (
        isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer())
    ):
        raise click.BadParameter(f"{raw!r} is not a whole number")


def recipe_commands() -> set[str]:
    """The commands a recipe may have a section for: those taking --recipe."""
    return {
        name
        for name, command in cli.commands.items()
        if any(p.name == "recipe" for p in command.params)
    }


recipe_option = click.option(
    "--recipe",
    metavar="NAME|PATH",
    is_eager=True,
    expose_value=False,
    callback=_apply_recipe,
    help="Options from a recipe (`tlkit recipes` lists them); flags typed here win.",
)


MIXED_PRECISION_OPTION = click.option(
    "--mixed-precision",
    is_flag=True,
    help="float16 compute (GPUs); part of the feature-cache key, so finetune and "
    "precompute-features must agree on it.",
)


def model_options(freeze_default: str) -> Any:
    """DATA and the model flags finetune and precompute-features share."""
    return option_group(
        click.argument("data", default="data", type=click.Path()),
        click.option(
            "--backbone", default=choices.DEFAULT_BACKBONE, show_default=True, help=BACKBONE_HELP
        ),
        click.option(
            "--weights",
            "weights_",
            default="imagenet",
            show_default=True,
            help="'imagenet', 'none', a weights file, or a tlkit run folder to transfer from.",
        ),
        click.option("--input-size", type=int, help="Square input size (default: the backbone's)."),
        click.option(
            "--freeze",
            callback=freeze_option,
            help="Freeze backbone layers [:N] ('all'; negative N keeps the last |N| "
            "trainable; finetune: 'auto' scores head only and the last 1-2 stages on the "
            "validation split, and where a stage beats the head also the whole network, "
            f"keeping the best). Default {freeze_default}.",
        ),
        click.option("--freeze-to", help="Freeze up to and including this layer name."),
        click.option("--freeze-blocks", type=int, help="Freeze the first K stages."),
    )


def freeze_request(ctx: click.Context, default: str) -> Any:
    """--freeze, --freeze-to and --freeze-blocks are one setting: a typed one replaces all
    three from a recipe; none at all means `default`."""
    from tlkit.models.freezing import FreezeRequest

    names = ("freeze", "freeze_to", "freeze_blocks")
    values = {n: ctx.params[n] for n in names}
    typed = {
        n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE
    }
    if typed:
        values = {n: values[n] if n in typed else None for n in names}
    if all(v is None for v in values.values()):
        values["freeze"] = default
    return FreezeRequest(
        count=values["freeze"], to_layer=values["freeze_to"], blocks=values["freeze_blocks"]
    )


def freeze_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from tlkit.models.freezing import parse_freeze_count

    if value is None:
        return None
    try:
        return parse_freeze_count(value)
    except TlkitError as e:
        raise click.BadParameter(str(e)) from None


# finetune flags -> the FinetuneConfig field each one sets
PARAM_FIELDS = {
    "weights_": "weights",
    "freeze_to": "freeze",
    "freeze_blocks": "freeze",
    "augment_preset": "augment",
    "crop": "augment",
    "flip_p": "augment",
    "pca_sigma": "augment",
    "extra_transform": "augment",
    "on_bad_image": "audit",
    "max_bad_fraction": "audit",
    "max_pixels": "audit",
}


MULTICROP_OPTION = click.option(
    "--multicrop",
    type=click.Choice(choices.MULTICROP_MODES),
    default="1",
    is_flag=False,
    flag_value="auto",
    show_default=True,
    help="Test-time views averaged per image: 1 (the centre crop), 2 (and its mirror), 5 "
    "(corners and centre), 10 (and their mirrors), multiscale (10 at 3 scales), dense "
    "(the whole image, fully convolutional), auto (the bare flag: the views the model "
    "saw in training, chosen on its validation split, never below single-crop there).",
)
