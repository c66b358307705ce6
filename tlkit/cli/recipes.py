"""Recipes: named YAML files that set options of tlkit commands.

A recipe holds a one-line `description` and one section per command, each mapping option names
(as typed on the command line, without dashes: `head-epochs`, `freeze`) to values. The CLI turns
the section of the command being run into click's `default_map`, so a flag typed on the command
line beats the recipe, which beats the built-in default. `NAME` is looked up in ./recipes/ first
(a project's own recipes), then among those shipped in tlkit/recipes/; a path works too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlkit.core.errors import ConfigError, did_you_mean, shown

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "recipes"  # tlkit/recipes/
PROJECT_DIR = Path("recipes")


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    sections: dict[str, dict[str, Any]]  # command name -> {option: value}
    sha256: str


def _dirs() -> list[Path]:
    return [d for d in (PROJECT_DIR, BUILTIN_DIR) if d.is_dir()]


def recipe_paths() -> dict[str, Path]:
    """Every recipe by name; a project recipe hides a built-in one of the same name."""
    found: dict[str, Path] = {}
    for folder in reversed(_dirs()):
        found.update({p.stem: p for p in sorted(folder.glob("*.yaml"))})
    return dict(sorted(found.items()))


def find_recipe(name_or_path: str | os.PathLike[str]) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        return path
    known = recipe_paths()
    if text not in known:
        raise ConfigError(
            f"unknown recipe {text!r}.{did_you_mean(text, known)} `tlkit recipes` "
            f"lists them: {', '.join(known)}"
        )
    return known[text]


def _parse(path: Path, raw: bytes) -> Any:
    """The YAML document, read safely and without aliases: `*ref` can make a few hundred bytes
    stand for a structure of billions of items, and a recipe never needs one."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ConfigError(
                    f"{path}: uses a YAML alias at line {mark.line + 1}, column "
                    f"{mark.column + 1}; recipes do not take aliases (*name): write the value out"
                )
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            keys = [self.construct_object(k, deep=True) for k, _ in node.value]
            for n, (key, (key_node, _)) in enumerate(zip(keys, node.value, strict=True)):
                if isinstance(key, str) and key in keys[:n]:  # PyYAML keeps the last silently
                    raise ConfigError(
                        f"{path}: {shown(key)} is set twice (line "
                        f"{key_node.start_mark.line + 1}); keep one"
                    )
            return super().construct_mapping(node, deep)

    loader = NoAliases(raw)  # what yaml.safe_load does, with the alias check
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {str(problem)[:200]}") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit number, 100,000 nested lists
        raise ConfigError(
            f"{path}: not a recipe PyYAML can read ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    finally:
        loader.dispose()


def load_recipe(name_or_path: str | os.PathLike[str], commands: set[str]) -> Recipe:
    """Read and check a recipe's shape; `commands` are the command names a section may have.
    Option names and values are checked against the command that uses the section."""
    path = find_recipe(name_or_path)
    raw = path.read_bytes()
    data = _parse(path, raw)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a recipe is a mapping with 'description' and one section "
            f"per command. Received: {type(data).__name__}"
        )
    description = data.pop("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{path}: 'description' must be one line of text")
    sections = {}
    for command, options in data.items():
        if command not in commands:
            raise ConfigError(
                f"{path}: unknown command {shown(command)}."
                f"{did_you_mean(str(command)[:80], commands)} Sections are named after "
                f"commands: {', '.join(sorted(commands))}"
            )
        if not isinstance(options, dict):
            raise ConfigError(
                f"{path}: section {command!r} must map option names to values. "
                f"Received: {type(options).__name__} {shown(options)}"
            )
        sections[command] = {str(k): v for k, v in options.items()}
    return Recipe(path.stem, path, description.strip(), sections, hashlib.sha256(raw).hexdigest())


def list_recipes(commands: set[str]) -> list[Recipe]:
    return [load_recipe(path, commands) for path in recipe_paths().values()]
