"""The splice tunnel over real loopback TCP sockets: order, backpressure, half-close, reset."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import uvloop

from remotecli.gateway.splice import COPY_SIZE, PIPE_SIZE, SpliceTunnel
from tests.conftest import MS

pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected non-blocking TCP sockets on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        outer = socket.create_connection(server.getsockname())
        inner, _ = server.accept()
    for sock in (outer, inner):
        sock.setblocking(False)
    return outer, inner


class Rig:
    """client ⇄ [gateway side of each pair, joined by a SpliceTunnel] ⇄ upstream."""

    def __init__(self, **options: object) -> None:
        self.client, gateway_client = tcp_pair()
        gateway_upstream, self.upstream = tcp_pair()
        self.ended: list[SpliceTunnel] = []
        self.tunnel = SpliceTunnel(
            gateway_client,
            gateway_upstream,
            on_end=self.ended.append,
            **options,  # type: ignore[arg-type]
        )
        self.tunnel.start()

    def close(self) -> None:
        for sock in (self.client, self.upstream):
            sock.close()
        if not self.tunnel.finished:
            self.tunnel.abort()


@asynccontextmanager
async def rig(**options: object) -> AsyncIterator[Rig]:
    """A running Rig, torn down at the end."""
    made = Rig(**options)
    try:
        yield made
    finally:
        made.close()


async def read_all(sock: socket.socket, timeout: float = 10000 * MS) -> bytes:
    """Read ``sock`` until EOF."""
    loop = asyncio.get_running_loop()
    parts = []
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 1 << 20):
            parts.append(chunk)
    return b"".join(parts)


async def ends(sock: socket.socket, timeout: float = 5000 * MS) -> bool:
    """True once ``sock`` reads EOF or is reset (whatever arrived before is discarded)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        try:
            while await loop.sock_recv(sock, 1 << 16):
                pass
        except ConnectionResetError:
            pass
    return True


async def wait_for(predicate: object, timeout: float = 5000 * MS) -> None:
    """Wait until ``predicate()`` is true."""
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(1 * MS)


async def test_bytes_keep_their_order_across_copied_and_spliced_reads() -> None:
    """Small writes (copied) and a bulk burst (spliced) arrive whole and in order, both ways."""
    payload = b"".join(
        [b"hello", os.urandom(24 << 20), b"middle", os.urandom(3 * COPY_SIZE + 17), b"bye"]
    )
    loop = asyncio.get_running_loop()
    async with rig() as r:
        for sender, receiver in ((r.client, r.upstream), (r.upstream, r.client)):
            reading = asyncio.ensure_future(read_all(receiver))
            await loop.sock_sendall(sender, payload[:5])
            await asyncio.sleep(20 * MS)  # the first read is a small, copied one
            await loop.sock_sendall(sender, payload[5:])
            sender.shutdown(socket.SHUT_WR)
            received = await reading
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        await wait_for(lambda: r.ended)
    assert r.ended == [r.tunnel]
    assert r.tunnel.ended == "eof"
    assert r.tunnel.bytes_up == r.tunnel.bytes_down == len(payload)


async def test_half_close_is_passed_on_and_the_answer_still_arrives() -> None:
    """The client's EOF reaches the upstream as EOF, and the upstream can still answer after it."""
    loop = asyncio.get_running_loop()
    async with rig() as r:
        await loop.sock_sendall(r.client, b"last words")
        r.client.shutdown(socket.SHUT_WR)
        assert await read_all(r.upstream) == b"last words"  # ends: the EOF came through
        assert not r.ended  # the other way is still open
        await loop.sock_sendall(r.upstream, b"got them")
        r.upstream.shutdown(socket.SHUT_WR)
        assert await read_all(r.client) == b"got them"
        await wait_for(lambda: r.ended)
    assert r.tunnel.ended == "eof"


async def test_a_peer_that_does_not_read_stops_reading_the_other_side() -> None:
    """With the upstream not reading, the tunnel stops reading once PIPE_SIZE bytes wait: it
    holds less than PIPE_SIZE plus one copying read (the read that crossed it is kept; which
    path, splice or copy, the bytes took depends on how the kernel hands them over)."""
    loop = asyncio.get_running_loop()
    chunk = os.urandom(1 << 20)
    async with rig() as r:
        sent = 0
        # Write without waiting until the kernel and the tunnel refuse more.
        async with asyncio.timeout(10000 * MS):
            while True:
                try:
                    sent += r.client.send(chunk)
                except BlockingIOError:
                    await asyncio.sleep(20 * MS)
                    try:
                        sent += r.client.send(chunk)
                    except BlockingIOError:
                        if not r.tunnel.client.transport.is_reading():
                            break
        end = r.tunnel.client
        assert end.pending < PIPE_SIZE + COPY_SIZE
        assert end.queued > 0 or end.held_size > 0  # what the upstream did not take yet
        assert r.tunnel.upstream.transport.get_write_buffer_size() == end.pending
        assert sent < 64 << 20  # kernel buffers plus one pipe, not an unbounded amount
        held = sent
        # The upstream reads again: everything arrives, and the tunnel reads the client again.
        received = 0
        async with asyncio.timeout(10000 * MS):
            while received < held:
                received += len(await loop.sock_recv(r.upstream, 1 << 20))
        assert received == held
        await wait_for(lambda: r.tunnel.client.transport.is_reading())


async def test_a_reset_ends_the_tunnel_as_reset_and_closes_the_other_side() -> None:
    """An upstream that resets its connection ends the tunnel as reset; the client sees the end."""
    loop = asyncio.get_running_loop()
    async with rig() as r:
        await loop.sock_sendall(r.client, b"x" * 1000)
        assert await loop.sock_recv(r.upstream, 1000) == b"x" * 1000
        r.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.upstream.close()
        await loop.sock_sendall(r.client, b"after the reset")
        await wait_for(lambda: r.ended)
        assert r.tunnel.ended == "reset"
        assert await ends(r.client)


async def test_close_flushes_what_the_pipe_holds_then_closes() -> None:
    """close() delivers what the tunnel holds for a slow reader before closing its socket."""
    loop = asyncio.get_running_loop()
    payload = os.urandom(8 << 20)
    async with rig() as r:
        sending = asyncio.ensure_future(loop.sock_sendall(r.client, payload))
        await wait_for(lambda: r.tunnel.client.pending > 0)
        r.tunnel.close("shutdown")
        received = await read_all(r.upstream)
        sending.cancel()
        await wait_for(lambda: r.ended)
    assert r.tunnel.ended == "shutdown"
    assert payload.startswith(received)
    assert len(received) == r.tunnel.bytes_up  # all it had read was delivered
