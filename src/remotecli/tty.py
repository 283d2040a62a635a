"""The text terminal's protocol, controller side: records for the session's tty server.

Theory of operation. A session's text terminal is served inside its sandbox on a Unix stream
socket (the driver names it: ``Driver.tty_endpoint``; on another host the session's channel
relays it, verb ``tty``). The controller writes records to it::

    type (1 byte) | length (4 bytes, big-endian) | payload (length bytes)

- type 0, input: the bytes typed or pasted, at most :data:`MAX_INPUT` per record; longer input
  is split over several records, in order;
- type 1, resize: ``cols`` then ``rows``, each an unsigned 16-bit big-endian integer in
  1..:data:`MAX_SIZE` (the payload is 4 bytes).

What the server writes back is the terminal's raw output, without framing: the bridge relays it
as it comes. A viewer asks for a resize with a JSON text message, ``{"type": "resize", "cols":
C, "rows": R}``; :func:`parse_control` checks it and refuses anything else with a
:class:`~remotecli.exceptions.BadRequest` (close code 1008) whose message names what is wrong.

Nothing here does I/O: values in, bytes out (``tests/test_tty.py``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from websockets.typing import BytesLike

from remotecli.exceptions import BadRequest

__all__ = [
    "INPUT",
    "MAX_CONTROL",
    "MAX_INPUT",
    "MAX_SIZE",
    "RESIZE",
    "Resize",
    "input_records",
    "parse_control",
    "resize_record",
]

INPUT = 0
RESIZE = 1
MAX_INPUT = 65536  # payload bytes of one input record
MAX_SIZE = 1000  # the most columns or rows a resize may ask for
MAX_CONTROL = 4096  # bytes of one JSON control message from a viewer

_HEADER = struct.Struct("!BI")
_RESIZE = struct.Struct("!BIHH")
_CONTROL_KEYS = frozenset({"type", "cols", "rows"})


@dataclass(frozen=True)
class Resize:
    """A viewer's request to resize the terminal to ``cols`` x ``rows`` (each 1..1000)."""

    cols: int
    rows: int

    def record(self) -> bytes:
        """Return the type-1 record that asks the tty server for this size."""
        return resize_record(self.cols, self.rows)


def input_records(data: BytesLike) -> list[bytes]:
    """Return the type-0 records carrying ``data``, split every :data:`MAX_INPUT` bytes.

    Empty input gives no record. Write the records in order (``transport.writelines``).
    """
    size = len(data)
    if size <= MAX_INPUT:
        return [_HEADER.pack(INPUT, size) + data] if size else []
    with memoryview(data) as view:
        return [
            _HEADER.pack(INPUT, len(chunk)) + chunk
            for chunk in (view[start : start + MAX_INPUT] for start in range(0, size, MAX_INPUT))
        ]


def resize_record(cols: int, rows: int) -> bytes:
    """Return the type-1 record for ``cols`` x ``rows``; BadRequest outside 1..1000."""
    return _RESIZE.pack(RESIZE, 4, _size("cols", cols), _size("rows", rows))


def parse_control(message: str) -> Resize:
    """Return the resize a viewer's JSON text message asks for; BadRequest for anything else.

    The message must be a JSON object with exactly the keys ``type`` (``"resize"``), ``cols``
    and ``rows`` (integers, 1..1000). The error's message says what was wrong (close 1008).
    """
    if len(message.encode()) > MAX_CONTROL:
        raise BadRequest(f"control message over {MAX_CONTROL} bytes; send only resize messages")
    try:
        value = json.loads(message)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        if isinstance(exc, json.JSONDecodeError):
            why = f"{exc.msg} at {exc.pos}"
        else:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:60]
        raise BadRequest(
            f"control message is not JSON ({why}); send keystrokes as binary messages and "
            '{"type": "resize", "cols": C, "rows": R} as text'
        ) from exc
    if not isinstance(value, dict):
        raise BadRequest(
            f"control message is a JSON {type(value).__name__}, not an object; "
            'send {"type": "resize", "cols": C, "rows": R}'
        )
    kind = value.get("type")
    if kind != "resize":
        raise BadRequest(
            f"unknown control message type {str(kind)[:40]!r}; the only one is 'resize'"
        )
    extra = sorted(str(key)[:20] for key in value.keys() - _CONTROL_KEYS)
    if extra:
        raise BadRequest(
            f"resize message has unknown keys {', '.join(extra)[:60]}; send type, cols, rows"
        )
    return Resize(_size("cols", value.get("cols")), _size("rows", value.get("rows")))


def _size(name: str, value: object) -> int:
    """Return ``value`` if it is an integer in 1..MAX_SIZE (not a bool); BadRequest otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
        shown = str(value) if isinstance(value, int) else json.dumps(value)
        raise BadRequest(f"resize {name} must be an integer from 1 to {MAX_SIZE}, not {shown[:20]}")
    return value
