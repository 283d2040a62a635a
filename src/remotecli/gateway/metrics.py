"""The gateway's Prometheus metrics, and the HTTP endpoint that serves them.

Every :class:`~remotecli.gateway.Gateway` owns one :class:`GatewayMetrics` bound to one
registry (a fresh one unless the caller passes its own), so several gateways can run in one
process. Counters are updated when a request or tunnel ends, never per data chunk.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from remotecli.exceptions import ConfigError

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class GatewayMetrics:
    """The gateway's counters, gauges and histogram, all in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "remotecli_gateway_requests",
            "HTTP requests answered (upgrades included), by status",
            ["status"],
            registry=registry,
        )
        self.connections_open = Gauge(
            "remotecli_gateway_connections_open", "Client connections open", registry=registry
        )
        self.tunnels_open = Gauge(
            "remotecli_gateway_tunnels_open",
            "WebSocket tunnels open (forwarded and local upgrades)",
            registry=registry,
        )
        self.tunnels = Counter(
            "remotecli_gateway_tunnels",
            "WebSocket tunnels ended, by how they ended",
            ["ended"],
            registry=registry,
        )
        self.bytes = Counter(
            "remotecli_gateway_bytes",
            "Body and tunnel bytes relayed, by direction (up: client to upstream)",
            ["direction"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "remotecli_gateway_upstream_errors",
            "Upstream failures, by kind (refused, unreachable, closed, connect_timeout, ...)",
            ["kind"],
            registry=registry,
        )
        self.handshake_seconds = Histogram(
            "remotecli_gateway_handshake_seconds",
            "Time from a WebSocket upgrade request's head to the upstream's 101 sent on",
            buckets=HANDSHAKE_BUCKETS,
            registry=registry,
        )

        self._by_status: dict[int, Counter] = {}  # label children, looked up once each
        self._bytes_up = self.bytes.labels("up")
        self._bytes_down = self.bytes.labels("down")

    def count_request(self, status: int) -> None:
        """Count one answered request (or upgrade) with its status."""
        child = self._by_status.get(status)
        if child is None:
            child = self._by_status[status] = self.requests.labels(str(status))
        child.inc()

    def add_bytes(self, up: int, down: int) -> None:
        """Count bytes relayed by one request or tunnel that ended."""
        if up:
            self._bytes_up.inc(up)
        if down:
            self._bytes_down.inc(down)


class MetricsEndpoint:
    """``GET /metrics`` on its own address, served from a thread by prometheus-client."""

    def __init__(self, registry: CollectorRegistry, listen: tuple[str, int]) -> None:
        host, port = listen
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port} ({exc.strerror}); "
                "choose a free --metrics-listen address"
            ) from exc
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (after port 0)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop serving; blocks for up to the server's poll interval, so call it off the loop."""
        self._server.shutdown()
        self._server.server_close()
