"""WebSocket framing for the benchmark's own load client and upstream servers.

Theory of operation: the benchmark must measure the proxy, not its own Python. So the load
client builds each frame once (masked with a fixed key, which RFC 6455 allows a client to
reuse as far as the receiver can tell) and writes the same bytes again and again, and both ends
parse frames with :class:`FrameParser`, which walks the byte stream by frame headers and hands
payloads on as ``memoryview`` slices of the received chunk: a payload is never copied or joined
unless the caller needs its bytes (the echo server, which unmasks them with websockets' C
``apply_mask``).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable

from websockets.speedups import apply_mask

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLIENT_MASK = b"\x37\xfa\x21\x3d"
"""The fixed masking key of every frame the load client sends."""

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame_header(opcode: int, length: int, mask: bytes | None = None) -> bytes:
    """Return the header of a final frame carrying ``length`` payload bytes."""
    first = 0x80 | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + mask if mask is not None else head


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """Return a complete client frame (masked with :data:`CLIENT_MASK`) to write as it is."""
    return frame_header(opcode, len(payload), CLIENT_MASK) + apply_mask(payload, CLIENT_MASK)


def accept_key(key: str) -> str:
    """Return the ``Sec-WebSocket-Accept`` value answering a ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode() + _GUID).digest()  # noqa: S324 - fixed by RFC 6455
    return base64.b64encode(digest).decode()


def upgrade_request(host: str, path: str, key: str, subprotocol: str | None = None) -> bytes:
    """Return a WebSocket upgrade request head for ``path``."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Origin: http://{host}",
    ]
    if subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


HeaderCallback = Callable[[int, int, "bytes | None"], None]
PayloadCallback = Callable[[memoryview], None]
EndCallback = Callable[[int], None]


class FrameParser:
    """Walk a WebSocket byte stream frame by frame, without copying payloads.

    Feed it every received chunk with :meth:`feed`. For each frame it calls ``on_header(opcode,
    length, mask)`` once, ``on_payload(view)`` for each piece of the payload as it arrives (the
    view is valid only during the call), and ``on_end(opcode)`` when the frame is complete.
    """

    def __init__(
        self, on_header: HeaderCallback, on_payload: PayloadCallback, on_end: EndCallback
    ) -> None:
        self._on_header = on_header
        self._on_payload = on_payload
        self._on_end = on_end
        self._head = bytearray()
        self._remaining = 0
        self._opcode = 0

    def feed(self, data: bytes) -> None:
        """Parse one received chunk; calls the callbacks for what it completes."""
        view = memoryview(data)
        size = len(data)
        pos = 0
        while pos < size:
            if self._remaining:
                take = min(self._remaining, size - pos)
                self._on_payload(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._on_end(self._opcode)
                continue
            pos = self._read_header(data, pos)

    def _read_header(self, data: bytes, pos: int) -> int:
        """Consume header bytes from ``data[pos:]``; return the new position."""
        head = self._head
        need = 2
        while True:
            if len(head) >= 2:
                length7 = head[1] & 0x7F
                need = 2 + (2 if length7 == 126 else 8 if length7 == 127 else 0)
                need += 4 if head[1] & 0x80 else 0
            if len(head) >= need:
                break
            take = min(need - len(head), len(data) - pos)
            if take <= 0:
                return pos
            head += data[pos : pos + take]
            pos += take
        length7 = head[1] & 0x7F
        if length7 == 126:
            (length,) = struct.unpack_from("!H", head, 2)
        elif length7 == 127:
            (length,) = struct.unpack_from("!Q", head, 2)
        else:
            length = length7
        mask = bytes(head[need - 4 : need]) if head[1] & 0x80 else None
        self._opcode = head[0] & 0x0F
        self._head = bytearray()
        self._on_header(self._opcode, length, mask)
        self._remaining = length
        if length == 0:
            self._on_end(self._opcode)
        return pos
