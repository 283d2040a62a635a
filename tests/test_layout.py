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
