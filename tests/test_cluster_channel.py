"""The session channel: a secret line first, compared in constant time, then bytes as they are."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from remotecli.cluster import channel
from remotecli.cluster.channel import (
    SessionChannel,
    decode_files,
    encode_files,
    frame,
    new_secret,
    preamble,
    preamble_ok,
)
from remotecli.cluster.channel_tls import client_context, new_identity, server_context
from remotecli.drivers.base import RUN_ERRORS_MAX, TtyEndpoint, VncEndpoint
from remotecli.drivers.qemu_runframes import FRAME_MAX as RUN_FRAME_MAX
from remotecli.drivers.qemu_runframes import Errors, Output, RunFrames
from remotecli.exceptions import DriverError, UpstreamRefused
from tests.conftest import MS
from tests.test_bridge import make_stack, start_echo
from tests.test_tty_bridge import make_stack as make_tty_stack
from tests.test_tty_bridge import start_tty

if TYPE_CHECKING:
    from remotecli.cluster.run import ClusterRun as ClusterRunType

TIMEOUT = 5_000 * MS


def test_preamble_is_the_secret_a_verb_and_a_newline_only() -> None:
    """Only the exact secret, a known verb and the newline pass; the verb is what it returns."""
    secret = new_secret()
    assert len(secret) == 64
    assert secret != new_secret()
    assert preamble_ok(preamble(secret), secret) == "vnc"
    assert preamble_ok(preamble(secret, "put"), secret) == "put"
    assert preamble_ok(preamble(secret, "get"), secret) == "get"
    assert preamble_ok(preamble(secret, "tty"), secret) == "tty"
    assert preamble_ok(preamble(secret, "loopback"), secret) == "loopback"
    assert preamble_ok(preamble(secret)[:-1], secret) is None
    assert preamble_ok(secret.encode() + b"\n", secret) is None  # no verb
    assert preamble_ok(preamble(secret, "shell"), secret) is None
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


@pytest.mark.parametrize("kind", ["unix", "tcp"])
async def test_channel_relays_only_after_the_right_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """The right secret reaches the VNC server, at a Unix socket (the local sandbox's) or a
    loopback TCP port (a microVM's); none, a wrong or an overlong one get no byte."""
    monkeypatch.setattr(channel, "PREAMBLE_TIMEOUT", 200 * MS)
    echo = await start_echo(tmp_path, kind)
    secret = new_secret()
    vnc = echo.endpoint
    target = vnc.unix_path if vnc.unix_path is not None else (str(vnc.host), int(vnc.port or 0))
    relay = SessionChannel(secret, target)
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


async def test_tty_relays_to_the_sessions_terminal_only_after_the_right_secret(
    tmp_path: Path,
) -> None:
    """``tty`` joins the right secret to the terminal socket the host names; a wrong secret, a
    session not started and one without a terminal get no byte and never reach it."""
    terminal = await start_echo(tmp_path, "unix")
    assert terminal.endpoint.unix_path is not None
    path: str = terminal.endpoint.unix_path
    asked: list[str] = []

    async def tty() -> str:
        asked.append("tty")
        if path == "none":
            raise DriverError("session s1 ended before its text terminal was ready")
        return path

    secret = new_secret()
    relay = SessionChannel(secret, None, tty=tty)
    port = await relay.listen("127.0.0.1")
    try:
        assert await answer(port, preamble(secret, "tty") + b"early") == b""  # not started
        relay.vnc_path = str(tmp_path / "vnc.sock")  # the session runs
        assert await answer(port, preamble("0" * 64, "tty") + b"typed") == b""
        assert asked == []  # neither asked the host for its terminal
        typed = b"\x00\x00\x00\x00\x03ls\r"
        assert await answer(port, preamble(secret, "tty"), more=typed) == typed
        path = "none"
        assert await answer(port, preamble(secret, "tty") + b"typed") == b""
        assert asked == ["tty", "tty"]
        assert relay.refused == 1
        assert len(terminal.writers) == 1  # only the right one reached the terminal
    finally:
        await relay.close()
        terminal.server.close()


async def test_text_view_writes_the_secret_and_tty_before_any_record(tmp_path: Path) -> None:
    """A text viewer reaches a terminal behind a channel: the bridge sends the secret and
    ``tty`` first, then type-0 records, and the terminal's output comes back."""
    terminal = await start_tty(tmp_path / "tty.sock")

    async def tty() -> str:
        return terminal.path

    secret = new_secret()
    relay = SessionChannel(secret, str(tmp_path / "vnc.sock"), tty=tty)
    port = await relay.listen("127.0.0.1")
    stack = await make_tty_stack(TtyEndpoint(host="127.0.0.1", port=port, channel_secret=secret))
    try:
        async with connect(stack.url(query="?ticket=t1")) as ws:
            await ws.send(b"echo hi\r")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"echo hi\r"
        assert terminal.input() == b"echo hi\r"
        assert relay.refused == 0
        assert secret not in repr(TtyEndpoint(host="h", port=1, channel_secret=secret))
    finally:
        await stack.gateway.shutdown(grace=0)
        await relay.close()
        terminal.close()


async def test_loopback_connects_only_to_a_port_on_the_sessions_loopback() -> None:
    """``loopback`` relays bytes to the port the host's driver connected on the session's
    loopback, after ``{"ok": true}``; a wrong secret gets no byte, and a bad address or port,
    an oversized request, a session not started or nothing listening are refused by name."""
    connected: list[int] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.append(1)
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    listener = await asyncio.start_server(echo, "127.0.0.1", 0)
    listening: int = listener.sockets[0].getsockname()[1]
    asked: list[tuple[int, str]] = []

    async def loopback(port: int, address: str) -> channel.Streams:
        asked.append((port, address))
        try:
            return await asyncio.open_connection(address, port)
        except ConnectionRefusedError as exc:  # as the local driver says it
            raise UpstreamRefused(f"{address}:{port} refused the connection") from exc

    secret = new_secret()
    relay = SessionChannel(secret, None, loopback=loopback)
    port = await relay.listen("127.0.0.1")

    async def open_(address: str, target: Any, key: str = secret) -> channel.Streams:
        """Ask for ``target``: anything JSON carries, which the host checks, not this client."""
        return await channel.open_loopback("127.0.0.1", port, key, address, target, timeout=TIMEOUT)

    try:
        with pytest.raises(DriverError, match="the session has not started"):
            await open_("127.0.0.1", listening)
        relay.vnc_path = "/run/vnc.sock"  # the session runs
        with pytest.raises(OSError, match="closed without an answer"):
            await open_("127.0.0.1", listening, "0" * 64)
        for address in ["10.0.0.1", "localhost"]:
            with pytest.raises(DriverError, match="not a session's loopback address"):
                await open_(address, listening)
        for bad in [0, 65536, "80", True, None]:
            with pytest.raises(DriverError, match="is not a TCP port"):
                await open_("127.0.0.1", bad)
        assert asked == []  # none of those reached the host's driver
        oversized = frame({"address": "127.0.0.1", "port": listening, "pad": "x" * 5000})
        assert await answer(port, preamble(secret, "loopback") + oversized) == frame(
            {
                "error": f"bad request: a channel frame of {len(oversized) - 4} bytes is over 4096",
                "kind": "driver",
            }
        )
        reader, writer = await open_("127.0.0.1", listening)
        try:
            sent = b"GET /callback?code=x HTTP/1.0\r\n\r\n"
            writer.write(sent)
            assert await asyncio.wait_for(reader.readexactly(len(sent)), TIMEOUT) == sent
        finally:
            writer.close()
        listener.close()
        await listener.wait_closed()
        with pytest.raises(UpstreamRefused, match="refused the connection"):
            await open_("127.0.0.1", listening)
        assert asked == [(listening, "127.0.0.1")] * 2
        assert connected == [1]
        assert relay.refused == 1
    finally:
        listener.close()


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


class QueuedRun:
    """A RunOutput fed by the test: each queued chunk is read once, b"" ends the output.

    In memory, standing in for the host's local run (which needs root and a sandbox): it leaves
    out the sandbox, not the channel's streaming, which is what these tests prove.
    """

    def __init__(self, status: int = 0, errors: str = "") -> None:
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self.status = status
        self._errors = errors

    async def read(self) -> bytes:
        return await self.chunks.get()

    async def wait(self) -> int:
        return self.status

    def errors(self) -> str:
        return self._errors


def read_run_frames(received: bytes) -> tuple[list[int], bytes, bytes, int | None]:
    """Parse a ``run`` stream: each stdout frame's size, stdout, stderr, the status."""
    frames = RunFrames()
    frames.receive_data(received)
    frames.receive_eof()
    sizes, out, err = [], b"", b""
    for event in frames.events_received():
        if isinstance(event, Output):
            sizes.append(len(event.data))
            out += event.data
        elif isinstance(event, Errors):
            err += event.data
    return sizes, out, err, frames.status


async def test_run_streams_the_output_once_in_bounded_frames_then_errors_and_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run`` streams output as it comes (in frames of at most 64 KiB), then the end of
    standard error and the exit status; a wrong secret, a run not yet started and a second
    ``run`` get no byte, and ``get`` reads the run's HOME."""
    monkeypatch.setattr(channel, "PREAMBLE_TIMEOUT", 200 * MS)
    secret = new_secret()
    assert preamble_ok(preamble(secret, "run"), secret) == "run"

    async def collect(paths: Sequence[str]) -> Mapping[str, bytes]:
        return {".standin/token": b"run-refreshed"}

    relay = SessionChannel(secret, None, collect)
    port = await relay.listen("127.0.0.1")
    try:
        assert await answer(port, preamble(secret, "run")) == b""  # no run yet
        run = QueuedRun(status=3, errors="e" * 5000)
        relay.run = run
        assert await answer(port, preamble("0" * 64, "run")) == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(preamble(secret, "run"))
        run.chunks.put_nowait(b"first\n")
        async with asyncio.timeout(TIMEOUT):
            first = await reader.readexactly(5 + len(b"first\n"))
        assert first == b"o\x00\x00\x00\x06first\n"  # it came before the run ended
        big = bytes(range(256)) * 400  # 102,400 bytes in one read
        run.chunks.put_nowait(big)
        run.chunks.put_nowait(b"")
        async with asyncio.timeout(TIMEOUT):
            rest = await reader.read()
        writer.close()
        sizes, out, err, status = read_run_frames(first + rest)
        assert out == b"first\n" + big
        assert sizes == [6, RUN_FRAME_MAX, len(big) - RUN_FRAME_MAX]
        assert err == b"e" * RUN_ERRORS_MAX
        assert status == 3
        assert await answer(port, preamble(secret, "run")) == b""  # read once only
        got = await asyncio.to_thread(
            channel.request, "127.0.0.1", port, secret, "get", {"paths": ["~/.standin"]}, timeout=5
        )
        assert decode_files(got["files"]) == {".standin/token": b"run-refreshed"}
        assert relay.refused == 3
    finally:
        await relay.close()


ALIVE = [{"NodeID": "n1", "Alive": True}]
DEAD = [{"NodeID": "n1", "Alive": False}]


async def start_cluster_run(
    run: QueuedRun, table: list[list[dict[str, object]]]
) -> tuple[SessionChannel, ClusterRunType]:
    """A channel on loopback serving ``run``, and the controller's ClusterRun reading it on a
    host "w1" whose node table is ``table[0]`` (the test swaps it)."""
    from remotecli.cluster.placement import Placement
    from remotecli.cluster.run import ClusterRun, open_run

    secret = new_secret()
    relay = SessionChannel(secret, None)
    relay.run = run
    port = await relay.listen("127.0.0.1")
    placed = Placement("run-x", "w1", "n1", "127.0.0.1", port, secret)

    async def nodes(fresh: bool) -> list[dict[str, object]]:
        return table[0]

    reader, writer = await open_run(placed, within=TIMEOUT)
    return relay, ClusterRun(placed, reader, writer, nodes)


async def test_a_cluster_run_reads_the_output_as_it_comes_and_its_status() -> None:
    """The controller's ClusterRun gets the first output before the command ended, then the
    rest, the exit status and the end of standard error."""
    pytest.importorskip("ray", reason="needs ray: pip install -e '.[cluster]'")
    run = QueuedRun(status=0, errors="warning: slow\n")
    relay, output = await start_cluster_run(run, [ALIVE])
    try:
        run.chunks.put_nowait(b"first\n")
        async with asyncio.timeout(TIMEOUT):
            assert await output.read() == b"first\n"
            run.chunks.put_nowait(b"second\n")
            run.chunks.put_nowait(b"")
            rest = b""
            while chunk := await output.read():
                rest += chunk
            assert rest == b"second\n"
            assert await output.wait() == 0
        assert output.errors() == "warning: slow\n"
    finally:
        output.stop()
        await relay.close()


async def test_a_cluster_run_fails_host_lost_when_its_node_dies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run whose node Ray declares dead fails "host w1 lost": while its stream is silent (a
    cut link), and when its stream ended first (killed processes close their sockets); a stream
    that ends without a status on a live node fails with that after the bound."""
    pytest.importorskip("ray", reason="needs ray: pip install -e '.[cluster]'")
    from remotecli.cluster import run as cluster_run

    monkeypatch.setattr(cluster_run, "LOST_BOUND", 1_000 * MS)
    monkeypatch.setattr(cluster_run, "POLL", 50 * MS)
    table = [ALIVE]
    silent, output = await start_cluster_run(QueuedRun(), table)
    try:
        await asyncio.sleep(150 * MS)
        table[0] = DEAD
        async with asyncio.timeout(TIMEOUT):
            assert await output.read() == b""
            with pytest.raises(DriverError, match=r"^host w1 lost$"):
                await output.wait()
    finally:
        output.stop()
        await silent.close()

    table = [ALIVE]
    killed, output = await start_cluster_run(QueuedRun(), table)
    try:
        await killed.close()  # the host's sockets close; Ray has not decided yet
        await asyncio.sleep(150 * MS)
        table[0] = DEAD
        async with asyncio.timeout(TIMEOUT):
            with pytest.raises(DriverError, match=r"^host w1 lost$"):
                await output.wait()
    finally:
        output.stop()

    run = QueuedRun()
    broken, output = await start_cluster_run(run, [ALIVE])
    try:
        run.chunks.put_nowait(b"some\n")
        async with asyncio.timeout(TIMEOUT):
            assert await output.read() == b"some\n"  # the stream runs
            await broken.close()  # then ends without a status; the node lives on
            with pytest.raises(DriverError, match="ended before the command's exit status"):
                await output.wait()
    finally:
        output.stop()
