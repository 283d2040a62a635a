"""The package's layering, read from the source with ast: who may import whom, who knows what."""

from __future__ import annotations

import ast
from pathlib import Path

import remotecli

PACKAGE = Path(remotecli.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Return every module ``path`` imports, absolute names, at any depth of the file."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            modules.add(node.module)
    return modules


def test_images_do_not_import_drivers() -> None:
    """The guest image builder stands below the drivers: nothing in images/ imports drivers/."""
    offenders = {
        path.name: sorted(m for m in imported_modules(path) if m.startswith("remotecli.drivers"))
        for path in (PACKAGE / "images").glob("*.py")
    }
    assert {name: found for name, found in offenders.items() if found} == {}


def test_provider_names_live_in_the_catalogue_only() -> None:
    """Built-in provider names and npm packages are spelled in providers.py and nowhere else."""
    words = ("claude-code", "gemini-cli", "@anthropic-ai/", "@openai/codex", "@google/")
    spelled = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "providers.py" and any(word in path.read_text() for word in words)
    )
    assert spelled == []


def module_name(path: Path) -> str:
    """Return the dotted name of a source file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Return, for each of the package's modules, the package modules it imports.

    Every import counts, wherever it stands in the file (inside a function, under
    ``TYPE_CHECKING``): a cycle hidden behind a late import is still a cycle. ``from
    remotecli.x import y`` points at ``remotecli.x.y`` when that is a module, else at
    ``remotecli.x``.
    """
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in modules else node.module)
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """Return one import cycle of ``graph`` as the modules along it, or [] when there is none."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str]:
        path.append(module)
        on_path.add(module)
        for target in sorted(graph[module]):
            if target in on_path:
                return [*path[path.index(target) :], target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return []

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return []


def test_find_cycle_reports_a_cycle() -> None:
    """The cycle finder names the modules of a cycle and finds none in a layered graph."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_the_import_graph_has_no_cycle() -> None:
    """No two modules of the package import each other, directly or around a longer loop."""
    graph = import_graph()
    assert len(graph) > 40  # the whole package was read
    assert find_cycle(graph) == []


def test_the_controller_reaches_the_gateway_only_through_the_handover_contract() -> None:
    """Only the controller's server assembles a Gateway; the bridge imports handover.py, not
    the gateway package."""
    offenders = {
        path.name: sorted(m for m in imported_modules(path) if m.startswith("remotecli.gateway"))
        for path in (PACKAGE / "controller").glob("*.py")
        if path.name != "server.py"
    }
    assert {name: found for name, found in offenders.items() if found} == {}
