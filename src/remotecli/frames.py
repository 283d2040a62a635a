"""WebSocket frames a client sends, read without I/O; and the unmasked frames a server writes.

Theory of operation. Every WebSocket endpoint of remote-cli takes its opening handshake from
websockets' ``ServerProtocol``; once it has sent the 101, the frames the client sends go to a
:class:`FrameReader` instead, because websockets' generator-based parser costs the VNC bridge
about a third of its throughput (``docs/benchmarks.md``). Feed the reader what the transport
received with :meth:`~FrameReader.receive_data` (and :meth:`~FrameReader.receive_eof` at the
end), then take :meth:`~FrameReader.events_received`: websockets' own :class:`Frame` values,
unmasked, in order. When the client breaks a rule, the reader stops, and ``failure`` holds the
close to answer with; after a close frame it stops, and ``close_rcvd`` holds its code and
reason. Either way it discards what comes after.

The rules are websockets', checked in websockets' order, with its close codes and reasons, so that
the same bytes get the same verdict at the same byte (``tests/test_frames.py`` proves it against
``ServerProtocol``): an unknown opcode or an unmasked frame (1002), a message over ``max_size``
(1009, counted across fragments as websockets counts them, control frames between fragments
included), then, once the payload is in, reserved bits (1002), control frames longer than 125
bytes or fragmented (1002), continuation frames without a message or a message started inside
another (1002), a close frame with a bad code (1002) or a reason that is not UTF-8 (1007). One
rule websockets leaves to its I/O layer is checked here: a text message must be UTF-8 (1007,
as soon as a frame makes it impossible).

The caller answers pings, echoes a close frame and closes the connection; the helpers at the end
write a server's frames (unmasked) for it.
"""

from __future__ import annotations

import codecs
import struct

from websockets.exceptions import PayloadTooBig
from websockets.exceptions import ProtocolError as WebSocketsProtocolError
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.speedups import apply_mask
from websockets.typing import BytesLike

__all__ = ["FrameReader", "close_frame", "frame_header"]

_OPCODES = {int(opcode): opcode for opcode in Opcode}
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class FrameReader:
    """Parses the frames a WebSocket client sends; feed it bytes, take websockets' frames."""

    def __init__(self, max_size: int | None = 2**20) -> None:
        """Read messages of at most ``max_size`` bytes (None: no limit), as websockets' max_size."""
        self.max_size = max_size
        self.close_rcvd: Close | None = None  # the client's close frame, once received
        self.failure: Close | None = None  # the close to answer a broken rule with (1006: none)
        self._events: list[Frame] = []
        self._buffer = bytearray()  # the start of a frame not yet complete
        self._needed = 0  # how many bytes the buffer must hold before parsing again
        self._message_size: int | None = None  # bytes of a fragmented message so far
        self._text: codecs.IncrementalDecoder | None = None  # while a text message is open
        self._done = False

    @property
    def done(self) -> bool:
        """True once a close frame, a broken rule or the end of the stream ended reading."""
        return self._done

    def events_received(self) -> list[Frame]:
        """Return the frames parsed since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def receive_eof(self) -> None:
        """The client closed its side: without a close frame first, that fails with 1006."""
        if not self._done:
            self._fail(CloseCode.ABNORMAL_CLOSURE, "unexpected end of stream")
        self._buffer = bytearray()

    def receive_data(self, data: BytesLike) -> None:
        """Parse ``data``; then read :meth:`events_received` and check :attr:`failure`."""
        if self._done:
            return
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) >= self._needed:
                self._parse(buffer)
        elif len(data) >= self._needed:
            self._parse(data)
        else:
            buffer += data

    def _parse(self, data: BytesLike) -> None:
        """Take every complete frame from ``data``; keep the incomplete rest in the buffer.

        The hot path of every WebSocket endpoint: no generator, one unmasking copy per frame.
        """
        end, position, needed = len(data), 0, 2
        with memoryview(data) as view:
            while end - position >= 2:
                head1, head2 = view[position], view[position + 1]
                opcode = _OPCODES.get(head1 & 0x0F)
                if opcode is None:
                    self._fail(CloseCode.PROTOCOL_ERROR, "invalid opcode")
                    return
                if not head2 & 0x80:
                    self._fail(CloseCode.PROTOCOL_ERROR, "incorrect masking")
                    return
                length, offset = head2 & 0x7F, position + 2
                if length == 126:
                    if end - offset < 2:
                        needed = 4
                        break
                    (length,) = _LENGTH_16.unpack_from(view, offset)
                    offset += 2
                elif length == 127:
                    if end - offset < 8:
                        needed = 10
                        break
                    (length,) = _LENGTH_64.unpack_from(view, offset)
                    offset += 8
                if self.max_size is not None:
                    allowed = self.max_size - (self._message_size or 0)
                    if length > allowed:
                        self._too_big(length, allowed)
                        return
                frame_end = offset + 4 + length
                if frame_end > end:
                    needed = frame_end - position
                    break
                payload = apply_mask(view[offset + 4 : frame_end], bytes(view[offset : offset + 4]))
                if not self._frame(head1, opcode, payload):
                    return
                position, needed = frame_end, 2
        self._needed = needed
        if data is self._buffer:
            del self._buffer[:position]
        elif position < end:
            self._buffer += data[position:]

    def _frame(self, head1: int, opcode: Opcode, payload: bytes) -> bool:
        """Check one whole frame and add it to the events; False once reading is over."""
        fin = head1 & 0x80 != 0
        if head1 & 0x70:
            return self._fail(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0")
        if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
            if self._message_size is not None:
                return self._fail(CloseCode.PROTOCOL_ERROR, "expected a continuation frame")
            if not fin:
                self._message_size = len(payload)
            if opcode is Opcode.TEXT:
                self._text = _Utf8Decoder()
                if not self._check_text(payload, fin):
                    return False
        elif opcode is Opcode.CONT:
            if self._message_size is None:
                return self._fail(CloseCode.PROTOCOL_ERROR, "unexpected continuation frame")
            self._message_size = None if fin else self._message_size + len(payload)
            if self._text is not None and not self._check_text(payload, fin):
                return False
        else:  # close, ping, pong
            if len(payload) > 125:
                return self._fail(CloseCode.PROTOCOL_ERROR, "control frame too long")
            if not fin:
                return self._fail(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if opcode is Opcode.CLOSE:
                return self._close(payload)
        self._events.append(Frame(opcode, payload, fin))
        return True

    def _check_text(self, payload: bytes, fin: bool) -> bool:
        """Fail with 1007 as soon as a text message cannot be UTF-8; False then."""
        assert self._text is not None
        try:
            self._text.decode(payload, final=fin)
        except UnicodeDecodeError as exc:
            return self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        if fin:
            self._text = None
        return True

    def _close(self, payload: bytes) -> bool:
        """Take the client's close frame: reading ends here, with or without a failure."""
        try:
            self.close_rcvd = Close.parse(payload)
        except UnicodeDecodeError as exc:
            return self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
        except WebSocketsProtocolError as exc:  # too short, or a code no one may send
            return self._fail(CloseCode.PROTOCOL_ERROR, str(exc))
        if self._message_size is not None:
            return self._fail(CloseCode.PROTOCOL_ERROR, "incomplete fragmented message")
        self._events.append(Frame(Opcode.CLOSE, payload))
        self._finish()
        return False

    def _too_big(self, length: int, allowed: int) -> None:
        exc = PayloadTooBig(length, allowed)
        exc.set_current_size(self._message_size)
        self._fail(CloseCode.MESSAGE_TOO_BIG, str(exc))

    def _fail(self, code: int, reason: str) -> bool:
        self.failure = Close(code, reason)
        self._finish()
        return False

    def _finish(self) -> None:
        self._done = True
        self._buffer = bytearray()
        self._needed = 0


def frame_header(opcode: Opcode, size: int) -> bytes:
    """Return the header of a server's final, unmasked frame of ``size`` payload bytes.

    Write it and the payload as they are (``transport.writelines``): no copy of the payload.
    """
    if size < 126:
        return bytes((0x80 | opcode, size))
    if size < 65536:
        return _HEADER_16.pack(0x80 | opcode, 126, size)
    return _HEADER_64.pack(0x80 | opcode, 127, size)


def close_frame(code: int, reason: str) -> bytes:
    """Return a server's whole close frame; ``reason`` is cut to fit, never mid-character."""
    reason = reason.encode()[:123].decode(errors="ignore")
    payload = Close(code, reason).serialize()
    return frame_header(Opcode.CLOSE, len(payload)) + payload
