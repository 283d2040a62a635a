"""Session channel benchmark: what TLS costs the cluster's bridge-to-host channel, on loopback.

A :class:`~remotecli.cluster.channel.SessionChannel` runs in a child process, relaying ``vnc``
to a Unix socket that stands in for the host's VNC server: it sends the RFB banner, then echoes
what it gets, or, after a ``bulk`` line, writes a fixed number of bytes and closes. The
client, in this process, connects as the bridge does (asyncio, the session's certificate
pinned, the secret line first), once over plain TCP and once over TLS, interleaved:

- connect → banner: TCP connect, TLS handshake (with), secret line, first RFB byte back;
- round trip: 100 bytes out and back through the open channel (a keystroke and its echo);
- bulk: the host's bytes to the client (the framebuffer's direction), in MB/s, and the CPU
  the client (the controller's side) spent per GB;
- the actor's own cost: a key pair and certificate made and loaded per session.

Client and channel each have one process: on a 2-core machine the figures include both ends'
CPU, as on a host and a controller.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from pathlib import Path

from bench.report import Section, fmt, median, percentile, ratio
from remotecli.cluster.channel import SessionChannel, new_secret, preamble
from remotecli.cluster.channel_tls import client_context, new_identity, server_context

BANNER = b"RFB 003.008\n"
CHUNK = b"\xa5" * 65536


async def _vnc_standin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The host's VNC server: banner, then echo, or ``bulk N`` bytes and close."""
    writer.write(BANNER)
    try:
        first = await reader.readline()
        if first.startswith(b"bulk "):
            left = int(first.split()[1])
            while left > 0:
                writer.write(CHUNK[: min(left, len(CHUNK))])
                left -= len(CHUNK)
                await writer.drain()
        else:
            writer.write(first)
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _serve(unix_path: str, secret: str, cert: str, key: bytes, pipe: Connection) -> None:
    """The child: the stand-in VNC socket and two channels (plain, TLS); send their ports."""

    async def main() -> None:
        await asyncio.start_unix_server(_vnc_standin, unix_path)
        plain = SessionChannel(secret, unix_path)
        tls = SessionChannel(secret, unix_path)
        ports = (
            await plain.listen("127.0.0.1"),
            await tls.listen("127.0.0.1", tls=server_context(cert, key)),
        )
        pipe.send(ports)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _open(
    port: int, secret: str, cert: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = client_context(cert) if cert is not None else None
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="" if context else None
    )
    writer.write(preamble(secret))
    assert await reader.readexactly(len(BANNER)) == BANNER
    return reader, writer


async def _connects(port: int, secret: str, cert: str | None, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        _, writer = await _open(port, secret, cert)
        times.append(time.perf_counter() - began)
        writer.close()
    return times


async def _round_trips(port: int, secret: str, cert: str | None, rounds: int) -> list[float]:
    reader, writer = await _open(port, secret, cert)
    message = b"k" * 99 + b"\n"
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        writer.write(message)
        await reader.readexactly(len(message))
        times.append(time.perf_counter() - began)
    writer.close()
    return times


async def _bulk(port: int, secret: str, cert: str | None, size: int) -> tuple[float, float]:
    """Return MB/s and this process's (the client's) CPU seconds per GB."""
    reader, writer = await _open(port, secret, cert)
    began = time.perf_counter()
    cpu = time.process_time()
    writer.write(f"bulk {size}\n".encode())
    got = 0
    while data := await reader.read(262144):
        got += len(data)
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu
    writer.close()
    assert got == size, (got, size)
    return size / seconds / 1e6, cpu / (size / 1e9)


def _scaled(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


async def _measure(ports: tuple[int, int], secret: str, cert: str, quick: bool) -> Section:
    connects = 50 if quick else 300
    trips = 500 if quick else 3000
    size = (64 if quick else 512) * 1024**2
    repeats = 2 if quick else 4
    figures: dict[str, dict[str, list[float]]] = {
        name: {"connect": [], "trip": [], "bulk": [], "cpu": []} for name in ("plain", "tls")
    }
    for _ in range(repeats):  # interleaved: the machine's load falls on both alike
        for name, port, pin in (("plain", ports[0], None), ("tls", ports[1], cert)):
            figures[name]["connect"] += await _connects(port, secret, pin, connects // repeats)
            figures[name]["trip"] += await _round_trips(port, secret, pin, trips // repeats)
            rate, cpu = await _bulk(port, secret, pin, size // repeats)
            figures[name]["bulk"].append(rate)
            figures[name]["cpu"].append(cpu)
    rows = []
    for label, key, scale, digits in (
        ("connect → banner p50 (ms)", "connect", 1e3, 2),
        ("round trip 100 B p50 (µs)", "trip", 1e6, 0),
        ("bulk host → client (MB/s, median)", "bulk", 1.0, 0),
        ("bulk: the client's CPU (s/GB, median)", "cpu", 1.0, 2),
    ):
        plain = median(figures["plain"][key])
        tls = median(figures["tls"][key])
        shown = [fmt(_scaled(plain, scale), digits), fmt(_scaled(tls, scale), digits)]
        rows.append([label, *shown, ratio(tls, plain)])
    for label, key, scale in (("connect → banner p95 (ms)", "connect", 1e3),):
        plain95 = percentile(figures["plain"][key], 0.95)
        tls95 = percentile(figures["tls"][key], 0.95)
        shown = [fmt(_scaled(plain95, scale), 2), fmt(_scaled(tls95, scale), 2)]
        rows.append([label, *shown, ratio(tls95, plain95)])
    identity = []
    for _ in range(20):
        began = time.perf_counter()
        server_context(*new_identity())
        identity.append(time.perf_counter() - began)
    made = fmt(_scaled(median(identity), 1e3), 2)
    rows.append(["key pair + certificate, per session (ms)", "-", made, "-"])
    return Section(
        "session channel: plain TCP vs TLS (loopback)",
        ["figure", "plain TCP", "TLS 1.3 (pinned)", "TLS / plain"],
        rows,
        notes=[
            f"{connects} connects, {trips} round trips, {size // 1024**2} MiB bulk per side, "
            f"in {repeats} interleaved rounds; channel in a child process, client here",
        ],
    )


async def run(quick: bool, workdir: Path) -> list[Section]:
    """Start the channels in a child process, measure both, stop it."""
    secret = new_secret()
    cert, key = new_identity()
    ours, theirs = multiprocessing.Pipe()
    unix_path = str(workdir / "vnc.sock")
    child = multiprocessing.get_context("fork").Process(
        target=_serve, args=(unix_path, secret, cert, key, theirs), daemon=True
    )
    child.start()
    try:
        if not ours.poll(30):
            return [Section("session channel", skipped="the channel's process did not start")]
        ports: tuple[int, int] = ours.recv()
        return [await _measure(ports, secret, cert, quick)]
    finally:
        child.kill()
        child.join()
        if os.path.exists(unix_path):
            os.unlink(unix_path)
