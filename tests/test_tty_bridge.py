"""Tests for the text view: a real websockets client through a real Gateway to a tty server.

The tty server is a small, honest stand-in for the one the local driver runs in the sandbox:
a real Unix socket server that parses the controller's records (type, 4-byte length, payload),
writes input back as the terminal's output would echo it, and records resizes. What it leaves
out: no pseudo-terminal, no shell, no line discipline. The last tests run the whole controller
(gateway, API, session manager, bridge) with a banner driver that also serves such a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import prometheus_client
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from remotecli.config import ControllerConfig, GatewayConfig
from remotecli.controller.bridge import VncBridge
from remotecli.controller.server import Controller, add_user_token
from remotecli.controller.session_stream import WRITE_BUFFER_HIGH
from remotecli.controller.tty_bridge import TtyViewer
from remotecli.controller.viewers import TtyTarget, VncTarget
from remotecli.drivers.base import TtyEndpoint
from remotecli.exceptions import (
    Conflict,
    DriverError,
    Forbidden,
    NotAuthenticated,
    NotFound,
    RemoteCliError,
    TooManyRequests,
)
from remotecli.gateway import Gateway
from remotecli.tty import MAX_INPUT
from tests.banner_driver import BannerDriver
from tests.conftest import MS
from tests.logins import login_cookie

# Overriding event_loop_policy is deprecated in pytest-asyncio; its replacement hook lives in
# the shared conftest and would parametrize every test of the project.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')
TIMEOUT = 5_000 * MS
RESIZE_80_24 = json.dumps({"type": "resize", "cols": 80, "rows": 24})


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Run every test on both loops: production runs on uvloop, whose transports differ."""
    policy: asyncio.AbstractEventLoopPolicy = (
        uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()
    )
    return policy


async def until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, within the test timeout."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(5 * MS)


# --- the stand-in tty server ---------------------------------------------------------------------


@dataclass
class TtyServer:
    """A Unix socket server speaking the tty protocol's server side, as described above."""

    path: str
    server: asyncio.Server
    records: list[tuple[int, bytes]] = field(default_factory=list)
    resizes: list[tuple[int, int]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def input(self) -> bytes:
        """Return every input byte received so far, in order."""
        return b"".join(payload for kind, payload in self.records if kind == 0)

    def close(self) -> None:
        self.server.close()


async def start_tty(path: Path, *, read: bool = True) -> TtyServer:
    """Serve the stand-in on ``path``; ``read=False`` makes one that never reads its socket."""
    tty: TtyServer

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tty.writers.append(writer)
        if not read:
            await asyncio.sleep(3600)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                kind, length = struct.unpack("!BI", await reader.readexactly(5))
                if kind not in (0, 1) or (kind == 1 and length != 4) or length > MAX_INPUT:
                    break  # a real server would drop a controller that breaks the protocol
                payload = await reader.readexactly(length)
                tty.records.append((kind, payload))
                if kind == 0:
                    writer.write(payload)  # the terminal echoes what is typed
                    await writer.drain()
                else:
                    cols, rows = struct.unpack("!HH", payload)
                    tty.resizes.append((cols, rows))
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    tty = TtyServer(str(path), server)
    return tty


# --- a bridge behind a gateway, with an in-test authorizer ----------------------------------------


@dataclass
class Authorizer:
    """A small in-test authorizer: session s1's terminal is ``endpoint``; or a refusal."""

    endpoint: TtyEndpoint
    refusal: Exception | None = None
    calls: list[dict[str, str | None]] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    detached: list[tuple[str, int, int]] = field(default_factory=list)

    async def authorize_vnc(
        self,
        session_id: str,
        *,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        ticket: str | None,
        client: str = "unknown",
    ) -> VncTarget:
        raise NotFound("this test serves the text view only")

    async def authorize_tty(
        self,
        session_id: str,
        *,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        ticket: str | None,
        client: str = "unknown",
    ) -> TtyTarget:
        await asyncio.sleep(0)  # the driver is asked asynchronously
        self.calls.append({"session": session_id, "ticket": ticket, "origin": origin})
        if self.refusal is not None:
            raise self.refusal
        if session_id != "s1":
            raise NotFound(f"no session {session_id}")
        return TtyTarget(session_id, "admin", self.endpoint)

    def viewer_attached(self, session_id: str) -> None:
        self.attached.append(session_id)

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        self.detached.append((session_id, bytes_in, bytes_out))


@dataclass
class Stack:
    gateway: Gateway
    bridge: VncBridge
    authorizer: Authorizer
    registry: prometheus_client.CollectorRegistry

    def url(self, session: str = "s1", query: str = "") -> str:
        host, port = self.gateway.address
        return f"ws://{host}:{port}/api/sessions/{session}/tty{query}"

    def viewer(self) -> TtyViewer:
        """Return the one open text viewer."""
        (viewer,) = self.bridge.viewers
        assert isinstance(viewer, TtyViewer)
        return viewer


async def make_stack(terminal: str | TtyEndpoint) -> Stack:
    """A gateway and bridge whose session s1's terminal is ``terminal`` (a path: Unix socket)."""
    endpoint = TtyEndpoint(unix_path=terminal) if isinstance(terminal, str) else terminal
    authorizer = Authorizer(endpoint)
    registry = prometheus_client.CollectorRegistry()
    bridge = VncBridge(authorizer, tty_authorizer=authorizer, registry=registry)
    gateway = Gateway(GatewayConfig(listen=("127.0.0.1", 0)), bridge.local_upgrades())
    await gateway.start()
    return Stack(gateway, bridge, authorizer, registry)


@pytest.fixture
async def tty(tmp_path: Path) -> AsyncIterator[TtyServer]:
    server = await start_tty(tmp_path / "tty.sock")
    yield server
    server.close()


@pytest.fixture
async def stack(tty: TtyServer) -> AsyncIterator[Stack]:
    built = await make_stack(tty.path)
    yield built
    await built.gateway.shutdown(grace=0)


async def closed(ws: ClientConnection) -> tuple[int | None, str]:
    async with asyncio.timeout(TIMEOUT):
        await ws.wait_closed()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


async def received(ws: ClientConnection, size: int) -> bytes:
    """Read binary messages until ``size`` bytes came."""
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while len(data) < size:
            message = await ws.recv()
            assert isinstance(message, bytes)
            data += message
    return data


# --- relay ---------------------------------------------------------------------------------------


async def test_input_is_records_and_output_comes_back_binary(stack: Stack, tty: TtyServer) -> None:
    """Binary input arrives as type-0 records; the terminal's output returns as binary; counted."""
    async with connect(stack.url(query="?ticket=t1"), subprotocols=[Subprotocol("tty")]) as ws:
        assert ws.subprotocol == "tty"
        await ws.send(b"ls -l\r")
        await ws.send("é\r".encode())
        assert await received(ws, 9) == "ls -l\ré\r".encode()
    await until(lambda: bool(stack.authorizer.detached))
    assert tty.records == [(0, b"ls -l\r"), (0, "é\r".encode())]
    assert stack.authorizer.calls[0]["ticket"] == "t1"
    assert stack.authorizer.attached == ["s1"]
    assert stack.authorizer.detached == [("s1", 9, 9)]
    sample = stack.registry.get_sample_value
    assert sample("remotecli_tty_bytes_total", {"direction": "in"}) == 9
    assert sample("remotecli_tty_bytes_total", {"direction": "out"}) == 9
    assert sample("remotecli_tty_connections_total", {"outcome": "1000"}) == 1
    assert sample("remotecli_bridge_connections_total", {"outcome": "1000"}) is None


async def test_no_subprotocol_unless_offered(stack: Stack) -> None:
    """A viewer that offers no subprotocol gets none; one offering only others gets none."""
    async with connect(stack.url()) as ws:
        assert ws.subprotocol is None
    async with connect(stack.url(), subprotocols=[Subprotocol("binary")]) as ws:
        assert ws.subprotocol is None


async def test_large_input_is_split_into_64_kib_records(stack: Stack, tty: TtyServer) -> None:
    """A paste over 64 KiB arrives as records of at most 65536 bytes, in order, intact."""
    paste = os.urandom(150_000)
    async with connect(stack.url(), max_size=None) as ws:
        await ws.send(paste)
        assert await received(ws, len(paste)) == paste
    assert [len(payload) for _, payload in tty.records] == [65536, 65536, 18928]
    assert tty.input() == paste


async def test_fragmented_input_keeps_its_order(stack: Stack, tty: TtyServer) -> None:
    """A fragmented binary message reaches the terminal byte for byte."""
    async with connect(stack.url()) as ws:
        await ws.send([b"echo ", b"hello", b"\r"])
        assert await received(ws, 11) == b"echo hello\r"
    assert tty.input() == b"echo hello\r"


async def test_resize_becomes_a_type_1_record(stack: Stack, tty: TtyServer) -> None:
    """A resize JSON message, whole or fragmented, reaches the terminal as a type-1 record."""
    async with connect(stack.url()) as ws:
        await ws.send(RESIZE_80_24)
        await ws.send(['{"type": "resize", ', '"cols": 1000, ', '"rows": 1}'])
        await ws.send(b"x")
        assert await received(ws, 1) == b"x"  # records are handled in order
    assert tty.resizes == [(80, 24), (1000, 1)]
    assert tty.records[:2] == [(1, b"\x00\x50\x00\x18"), (1, b"\x03\xe8\x00\x01")]


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("resize 80 24", "not JSON"),
        ('{"type": "resize", "cols": 0, "rows": 24}', "cols must be an integer from 1 to 1000"),
        ('{"type": "resize", "cols": 80, "rows": 2000}', "rows must be an integer from 1 to 1000"),
        ('{"type": "resize", "cols": 80}', "rows must be an integer"),
        ('{"type": "paste", "data": "rm -rf ~"}', "unknown control message type 'paste'"),
        ("[80, 24]", "not an object"),
    ],
)
async def test_bad_control_message_closes_1008_with_the_reason(
    stack: Stack, tty: TtyServer, message: str, says: str
) -> None:
    """Text that is not a valid resize closes with 1008 and says what was wrong."""
    async with connect(stack.url()) as ws:
        await ws.send(message)
        code, reason = await closed(ws)
    assert code == 1008
    assert says in reason
    assert tty.resizes == []


async def test_oversized_control_message_closes_1009(stack: Stack) -> None:
    """A control message over 4 KiB, even in fragments, closes with 1009."""
    async with connect(stack.url()) as ws:
        await ws.send(["{" + " " * 3000, " " * 3000 + "}"])
        code, reason = await closed(ws)
    assert code == 1009
    assert "over 4096 bytes" in reason


async def test_invalid_utf8_text_closes_1007(stack: Stack) -> None:
    """A text frame that is not UTF-8 is refused by the frame reader with 1007."""
    async with connect(stack.url()) as ws:
        # A text frame carrying "\xff", masked with a zero key, written under the client.
        ws.transport.write(b"\x81\x81\x00\x00\x00\x00\xff")
        code, _ = await closed(ws)
    assert code == 1007


async def test_backpressure_pauses_the_tty_side_for_a_slow_viewer(tmp_path: Path) -> None:
    """A viewer that does not read makes the bridge stop reading the terminal, bounded buffers."""
    total = 32 * 1024 * 1024
    sent = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = bytes(range(256)) * 256
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        sent.set()
        await reader.read()

    path = str(tmp_path / "flood.sock")
    server = await asyncio.start_unix_server(flood, path)
    stack = await make_stack(path)
    try:
        async with connect(stack.url(), max_size=None, max_queue=1) as ws:
            await until(lambda: bool(stack.bridge.viewers) and stack.viewer().upstream is not None)
            upstream = stack.viewer().upstream
            assert upstream is not None
            assert upstream.transport is not None
            transport = upstream.transport
            await until(lambda: not transport.is_reading())
            viewer_transport = stack.viewer().transport
            assert viewer_transport is not None
            assert viewer_transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH + (1 << 18)
            assert not sent.is_set()
            assert len(await received(ws, total)) == total
    finally:
        await stack.gateway.shutdown(grace=0)
        server.close()


async def test_backpressure_pauses_a_viewer_the_terminal_does_not_read(tmp_path: Path) -> None:
    """When the terminal stops reading, the bridge stops reading the viewer, bounded buffers."""
    tty = await start_tty(tmp_path / "deaf.sock", read=False)
    stack = await make_stack(tty.path)
    try:
        async with connect(stack.url(), max_size=None) as ws:
            chunk = os.urandom(1 << 20)

            async def type_forever() -> None:
                while True:
                    await ws.send(chunk)

            typing = asyncio.create_task(type_forever())
            await until(lambda: bool(stack.bridge.viewers) and stack.viewer().transport is not None)
            viewer = stack.viewer()
            assert viewer.transport is not None
            transport = viewer.transport
            await until(lambda: not transport.is_reading())
            assert viewer.upstream is not None
            assert viewer.upstream.transport is not None
            backlog = viewer.upstream.transport.get_write_buffer_size()
            assert backlog <= WRITE_BUFFER_HIGH + (4 << 20)  # a read's worth of frames at most
            typing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await typing
            await stack.bridge.close_viewers("s1", 1000, "session stopped")
            code, reason = await closed(ws)  # the close is read past the backlog, not timed out
            assert (code, reason) == (1000, "session stopped")
    finally:
        await stack.gateway.shutdown(grace=0)
        tty.close()


# --- closing -------------------------------------------------------------------------------------


async def test_terminal_gone_closes_1011_with_reason(stack: Stack, tty: TtyServer) -> None:
    """When the terminal server closes its side, the viewer gets 1011 and the reason."""
    async with connect(stack.url()) as ws:
        await ws.send(b"x")
        await received(ws, 1)
        tty.writers[0].transport.abort()
        code, reason = await closed(ws)
    assert code == 1011
    assert "the terminal server closed the connection" in reason


async def test_missing_terminal_socket_closes_1011_naming_it(tmp_path: Path) -> None:
    """A terminal socket that cannot be reached is reported with 1011 naming the socket."""
    missing = str(tmp_path / "absent.sock")
    stack = await make_stack(missing)
    try:
        async with connect(stack.url()) as ws:
            code, reason = await closed(ws)
        assert code == 1011
        assert f"unix:{missing}" in reason
    finally:
        await stack.gateway.shutdown(grace=0)


async def test_driver_without_terminal_closes_1011_with_its_reason(stack: Stack) -> None:
    """A driver that cannot name the terminal socket upgrades, then closes 1011 saying why."""
    stack.authorizer.refusal = DriverError("the qemu driver has no text terminal; use VNC")
    async with connect(stack.url()) as ws:
        code, reason = await closed(ws)
    assert code == 1011
    assert "has no text terminal" in reason
    assert "use VNC" in reason


async def test_close_viewers_closes_text_viewers(stack: Stack) -> None:
    """close_viewers() closes the session's text viewers with the given code and reason."""
    async with connect(stack.url()) as ws:
        await stack.bridge.close_viewers("s1", 1000, "session stopped")
        code, reason = await closed(ws)
    assert (code, reason) == (1000, "session stopped")


async def test_gateway_shutdown_closes_1001(stack: Stack) -> None:
    """Shutting the gateway down closes text viewers with 1001."""
    async with connect(stack.url()) as ws:
        await stack.gateway.shutdown(grace=0)
        code, reason = await closed(ws)
    assert (code, reason) == (1001, "server shutting down")


async def test_no_text_path_without_a_tty_authorizer(tty: TtyServer) -> None:
    """A bridge built without a TtyAuthorizer serves the VNC paths only."""
    bridge = VncBridge(Authorizer(TtyEndpoint(unix_path=tty.path)))
    assert [u.pattern.pattern for u in bridge.local_upgrades()] == [
        r"/api/sessions/(?P<id>[A-Za-z0-9_-]{1,64})/vnc",
        r"/api/auth/session/(?P<id>[A-Za-z0-9_-]{1,64})/novnc/websock",
    ]


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (NotAuthenticated("log in or ask for a ticket"), 401),
        (Forbidden("the ticket was already used"), 403),
        (NotFound("no session s1"), 404),
        (Conflict("session s1 is starting; wait for ready"), 409),
        (TooManyRequests("too many wrong credentials", retry_after=9), 429),
    ],
)
async def test_refusals_are_http_statuses_before_the_upgrade(
    stack: Stack, refusal: RemoteCliError, status: int
) -> None:
    """An authorizer refusal is an HTTP response with its status and a JSON error and message."""
    stack.authorizer.refusal = refusal
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url()):
            pass
    response = caught.value.response
    assert response.status_code == status
    assert json.loads(response.body) == {"error": refusal.kind, "message": refusal.message}
    assert stack.authorizer.attached == []


async def test_authorizer_bug_is_500(stack: Stack) -> None:
    """An unexpected error in the authorizer is answered 500, not a dropped connection."""
    stack.authorizer.refusal = ZeroDivisionError("an authorizer bug")
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url()):
            pass
    assert caught.value.response.status_code == 500


async def test_after_shutdown_new_text_viewers_get_503(stack: Stack) -> None:
    """Once the bridge is shutting down, a new text viewer is refused with 503."""
    await stack.bridge.shutdown()
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url()):
            pass
    assert caught.value.response.status_code == 503


# --- the whole controller ------------------------------------------------------------------------


class TtyBannerDriver(BannerDriver):
    """The banner driver, whose sessions also serve the stand-in terminal on a Unix socket."""

    def __init__(self, socket_dir: Path) -> None:
        super().__init__()
        self.socket_dir = socket_dir
        self.terminals: dict[str, TtyServer] = {}

    async def tty_socket(self, session_id: str) -> str:
        """Return the session's terminal socket, serving it on first use."""
        if session_id not in self.running():
            raise DriverError(f"session {session_id} is not running")
        if session_id not in self.terminals:
            path = self.socket_dir / f"{session_id}.sock"
            self.terminals[session_id] = await start_tty(path)
        return self.terminals[session_id].path

    async def stop(self, session_id: str) -> None:
        """Stop the session and its terminal."""
        terminal = self.terminals.pop(session_id, None)
        if terminal is not None:
            terminal.close()
        await super().stop(session_id)


@dataclass
class Running:
    controller: Controller
    driver: TtyBannerDriver
    client: httpx.AsyncClient
    bob_token: str

    def url(self, path: str) -> str:
        host, port = self.controller.address
        return f"ws://{host}:{port}{path}"

    @property
    def origin(self) -> str:
        host, port = self.controller.address
        return f"http://{host}:{port}"

    async def ready_session(self, client: httpx.AsyncClient | None = None) -> str:
        """Create a shell session and return its id once the event stream says ready."""
        client = client or self.client
        session_id: str = (await client.post("/api/sessions", json={"provider": "shell"})).json()[
            "id"
        ]
        async with client.stream("GET", f"/api/sessions/{session_id}/events") as response:
            async for line in response.aiter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["state"] == "ready":
                    return session_id
        raise AssertionError("never ready")

    async def ticket(self, session_id: str) -> str:
        response = await self.client.post(f"/api/sessions/{session_id}/ticket")
        ticket: str = response.json()["ticket"]
        return ticket


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """A whole controller on 127.0.0.1 port 0 whose sessions also have a text terminal."""
    driver = TtyBannerDriver(tmp_path)
    config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=tmp_path / "data")
    controller = Controller(config, driver=driver)
    await controller.start()
    assert controller.store is not None
    bob = add_user_token(controller.store, "bob")
    client = httpx.AsyncClient(
        base_url=controller.url(),
        headers={"Authorization": f"Bearer {controller.admin_token}"},
        timeout=TIMEOUT,
    )
    try:
        yield Running(controller, driver, client, bob)
    finally:
        await client.aclose()
        await controller.close()


async def refused(url: str, **options: object) -> int:
    """Open ``url`` expecting a refusal; return its HTTP status."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url, open_timeout=TIMEOUT, **options):  # type: ignore[arg-type]
            pass
    status: int = caught.value.response.status_code
    return status


async def test_ticket_opens_the_text_view_and_delete_closes_it_1000(running: Running) -> None:
    """A ticket from the API opens the terminal; typing echoes; deleting the session closes 1000."""
    session_id = await running.ready_session()
    ticket = await running.ticket(session_id)
    async with connect(running.url(f"/api/sessions/{session_id}/tty?ticket={ticket}")) as ws:
        await ws.send(RESIZE_80_24)
        await ws.send(b"whoami\r")
        assert await received(ws, 7) == b"whoami\r"
        assert running.controller.manager is not None
        assert running.controller.manager.viewers(session_id) == 1  # never idle while watched
        terminal = running.driver.terminals[session_id]
        assert terminal.resizes == [(80, 24)]
        deleted = await running.client.delete(f"/api/sessions/{session_id}")
        assert deleted.json()["state"] == "stopped"
        code, reason = await closed(ws)
    assert (code, reason) == (1000, "session stopped")
    session = (await running.client.get(f"/api/sessions/{session_id}")).json()
    assert (session["bytes_in"], session["bytes_out"]) == (7, 7)


async def test_a_ticket_works_once_across_both_views(running: Running) -> None:
    """A ticket redeemed on the text view is used up for the VNC view too (403)."""
    session_id = await running.ready_session()
    ticket = await running.ticket(session_id)
    async with connect(running.url(f"/api/sessions/{session_id}/tty?ticket={ticket}")):
        pass
    assert await refused(running.url(f"/api/sessions/{session_id}/vnc?ticket={ticket}")) == 403


async def test_no_credentials_is_401(running: Running) -> None:
    """The text view without a ticket or cookie is refused with 401 before the upgrade."""
    session_id = await running.ready_session()
    assert await refused(running.url(f"/api/sessions/{session_id}/tty")) == 401


async def test_another_users_session_is_404(running: Running) -> None:
    """Someone else's session answers 404 on the text view, as one that does not exist."""
    session_id = await running.ready_session()
    cookie = {"Cookie": login_cookie(running.controller, "bob")}
    status = await refused(
        running.url(f"/api/sessions/{session_id}/tty"),
        origin=running.origin,
        additional_headers=cookie,
    )
    assert status == 404
    assert await refused(running.url("/api/sessions/nosuchsession/tty?ticket=x")) == 403


async def test_a_ticket_for_one_session_is_refused_on_another(running: Running) -> None:
    """A ticket issued for session A does not open session B's terminal (403)."""
    first = await running.ready_session()
    second = await running.ready_session()
    ticket = await running.ticket(first)
    assert await refused(running.url(f"/api/sessions/{second}/tty?ticket={ticket}")) == 403


async def test_cookie_from_another_site_is_403(running: Running) -> None:
    """The login cookie with a cross-site Origin is refused with 403; same-origin opens."""
    session_id = await running.ready_session()
    cookie = {"Cookie": login_cookie(running.controller)}
    url = running.url(f"/api/sessions/{session_id}/tty")
    assert await refused(url, origin="http://evil.example", additional_headers=cookie) == 403
    async with connect(url, origin=running.origin, additional_headers=cookie) as ws:  # type: ignore[arg-type]
        await ws.send(b"ok")
        assert await received(ws, 2) == b"ok"


async def test_session_not_ready_is_409(running: Running) -> None:
    """A session still starting refuses the text view with 409."""
    running.driver.gate = asyncio.Event()
    response = await running.client.post("/api/sessions", json={"provider": "shell"})
    session_id = response.json()["id"]
    ticket = await running.ticket(session_id)
    assert await refused(running.url(f"/api/sessions/{session_id}/tty?ticket={ticket}")) == 409
    running.driver.gate.set()
