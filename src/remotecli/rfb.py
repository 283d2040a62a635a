"""The parts of RFB (the VNC protocol, RFC 6143) that remote-cli speaks, without any I/O.

Theory of operation: an RFB connection opens with a handshake (ProtocolVersion, security
negotiation, then ClientInit and ServerInit) and then carries typed messages both ways. The
objects here take the bytes received from the peer and produce the bytes to send, as
websockets' ``Protocol`` does: feed :meth:`RfbClient.receive_data`, then write
:meth:`RfbClient.data_to_send` and read :meth:`RfbClient.events_received`. Nothing here
imports ``asyncio`` or ``socket``; the callers do the I/O:

- a driver reads the 12-byte banner and checks it with :func:`parse_protocol_version`
  (a session is ready once a VNC server said "RFB 003.00x");
- the tests drive :class:`RfbClient` through the whole handshake, request framebuffer updates
  and type keys;
- the VNC bridge uses :class:`RfbClient` with ``client_init=False`` to answer a server's VNC
  Authentication for the viewer, and :class:`NoAuthServerHandshake` to offer that viewer
  security type None, before it relays raw bytes.

Only what remote-cli needs is implemented: versions 3.3, 3.7 and 3.8, security types None (1)
and VNC Authentication (2), and the Raw encoding (0).
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from Crypto.Cipher import DES

from remotecli.exceptions import RemoteProtocolError, VncUnavailable

PROTOCOL_VERSION_3_8 = b"RFB 003.008\n"
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
ENCODING_RAW = 0
KEYSYM_RETURN = 0xFF0D
KEYSYM_BACKSPACE = 0xFF08
KEYSYM_TAB = 0xFF09
KEYSYM_ESCAPE = 0xFF1B

_VERSION_RE = re.compile(rb"RFB (\d{3})\.(\d{3})\n")
_SERVER_INIT = struct.Struct(">HHBBBBHHHBBB3xI")
_RECT_HEADER = struct.Struct(">HHHHi")


def parse_protocol_version(banner: bytes) -> tuple[int, int]:
    """Return (major, minor) from a 12-byte ProtocolVersion; raise if it is not RFB.

    Versions 3.4 to 3.6 (and anything unknown above 3.3) count as 3.3, as RFC 6143 says.
    """
    match = _VERSION_RE.fullmatch(banner)
    if match is None:
        raise RemoteProtocolError(
            f"expected an RFB ProtocolVersion such as 'RFB 003.008', got {banner[:12]!r}; "
            "the endpoint is not a VNC server",
            banner=banner[:12],
        )
    return int(match.group(1)), int(match.group(2))


def negotiated_minor(server_minor: int) -> int:
    """Return the RFB 3.x minor version to use with a peer that announced ``server_minor``."""
    if server_minor >= 8:
        return 8
    if server_minor == 7:
        return 7
    return 3


def protocol_version(minor: int) -> bytes:
    """Return the ProtocolVersion message for RFB 3.``minor``."""
    return b"RFB 003.%03d\n" % minor


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """Return the 16-byte answer to a VNC Authentication challenge.

    The key is the password's first 8 bytes (zero-padded) with each byte's bits reversed,
    the historical quirk of VNC's DES.
    """
    if len(challenge) != 16:
        raise RemoteProtocolError(
            f"VNC Authentication challenge must be 16 bytes, got {len(challenge)}"
        )
    raw = password.encode("latin-1", errors="replace")[:8].ljust(8, b"\0")
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in raw)
    cipher = DES.new(key, DES.MODE_ECB)  # noqa: S304 -- RFB security type 2 is defined on DES
    result: bytes = cipher.encrypt(challenge)
    return result


def framebuffer_update_request(
    x: int, y: int, width: int, height: int, *, incremental: bool = False
) -> bytes:
    """Return a FramebufferUpdateRequest message (client to server, type 3)."""
    return struct.pack(">BBHHHH", 3, int(incremental), x, y, width, height)


def key_event(keysym: int, *, down: bool) -> bytes:
    """Return a KeyEvent message (client to server, type 4)."""
    return struct.pack(">BBxxI", 4, int(down), keysym)


def pointer_event(x: int, y: int, buttons: int = 0) -> bytes:
    """Return a PointerEvent message (client to server, type 5); ``buttons`` is the mask."""
    return struct.pack(">BBHH", 5, buttons, x, y)


def set_encodings(encodings: Iterable[int]) -> bytes:
    """Return a SetEncodings message (client to server, type 2)."""
    values = list(encodings)
    return struct.pack(f">BxH{len(values)}i", 2, len(values), *values)


def keysym_for_char(char: str) -> int:
    """Return the X keysym that types ``char`` (printable Latin-1, newline, tab, escape)."""
    special = {"\n": KEYSYM_RETURN, "\r": KEYSYM_RETURN, "\t": KEYSYM_TAB, "\x1b": KEYSYM_ESCAPE}
    if char in special:
        return special[char]
    code = ord(char)
    if 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFF:
        return code  # Latin-1 keysyms equal their code points
    raise ValueError(f"no keysym for {char!r}; type printable Latin-1 characters or newline")


def type_text(text: str) -> bytes:
    """Return the key press and release events that type ``text``."""
    events = bytearray()
    for char in text:
        keysym = keysym_for_char(char)
        events += key_event(keysym, down=True)
        events += key_event(keysym, down=False)
    return bytes(events)


@dataclass(frozen=True)
class PixelFormat:
    """How the server encodes one pixel (RFC 6143 section 7.4)."""

    bits_per_pixel: int
    depth: int
    big_endian: bool
    true_colour: bool
    red_max: int
    green_max: int
    blue_max: int
    red_shift: int
    green_shift: int
    blue_shift: int


@dataclass(frozen=True)
class ServerInit:
    """The server's framebuffer size, pixel format and desktop name."""

    width: int
    height: int
    pixel_format: PixelFormat
    name: str


@dataclass(frozen=True)
class Rectangle:
    """One rectangle of a FramebufferUpdate; ``pixels`` is Raw-encoded, row by row."""

    x: int
    y: int
    width: int
    height: int
    encoding: int
    pixels: bytes


@dataclass(frozen=True)
class FramebufferUpdate:
    """A FramebufferUpdate message with its rectangles."""

    rectangles: tuple[Rectangle, ...]


@dataclass(frozen=True)
class Bell:
    """The server rang the bell."""


@dataclass(frozen=True)
class ServerCutText:
    """The server's clipboard changed."""

    text: bytes


@dataclass(frozen=True)
class SetColourMapEntries:
    """The server changed colour map entries (only for non-true-colour formats)."""

    first_colour: int
    colours: tuple[tuple[int, int, int], ...]


ServerEvent = ServerInit | FramebufferUpdate | Bell | ServerCutText | SetColourMapEntries


class ClientState(enum.Enum):
    """Where an :class:`RfbClient` is in the connection."""

    VERSION = "version"
    SECURITY_TYPES = "security_types"
    SECURITY_TYPE_3_3 = "security_type_3_3"
    CHALLENGE = "challenge"
    SECURITY_RESULT = "security_result"
    FAILURE_REASON = "failure_reason"
    AUTHENTICATED = "authenticated"  # waiting for the caller to send ClientInit
    SERVER_INIT = "server_init"
    MESSAGES = "messages"


class RfbClient:
    """The client side of an RFB connection, sans I/O.

    With ``client_init=True`` (the default) it sends ClientInit after security, parses
    ServerInit and then server messages; with ``client_init=False`` it stops in
    :attr:`ClientState.AUTHENTICATED` so a bridge can relay a viewer's ClientInit instead.
    Raises :class:`RemoteProtocolError` on malformed input and :class:`VncUnavailable` when
    the server refuses the connection or the password.
    """

    def __init__(
        self, *, password: str | None = None, shared: bool = True, client_init: bool = True
    ) -> None:
        self.password = password
        self.shared = shared
        self.client_init = client_init
        self.state = ClientState.VERSION
        self.minor = 8
        self.security_type: int | None = None
        self.server_init: ServerInit | None = None
        self._buffer = bytearray()
        self._writes = bytearray()
        self._events: list[ServerEvent] = []

    def receive_data(self, data: bytes) -> None:
        """Take bytes received from the server and parse as much as is complete."""
        self._buffer += data
        while self._step():
            pass

    def data_to_send(self) -> bytes:
        """Return the bytes the caller must write to the server now."""
        writes, self._writes = bytes(self._writes), bytearray()
        return writes

    def events_received(self) -> list[ServerEvent]:
        """Return the ServerInit and server messages parsed since the last call."""
        events, self._events = self._events, []
        return events

    def take_unparsed(self) -> bytes:
        """Return and drop the bytes received but not parsed (after AUTHENTICATED: relay them)."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return rest

    def send(self, message: bytes) -> None:
        """Queue a client message built with this module's functions (after the handshake)."""
        if self.state is not ClientState.MESSAGES:
            raise RemoteProtocolError(
                f"cannot send RFB messages in state {self.state.value}; finish the handshake first"
            )
        self._writes += message

    def _take(self, size: int) -> bytes | None:
        if len(self._buffer) < size:
            return None
        chunk = bytes(self._buffer[:size])
        del self._buffer[:size]
        return chunk

    def _step(self) -> bool:
        """Parse one unit in the current state; return False when more bytes are needed."""
        handler = _CLIENT_STEPS.get(self.state)
        return handler(self) if handler is not None else False

    def _step_version(self) -> bool:
        banner = self._take(12)
        if banner is None:
            return False
        _, minor = parse_protocol_version(banner)
        self.minor = negotiated_minor(minor)
        self._writes += protocol_version(self.minor)
        if self.minor == 3:
            self.state = ClientState.SECURITY_TYPE_3_3
        else:
            self.state = ClientState.SECURITY_TYPES
        return True

    def _step_security_types(self) -> bool:
        if not self._buffer:
            return False
        count = self._buffer[0]
        if count == 0:
            self.state = ClientState.FAILURE_REASON
            del self._buffer[:1]
            return True
        types = self._take(1 + count)
        if types is None:
            return False
        offered = list(types[1:])
        self.security_type = self._choose(offered)
        self._writes += bytes([self.security_type])
        self._after_security_choice()
        return True

    def _step_security_type_3_3(self) -> bool:
        raw = self._take(4)
        if raw is None:
            return False
        (chosen,) = struct.unpack(">I", raw)
        if chosen == 0:
            self.state = ClientState.FAILURE_REASON
            return True
        self.security_type = self._choose([chosen])
        self._after_security_choice()
        return True

    def _choose(self, offered: list[int]) -> int:
        if self.password is not None and SECURITY_VNC_AUTH in offered:
            return SECURITY_VNC_AUTH
        if SECURITY_NONE in offered:
            return SECURITY_NONE
        if SECURITY_VNC_AUTH in offered:
            raise VncUnavailable(
                "the VNC server requires a password and none is configured for this session"
            )
        raise VncUnavailable(
            f"the VNC server offers security types {offered}; only None (1) and "
            "VNC Authentication (2) are supported",
            offered=offered,
        )

    def _after_security_choice(self) -> None:
        if self.security_type == SECURITY_VNC_AUTH:
            self.state = ClientState.CHALLENGE
        elif self.minor == 8:
            self.state = ClientState.SECURITY_RESULT
        else:
            self._authenticated()

    def _step_challenge(self) -> bool:
        challenge = self._take(16)
        if challenge is None:
            return False
        assert self.password is not None
        self._writes += vnc_auth_response(self.password, challenge)
        self.state = ClientState.SECURITY_RESULT
        return True

    def _step_security_result(self) -> bool:
        raw = self._take(4)
        if raw is None:
            return False
        (result,) = struct.unpack(">I", raw)
        if result == 0:
            self._authenticated()
            return True
        if self.minor == 8:
            self.state = ClientState.FAILURE_REASON
            return True
        raise VncUnavailable("the VNC server refused the session's password")

    def _step_failure_reason(self) -> bool:
        if len(self._buffer) < 4:
            return False
        (length,) = struct.unpack(">I", self._buffer[:4])
        raw = self._take(4 + length)
        if raw is None:
            return False
        reason = raw[4:].decode("utf-8", errors="replace")
        raise VncUnavailable(f"the VNC server refused the connection: {reason}", reason=reason)

    def _authenticated(self) -> None:
        if self.client_init:
            self._writes += bytes([int(self.shared)])
            self.state = ClientState.SERVER_INIT
        else:
            self.state = ClientState.AUTHENTICATED

    def _step_server_init(self) -> bool:
        if len(self._buffer) < _SERVER_INIT.size:
            return False
        fields = _SERVER_INIT.unpack_from(self._buffer)
        name_length = fields[-1]
        raw = self._take(_SERVER_INIT.size + name_length)
        if raw is None:
            return False
        width, height, bpp, depth, big_endian, true_colour, *rest = fields[:-1]
        pixel_format = PixelFormat(bpp, depth, bool(big_endian), bool(true_colour), *rest)
        name = raw[_SERVER_INIT.size :].decode("utf-8", errors="replace")
        self.server_init = ServerInit(width, height, pixel_format, name)
        self._events.append(self.server_init)
        self._writes += set_encodings([ENCODING_RAW])
        self.state = ClientState.MESSAGES
        return True

    def _step_message(self) -> bool:
        if not self._buffer:
            return False
        kind = self._buffer[0]
        parser = _MESSAGE_PARSERS.get(kind)
        if parser is None:
            raise RemoteProtocolError(
                f"unknown RFB server message type {kind}; this client handles types 0-3"
            )
        return parser(self)

    def _parse_framebuffer_update(self) -> bool:
        assert self.server_init is not None
        if len(self._buffer) < 4:
            return False
        (count,) = struct.unpack_from(">H", self._buffer, 2)
        bytes_per_pixel = self.server_init.pixel_format.bits_per_pixel // 8
        offset = 4
        spans: list[tuple[int, int, int, int, int, int]] = []
        for _ in range(count):
            if len(self._buffer) < offset + _RECT_HEADER.size:
                return False
            x, y, width, height, encoding = _RECT_HEADER.unpack_from(self._buffer, offset)
            if encoding != ENCODING_RAW:
                raise RemoteProtocolError(
                    f"the VNC server sent encoding {encoding} though only Raw (0) was asked for"
                )
            offset += _RECT_HEADER.size
            size = width * height * bytes_per_pixel
            spans.append((x, y, width, height, offset, size))
            offset += size
        if len(self._buffer) < offset:
            return False
        data = memoryview(self._take(offset) or b"")
        rectangles = tuple(
            Rectangle(x, y, w, h, ENCODING_RAW, bytes(data[start : start + size]))
            for x, y, w, h, start, size in spans
        )
        self._events.append(FramebufferUpdate(rectangles))
        return True

    def _parse_colour_map(self) -> bool:
        if len(self._buffer) < 6:
            return False
        first, count = struct.unpack_from(">HH", self._buffer, 2)
        raw = self._take(6 + 6 * count)
        if raw is None:
            return False
        colours = tuple(struct.iter_unpack(">HHH", raw[6:]))
        self._events.append(SetColourMapEntries(first, colours))
        return True

    def _parse_bell(self) -> bool:
        self._take(1)
        self._events.append(Bell())
        return True

    def _parse_cut_text(self) -> bool:
        if len(self._buffer) < 8:
            return False
        (length,) = struct.unpack_from(">I", self._buffer, 4)
        raw = self._take(8 + length)
        if raw is None:
            return False
        self._events.append(ServerCutText(raw[8:]))
        return True


_CLIENT_STEPS = {
    ClientState.VERSION: RfbClient._step_version,
    ClientState.SECURITY_TYPES: RfbClient._step_security_types,
    ClientState.SECURITY_TYPE_3_3: RfbClient._step_security_type_3_3,
    ClientState.CHALLENGE: RfbClient._step_challenge,
    ClientState.SECURITY_RESULT: RfbClient._step_security_result,
    ClientState.FAILURE_REASON: RfbClient._step_failure_reason,
    ClientState.SERVER_INIT: RfbClient._step_server_init,
    ClientState.MESSAGES: RfbClient._step_message,
}
_MESSAGE_PARSERS = {
    0: RfbClient._parse_framebuffer_update,
    1: RfbClient._parse_colour_map,
    2: RfbClient._parse_bell,
    3: RfbClient._parse_cut_text,
}


class NoAuthServerHandshake:
    """The server side of an RFB handshake that offers the viewer security type None.

    The bridge runs it towards the viewer once it has authenticated to the real server itself.
    It ends when the viewer's ClientInit arrives: :attr:`done` turns true and
    :meth:`take_unparsed` returns the ClientInit and anything after it, which the caller
    relays to the server before switching to raw relay.
    """

    def __init__(self) -> None:
        self.minor: int | None = None
        self.done = False
        self._buffer = bytearray()
        self._writes = bytearray(PROTOCOL_VERSION_3_8)
        self._chose = False

    def receive_data(self, data: bytes) -> None:
        """Take bytes received from the viewer."""
        self._buffer += data
        if self.minor is None:
            if len(self._buffer) < 12:
                return
            _, minor = parse_protocol_version(bytes(self._buffer[:12]))
            del self._buffer[:12]
            self.minor = negotiated_minor(minor)
            if self.minor == 3:
                self._writes += struct.pack(">I", SECURITY_NONE)
                self._chose = True
            else:
                self._writes += bytes([1, SECURITY_NONE])
        if not self._chose:
            if not self._buffer:
                return
            chosen = self._buffer[0]
            del self._buffer[:1]
            if chosen != SECURITY_NONE:
                raise RemoteProtocolError(
                    f"the viewer chose security type {chosen}; only None (1) was offered"
                )
            self._chose = True
            if self.minor == 8:
                self._writes += struct.pack(">I", 0)
        if self._buffer:
            self.done = True

    def data_to_send(self) -> bytes:
        """Return the bytes the caller must write to the viewer now."""
        writes, self._writes = bytes(self._writes), bytearray()
        return writes

    def take_unparsed(self) -> bytes:
        """Return and drop the viewer's bytes from ClientInit on (relay them to the server)."""
        rest, self._buffer = bytes(self._buffer), bytearray()
        return rest
