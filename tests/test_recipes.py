"""Recipes: every shipped one loads and trains; flag > recipe > default; bad recipes say why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY, write_folder

from tlkit.cli import cli
from tlkit.cli.options import recipe_commands
from tlkit.cli.recipes import BUILTIN_DIR, list_recipes

SHIPPED = [
    "alexnet-augment",
    "inception_v3",
    "large-data",
    "medium-data",
    "resnet50",
    "small-data",
    "vgg16",
]
NAME_A_BACKBONE = ("inception_v3", "resnet50", "vgg16")


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_recipes_lists_every_shipped_recipe_with_its_description():
    result = invoke("recipes")
    assert result.exit_code == 0
    for recipe in list_recipes(recipe_commands()):
        assert f"{recipe.name}" in result.output and recipe.description in result.output
        assert recipe.description and "\n" not in recipe.description
    assert sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml")) == SHIPPED


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in NAME_A_BACKBONE else n for n in SHIPPED],
)
def test_each_shipped_recipe_runs_one_quick_epoch(name, tmp_path):
    """Recipes that name a backbone run on it (their freeze plan is resolved against the real
    architecture); the others run on the test backbone."""
    data = write_folder(tmp_path / "data", ["a", "b"], 6)
    recipe = next(r for r in list_recipes(recipe_commands()) if r.name == name)
    section = recipe.sections["finetune"]
    assert ("backbone" in section) == (name in NAME_A_BACKBONE)
    tiny = [] if "backbone" in section else ["--backbone", TINY]
    size = "75" if section.get("backbone") == "inception_v3" else "32"
    # typed flags make it one quick epoch (of the head); everything else comes from the recipe,
    # and the recipe's freeze plan is resolved against the real backbone all the same
    result = invoke(
        "finetune",
        str(data),
        "--recipe",
        name,
        "-o",
        "runs/r",
        "--weights",
        "none",
        "--input-size",
        size,
        "--batch-size",
        "4",
        "--head-epochs",
        "1",
        "--epochs",
        "0",
        "--views",
        "2",
        *tiny,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "runs/r/run.json").read_text())["config"]
    assert config["recipe"] == name
    assert config["input_size"] == int(size) and config["head_epochs"] == 1  # flags won
    request = json.loads((tmp_path / "runs/r/run.json").read_text())["freeze"]["request"]
    if "freeze-blocks" in section:
        assert request == f"--freeze-blocks {section['freeze-blocks']}"
    else:
        assert request == f"--freeze {section.get('freeze', '0')}"
    for key, value in section.items():
        field = key.replace("-", "_")
        if field in ("input_size", "head_epochs", "epochs", "views"):
            continue
        if field == "augment":
            assert config["augment"]["preset"] == value
        elif field in ("freeze", "freeze_blocks"):
            assert config["freeze"][{"freeze": "count", "freeze_blocks": "blocks"}[field]] == (
                str(value) if field == "freeze" else value
            )
        elif field == "cache":
            assert config["cache"] == ("build" if value else "off")
        else:
            assert config[field] == value, field


def test_flag_beats_recipe_beats_default(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "mine.yaml").write_text(
        "description: test\ncheck-data:\n  val-fraction: 0.5\n  output: from-recipe.json\n"
    )
    data = write_folder(tmp_path / "data", ["a", "b"], 4)
    assert invoke("check-data", str(data), "--recipe", "mine").exit_code == 0
    report = json.loads((tmp_path / "from-recipe.json").read_text())
    assert report["splits"]["val"]["images"] > 0 and not (tmp_path / "data_report.json").exists()
    assert invoke("check-data", str(data), "--recipe", "mine", "-o", "typed.json").exit_code == 0
    assert (tmp_path / "typed.json").is_file()  # the flag won
    assert invoke("check-data", str(data)).exit_code == 0
    assert (tmp_path / "data_report.json").is_file()  # no recipe: the default
    by_path = invoke("check-data", str(data), "--recipe", str(recipes / "mine.yaml"), "-o", "p")
    assert by_path.exit_code == 0


def test_a_project_recipe_replaces_a_shipped_one_of_the_same_name(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "vgg16.yaml").write_text("description: our own vgg16\n")
    assert "our own vgg16" in invoke("recipes").output


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "description: x\nfinetune:\n  head_epoch: 3\n",
            "`tlkit finetune` has no option 'head_epoch'. Did you mean 'head-epochs'?",
        ),
        (
            "description: x\nfinetun:\n  lr: 0.1\n",
            "unknown command 'finetun'. Did you mean 'finetune'?",
        ),
        (
            "description: x\nfinetune:\n  head-epochs: many\n",
            "finetune.head-epochs: 'many' is not a valid integer range. Received: 'many'",
        ),
        ("description: x\nfinetune:\n  augment: fancy\n", "unknown --augment preset 'fancy'"),
        ("description: x\nfinetune:\n  head-epochs: .inf\n", "inf is not a whole number"),
        ("description: x\nfinetune:\n  head-epochs: 1.7\n", "1.7 is not a whole number"),
        ("description: x\nfinetune:\n  head-epochs: true\n", "True is not a whole number"),
        (
            "description: x\nfinetune:\n  epochs: 1\n  lr: 0.1\n  epochs: 9\n",
            "'epochs' is set twice (line 5); keep one",
        ),
        ("- a list\n", "a recipe is a mapping"),
        ("finetune: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_recipes_are_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    data = write_folder(tmp_path / "data", ["a", "b"], 3)
    result = invoke("finetune", str(data), "--recipe", str(path), "--weights", "none")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not Path("runs").exists()


# a few hundred bytes that stand for 2**31 list items through doubling aliases; before aliases
# were refused, the message quoting the section ran out of memory
ALIAS_BOMB = (
    "description: x\neval:\n  a0: &a0 [1, 1]\n"
    + "".join(f"  a{i}: &a{i} [*a{i - 1}, *a{i - 1}]\n" for i in range(1, 31))
    + "finetune: *a30\n"
)


@pytest.mark.parametrize(
    "text, message",
    [
        (ALIAS_BOMB, "uses a YAML alias at line 4, column 12; recipes do not take aliases"),
        ("description: x\nfinetune: &s {epochs: 1}\nlr-find: *s\n", "uses a YAML alias"),
        ("description: x\nfinetune: !!python/object:os.system {}\n", "not valid YAML"),
        ("description: x\nfinetune:\n  head-epochs: " + "9" * 5000, "ValueError: Exceeds"),
        ("description: " + "[" * 100_000, "RecursionError"),
    ],
)
def test_recipes_refuse_aliases_and_tags_before_building_anything(tmp_path, text, message):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    result = invoke("finetune", str(tmp_path), "--recipe", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "section, shown",
    [
        ("  head-epochs: [" + "9" * 100 + "]", "Received: [<an int of 333 bits>]"),
        (
            "  head-epochs: [" + ", ".join(["many"] * 20000) + "]",
            "['many', 'many', 'many', 'many', ...]",
        ),
        ("  " + "x" * 1000 + ": 1", "has no option 'xxxxxxxx"),
    ],
)
def test_recipe_messages_quote_values_to_a_bounded_length(tmp_path, section, shown):
    path = tmp_path / "big.yaml"
    path.write_text(f"description: x\nfinetune:\n{section}\n")
    result = invoke("finetune", str(tmp_path), "--recipe", str(path))
    assert result.exit_code == 2, result.output
    assert shown in result.output and len(result.output) < 1000


def test_unknown_recipe_name_suggests_the_closest():
    result = invoke("finetune", "--recipe", "smal-data")
    assert result.exit_code == 2
    assert "unknown recipe 'smal-data'. Did you mean 'small-data'?" in result.output


@pytest.mark.slow  # builds a real architecture: its layer names are the point
def test_a_typed_freeze_flag_replaces_the_recipes_freeze_setting(tmp_path):
    data = write_folder(tmp_path / "data", ["a", "b"], 4)
    recipe = tmp_path / "blocks.yaml"
    recipe.write_text("description: x\nprecompute-features:\n  freeze-blocks: 2\n")
    common = [
        "precompute-features",
        str(data),
        "--recipe",
        str(recipe),
        "--backbone",
        "resnet50",
        "--weights",
        "none",
        "--input-size",
        "32",
        "--dry-run",
        "--json",
    ]
    from_recipe = json.loads(invoke(*common).stdout)  # stdout holds the JSON alone
    typed = invoke(*common, "--freeze", "all")
    assert typed.exit_code == 0, typed.output  # not "both --freeze and --freeze-blocks"
    from_flag = json.loads(typed.stdout)
    assert from_recipe["cut"]["layer"] == "conv2_block3_out"
    assert from_flag["cut"]["k"] > from_recipe["cut"]["k"]
