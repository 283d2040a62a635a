"""This host's part in starting the cluster: its token file, its slots, running ``ray start``.

The I/O behind ``remotecli cluster head|join|status``; the values come from
:mod:`remotecli.cluster.nodes`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from remotecli.cluster.actor import HOST_NAME_VARIABLE
from remotecli.cluster.nodes import ray_environment, session_slots
from remotecli.cluster.ray_tls import export_tls, tls_environment
from remotecli.exceptions import ConfigError


def create_token(path: Path) -> bool:
    """Write a new random cluster token at ``path`` (mode 0600) unless one is there; True if new."""
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(32))
    return True


def host_slots(slots: int | None) -> int:
    """Return ``slots`` if given, else what this host's cores and memory allow."""
    if slots is not None:
        return slots
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return session_slots(os.cpu_count() or 1, memory)


def member_environment(token_file: Path, tls_dir: Path | None = None) -> dict[str, str]:
    """Ray's variables for a member of the cluster: its token and, with ``tls_dir`` (a host
    directory :func:`remotecli.cluster.ray_tls.issue` wrote), TLS on Ray's traffic.

    Raises :class:`ConfigError` naming what is missing.
    """
    if not token_file.is_file():
        raise ConfigError(f"no token at {token_file}: copy the head's token file to this host")
    env = ray_environment(token_file.resolve())
    if tls_dir is not None:
        env.update(tls_environment(tls_dir))
    return env


def use_token(token_file: Path, tls_dir: Path | None = None) -> None:
    """Make this process a token-holding member of the cluster (before ``ray.init``), over
    TLS with ``tls_dir``'s certificate when given (:func:`~remotecli.cluster.ray_tls.
    export_tls`: before Ray is imported, or ConfigError)."""
    if tls_dir is not None:
        export_tls(tls_dir)
    os.environ.update(member_environment(token_file))


def run_ray_start(
    argv: list[str], token_file: Path, name: str | None, tls_dir: Path | None = None
) -> int:
    """Run ``ray start`` (``argv`` from :func:`ray_start_argv`) with the token (and TLS with
    ``tls_dir``); its exit status."""
    env = dict(os.environ, **member_environment(token_file, tls_dir))
    if name is not None:
        env[HOST_NAME_VARIABLE] = name
    ray = Path(sys.executable).parent / "ray"
    command = [str(ray) if ray.exists() else "ray", *argv[1:]]
    return subprocess.run(command, env=env, check=False).returncode
