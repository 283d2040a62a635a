"""The gateway: listen, hand each connection to a ClientConnection, shut down gracefully.

Create a :class:`Gateway` from a :class:`~remotecli.config.GatewayConfig`, ``await start()``
(which binds, or raises ConfigError), then ``await serve_forever()`` until ``shutdown()``. The
configuration is checked when the Gateway is built, so a bad route, CIDR or allowed host
fails before anything listens.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from remotecli.config import GatewayConfig
from remotecli.exceptions import ConfigError
from remotecli.forwarding import parse_trusted_proxies
from remotecli.gateway.connection import ClientConnection
from remotecli.gateway.context import GatewayContext
from remotecli.gateway.metrics import GatewayMetrics, MetricsEndpoint
from remotecli.gateway.tunnel import keepalive
from remotecli.gateway.upstream import UpstreamPool
from remotecli.handover import ClientInfo, LocalUpgrade
from remotecli.hosts import WILDCARDS, HostPolicy
from remotecli.logs import get_logger
from remotecli.routing import Router

__all__ = ["ClientInfo", "Gateway", "LocalUpgrade"]

log = get_logger("gateway")

FORCED_CLOSE_WAIT = 1.0  # after the grace, how long closing tunnels may flush before an abort


def _tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key; give the pair or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {config.tls_cert} and key {config.tls_key} "
            f"({exc}); check the paths and that the key matches the certificate (PEM files)"
        ) from exc
    context.set_alpn_protocols(["http/1.1"])
    return context


def is_local_address(address: str) -> bool:
    """True when ``address`` (an IP literal) is one of this machine's: it can be bound.

    Binding a UDP socket to ``(address, 0)`` sends nothing; EADDRNOTAVAIL means the address
    belongs to no interface here. Any other failure (no IPv6, a link-local address without its
    zone) also counts as not local.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL:
            log.debug("local address probe failed", address=address, error=str(exc))
        return False
    return True


def machine_names() -> tuple[str, ...]:
    """This machine's host name. Not its FQDN: that would ask the resolver at every start;
    a name served by DNS is added with ``--allowed-host``."""
    return (socket.gethostname(),)


class Gateway:
    """An HTTP and WebSocket reverse proxy; optionally serving some upgrades in-process."""

    def __init__(
        self,
        config: GatewayConfig,
        local_upgrades: Sequence[LocalUpgrade] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self._router = Router(config.routes)
        self._trusted = parse_trusted_proxies(config.trusted_proxies)
        self._tls = _tls_context(config)
        self._hosts: HostPolicy | None = None
        if config.allowed_hosts is not None:
            HostPolicy.for_listen(config.listen[0], config.allowed_hosts)  # ConfigError now
        self._local_upgrades = tuple(local_upgrades)
        self._context: GatewayContext | None = None
        self._server: asyncio.Server | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None
        self._address: tuple[str, int] | None = None
        self._stopped: asyncio.Event | None = None
        self._shutdown_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the listen address (and the metrics one); raise ConfigError if it cannot."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self.config.allowed_hosts is not None:
            wildcard = self.config.listen[0].strip("[]") in WILDCARDS
            names = await loop.run_in_executor(None, machine_names) if wildcard else ()
            self._hosts = HostPolicy.for_listen(
                self.config.listen[0],
                self.config.allowed_hosts,
                machine_names=names,
                is_local=is_local_address,
            )
        context = GatewayContext(
            config=self.config,
            router=self._router,
            pool=UpstreamPool(self.config.connect_timeout),
            metrics=self.metrics,
            trusted=self._trusted,
            local_upgrades=self._local_upgrades,
            scheme="https" if self._tls is not None else "http",
            hosts=self._hosts,
        )
        host, port = self.config.listen
        try:
            self._server = await loop.create_server(
                lambda: ClientConnection(context),
                host,
                port,
                ssl=self._tls,
                backlog=4096,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}); "
                "choose a free address with --listen"
            ) from exc
        for sock in self._server.sockets:
            keepalive(sock)  # accepted sockets inherit it: a tunnel's client side needs it
        bound = self._server.sockets[0].getsockname()
        self._address = (str(bound[0]), int(bound[1]))
        context.port = self._address[1]
        self._context = context
        if self.config.metrics_listen is not None:
            try:
                self._metrics_endpoint = MetricsEndpoint(self.registry, self.config.metrics_listen)
            except ConfigError:
                self._server.close()
                raise
        log.info(
            "gateway listening",
            address=f"{context.scheme}://{self._address[0]}:{self._address[1]}",
            routes={route.prefix: route.upstream for route in self._router.routes},
            metrics=self.metrics_address,
            allowed_hosts=(
                "any (no Host check)"
                if self._hosts is None or self._hosts.any_host
                else sorted(self._hosts.names)
                + (["local addresses"] if self._hosts.local_addresses else [])
            ),
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port), after port 0 was resolved; only valid after start()."""
        if self._address is None:
            raise ConfigError("the gateway has no address before start(); await start() first")
        return self._address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """The bound metrics (host, port), or None without --metrics-listen."""
        return self._metrics_endpoint.address if self._metrics_endpoint is not None else None

    @property
    def upstream_connections_opened(self) -> int:
        """How many upstream connections were opened so far (reuse keeps it low)."""
        return self._context.pool.opened if self._context is not None else 0

    async def serve_forever(self) -> None:
        """Return once shutdown() has finished."""
        assert self._stopped is not None, "await start() first"
        await self._stopped.wait()

    def request_shutdown(self) -> None:
        """Start shutdown() from a signal handler (keeps the task referenced)."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self.shutdown())

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, finish in-flight HTTP, give tunnels ``grace`` seconds, close the rest."""
        context, server = self._context, self._server
        if context is None or server is None or context.closing:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        grace = self.config.shutdown_grace if grace is None else grace
        context.closing = True
        server.close()
        open_before = context.open_count
        for connection in list(context.connections):
            connection.begin_shutdown()
        log.info("gateway stopping", open=open_before, grace_s=grace)
        await self._wait_until_empty(context, grace)
        for local in self._local_upgrades:
            if local.shutdown is not None:
                try:
                    async with asyncio.timeout(FORCED_CLOSE_WAIT + grace):
                        await local.shutdown()
                except Exception as exc:  # the owner's bug must not stop our shutdown
                    log.error("local upgrade shutdown failed", error=repr(exc))
        tunnels = list(context.tunnels)
        for tunnel in tunnels:
            tunnel.close("shutdown")
        for transport in list(context.local_transports):
            transport.close()
        for connection in list(context.connections):
            if connection.transport is not None:
                connection.transport.close()
        await self._wait_until_empty(context, FORCED_CLOSE_WAIT)
        for tunnel in list(context.tunnels):
            tunnel.abort()
        for transport in list(context.local_transports):
            transport.abort()  # type: ignore[attr-defined]
        for connection in list(context.connections):
            if connection.transport is not None:
                connection.transport.abort()
        context.pool.close()
        if self._metrics_endpoint is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._metrics_endpoint.close)
        log.info("gateway stopped", tunnels_closed=len(tunnels))
        assert self._stopped is not None
        self._stopped.set()

    @staticmethod
    async def _wait_until_empty(context: GatewayContext, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while context.open_count and loop.time() < deadline:
            context.changed.clear()
            try:
                async with asyncio.timeout(deadline - loop.time()):
                    await context.changed.wait()
            except TimeoutError:
                return
