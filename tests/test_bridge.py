"""Tests for the VNC bridge: a real websockets client through a real Gateway to real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import prometheus_client
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from remotecli.config import GatewayConfig
from remotecli.controller.bridge import VncBridge
from remotecli.controller.session_stream import WRITE_BUFFER_HIGH
from remotecli.controller.viewers import VncTarget
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import (
    Conflict,
    Forbidden,
    NotAuthenticated,
    NotFound,
    RemoteCliError,
    TooManyRequests,
)
from remotecli.gateway import Gateway
from tests.conftest import MS
from tests.rfb_viewer import RfbViewer

# Overriding event_loop_policy is deprecated in pytest-asyncio; its replacement hook lives in
# the shared conftest and would parametrize every test of the project.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')
TIMEOUT = 5_000 * MS
PATHS = ["/api/sessions/{id}/vnc", "/api/auth/session/{id}/novnc/websock"]


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Run every bridge test on both loops: production runs on uvloop, whose transports differ."""
    policy: asyncio.AbstractEventLoopPolicy = (
        uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()
    )
    return policy


@dataclass
class Authorizer:
    """A small in-test authorizer: one session, one ticket, a configurable refusal."""

    endpoint: VncEndpoint
    refusal: Exception | None = None
    calls: list[dict[str, str | None]] = field(default_factory=list)
    attached: list[str] = field(default_factory=list)
    detached: list[tuple[str, int, int]] = field(default_factory=list)
    detached_event: asyncio.Event = field(default_factory=asyncio.Event)

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
        self.calls.append(
            {
                "session": session_id,
                "cookie": cookie_header,
                "origin": origin,
                "host": host,
                "ticket": ticket,
            }
        )
        if self.refusal is not None:
            raise self.refusal
        if session_id != "s1":
            raise NotFound(f"no session {session_id}")
        return VncTarget(session_id, "admin", self.endpoint)

    def viewer_attached(self, session_id: str) -> None:
        self.attached.append(session_id)

    def viewer_detached(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        self.detached.append((session_id, bytes_in, bytes_out))
        self.detached_event.set()


@dataclass
class EchoServer:
    """A real Unix or TCP server that echoes bytes, or closes on demand."""

    endpoint: VncEndpoint
    server: asyncio.Server
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


async def start_echo(tmp_path: Path, kind: str) -> EchoServer:
    writers: list[asyncio.StreamWriter] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    if kind == "unix":
        path = str(tmp_path / "echo.sock")
        server = await asyncio.start_unix_server(echo, path)
        return EchoServer(VncEndpoint(unix_path=path), server, writers)
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return EchoServer(VncEndpoint(host="127.0.0.1", port=port), server, writers)


@dataclass
class Stack:
    gateway: Gateway
    bridge: VncBridge
    authorizer: Authorizer
    registry: prometheus_client.CollectorRegistry

    def url(self, path: str = PATHS[0], session: str = "s1", query: str = "") -> str:
        host, port = self.gateway.address
        return f"ws://{host}:{port}{path.format(id=session)}{query}"


async def make_stack(endpoint: VncEndpoint, ping_interval: float = 20.0) -> Stack:
    authorizer = Authorizer(endpoint)
    registry = prometheus_client.CollectorRegistry()
    bridge = VncBridge(authorizer, ping_interval=ping_interval, registry=registry)
    gateway = Gateway(GatewayConfig(listen=("127.0.0.1", 0)), bridge.local_upgrades())
    await gateway.start()
    return Stack(gateway, bridge, authorizer, registry)


@pytest.fixture
async def echo(tmp_path: Path) -> AsyncIterator[EchoServer]:
    server = await start_echo(tmp_path, "unix")
    yield server
    server.server.close()


@pytest.fixture
async def stack(echo: EchoServer) -> AsyncIterator[Stack]:
    built = await make_stack(echo.endpoint)
    yield built
    await built.gateway.shutdown(grace=0)


async def closed(ws: ClientConnection) -> tuple[int | None, str]:
    async with asyncio.timeout(TIMEOUT):
        await ws.wait_closed()
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason or ""


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_relays_binary_both_ways_and_counts_bytes(
    tmp_path: Path, path: str, kind: str
) -> None:
    """Binary messages reach the VNC endpoint and come back; bytes are counted per session."""
    server = await start_echo(tmp_path, kind)
    stack = await make_stack(server.endpoint)
    try:
        async with connect(stack.url(path, query="?ticket=t1")) as ws:
            assert ws.subprotocol is None
            await ws.send(b"hello")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"hello"
        await asyncio.wait_for(stack.authorizer.detached_event.wait(), TIMEOUT)
        assert stack.authorizer.calls[0]["ticket"] == "t1"
        assert stack.authorizer.attached == ["s1"]
        assert stack.authorizer.detached == [("s1", 5, 5)]
        sample = stack.registry.get_sample_value
        assert sample("remotecli_bridge_bytes_total", {"direction": "in"}) == 5
        assert sample("remotecli_bridge_connections_total", {"outcome": "1000"}) == 1
    finally:
        await stack.gateway.shutdown(grace=0)
        server.server.close()


async def test_large_and_fragmented_messages_arrive_intact(stack: Stack) -> None:
    """Messages split across reads and fragmented messages reach the VNC side byte for byte."""
    payload = os.urandom(300_000)
    async with connect(stack.url(), max_size=None) as ws:
        await ws.send(payload)
        await ws.send([payload[:1000], payload[1000:70_000], payload[70_000:]])
        received = b""
        async with asyncio.timeout(TIMEOUT):
            while len(received) < 2 * len(payload):
                message = await ws.recv()
                assert isinstance(message, bytes)
                received += message
        assert received == payload + payload
        pong = await ws.ping()
        await asyncio.wait_for(pong, TIMEOUT)  # the viewer's own pings are answered


async def test_accepts_binary_subprotocol_when_offered(stack: Stack) -> None:
    """A viewer offering `binary` (noVNC) gets it; credentials headers reach the authorizer."""
    headers = {"Cookie": "remotecli_token=x", "Origin": "http://example.test"}
    async with connect(
        stack.url(),
        subprotocols=[Subprotocol("binary")],
        additional_headers=headers,
    ) as ws:
        assert ws.subprotocol == "binary"
    call = stack.authorizer.calls[0]
    assert call["cookie"] == "remotecli_token=x"
    assert call["origin"] == "http://example.test"
    assert call["host"] is not None
    assert call["host"].startswith("127.0.0.1:")


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (NotAuthenticated("log in or ask for a ticket"), 401),
        (Forbidden("the ticket was already used"), 403),
        (NotFound("no session s1"), 404),
        (Conflict("session s1 is starting; wait for ready"), 409),
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


async def test_refusals_are_json_with_retry_after_past_the_limit(stack: Stack) -> None:
    """A refusal answers JSON `error` and `message`, with Retry-After when the error has one."""
    stack.authorizer.refusal = TooManyRequests("too many wrong credentials", retry_after=9)
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url()):
            pass
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Retry-After"] == "9"
    assert json.loads(response.body) == {
        "error": "too_many_requests",
        "message": "too many wrong credentials",
    }


async def test_after_bridge_shutdown_new_viewers_get_503(stack: Stack) -> None:
    """Once the bridge is shutting down, a new viewer is refused with 503, not a silent close."""
    await stack.bridge.shutdown()
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url()):
            pass
    assert caught.value.response.status_code == 503


async def test_authorizer_bug_is_500_with_a_reason(stack: Stack) -> None:
    """An unexpected error in the authorizer is answered 500 with a plain-text reason."""
    stack.authorizer.refusal = ZeroDivisionError("an authorizer bug")
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url()):
            pass
    assert caught.value.response.status_code == 500
    assert b"internal error" in caught.value.response.body


async def test_unknown_session_is_404(stack: Stack) -> None:
    """A session the authorizer does not know is refused with 404 on the compatibility path."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(stack.url(PATHS[1], session="nope")):
            pass
    assert caught.value.response.status_code == 404


async def test_text_frame_closes_1003(stack: Stack) -> None:
    """A text frame from the viewer closes the WebSocket with 1003."""
    async with connect(stack.url()) as ws:
        await ws.send("text")
        code, reason = await closed(ws)
    assert code == 1003
    assert "binary" in reason


async def test_vnc_endpoint_gone_closes_1011_with_reason(stack: Stack, echo: EchoServer) -> None:
    """When the VNC server closes its side, the viewer gets 1011 and the reason."""
    async with connect(stack.url()) as ws:
        await ws.send(b"x")
        await asyncio.wait_for(ws.recv(), TIMEOUT)
        echo.writers[0].transport.abort()
        code, reason = await closed(ws)
    assert code == 1011
    assert "VNC server closed the connection" in reason


async def test_vnc_endpoint_missing_closes_1011_naming_it(tmp_path: Path) -> None:
    """A VNC endpoint that cannot be reached is reported with 1011 naming the endpoint."""
    missing = VncEndpoint(unix_path=str(tmp_path / "absent.sock"))
    stack = await make_stack(missing)
    try:
        async with connect(stack.url()) as ws:
            code, reason = await closed(ws)
        assert code == 1011
        assert f"unix:{missing.unix_path}" in reason
    finally:
        await stack.gateway.shutdown(grace=0)


async def test_gateway_shutdown_closes_1001(stack: Stack) -> None:
    """Shutting the gateway down closes open viewers with 1001."""
    async with connect(stack.url()) as ws:
        await stack.gateway.shutdown(grace=0)
        code, reason = await closed(ws)
    assert (code, reason) == (1001, "server shutting down")


async def test_close_viewers_of_a_session(stack: Stack) -> None:
    """close_viewers() closes that session's viewers with the given code and reason."""
    async with connect(stack.url()) as ws:
        await stack.bridge.close_viewers("s1", 1000, "session stopped")
        code, reason = await closed(ws)
    assert (code, reason) == (1000, "session stopped")


async def test_pings_and_closes_1011_when_unanswered(echo: EchoServer) -> None:
    """The bridge pings every interval, and closes 1011 when a ping goes unanswered."""
    stack = await make_stack(echo.endpoint, ping_interval=100 * MS)
    try:
        host, port = stack.gateway.address
        reader, writer = await asyncio.open_connection(host, port)
        client = ClientProtocol(parse_uri(stack.url()))
        client.send_request(client.connect())
        writer.write(b"".join(client.data_to_send()))
        frames: list[Frame] = []
        async with asyncio.timeout(TIMEOUT):
            while not any(f.opcode is Opcode.CLOSE for f in frames):
                data = await reader.read(1 << 16)
                if not data:
                    break
                client.receive_data(data)
                frames += [e for e in client.events_received() if isinstance(e, Frame)]
        opcodes = [f.opcode for f in frames]
        assert opcodes[0] is Opcode.PING
        assert client.close_rcvd is not None
        assert client.close_rcvd.code == 1011
        assert "ping" in client.close_rcvd.reason
        writer.close()
    finally:
        await stack.gateway.shutdown(grace=0)


async def test_backpressure_pauses_the_vnc_side_for_a_slow_viewer(tmp_path: Path) -> None:
    """A viewer that does not read makes the bridge stop reading VNC, with bounded buffers."""
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
    stack = await make_stack(VncEndpoint(unix_path=path))
    try:
        async with connect(stack.url(), max_size=None, max_queue=1) as ws:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    viewers = list(stack.bridge.viewers)
                    upstream = viewers[0].upstream if viewers else None
                    if upstream and upstream.transport and not upstream.transport.is_reading():
                        break
                    await asyncio.sleep(10 * MS)
            viewer = viewers[0]
            assert viewer.transport is not None
            assert viewer.transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH + (1 << 18)
            assert not sent.is_set()
            received = 0
            async with asyncio.timeout(TIMEOUT):
                while received < total:
                    received += len(await ws.recv())
            assert received == total
    finally:
        await stack.gateway.shutdown(grace=0)
        server.close()


@pytest.fixture
async def x11vnc_with_password(tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """A real Xvfb and x11vnc asking VNC Authentication on a Unix socket."""
    if shutil.which("Xvfb") is None or shutil.which("x11vnc") is None:
        pytest.skip("Xvfb and x11vnc are needed: run scripts/install-system-deps.sh run")
    xvfb = await asyncio.create_subprocess_exec(
        "Xvfb",
        "-displayfd",
        "1",
        "-nolisten",
        "tcp",
        "-screen",
        "0",
        "320x200x24",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert xvfb.stdout is not None
    display = (await asyncio.wait_for(xvfb.stdout.readline(), TIMEOUT)).decode().strip()
    sock = str(tmp_path / "vnc.sock")
    x11vnc = await asyncio.create_subprocess_exec(
        "x11vnc",
        "-display",
        f":{display}",
        "-unixsock",
        sock,
        "-rfbport",
        "0",
        "-passwd",
        "s3cret",
        "-forever",
        "-shared",
        "-quiet",
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                probe = socket.socket(socket.AF_UNIX)
                probe.connect(sock)
                probe.close()
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(10 * MS)
    yield sock, "s3cret"
    for process in (x11vnc, xvfb):
        # SIGTERM first: x11vnc then removes its SysV shared memory, which SIGKILL would leak
        # (enough leaked segments and no x11vnc can start on the host: "shmget: No space").
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("correct", [True, False])
async def test_bridge_answers_vnc_authentication_for_the_viewer(
    x11vnc_with_password: tuple[str, str], correct: bool
) -> None:
    """With a password the viewer sees security None and the bridge authenticates to x11vnc."""
    sock, password = x11vnc_with_password
    stack = await make_stack(VncEndpoint(unix_path=sock, password=password if correct else "wrong"))
    try:
        async with connect(stack.url(), subprotocols=[Subprotocol("binary")]) as ws:
            recv: Callable[[], Awaitable[bytes]] = ws.recv  # type: ignore[assignment]
            if correct:
                viewer = RfbViewer(recv, ws.send)  # no password: security None offered
                init = await asyncio.wait_for(viewer.handshake(), TIMEOUT)
                assert (init.width, init.height) == (320, 200)
                update = await asyncio.wait_for(viewer.framebuffer_update(), TIMEOUT)
                assert update.rectangles
            else:
                code, reason = await closed(ws)
                assert code == 1011
                assert "refused" in reason
    finally:
        await stack.gateway.shutdown(grace=0)
