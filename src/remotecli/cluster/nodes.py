"""How a host joins the Ray cluster: its session slots and its ``ray start`` command line.

Pure: these functions compute values and argv, they start nothing. ``remotecli cluster head``
and ``remotecli cluster join`` run the argv they return with the environment of
:func:`ray_environment` (token authentication on, usage statistics off).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import ConfigError

SLOT_RESOURCE = "remotecli_session_slot"
"""The custom Ray resource each host offers, one unit per session it may run."""

SESSIONS_PER_CORE = 2
"""A CLI session mostly waits on its user; two per core keep a host responsive."""

SESSION_MEMORY = 1 << 30
"""Memory set aside for one session (the local driver's cgroup limit is of this order)."""

HOST_RESERVE = 2 << 30
"""Memory kept for the host itself and its Ray processes (measured ~0.3-0.5 GiB per node)."""

OBJECT_STORE_BYTES = 80 * (1 << 20)
"""Sessions put nothing in Ray's object store; Ray's minimum is 75 MiB."""

HEALTH_CHECK = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
"""The GCS's node health checks, tuned: a silent host is declared dead within ~5 s
(docs/cluster.md has the measured bound; Ray's defaults are 5000/3000/10000/5)."""

GCS_PORT = 6379

HOST_LABEL = "remotecli-host"
"""The Ray node label that carries a host's name (``--name``), so the controller can name
hosts that run no session yet (:mod:`remotecli.cluster.hosts`)."""

DRIVER_LABEL = "remotecli-driver"
"""The Ray node label that says what a host runs its sessions with: ``local`` (the local
sandbox) or ``qemu`` (microVMs); a session asks for the value its controller's
``cluster_host_driver`` names (Ray's label selector), so it lands only on such a host."""

HOST_NAME_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
"""What Ray accepts as a label value: 1-63 letters, digits, ``-``, ``_``, ``.``, alphanumeric
at both ends."""


def check_host_name(name: str) -> str:
    """Return ``name`` if Ray can label a node with it; ConfigError naming the rule otherwise."""
    if HOST_NAME_PATTERN.fullmatch(name) is None:
        raise ConfigError(
            f"the host name {name!r} cannot label a Ray node: use 1-63 letters, digits, '-', "
            "'_' or '.', starting and ending with a letter or digit"
        )
    return name


def session_slots(cores: int, memory_bytes: int) -> int:
    """Return how many sessions a host with ``cores`` CPUs and ``memory_bytes`` of RAM offers."""
    by_cores = cores * SESSIONS_PER_CORE
    by_memory = max(0, memory_bytes - HOST_RESERVE) // SESSION_MEMORY
    return max(0, min(by_cores, by_memory))


@dataclass(frozen=True)
class NodeSettings:
    """What one host's ``ray start`` is given besides its addresses."""

    slots: int
    system_config: Mapping[str, int] | None = None  # the head's only; Ray hands it to the rest
    include_dashboard: bool = False
    name: str | None = None
    """The host's name, carried as the node label :data:`HOST_LABEL`; None: no label."""
    driver: str = "local"
    """What the host runs sessions with, carried as the node label :data:`DRIVER_LABEL`."""


def ray_start_argv(
    settings: NodeSettings,
    *,
    head_address: str | None,
    node_ip: str,
    temp_dir: Path | None = None,
    block: bool = False,
) -> list[str]:
    """Return ``ray start`` for a head (``head_address`` None) or a node joining that head.

    Every node gets zero CPUs for Ray's own scheduling (a session actor asks for none) and
    ``slots`` units of :data:`SLOT_RESOURCE`; the dashboard is off unless asked for. Its
    driver is the label :data:`DRIVER_LABEL`; a named host carries its name as the label
    :data:`HOST_LABEL` (ConfigError for a name Ray would refuse, see :func:`check_host_name`).
    """
    argv = ["ray", "start", f"--node-ip-address={node_ip}", "--num-cpus=0", "--num-gpus=0"]
    argv += [f"--resources={json.dumps({SLOT_RESOURCE: settings.slots})}"]
    labels = [f"{DRIVER_LABEL}={settings.driver}"]
    if settings.name is not None:
        labels.append(f"{HOST_LABEL}={check_host_name(settings.name)}")
    argv += [f"--labels={','.join(labels)}"]
    argv += [f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
    if head_address is None:
        argv += ["--head", f"--port={GCS_PORT}"]
        argv += [f"--include-dashboard={str(settings.include_dashboard).lower()}"]
        config = dict(HEALTH_CHECK if settings.system_config is None else settings.system_config)
        if config:
            argv += [f"--system-config={json.dumps(config)}"]
    else:
        argv += [f"--address={head_address}"]
    if temp_dir is not None:
        argv += [f"--temp-dir={temp_dir}"]
    if block:
        argv += ["--block"]
    return argv


def ray_environment(token_path: Path) -> dict[str, str]:
    """Return the variables every Ray process of the cluster needs (merge into os.environ)."""
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
