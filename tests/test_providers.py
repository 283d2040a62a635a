"""The provider catalogue: built-ins, configured ones, and availability from real executables."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from remotecli.config import ProviderConfig
from remotecli.exceptions import ConfigError, Unprocessable
from remotecli.providers import BUILTIN_PROVIDERS, NOT_FOUND, NPM_PROVIDERS, Catalogue


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
    assert catalogue.get("gemini-cli").hint == "install it with `npm install -g @google/gemini-cli`"


def test_npm_providers_come_from_the_builtins() -> None:
    """The image builder's npm packages are the built-in providers' own, in catalogue order."""
    assert NPM_PROVIDERS == {
        "claude-code": "@anthropic-ai/claude-code",
        "codex": "@openai/codex",
        "gemini-cli": "@google/gemini-cli",
    }
