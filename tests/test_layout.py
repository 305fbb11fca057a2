"""The map of docs/DESIGN.md ("Map") holds: imports point only to earlier rooms (or within one), with no cycles.

Every ``.py`` under storage/, precompute/, distill/ and cli/ is parsed with ``ast`` (nothing is imported). Each
module belongs to a room; an import of a module of a later room fails the test, wherever the import sits (module
level or inside a function), and so does any import cycle between modules: of module-level imports
(``if TYPE_CHECKING:`` blocks included), and also through function-level ones, which must not hide a cycle (they
may only defer a heavy import, e.g. torch, to keep ``import distill`` and the CLI's start-up cheap).
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "precompute", "distill", "cli")

# The rooms, in order: a module may import from its own room or an earlier one. A module's room is the longest
# prefix below that names it; ``distill`` itself holds the lazy facade (distill/__init__.py) and the old-path alias.
ROOMS = (
    "storage",
    "precompute.sources",
    "precompute",
    "distill.model",
    "distill.search",
    "distill.train",
    "distill.evaluate",
    "distill.route",
    "distill",
    "cli",
)
HEAVY = ("torch", "sentence_transformers", "transformers", "faiss")  # storage must import none of them


def _modules() -> dict[str, Path]:
    """Module name → file, for every .py of the packages (a package is named by its __init__.py)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def room_of(module: str) -> str:
    rooms = [r for r in ROOMS if module == r or module.startswith(r + ".")]
    if not rooms:
        raise AssertionError(f"{module} is in no room of tests/test_layout.py ROOMS: add its package to the map")
    return max(rooms, key=len)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run on import: the body, into if/try/with blocks (and TYPE_CHECKING), not into defs."""
    for node in body:
        yield node
        if isinstance(node, ast.If | ast.With | ast.Try | ast.ClassDef):
            for field in ("body", "orelse", "finalbody"):
                yield from _module_level(getattr(node, field, []))
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The project modules an import statement loads (third-party ones are left out)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != module:
            yield name


def _imports(module: str, *, module_level: bool) -> Iterator[tuple[int, str]]:
    """(line, imported module) of every project import of ``module``; all of them, or those that run on import."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    nodes = _module_level(tree.body) if module_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _targets(module, node):
                yield node.lineno, target


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_module_has_a_room() -> None:
    assert MODULES and "distill.train.config" in MODULES
    for module in MODULES:
        room_of(module)


def test_no_import_points_to_a_later_room() -> None:
    upward = []
    for module in MODULES:
        here = ROOMS.index(room_of(module))
        for line, target in sorted(set(_imports(module, module_level=False))):
            there = ROOMS.index(room_of(target))
            if there > here:
                upward.append(
                    f"{_where(module, line)}: {module} imports {target}, but room {ROOMS[here]} may not import "
                    f"from the later room {ROOMS[there]}"
                )
    assert not upward, "upward imports (move the code to the room it belongs to):\n" + "\n".join(upward)


def _cycles(module_level: bool) -> list[str]:
    """Every import cycle found by a depth-first walk, each as ``a (file:line) -> b (file:line) -> a``."""
    lines = {(m, t): line for m in MODULES for line, t in _imports(m, module_level=module_level)}
    graph = {m: sorted({t for (source, t) in lines if source == m}) for m in MODULES}
    cycles: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target]
                edges = [f"{a} ({_where(a, lines[a, b])})" for a, b in itertools.pairwise(cycle)]
                cycles.append(" -> ".join([*edges, target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_no_import_cycles() -> None:
    cycles = _cycles(module_level=True)
    assert not cycles, "import cycles between modules (module-level imports):\n" + "\n".join(cycles)


def test_no_cycle_hidden_behind_a_function_level_import() -> None:
    cycles = _cycles(module_level=False)
    assert not cycles, (
        "import cycles through function-level imports (move the code, do not hide the cycle):\n" + "\n".join(cycles)
    )


@pytest.mark.parametrize("module", [m for m in MODULES if room_of(m) == "storage"])
def test_storage_imports_no_torch(module: str) -> None:
    tree = ast.parse(MODULES[module].read_text())
    heavy = [
        f"{_where(module, node.lineno)}: {name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        if name.split(".")[0] in HEAVY
    ]
    assert not heavy, f"storage must not import {HEAVY}: " + ", ".join(heavy)


def test_the_checks_catch_an_upward_edge_and_a_cycle() -> None:
    """The test's own parts on known answers, so a broken parser cannot pass the tree silently."""
    assert room_of("distill.train.mining") == "distill.train" and room_of("precompute.sources.base") == (
        "precompute.sources"
    )
    assert room_of("distill.routed_model") == "distill" and room_of("precompute.teacher") == "precompute"
    assert ROOMS.index(room_of("distill.evaluate.inputs")) > ROOMS.index(room_of("distill.search.search"))
    assert "distill.train.config" in {t for _, t in _imports("distill.train.run", module_level=True)}
    assert "precompute.sources.errors" in {t for _, t in _imports("precompute.sources.base", module_level=True)}
    lazy = {t for _, t in _imports("distill.train.mining", module_level=False)}
    eager = {t for _, t in _imports("distill.train.mining", module_level=True)}
    assert "distill.search.search" in lazy and "distill.search.search" not in eager  # function-level, seen as such
