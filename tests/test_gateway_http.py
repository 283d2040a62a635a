"""Plain HTTP through the gateway: keep-alive, streamed bodies, upstream reuse, forwarding."""

from __future__ import annotations

import asyncio
from typing import cast

import httpx
import pytest
import uvloop

from remotecli.gateway.connection import ClientConnection
from tests.conftest import MS
from tests.gateway_peers import HttpUpstream, exchange, running_gateway

# Overriding event_loop_policy is deprecated in pytest-asyncio; its replacement hook would have
# to live in the shared conftest, so the warning is silenced here instead.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


async def test_keep_alive_both_sides_reuses_one_upstream_connection() -> None:
    """Ten requests on one client connection use one client and one upstream connection."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        port = gateway.address[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for number in range(10):
            writer.write(f"GET /item/{number} HTTP/1.1\r\nHost: example\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5000 * MS)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            assert body == f"upstream saw GET /item/{number} with 0 bytes".encode()
        writer.close()
        assert upstream.connections == 1
        assert gateway.upstream_connections_opened == 1
    upstream.close()


async def test_path_and_query_go_upstream_unchanged() -> None:
    """The request target, query included, reaches the upstream byte for byte."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/api/": upstream.url}) as gateway:
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{gateway.address[1]}/api/a%20b/c?x=1&y=%2F"
            response = await client.get(url)
        assert response.status_code == 200
        assert upstream.requests[-1].target == b"/api/a%20b/c?x=1&y=%2F"
    upstream.close()


async def test_large_content_length_response_is_streamed() -> None:
    """A 20 MB Content-Length response arrives whole, with its length and upstream headers."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{gateway.address[1]}/bytes/20000000")
        assert response.status_code == 200
        assert response.headers["content-length"] == "20000000"
        assert response.headers["x-upstream"] == "yes"
        assert len(response.content) == 20_000_000
    upstream.close()


async def test_chunked_request_body_streams_through_and_back() -> None:
    """A chunked upload of 8 MB is echoed back chunked, intact, through the gateway."""
    upstream = await HttpUpstream().start()
    payload = bytes(range(256)) * 32768

    async def body() -> object:
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    async with running_gateway({"/": upstream.url}) as gateway:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{gateway.address[1]}/echo",
                content=body(),  # type: ignore[arg-type]
            )
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.content == payload
        assert upstream.header(b"transfer-encoding") == b"chunked"
    upstream.close()


async def test_content_length_request_body_reaches_upstream() -> None:
    """A Content-Length upload reaches the upstream with its length and all its bytes."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        async with httpx.AsyncClient() as client:
            response = await client.put(
                f"http://127.0.0.1:{gateway.address[1]}/upload", content=b"z" * 3_000_000
            )
        assert response.text == "upstream saw PUT /upload with 3000000 bytes"
        assert upstream.header(b"content-length") == b"3000000"
    upstream.close()


async def test_longest_prefix_wins() -> None:
    """With routes / and /api/, a request under /api/ goes to the /api/ upstream."""
    root = await HttpUpstream().start()
    api = await HttpUpstream().start()
    async with running_gateway({"/": root.url, "/api/": api.url}) as gateway:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.address[1]}") as client:
            await client.get("/api/sessions")
            await client.get("/dashboard")
        assert [r.target for r in api.requests] == [b"/api/sessions"]
        assert [r.target for r in root.requests] == [b"/dashboard"]
    root.close()
    api.close()


async def test_healthz_is_answered_by_the_gateway() -> None:
    """GET /healthz is answered 200 with the controller's JSON body by the gateway itself."""
    async with running_gateway({}) as gateway:
        raw = await exchange(
            gateway.address[1], b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in raw
    assert raw.endswith(b'\r\n\r\n{"status":"ok"}')


async def test_hop_by_hop_headers_are_not_forwarded() -> None:
    """Connection, Keep-Alive, TE and headers named in Connection stop at the gateway."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        await exchange(
            gateway.address[1],
            b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close, X-Secret-Hop\r\n"
            b"Keep-Alive: timeout=5\r\nTE: trailers\r\nX-Secret-Hop: 1\r\nX-Kept: 2\r\n\r\n",
        )
        names = {key for key, _ in upstream.requests[-1].headers}
        assert b"x-secret-hop" not in names
        assert b"keep-alive" not in names
        assert b"te" not in names
        assert upstream.header(b"x-kept") == b"2"
    upstream.close()


async def test_non_2xx_from_upstream_is_relayed_verbatim() -> None:
    """An upstream 418 reaches the client with its status, headers and body."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{gateway.address[1]}/status/418")
        assert response.status_code == 418
        assert response.headers["x-upstream"] == "yes"
        assert response.text == "status 418 from upstream"
    upstream.close()


async def test_head_request_gets_head_without_body() -> None:
    """A HEAD request gets the upstream's head and no body, and the connection stays usable."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        async with httpx.AsyncClient() as client:
            base = f"http://127.0.0.1:{gateway.address[1]}"
            head = await client.head(f"{base}/bytes/100")
            after = await client.get(f"{base}/bytes/5")
        assert head.status_code == 200
        assert head.content == b""
        assert after.content == b"xxxxx"
    upstream.close()


async def test_unix_socket_upstream() -> None:
    """A route to unix:/path reaches an upstream listening on that Unix socket."""
    import tempfile

    upstream = HttpUpstream()
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/up.sock"
        upstream.server = await asyncio.start_unix_server(upstream._serve, path)
        async with (
            running_gateway({"/": f"unix:{path}"}) as gateway,
            httpx.AsyncClient() as client,
        ):
            response = await client.get(f"http://127.0.0.1:{gateway.address[1]}/via-unix")
        assert response.text == "upstream saw GET /via-unix with 0 bytes"
        upstream.close()


async def test_forwarding_headers_from_untrusted_client_are_replaced() -> None:
    """A client not in --trusted-proxy cannot forge X-Forwarded-For; its id is forwarded."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        await exchange(
            gateway.address[1],
            b"GET /f HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 6.6.6.6\r\n"
            b"Forwarded: for=6.6.6.6\r\nX-Request-Id: trace-1\r\nConnection: close\r\n\r\n",
        )
        assert upstream.header(b"x-forwarded-for") == b"127.0.0.1"
        assert upstream.header(b"forwarded") == b"for=127.0.0.1;proto=http;host=app.example"
        assert upstream.header(b"x-forwarded-host") == b"app.example"
        assert upstream.header(b"x-forwarded-port") == str(gateway.address[1]).encode()
        assert upstream.header(b"x-request-id") == b"trace-1"
    upstream.close()


async def test_forwarding_headers_from_trusted_proxy_are_extended() -> None:
    """From a trusted proxy, X-Forwarded-For is appended to and its proto is believed."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}, trusted_proxies=("127.0.0.0/8",)) as gateway:
        await exchange(
            gateway.address[1],
            b"GET /f HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.5\r\n"
            b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n",
        )
        assert upstream.header(b"x-forwarded-for") == b"203.0.113.5, 127.0.0.1"
        assert upstream.header(b"x-forwarded-proto") == b"https"
        request_id = upstream.header(b"x-request-id")
        assert request_id is not None
        assert len(request_id) == 32  # generated when the client sent none
    upstream.close()


async def test_host_rewrite_replaces_host_upstream() -> None:
    """With --host-rewrite the upstream sees that Host; X-Forwarded-Host keeps the client's."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}, host_rewrite="backend.internal") as gateway:
        await exchange(
            gateway.address[1], b"GET / HTTP/1.1\r\nHost: public\r\nConnection: close\r\n\r\n"
        )
        assert upstream.header(b"host") == b"backend.internal"
        assert upstream.header(b"x-forwarded-host") == b"public"
    upstream.close()


async def test_http10_request_without_host_gets_the_upstream_authority_as_host() -> None:
    """An HTTP/1.0 request without Host reaches a strict HTTP/1.1 upstream with its host:port."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        answer = await exchange(gateway.address[1], b"GET /old HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert upstream.header(b"host") == upstream.url.removeprefix("http://").encode()
    upstream.close()


async def test_client_pause_pauses_upstream_for_large_response() -> None:
    """A client that stops reading a large response makes the gateway pause the upstream."""
    upstream = await HttpUpstream().start()
    async with running_gateway({"/": upstream.url}) as gateway:
        _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.address[1])
        cast(asyncio.ReadTransport, writer.transport).pause_reading()
        writer.write(b"GET /bytes/200000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        context = gateway._context
        assert context is not None
        async with asyncio.timeout(10000 * MS):
            while True:
                connection = cast(ClientConnection, next(iter(context.connections)))
                active = connection._active
                if active is not None and active.upstream is not None:
                    transport = active.upstream.transport
                    if transport is not None and not transport.is_reading():
                        break
                await asyncio.sleep(0)
        assert connection.transport is not None
        assert connection.transport.get_write_buffer_size() <= 2 * 1024 * 1024
        assert active.bytes_down < 100_000_000
        writer.close()
    upstream.close()
