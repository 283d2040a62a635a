"""Tests for the sans-I/O RFB pieces, by feeding bytes and asserting on bytes."""

from __future__ import annotations

import struct

import pytest
from Crypto.Cipher import DES

from remotecli.exceptions import RemoteProtocolError, VncUnavailable
from remotecli.rfb import (
    KEYSYM_RETURN,
    Bell,
    ClientState,
    FramebufferUpdate,
    NoAuthServerHandshake,
    RfbClient,
    ServerCutText,
    ServerInit,
    framebuffer_update_request,
    key_event,
    keysym_for_char,
    parse_protocol_version,
    pointer_event,
    set_encodings,
    type_text,
    vnc_auth_response,
)

PIXEL_FORMAT_32 = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


def server_init(width: int = 4, height: int = 2, name: bytes = b"test") -> bytes:
    return struct.pack(">HH", width, height) + PIXEL_FORMAT_32 + struct.pack(">I", len(name)) + name


def handshake_none(client: RfbClient) -> None:
    client.receive_data(b"RFB 003.008\n")
    assert client.data_to_send() == b"RFB 003.008\n"
    client.receive_data(bytes([1, 1]))
    assert client.data_to_send() == b"\x01"
    client.receive_data(struct.pack(">I", 0))
    assert client.data_to_send() == b"\x01"  # ClientInit, shared


def test_parse_protocol_version_accepts_rfb_banners() -> None:
    """A ProtocolVersion banner parses to its major and minor numbers."""
    assert parse_protocol_version(b"RFB 003.008\n") == (3, 8)
    assert parse_protocol_version(b"RFB 003.889\n") == (3, 889)


def test_parse_protocol_version_rejects_other_servers() -> None:
    """Bytes that are not an RFB banner raise a RemoteProtocolError naming what came."""
    with pytest.raises(RemoteProtocolError, match="not a VNC server"):
        parse_protocol_version(b"HTTP/1.1 200")


def test_vnc_auth_response_uses_bit_reversed_key() -> None:
    """The DES key is the password with each byte's bits reversed, zero-padded to 8 bytes."""
    challenge = bytes(range(16))
    # "A" is 0x41 = 01000001, reversed 10000010 = 0x82.
    expected = DES.new(b"\x82" + b"\0" * 7, DES.MODE_ECB).encrypt(challenge)  # noqa: S304
    assert vnc_auth_response("A", challenge) == expected
    assert vnc_auth_response("123456789", challenge) == vnc_auth_response("12345678", challenge)


def test_client_message_encodings() -> None:
    """Client messages are encoded as RFC 6143 lays them out."""
    assert framebuffer_update_request(1, 2, 3, 4, incremental=True) == bytes(
        [3, 1, 0, 1, 0, 2, 0, 3, 0, 4]
    )
    assert key_event(KEYSYM_RETURN, down=True) == bytes([4, 1, 0, 0, 0, 0, 0xFF, 0x0D])
    assert pointer_event(5, 6, buttons=1) == bytes([5, 1, 0, 5, 0, 6])
    assert set_encodings([0, -223]) == bytes([2, 0, 0, 2]) + struct.pack(">ii", 0, -223)


def test_type_text_presses_and_releases_each_keysym() -> None:
    """Typing text sends a press and a release per character, newline as Return."""
    events = type_text("a\n")
    assert events == (
        key_event(ord("a"), down=True)
        + key_event(ord("a"), down=False)
        + key_event(KEYSYM_RETURN, down=True)
        + key_event(KEYSYM_RETURN, down=False)
    )
    with pytest.raises(ValueError, match="no keysym"):
        keysym_for_char("\x00")


def test_client_handshake_security_none_then_server_init() -> None:
    """With security None the client sends ClientInit and parses ServerInit, byte by byte."""
    client = RfbClient()
    handshake_none(client)
    for byte in server_init(name=b"session"):
        client.receive_data(bytes([byte]))
    [init] = client.events_received()
    assert isinstance(init, ServerInit)
    assert (init.width, init.height, init.name) == (4, 2, "session")
    assert init.pixel_format.bits_per_pixel == 32
    assert client.state is ClientState.MESSAGES
    assert client.data_to_send() == set_encodings([0])


def test_client_answers_vnc_authentication() -> None:
    """With a password the client picks VNC Authentication and answers the DES challenge."""
    client = RfbClient(password="secret", client_init=False)
    client.receive_data(b"RFB 003.008\n")
    client.receive_data(bytes([2, 1, 2]))
    assert client.data_to_send() == b"RFB 003.008\n\x02"
    challenge = bytes(range(16, 32))
    client.receive_data(challenge)
    assert client.data_to_send() == vnc_auth_response("secret", challenge)
    client.receive_data(struct.pack(">I", 0) + b"\x99")
    assert client.state is ClientState.AUTHENTICATED
    assert client.take_unparsed() == b"\x99"


def test_client_reports_refused_password_with_reason() -> None:
    """A failed SecurityResult raises VncUnavailable carrying the server's reason."""
    client = RfbClient(password="wrong")
    client.receive_data(b"RFB 003.008\n" + bytes([1, 2]) + bytes(16))
    reason = b"password check failed"
    with pytest.raises(VncUnavailable, match="password check failed"):
        client.receive_data(struct.pack(">II", 1, len(reason)) + reason)


def test_client_without_password_refuses_vnc_auth_only_server() -> None:
    """A server that offers only VNC Authentication is refused when no password is set."""
    client = RfbClient()
    client.receive_data(b"RFB 003.008\n")
    with pytest.raises(VncUnavailable, match="requires a password"):
        client.receive_data(bytes([1, 2]))


def test_client_speaks_rfb_3_3() -> None:
    """Against a 3.3 server the client answers 3.3 and reads the server-chosen security type."""
    client = RfbClient()
    client.receive_data(b"RFB 003.003\n" + struct.pack(">I", 1))
    assert client.data_to_send() == b"RFB 003.003\n\x01"
    assert client.state is ClientState.SERVER_INIT


def test_client_parses_raw_framebuffer_update_and_other_messages() -> None:
    """A Raw FramebufferUpdate yields its pixels; Bell and ServerCutText yield events."""
    client = RfbClient()
    handshake_none(client)
    client.receive_data(server_init(width=2, height=1))
    client.events_received()
    pixels = b"\x00\x00\xff\x00\xff\xff\xff\x00"
    update = struct.pack(">BxH", 0, 1) + struct.pack(">HHHHi", 0, 0, 2, 1, 0) + pixels
    cut = struct.pack(">B3xI", 3, 2) + b"hi"
    stream = update + b"\x02" + cut
    client.receive_data(stream[:7])
    assert client.events_received() == []
    client.receive_data(stream[7:])
    fbu, bell, text = client.events_received()
    assert isinstance(fbu, FramebufferUpdate)
    assert fbu.rectangles[0].pixels == pixels
    assert isinstance(bell, Bell)
    assert text == ServerCutText(b"hi")


def test_client_refuses_messages_before_handshake() -> None:
    """Queuing a client message before the handshake is a protocol error."""
    with pytest.raises(RemoteProtocolError, match="finish the handshake"):
        RfbClient().send(key_event(65, down=True))


def test_no_auth_server_handshake_with_rfb_3_8_viewer() -> None:
    """The bridge's viewer side offers None, confirms it, and hands over ClientInit onward."""
    server = NoAuthServerHandshake()
    assert server.data_to_send() == b"RFB 003.008\n"
    server.receive_data(b"RFB 003.008\n")
    assert server.data_to_send() == bytes([1, 1])
    server.receive_data(b"\x01")
    assert server.data_to_send() == struct.pack(">I", 0)
    assert not server.done
    server.receive_data(b"\x01" + b"\x03more")
    assert server.done
    assert server.take_unparsed() == b"\x01\x03more"


def test_no_auth_server_handshake_with_rfb_3_3_viewer() -> None:
    """A 3.3 viewer is told security type None directly and gets no SecurityResult."""
    server = NoAuthServerHandshake()
    server.data_to_send()
    server.receive_data(b"RFB 003.003\n\x00")
    assert server.data_to_send() == struct.pack(">I", 1)
    assert server.done
    assert server.take_unparsed() == b"\x00"


def test_no_auth_server_handshake_refuses_other_security_types() -> None:
    """A viewer choosing a type that was not offered is a protocol error."""
    server = NoAuthServerHandshake()
    server.receive_data(b"RFB 003.008\n")
    with pytest.raises(RemoteProtocolError, match="only None"):
        server.receive_data(b"\x02")
