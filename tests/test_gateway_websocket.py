"""WebSocket through the gateway: validation, header forwarding, tunnel, backpressure, hand-over."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Callable
from typing import ClassVar, cast

import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from remotecli.gateway import ClientInfo, LocalUpgrade
from remotecli.gateway.tunnel import READ_HIGH_WATER
from tests.conftest import MS
from tests.gateway_peers import WebSocketUpstream, exchange, running_gateway, upgrade_request

# Overriding event_loop_policy is deprecated in pytest-asyncio; its replacement hook would have
# to live in the shared conftest, so the warning is silenced here instead.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


async def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    """Wait until ``condition()`` holds, checking once per loop turn, for at most ``seconds``."""
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0)


async def test_echo_with_subprotocol_and_compression_end_to_end() -> None:
    """Messages echo through; subprotocol and permessage-deflate are negotiated end to end."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        url = f"ws://127.0.0.1:{gateway.address[1]}/ws"
        async with connect(url, subprotocols=["rfb"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "rfb"
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            for size in (1, 125, 65536, 1 << 20):
                message = bytes([size % 251]) * size
                await ws.send(message)
                assert await ws.recv() == message
            await ws.send("text too")
            assert await ws.recv() == "text too"
    await upstream.close()


async def test_end_to_end_headers_reach_upstream_unchanged() -> None:
    """Key, Protocol, Extensions, Origin, Cookie, Authorization, custom headers arrive as sent."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        url = f"ws://127.0.0.1:{gateway.address[1]}/ws"
        headers = {"Cookie": "sid=abc", "Authorization": "Bearer t0k", "X-Custom": "kept"}
        async with connect(
            url,
            subprotocols=["chat"],  # type: ignore[list-item]
            origin="https://app.example",  # type: ignore[arg-type]
            additional_headers=headers,
        ) as ws:
            assert ws.request is not None
            sent = ws.request.headers
        seen = upstream.seen[-1]
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions"):
            assert seen[name] == sent[name]
        assert seen["Origin"] == "https://app.example"
        assert seen["Cookie"] == "sid=abc"
        assert seen["Authorization"] == "Bearer t0k"
        assert seen["X-Custom"] == "kept"
        assert seen["Upgrade"] == "websocket"
        assert seen["Connection"] == "Upgrade"
    await upstream.close()


async def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    """Headers named in Connection and Keep-Alive are dropped; the hop's own Upgrade is sent."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        request = upgrade_request(
            Connection="keep-alive, Upgrade, X-Hop",
            Upgrade="WebSocket",
            extra="X-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-End: 1\r\n",
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5000 * MS)
        assert head.startswith(b"HTTP/1.1 101 ")
        writer.close()
        seen = upstream.seen[-1]
        assert "X-Hop" not in seen
        assert "Keep-Alive" not in seen
        assert seen["X-End"] == "1"
        assert seen["Connection"] == "Upgrade"
        assert seen["Upgrade"] == "websocket"
    await upstream.close()


async def test_original_novnc_path_proxies() -> None:
    """The original's /api/auth/session/{id}/novnc/websock path proxies like any route."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/api/": upstream.url}) as gateway:
        url = f"ws://127.0.0.1:{gateway.address[1]}/api/auth/session/s-42/novnc/websock"
        async with connect(url) as ws:
            await ws.send(b"RFB 003.008\n")
            assert await ws.recv() == b"RFB 003.008\n"
    await upstream.close()


@pytest.mark.parametrize(
    ("overrides", "status", "cause"),
    [
        ({"method": "POST"}, 400, b"must use GET"),
        ({"Connection": "keep-alive"}, 400, b"'upgrade' token in Connection"),
        ({"Sec-WebSocket-Key": "c2hvcnQ="}, 400, b"does not decode to 16 bytes"),
        ({"Sec-WebSocket-Key": ""}, 400, b"exactly one Sec-WebSocket-Key"),
        ({"Sec-WebSocket-Version": "8"}, 426, b"Sec-WebSocket-Version: 13"),
    ],
)
async def test_invalid_upgrade_is_refused_with_cause(
    overrides: dict[str, str], status: int, cause: bytes
) -> None:
    """An invalid upgrade gets 400 (or 426 with Sec-WebSocket-Version: 13) naming what is wrong."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        raw = await exchange(gateway.address[1], upgrade_request(**overrides))
    assert raw.startswith(f"HTTP/1.1 {status} ".encode())
    assert cause in raw
    if status == 426:
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in raw
    assert upstream.seen == []
    await upstream.close()


async def test_non_101_answer_is_relayed_verbatim() -> None:
    """An upstream that refuses the upgrade with 403 has its status and body relayed."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        raw = await exchange(gateway.address[1], upgrade_request("/refuse"))
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert raw.endswith(b"upstream refuses this upgrade\n")
    await upstream.close()


async def test_upstream_close_ends_tunnel_cleanly() -> None:
    """When the upstream closes with 1000, the client sees a clean close, not 1006."""

    async def close_at_once(websocket: ServerConnection) -> None:
        await websocket.close(1000, "bye")

    async with serve(close_at_once, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
            async with connect(f"ws://127.0.0.1:{gateway.address[1]}/") as ws:
                with pytest.raises(ConnectionClosedOK) as closed:
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1000
            await wait_for(lambda: gateway.metrics.tunnels_open._value.get() == 0, 5000 * MS)


async def test_both_sides_of_a_tunnel_have_tcp_keepalive() -> None:
    """A tunnel's client and upstream sockets both have SO_KEEPALIVE on, to detect dead peers."""
    upstream = await WebSocketUpstream().start()
    async with (
        running_gateway({"/": upstream.url}) as gateway,
        connect(f"ws://127.0.0.1:{gateway.address[1]}/") as ws,
    ):
        await ws.send("hello")
        assert await ws.recv() == "hello"
        context = gateway._context
        assert context is not None
        tunnel = next(iter(context.tunnels))
        for end in (tunnel.client, tunnel.upstream):
            sock = end.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    await upstream.close()


async def test_client_that_never_reads_keeps_gateway_memory_bounded() -> None:
    """A flooding upstream and a client that never reads: the gateway pauses the upstream."""
    flooded = asyncio.Event()

    async def flood(websocket: ServerConnection) -> None:
        chunk = b"f" * 65536
        with contextlib.suppress(ConnectionClosed):  # the client leaves without reading
            for _ in range(2000):  # 128 MiB, far more than any buffer
                await websocket.send(chunk)
            flooded.set()

    async with serve(flood, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
            _reader, writer = await asyncio.open_connection(
                "127.0.0.1", gateway.address[1], limit=1024
            )
            cast(
                asyncio.ReadTransport, writer.transport
            ).pause_reading()  # never read: the kernel buffers fill up
            writer.write(upgrade_request("/"))
            context = gateway._context
            assert context is not None
            await wait_for(lambda: len(context.tunnels) == 1, 5000 * MS)
            tunnel = next(iter(context.tunnels))
            upstream_transport = tunnel.upstream.transport
            await wait_for(lambda: not upstream_transport.is_reading(), 10000 * MS)
            assert tunnel.client.transport.get_write_buffer_size() <= READ_HIGH_WATER + (1 << 20)
            relayed = tunnel.bytes_down
            assert relayed < 64 << 20  # far less than the 128 MiB the upstream wants to send
            assert not flooded.is_set()
            writer.close()


async def test_half_close_is_relayed_both_ways() -> None:
    """After the client shuts down its sending side, the upstream's answer still arrives."""

    async def raw_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\n\r\n"
        )
        received = await reader.read()  # until the client's EOF arrives through the gateway
        writer.write(b"got " + received)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw_upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(upgrade_request("/"))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5000 * MS)
        writer.write(b"last words")
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 5000 * MS)
        assert answer == b"got last words"
        writer.close()
    server.close()


class EchoHead(asyncio.Protocol):
    """A tiny protocol that takes over a connection and echoes what it first receives."""

    instances: ClassVar[list[EchoHead]] = []

    def __init__(self, client: ClientInfo) -> None:
        self.client = client
        self.received = b""
        self.transport: asyncio.Transport | None = None
        EchoHead.instances.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data
        assert self.transport is not None
        self.transport.write(b"LOCAL " + data)


async def test_local_upgrade_takes_over_the_connection() -> None:
    """A matching upgrade is handed to the local protocol with the raw head and early bytes."""
    local = LocalUpgrade(re.compile(r"/api/sessions/[^/]+/vnc"), EchoHead)
    async with running_gateway({}, local_upgrades=(local,)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        request = upgrade_request("/api/sessions/s1/vnc?ticket=t", extra="X-Request-Id: req-7\r\n")
        writer.write(request + b"EARLY")
        echoed = await asyncio.wait_for(reader.readexactly(6 + len(request) + 5), 5000 * MS)
        assert echoed == b"LOCAL " + request + b"EARLY"
        protocol = EchoHead.instances[-1]
        assert protocol.client == ClientInfo("127.0.0.1", "http", "gw.example", "req-7")
        assert gateway.metrics.tunnels_open._value.get() == 1
        writer.close()
        await wait_for(lambda: gateway.metrics.tunnels_open._value.get() == 0, 5000 * MS)


async def test_idle_tunnel_is_closed_after_idle_timeout() -> None:
    """With --idle-timeout, a tunnel with no traffic is closed and logged as idle."""
    upstream = await WebSocketUpstream().start()
    async with running_gateway({"/": upstream.url}, idle_timeout=300 * MS) as gateway:
        async with connect(f"ws://127.0.0.1:{gateway.address[1]}/", ping_interval=None) as ws:
            await ws.send(b"once")
            assert await ws.recv() == b"once"
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5000 * MS)
        assert gateway.metrics.tunnels.labels("idle")._value.get() == 1
    await upstream.close()


async def test_shutdown_calls_local_upgrade_shutdown_after_grace() -> None:
    """Gateway shutdown gives a handed-over upgrade the grace, then calls its shutdown()."""
    called = asyncio.Event()

    async def shutdown_bridges() -> None:
        called.set()
        for protocol in EchoHead.instances:
            if protocol.transport is not None:
                protocol.transport.close()

    local = LocalUpgrade(re.compile(r"/local"), EchoHead, shutdown_bridges)
    async with running_gateway({}, local_upgrades=(local,)) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(upgrade_request("/local"))
        await asyncio.wait_for(reader.readexactly(6), 5000 * MS)
        await gateway.shutdown(grace=100 * MS)
        assert called.is_set()
        await asyncio.wait_for(reader.read(), 5000 * MS)
        assert reader.at_eof()  # the handed-over connection was closed
        assert gateway.metrics.tunnels_open._value.get() == 0
        writer.close()
