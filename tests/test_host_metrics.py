"""Hosts for operators: per-host series in /metrics, hosts in /readyz, a session's host.

The collector is rendered by a real ``prometheus_client`` registry; the controller runs whole
(gateway, API, banner driver's real sockets) with a driver that says it placed its sessions on
host ``w1``, as the cluster driver does (the real cluster is tests/e2e/test_cluster_driver.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import httpx
import prometheus_client

from remotecli.config import ControllerConfig
from remotecli.controller.host_metrics import HostCollector
from remotecli.controller.server import Controller
from remotecli.drivers.base import HostStatus, ProgressCallback, SessionSpec, VncEndpoint
from tests.banner_driver import BannerDriver
from tests.conftest import MS

HOSTS = [
    HostStatus("w1", "10.0.0.2", True, 4, 1, ("s1", "s2", "s3")),
    HostStatus('odd"name\\x', "10.0.0.3", False, 2, 0, ()),
]


def scrape(hosts: Sequence[HostStatus] | None) -> str:
    """Render a registry holding only the hosts' collector, as /metrics does."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(HostCollector(lambda: hosts))
    return prometheus_client.generate_latest(registry).decode()


def test_each_host_gets_its_up_slots_free_slots_and_sessions() -> None:
    """Four gauges per host, labelled by its name, with its state, slots, free slots, sessions."""
    lines = set(scrape(HOSTS[:1]).splitlines())
    assert {
        'remotecli_host_up{host="w1"} 1.0',
        'remotecli_host_slots{host="w1"} 4.0',
        'remotecli_host_slots_free{host="w1"} 1.0',
        'remotecli_host_sessions{host="w1"} 3.0',
        "# TYPE remotecli_host_slots_free gauge",
    } <= lines


def test_a_host_name_is_escaped_as_every_label_value_is() -> None:
    """A quote or backslash in a host's name is escaped in the label, and a lost host is 0 up."""
    assert 'remotecli_host_up{host="odd\\"name\\\\x"} 0.0' in scrape(HOSTS).splitlines()


def test_a_driver_without_hosts_adds_no_series() -> None:
    """The local and qemu drivers (no hosts) add nothing; a cluster with no host yet neither."""
    assert "remotecli_host" not in scrape(None)
    assert "remotecli_host_up{" not in scrape([])


class PlacingDriver(BannerDriver):
    """The banner driver, saying it placed every session on host ``w1``, and listing that host."""

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        endpoint = await super().start(spec, progress)
        return dataclasses.replace(endpoint, host_name="w1")

    def hosts(self) -> Sequence[HostStatus]:  # type: ignore[override]
        """Host w1 with four slots, holding the sessions started and not stopped."""
        running = tuple(sorted(set(self.started) - set(self.stopped)))
        return [HostStatus("w1", "10.0.0.2", True, 4, 4 - len(running), running)]


async def test_readyz_metrics_and_the_session_name_the_host(tmp_path: Path) -> None:
    """/readyz's details list the driver's hosts, /metrics has their series, and a session the
    driver placed on w1 has host w1 in the store and in the API; /readyz's status stays bare."""
    config = ControllerConfig(
        listen=("127.0.0.1", 0), data_dir=tmp_path, metrics_token="metrics-token-0123456789"
    )
    controller = Controller(config, driver=PlacingDriver())
    await controller.start()
    try:
        admin = {"Authorization": f"Bearer {controller.admin_token}"}
        async with httpx.AsyncClient(base_url=controller.url(), timeout=5) as api:
            created = await api.post("/api/sessions", json={"provider": "shell"}, headers=admin)
            session_id = created.json()["id"]
            assert created.json()["host"] is None  # not placed yet
            path = f"/api/sessions/{session_id}"
            async with asyncio.timeout(10_000 * MS):
                while (body := (await api.get(path, headers=admin)).json())["state"] != "ready":
                    await asyncio.sleep(0.02)
            assert body["host"] == "w1"
            assert controller.manager is not None
            assert controller.manager.store.session(session_id).host == "w1"
            ready = (await api.get("/readyz", headers=admin)).json()
            assert ready["hosts"] == [
                {
                    "name": "w1",
                    "address": "10.0.0.2",
                    "up": True,
                    "slots": 4,
                    "slots_free": 3,
                    "sessions": [session_id],
                }
            ]
            assert (await api.get("/readyz")).json() == {"status": "ready"}
            metrics = (await api.get("/metrics", headers=admin)).text.splitlines()
            assert 'remotecli_host_sessions{host="w1"} 1.0' in metrics
            assert 'remotecli_host_slots_free{host="w1"} 3.0' in metrics
    finally:
        await controller.close()
