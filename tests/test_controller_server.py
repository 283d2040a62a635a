"""The whole controller in-process: gateway, API on its Unix socket, bridge, banner driver.

Checks the wiring: requests reach the API through the gateway, the bridge asks the session
manager for authorization, and the manager closes viewers when it stops a session.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from remotecli.controller.server import Controller
from tests.banner_driver import BANNER, banner_controller
from tests.conftest import MS
from tests.logins import login_cookie


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """A running controller (banner driver) with its admin user, on 127.0.0.1 port 0."""
    async with banner_controller(tmp_path / "data") as running:
        yield running


async def ready_session(client: httpx.AsyncClient) -> str:
    """Create a shell session and return its id once the event stream says ready."""
    session_id: str = (await client.post("/api/sessions", json={"provider": "shell"})).json()["id"]
    async with client.stream("GET", f"/api/sessions/{session_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["state"] == "ready":
                return session_id
    raise AssertionError("never ready")


def api_client(controller: Controller) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=controller.url(),
        headers={"Authorization": f"Bearer {controller.admin_token}"},
        timeout=5000 * MS,
    )


async def test_socket_is_private(controller: Controller) -> None:
    """The API's Unix socket is mode 0600, so only the controller's user can bypass the gateway."""
    assert controller.socket_path is not None
    assert controller.socket_path.stat().st_mode & 0o777 == 0o600


async def test_ticket_websocket_relays_and_delete_closes_it(controller: Controller) -> None:
    """A ticketed WebSocket gets the session's RFB banner; deleting the session closes it 1000."""
    async with api_client(controller) as client:
        session_id = await ready_session(client)
        ticket = (await client.post(f"/api/sessions/{session_id}/ticket")).json()["vnc_path"]
        host, port = controller.address
        async with connect(f"ws://{host}:{port}{ticket}", open_timeout=5000 * MS) as ws:
            assert await ws.recv() == BANNER
            deleted = await client.delete(f"/api/sessions/{session_id}")
            assert deleted.json()["state"] == "stopped"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1000


async def test_cookie_from_foreign_origin_refused_before_upgrade(controller: Controller) -> None:
    """A cookie-authenticated WebSocket from another site gets HTTP 403, not a silent close."""
    async with api_client(controller) as client:
        session_id = await ready_session(client)
    host, port = controller.address
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            f"ws://{host}:{port}/api/auth/session/{session_id}/novnc/websock",
            origin="http://evil.example",  # type: ignore[arg-type]
            additional_headers={"Cookie": login_cookie(controller)},
            open_timeout=5000 * MS,
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_metrics_cover_gateway_bridge_and_sessions(controller: Controller) -> None:
    """/metrics through the gateway serves the sessions', the bridge's and the gateway's series."""
    async with api_client(controller) as client:
        await ready_session(client)
        text = (await client.get("/metrics")).text
    assert "remotecli_session_transitions_total" in text
    assert "remotecli_bridge_viewers" in text
    assert "remotecli_gateway" in text
