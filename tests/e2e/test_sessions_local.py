"""Issue 3 end to end: sessions on the local driver, seen through the gateway over WebSocket.

The controller runs as ``remotecli up`` runs it (gateway + API + VNC bridge in one event loop,
real Xvnc, tmux, xterm and bubblewrap). One test also runs the real ``remotecli up`` command.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from remotecli.auth import TicketBook
from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.local_channels import sandbox_pids
from tests.conftest import MS
from tests.e2e.sessions_api import create_ready_session
from tests.logins import login_cookie
from tests.rfb_viewer import RfbViewer, wait_for_file

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        any(shutil.which(p) is None for p in ("Xvnc", "xterm", "tmux")),
        reason="Xvnc, xterm and tmux are needed: run scripts/install-system-deps.sh run",
    ),
]
TIMEOUT = 20_000 * MS
PATHS = ["/api/sessions/{id}/vnc", "/api/auth/session/{id}/novnc/websock"]
BINARY = Subprotocol("binary")


@dataclass
class System:
    base: str  # http://127.0.0.1:PORT
    token: str
    data_dir: Path
    controller: Controller | None = None

    @property
    def ws_base(self) -> str:
        return "ws" + self.base.removeprefix("http")

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=TIMEOUT
        )


@pytest.fixture
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    # A short data dir: the session's VNC socket path must fit a Unix socket address.
    data_dir = tmp_path_factory.mktemp("e2e") / "data"
    controller = Controller(ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir))
    await controller.start()
    try:
        yield System(controller.url(), controller.admin_token, data_dir, controller)
    finally:
        await controller.close()


async def ticket_for(api: httpx.AsyncClient, session_id: str) -> str:
    response = await api.post(f"/api/sessions/{session_id}/ticket")
    assert response.status_code == 200, response.text
    ticket: str = response.json()["ticket"]
    return ticket


def processes_of(data_dir: Path, session_id: str) -> list[int]:
    return sandbox_pids(data_dir / "sessions" / session_id)


async def prove_typing(ws: ClientConnection, home: Path) -> None:
    """Full RFB handshake, non-blank framebuffer, and typed keys that write ~/proof.txt."""

    async def receive() -> bytes:
        data = await ws.recv()
        assert isinstance(data, bytes)
        return data

    viewer = RfbViewer(receive, ws.send)
    init = await asyncio.wait_for(viewer.handshake(), TIMEOUT)
    assert init.width > 0
    assert init.height > 0
    await viewer.wait_non_blank(TIMEOUT)
    await viewer.type("echo proof > ~/proof.txt\n")
    assert await wait_for_file(home / "proof.txt", TIMEOUT, "proof\n") == "proof\n"


async def delete_and_check_no_process(api: httpx.AsyncClient, system: System, sid: str) -> None:
    pids = processes_of(system.data_dir, sid)
    assert pids
    deleted = await api.delete(f"/api/sessions/{sid}")
    assert deleted.status_code in (200, 202), deleted.text
    async with asyncio.timeout(TIMEOUT):
        while (await api.get(f"/api/sessions/{sid}")).json()["state"] != "stopped":
            await asyncio.sleep(50 * MS)
        while alive := [pid for pid in pids if Path(f"/proc/{pid}").exists()]:
            await asyncio.sleep(20 * MS)
    assert alive == []


@pytest.mark.parametrize("path", PATHS)
async def test_shell_session_through_the_gateway(system: System, path: str) -> None:
    """A shell session is created, streamed over the WebSocket, typed into, and deleted."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TIMEOUT)
        ticket = await ticket_for(api, session_id)
        url = f"{system.ws_base}{path.format(id=session_id)}?ticket={ticket}"
        async with connect(url, subprotocols=[BINARY], max_size=None) as ws:
            assert ws.subprotocol == "binary"
            await prove_typing(ws, system.data_dir / "sessions" / session_id / "home")
        await delete_and_check_no_process(api, system, session_id)


async def test_reused_and_expired_tickets_are_refused(system: System) -> None:
    """A ticket works once; a second use and a ticket past its 60 s are refused with 403."""
    now = [0.0]
    assert system.controller is not None
    assert system.controller.manager is not None
    assert system.controller.identity is not None
    book = TicketBook(clock=lambda: now[0])  # the manager issues, the identity redeems
    system.controller.manager.tickets = system.controller.identity.tickets = book
    async with system.api() as api:
        session_id = await create_ready_session(api, TIMEOUT)
        ticket = await ticket_for(api, session_id)
        url = f"{system.ws_base}/api/sessions/{session_id}/vnc?ticket="
        async with connect(url + ticket):
            pass
        with pytest.raises(InvalidStatus) as reused:
            async with connect(url + ticket):
                pass
        assert reused.value.response.status_code == 403
        late = await ticket_for(api, session_id)
        now[0] += 61
        with pytest.raises(InvalidStatus) as expired:
            async with connect(url + late):
                pass
        assert expired.value.response.status_code == 403
        assert b"expired" in expired.value.response.body


async def test_cookie_needs_an_allowed_origin(system: System) -> None:
    """The login cookie opens the WebSocket from the same origin and is refused from another."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TIMEOUT)
    url = f"{system.ws_base}/api/auth/session/{session_id}/novnc/websock"
    assert system.controller is not None
    cookie = {"Cookie": login_cookie(system.controller)}
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers={**cookie, "Origin": "http://evil.example"}):
            pass
    assert refused.value.response.status_code == 403
    async with connect(url, additional_headers={**cookie, "Origin": system.base}) as ws:
        assert ws.protocol.state.name == "OPEN"


async def test_remotecli_up_serves_a_session_and_stops_it_on_sigterm(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`remotecli up` prints a login URL, serves a typed-into session, and SIGTERM ends it all."""
    data_dir = tmp_path_factory.mktemp("up") / "data"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "remotecli", "up", "--listen", "127.0.0.1:0",
        "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "REMOTECLI_TOKEN": ""},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        match = None
        async with asyncio.timeout(TIMEOUT):
            while match is None:
                line = (await process.stdout.readline()).decode()
                assert line, "remotecli up exited before printing its URL"
                match = re.search(r"(http://[^/\s]+)/login\?token=(\S+)", line)
        system = System(match.group(1), match.group(2), data_dir)
        async with system.api() as api:
            session_id = await create_ready_session(api, TIMEOUT)
            pids = processes_of(data_dir, session_id)
            ticket = await ticket_for(api, session_id)
            url = f"{system.ws_base}/api/sessions/{session_id}/vnc?ticket={ticket}"
            async with connect(url, subprotocols=[BINARY], max_size=None) as ws:
                await prove_typing(ws, data_dir / "sessions" / session_id / "home")
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
                assert ws.close_code == 1001
        assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
        assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
