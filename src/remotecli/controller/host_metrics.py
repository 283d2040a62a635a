"""The sessions' series for ``/metrics``, and per host: each one's state, slots and sessions.

A Prometheus collector over the driver's hosts (:meth:`remotecli.drivers.base.Driver.hosts`),
asked at each scrape; the driver answers from its cached snapshot, so a scrape never waits for
the cluster. A driver that runs sessions on the controller's own host has no hosts: no series.
Label values are escaped by ``prometheus_client``, as every other series' are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from remotecli.drivers.base import HostStatus

HostsSource = Callable[[], Sequence[HostStatus] | None]

SERIES = (
    ("remotecli_host_up", "1 while the host is alive in the cluster, 0 once it is lost."),
    ("remotecli_host_slots", "Sessions the host offers in all."),
    ("remotecli_host_slots_free", "Sessions the host would take now."),
    ("remotecli_host_sessions", "This controller's sessions running on the host."),
)


def host_values(host: HostStatus) -> tuple[int, int, int, int]:
    """Return the host's values in the order of :data:`SERIES`."""
    return int(host.up), host.slots, host.slots_free, len(host.sessions)


class HostCollector(Collector):
    """Yields the :data:`SERIES` gauges, one sample per host, labelled ``host``."""

    def __init__(self, hosts: HostsSource) -> None:
        self._hosts = hosts

    def collect(self) -> Iterator[Metric]:
        hosts = self._hosts()
        if hosts is None:
            return
        families = [GaugeMetricFamily(name, text, labels=["host"]) for name, text in SERIES]
        for host in hosts:
            for family, value in zip(families, host_values(host), strict=True):
                family.add_metric([host.name], value)
        yield from families


class SessionMetrics:
    """The session manager's counters, histogram and gauges."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None) -> None:
        self.transitions = prometheus_client.Counter(
            "remotecli_session_transitions",
            "Session state changes, by the state entered.",
            ["state"],
            registry=registry,
        )
        self.start_seconds = prometheus_client.Histogram(
            "remotecli_session_start_seconds",
            "Seconds from session creation to ready.",
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=registry,
        )
        self.active = prometheus_client.Gauge(
            "remotecli_sessions_active", "Sessions not stopped or failed.", registry=registry
        )
        self.viewers = prometheus_client.Gauge(
            "remotecli_session_viewers",
            "Viewers (desktop and text) attached to sessions.",
            registry=registry,
        )
