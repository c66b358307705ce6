"""The options several commands share (model, augmentation, data check, strategy, views) and
recipes as click defaults: CLI flag > recipe > default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from tlkit.cli.app import cli
from tlkit.core.errors import TlkitError
from tlkit.core.settings import SETTINGS

F = TypeVar("F", bound=Callable[..., Any])


def option_group(*options: Callable[[Any], Any]) -> Callable[[F], F]:
    """One decorator for flags that several commands share."""

    def apply(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def option(name: str, *short: str, **extra: Any) -> Callable[[F], F]:
    """The click option of setting `name`, made from its one entry in tlkit.core.settings: its
    flag, default, help, and its range or choices as click's type (so click refuses a bad
    value in one line before any work). `short` adds flags such as -k; `extra` what only the
    CLI knows (a callback, a path type, a metavar)."""
    s = SETTINGS[name]
    kwargs: dict[str, Any] = {"help": s.help}
    flag = s.flag
    if s.switch is not None:  # three states: the callback maps unset, --x, --no-x
        flag = f"{flag}/--no-{flag[2:]}"
        kwargs.update(callback=_switch, default=None)
    elif s.type is bool and s.default is None:  # unset, on or off
        flag = f"{flag}/--no-{flag[2:]}"
        kwargs["default"] = None
    elif s.type is bool:
        kwargs["is_flag"] = True
    elif s.choices:
        kwargs["type"] = click.Choice(s.choices)
    elif s.type is int:
        lo, hi = (None if x is None else int(x) for x in (s.low, s.high))
        kwargs["type"] = click.IntRange(lo, hi, s.low_open, s.high_open)
    elif s.type is float:
        kwargs["type"] = click.FloatRange(s.low, s.high, s.low_open, s.high_open)
    if isinstance(s.default, tuple):
        kwargs["multiple"] = True
    elif s.default is not None and s.switch is None:
        kwargs.update(default=s.default, show_default=s.type is not bool)
    if s.bare is not None:
        kwargs.update(is_flag=False, flag_value=s.bare)
    return click.option(*short, flag, name, **{**kwargs, **extra})


def _switch(ctx: click.Context, param: click.Parameter, value: bool | None) -> str:
    """A --x/--no-x switch's three states as the setting's values: unset, --x, --no-x."""
    unset, on, off = SETTINGS[str(param.name)].switch or ("", "", "")
    return unset if value is None else on if value else off


STRATEGY_OPTION = option("strategy")


# The augmentation flags shared by finetune, precompute-features, augment-preview, bench-input.
augment_options = option_group(
    option("augment"),
    option("crop"),
    option("flip_p"),
    option("pca_sigma"),
    option("extra_transform", metavar="NAME[:JSON]"),
)


MAX_PIXELS_OPTION = option("max_pixels")


# How finetune and precompute-features treat files that cannot be used.
audit_options = option_group(option("on_bad_image"), option("max_bad_fraction"), MAX_PIXELS_OPTION)


def augment_config(options: dict[str, Any], allow_auto: bool = False) -> Any:
    from tlkit.data.augment import resolve_augment

    return resolve_augment(
        options.pop("augment"),
        options.pop("extra_transform"),
        allow_auto,
        crop=options.pop("crop"),
        flip_p=options.pop("flip_p"),
        pca_sigma=options.pop("pca_sigma"),
    )


def _apply_recipe(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--recipe (eager): the recipe's section for this command becomes click's default_map, so
    typed flags still win. Option names and values are checked here, before anything runs."""
    if value is None:
        return None
    from tlkit.cli.recipes import load_recipe
    from tlkit.core.errors import ConfigError, did_you_mean, shown

    recipe = load_recipe(value, recipe_commands())
    # a setting as a recipe names it (`head-epochs`, `weights`) -> its parameter
    options: dict[str, click.Parameter] = {}
    for known in ctx.command.params:
        for name in known.opts:  # --long flags and argument names; not -o, not --no-cache
            if known.name != "recipe" and (name.startswith("--") or not name.startswith("-")):
                options[name.lstrip("-")] = known
    defaults = {}
    for key, raw in recipe.sections.get(str(ctx.info_name), {}).items():
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


MIXED_PRECISION_OPTION = option("mixed_precision")


def model_options(freeze_default: str) -> Callable[[F], F]:
    """DATA and the model flags finetune and precompute-features share."""
    freeze = SETTINGS["freeze"]
    return option_group(
        click.argument("data", default="data", type=click.Path()),
        option("backbone"),
        option("weights"),
        option("input_size"),
        option("freeze", callback=freeze_option, help=f"{freeze.help} Default {freeze_default}."),
        option("freeze_to"),
        option("freeze_blocks"),
        option("head_features"),
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


MULTICROP_OPTION = option("multicrop")
