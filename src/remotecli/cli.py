"""The command line: ``remotecli up | gateway | controller | user | secret | image``.

Nothing else in the package reads ``sys.argv``. Each command turns its options into a
configuration value and hands it to the role that runs it; errors under
:class:`~remotecli.exceptions.RemoteCliError` are printed as one line naming the cause and the
next step, with exit status 2 for bad configuration and 1 otherwise.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from remotecli import __version__
from remotecli.config import (
    DRIVER_NAMES,
    GATEWAY_ENV_PREFIX,
    GatewayConfig,
    gateway_environment,
    load_controller_config,
    parse_listen,
)
from remotecli.exceptions import ConfigError, RemoteCliError
from remotecli.logs import LOG_FORMATS, LOG_LEVELS
from remotecli.providers import NPM_PROVIDERS


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="remotecli")
def cli() -> None:
    """Give people an isolated machine running a command-line tool, shown live in the browser.

    Start with `remotecli up`: it runs the gateway and the controller on this machine and prints
    the dashboard URL with a login token.
    """


# --- remotecli gateway -------------------------------------------------------------------------
# (owned by the gateway: src/remotecli/gateway/)

# REMOTECLI_GATEWAY_<NAME> sets an option's default; repeatable ones take a space-separated list.
_GATEWAY_LISTS = {
    "route": "routes",
    "trusted_proxy": "trusted_proxies",
    "allowed_host": "allowed_hosts",
}


class _GatewayCommand(click.Command):
    """`remotecli gateway`, with option defaults taken from REMOTECLI_GATEWAY_* variables."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        defaults: dict[str, object] = {}
        known = {param.name for param in self.params}
        for name, value in gateway_environment().items():
            if name not in known and name not in _GATEWAY_LISTS:
                raise ConfigError(
                    f"{GATEWAY_ENV_PREFIX}{name.upper()} is not a gateway option; "
                    "see `remotecli gateway --help` for the names"
                )
            if name in _GATEWAY_LISTS:
                defaults[_GATEWAY_LISTS[name]] = value.split()
            else:
                defaults[name] = value
        extra.setdefault("default_map", defaults)
        return super().make_context(info_name, args, parent, **extra)


@cli.command("gateway", cls=_GatewayCommand)
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to accept HTTP and WebSocket clients on; port 0 picks a free one.",
)
@click.option(
    "--route",
    "routes",
    multiple=True,
    metavar="PREFIX=UPSTREAM",
    help="Send paths starting with PREFIX to UPSTREAM (http://HOST:PORT or unix:/path). "
    "Repeat for more; the longest matching prefix wins; path and query go unchanged.",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to connect to an upstream before answering 504.",
)
@click.option(
    "--response-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds for an upstream's response head (or 101) to arrive before answering 504.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds for a client's request head to arrive (slowloris guard; 408 after it). "
    "Also how long an idle keep-alive connection is kept.",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds without traffic after which a WebSocket tunnel is closed "
    "[default: never; TCP keepalive detects dead peers].",
)
@click.option(
    "--max-header-bytes",
    type=click.IntRange(min=1024),
    default=16 * 1024,
    show_default=True,
    help="Largest request head accepted; bigger ones get 431.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Open client connections and tunnels allowed; the next one gets 503.",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="CIDR",
    help="Believe X-Forwarded-* and Forwarded from peers in this network (e.g. 10.0.0.0/8). "
    "Repeatable. From anyone else those headers are replaced.",
)
@click.option(
    "--host-rewrite",
    default=None,
    metavar="HOST",
    help="Send this Host header upstream [default: the client's Host].",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Also answer requests whose Host is NAME (repeatable); others get 421. Always "
    "answered: the listen address, localhost, 127.0.0.1, ::1, and on 0.0.0.0 or :: this "
    "machine's names and addresses. '*' turns the check off (unsafe: DNS rebinding).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM certificate (chain): serve https and wss on --listen. Needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="PEM private key of --tls-cert.",
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="On SIGTERM, seconds in-flight requests and tunnels get before they are closed.",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics [default: off].",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="console",
    show_default=True,
    help="One line per request or tunnel, as JSON or human-readable text.",
)
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS),
    default="info",
    show_default=True,
    help="Lowest level logged.",
)
def gateway_command(
    listen: str,
    routes: tuple[str, ...],
    connect_timeout: float,
    response_timeout: float,
    handshake_timeout: float,
    idle_timeout: float | None,
    max_header_bytes: int,
    max_connections: int,
    trusted_proxies: tuple[str, ...],
    host_rewrite: str | None,
    allowed_hosts: tuple[str, ...],
    tls_cert: str | None,
    tls_key: str | None,
    shutdown_grace: float,
    metrics_listen: str | None,
    log_format: str,
    log_level: str,
) -> None:
    """Run the edge reverse proxy for HTTP and WebSocket in front of one or more upstreams.

    Example: remotecli gateway --listen 0.0.0.0:8080 --route /=http://127.0.0.1:4000

    Every option can also be set with REMOTECLI_GATEWAY_<OPTION> (e.g.
    REMOTECLI_GATEWAY_CONNECT_TIMEOUT=2); see docs/gateway.md.
    """
    from remotecli.gateway import run
    from remotecli.routing import parse_route

    config = GatewayConfig(
        listen=parse_listen(listen),
        routes=tuple(parse_route(route) for route in routes),
        connect_timeout=connect_timeout,
        response_head_timeout=response_timeout,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        max_header_bytes=max_header_bytes,
        max_connections=max_connections,
        trusted_proxies=trusted_proxies,
        host_rewrite=host_rewrite,
        tls_cert=tls_cert,
        tls_key=tls_key,
        shutdown_grace=shutdown_grace,
        allowed_hosts=tuple(allowed_hosts),
        metrics_listen=parse_listen(metrics_listen) if metrics_listen else None,
        log_format=log_format,
        log_level=log_level,
    )
    if not config.routes:
        click.echo("warning: no --route given; only /healthz will answer", err=True)
    run(config)


# --- remotecli up / controller / user ------------------------------------------------------------
# (owned by the controller: src/remotecli/controller/)

_USER_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


def _controller_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options `up` and `controller` share; values left out come from env, file, defaults."""
    options = [
        click.option(
            "--listen",
            metavar="HOST:PORT",
            help="Where the gateway listens (default 127.0.0.1:8080; port 0 picks one).",
        ),
        click.option(
            "--data-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Store, tokens and sessions (default $XDG_DATA_HOME/remotecli).",
        ),
        click.option(
            "--driver",
            type=click.Choice(DRIVER_NAMES),
            help=(
                "Where sessions run: local sandboxes (default), qemu microVMs, or the hosts of a "
                "Ray cluster (needs cluster_address and cluster_token_file; docs/cluster.md)."
            ),
        ),
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="A TOML file with [controller] settings and [providers.NAME] tables.",
        ),
        click.option(
            "--allowed-host",
            "allowed_hosts",
            multiple=True,
            metavar="NAME",
            help="Also answer requests whose Host is NAME (repeatable; replaces "
            "REMOTECLI_ALLOWED_HOSTS); others get 421. '*' turns the check off (unsafe).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run_controller(
    listen: str | None,
    data_dir: Path | None,
    driver: str | None,
    config_file: Path | None,
    allowed_hosts: tuple[str, ...] = (),
) -> None:
    from remotecli.controller.server import run

    flags = {
        "listen": listen,
        "data_dir": data_dir,
        "driver": driver,
        "allowed_hosts": allowed_hosts or None,
    }
    config = load_controller_config(flags, config_file=config_file)

    def announce(url: str) -> None:
        click.echo(
            "remote-cli is running. To open the dashboard, visit this URL:\n\n"
            f"    {url}\n\n"
            "Ctrl-C (or SIGTERM) stops it and every session it started.",
        )
        sys.stdout.flush()

    run(config, announce)


@cli.command()
@_controller_options
def up(
    listen: str | None,
    data_dir: Path | None,
    driver: str | None,
    config_file: Path | None,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Run the gateway and the controller here; print the dashboard URL with a login token."""
    _run_controller(listen, data_dir, driver, config_file, allowed_hosts)


@cli.command()
@_controller_options
def controller(
    listen: str | None,
    data_dir: Path | None,
    driver: str | None,
    config_file: Path | None,
    allowed_hosts: tuple[str, ...],
) -> None:
    """Run the controller alone, for a gateway elsewhere (same options as `up`)."""
    _run_controller(listen, data_dir, driver, config_file, allowed_hosts)


@cli.group()
def user() -> None:
    """Manage the users who may log in: add, list, remove, and issue a new token.

    Safe while remote-cli runs: a removed user's token and browser logins stop working at
    once, and the running controller ends their sessions within a second.
    """


_DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The controller's data dir (default $XDG_DATA_HOME/remotecli).",
)
_CONFIG_OPTION = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="The TOML file the controller reads (for its data_dir).",
)
_EXPIRES_OPTION = click.option(
    "--expires",
    metavar="DURATION",
    default=None,
    help="The token stops working after this long (e.g. 12h, 30d) [default: never].",
)


def _check_user_name(name: str) -> None:
    from remotecli.controller.identity import ADMIN_USER

    if not _USER_NAME.fullmatch(name) or name == ADMIN_USER:
        raise ConfigError(
            f"user name {name!r} is not allowed: use 1-32 of a-z 0-9 _ . - starting with a "
            f"letter (and not {ADMIN_USER!r}, whose token is REMOTECLI_TOKEN or admin.token)"
        )


def _expiry(expires: str | None) -> float | None:
    import time

    from remotecli.config import parse_duration

    if expires is None:
        return None
    seconds = parse_duration(expires, "--expires")
    if seconds <= 0:
        raise ConfigError("--expires must be longer than 0; leave it out for a token that lasts")
    return time.time() + seconds


def _when(epoch: float | None, never: str = "never") -> str:
    from datetime import UTC, datetime

    if epoch is None:
        return never
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _login_url(data_dir: Path, listen: tuple[str, int], token: str) -> str | None:
    """The login URL of ``token``: the serving controller's address, else the configured one."""
    from remotecli.controller.server import URL_FILE

    try:
        base = (data_dir / "run" / URL_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        host, port = listen
        if port == 0:
            return None
        shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        base = f"http://{shown}:{port}"
    return f"{base}/login?token={token}"


def _show_token(
    data_dir: Path, listen: tuple[str, int], name: str, token: str, *, done: str, token_only: bool
) -> None:
    """Print ``token`` alone (``token_only``), or say ``done`` and print its login URL too."""
    if token_only:
        click.echo(token)
        return
    click.echo(done, err=True)
    url = _login_url(data_dir, listen, token)
    if url is not None:
        click.echo(f"Login URL for {name} (it holds the token: send it privately):\n\n    {url}\n")
    click.echo(f"Token for {name} (Authorization: Bearer): {token}")


_TOKEN_ONLY_OPTION = click.option(
    "--token-only", is_flag=True, help="Print only the token, for scripts."
)


@user.command("add")
@click.argument("name")
@_EXPIRES_OPTION
@_TOKEN_ONLY_OPTION
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def user_add(
    name: str,
    expires: str | None,
    token_only: bool,
    data_dir: Path | None,
    config_file: Path | None,
) -> None:
    """Create user NAME (or give an existing one another token) and print its login URL."""
    from remotecli.controller.server import add_user_token, open_store

    _check_user_name(name)
    expires_at = _expiry(expires)
    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    store = open_store(config.data_dir, config.store_url)
    try:
        existed = store.user_exists(name)
        token = add_user_token(store, name, expires_at=expires_at)
    finally:
        store.close()
    done = f"{'Added a token for' if existed else 'Created user'} {name}."
    _show_token(config.data_dir, config.listen, name, token, done=done, token_only=token_only)


@user.command("token")
@click.argument("name")
@_EXPIRES_OPTION
@_TOKEN_ONLY_OPTION
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def user_token(
    name: str,
    expires: str | None,
    token_only: bool,
    data_dir: Path | None,
    config_file: Path | None,
) -> None:
    """Issue a new token for NAME and revoke its old ones (its browsers are signed out).

    For admin the new token is written to DATA_DIR/admin.token (unless REMOTECLI_TOKEN sets
    it: then change that variable and restart instead).
    """
    from remotecli.controller.identity import ADMIN_USER
    from remotecli.controller.server import add_user_token, open_store, save_admin_token

    if name != ADMIN_USER:
        _check_user_name(name)
    expires_at = _expiry(expires)
    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    if name == ADMIN_USER and config.admin_token:
        raise ConfigError(
            "the admin's token is set by REMOTECLI_TOKEN; set a new value there and restart "
            "remote-cli"
        )
    if name == ADMIN_USER and expires_at is not None:
        raise ConfigError("the admin's token does not expire; leave out --expires")
    store = open_store(config.data_dir, config.store_url)
    try:
        if not store.user_exists(name):
            raise ConfigError(f"there is no user {name!r}; create it with `remotecli user add`")
        token = add_user_token(store, name, expires_at=expires_at, replace=True)
        if name == ADMIN_USER:
            save_admin_token(config.data_dir, token)
    finally:
        store.close()
    done = f"Revoked the old tokens of {name} and signed out its browsers."
    _show_token(config.data_dir, config.listen, name, token, done=done, token_only=token_only)


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def user_list(as_json: bool, data_dir: Path | None, config_file: Path | None) -> None:
    """List the users: created, last seen, active sessions, tokens and when they expire."""
    import json

    from remotecli.controller.server import open_store

    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    store = open_store(config.data_dir, config.store_url)
    try:
        records = store.user_records()
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([vars(r) for r in records], indent=2))
        return
    rows = [("NAME", "CREATED", "LAST SEEN", "ACTIVE", "TOKENS", "TOKEN EXPIRES")]
    for r in records:
        expires = "-" if not r.tokens else _when(r.token_expires_at)
        rows.append(
            (
                r.name,
                _when(r.created_at),
                _when(r.last_seen, "never"),
                str(r.active_sessions),
                str(r.tokens),
                expires,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


@user.command("remove")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for a running remote-cli to end the user's sessions.",
)
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def user_remove(
    name: str, yes: bool, wait: float, data_dir: Path | None, config_file: Path | None
) -> None:
    """Remove user NAME: its tokens and logins stop working now, its sessions end, and its
    kept provider sign-ins are erased."""
    import time

    from remotecli.controller.datadir import serving_pid
    from remotecli.controller.server import open_store

    _check_user_name(name)
    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    store = open_store(config.data_dir, config.store_url)
    try:
        if not store.user_exists(name):
            raise ConfigError(f"there is no user {name!r}; `remotecli user list` shows them")
        active = store.count_active(name)
        if not yes:
            if not sys.stdin.isatty():
                raise ConfigError(f"removing {name} needs confirmation: add --yes")
            click.confirm(
                f"Remove {name}, end its {active} active session(s) and erase its kept sign-ins?",
                abort=True,
            )
        signins = len(store.signins(name))
        store.remove_user(name, time.time())
        click.echo(f"Removed {name}: its tokens and logins no longer work.")
        if signins:
            click.echo(f"Erased {signins} kept sign-in(s).")
        if not active:
            return
        pid = serving_pid(config.data_dir)
        if pid is None:
            click.echo(
                f"{active} session(s) of {name} will be ended when remote-cli next starts "
                "(none is running now)."
            )
            return
        click.echo(f"Waiting for remote-cli (pid {pid}) to end {active} session(s)...")
        deadline = time.monotonic() + wait
        left = store.count_active(name)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = store.count_active(name)
    finally:
        store.close()
    if left:
        raise RemoteCliError(
            f"{left} session(s) of {name} are still ending after {wait:.0f} s; "
            "`remotecli user list` shows when they are gone"
        )
    click.echo(f"Ended {active} session(s).")


# --- remotecli secret ---------------------------------------------------------------------------
# (owned by the controller's kept sign-ins: src/remotecli/controller/signins.py)


@cli.group("secret")
def secret_group() -> None:
    """Manage the key that encrypts the provider sign-ins kept between sessions."""


@secret_group.command("new-key")
def secret_new_key() -> None:
    """Print a new random key (base64 of 32 bytes) for REMOTECLI_SECRET_KEY or --new-key-file."""
    from remotecli.controller.signins import encode_key, new_key_material

    click.echo(encode_key(new_key_material()))


@secret_group.command("rotate")
@_DATA_DIR_OPTION
@_CONFIG_OPTION
@click.option(
    "--new-key-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Re-encrypt with the key in this file (mode 0600, base64 or hex of 32 bytes) instead "
    "of a fresh one. Required when REMOTECLI_SECRET_KEY holds the current key.",
)
def secret_rotate(
    data_dir: Path | None, config_file: Path | None, new_key_file: Path | None
) -> None:
    """Re-encrypt every kept sign-in with a new key, with the controller stopped.

    With the key in DATA_DIR/secret.key, a new key replaces it (written to secret.key.new
    first; an interrupted run is finished by running it again). With REMOTECLI_SECRET_KEY,
    give the new key with --new-key-file, then restart the controller with the variable set to
    it. Refuses while a controller runs on the data dir.
    """
    from remotecli.controller.datadir import DataDirLock
    from remotecli.controller.server import open_store, prepare_data_dir
    from remotecli.controller.signins import read_key_file, rotate_secret

    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    new_material = None if new_key_file is None else read_key_file(new_key_file).material
    # Held while re-encrypting: no controller runs now, and none can start half-way through.
    lock = DataDirLock.serve(prepare_data_dir(config.data_dir), purpose="secret rotate")
    try:
        store = open_store(config.data_dir, config.store_url)
        try:
            count, key = rotate_secret(store, config.data_dir, config.secret_key, new_material)
        finally:
            store.close()
    finally:
        lock.release()
    click.echo(f"re-encrypted {count} sign-in(s) with key {key.key_id}")
    if config.secret_key:
        click.echo(
            "set REMOTECLI_SECRET_KEY to the content of the new key file before starting the "
            "controller again"
        )


@secret_group.command("forget")
@click.argument("user", required=False)
@click.argument("provider", required=False)
@click.option(
    "--unreadable",
    is_flag=True,
    help="Forget every sign-in the current key cannot read (sealed with another key).",
)
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def secret_forget(
    user: str | None,
    provider: str | None,
    unreadable: bool,
    data_dir: Path | None,
    config_file: Path | None,
) -> None:
    """Forget kept sign-ins: USER's to PROVIDER, all of USER's, or --unreadable ones.

    Their users sign in again in their next session. Safe while the controller runs.
    """
    from remotecli.controller.server import open_store
    from remotecli.controller.signins import SignIns, load_secret_key

    if unreadable == (user is not None):
        raise click.UsageError("give USER [PROVIDER], or --unreadable")
    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    store = open_store(config.data_dir, config.store_url)
    try:
        if unreadable:
            key = load_secret_key(config.data_dir, config.secret_key)
            count = SignIns(store, key).forget_unreadable()
        elif provider is not None:
            count = store.delete_signins(user, provider)
        else:
            count = store.delete_signins(user)
    finally:
        store.close()
    click.echo(f"forgot {count} sign-in(s)")


# --- remotecli gc -------------------------------------------------------------------------------
# (owned by the controller's clean-up: src/remotecli/controller/gc.py)


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def gc_command(
    dry_run: bool, as_json: bool, data_dir: Path | None, config_file: Path | None
) -> None:
    """Remove what is no longer needed: ended sessions past keep_ended_sessions (30 days by
    default), session directories no active session owns, stale guest images, unfinished
    builds and templates whose image is gone.

    The controller does the same every gc_interval (a day by default). Safe while it runs:
    nothing of an active session is touched, nor anything changed in the last hour. Exits 1
    when something could not be removed (the report says what and why).
    """
    import json
    import time

    from remotecli.controller.gc import run_gc
    from remotecli.controller.server import open_store

    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    store = open_store(config.data_dir, config.store_url)
    try:
        report = run_gc(config, store, now=time.time(), dry_run=dry_run)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
    if report.failures:
        sys.exit(1)


# --- remotecli backup / restore ---------------------------------------------------------------
# (owned by the controller: src/remotecli/controller/backup.py)


@cli.command("backup")
@click.argument("target", type=click.Path(file_okay=False, path_type=Path))
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def backup_command(target: Path, data_dir: Path | None, config_file: Path | None) -> None:
    """Copy the store, the sign-in key and the admin token into the new directory TARGET.

    Safe while remote-cli runs: the store is copied with SQLite's online backup. TARGET holds
    secrets (mode 0700, files 0600): keep it as you keep the data dir. A PostgreSQL store
    (store_url) is backed up with pg_dump instead: this command refuses it.
    """
    from remotecli.controller.backup import back_up

    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    report = back_up(config.data_dir, target, store_url=config.store_url)
    click.echo(f"backed up {', '.join(report.files)} (schema {report.schema_version}) to {target}")


@cli.command("restore")
@click.argument("source", type=click.Path(file_okay=False, exists=True, path_type=Path))
@_DATA_DIR_OPTION
@_CONFIG_OPTION
def restore_command(source: Path, data_dir: Path | None, config_file: Path | None) -> None:
    """Put a `remotecli backup` directory back into the data dir, with remote-cli stopped.

    The files it replaces are kept beside, with the suffix .before-restore.
    """
    from remotecli.controller.backup import restore

    config = load_controller_config({"data_dir": data_dir}, config_file=config_file)
    report = restore(source, config.data_dir, store_url=config.store_url)
    click.echo(f"restored {', '.join(report.files)} into {config.data_dir}; start remote-cli")


# --- remotecli image ----------------------------------------------------------------------------
# (owned by the microVM image builder: src/remotecli/images/)


@cli.group("image")
def image_group() -> None:
    """Build the guest image that `--driver qemu` boots as microVMs."""


@image_group.command("build")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where images are kept (default: ~/.cache/remotecli/images). The qemu driver looks "
    "here too.",
)
@click.option(
    "--provider",
    "providers",
    multiple=True,
    metavar="NAME",
    help="Install exactly this provider's CLI from npm inside the image "
    f"({', '.join(NPM_PROVIDERS)}), at the version this host has (else the registry's latest). "
    "Repeat for several. Default: every one of them this host has.",
)
@click.option(
    "--no-providers",
    is_flag=True,
    help="Build the base image only: the shell, no provider CLI and no Node.js.",
)
@click.option("--force", is_flag=True, help="Rebuild even when the cache holds this image.")
@click.option(
    "--mirror",
    default=None,
    metavar="URL",
    help="Debian mirror for debootstrap (default: debootstrap's own).",
)
def image_build(
    cache_dir: Path | None,
    providers: tuple[str, ...],
    no_providers: bool,
    force: bool,
    mirror: str | None,
) -> None:
    """Build a Debian 12 microVM image: kernel, initrd and read-only ext4 root.

    The root filesystem comes from debootstrap (minbase) with TigerVNC Xvnc and xterm; the kernel
    is Debian's linux-image-amd64, unpacked to an ELF vmlinux that QEMU boots directly.

    By default the image holds every provider CLI this host has (Claude Code, Codex CLI, Gemini
    CLI, found on PATH or in the project's node_modules/.bin), each at the host's version,
    installed by this host's npm (from its cache when there); the CLIs that run on Node.js get
    the Node.js build the project pins, in /usr/local/bin. The build says which it installs and
    why. --provider picks exactly those; --no-providers builds the base image.

    The image is cached under a key computed from its inputs (the CLIs' versions among them):
    building again is a no-op unless --force. Needs root and the packages debootstrap,
    e2fsprogs and busybox-static, and npm for the CLIs.
    """
    from remotecli.images import build_image, default_cache_dir

    if no_providers and providers:
        raise click.UsageError("--no-providers and --provider contradict each other; pick one")
    target = cache_dir if cache_dir is not None else default_cache_dir()
    image = build_image(
        target,
        () if no_providers else (providers or None),
        force=force,
        progress=lambda step: click.echo(f"[image] {step}", err=True),
        mirror=mirror,
    )
    click.echo(str(image.directory))


# --- many hosts: the Ray cluster (docs/cluster.md) ---------------------------------------------

_TOKEN_FILE_OPTION = click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The cluster's Ray token (RAY_AUTH_TOKEN_PATH); `cluster head` creates it when missing.",
)
_NODE_IP_OPTION = click.option(
    "--node-ip", required=True, help="This host's address, as the other hosts reach it."
)
_SLOTS_OPTION = click.option(
    "--slots",
    type=click.IntRange(0),
    default=None,
    help="Session slots this host offers (default: from its cores and memory).",
)
_NAME_OPTION = click.option(
    "--name",
    default=None,
    help="The name this host is shown and a lost host reported by (default: its hostname); "
    "letters, digits, '-', '_', '.'.",
)


_TLS_DIR_OPTION = click.option(
    "--tls-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Encrypt Ray's own traffic: this host's directory from `remotecli cluster tls-cert` "
    "(node.crt, node.key, ca.crt). Every host and controller of a cluster uses TLS, or none.",
)
_DRIVER_OPTION = click.option(
    "--driver",
    type=click.Choice(["local", "qemu"]),
    default="local",
    show_default=True,
    help="What this host runs sessions with: its local sandbox, or microVMs (needs a guest "
    "image: `remotecli image build`). Sessions go to hosts with their controller's "
    "cluster_host_driver.",
)


def _prepare_host_driver(driver: str) -> None:
    """Refuse to join as a microVM host without QEMU or a guest image, naming the fix; else
    tell the host's session actors where the images are (the joining user's cache) and make
    the templates its sessions clone, so no session waits for a cold boot."""
    if driver != "qemu":
        return
    import asyncio
    import os

    from remotecli.cluster.actor import IMAGE_CACHE_VARIABLE
    from remotecli.drivers.qemu_machine import require_qemu
    from remotecli.exceptions import DriverError
    from remotecli.images import default_cache_dir, find_image

    try:
        require_qemu()
        image = find_image(default_cache_dir())
    except DriverError as exc:
        raise click.ClickException(f"this host cannot run microVM sessions: {exc.message}") from exc
    os.environ[IMAGE_CACHE_VARIABLE] = str(image.directory.parent)
    click.echo(
        f"microVM sessions from the guest image {image.directory}; making the templates its "
        "providers' sessions clone (once: minutes without KVM, at once when made already)"
    )
    state = asyncio.run(_make_templates(image.directory.parent))
    click.echo(f"the shell's template: {state}")


async def _make_templates(image_cache: Path) -> str:
    """Make a microVM host's templates beside its images (a scratch data dir, removed after)."""
    import tempfile

    from remotecli.drivers.qemu import QemuDriver

    with tempfile.TemporaryDirectory(prefix="remotecli-join-") as scratch:
        driver = QemuDriver(Path(scratch), image_cache=image_cache, egress="none")
        try:
            return await driver.make_templates()
        finally:
            await driver.close()


@cli.group()
def cluster() -> None:
    """Place sessions across many hosts with Ray: start the head, join hosts, show them."""


@cluster.command("head")
@_TOKEN_FILE_OPTION
@_NODE_IP_OPTION
@_SLOTS_OPTION
@_NAME_OPTION
@_DRIVER_OPTION
@_TLS_DIR_OPTION
@click.option("--dashboard", is_flag=True, help="Also run Ray's dashboard (off by default).")
def cluster_head(
    token_file: Path,
    node_ip: str,
    slots: int | None,
    name: str | None,
    driver: str,
    tls_dir: Path | None,
    dashboard: bool,
) -> None:
    """Start this host as the cluster's head (`ray start --head`, token auth on)."""
    from remotecli.cluster.host import create_token, host_slots, run_ray_start
    from remotecli.cluster.nodes import NodeSettings, ray_start_argv

    _prepare_host_driver(driver)
    if create_token(token_file):
        click.echo(f"wrote a new cluster token to {token_file}; copy it to every host")
    settings = NodeSettings(
        host_slots(slots), include_dashboard=dashboard, name=name, driver=driver
    )
    argv = ray_start_argv(settings, head_address=None, node_ip=node_ip)
    sys.exit(run_ray_start(argv, token_file, name, tls_dir))


@cluster.command("join")
@click.argument("address")
@_TOKEN_FILE_OPTION
@_NODE_IP_OPTION
@_SLOTS_OPTION
@_NAME_OPTION
@_DRIVER_OPTION
@_TLS_DIR_OPTION
def cluster_join(
    address: str,
    token_file: Path,
    node_ip: str,
    slots: int | None,
    name: str | None,
    driver: str,
    tls_dir: Path | None,
) -> None:
    """Join this host to the cluster whose head is at ADDRESS (HOST:6379)."""
    from remotecli.cluster.host import host_slots, run_ray_start
    from remotecli.cluster.nodes import NodeSettings, ray_start_argv

    _prepare_host_driver(driver)
    settings = NodeSettings(host_slots(slots), name=name, driver=driver)
    argv = ray_start_argv(settings, head_address=address, node_ip=node_ip)
    sys.exit(run_ray_start(argv, token_file, name, tls_dir))


@cluster.command("status")
@click.argument("address")
@_TOKEN_FILE_OPTION
@_TLS_DIR_OPTION
def cluster_status(address: str, token_file: Path, tls_dir: Path | None) -> None:
    """Show the cluster's hosts, their session slots and the sessions placed on them."""
    from remotecli.cluster.ray_tls import export_tls

    if tls_dir is not None:
        export_tls(tls_dir)  # before Ray is imported: it reads them once
    from remotecli.cluster import placement
    from remotecli.cluster.host import use_token
    from remotecli.cluster.hosts import summarise_hosts

    use_token(token_file, tls_dir)
    placement.connect(address)
    sessions = placement.find_sessions()
    nodes, available = placement.node_table(), placement.available_per_node()
    for host in summarise_hosts(nodes, available, sessions.values()):
        state = "alive" if host.up else "dead"
        free = f"{host.slots_free} of {host.slots} slots free"
        click.echo(f"{host.name}\t{host.address}\t{state}\t{free}\t{len(host.sessions)} sessions")
    for session_id, where in sorted(sessions.items()):
        click.echo(f"session {session_id}\t{where.host}\t{where.node_ip}:{where.port}")


@cluster.command("tls-ca")
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where to write ca.crt and ca.key (mode 0600; keep it off the hosts).",
)
def cluster_tls_ca(directory: Path) -> None:
    """Make the cluster's CA, which signs every host's certificate for Ray's TLS."""
    from remotecli.cluster.ray_tls import make_ca

    click.echo(f"wrote {make_ca(directory)} and its key; issue each host's with `tls-cert`")


@cluster.command("tls-cert")
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The CA's directory (`tls-ca`).",
)
@click.option(
    "--ip",
    "addresses",
    multiple=True,
    required=True,
    help="An address the other hosts dial this one at (repeatable; IP or DNS name).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The directory to write (node.crt, node.key, ca.crt); copy it to the host.",
)
@click.option("--name", default="remotecli-host", help="The certificate's common name.")
def cluster_tls_cert(ca_dir: Path, addresses: tuple[str, ...], out: Path, name: str) -> None:
    """Issue a host's (or a controller's) certificate for Ray's TLS, signed by the CA."""
    from remotecli.cluster.ray_tls import issue

    written = issue(ca_dir, out, addresses, name)
    click.echo(f"wrote {written}: copy it to the host and pass it as --tls-dir")


def main() -> None:
    """Run the command line; print RemoteCliError as one line instead of a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(2)
    except RemoteCliError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
