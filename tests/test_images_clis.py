"""Which provider CLIs an image build installs, at which versions, and the Node.js they need.

The host's CLIs are planted as npm lays them out (``node_modules/.bin/NAME`` linked into the
package, next to its ``package.json``); the install itself (npm into a tree) is exercised by
``tests/e2e/test_qemu_providers.py``'s image build.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from remotecli.exceptions import RootfsError
from remotecli.images import clis
from remotecli.providers import HostPrograms, engines_node

ROOT = Path(__file__).resolve().parents[1]


def plant(modules: Path, package: str, version: str, program: str, script: bool) -> None:
    """Lay out ``package`` as npm does, with its program linked from ``.bin``."""
    directory = modules / package
    (directory / "bin").mkdir(parents=True)
    body = b"#!/usr/bin/env node\n" if script else b"\x7fELF native"
    (directory / "bin" / program).write_bytes(body)
    (directory / "bin" / program).chmod(0o755)
    manifest = {"name": package, "version": version, "engines": {"node": ">=18"}}
    (directory / "package.json").write_text(json.dumps(manifest))
    (modules / ".bin").mkdir(exist_ok=True)
    (modules / ".bin" / program).symlink_to(directory / "bin" / program)


def host_with(tmp_path: Path, *planted: tuple[str, str, str]) -> HostPrograms:
    modules = tmp_path / "node_modules"
    modules.mkdir()
    for package, version, program in planted:
        plant(modules, package, version, program, script=program != "claude")
    return HostPrograms(search_path="", extra_bin_dirs=[modules / ".bin"])


def no_registry(package: str) -> str:
    raise AssertionError(f"the registry was asked about {package}")


def test_by_default_every_cli_the_host_has_at_its_version(tmp_path: Path) -> None:
    """Without --provider, the CLIs on the host go in at the host's versions; each one left
    out is named with the reason and the option that adds it."""
    host = host_with(
        tmp_path,
        ("@anthropic-ai/claude-code", "2.1.197", "claude"),
        ("@openai/codex", "0.171.0", "codex"),
    )
    chosen, lines = clis.choose_clis(None, host, no_registry)
    assert [(c.provider, c.spec) for c in chosen] == [
        ("claude-code", "@anthropic-ai/claude-code@2.1.197"),
        ("codex", "@openai/codex@0.171.0"),
    ]
    assert "the version on this host" in chosen[0].why
    assert any(
        line.startswith("gemini-cli: left out: `gemini` is not on this host")
        and "--provider gemini-cli" in line
        for line in lines
    ), lines


def test_named_providers_are_exactly_those(tmp_path: Path) -> None:
    """--provider picks exactly the named CLIs; one the host lacks comes at the registry's
    latest, and says so."""
    host = host_with(tmp_path, ("@anthropic-ai/claude-code", "2.1.197", "claude"))
    chosen, lines = clis.choose_clis(["gemini-cli"], host, lambda package: "0.99.0")
    assert [c.spec for c in chosen] == ["@google/gemini-cli@0.99.0"]
    assert "registry's latest" in chosen[0].why
    assert "claude-code: left out (not named with --provider)" in lines


def test_no_providers_is_the_base_image(tmp_path: Path) -> None:
    """An empty list installs nothing, whatever the host has."""
    host = host_with(tmp_path, ("@anthropic-ai/claude-code", "2.1.197", "claude"))
    assert clis.choose_clis([], host, no_registry)[0] == []


def test_a_program_not_from_its_npm_package_has_no_version(tmp_path: Path) -> None:
    """A `claude` installed another way (no package.json naming the package) is left out by
    default: its version is unknown."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "claude").write_bytes(b"\x7fELF")
    (bin_dir / "claude").chmod(0o755)
    host = HostPrograms(search_path=str(bin_dir), extra_bin_dirs=[])
    chosen, lines = clis.choose_clis(None, host, no_registry)
    assert chosen == []
    assert any("is not from the npm package @anthropic-ai/claude-code" in line for line in lines)


def test_an_unknown_provider_is_refused(tmp_path: Path) -> None:
    """Only the built-in npm providers can go into an image."""
    with pytest.raises(RootfsError, match="unknown provider 'aider'"):
        clis.choose_clis(["aider"], host_with(tmp_path), no_registry)


def test_the_pinned_node_meets_every_installed_clis_engines() -> None:
    """The guest's Node.js is at least what each CLI in the project's node_modules asks for."""
    have = tuple(int(n) for n in clis.NODE_VERSION.split("."))
    for program in ("codex", "gemini"):
        found = HostPrograms().find(program)
        wanted = engines_node(found) if found is not None else None
        if wanted is not None:
            assert have >= wanted[1], (program, wanted)


def test_the_guests_node_is_the_projects_pin() -> None:
    """The guest's Node.js is the version scripts/install-node-for-clis.sh installs on a host."""
    script = (ROOT / "scripts" / "install-node-for-clis.sh").read_text()
    pinned = re.search(r"^NODE_FOR_CLIS_VERSION=(\S+)$", script, re.MULTILINE)
    assert pinned is not None
    assert pinned.group(1) == clis.NODE_VERSION


def test_a_link_in_the_tree_is_followed_inside_it(tmp_path: Path) -> None:
    """A bin link, relative or absolute, is read as the guest reads it: inside the tree."""
    root = tmp_path / "root"
    (root / "usr/local/lib/tool").mkdir(parents=True)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/lib/tool/run").write_text("#!/usr/bin/env node\n")
    (root / "usr/local/bin/relative").symlink_to("../lib/tool/run")
    (root / "usr/local/bin/absolute").symlink_to("/usr/local/lib/tool/run")
    for name in ("relative", "absolute"):
        found = clis.in_tree(root, root / "usr/local/bin" / name)
        assert found is not None
        assert Path(found).resolve() == (root / "usr/local/lib/tool/run").resolve()
    assert clis.in_tree(root, root / "usr/local/bin/missing") is None
