"""The one RFB-banner wait both drivers use, over real Unix and TCP sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from remotecli.drivers.banner import await_rfb_banner
from remotecli.exceptions import RemoteProtocolError
from tests.conftest import MS


async def serve_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"RFB 003.008\n")
    await writer.drain()
    writer.close()


async def test_waits_until_the_server_listens(tmp_path: Path) -> None:
    """Connections refused while nothing listens are retried until the banner is read."""
    path = tmp_path / "vnc.sock"
    retried: list[BaseException] = []

    async def listen_later() -> asyncio.Server:
        await asyncio.sleep(50 * MS)
        return await asyncio.start_unix_server(serve_once, str(path))

    later = asyncio.create_task(listen_later())
    async with asyncio.timeout(5_000 * MS):
        version = await await_rfb_banner(
            lambda: asyncio.open_unix_connection(str(path)),
            not_yet=(FileNotFoundError, ConnectionRefusedError),
            retried=retried.append,
        )
    server = await later
    server.close()
    assert version == (3, 8)
    assert retried
    assert isinstance(retried[0], FileNotFoundError)


async def test_prepare_holds_the_connection(tmp_path: Path) -> None:
    """No connection is tried while ``prepare`` says not yet."""
    server = await asyncio.start_server(serve_once, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rounds: list[int] = []

    def prepare() -> bool:
        rounds.append(1)
        return len(rounds) >= 3

    async with asyncio.timeout(5_000 * MS):
        version = await await_rfb_banner(
            lambda: asyncio.open_connection("127.0.0.1", port), not_yet=(), prepare=prepare
        )
    server.close()
    assert version == (3, 8)
    assert len(rounds) == 3


async def test_a_server_that_is_not_vnc_fails_at_once() -> None:
    """A greeting that is not RFB is an error unless the caller counts it as "not yet"."""

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-x\r\n\r")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(RemoteProtocolError, match="not a VNC server"):
        async with asyncio.timeout(5_000 * MS):
            await await_rfb_banner(
                lambda: asyncio.open_connection("127.0.0.1", port), not_yet=(OSError,)
            )
    server.close()
