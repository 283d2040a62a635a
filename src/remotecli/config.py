"""Configuration values for every role, and the one place the environment is read.

Each role has a frozen dataclass that its command-line command fills in and hands to the role
(`remotecli gateway` builds a :class:`GatewayConfig` and calls :func:`remotecli.gateway.run`).
Environment variables are read here and nowhere else; every one of them is listed in
``docs/gateway.md`` (gateway) or the page of the role that owns it.
"""

from __future__ import annotations

import base64
import binascii
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.exceptions import ConfigError
from remotecli.hosts import allowed_host_name
from remotecli.run_formats import RUN_FORMATS

# --- gateway -----------------------------------------------------------------------------------

GATEWAY_ENV_PREFIX = "REMOTECLI_GATEWAY_"


@dataclass(frozen=True)
class Route:
    """Requests whose path starts with ``prefix`` go to ``upstream``; the longest prefix wins."""

    prefix: str  # "/api/"
    upstream: str  # "http://127.0.0.1:4000" or "unix:/path/to.sock"


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `remotecli gateway` needs; build it with the CLI or directly in tests."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)  # port 0 = ephemeral
    routes: tuple[Route, ...] = ()
    connect_timeout: float = 5.0
    response_head_timeout: float = 30.0
    handshake_timeout: float = 10.0  # the request head must arrive within it (slowloris)
    idle_timeout: float | None = None  # tunnels; None = never (TCP keepalive on)
    max_header_bytes: int = 16 * 1024
    max_connections: int = 10_000
    trusted_proxies: tuple[str, ...] = ()  # CIDRs
    host_rewrite: str | None = None  # None = keep the client's Host
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_grace: float = 10.0
    metrics_listen: tuple[str, int] | None = None
    log_format: str = "console"
    log_level: str = "info"
    # Host names answered besides the defaults (listen address, loopback; see remotecli.hosts);
    # "*" = any. None = no Host check at all: in-process use only, the commands always pass one.
    allowed_hosts: tuple[str, ...] | None = None


def gateway_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the ``REMOTECLI_GATEWAY_*`` variables as click option defaults (``LISTEN`` → listen).

    The CLI passes the result as ``default_map`` so a flag given on the command line still wins;
    repeatable options (``ROUTE``, ``TRUSTED_PROXY``) take a space-separated list.
    """
    source = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name, value in source.items():
        if name.startswith(GATEWAY_ENV_PREFIX):
            values[name.removeprefix(GATEWAY_ENV_PREFIX).lower()] = value
    return values


# --- controller --------------------------------------------------------------------------------
# (owned by the controller)

CONTROLLER_ENV = {
    "REMOTECLI_LISTEN": "listen",
    "REMOTECLI_DATA_DIR": "data_dir",
    "REMOTECLI_STORE_URL": "store_url",
    "REMOTECLI_DRIVER": "driver",
    "REMOTECLI_CLUSTER_ADDRESS": "cluster_address",
    "REMOTECLI_CLUSTER_TOKEN_FILE": "cluster_token_file",
    "REMOTECLI_CLUSTER_CHANNEL_TLS": "cluster_channel_tls",
    "REMOTECLI_CLUSTER_HOST_DRIVER": "cluster_host_driver",
    "REMOTECLI_CLUSTER_TLS_DIR": "cluster_tls_dir",
    "REMOTECLI_SESSION_TTL": "session_ttl",
    "REMOTECLI_IDLE_STOP": "idle_stop",
    "REMOTECLI_HIBERNATE_AFTER": "hibernate_after",
    "REMOTECLI_MAX_SESSIONS": "max_sessions",
    "REMOTECLI_MAX_SESSIONS_PER_USER": "max_sessions_per_user",
    "REMOTECLI_ALLOWED_ORIGINS": "allowed_origins",
    "REMOTECLI_TRUSTED_PROXIES": "trusted_proxies",
    "REMOTECLI_ALLOWED_HOSTS": "allowed_hosts",
    "REMOTECLI_CREATE_RATE": "create_rate",
    "REMOTECLI_MAX_RUNS_PER_USER": "max_runs_per_user",
    "REMOTECLI_MAX_RUNS": "max_runs",
    "REMOTECLI_RUN_TIMEOUT": "run_timeout",
    "REMOTECLI_QUOTA_PERIOD": "quota_period",
    "REMOTECLI_RUNS_PER_PERIOD": "runs_per_period",
    "REMOTECLI_TOKENS_PER_PERIOD": "tokens_per_period",
    "REMOTECLI_LOG_FORMAT": "log_format",
    "REMOTECLI_LOG_LEVEL": "log_level",
    "REMOTECLI_SESSION_MEMORY": "session_memory",
    "REMOTECLI_SESSION_PROCESSES": "session_processes",
    "REMOTECLI_SESSION_CPUS": "session_cpus",
    "REMOTECLI_SESSION_HOME_SIZE": "session_home_size",
    "REMOTECLI_EGRESS": "egress",
    "REMOTECLI_QEMU_MEMORY": "qemu_memory",
    "REMOTECLI_QEMU_ACCELERATOR": "qemu_accelerator",
    "REMOTECLI_QEMU_POOL_SIZE": "qemu_pool_size",
    "REMOTECLI_QEMU_TCG_CACHE": "qemu_tcg_cache",
    "REMOTECLI_ON_SHUTDOWN": "on_shutdown",
    "REMOTECLI_CONTROLLER_TAKEOVER_AFTER": "controller_takeover_after",
    "REMOTECLI_METRICS_LISTEN": "metrics_listen",
    "REMOTECLI_KEEP_ENDED_SESSIONS": "keep_ended_sessions",
    "REMOTECLI_GC_INTERVAL": "gc_interval",
}
"""Environment variable → ControllerConfig field (docs/configuration.md lists each)."""

DRIVER_NAMES = ("local", "qemu", "cluster")
"""Every session driver, the default first (``remotecli.drivers.create_driver`` builds them)."""

QEMU_ACCELERATORS = ("auto", "kvm", "tcg")

CONTROLLER_TOKEN_ENV = "REMOTECLI_TOKEN"  # noqa: S105 (a variable name, not a secret)
CONTROLLER_SECRET_KEY_ENV = "REMOTECLI_SECRET_KEY"  # noqa: S105 (a variable name)
CONTROLLER_METRICS_TOKEN_ENV = "REMOTECLI_METRICS_TOKEN"  # noqa: S105 (a variable name)
ON_SHUTDOWN_CHOICES = ("stop", "keep")

CONTROLLER_HEARTBEAT = 5.0
"""Seconds between two heartbeats of a controller in the store (docs/cluster.md)."""
SECRET_KEY_BYTES = 32  # AES-256
CONTROLLER_CONFIG_ENV = "REMOTECLI_CONFIG"


@dataclass(frozen=True)
class ProviderConfig:
    """A provider declared in the TOML file: a name and the argv its terminal runs."""

    name: str
    command: tuple[str, ...]
    title: str = ""
    install_hint: str = ""
    keep: tuple[str, ...] = ()
    """Paths under HOME, written ``~/...``, that hold the provider's sign-in (see
    :func:`keep_entry_problem`); kept between sessions."""
    run: tuple[str, ...] = ()
    """The argv of a headless run; an argument holding :data:`PROMPT_FIELD` gets the prompt."""
    run_format: str = "text"
    """What the headless command prints: one of :data:`RUN_FORMATS`."""


PROMPT_FIELD = "{prompt}"
"""In a provider's ``run`` argv: where the prompt goes (within one argument, never split)."""
QUOTA_PERIODS = ("month", "day", "week")


def keep_entry_problem(entry: object) -> str | None:
    """Say what is wrong with one ``keep`` entry, or return None when it is a path under HOME.

    An entry is ``~/`` followed by one or more names, none empty, ``.`` or ``..``.
    """
    if not isinstance(entry, str):
        return "must be a string such as ~/.tool/credentials.json"
    if not entry.startswith("~/"):
        return "must start with ~/ (a path under the session's HOME)"
    if "\0" in entry:
        return "must not contain a NUL character"
    parts = entry[2:].split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "must name a file or directory under HOME: no empty, . or .. parts"
    return None


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_DATA_HOME/remotecli``, or ``~/.local/share/remotecli`` without it."""
    source = os.environ if environ is None else environ
    xdg = source.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path(source.get("HOME", str(Path.home()))) / ".local" / "share"
    return base / "remotecli"


@dataclass(frozen=True)
class ControllerConfig:
    """Everything `remotecli up` and `remotecli controller` need; build it with
    :func:`load_controller_config` or directly in tests."""

    listen: tuple[str, int] = ("127.0.0.1", 8080)
    data_dir: Path = field(default_factory=default_data_dir)
    # A PostgreSQL database several controllers share (docs/postgresql.md); None = the SQLite file
    # DATA_DIR/remotecli.sqlite3. Its password may be in it: never shown.
    store_url: str | None = field(default=None, repr=False)
    driver: str = "local"
    # driver cluster: the Ray head's GCS address (HEAD:6379) and the cluster's token file
    cluster_address: str | None = None
    cluster_token_file: Path | None = None
    # the session channel (bridge to host) with TLS, each session's certificate pinned; off only
    # when the hosts' network is private (docs/cluster.md, "The session channel")
    cluster_channel_tls: bool = True
    # driver cluster: what the hosts run sessions with, local (sandbox) | qemu (microVMs); a
    # session goes only to a host that joined with that driver (`cluster join --driver`)
    cluster_host_driver: str = "local"
    # driver cluster: this controller's directory from `cluster tls-cert` when the cluster's
    # Ray traffic is encrypted (every host joined with --tls-dir); None: plain
    cluster_tls_dir: Path | None = None
    session_ttl: float = 3600.0  # seconds a session may live; 0 = forever
    idle_stop: float = 1800.0  # seconds without a viewer before a ready session stops; 0 = never
    # seconds without a viewer before a ready session is hibernated (saved to disk, no process),
    # when its driver can (qemu); 0 = never
    hibernate_after: float = 600.0
    max_sessions: int = 20  # active sessions on this host (503 past it)
    max_sessions_per_user: int = 10  # active sessions per user (429 past it)
    allowed_origins: tuple[str, ...] = ()  # extra origins allowed to open WebSockets by cookie
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-* the gateway believes
    providers: tuple[ProviderConfig, ...] = ()
    admin_token: str | None = field(default=None, repr=False)  # from REMOTECLI_TOKEN
    # Sign-ins' key, base64 or hex of 32 bytes; None = DATA_DIR/secret.key (docs/signins.md)
    secret_key: str | None = field(default=None, repr=False)  # from REMOTECLI_SECRET_KEY
    session_memory: int = 2 * 1024**3  # bytes of memory per local session (cgroup)
    session_processes: int = 1024  # processes and threads per local session
    session_cpus: float = 1.0  # CPUs a local session may use at most; 0 = no cap
    session_home_size: int = 1024**3  # bytes of HOME (a tmpfs, counted in the memory too)
    egress: str = "open"  # a session's internet: open (never the host, private ranges) | none
    qemu_memory: int = 256 * 1024**2  # bytes of guest RAM per microVM
    qemu_accelerator: str = "auto"  # kvm | tcg | auto (probe KVM once per host, remembered)
    qemu_pool_size: int = 0  # microVMs per template kept restored and warm ahead of sessions
    qemu_tcg_cache: int = 16 * 1024**2  # bytes of translated code per microVM under TCG
    reap_interval: float = 15.0
    log_format: str = "console"
    log_level: str = "info"
    tls_cert: str | None = None
    tls_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names answered besides the defaults; "*" = any
    create_rate: tuple[int, float] | None = (10, 30.0)  # N creations per S seconds per user
    # stop: end every session on shutdown; keep: leave those the driver can take back (qemu)
    on_shutdown: str = "stop"
    # Several controllers, cluster driver: seconds without another controller's heartbeat
    # before this one takes over its sessions; 0 = never (docs/cluster.md)
    controller_takeover_after: float = 30.0
    # /metrics and /readyz's details: bearer token (REMOTECLI_METRICS_TOKEN), a listener apart
    metrics_token: str | None = field(default=None, repr=False)
    metrics_listen: tuple[str, int] | None = None
    keep_ended_sessions: float = 30 * 86400.0  # seconds ended sessions are kept; 0 = forever
    gc_interval: float = 86400.0  # seconds between automatic clean-ups (remotecli gc); 0 = never
    # Headless runs (POST /api/runs): how many at once, per user and on this host, how long one
    # may take at most (and by default), and each user's quota per period (0 = no quota).
    max_runs_per_user: int = 2  # runs at once per user (429 past it)
    max_runs: int = 10  # runs at once on this host (503 past it)
    run_timeout: float = 600.0  # seconds: the default and the largest timeout_s a run may ask
    quota_period: str = "month"  # month | week | day (calendar, UTC)
    runs_per_period: int = 500  # runs a user may start per period; 0 = no quota
    tokens_per_period: int = 0  # input + output tokens a user may use per period; 0 = no quota


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:8080`` for IPv6); raise ConfigError naming the value."""
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"listen address {value!r} is not HOST:PORT; write e.g. 127.0.0.1:8080 or [::1]:8080",
            value=value,
        )
    return host, int(port)


STORE_URL_SCHEMES = ("postgresql", "postgres")
"""What a ``store_url`` may start with (``SCHEME://``): PostgreSQL's URLs, as libpq reads them."""


def parse_store_url(value: object) -> str | None:
    """Check a ``store_url`` is a PostgreSQL URL (empty: None, the SQLite default)."""
    text = str(value).strip()
    if not text:
        return None
    scheme, sep, _ = text.partition("://")
    if not sep or scheme not in STORE_URL_SCHEMES:
        raise ConfigError(
            f"store_url starts with {scheme + sep if sep else text[:12]!r}; write "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE, or leave it out for the SQLite file "
            "in the data dir",
            name="store_url",
        )
    return text


def parse_switch(value: object, name: str) -> bool:
    """Parse on or off: a boolean, or ``true``/``false``, ``on``/``off``, ``yes``/``no``, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "on", "yes"):
        return True
    if text in ("0", "false", "off", "no"):
        return False
    raise ConfigError(f"{name} = {value!r} is not on or off; write true or false", name=name)


def parse_duration(value: object, name: str) -> float:
    """Parse seconds given as a number or as ``90s``, ``30m``, ``1h``; 0 disables."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
        scale = units.get(text[-1:], 1.0)
        number = text[:-1] if text[-1:] in units else text
        try:
            seconds = float(number) * scale
        except ValueError:
            raise ConfigError(
                f"{name} = {value!r} is not a duration; write seconds or e.g. 90s, 30m, 1h",
                name=name,
            ) from None
    if seconds < 0:
        raise ConfigError(f"{name} = {value!r} is negative; use 0 to disable it", name=name)
    return seconds


def parse_rate(value: object, name: str) -> tuple[int, float] | None:
    """Parse ``N/PERIOD`` (``10/30s``, ``20/min``, ``100/1h``) as (N, seconds); ``off`` is None.

    N is the burst a user may spend at once; the allowance refills at N per PERIOD.
    """
    text = str(value).strip().lower()
    if text in ("off", "none", "0", "unlimited"):
        return None
    count, slash, period = text.partition("/")
    period = {"s": "1s", "m": "1m", "min": "1m", "h": "1h", "hour": "1h"}.get(period, period)
    try:
        burst = int(count)
        seconds = parse_duration(period, name) if slash else 0.0
    except (ValueError, ConfigError):
        burst, seconds = 0, 0.0
    if burst < 1 or seconds <= 0:
        raise ConfigError(
            f"{name} = {value!r} is not a rate; write N/PERIOD such as 10/30s, 20/min or "
            "100/1h (N at once, refilled at N per PERIOD), or off",
            name=name,
        )
    return burst, seconds


def _parse_count(value: object, name: str, minimum: int = 1) -> int:
    try:
        count = int(str(value))
    except ValueError:
        raise ConfigError(f"{name} = {value!r} is not a whole number", name=name) from None
    if count < minimum:
        raise ConfigError(f"{name} = {value!r} must be at least {minimum}", name=name)
    return count


def _parse_size(value: object, name: str) -> int:
    """Parse a size such as ``2G``, ``512MiB`` or a number of bytes; at least 16 MiB."""
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in ("K", "M", "G", "T") else text
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise ConfigError(
            f"{name} = {value!r} is not a size; write e.g. 2G or 512M", name=name
        ) from None
    if size < 16 * 1024**2:
        raise ConfigError(f"{name} = {value!r} is too small; give at least 16M", name=name)
    return size


def _parse_cpus(value: object, name: str) -> float:
    try:
        cpus = float(str(value))
    except ValueError:
        raise ConfigError(
            f"{name} = {value!r} is not a number of CPUs, e.g. 1 or 0.5", name=name
        ) from None
    if cpus < 0:
        raise ConfigError(f"{name} = {value!r} is negative; 0 means no cap", name=name)
    return cpus


def _parse_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ConfigError(f"{name} = {value!r} is unknown; choose one of: {', '.join(choices)}")
    return text


def _parse_list(value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return tuple(v.strip() for v in str(value).replace(",", " ").split() if v.strip())


def _parse_providers(value: object) -> tuple[ProviderConfig, ...]:
    if not isinstance(value, dict):
        raise ConfigError(
            '[providers] must be a table of tables, e.g. [providers.aider] command = ["aider"]'
        )
    providers = []
    for name, entry in value.items():
        command = entry.get("command") if isinstance(entry, dict) else None
        if isinstance(command, str):
            command = command.split()
        if not isinstance(command, list) or not command:
            raise ConfigError(
                f'provider {name!r} needs command = ["program", "arg", ...]', provider=name
            )
        run, run_format = _parse_run(str(name), entry.get("run", []), entry.get("run_format"))
        providers.append(
            ProviderConfig(
                name=str(name),
                command=tuple(str(c) for c in command),
                title=str(entry.get("title", "")),
                install_hint=str(entry.get("install_hint", "")),
                keep=_parse_keep(str(name), entry.get("keep", [])),
                run=run,
                run_format=run_format,
            )
        )
    return tuple(providers)


def _parse_run(name: str, run: object, run_format: object) -> tuple[tuple[str, ...], str]:
    """Check a provider's ``run`` argv and ``run_format``; ConfigError says what to write."""
    example = f'run = ["tool", "--print", "{PROMPT_FIELD}"]'
    if not isinstance(run, list) or not all(isinstance(a, str) and "\0" not in a for a in run):
        raise ConfigError(f"provider {name!r}: run must be a list of strings, e.g. {example}")
    if run and (PROMPT_FIELD in run[0] or not any(PROMPT_FIELD in a for a in run[1:])):
        raise ConfigError(
            f"provider {name!r}: run needs an argument holding {PROMPT_FIELD} (after the "
            f"program), where the prompt goes, e.g. {example}",
            provider=name,
        )
    if run_format is None:
        return tuple(run), "text"
    if run_format not in RUN_FORMATS:
        raise ConfigError(
            f"provider {name!r}: run_format = {run_format!r} is unknown; choose one of: "
            f"{', '.join(RUN_FORMATS)}",
            provider=name,
        )
    if not run:
        raise ConfigError(f"provider {name!r}: run_format needs run, e.g. {example}")
    return tuple(run), str(run_format)


def _parse_keep(name: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            f'provider {name!r}: keep must be a list, e.g. keep = ["~/.tool/auth.json"]',
            provider=name,
        )
    for entry in value:
        problem = keep_entry_problem(entry)
        if problem is not None:
            raise ConfigError(f"provider {name!r}: keep entry {entry!r} {problem}", provider=name)
    return tuple(value)


def _parse_takeover_after(value: object) -> float:
    """0, or at least three heartbeats: one late heartbeat must not look like a lost controller."""
    seconds = parse_duration(value, "controller_takeover_after")
    if 0 < seconds < 3 * CONTROLLER_HEARTBEAT:
        raise ConfigError(
            f"controller_takeover_after = {value!r} is shorter than three heartbeats "
            f"({3 * CONTROLLER_HEARTBEAT:g}s), so a controller merely slow would lose its "
            "sessions; write 0 (never take over) or at least "
            f"{3 * CONTROLLER_HEARTBEAT:g}s",
            name="controller_takeover_after",
        )
    return seconds


_CONTROLLER_PARSERS: dict[str, Callable[[object], object]] = {
    "listen": lambda v: v if isinstance(v, tuple) else parse_listen(str(v)),
    "data_dir": lambda v: Path(str(v)).expanduser(),
    "store_url": parse_store_url,
    "driver": str,
    "cluster_address": str,
    "cluster_token_file": lambda v: Path(str(v)).expanduser(),
    "cluster_channel_tls": lambda v: parse_switch(v, "cluster_channel_tls"),
    "cluster_tls_dir": lambda v: Path(str(v)).expanduser(),
    "cluster_host_driver": lambda v: _parse_choice(v, "cluster_host_driver", ("local", "qemu")),
    "session_ttl": lambda v: parse_duration(v, "session_ttl"),
    "idle_stop": lambda v: parse_duration(v, "idle_stop"),
    "hibernate_after": lambda v: parse_duration(v, "hibernate_after"),
    "reap_interval": lambda v: parse_duration(v, "reap_interval"),
    "max_sessions": lambda v: _parse_count(v, "max_sessions"),
    "max_sessions_per_user": lambda v: _parse_count(v, "max_sessions_per_user"),
    "allowed_origins": _parse_list,
    "trusted_proxies": _parse_list,
    "providers": _parse_providers,
    "allowed_hosts": lambda v: tuple(allowed_host_name(h) for h in _parse_list(v)),
    "create_rate": lambda v: parse_rate(v, "create_rate"),
    "session_memory": lambda v: _parse_size(v, "session_memory"),
    "session_processes": lambda v: _parse_count(v, "session_processes"),
    "session_cpus": lambda v: _parse_cpus(v, "session_cpus"),
    "session_home_size": lambda v: _parse_size(v, "session_home_size"),
    "egress": lambda v: _parse_choice(v, "egress", ("open", "none")),
    "qemu_memory": lambda v: _parse_size(v, "qemu_memory"),
    "qemu_accelerator": lambda v: _parse_choice(v, "qemu_accelerator", QEMU_ACCELERATORS),
    "qemu_pool_size": lambda v: _parse_count(v, "qemu_pool_size", minimum=0),
    "qemu_tcg_cache": lambda v: _parse_size(v, "qemu_tcg_cache"),
    "log_format": lambda v: _parse_choice(v, "log_format", ("console", "json")),
    "log_level": lambda v: _parse_choice(v, "log_level", ("debug", "info", "warning", "error")),
    "tls_cert": str,
    "tls_key": str,
    "on_shutdown": lambda v: _parse_choice(v, "on_shutdown", ON_SHUTDOWN_CHOICES),
    "controller_takeover_after": _parse_takeover_after,
    "metrics_listen": lambda v: v if isinstance(v, tuple) else parse_listen(str(v)),
    "keep_ended_sessions": lambda v: parse_duration(v, "keep_ended_sessions"),
    "gc_interval": lambda v: parse_duration(v, "gc_interval"),
    "max_runs_per_user": lambda v: _parse_count(v, "max_runs_per_user"),
    "max_runs": lambda v: _parse_count(v, "max_runs"),
    "run_timeout": lambda v: _positive(parse_duration(v, "run_timeout"), "run_timeout"),
    "quota_period": lambda v: _parse_choice(v, "quota_period", QUOTA_PERIODS),
    "runs_per_period": lambda v: _parse_count(v, "runs_per_period", minimum=0),
    "tokens_per_period": lambda v: _parse_count(v, "tokens_per_period", minimum=0),
}


def _positive(seconds: float, name: str) -> float:
    if seconds <= 0:
        raise ConfigError(f"{name} must be more than 0 seconds", name=name)
    return seconds


def _read_toml(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    section = document.get("controller", {})
    if not isinstance(section, dict):
        raise ConfigError(f"[controller] in {path} must be a table")
    values: dict[str, object] = dict(section)
    if "providers" in document:
        values["providers"] = document["providers"]
    return values


def load_controller_config(
    flags: Mapping[str, object | None],
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> ControllerConfig:
    """Merge defaults < TOML file < ``REMOTECLI_*`` environment < flags into a ControllerConfig.

    ``flags`` maps field names to values, None meaning "not given". The file is ``config_file``,
    else ``$REMOTECLI_CONFIG``; its keys live under ``[controller]`` and ``[providers.NAME]``.
    Raises :class:`ConfigError` naming the bad key and what to write instead.
    """
    source = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    path = config_file or (
        Path(source[CONTROLLER_CONFIG_ENV]) if source.get(CONTROLLER_CONFIG_ENV) else None
    )
    if path is not None:
        raw.update(_read_toml(path))
    for variable, name in CONTROLLER_ENV.items():
        if source.get(variable):
            raw[name] = source[variable]
    raw.update({k: v for k, v in flags.items() if v is not None})
    values: dict[str, object] = {}
    for name, value in raw.items():
        parser = _CONTROLLER_PARSERS.get(name)
        if parser is None:
            known = ", ".join(sorted(_CONTROLLER_PARSERS))
            raise ConfigError(f"unknown controller setting {name!r}; known settings: {known}")
        values[name] = parser(value)
    if values.get("driver", DRIVER_NAMES[0]) not in DRIVER_NAMES:
        raise ConfigError(
            f"driver {values['driver']!r} is unknown; choose {' or '.join(DRIVER_NAMES)}"
        )
    token = source.get(CONTROLLER_TOKEN_ENV) or None
    if token is not None and len(token) < 16:
        raise ConfigError(f"{CONTROLLER_TOKEN_ENV} is too short; use at least 16 random characters")
    secret_key = source.get(CONTROLLER_SECRET_KEY_ENV, "").strip() or None
    if secret_key is not None:
        parse_secret_key(secret_key, CONTROLLER_SECRET_KEY_ENV)
    values["secret_key"] = secret_key
    metrics_token = source.get(CONTROLLER_METRICS_TOKEN_ENV, "").strip() or None
    if metrics_token is not None and len(metrics_token) < 16:
        raise ConfigError(
            f"{CONTROLLER_METRICS_TOKEN_ENV} is too short; use at least 16 random characters"
        )
    values["metrics_token"] = metrics_token
    return ControllerConfig(admin_token=token, **values)  # type: ignore[arg-type]


def parse_secret_key(text: str, source: str) -> bytes:
    """Decode a sign-in key written as base64 or hex of 32 bytes; ConfigError naming ``source``."""
    value = text.strip()
    try:
        if len(value) == 2 * SECRET_KEY_BYTES:
            key = bytes.fromhex(value)
        else:
            padded = value + "=" * (-len(value) % 4)
            key = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (ValueError, binascii.Error):
        key = b""
    if len(key) != SECRET_KEY_BYTES:
        raise ConfigError(
            f"{source} is not a key: write base64 or hex of {SECRET_KEY_BYTES} random bytes, "
            "e.g. the output of `remotecli secret new-key`",
            source=source,
        )
    return key


# --- dashboard ---------------------------------------------------------------------------------
NOVNC_DIR_ENV = "REMOTECLI_NOVNC_DIR"


def novnc_dir_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """Return ``REMOTECLI_NOVNC_DIR`` (noVNC's npm package directory), or None when unset.

    Unset, the dashboard looks for ``node_modules/@novnc/novnc`` above its own source files.
    """
    source = os.environ if environ is None else environ
    value = source.get(NOVNC_DIR_ENV, "").strip()
    return value or None
