"""The package's structure: imports follow the room order, no import cycle, small files, a docstring each.

The room order is the one of issue #14 (low to high): a module may import modules of its own room or of
lower rooms only, at top level or inside a function. These checks read the code with ``ast``; nothing is
imported.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "loraops"
MAX_LINES = 450

# The room table, low to high: (level, room, the modules it holds). A module belongs to the room of the longest
# dotted prefix that names it. ``loraops`` is the package root (its __init__); ``loraops.__main__`` runs the CLI.
# Only modules under loraops/ are read; imports of flows and tasks from them are checked too.
ROOMS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "top", ("loraops", "loraops.config", "loraops.results", "loraops.names", "loraops.project")),
    (1, "data", ("loraops.data",)),
    (2, "contract", ("loraops.contract",)),
    (3, "train", ("loraops.train",)),
    (4, "evaluate", ("loraops.evaluate",)),
    (5, "lineage", ("loraops.lineage",)),
    (6, "registry", ("loraops.registry",)),
    (7, "serve", ("loraops.serve",)),
    (8, "inputs", ("loraops.inputs",)),
    (8, "reproduce", ("loraops.reproduce",)),
    (9, "stages", ("loraops.stages", "loraops.sweep")),  # the sweep runs trials through the stages
    (10, "cli", ("loraops.cli", "loraops.__main__")),
    (10, "flows/tasks", ("flows", "tasks")),  # outside the package: the Prefect flows and their tasks
]
CHECKED = {prefix.split(".")[0] for _, _, prefixes in ROOMS for prefix in prefixes}  # loraops, flows, tasks


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room_of(module: str) -> tuple[int, str]:
    """The (level, room) of a dotted module name: the room whose prefix matches it longest."""
    best: tuple[int, int, str] | None = None
    for level, room, prefixes in ROOMS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), level, room)
    assert best is not None, f"{module} is in no room of the room table: add it to ROOMS in {__file__}"
    return best[1], best[2]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if modules()[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@cache
def imports_of(module: str) -> tuple[tuple[int, str], ...]:
    """(line, module imported) for every import of loraops, flows or tasks in ``module``, at any depth.

    ``from loraops.x import y`` names ``loraops.x.y`` where that is a module, else ``loraops.x``.
    """
    tree = ast.parse(modules()[module].read_text(), filename=str(modules()[module]))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] in CHECKED]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            if source.split(".")[0] not in CHECKED:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules() else source))
    return tuple(sorted(set(found)))


def _existing(module: str) -> str:
    """The nearest enclosing module that exists (``import loraops.x.y`` of a missing y counts as loraops.x)."""
    while module not in modules() and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def _where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_is_in_a_room():
    for module in modules():
        room_of(module)


def test_imports_follow_the_room_order():
    """A module imports its own room or lower rooms only (top-level and function-level imports alike)."""
    offending = []
    for module in modules():
        level, room = room_of(module)
        for line, target in imports_of(module):
            target_level, target_room = room_of(target)
            if target_level > level:
                offending.append(
                    f"{_where(module, line)}: {module} imports {target}: "
                    f"{room} ({level}) → {target_room} ({target_level})"
                )
    if offending:
        pytest.fail(f"{len(offending)} import(s) point up the room order:\n" + "\n".join(offending), pytrace=False)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _one_cycle(graph: dict[str, set[str]], component: list[str], start: str) -> list[str]:
    """A shortest import path from ``start`` back to itself within its component."""
    members = set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph[node] & members):
                if successor == start:
                    return paths[node] + [start]
                if successor not in paths:
                    paths[successor] = paths[node] + [successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # every member of a strongly connected component has one


def _cycles_covering(graph: dict[str, set[str]], component: list[str]) -> list[list[str]]:
    """Shortest cycles until every module of the component stands in one: each to break."""
    cycles: list[list[str]] = []
    for start in component:
        if not any(start in cycle for cycle in cycles):
            cycles.append(_one_cycle(graph, component, start))
    return cycles


def test_no_import_cycle_between_modules():
    """Function-level imports count: a cycle hidden in a function is still a cycle."""
    graph = {module: {_existing(t) for _, t in imports_of(module)} & modules().keys() for module in modules()}
    lines = {(module, _existing(target)): line for module in modules() for line, target in reversed(imports_of(module))}
    components = _cycles(graph)
    reports = []
    for component in components:
        reports.append(f"cycle among {', '.join(component)}:")
        for cycle in _cycles_covering(graph, component):
            steps = [f"{_where(a, lines[a, b])}: {a} → {b}" for a, b in zip(cycle, cycle[1:], strict=False)]
            reports.append("  " + "\n  ".join(steps) + "\n  --")
    if reports:
        pytest.fail(f"{len(components)} group(s) of modules import each other:\n" + "\n".join(reports), pytrace=False)


def test_the_cycle_finder_finds_each_cycle_and_a_path_round_it():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"], ["e"]]
    assert _one_cycle(graph, ["a", "b", "c"], "b") == ["b", "c", "a", "b"]
    two = {"a": {"b", "c"}, "b": {"a"}, "c": {"a"}}
    assert _cycles_covering(two, ["a", "b", "c"]) == [["a", "b", "a"], ["c", "a", "c"]]


def test_no_file_over_the_line_limit():
    long = {
        str(path.relative_to(PACKAGE.parent)): count
        for path in modules().values()
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    if long:
        pytest.fail(
            f"files over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in sorted(long.items())), pytrace=False
        )


def test_every_module_has_a_docstring():
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in modules().values()
        if not ast.get_docstring(ast.parse(path.read_text()))
    ]
    if missing:
        pytest.fail("modules without a docstring: " + ", ".join(missing), pytrace=False)
