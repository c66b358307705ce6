"""The package's floors: data flows one way (core -> models -> data -> features -> training |
evaluation -> preset -> cli), so each sub-package imports only those below it, training and
evaluation never each other, and no two modules import each other, directly or round a longer
circle. Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

PACKAGE = REPO / "tlkit"
FLOORS = {
    "core": 0,
    "models": 1,
    "data": 2,
    "features": 3,
    "training": 4,
    "evaluation": 4,
    "preset": 5,
    "cli": 6,
}
SIBLINGS = {"training", "evaluation"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tlkit_imports(path: Path) -> set[str]:
    """Every tlkit module `path` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "tlkit"}
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".")[0] == "tlkit"
        ):
            for alias in node.names:  # `from tlkit.core import fsutil` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _exists(sub) else node.module)
    return found


def _exists(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def floor_of(module: str) -> str | None:
    """The sub-package a module lives in; None for the package's own face (tlkit/__init__.py,
    __main__, _version), which is not a floor."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else None


def graph() -> dict[str, set[str]]:
    return {module_name(p): tlkit_imports(p) for p in PACKAGE.rglob("*.py")}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, imported in sorted(edges.items()):
        here = floor_of(module)
        if here is None:
            continue
        for target in sorted(imported):
            there = floor_of(target)
            if target == "tlkit._version" or there == here:
                continue
            if there is None or FLOORS[there] > FLOORS[here] or ({here, there} == SIBLINGS):
                bad.append(f"{module} imports {target} ({here} -> {there or 'the face'})")
    return bad


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, found by depth-first search (each reported once per entry)."""
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    return found


def test_every_sub_package_imports_only_the_floors_below_it():
    edges = graph()
    assert len([m for m in edges if floor_of(m)]) > 40  # the walk found the modules
    assert upward_imports(edges) == []


def test_no_two_modules_import_each_other_round_any_circle():
    assert circles(graph()) == []


@pytest.mark.parametrize(
    ("module", "source", "complaint"),
    [
        ("tlkit.core.runs", "from tlkit.data.decode import x", "core -> data"),
        ("tlkit.training.train", "from tlkit.evaluation import views", "training -> evaluation"),
        ("tlkit.models.model", "def f():\n    import tlkit.cli\n", "models -> cli"),
    ],
)
def test_the_check_fails_on_an_upward_import(tmp_path, module, source, complaint):
    """The check itself: an upward import, lazy or not, is reported."""
    path = tmp_path / "m.py"
    path.write_text(source)
    bad = upward_imports({module: tlkit_imports(path)})
    assert len(bad) == 1 and complaint in bad[0]


def test_the_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


MAX_FUNCTION_LINES = 60


def test_no_function_in_the_package_is_longer_than_a_screen():
    """A function longer than 60 lines does several things; split it where they part."""
    long = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES
    ]
    assert long == []


MAX_PARAMETERS = 7


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters a caller may pass (self and cls left out; *args and **kwargs too)."""
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")])


def test_no_function_in_the_package_takes_more_than_seven_parameters():
    """Context travels in records (a config, a Loader, a CacheJob, ...), not threaded by hand
    through long signatures."""
    wide = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} parameters)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := parameter_count(node)) > MAX_PARAMETERS
    ]
    assert wide == []


def test_the_parameter_count_sees_a_wide_signature():
    tree = ast.parse("def f(self, a, b, /, c, *args, d, e=1, **kw): pass")
    assert parameter_count(tree.body[0]) == 5  # type: ignore[arg-type]


def undocumented_arguments(function: Any) -> list[str]:
    """The parameters a function's docstring does not describe under "Args:" (Keras' style)."""
    doc = inspect.getdoc(function) or ""
    described = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return [
        p
        for p in inspect.signature(function).parameters
        if not re.search(rf"^\s+\*{{0,2}}{p}:", described, re.MULTILINE)
    ]


def test_every_public_function_says_what_each_argument_means():
    import tlkit

    missing = {
        name: gaps
        for name in tlkit.__all__
        if inspect.isfunction(getattr(tlkit, name))
        and (gaps := undocumented_arguments(getattr(tlkit, name)))
    }
    assert missing == {}


def test_the_argument_check_sees_an_undocumented_one():
    def f(a: int, b: int) -> None:
        """Does f.

        Args:
            a: the first.
        """

    assert undocumented_arguments(f) == ["b"]
