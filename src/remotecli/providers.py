"""The provider catalogue: which command-line tools a session can run, and whether each is here.

This is the one place that knows the providers. Four are built in (``shell``, ``claude-code``,
``codex``, ``gemini-cli``; the last three are npm packages, which the guest image builder
installs by the names given here); the TOML file adds more under ``[providers.NAME]``.

Whether a provider is *available* is the driver's answer (:class:`ProgramFinder`): the local
driver looks for the program on ``PATH`` or in the project's ``node_modules/.bin`` (where
``npm install`` puts the CLIs) with :class:`HostPrograms`; the qemu driver looks in the guest
image. A provider that is not available is listed with the driver's reason and a hint that says
how to install it, and starting it is refused with 422 carrying that hint.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from remotecli.config import ProviderConfig
from remotecli.exceptions import ConfigError, Unprocessable

PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
"""What a provider name may look like (checked before it reaches anything else)."""


@dataclass(frozen=True)
class Provider:
    """A command-line tool a session can run in its terminal."""

    name: str
    title: str
    command: tuple[str, ...]
    install_hint: str
    npm_package: str | None = None
    """The npm package that installs the program (the guest image builder installs it too)."""


def _npm(name: str, title: str, program: str, package: str) -> Provider:
    return Provider(name, title, (program,), f"install it with `npm install -g {package}`", package)


BUILTIN_PROVIDERS = (
    Provider("shell", "Shell (bash)", ("bash", "-l"), "install bash with your system's packages"),
    _npm("claude-code", "Claude Code", "claude", "@anthropic-ai/claude-code"),
    _npm("codex", "Codex CLI", "codex", "@openai/codex"),
    _npm("gemini-cli", "Gemini CLI", "gemini", "@google/gemini-cli"),
)

NPM_PROVIDERS = {p.name: p.npm_package for p in BUILTIN_PROVIDERS if p.npm_package is not None}
"""Provider name → npm package, for the providers a guest image can hold."""


def builtin_provider(name: str) -> Provider | None:
    """Return the built-in provider called ``name``, or None."""
    return next((p for p in BUILTIN_PROVIDERS if p.name == name), None)


NOT_FOUND = "not found"
"""A finder's answer when the program is simply not where it looks: the provider's own install
hint is then the next step. Any other answer is shown as the hint itself."""


class ProgramFinder(Protocol):
    """Says whether a command can run where sessions run (each driver is one)."""

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Return ``command`` as it will run (its program resolved), or why not, in words.

        Answer :data:`NOT_FOUND` when the provider's install hint says what to do.
        """
        ...


@dataclass(frozen=True)
class ProviderStatus:
    """A provider and whether its program is installed here."""

    provider: Provider
    available: bool
    program: str | None
    """The program as the driver runs it (an absolute path on this host), when available."""
    hint: str | None
    """Why it cannot run and how to install it, when not available."""
    command: tuple[str, ...] = ()
    """The argv the driver runs, its program resolved, when available."""

    @property
    def name(self) -> str:
        return self.provider.name

    def argv(self) -> list[str]:
        """Return the argv to run, with the program resolved to its absolute path."""
        if self.program is None:
            raise Unprocessable(
                f"provider {self.name!r} is not installed: {self.hint}", provider=self.name
            )
        return list(self.command)


def project_bin_dirs() -> list[Path]:
    """Return the ``node_modules/.bin`` directories searched after PATH.

    The current directory's, then the one next to the source tree (an editable install).
    """
    candidates = [Path.cwd() / "node_modules" / ".bin"]
    candidates.append(Path(__file__).resolve().parents[2] / "node_modules" / ".bin")
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


class HostPrograms:
    """Finds programs on this host: on ``PATH``, then in the project's ``node_modules/.bin``.

    The local driver's answer (its sandbox sees the host's programs), and the catalogue's
    when it is given no driver.
    """

    def __init__(
        self, search_path: str | None = None, extra_bin_dirs: Sequence[Path] | None = None
    ) -> None:
        path = search_path if search_path is not None else os.environ.get("PATH", os.defpath)
        bins = project_bin_dirs() if extra_bin_dirs is None else list(extra_bin_dirs)
        self._path = os.pathsep.join([path, *(str(b) for b in bins)])

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Return ``command`` with its program as an absolute path, or say it is not found."""
        program = shutil.which(command[0], path=self._path)
        if program is None:
            return NOT_FOUND
        return (os.path.abspath(program), *command[1:])


class Catalogue:
    """The providers of this controller; look one up by name before starting a session.

    ``driver`` answers whether each provider's program can run where its sessions run; without
    one, programs are looked for on this host (``search_path`` and ``extra_bin_dirs``).
    """

    def __init__(
        self,
        extra: Iterable[ProviderConfig] = (),
        *,
        search_path: str | None = None,
        extra_bin_dirs: Sequence[Path] | None = None,
        driver: ProgramFinder | None = None,
    ) -> None:
        self._providers: dict[str, Provider] = {p.name: p for p in BUILTIN_PROVIDERS}
        for entry in extra:
            if not PROVIDER_NAME.fullmatch(entry.name):
                raise ConfigError(
                    f"provider name {entry.name!r} must match {PROVIDER_NAME.pattern} "
                    "(lower-case letters, digits, - and _)",
                    provider=entry.name,
                )
            self._providers[entry.name] = Provider(
                entry.name,
                entry.title or entry.name,
                entry.command,
                entry.install_hint or f"install `{entry.command[0]}` and put it on PATH",
            )
        self._finder = driver if driver is not None else HostPrograms(search_path, extra_bin_dirs)

    def names(self) -> list[str]:
        """Return every provider name, built-in ones first."""
        return list(self._providers)

    def statuses(self) -> list[ProviderStatus]:
        """Return every provider with its availability, looked up now (installs show at once)."""
        return [self._status(p) for p in self._providers.values()]

    def get(self, name: str) -> ProviderStatus:
        """Return the provider called ``name``; raise Unprocessable (422) if there is none."""
        provider = self._providers.get(name) if PROVIDER_NAME.fullmatch(name) else None
        if provider is None:
            raise Unprocessable(
                f"no provider named {name!r}; choose one of: {', '.join(self._providers)}",
                provider=name,
            )
        return self._status(provider)

    def _status(self, provider: Provider) -> ProviderStatus:
        answer = self._finder.can_run(provider.command)
        if isinstance(answer, str):
            hint = provider.install_hint if answer == NOT_FOUND else answer
            return ProviderStatus(provider, False, None, hint)
        return ProviderStatus(provider, True, answer[0], None, answer)
