"""Connecting a provider through the API: kept sign-ins, links, callbacks, over real sockets.

The sessions are the honest in-test driver's (tests/banner_driver.py): its HOME is a dict the
test fills, its loopback is the host's, where the test stands in for the CLI's server. The
local driver's own side of each (the hostile HOME, the FIFO, the session's network namespace)
is proven in tests/test_driver_connect.py and tests/test_keep.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.config import ProviderConfig
from remotecli.providers import Catalogue
from tests.banner_driver import BannerDriver
from tests.conftest import MS
from tests.test_controller_api import ADMIN_TOKEN, BOB_TOKEN, Harness, base_config, start_harness

KEEP = ("~/.tool/auth.json",)
TOKEN = b'{"refresh_token": "rt-planted-8c1f"}'
TIMEOUT = 5000 * MS


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    tool = ProviderConfig(name="tool", command=("bash",), title="Tool", keep=KEEP)
    catalogue = Catalogue([tool], extra_bin_dirs=[])
    driver = BannerDriver()
    async for harness in start_harness(tmp_path, base_config(tmp_path), driver, catalogue):
        yield harness


async def ready_session(api: Harness, token: str = ADMIN_TOKEN) -> str:
    session_id = str((await api.create("tool", token=token))["id"])
    async with asyncio.timeout(TIMEOUT):
        while True:
            got = await api.client.get(f"/api/sessions/{session_id}", headers=api.auth(token))
            if got.json()["state"] == "ready":
                return session_id
            await asyncio.sleep(0.01)


async def delete(api: Harness, session_id: str, token: str = ADMIN_TOKEN) -> None:
    response = await api.client.delete(f"/api/sessions/{session_id}", headers=api.auth(token))
    assert response.status_code == 200


async def provider(api: Harness, token: str = ADMIN_TOKEN) -> dict[str, object]:
    response = await api.client.get("/api/providers", headers=api.auth(token))
    return next(p for p in response.json() if p["name"] == "tool")


async def test_a_sign_in_is_kept_at_the_end_and_restored_in_the_next_session(api: Harness) -> None:
    """Files a session wrote at the kept paths come back in the owner's next session of it."""
    assert (await provider(api))["connected"] is False
    first = await ready_session(api)
    api.driver.kept[first] = {".tool/auth.json": TOKEN}
    await delete(api, first)
    listed = await provider(api)
    assert listed["connected"] is True
    assert listed["connected_at"] is not None
    assert listed["updated_at"] is not None
    second = await ready_session(api)
    assert api.driver.specs[second].home_files == {".tool/auth.json": TOKEN}


async def test_another_user_never_gets_the_sign_in(api: Harness) -> None:
    """Bob's session of the same provider starts without Alice's files, and he is not connected."""
    first = await ready_session(api)
    api.driver.kept[first] = {".tool/auth.json": TOKEN}
    await delete(api, first)
    assert (await provider(api, BOB_TOKEN))["connected"] is False
    bobs = await ready_session(api, BOB_TOKEN)
    assert api.driver.specs[bobs].home_files == {}


async def test_disconnect_forgets_the_sign_in(api: Harness) -> None:
    """DELETE .../connection answers 204; then not connected, and sessions start empty."""
    first = await ready_session(api)
    api.driver.kept[first] = {".tool/auth.json": TOKEN}
    await delete(api, first)
    response = await api.client.delete("/api/providers/tool/connection", headers=api.auth())
    assert response.status_code == 204
    assert (await provider(api))["connected"] is False
    again = await ready_session(api)
    assert api.driver.specs[again].home_files == {}
    unknown = await api.client.delete("/api/providers/nope/connection", headers=api.auth())
    assert unknown.status_code == 422


async def test_an_older_session_never_overwrites_a_newer_sign_in(api: Harness) -> None:
    """Two sessions start from one version; the second to end cannot replace the first's save."""
    seed = await ready_session(api)
    api.driver.kept[seed] = {".tool/auth.json": b"v1"}
    await delete(api, seed)
    older, newer = await ready_session(api), await ready_session(api)
    api.driver.kept[newer] = {".tool/auth.json": b"rotated by newer"}
    await delete(api, newer)
    api.driver.kept[older] = {".tool/auth.json": b"stale refresh token"}
    await delete(api, older)
    kept = api.signins.load("admin", "tool")
    assert kept is not None
    assert kept.files == {".tool/auth.json": b"rotated by newer"}
    assert kept.version == 2


async def test_a_sign_in_is_kept_while_the_session_runs(api: Harness) -> None:
    """A change to the kept files is saved during the session, not only when it ends."""
    api.manager.keeper.interval = 0.02
    session_id = await ready_session(api)
    api.driver.kept[session_id] = {".tool/auth.json": TOKEN}
    async with asyncio.timeout(TIMEOUT):
        while (await provider(api))["connected"] is False:
            await asyncio.sleep(0.02)
    kept = api.signins.load("admin", "tool")
    assert kept is not None
    assert kept.files == {".tool/auth.json": TOKEN}


async def test_a_link_shows_in_the_session_and_as_an_event(api: Harness) -> None:
    """A link the session opens is the session's open_url and an open-url event on its stream."""
    session_id = await ready_session(api)
    url = "https://auth.example.test/authorize?state=s1"
    async with api.client.stream(
        "GET", f"/api/sessions/{session_id}/events", headers=api.auth()
    ) as stream:
        lines = stream.aiter_lines()
        assert await anext(lines) == "event: state"
        api.driver.specs[session_id].open_url(url)  # type: ignore[misc]
        async with asyncio.timeout(TIMEOUT):
            async for line in lines:
                if line == "event: open-url":
                    data = json.loads((await anext(lines)).removeprefix("data: "))
                    break
    assert data["url"] == url
    got = await api.client.get(f"/api/sessions/{session_id}", headers=api.auth())
    assert got.json()["open_url"] == url


async def cli_server(answer: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """Stand in for a CLI waiting for its sign-in redirect on the loopback."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


async def test_a_pasted_callback_reaches_the_cli(api: Harness) -> None:
    """The pasted localhost address is requested as the browser would; the CLI's answer returns."""
    server, port, seen = await cli_server(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nSigned in."
    )
    session_id = await ready_session(api)
    async with server:
        response = await api.client.post(
            f"/api/sessions/{session_id}/callback",
            json={"url": f"http://localhost:{port}/callback?code=c1&state=s1"},
            headers=api.auth(),
        )
    assert response.status_code == 200
    assert response.json() == {"status": 200, "body": "Signed in."}
    assert seen[0].startswith(b"GET /callback?code=c1&state=s1 HTTP/1.1\r\n")


async def test_callbacks_are_refused_where_they_must_be(api: Harness) -> None:
    """Other hosts get 400, someone else's session 404, a closed port 502, all as JSON errors."""
    session_id = await ready_session(api)
    path = f"/api/sessions/{session_id}/callback"
    bad = await api.client.post(path, json={"url": "http://192.0.2.1:80/"}, headers=api.auth())
    assert (bad.status_code, bad.json()["error"]) == (400, "bad_request")
    server, port, _ = await cli_server(b"")
    server.close()
    await server.wait_closed()
    closed = await api.client.post(
        path, json={"url": f"http://127.0.0.1:{port}/cb"}, headers=api.auth()
    )
    assert closed.status_code == 502
    assert "nothing listens" in closed.json()["message"]
    bobs = await api.client.post(
        path, json={"url": f"http://127.0.0.1:{port}/cb"}, headers=api.auth(BOB_TOKEN)
    )
    assert bobs.status_code == 404
