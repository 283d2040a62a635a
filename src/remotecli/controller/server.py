"""Run the controller: the API on a private Unix socket, the gateway in front, in one event loop.

:class:`Controller` wires the pieces: the store in the data dir, the admin token, the driver,
the session manager (recovery first), the VNC bridge, the FastAPI app served by uvicorn on a
Unix socket only this user can open (mode 0600 in a 0700 directory), and a
:class:`remotecli.gateway.Gateway` on ``listen`` routing ``/`` to that socket, with the bridge's
WebSocket paths served in-process. :func:`run` is the blocking entry ``remotecli up`` and
``remotecli controller`` call: it prints the login URL and, on SIGTERM or Ctrl-C, closes the
viewers (1001), stops every session, and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import uvicorn
import uvloop

from remotecli.auth import hash_token, new_token
from remotecli.config import ControllerConfig, GatewayConfig, Route
from remotecli.controller.app import create_app, create_operations_app
from remotecli.controller.bridge import VncBridge
from remotecli.controller.datadir import DataDirLock
from remotecli.controller.gc import GcReport, run_gc
from remotecli.controller.identity import ADMIN_USER, Identity
from remotecli.controller.sessions import SessionManager
from remotecli.controller.signins import SignIns
from remotecli.controller.store import Store
from remotecli.controller.viewers import ViewerAccess
from remotecli.drivers import create_driver
from remotecli.drivers.base import Driver
from remotecli.exceptions import ConfigError
from remotecli.gateway import Gateway
from remotecli.logs import LogFormat, configure_logging, get_logger
from remotecli.providers import Catalogue

log = get_logger("controller")

ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 (a file name)
CONTROLLER_ID_FILE = "controller.id"
STORE_FILE = "remotecli.sqlite3"
SOCKET_NAME = "controller.sock"
URL_FILE = "url"  # DATA_DIR/run/url: the serving controller's base URL, for `user add`
UNIX_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


def prepare_data_dir(data_dir: Path) -> Path:
    """Create the data dir (mode 0700) if needed and return it; ConfigError if impossible.

    An existing one must belong to this user and be writable by no one else: the store, the
    keys and the lock live there, and another user who could write it could plant links.
    """
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = data_dir.stat()
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data dir {data_dir}: {exc.strerror}; choose another with "
            "--data-dir or REMOTECLI_DATA_DIR"
        ) from exc
    if status.st_uid != os.geteuid() or status.st_mode & 0o022:
        raise ConfigError(
            f"the data dir {data_dir} belongs to uid {status.st_uid} with mode "
            f"{status.st_mode & 0o777:o}; it must be this user's and writable by no one else "
            f"(chown it, chmod go-w it), or choose another with --data-dir"
        )
    return data_dir


def open_store(data_dir: Path, store_url: str | None = None) -> Store:
    """Open the store: the PostgreSQL database at ``store_url``, else the SQLite file of
    ``data_dir``."""
    data_dir = prepare_data_dir(data_dir)
    if store_url:
        return Store.connect(store_url)
    return Store.open(data_dir / STORE_FILE)


def ensure_admin_token(store: Store, data_dir: Path, env_token: str | None) -> str:
    """Return the admin's token and make it the admin's only valid one.

    ``REMOTECLI_TOKEN`` wins; else the token saved in ``admin.token`` (mode 0600) on the first
    start; else a new one, saved there now.
    """
    path = data_dir / ADMIN_TOKEN_FILE
    saved = path.read_text(encoding="ascii").strip() if path.exists() else ""
    if env_token:
        token = env_token
    elif saved:
        token = saved
    else:
        token = new_token()
        save_admin_token(data_dir, token)
    hashed = hash_token(token)
    now = time.time()
    changed = store.user_for_token(hashed, now) != ADMIN_USER
    # A new admin token (the variable or the file changed) signs out the old one's browsers.
    store.replace_tokens(ADMIN_USER, hashed, now, sign_out=changed)
    return token


def save_admin_token(data_dir: Path, token: str) -> None:
    """Write the admin's token to ``admin.token`` (mode 0600), replacing the file whole."""
    _write_private(data_dir / ADMIN_TOKEN_FILE, token + "\n")


def add_user_token(
    store: Store, name: str, *, expires_at: float | None = None, replace: bool = False
) -> str:
    """Create user ``name`` if needed and return a new token for it (shown once, stored hashed).

    ``replace`` revokes its other tokens and signs out its browsers; ``expires_at`` (epoch
    seconds) makes the token stop working then.
    """
    token = new_token()
    if replace:
        store.replace_tokens(
            name, hash_token(token), time.time(), expires_at=expires_at, sign_out=True
        )
    else:
        store.add_token(name, hash_token(token), time.time(), expires_at=expires_at)
    return token


def _bind_private_socket(run_dir: Path) -> tuple[socket.socket, Path]:
    """Bind the API's Unix socket, readable and writable by this user only."""
    path = run_dir / SOCKET_NAME
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        # A deep data dir cannot hold a socket path; use a private temporary directory instead.
        path = Path(tempfile.mkdtemp(prefix="remotecli-")) / SOCKET_NAME
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a previous run died without removing it
        else:
            raise ConfigError(
                f"another controller is serving {path}; stop it or choose another --data-dir"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(1024)
    sock.setblocking(False)
    return sock, path


def _bind_tcp(address: tuple[str, int]) -> socket.socket:
    """Bind a listening TCP socket on ``address`` (the metrics listener); ConfigError if taken."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} for metrics: {exc.strerror}; choose another "
            "metrics_listen"
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def ensure_controller_id(data_dir: Path) -> str:
    """Return this controller's id, made once and kept in ``controller.id`` (mode 0600).

    Sessions record the controller that runs them, so controllers sharing one database each
    recover, reap and stop on shutdown only their own; a restart on the same data dir is the
    same controller, and takes its sessions back.
    """
    path = data_dir / CONTROLLER_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(encoding="utf-8").strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{8,64}", text):
            return text
        raise ConfigError(
            f"{path} does not hold a controller id (8 to 64 of A-Z, a-z, 0-9, _ and -); "
            "remove it to make a new one"
        )
    controller_id = secrets.token_urlsafe(9)
    _write_private(path, controller_id + "\n")
    return controller_id


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600), replacing it whole."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)  # a stale one (or a planted link) is never written through
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


async def _serve(
    app: Any, sockets: list[socket.socket], what: str
) -> tuple[_EmbeddedUvicorn, asyncio.Task[None]]:
    """Serve ``app`` with uvicorn on ``sockets`` in this loop; return once it listens."""
    server_config = uvicorn.Config(
        app,
        http="httptools",
        loop="none",
        lifespan="off",
        ws="none",
        log_config=None,
        access_log=False,
        proxy_headers=False,
        timeout_graceful_shutdown=5,
    )
    server = _EmbeddedUvicorn(server_config)
    task = asyncio.create_task(server.serve(sockets=sockets))
    while not server.started:
        if task.done():
            task.result()
            raise ConfigError(f"{what} stopped while starting; see the log above")
        await asyncio.sleep(0.005)
    return server, task


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the controller owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class Controller:
    """The controller with its gateway; :meth:`start`, read :attr:`address`, then :meth:`close`.

    ``driver`` replaces the configured one (tests pass their own).
    """

    def __init__(
        self,
        config: ControllerConfig,
        *,
        driver: Driver | None = None,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self._driver = driver
        self.admin_token = ""
        self.socket_path: Path | None = None
        self.store: Store | None = None
        self.manager: SessionManager | None = None
        self.signins: SignIns | None = None
        self.identity: Identity | None = None
        self.bridge: VncBridge | None = None
        self.gateway: Gateway | None = None
        self._uvicorn: _EmbeddedUvicorn | None = None
        self._uvicorn_task: asyncio.Task[None] | None = None
        self._operations: _EmbeddedUvicorn | None = None
        self._operations_task: asyncio.Task[None] | None = None
        self._lock: DataDirLock | None = None
        self._gc_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Lock the data dir, open the store, recover sessions, serve the API and the gateway.

        Raises ConfigError, before anything in the data dir is read, when another remote-cli
        holds its lock.
        """
        config = self.config
        data_dir = prepare_data_dir(config.data_dir)
        self._lock = DataDirLock.serve(data_dir)
        self.store = store = open_store(data_dir, config.store_url)
        self.admin_token = ensure_admin_token(store, data_dir, config.admin_token)
        driver = self._driver or create_driver(config.driver, data_dir, config)
        catalogue = Catalogue(config.providers, driver=driver)
        self.signins = signins = SignIns.open(store, data_dir, config.secret_key)
        self.manager = manager = SessionManager(
            config,
            store,
            driver,
            catalogue,
            registry=self.registry,
            signins=signins,
            controller_id=ensure_controller_id(data_dir),
        )
        await manager.start()
        self.identity = identity = Identity.of_store(
            store, manager.tickets, allowed_origins=config.allowed_origins
        )
        access = ViewerAccess(identity, manager)
        self.bridge = bridge = VncBridge(access, tty_authorizer=access, registry=self.registry)
        manager.attach_bridge(bridge)

        sock, self.socket_path = _bind_private_socket(data_dir / "run")
        app = create_app(manager, identity, registry=self.registry)
        self._uvicorn, self._uvicorn_task = await _serve(app, [sock], "the API server")
        if config.metrics_listen is not None:
            self._operations, self._operations_task = await _serve(
                create_operations_app(manager, self.registry),
                [_bind_tcp(config.metrics_listen)],
                f"the metrics listener on {config.metrics_listen[0]}:{config.metrics_listen[1]}",
            )

        gateway_config = GatewayConfig(
            listen=config.listen,
            routes=(Route("/", f"unix:{self.socket_path}"),),
            trusted_proxies=config.trusted_proxies,
            allowed_hosts=config.allowed_hosts,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            shutdown_grace=5.0,
            log_format=config.log_format,
            log_level=config.log_level,
        )
        gateway = Gateway(gateway_config, bridge.local_upgrades(), registry=self.registry)
        await gateway.start()
        self.gateway = gateway
        _write_private(data_dir / "run" / URL_FILE, self.url() + "\n")
        if config.gc_interval:
            self._gc_task = asyncio.create_task(self._collect_garbage_forever(), name="gc")
        log.info("controller started", listen=self.url(), driver=driver.name)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where the metrics listener is bound, when there is one."""
        if self._operations is None or not self._operations.servers:
            return None
        sockname = self._operations.servers[0].sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def _collect_garbage_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval)
            try:
                report = await asyncio.to_thread(self._collect_garbage)
            except Exception:  # the next round tries again
                log.exception("clean-up failed")
                continue
            if report.items:
                log.info("cleaned up", items=len(report.items), freed_bytes=report.freed_bytes)
            for failure in report.failures:
                log.warning("clean-up left something", target=failure.target, error=failure.error)

    def _collect_garbage(self) -> GcReport:
        """One clean-up round, in a worker thread: on a store connection of its own."""
        assert self.store is not None
        store = self.store.reopen()
        try:
            return run_gc(self.config, store, now=time.time())
        finally:
            store.close()

    @property
    def address(self) -> tuple[str, int]:
        """The gateway's bound address."""
        assert self.gateway is not None, "start() first"
        return self.gateway.address

    def url(self, path: str = "") -> str:
        """Return ``http(s)://HOST:PORT`` + ``path`` for the bound address."""
        host, port = self.address
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{_display_host(host)}:{port}{path}"

    def login_url(self) -> str:
        """Return the dashboard login URL with the admin token (print it for the operator)."""
        return self.url(f"/login?token={self.admin_token}")

    async def close(self) -> None:
        """Close viewers (1001), stop every session, stop the gateway and the API server."""
        if self.bridge is not None:
            await self.bridge.shutdown()
        if self.manager is not None:
            await self.manager.close()
        if self.gateway is not None:
            await self.gateway.shutdown()
        if self._gc_task is not None:
            self._gc_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gc_task
        for server, task in (
            (self._uvicorn, self._uvicorn_task),
            (self._operations, self._operations_task),
        ):
            if server is not None and task is not None:
                server.should_exit = True
                await task
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        if self.signins is not None:
            self.signins.close()
        if self.store is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.config.data_dir / "run" / URL_FILE).unlink()
            self.store.close()
        if self._lock is not None:
            self._lock.release()
        log.info("controller stopped")


async def serve(config: ControllerConfig, announce: Callable[[str], None]) -> None:
    """Run a controller until SIGTERM or SIGINT; ``announce`` receives the login URL."""
    controller = Controller(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await controller.start()
        announce(controller.login_url())
        await stop.wait()
        log.info("shutting down: stopping every session")
    finally:
        await controller.close()


def run(config: ControllerConfig, announce: Callable[[str], None]) -> None:
    """Configure logging and run the controller on uvloop until a signal; return to exit 0."""
    fmt: LogFormat = "json" if config.log_format == "json" else "console"
    configure_logging(fmt, config.log_level)
    uvloop.run(serve(config, announce))
