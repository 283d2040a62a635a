"""The load client: one measurement per process, never on the event loop of what it measures.

``python -m bench.loadclient '{"mode": ..., "port": ..., ...}'`` runs one measurement against
127.0.0.1:port and prints its result as one JSON line. Modes:

- ``echo``: one tunnel, 64 KiB frames kept ``window`` bytes ahead of the echoes; payload bytes
  echoed per second over ``seconds`` (after a short warm-up).
- ``upload``: one tunnel to ``/sink``, 64 KiB frames written as fast as the tunnel drains them for
  ``seconds``, then a text marker; bytes sent divided by the time until the upstream answers the
  marker (so every byte was delivered).
- ``rtt``: one tunnel, ``count`` 64-byte frames one after another; round-trip percentiles.
- ``upgrades``: ``count`` upgrades started at once; each one's time to the 101, percentiles.
- ``idle``: ``count`` tunnels opened (``concurrency`` at a time), then one 64-byte echo on each;
  prints how many were opened and how many answered, then holds them until a line arrives on
  stdin (the parent reads memory meanwhile), then aborts them all (RST, so no TIME_WAIT).

With ``cpu_pids`` in the spec (a peer's process tree), ``echo`` and ``upload`` also report the CPU
seconds those processes used over the timed span, per GB of payload (``cpu_s_per_gb``): echoed
bytes for ``echo`` (each crossed the proxy twice), bytes sent for ``upload``.

Frames are built once and written again and again; received frames are counted by their headers
(:class:`bench.wsframes.FrameParser`), never copied. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import uvloop

from bench.processes import cpu_seconds, raise_fd_limit
from bench.wsframes import OP_BINARY, OP_TEXT, FrameParser, masked_frame, upgrade_request

_WARMUP = 0.3


class Tunnel(asyncio.Protocol):
    """A client WebSocket connection that counts echoed payload bytes and completed frames."""

    def __init__(self, host: str, path: str, subprotocol: str | None) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self._request = upgrade_request(host, path, key, subprotocol)
        self._head: bytes | None = b""
        self._parser = FrameParser(self._on_header, self._on_payload, self._on_end)
        loop = asyncio.get_running_loop()
        self.upgraded: asyncio.Future[float] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.frame_done: asyncio.Future[float] | None = None
        self.text: asyncio.Future[float] | None = None
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.paused = False
        self.on_progress: Callable[[], None] | None = None  # after payload arrives
        self.on_drain: Callable[[], None] | None = None  # when writing may resume

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=1 << 20)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            self._parser.feed(data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            return
        status = self._head[:end].split(b"\r\n", 1)[0]
        rest = self._head[end + 4 :]
        self._head = None
        if b" 101 " not in status + b" ":
            if not self.upgraded.done():
                self.upgraded.set_exception(ConnectionError(status.decode("latin-1")))
            assert self.transport is not None
            self.transport.close()
            return
        if not self.upgraded.done():
            self.upgraded.set_result(time.perf_counter())
        if rest:
            self._parser.feed(rest)

    def _on_header(self, opcode: int, length: int, mask: bytes | None) -> None:
        pass

    def _on_payload(self, view: memoryview) -> None:
        self.received += len(view)
        if self.on_progress is not None:
            self.on_progress()

    def _on_end(self, opcode: int) -> None:
        now = time.perf_counter()
        if opcode == OP_TEXT and self.text is not None and not self.text.done():
            self.text.set_result(now)
        elif self.frame_done is not None and not self.frame_done.done():
            self.frame_done.set_result(now)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.on_drain is not None:
            self.on_drain()

    def connection_lost(self, exc: Exception | None) -> None:
        for future in (self.upgraded, self.frame_done, self.text):
            if future is not None and not future.done():
                future.set_exception(ConnectionError("connection closed by the peer"))
        if not self.closed.done():
            self.closed.set_result(None)


def _reset(tunnel: Tunnel) -> None:
    """Close with an RST (SO_LINGER 0) so thousands of closes leave no TIME_WAIT behind."""
    transport = tunnel.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _open(spec: dict[str, Any], timeout: float = 10.0) -> Tunnel:
    """Connect and upgrade one tunnel; raise on failure or after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    port = spec["port"]
    _, tunnel = await asyncio.wait_for(
        loop.create_connection(
            lambda: Tunnel(f"127.0.0.1:{port}", spec.get("path", "/echo"), spec.get("subprotocol")),
            "127.0.0.1",
            port,
        ),
        timeout,
    )
    await asyncio.wait_for(asyncio.shield(tunnel.upgraded), timeout)
    return tunnel


async def echo(spec: dict[str, Any]) -> dict[str, Any]:
    """Echo throughput with a bounded window of bytes in flight."""
    tunnel = await _open(spec)
    assert tunnel.transport is not None
    transport = tunnel.transport
    size = spec.get("size", 65536)
    frame = masked_frame(OP_BINARY, os.urandom(size))
    window = spec.get("window", 16 * size)
    sent = 0
    stopping = False

    def pump() -> None:
        nonlocal sent
        while not stopping and not tunnel.paused and sent - tunnel.received < window:
            transport.write(frame)
            sent += size

    tunnel.on_progress = pump
    tunnel.on_drain = pump
    pump()
    await asyncio.sleep(_WARMUP)
    pids = spec.get("cpu_pids", [])
    t0, r0, c0 = time.perf_counter(), tunnel.received, cpu_seconds(pids)
    await asyncio.sleep(spec["seconds"])
    t1, r1, c1 = time.perf_counter(), tunnel.received, cpu_seconds(pids)
    stopping = True
    transport.abort()
    return {"mbps": (r1 - r0) / (t1 - t0) / 1e6, "bytes": r1 - r0, **_cpu(pids, c1 - c0, r1 - r0)}


async def upload(spec: dict[str, Any]) -> dict[str, Any]:
    """Upload-only throughput, ended by a marker the sink answers once it has every byte."""
    spec = {**spec, "path": "/sink"}
    tunnel = await _open(spec)
    assert tunnel.transport is not None
    transport = tunnel.transport
    size = spec.get("size", 65536)
    frame = masked_frame(OP_BINARY, os.urandom(size))
    sent = 0
    stopping = False

    def pump() -> None:
        nonlocal sent
        while not stopping and not tunnel.paused:
            transport.write(frame)
            sent += size

    tunnel.on_drain = pump
    tunnel.text = asyncio.get_running_loop().create_future()
    pids = spec.get("cpu_pids", [])
    start, cpu_start = time.perf_counter(), cpu_seconds(pids)
    pump()
    await asyncio.sleep(spec["seconds"])
    stopping = True
    transport.write(masked_frame(OP_TEXT, b"end"))
    done = await asyncio.wait_for(tunnel.text, 30)
    cpu = cpu_seconds(pids) - cpu_start
    transport.abort()
    return {"mbps": sent / (done - start) / 1e6, "bytes": sent, **_cpu(pids, cpu, sent)}


def _cpu(pids: list[int], seconds: float, payload: int) -> dict[str, float]:
    """``cpu_s_per_gb`` when a process tree was watched and payload moved, else nothing."""
    if not pids or payload <= 0:
        return {}
    return {"cpu_s": seconds, "cpu_s_per_gb": seconds / (payload / 1e9)}


def _percentiles(samples: list[float]) -> dict[str, float]:
    """p50/p99/max of samples in seconds, as milliseconds."""
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": statistics.median(ordered) * 1000, "p99_ms": pick(0.99), "max_ms": pick(1)}


async def rtt(spec: dict[str, Any]) -> dict[str, Any]:
    """Sequential 64-byte round trips on one tunnel."""
    tunnel = await _open(spec)
    assert tunnel.transport is not None
    frame = masked_frame(OP_BINARY, os.urandom(64))
    loop = asyncio.get_running_loop()
    samples: list[float] = []
    deadline = time.monotonic() + spec.get("max_seconds", 20)
    for index in range(spec["count"] + 50):
        if time.monotonic() > deadline:
            break
        tunnel.frame_done = loop.create_future()
        start = time.perf_counter()
        tunnel.transport.write(frame)
        end = await asyncio.wait_for(tunnel.frame_done, 5)
        if index >= 50:  # the first round trips warm up both ends
            samples.append(end - start)
    tunnel.transport.abort()
    return {**_percentiles(samples), "count": len(samples)}


async def upgrades(spec: dict[str, Any]) -> dict[str, Any]:
    """``count`` upgrades started at the same moment; time of each to its 101."""

    async def one() -> float:
        start = time.perf_counter()
        tunnel = await _open(spec, 30)
        tunnels.append(tunnel)
        return await tunnel.upgraded - start

    tunnels: list[Tunnel] = []
    results = await asyncio.gather(*(one() for _ in range(spec["count"])), return_exceptions=True)
    for tunnel in tunnels:
        _reset(tunnel)
    samples = [r for r in results if isinstance(r, float)]
    failed = len(results) - len(samples)
    if not samples:
        return {"failed": failed}
    return {**_percentiles(samples), "failed": failed}


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open ``count`` tunnels, check each answers once, hold them until stdin has a line."""
    limit = asyncio.Semaphore(spec.get("concurrency", 200))
    tunnels: list[Tunnel] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + spec.get("max_seconds", 120)

    async def one() -> None:
        async with limit:
            if time.monotonic() > deadline:
                errors["deadline"] = errors.get("deadline", 0) + 1
                return
            try:
                tunnels.append(await _open(spec, spec.get("open_timeout", 20)))
            except (OSError, TimeoutError) as exc:
                kind = type(exc).__name__ + (f" {exc.errno}" if isinstance(exc, OSError) else "")
                errors[kind] = errors.get(kind, 0) + 1

    await asyncio.gather(*(one() for _ in range(spec["count"])))
    loop = asyncio.get_running_loop()
    frame = masked_frame(OP_BINARY, os.urandom(64))
    for tunnel in tunnels:
        assert tunnel.transport is not None
        if tunnel.transport.is_closing():
            continue  # the peer closed it after the upgrade: not held
        tunnel.frame_done = loop.create_future()
        tunnel.transport.write(frame)
    answers = await asyncio.gather(
        *(asyncio.wait_for(t.frame_done, 30) for t in tunnels if t.frame_done is not None),
        return_exceptions=True,
    )
    alive = sum(1 for answer in answers if isinstance(answer, float))
    result = {"opened": len(tunnels), "alive": alive, "errors": errors}
    print(json.dumps(result), flush=True)
    await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), 600)
    for tunnel in tunnels:
        _reset(tunnel)
    return result


MODES = {"echo": echo, "upload": upload, "rtt": rtt, "upgrades": upgrades, "idle": idle}


def main() -> None:
    """Entry: ``python -m bench.loadclient SPEC_JSON``; prints one JSON result line."""
    raise_fd_limit()
    spec = json.loads(sys.argv[1])
    result = uvloop.run(MODES[spec["mode"]](spec))
    if spec["mode"] != "idle":
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
