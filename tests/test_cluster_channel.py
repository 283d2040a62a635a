"""The session channel: a secret line first, compared in constant time, then bytes as they are."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from remotecli.cluster import channel
from remotecli.cluster.channel import (
    SessionChannel,
    decode_files,
    encode_files,
    new_secret,
    preamble,
    preamble_ok,
)
from remotecli.cluster.channel_tls import client_context, new_identity, server_context
from remotecli.drivers.base import VncEndpoint
from tests.conftest import MS
from tests.test_bridge import make_stack, start_echo

TIMEOUT = 5_000 * MS


def test_preamble_is_the_secret_a_verb_and_a_newline_only() -> None:
    """Only the exact secret, a known verb and the newline pass; the verb is what it returns."""
    secret = new_secret()
    assert len(secret) == 64
    assert secret != new_secret()
    assert preamble_ok(preamble(secret), secret) == "vnc"
    assert preamble_ok(preamble(secret, "put"), secret) == "put"
    assert preamble_ok(preamble(secret, "get"), secret) == "get"
    assert preamble_ok(preamble(secret)[:-1], secret) is None
    assert preamble_ok(secret.encode() + b"\n", secret) is None  # no verb
    assert preamble_ok(preamble(secret, "tty"), secret) is None
    assert preamble_ok(preamble(secret)[1:], secret) is None
    assert preamble_ok(preamble(secret + "0"), secret) is None
    assert preamble_ok(preamble("0" * 64), secret) is None


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
        assert await answer(port, secret.encode() + b"\n" + b"RFB 003.008\n") == b""  # no verb
        assert relay.refused == 5
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


async def test_kept_files_go_in_once_before_the_start_and_come_back_after(tmp_path: Path) -> None:
    """``put`` hands files over once, before the session starts; ``get`` reads its HOME after.

    A wrong secret gets no byte for either verb; ``get`` before the start and a second ``put``
    are refused by name; a malformed frame is answered with the cause, not a crash.
    """
    home = {".standin/token": b"refreshed"}
    asked: list[list[str]] = []

    async def collect(paths: Sequence[str]) -> Mapping[str, bytes]:
        asked.append(list(paths))
        return home

    secret = new_secret()
    relay = SessionChannel(secret, None, collect)
    port = await relay.listen("127.0.0.1")

    def ask(verb: str, message: dict[str, object], key: str = secret) -> dict[str, object]:
        return channel.request("127.0.0.1", port, key, verb, message, timeout=5)

    try:
        files = {".standin/credentials.json": b"\x00kept\xff"}
        with pytest.raises(OSError, match="closed without an answer"):
            await asyncio.to_thread(ask, "put", {"files": encode_files(files)}, "0" * 64)
        assert await asyncio.to_thread(ask, "get", {"paths": ["~/.standin"]}) == {
            "error": "the session has not started"
        }
        bad = await asyncio.to_thread(ask, "put", {"files": {"a": "not base64!"}})
        assert str(bad["error"]).startswith("bad request")
        answer = await asyncio.to_thread(ask, "put", {"files": encode_files(files)})
        assert answer == {"ok": True}
        again = await asyncio.to_thread(ask, "put", {"files": encode_files(files)})
        assert again == {"error": "kept files are taken once, before the session starts"}
        assert relay.take_files() == files
        assert relay.take_files() == {}
        relay.vnc_path = str(tmp_path / "vnc.sock")  # the session runs
        answer = await asyncio.to_thread(ask, "get", {"paths": ["~/.standin"]})
        assert decode_files(answer["files"]) == home
        assert asked == [["~/.standin"]]
        assert relay.refused == 1
    finally:
        await relay.close()


async def tls_answer(port: int, cert: str, first: bytes, *, more: bytes = b"") -> bytes:
    """As :func:`answer`, inside TLS that pins ``cert``."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(cert), server_hostname=""
    )
    writer.write(first + more)
    try:
        async with asyncio.timeout(TIMEOUT):
            if more:
                return await reader.readexactly(len(more))
            return await reader.read()
    finally:
        writer.close()


async def test_tls_channel_answers_only_a_client_pinning_its_certificate(tmp_path: Path) -> None:
    """Over TLS the right certificate and secret relay; another pin or plain TCP get no byte."""
    echo = await start_echo(tmp_path, "unix")
    secret = new_secret()
    cert, key = new_identity()
    other, _ = new_identity()
    relay = SessionChannel(secret, str(echo.endpoint.unix_path))
    port = await relay.listen("127.0.0.1", tls=server_context(cert, key))
    try:
        banner = b"RFB 003.008\n"
        assert await tls_answer(port, cert, preamble(secret), more=banner) == banner
        with pytest.raises(ssl.SSLCertVerificationError):
            await tls_answer(port, other, preamble(secret), more=banner)
        assert await answer(port, preamble(secret) + banner) == b""  # plain TCP, right secret
        assert await tls_answer(port, cert, preamble("0" * 64) + banner) == b""
        assert relay.refused == 1  # the wrong secret; the other two never got past TLS
        assert len(echo.writers) == 1
    finally:
        await relay.close()
        echo.server.close()


async def test_tls_channel_closes_when_the_vnc_server_ends(tmp_path: Path) -> None:
    """TLS has no half-close: the VNC server ending its side closes the client's connection."""
    echo = await start_echo(tmp_path, "unix")
    secret = new_secret()
    cert, key = new_identity()
    relay = SessionChannel(secret, str(echo.endpoint.unix_path))
    port = await relay.listen("127.0.0.1", tls=server_context(cert, key))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(cert), server_hostname=""
    )
    try:
        writer.write(preamble(secret) + b"RFB 003.008\n")
        assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == b"RFB 003.008\n"
        echo.writers[0].close()  # the VNC server goes away
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
        await relay.close()
        echo.server.close()


async def test_bridge_pins_the_channel_certificate(tmp_path: Path) -> None:
    """The bridge relays through a TLS channel it pins, and refuses one with another certificate."""
    echo = await start_echo(tmp_path, "unix")
    secret = new_secret()
    cert, key = new_identity()
    other, _ = new_identity()
    relay = SessionChannel(secret, str(echo.endpoint.unix_path))
    port = await relay.listen("127.0.0.1", tls=server_context(cert, key))
    endpoint = VncEndpoint(host="127.0.0.1", port=port, channel_secret=secret, channel_cert=cert)
    stack = await make_stack(endpoint)
    wrong = await make_stack(
        VncEndpoint(host="127.0.0.1", port=port, channel_secret=secret, channel_cert=other)
    )
    try:
        async with connect(stack.url(query="?ticket=t1")) as ws:
            await ws.send(b"hello")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"hello"
        async with connect(wrong.url(query="?ticket=t1")) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1011
        assert "certificate verify failed" in closed.value.rcvd.reason
        assert relay.refused == 0
        assert len(echo.writers) == 1
        assert cert not in repr(endpoint)
    finally:
        await stack.gateway.shutdown(grace=0)
        await wrong.gateway.shutdown(grace=0)
        await relay.close()
        echo.server.close()


async def test_kept_files_go_both_ways_over_tls(tmp_path: Path) -> None:
    """``put`` and ``get`` work over a TLS channel; a client pinning another certificate fails
    in the handshake, before its secret or files are sent."""

    async def collect(paths: Sequence[str]) -> Mapping[str, bytes]:
        return {".standin/token": b"refreshed"}

    secret = new_secret()
    cert, key = new_identity()
    other, _ = new_identity()
    relay = SessionChannel(secret, None, collect)
    port = await relay.listen("127.0.0.1", tls=server_context(cert, key))

    def ask(verb: str, message: dict[str, object], pin: str) -> dict[str, object]:
        return channel.request("127.0.0.1", port, secret, verb, message, timeout=5, cert=pin)

    try:
        files = {".standin/credentials.json": b"\x00kept\xff"}
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(ask, "put", {"files": encode_files(files)}, other)
        assert await asyncio.to_thread(ask, "put", {"files": encode_files(files)}, cert) == {
            "ok": True
        }
        assert relay.take_files() == files
        relay.vnc_path = str(tmp_path / "vnc.sock")  # the session runs
        answer = await asyncio.to_thread(ask, "get", {"paths": ["~/.standin"]}, cert)
        assert decode_files(answer["files"]) == {".standin/token": b"refreshed"}
        assert relay.refused == 0
    finally:
        await relay.close()


def test_a_spec_with_kept_files_is_refused_before_ray_sees_it() -> None:
    """``place_session`` refuses a spec carrying ``home_files``: Ray would keep a copy of it."""
    pytest.importorskip("ray", reason="needs ray: pip install -e '.[cluster]'")
    from remotecli.cluster import placement

    with pytest.raises(ValueError, match="over the session's channel"):
        placement.place_session("s1", {"command": ["sh"], "home_files": {"a": b"secret"}})
