"""The upstream servers the benchmarks proxy to, each run in its own process.

``python -m bench.upstream ws PORT`` serves WebSocket on 127.0.0.1:PORT: the path ``/sink``
consumes binary frames and answers a text frame with the payload byte count received so far
(the load client's end-of-upload marker); every other path echoes each frame back, unmasked with
websockets' C ``apply_mask`` and streamed piece by piece as it arrives, never buffered whole.
``python -m bench.upstream tcp PORT`` is a plain TCP echo server (the VNC endpoint stand-in for
the bridge benchmarks). Both run on uvloop, pause reading while their peer does not read, and
print ``ready`` once listening.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop
from websockets.speedups import apply_mask

from bench.processes import raise_fd_limit
from bench.wsframes import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    accept_key,
    frame_header,
)

_HIGH_WATER = 1 << 20


class _FlowControlled(asyncio.Protocol):
    """Pause reading while the transport's write buffer is above its high-water mark."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


class TcpEcho(_FlowControlled):
    """Write back every byte received."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class WsServer(_FlowControlled):
    """Answer the WebSocket handshake, then echo or sink frames depending on the path."""

    def __init__(self) -> None:
        self._head = b""
        self._sink = False
        self._parser = FrameParser(self._on_header, self._on_payload, self._on_end)
        self._mask = b"\0\0\0\0"
        self._offset = 0
        self._received = 0
        self._control = bytearray()
        self._opcode = 0

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 16384:
                    self.transport.close()
                return
            rest = self._head[end + 4 :]
            self._handshake(self._head[:end].decode("latin-1"))
            self._head = None  # type: ignore[assignment]
            if rest:
                self._parser.feed(rest)
            return
        self._parser.feed(data)

    def _handshake(self, head: str) -> None:
        lines = head.split("\r\n")
        path = lines[0].split(" ")[1] if " " in lines[0] else "/"
        self._sink = path.startswith("/sink")
        key = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                key = value.strip()
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
        )

    def _on_header(self, opcode: int, length: int, mask: bytes | None) -> None:
        self._mask = mask or b"\0\0\0\0"
        self._offset = 0
        self._opcode = opcode
        if opcode >= OP_CLOSE:
            self._control = bytearray()
        elif not self._sink:
            self.transport.write(frame_header(opcode, length))

    def _on_payload(self, view: memoryview) -> None:
        if self._opcode >= OP_CLOSE:
            self._control += view
            return
        if self._sink:
            if self._opcode != OP_TEXT:
                self._received += len(view)
            return
        shift = self._offset % 4
        mask = self._mask[shift:] + self._mask[:shift]
        self._offset += len(view)
        self.transport.write(apply_mask(view, mask))

    def _on_end(self, opcode: int) -> None:
        if opcode == OP_PING:
            payload = apply_mask(bytes(self._control), self._mask)
            self.transport.write(frame_header(OP_PONG, len(payload)) + payload)
        elif opcode == OP_CLOSE:
            self.transport.write(frame_header(OP_CLOSE, 2) + b"\x03\xe8")
            self.transport.close()
        elif opcode == OP_TEXT and self._sink:
            answer = str(self._received).encode()
            self.transport.write(frame_header(OP_TEXT, len(answer)) + answer)


async def serve(kind: str, port: int) -> None:
    """Listen on 127.0.0.1:``port`` until killed."""
    factory = TcpEcho if kind == "tcp" else WsServer
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry: ``python -m bench.upstream ws|tcp PORT``."""
    raise_fd_limit()
    uvloop.run(serve(sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    main()
