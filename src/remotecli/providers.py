"""The provider catalogue: which command-line tools a session can run, and whether each is here.

Four providers are built in (``shell``, ``claude-code``, ``codex``, ``gemini-cli``); the TOML
file adds more under ``[providers.NAME]``. A provider is *available* when its program is found
on ``PATH`` or in the project's ``node_modules/.bin`` (where ``npm install`` puts the CLIs);
otherwise it is listed with a hint that says how to install it, and starting it is refused
with 422 carrying that hint.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


BUILTIN_PROVIDERS = (
    Provider("shell", "Shell (bash)", ("bash", "-l"), "install bash with your system's packages"),
    Provider(
        "claude-code",
        "Claude Code",
        ("claude",),
        "install it with `npm install -g @anthropic-ai/claude-code`",
    ),
    Provider("codex", "Codex CLI", ("codex",), "install it with `npm install -g @openai/codex`"),
    Provider(
        "gemini-cli",
        "Gemini CLI",
        ("gemini",),
        "install it with `npm install -g @google/gemini-cli`",
    ),
)


@dataclass(frozen=True)
class ProviderStatus:
    """A provider and whether its program is installed here."""

    provider: Provider
    available: bool
    program: str | None
    """The absolute path of the program when available."""
    hint: str | None
    """How to install it, when not available."""

    @property
    def name(self) -> str:
        return self.provider.name

    def argv(self) -> list[str]:
        """Return the argv to run, with the program resolved to its absolute path."""
        if self.program is None:
            raise Unprocessable(
                f"provider {self.name!r} is not installed: {self.hint}", provider=self.name
            )
        return [self.program, *self.provider.command[1:]]


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


class Catalogue:
    """The providers of this controller; look one up by name before starting a session."""

    def __init__(
        self,
        extra: Iterable[ProviderConfig] = (),
        *,
        search_path: str | None = None,
        extra_bin_dirs: Sequence[Path] | None = None,
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
        path = search_path if search_path is not None else os.environ.get("PATH", os.defpath)
        bins = project_bin_dirs() if extra_bin_dirs is None else list(extra_bin_dirs)
        self._path = os.pathsep.join([path, *(str(b) for b in bins)])

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
        program = shutil.which(provider.command[0], path=self._path)
        if program is None:
            return ProviderStatus(provider, False, None, provider.install_hint)
        return ProviderStatus(provider, True, os.path.abspath(program), None)
