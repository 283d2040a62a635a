"""The session channel: a secret line first, compared in constant time, then bytes as they are."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from remotecli.cluster import channel
from remotecli.cluster.channel import SessionChannel, new_secret, preamble, preamble_ok
from remotecli.drivers.base import VncEndpoint
from tests.conftest import MS
from tests.test_bridge import make_stack, start_echo

TIMEOUT = 5_000 * MS


def test_preamble_is_the_secret_and_a_newline_only() -> None:
    """Only the exact secret and its newline pass; a prefix, a longer line or another fail."""
    secret = new_secret()
    assert len(secret) == 64
    assert secret != new_secret()
    assert preamble_ok(preamble(secret), secret)
    assert not preamble_ok(secret.encode(), secret)
    assert not preamble_ok(preamble(secret)[1:], secret)
    assert not preamble_ok(preamble(secret + "0"), secret)
    assert not preamble_ok(preamble("0" * 64), secret)


async def answer(port: int, first: bytes | None, *, more: bytes = b"") -> bytes:
    """Connect, send ``first`` then ``more``, return everything until the channel closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first is not None:
        writer.write(first + more)
    try:
        async with asyncio.timeout(TIMEOUT):
            if more:
                return await reader.readexactly(len(more))
            return await reader.read()
    finally:
        writer.close()


async def test_channel_relays_only_after_the_right_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The right secret reaches the VNC socket; none, a wrong or an overlong one get no byte."""
    monkeypatch.setattr(channel, "PREAMBLE_TIMEOUT", 200 * MS)
    echo = await start_echo(tmp_path, "unix")
    secret = new_secret()
    relay = SessionChannel(secret, str(echo.endpoint.unix_path))
    port = await relay.listen("127.0.0.1")
    try:
        assert await answer(port, preamble(secret), more=b"RFB 003.008\n") == b"RFB 003.008\n"
        assert await answer(port, None) == b""
        assert await answer(port, preamble("0" * 64) + b"RFB 003.008\n") == b""
        assert await answer(port, b"a" * 70_000 + b"\n") == b""
        assert await answer(port, preamble(secret)[:-1]) == b""  # no newline: timed out
        assert relay.refused == 4
        assert len(echo.writers) == 1  # only the right one reached the socket
    finally:
        await relay.close()
        echo.server.close()


async def test_bridge_sends_the_channel_secret_before_rfb(tmp_path: Path) -> None:
    """A viewer's bytes reach the session through its channel when the endpoint has a secret."""
    echo = await start_echo(tmp_path, "unix")
    secret = new_secret()
    relay = SessionChannel(secret, str(echo.endpoint.unix_path))
    port = await relay.listen("127.0.0.1")
    stack = await make_stack(VncEndpoint(host="127.0.0.1", port=port, channel_secret=secret))
    try:
        async with connect(stack.url(query="?ticket=t1")) as ws:
            await ws.send(b"hello")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"hello"
        assert relay.refused == 0
        assert secret not in repr(VncEndpoint(host="h", port=1, channel_secret=secret))
    finally:
        await stack.gateway.shutdown(grace=0)
        await relay.close()
        echo.server.close()
