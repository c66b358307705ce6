"""The settings schema (tlkit.core.settings) is the one place a setting's default, range and
choices are written: the CLI's options, the configs and the resume mapping follow it."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import click
import pytest

from tlkit.cli import commands
from tlkit.core.errors import ConfigError
from tlkit.core.settings import SETTINGS, Loader, Setting, flat_settings, setting_names
from tlkit.data.audit import AuditConfig
from tlkit.data.preview import PreviewConfig
from tlkit.evaluation.diagnose import DiagnoseConfig
from tlkit.evaluation.evaluate import EvalConfig
from tlkit.features.precompute import PrecomputeConfig
from tlkit.models.freezing import ModelChoice
from tlkit.training.config import FinetuneConfig, Fit, Storage
from tlkit.training.lr_find import LrFindConfig

PACKAGE = Path(__file__).resolve().parent.parent / "tlkit"
CONFIGS = (
    FinetuneConfig,
    PrecomputeConfig,
    LrFindConfig,
    EvalConfig,
    DiagnoseConfig,
    AuditConfig,
    PreviewConfig,
    Loader,
    ModelChoice,
    Fit,
    Storage,
)
# what a command needs on its command line before it parses at all
REQUIRED = {"predict": ["x.png"], "inspect": ["resnet50"], "import": ["weights.h5"]}
# freeze's default is the command's own (finetune 0, precompute-features all): its help says so
PER_COMMAND = {"freeze"}


def _parsed(command: click.Command) -> dict[str, object]:
    """What the command's function receives when nothing is typed, callbacks applied (under
    the group's context, as `tlkit` runs it: click keeps the help option a context makes)."""
    typed = list(REQUIRED.get(str(command.name), []))
    with command.make_context(command.name, typed, parent=_group()) as ctx:
        return dict(ctx.params)


def _group() -> click.Context:
    from tlkit.cli import cli

    return cli.make_context("tlkit", ["--help"], resilient_parsing=True)


def _bounds(setting: Setting) -> tuple[object, ...]:
    return (setting.low, setting.high, setting.low_open, setting.high_open)


@pytest.mark.parametrize("command", commands(), ids=lambda c: str(c.name))
def test_every_option_that_is_a_setting_is_the_schemas(command):
    """A hand-written `click.option("--batch-size", default=64)` fails here: its default, range,
    choices and help must be the schema's."""
    received = _parsed(command)
    for p in command.params:
        s = SETTINGS.get(str(p.name))
        if s is None or not isinstance(p, click.Option):
            continue
        if s.name not in PER_COMMAND:
            assert received[s.name] == s.default, (command.name, s.name)
        assert s.help in (p.help or ""), (command.name, s.name)
        if isinstance(p.type, (click.IntRange, click.FloatRange)):
            got = (p.type.min, p.type.max, p.type.min_open, p.type.max_open)
            assert got == _bounds(s), (command.name, s.name)
        if isinstance(p.type, click.Choice):
            assert tuple(p.type.choices) == s.choices, (command.name, s.name)


def test_every_number_or_choice_a_command_takes_is_a_setting():
    """A new numeric or closed-choice option is added to the schema, not beside it."""
    for command in commands():
        for p in command.params:
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)):
                assert p.name in SETTINGS, (command.name, p.name)
            if isinstance(p.type, click.Choice):
                assert p.name in SETTINGS, (command.name, p.name)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_a_configs_setting_fields_are_declared_from_the_schema(config):
    """No config writes a setting's default again: each such field carries the schema's entry
    (and so its default, unless it holds a composite such as the freeze request)."""
    for f in dataclasses.fields(config):
        if f.name in SETTINGS:
            assert f.metadata.get("setting") is SETTINGS[f.name], (config.__name__, f.name)
            if f.default is not dataclasses.MISSING:
                assert f.default == SETTINGS[f.name].default, (config.__name__, f.name)


def _outside(s: Setting) -> float | None:
    """A value the setting's range refuses."""
    if s.low is not None:
        return s.low if s.low_open else s.low - 1
    if s.high is not None:
        return s.high if s.high_open else s.high + 1
    return None


def test_the_python_api_refuses_what_the_cli_refuses():
    """Each ranged finetune setting, one step outside its range, is one ConfigError naming the
    flag and the range in the schema's words."""
    ranged = [
        name
        for name in setting_names(FinetuneConfig)
        if name in SETTINGS and _outside(SETTINGS[name]) is not None
    ]
    assert len(ranged) >= 15
    for name in ranged:
        s = SETTINGS[name]
        bad = _outside(s)
        value = int(bad) if s.type is int else bad
        with pytest.raises(ConfigError, match=re.escape(f"{s.flag} must be {s.bounds_text()}")):
            FinetuneConfig.of(**{name: value})


def test_a_number_of_another_type_is_checked_and_a_string_refused():
    """numpy's integers are numbers (checked by the range); a string is not a number."""
    import numpy as np

    with pytest.raises(
        ConfigError, match=re.escape("--batch-size must be at least 1. Received: 0")
    ):
        FinetuneConfig.of(batch_size=np.int64(0))
    with pytest.raises(
        ConfigError, match=re.escape("--batch-size must be a number. Received: '32'")
    ):
        FinetuneConfig.of(batch_size="32")  # type: ignore[arg-type]
    assert FinetuneConfig.of(batch_size=np.int64(8)).loader.batch_size == 8


def _post_init_comparisons() -> list[str]:
    """Comparisons of a ranged setting with a number inside a config's `__post_init__`."""
    ranged = {n for n, s in SETTINGS.items() if s.low is not None or s.high is not None}
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.FunctionDef) and node.name == "__post_init__"):
                continue
            for cmp in (n for n in ast.walk(node) if isinstance(n, ast.Compare)):
                sides = [cmp.left, *cmp.comparators]
                names = {s.attr for s in sides if isinstance(s, ast.Attribute)}
                numbers = [
                    s
                    for s in sides
                    if isinstance(s, ast.Constant) and type(s.value) in (int, float)
                ]
                if names & ranged and numbers:
                    found.append(f"{path.name}:{cmp.lineno}")
    return found


def test_a_range_is_written_and_checked_in_one_place():
    """A range lives in its Setting: no config compares a ranged setting with a number, no
    message states a range by hand, and click's range types are made only from the schema.
    (A bound that depends on the model, such as a backbone's number of stages, is checked
    where the model is known: models/freezing.py.)"""
    assert _post_init_comparisons() == []
    by_hand = re.compile(r"--[a-z-]+ must be (at least|positive|0 or more|in [\[(])")
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if path.name != "settings.py":
            assert not by_hand.search(text), path
        if path.name != "options.py":
            assert "IntRange" not in text and "FloatRange" not in text, path


def test_the_guard_sees_a_hand_written_range(tmp_path, monkeypatch):
    """The scan above is not vacuous: a config with a hand check is found."""
    (tmp_path / "bad.py").write_text(
        "class C:\n    def __post_init__(self):\n        if self.batch_size < 1:\n"
        "            raise ValueError\n"
    )
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    assert _post_init_comparisons() == ["bad.py:3"]


def test_every_finetune_flag_resumes_into_a_config_field():
    """--resume keeps a run's settings except those typed: each flag names the field it feeds
    (--crop feeds `augment`), so a typed flag always replaces the right one."""
    from tlkit.preset.best import BestConfig

    fields = set(setting_names(FinetuneConfig)) | {f.name for f in dataclasses.fields(BestConfig)}
    finetune = next(c for c in commands() if c.name == "finetune")
    for p in finetune.params:
        if p.name in ("resume", "force_resume", "as_json", "recipe", "preset"):
            continue  # how to run, and --preset: which config the others go to
        target = SETTINGS[p.name].field if p.name in SETTINGS else p.name
        assert target in fields, p.name


def test_a_switch_gives_the_settings_three_values(tmp_path):
    finetune = next(c for c in commands() if c.name == "finetune")
    for typed, value in (([], "auto"), (["--cache"], "build"), (["--no-cache"], "off")):
        with finetune.make_context("finetune", typed, parent=_group()) as ctx:
            assert ctx.params["cache"] == value


@pytest.mark.parametrize("config", [FinetuneConfig, PrecomputeConfig, LrFindConfig])
def test_a_config_is_composed_of_shared_parts_built_from_flat_settings(config):
    """finetune, precompute-features and lr-find share the model and loader parts; a config
    built from flat settings puts each in its part, gives them back flat, and refuses an
    unknown name with the nearest known one."""
    made = config.of(backbone="vgg16", batch_size=8, seed=3, max_pixels=1000, input_size=64)
    assert isinstance(made.model, ModelChoice) and isinstance(made.loader, Loader)
    assert (made.model.backbone, made.model.input_size) == ("vgg16", 64)
    assert (made.loader.batch_size, made.loader.seed, made.loader.max_pixels) == (8, 3, 1000)
    assert config.of(**made.settings()) == made and made.settings() == flat_settings(made)
    changed = made.replace(seed=5)
    assert changed.loader.seed == 5 and changed.model == made.model  # the rest as it was
    with pytest.raises(ConfigError, match=r"unknown .* setting 'batch_sise'\. Did you mean"):
        config.of(batch_sise=8)


def test_a_command_keeps_its_own_default_in_a_shared_part():
    """precompute-features freezes the whole backbone, finetune nothing: the same part, each
    command's default, and a typed value still wins."""
    assert PrecomputeConfig.of().model.freeze.count == "all"
    assert FinetuneConfig.of().model.freeze.count == "0"
    assert PrecomputeConfig.of(backbone="vgg16").model.freeze.count == "all"
    assert PrecomputeConfig.of().replace(batch_size=4).model.freeze.count == "all"


def test_run_json_settings_round_trip_and_old_runs_still_load():
    """run.json keeps the settings flat, by name; one written before the parts (bad-file
    settings under `audit`) loads into the same config."""
    config = FinetuneConfig.of(epochs=2, lr=0.01, on_bad_image="skip", max_pixels=5000)
    stored = json.loads(json.dumps(config.as_dict()))
    assert FinetuneConfig.from_dict(stored) == config
    old = {k: v for k, v in stored.items() if k not in ("on_bad_image", "max_bad_fraction")}
    old["audit"] = {"on_bad_image": "skip", "max_bad_fraction": 0.1, "max_pixels": 5000}
    del old["max_pixels"]
    assert FinetuneConfig.from_dict(old) == config


def test_no_two_parts_share_a_setting():
    """A flat name must reach exactly one field, or `of` would set two from one value."""
    for config in (FinetuneConfig, PrecomputeConfig, LrFindConfig):
        names = setting_names(config)
        assert len(names) == len(set(names))
