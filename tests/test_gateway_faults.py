"""Failures answered with a status and a cause, slow or hostile clients, leaks, and logs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from collections.abc import Iterator

import pytest
import structlog
import uvloop

from remotecli.logs import configure_logging
from tests.conftest import MS
from tests.gateway_peers import (
    HttpUpstream,
    WebSocketUpstream,
    exchange,
    running_gateway,
    upgrade_request,
)

# Overriding event_loop_policy is deprecated in pytest-asyncio; its replacement hook would have
# to live in the shared conftest, so the warning is silenced here instead.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Capture the gateway's JSON log lines for the test."""
    stream = io.StringIO()
    configure_logging("json", "info", stream)
    yield stream
    structlog.reset_defaults()


def free_port() -> int:
    """Return a port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    """Split a raw response into its status code and body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


GET = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_refused_upstream_is_502_naming_it() -> None:
    """A route to a closed port answers 502 saying that upstream refused the connection."""
    port = free_port()
    async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
        status, body = status_and_body(await exchange(gateway.address[1], GET))
        errors = gateway.metrics.upstream_errors.labels("refused")._value.get()
    assert status == 502
    assert f"upstream 127.0.0.1:{port} refused the connection".encode() in body
    assert errors == 1


async def test_missing_unix_socket_is_502_unreachable() -> None:
    """A route to a Unix socket that does not exist answers 502 saying so."""
    async with running_gateway({"/": "unix:/nonexistent/remotecli.sock"}) as gateway:
        status, body = status_and_body(await exchange(gateway.address[1], GET))
    assert status == 502
    assert b"upstream unix:/nonexistent/remotecli.sock does not exist" in body


async def test_connect_timeout_is_504() -> None:
    """An upstream whose accept queue is full (connect hangs) answers 504 after the timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue so that further SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        async with running_gateway(
            {"/": f"http://127.0.0.1:{port}"}, connect_timeout=300 * MS
        ) as gateway:
            status, body = status_and_body(await exchange(gateway.address[1], GET))
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert status == 504
    assert f"upstream 127.0.0.1:{port} did not accept the connection within".encode() in body


async def test_upstream_closing_without_answer_is_502() -> None:
    """An upstream that closes without answering ("socket hang up") gives 502 naming it."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        raw = await exchange(gateway.address[1], b"GET /drop HTTP/1.1\r\nHost: h\r\n\r\n")
    status, body = status_and_body(raw)
    assert status == 502
    assert b"closed the connection without answering" in body
    upstream.close()


async def test_slow_response_head_is_504() -> None:
    """An upstream that does not answer within the response-head timeout gives 504."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}, response_head_timeout=200 * MS) as gateway:
        raw = await exchange(gateway.address[1], b"GET /hang HTTP/1.1\r\nHost: h\r\n\r\n")
    status, body = status_and_body(raw)
    assert status == 504
    assert b"did not answer within 0.2 s" in body
    upstream.close()


async def test_slow_upgrade_answer_is_504() -> None:
    """A WebSocket upgrade whose upstream never answers gets 504, not a silent close."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}, response_head_timeout=200 * MS) as gateway:
        raw = await exchange(gateway.address[1], upgrade_request("/hang"))
    assert status_and_body(raw)[0] == 504
    upstream.close()


async def test_no_route_is_404_listing_routes() -> None:
    """A path no route matches answers 404 naming the routes the gateway has."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/api/": upstream.url}) as gateway:
        raw = await exchange(gateway.address[1], b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n")
    status, body = status_and_body(raw)
    assert status == 404
    assert b"no route for /other; this gateway routes /api/" in body
    upstream.close()


@pytest.mark.parametrize(
    ("raw", "cause"),
    [
        (b"GARBAGE\r\n\r\n", b"malformed request"),
        (b"GET /x HTTP/1.1\r\n\r\n", b"no Host header"),
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"several Host headers"),
        (
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"Content-Length",
        ),
        (
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"Transfer-Encoding",
        ),
    ],
)
async def test_malformed_or_ambiguous_request_is_400(raw: bytes, cause: bytes) -> None:
    """Malformed heads and ambiguous framing get 400 naming the problem, never forwarded."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        status, body = status_and_body(await exchange(gateway.address[1], raw))
    assert status == 400
    assert cause in body
    assert upstream.requests == []
    upstream.close()


@pytest.mark.parametrize("split", [False, True])
async def test_header_block_too_large_is_431(split: bool) -> None:
    """A head over max-header-bytes gets 431, whether it arrives at once or bit by bit."""
    upstream = await HttpUpstream().start()
    big = b"GET /x HTTP/1.1\r\nHost: h\r\nCookie: " + b"c" * 5000 + b"\r\n"
    async with running_gateway({"/": upstream.url}, max_header_bytes=4096) as gateway:
        if split:  # never finished: the limit must hold before the head ends
            raw = await exchange(gateway.address[1], big)
        else:
            raw = await exchange(gateway.address[1], big + b"\r\n")
    status, body = status_and_body(raw)
    assert status == 431
    assert b"--max-header-bytes" in body
    assert upstream.requests == []
    upstream.close()


async def test_over_connection_limit_is_503() -> None:
    """The connection past --max-connections gets 503 saying so; the others are served."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}, max_connections=2) as gateway:
        port = gateway.address[1]
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0)
        status, body = status_and_body(await exchange(port, GET))
        for _, writer in held:
            writer.close()
    assert status == 503
    assert b"limit of 2 connections" in body
    upstream.close()


async def test_slowloris_head_gets_408_and_close() -> None:
    """A head still incomplete at the handshake timeout is answered 408 and closed."""
    async with running_gateway({}, handshake_timeout=200 * MS) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(b"GET /x HTTP/1.1\r\nHost: h\r\nX-Slow: ")
        raw = await asyncio.wait_for(reader.read(), 5000 * MS)
        writer.close()
    status, body = status_and_body(raw)
    assert status == 408
    assert b"--handshake-timeout" in body


async def test_idle_connection_is_closed_after_handshake_timeout() -> None:
    """A connection that never sends anything is closed silently at the handshake timeout."""
    async with running_gateway({}, handshake_timeout=200 * MS) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        assert await asyncio.wait_for(reader.read(), 5000 * MS) == b""
        writer.close()


def open_fds() -> int:
    """Count this process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


async def test_no_fd_leak_after_thousands_of_mixed_connections() -> None:
    """2,000 mixed successes, failures and tunnels leave no file descriptor behind."""
    upstream = await HttpUpstream().start()
    ws_upstream = await WebSocketUpstream().start()
    dead = free_port()
    routes = {"/": upstream.url, "/dead/": f"http://127.0.0.1:{dead}", "/ws/": ws_upstream.url}
    async with running_gateway(routes, handshake_timeout=2000 * MS) as gateway:
        port = gateway.address[1]
        requests = [
            b"GET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            b"GET /dead/x HTTP/1.1\r\nHost: h\r\n\r\n",
            b"BROKEN\r\n\r\n",
            b"GET /drop HTTP/1.1\r\nHost: h\r\n\r\n",
            upgrade_request("/ws/echo"),
        ]
        await exchange(port, requests[0])  # warm up the pools before counting
        before = open_fds()

        async def one(number: int) -> None:
            raw = requests[number % len(requests)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await reader.read(65536)
            writer.close()
            await writer.wait_closed()

        for start in range(0, 2000, 100):
            await asyncio.gather(*(one(n) for n in range(start, start + 100)))
        context = gateway._context
        assert context is not None
        async with asyncio.timeout(10000 * MS):
            while context.open_count or open_fds() > before + 2:
                await asyncio.sleep(10 * MS)
        assert open_fds() <= before + 2
    upstream.close()
    await ws_upstream.close()


async def test_one_log_line_per_request_and_tunnel(log_lines: io.StringIO) -> None:
    """Each request and each tunnel writes exactly one line when it ends, none per chunk."""
    upstream = await HttpUpstream().start()
    ws_upstream = await WebSocketUpstream().start()
    async with running_gateway({"/ws/": ws_upstream.url, "/": upstream.url}) as gateway:
        port = gateway.address[1]
        await exchange(
            port,
            b"GET /bytes/5000000?token=secret HTTP/1.1\r\nHost: h\r\nX-Request-Id: r-1\r\n"
            b"Connection: close\r\n\r\n",
        )
        from websockets.asyncio.client import connect

        async with connect(f"ws://127.0.0.1:{port}/ws/x") as ws:
            for _ in range(50):
                await ws.send(b"m" * 10000)
                await ws.recv()
        context = gateway._context
        assert context is not None
        async with asyncio.timeout(5000 * MS):
            while context.tunnels:
                await asyncio.sleep(10 * MS)
    lines = log_lines.getvalue().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    requests = [r for r in records if r["event"] == "request"]
    tunnels = [r for r in records if r["event"] == "tunnel"]
    assert len(requests) == 1
    assert len(tunnels) == 1
    request = requests[0]
    assert request["path"] == "/bytes/5000000"  # the query (and its secret) is not logged
    assert request["status"] == 200
    assert request["bytes_down"] == 5_000_000
    assert request["request_id"] == "r-1"
    assert request["upstream"] == upstream.url.removeprefix("http://")
    assert request["ended"] == "done"
    assert "secret" not in log_lines.getvalue()
    tunnel = tunnels[0]
    assert tunnel["path"] == "/ws/x"
    assert tunnel["bytes_up"] > 50 * 10
    assert tunnel["bytes_down"] > 50 * 10
    assert tunnel["ended"] in ("eof", "closed")
    assert {"client", "duration_ms", "request_id"} <= tunnel.keys()
    upstream.close()
    await ws_upstream.close()


async def raw_upstream(answers: list[bytes | None]) -> asyncio.Server:
    """An upstream answering a connection's Nth request with answers[N]; None or the end: close."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            if answer is None:
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_stale_pooled_connection_is_retried_for_bodiless_request() -> None:
    """A pooled connection the upstream dropped is retried once on a fresh one for a GET."""
    server = await raw_upstream([OK, None])  # answers once per connection, then hangs up
    port = server.sockets[0].getsockname()[1]
    async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        for _ in range(3):
            writer.write(GET)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5000 * MS)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await reader.readexactly(2) == b"ok"
        writer.close()
        assert gateway.upstream_connections_opened == 3
    server.close()


async def test_stale_pooled_connection_is_not_retried_for_a_body() -> None:
    """A request with a body is never sent twice: a dropped pooled connection gives 502."""
    server = await raw_upstream([OK, None])
    port = server.sockets[0].getsockname()[1]
    async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5000 * MS)
        await reader.readexactly(2)
        writer.write(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
        raw = await asyncio.wait_for(reader.read(), 5000 * MS)
        writer.close()
    assert status_and_body(raw)[0] == 502
    server.close()


async def test_malformed_upstream_response_is_502() -> None:
    """An upstream answering garbage gives 502 naming the malformed response."""
    server = await raw_upstream([b"NOT HTTP AT ALL\r\n\r\n"])
    port = server.sockets[0].getsockname()[1]
    async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
        status, body = status_and_body(await exchange(gateway.address[1], GET))
    assert status == 502
    assert b"sent a malformed response" in body
    server.close()


async def test_upstream_dying_mid_body_aborts_the_client(log_lines: io.StringIO) -> None:
    """An upstream that closes mid-body makes the client see a cut response, logged as such."""
    server = await raw_upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly ten b"])
    port = server.sockets[0].getsockname()[1]
    async with running_gateway({"/": f"http://127.0.0.1:{port}"}) as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        writer.write(GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5000 * MS)
        with pytest.raises(asyncio.IncompleteReadError) as cut:
            await asyncio.wait_for(reader.readexactly(1000), 5000 * MS)
        assert cut.value.partial == b"only ten b"
        writer.close()
    records = [json.loads(line) for line in log_lines.getvalue().splitlines() if line[:1] == "{"]
    request = next(r for r in records if r["event"] == "request")
    assert request["ended"] == "closed"
    server.close()
