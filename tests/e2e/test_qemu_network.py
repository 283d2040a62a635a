"""A microVM session's network, tried from inside the guest through gateway and text view.

The guest is the attacker here: its shell (reached as its user reaches it, through the gateway's
text view) runs a probe that connects to targets and prints what each answered. QEMU opens the
guest's connections as sockets of its own on the host, so what matters is what the host lets
QEMU's sandbox uid reach.

Network rule of the test machine: traffic goes only to loopback or into namespaces these tests
create. "The internet" is a server in a test namespace at 198.51.100.1; "a private network" one
at 10.213.0.1; the host's side of each veth pair is one of the host's own addresses. A server saw
no connection when the first connection it ever answers is the test's own, made afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.images import GuestImage
from tests.e2e.sessions_api import create_ready_session
from tests.e2e.test_qemu import TEMPLATE_TIMEOUT, TIMEOUT, System, delete_and_wait, qemu_pid
from tests.e2e.test_qemu import image as image  # the module-scoped fixture, shared
from tests.e2e.test_qemu import pytestmark as QEMU_MARKS
from tests.test_network import BannerServer, Netns, internet, private, serialized

__all__ = ["image", "internet", "private", "serialized"]  # fixtures used by name

pytestmark = [
    *QEMU_MARKS,  # e2e, qemu, skipped without QEMU, one event loop per module
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
        reason="needs root, nft and ip: network namespaces and the host's egress filter",
    ),
]

SLIRP_HOST = "10.0.2.2"
"""The address QEMU's user-mode network maps to the host's own loopback."""

# Run in the guest: connect to each HOST:PORT argument, print "RESULT target answer|error".
PROBE = textwrap.dedent(
    """
    import errno, socket, sys
    for target in sys.argv[1:]:
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=6) as conn:
                conn.settimeout(6)
                outcome = "answer " + conn.recv(100).decode().strip().replace(" ", "_")
        except OSError as exc:
            outcome = "error " + (errno.errorcode.get(exc.errno or 0) or type(exc).__name__)
        print("RESULT", target, outcome, flush=True)
    print("PROBE", "DONE", flush=True)
    """
)
_RESULT = re.compile(r"RESULT (\S+) (answer|error) ([^\s\x1b]+)")

Probe = Callable[[list[str]], Awaitable[dict[str, str]]]


@pytest.fixture
def servers() -> Iterator[list[BannerServer]]:
    """Banner servers started by a test, killed at its end."""
    started: list[BannerServer] = []
    yield started
    for server in started:
        server.close()


async def start_system(image: GuestImage, data_dir: Path, egress: str) -> tuple[Controller, System]:
    cache = image.directory.parent
    driver = QemuBenchDriver(
        data_dir, image_cache=cache, template_cache=cache.parent / "templates", egress=egress
    )
    controller = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir, egress=egress),
        driver=driver,
    )
    await controller.start()
    return controller, System(controller.url(), controller.admin_token, driver)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def open_system(
    image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """A controller whose microVMs have egress ``open``."""
    controller, system = await start_system(image, tmp_path_factory.mktemp("open") / "d", "open")
    try:
        yield system
    finally:
        await controller.close()
        await system.driver.close()


async def probe_from_guest(system: System, targets: list[str]) -> dict[str, str]:
    """Start a session, run :data:`PROBE` in its shell through the text view, return outcomes."""
    script = base64.b64encode(PROBE.encode()).decode()
    command = f"echo {script} | base64 -d > /tmp/p.py; python3 /tmp/p.py {' '.join(targets)}\r"
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
        url = f"{system.ws_base}/api/sessions/{session_id}/tty?ticket={ticket}"
        seen = ""
        async with connect(url, subprotocols=[Subprotocol("tty")], max_size=None) as ws:
            await ws.send(json.dumps({"type": "resize", "cols": 200, "rows": 40}))
            await ws.send(command.encode())
            async with asyncio.timeout(TIMEOUT):
                while "PROBE DONE" not in seen:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        message = message.decode(errors="replace")
                    seen += message
        await delete_and_wait(api, session_id, pid)
    return {target: f"{kind} {detail}" for target, kind, detail in _RESULT.findall(seen)}


async def test_the_guest_reaches_the_internet_but_not_the_hosts_loopback_or_addresses(
    open_system: System, internet: Netns, private: Netns, servers: list[BannerServer]
) -> None:
    """With egress open, the guest gets an answer from a server on "the internet", and none
    from a listener on the host's 127.0.0.1 (through the user-mode network's alias for the
    host), on the host's own address, or on a private network: those listeners never saw it."""
    servers.append(BannerServer("internet", internet.address, 0, netns=internet.name))
    servers.append(BannerServer("loopback", "127.0.0.1", 0))
    servers.append(BannerServer("host", internet.host_address, 0))
    servers.append(BannerServer("private", private.address, 0, netns=private.name))
    world, loopback, host, lan = servers
    targets = {
        "internet": world.target(),
        "loopback": f"{SLIRP_HOST}:{loopback.port}",
        "loopback-direct": loopback.target(),
        "host": host.target(),
        "private": lan.target(),
    }
    outcome = await probe_from_guest(open_system, list(targets.values()))
    assert outcome[targets["internet"]] == "answer internet_#1", outcome
    for name in ("loopback", "loopback-direct", "host", "private"):
        assert outcome[targets[name]].startswith("error "), (name, outcome)
    # Each listener's first visitor is the test itself: the guest never got through.
    assert loopback.first_visit() == "loopback #1"
    assert host.first_visit() == "host #1"
    assert lan.first_visit(private.address) == "private #1"


async def test_egress_none_leaves_the_guest_no_way_out(
    image: GuestImage,
    tmp_path: Path,
    internet: Netns,
    servers: list[BannerServer],
) -> None:
    """With egress none, the guest reaches neither "the internet" nor the host's loopback."""
    servers.append(BannerServer("internet", internet.address, 0, netns=internet.name))
    servers.append(BannerServer("loopback", "127.0.0.1", 0))
    world, loopback = servers
    controller, system = await start_system(image, tmp_path / "data", "none")
    try:
        targets = [world.target(), f"{SLIRP_HOST}:{loopback.port}"]
        outcome = await probe_from_guest(system, targets)
    finally:
        await controller.close()
        await system.driver.close()
    assert all(outcome[target].startswith("error ") for target in targets), outcome
    assert world.first_visit() == "internet #1"
    assert loopback.first_visit() == "loopback #1"
