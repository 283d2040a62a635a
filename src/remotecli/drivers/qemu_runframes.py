"""A headless run in a microVM, host side of the guest relay's ``run`` request: bytes only.

Theory of operation. The host opens the relay (``sandbox/guest_relay.py``, in the guest) with
the VM's secret and sends :func:`run_request`: the line ``SECRET run LENGTH`` and LENGTH bytes
of JSON, ``{"argv": [...], "files": {"PATH": "BASE64"}}``. The relay writes the files into
HOME, starts the command and answers one line, ``ok`` or ``error REASON``
(:func:`parse_answer`). After ``ok`` come frames until the command ended::

    kind (1 byte) | length (4 bytes, big-endian) | payload (length bytes)

``o`` standard output, ``e`` standard error (each at most :data:`FRAME_MAX` bytes), then one
``x``, the exit status in decimal ASCII (0..255); the relay closes after it. :class:`RunFrames`
reads them. The guest is the user's, so every byte is hostile: an unknown kind, a frame longer
than :data:`FRAME_MAX`, an ``x`` that is not a status, anything after ``x``, or an end of the
stream inside a frame or before ``x`` raises :class:`RemoteProtocolError` and the run is over.

Nothing here does I/O: values in, bytes out (``tests/test_qemu_runframes.py``).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from remotecli.exceptions import LocalProtocolError, RemoteProtocolError

FRAME_MAX = 65536
"""The longest payload the relay sends in one frame (its read size)."""
REQUEST_MAX = 8 * 1024 * 1024
"""The longest request the relay takes (``guest_relay.RUN_REQUEST_MAX``; a test keeps them
equal): a kept sign-in is at most 4 MiB, base64 in JSON."""
ANSWER_MAX = 512
"""The longest answer line the host reads (``ok`` or ``error REASON``)."""
STDOUT, STDERR, EXIT = b"o", b"e", b"x"
_HEADER = struct.Struct("!cI")


@dataclass(frozen=True)
class Output:
    """Bytes the command wrote to its standard output."""

    data: bytes


@dataclass(frozen=True)
class Errors:
    """Bytes the command wrote to its standard error."""

    data: bytes


@dataclass(frozen=True)
class Exited:
    """The command ended with ``status`` (128 + N when signal N killed it)."""

    status: int


RunEvent = Output | Errors | Exited


def run_request(secret: str, argv: Sequence[str], files: Mapping[str, bytes]) -> bytes:
    """Return the bytes that ask the relay to run ``argv`` with ``files`` in HOME.

    ``files`` maps normalized paths relative to HOME to their contents (the relay refuses an
    absolute path or ``..``). Raises :class:`LocalProtocolError` when the request would be
    longer than :data:`REQUEST_MAX`.
    """
    body = json.dumps(
        {
            "argv": list(argv),
            "files": {path: base64.b64encode(data).decode() for path, data in files.items()},
        }
    ).encode()
    if len(body) > REQUEST_MAX:
        raise LocalProtocolError(
            f"the run's command and HOME files take {len(body)} bytes, more than the "
            f"{REQUEST_MAX} a microVM takes"
        )
    return f"{secret} run {len(body)}\n".encode("ascii") + body


def parse_answer(line: bytes) -> str | None:
    """Return None for the relay's ``ok``, else its reason for refusing, in words.

    An empty line (the relay closed: no relay, a wrong secret) and anything else that is not
    ``ok`` are refusals too; the reason is cut to printable ASCII.
    """
    words = line.strip()
    if words == b"ok":
        return None
    if words.startswith(b"error "):
        reason = words.removeprefix(b"error ")[:ANSWER_MAX].decode("ascii", "replace")
        return "".join(char if char.isprintable() else "?" for char in reason)
    if not words:
        return "the relay closed the connection without an answer"
    return "the relay gave no answer it may give"


class RunFrames:
    """Reads the frames of one run: feed :meth:`receive_data` and :meth:`receive_eof`, take
    :meth:`events_received`. Raises :class:`RemoteProtocolError` on the first bad byte."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._events: list[RunEvent] = []
        self.status: int | None = None
        """The exit status, once the ``x`` frame was read."""

    def receive_data(self, data: bytes) -> None:
        """Take bytes read from the relay; parse every whole frame in them."""
        if self.status is not None and data:
            raise RemoteProtocolError("the guest sent bytes after the run's exit status")
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            kind, length = _HEADER.unpack_from(self._buffer)
            if kind not in (STDOUT, STDERR, EXIT):
                raise RemoteProtocolError(f"the guest sent a run frame of unknown kind {kind!r}")
            if length > FRAME_MAX:
                raise RemoteProtocolError(
                    f"the guest sent a run frame of {length} bytes, more than {FRAME_MAX}"
                )
            end = _HEADER.size + length
            if len(self._buffer) < end:
                return
            payload = bytes(self._buffer[_HEADER.size : end])
            del self._buffer[:end]
            if kind == STDOUT:
                self._events.append(Output(payload))
            elif kind == STDERR:
                self._events.append(Errors(payload))
            else:
                self.status = _status(payload)
                self._events.append(Exited(self.status))
                if self._buffer:
                    raise RemoteProtocolError("the guest sent bytes after the run's exit status")

    def receive_eof(self) -> None:
        """Take the end of the stream: an error unless it came right after the exit status."""
        if self.status is not None:
            return
        if self._buffer:
            raise RemoteProtocolError("the guest's run stream ended inside a frame")
        raise RemoteProtocolError("the guest's run stream ended before the command's exit status")

    def events_received(self) -> list[RunEvent]:
        """Return the events parsed since the last call, in order."""
        events, self._events = self._events, []
        return events


def _status(payload: bytes) -> int:
    if not (1 <= len(payload) <= 3 and payload.isdigit()) or int(payload) > 255:
        raise RemoteProtocolError(f"the guest sent an exit status that is none: {payload[:8]!r}")
    return int(payload)
