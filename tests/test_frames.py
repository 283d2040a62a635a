"""Tests for the frame reader: the same bytes to it and to websockets' ServerProtocol, same verdict.

The reference is websockets' sans-I/O ``ServerProtocol`` in the OPEN state: its frames from
``events_received``, the close it sends when the client breaks a rule (``close_sent`` after a
parser error), 1006 at an unexpected end of stream. The one rule websockets checks above its
sans-I/O layer, UTF-8 in text messages, is checked against Python's UTF-8 codec, which
websockets uses for it.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from remotecli.frames import FrameReader, close_frame, frame_header

MASK = b"\x37\xfa\x21\x3d"
MAX = 1000  # a small max_size keeps the oversize cases quick


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length_bits: int | None = None,
) -> bytes:
    """Return a client frame as raw bytes, any rule broken on demand.

    ``length_bits`` (7, 16 or 64) forces a length encoding; websockets accepts a longer one
    than needed, and so must the reader.
    """
    size = len(payload)
    bits = length_bits or (7 if size < 126 else 16 if size < 65536 else 64)
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    second = 0x80 if masked else 0
    if bits == 7:
        head += bytes([second | size])
    elif bits == 16:
        head += bytes([second | 126]) + struct.pack("!H", size)
    else:
        head += bytes([second | 127]) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """Return a close frame's payload: code and reason bytes, as they are."""
    return struct.pack("!H", code) + reason


@dataclass
class Outcome:
    """What a parser made of the bytes so far."""

    frames: list[Frame]
    failure: Close | None
    close_rcvd: Close | None


class Reference:
    """websockets' ServerProtocol in the OPEN state, read as an Outcome."""

    def __init__(self, max_size: int | None) -> None:
        self.ws = ServerProtocol(state=State.OPEN, max_size=max_size)
        self.frames: list[Frame] = []

    def feed(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self.frames += [e for e in self.ws.events_received() if isinstance(e, Frame)]

    def eof(self) -> None:
        self.ws.receive_eof()

    def outcome(self) -> Outcome:
        exc = self.ws.parser_exc
        failure: Close | None = None
        if isinstance(exc, EOFError):  # 1006 is never sent: its reason is only for logs
            failure = Close(CloseCode.ABNORMAL_CLOSURE, "unexpected end of stream")
        elif exc is not None:
            failure = self.ws.close_sent
        return Outcome(self.frames, failure, self.ws.close_rcvd)


class Subject:
    """The FrameReader, read as an Outcome."""

    def __init__(self, max_size: int | None) -> None:
        self.reader = FrameReader(max_size)
        self.frames: list[Frame] = []

    def feed(self, data: bytes) -> None:
        self.reader.receive_data(data)
        self.frames += self.reader.events_received()

    def eof(self) -> None:
        self.reader.receive_eof()

    def outcome(self) -> Outcome:
        return Outcome(self.frames, self.reader.failure, self.reader.close_rcvd)


def assert_agree(chunks: Iterable[bytes], max_size: int | None = MAX, eof: bool = False) -> Outcome:
    """Feed ``chunks`` to both parsers, compare after every chunk; return the final outcome."""
    reference, subject = Reference(max_size), Subject(max_size)
    for chunk in chunks:
        reference.feed(chunk)
        subject.feed(chunk)
        assert subject.outcome() == reference.outcome()
    if eof:
        reference.eof()
        subject.eof()
        assert subject.outcome() == reference.outcome()
    return subject.outcome()


def splits(data: bytes) -> Iterable[list[bytes]]:
    """Yield ``data`` cut in two at every byte boundary."""
    for cut in range(len(data) + 1):
        yield [data[:cut], data[cut:]]


SEQUENCE = b"".join(
    [
        frame(Opcode.BINARY, b"RFB 003.008\n"),
        frame(Opcode.PING, b"ping"),
        frame(Opcode.BINARY, b"x" * 130),  # 16-bit length
        frame(Opcode.BINARY, b"frag-", fin=False),
        frame(Opcode.PONG, b""),
        frame(Opcode.CONT, b"ment", fin=False, length_bits=64),
        frame(Opcode.CONT, b"ed", length_bits=16),
        frame(Opcode.TEXT, "héllo ✓".encode()),
        frame(Opcode.CLOSE, close_payload(1000, b"bye")),
    ]
)


def test_frames_of_every_size_class_agree() -> None:
    """Frames at the edges of the 7-, 16- and 64-bit length encodings parse alike."""
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 70000]
    chunks = [
        frame(Opcode.BINARY, bytes(range(256)) * (n // 256) + b"\x00" * (n % 256)) for n in sizes
    ]
    chunks += [frame(Opcode.PING, b"p" * 125), frame(Opcode.PONG, b"q"), frame(Opcode.TEXT, b"t")]
    outcome = assert_agree(chunks, max_size=None)
    assert [len(f.data) for f in outcome.frames[: len(sizes)]] == sizes
    assert outcome.failure is None


def test_split_at_every_byte_boundary() -> None:
    """A sequence of frames cut in two anywhere gives the same frames as websockets'."""
    for chunks in splits(SEQUENCE):
        outcome = assert_agree(chunks)
    assert outcome.close_rcvd == Close(1000, "bye")
    assert len(outcome.frames) == 9


def test_one_byte_at_a_time() -> None:
    """Fed a byte at a time, the reader agrees with websockets after every byte."""
    outcome = assert_agree(SEQUENCE[i : i + 1] for i in range(len(SEQUENCE)))
    assert [f.opcode for f in outcome.frames][-1] is Opcode.CLOSE


def test_all_at_once_and_data_after_close_is_discarded() -> None:
    """Everything in one chunk parses alike, and bytes after the close frame yield nothing."""
    outcome = assert_agree([SEQUENCE + frame(Opcode.BINARY, b"late") + b"\x82"])
    assert outcome.frames[-1].opcode is Opcode.CLOSE


def test_fragmented_message_with_control_frames_between_fragments() -> None:
    """Pings and pongs may come between the fragments of a message; the fragments stay in order."""
    chunks = [
        frame(Opcode.BINARY, b"a", fin=False),
        frame(Opcode.PING, b"1"),
        frame(Opcode.CONT, b"b", fin=False),
        frame(Opcode.PONG, b"2"),
        frame(Opcode.CONT, b"c"),
        frame(Opcode.BINARY, b"whole"),
    ]
    outcome = assert_agree(chunks)
    assert [f.data for f in outcome.frames] == [b"a", b"1", b"b", b"2", b"c", b"whole"]


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([frame(Opcode.BINARY, b"x" * (MAX + 1))], id="one-frame"),
        pytest.param([frame(Opcode.BINARY, b"x" * (MAX + 1))[:8]], id="header-only"),
        pytest.param(
            [frame(Opcode.BINARY, b"x" * 600, fin=False), frame(Opcode.CONT, b"y" * 401)],
            id="fragments",
        ),
        pytest.param(
            [frame(Opcode.TEXT, b"x" * 990, fin=False), frame(Opcode.PING, b"p" * 11)],
            id="ping-between-fragments",
        ),
        pytest.param([b"\x82\xff" + struct.pack("!Q", 2**63 - 1)], id="huge-length"),
    ],
)
def test_oversized_message_fails_1009(chunks: list[bytes]) -> None:
    """A message over max_size, in one frame or across fragments, fails with 1009 and its size."""
    outcome = assert_agree(chunks)
    assert outcome.failure is not None
    assert outcome.failure.code == CloseCode.MESSAGE_TOO_BIG
    assert "exceeds limit of 1000 bytes" in outcome.failure.reason


def test_message_of_exactly_max_size_passes() -> None:
    """A message of exactly max_size bytes, whole or fragmented, is accepted."""
    chunks = [frame(Opcode.BINARY, b"x" * MAX)]
    chunks += [frame(Opcode.BINARY, b"x" * 999, fin=False), frame(Opcode.CONT, b"y")]
    assert assert_agree(chunks).failure is None


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([frame(Opcode.BINARY, b"x", masked=False)], id="unmasked"),
        pytest.param([frame(Opcode.BINARY, b"x", rsv=4)], id="rsv1"),
        pytest.param([frame(Opcode.BINARY, b"x", rsv=2)], id="rsv2"),
        pytest.param([frame(Opcode.TEXT, b"x", rsv=1)], id="rsv3"),
        *[pytest.param([frame(op, b"x")], id=f"opcode-{op}") for op in (3, 7, 0xB, 0xF)],
        pytest.param([frame(Opcode.PING, b"p" * 126)], id="long-ping"),
        pytest.param([frame(Opcode.CLOSE, close_payload(1000, b"r" * 124))], id="long-close"),
        pytest.param([frame(Opcode.PONG, b"", fin=False)], id="fragmented-pong"),
        pytest.param([frame(Opcode.CONT, b"x")], id="continuation-without-start"),
        pytest.param(
            [frame(Opcode.BINARY, b"a", fin=False), frame(Opcode.BINARY, b"b")],
            id="new-message-inside-a-message",
        ),
        pytest.param(
            [frame(Opcode.TEXT, b"a", fin=False), frame(Opcode.CLOSE, close_payload(1000))],
            id="close-inside-a-message",
        ),
        pytest.param([frame(Opcode.CLOSE, b"\x03")], id="close-too-short"),
        *[
            pytest.param([frame(Opcode.CLOSE, close_payload(code))], id=f"close-code-{code}")
            for code in (0, 999, 1004, 1005, 1006, 1015, 2999, 5000)
        ],
        pytest.param([frame(Opcode.BINARY, b"ok"), b"\x83\x80"], id="after-a-good-frame"),
    ],
)
def test_broken_rules_fail_1002(chunks: list[bytes]) -> None:
    """Unmasked, reserved bits, unknown opcode, bad control or continuation frame: all 1002."""
    outcome = assert_agree(chunks)
    assert outcome.failure is not None
    assert outcome.failure.code == CloseCode.PROTOCOL_ERROR


def test_broken_rule_stops_reading() -> None:
    """After a failure the reader yields nothing more, even for well-formed frames."""
    chunks = [frame(Opcode.BINARY, b"x", rsv=4), frame(Opcode.BINARY, b"after")]
    outcome = assert_agree(chunks)
    assert outcome.frames == []


def test_close_codes_that_may_be_sent_are_accepted() -> None:
    """Close frames with a code one may send (1000-1003, 1007-1014, 3000-4999) or none: alike."""
    for code in (1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999):
        outcome = assert_agree([frame(Opcode.CLOSE, close_payload(code, "ök".encode()))])
        assert outcome.close_rcvd == Close(code, "ök")
        assert outcome.failure is None
    empty = assert_agree([frame(Opcode.CLOSE)])
    assert empty.close_rcvd == Close(CloseCode.NO_STATUS_RCVD, "")


def test_close_reason_that_is_not_utf8_fails_1007() -> None:
    """A close frame whose reason is not UTF-8 fails with 1007, as websockets fails it."""
    outcome = assert_agree([frame(Opcode.CLOSE, close_payload(1000, b"\xff\xfe"))])
    assert outcome.failure is not None
    assert outcome.failure.code == CloseCode.INVALID_DATA


def test_end_of_stream_without_close_fails_1006() -> None:
    """The stream ending mid-frame or between frames, without a close frame, is 1006."""
    for chunks in ([], [frame(Opcode.BINARY, b"abc")[:4]], [frame(Opcode.BINARY, b"abc")]):
        outcome = assert_agree(chunks, eof=True)
        assert outcome.failure == Close(CloseCode.ABNORMAL_CLOSURE, "unexpected end of stream")


def test_end_of_stream_after_close_is_clean() -> None:
    """The stream ending after the client's close frame is no failure."""
    outcome = assert_agree([frame(Opcode.CLOSE, close_payload(1001))], eof=True)
    assert outcome.failure is None
    assert outcome.close_rcvd == Close(1001, "")


# --- UTF-8 in text messages: checked against Python's codec, as websockets' I/O layer does ---


def utf8_verdict(fragments: Sequence[bytes]) -> bool:
    """Whether a text message made of ``fragments`` is valid UTF-8 (Python's strict codec)."""
    try:
        b"".join(fragments).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize(
    "fragments",
    [
        pytest.param([b"plain"], id="ascii"),
        pytest.param(["é✓😀".encode()], id="multibyte"),
        pytest.param(["é✓😀".encode()[:3], "é✓😀".encode()[3:]], id="split-inside-a-character"),
        pytest.param([b"", b"\xf0\x9f", b"\x98", b"\x80"], id="one-byte-per-fragment"),
        pytest.param([b"\xff"], id="invalid-byte"),
        pytest.param([b"ok", b"\xc3"], id="truncated-at-the-end"),
        pytest.param([b"\xed\xa0\x80"], id="surrogate"),
        pytest.param([b"\xc0\xaf"], id="overlong"),
        pytest.param([b"a\xe2\x82", b"(b"], id="bad-continuation-in-next-fragment"),
    ],
)
def test_text_messages_must_be_utf8(fragments: list[bytes]) -> None:
    """A text message is accepted exactly when Python's UTF-8 codec accepts it; otherwise 1007."""
    chunks = [
        frame(Opcode.TEXT if i == 0 else Opcode.CONT, data, fin=i == len(fragments) - 1)
        for i, data in enumerate(fragments)
    ]
    reader = FrameReader(MAX)
    for chunk in chunks:
        reader.receive_data(chunk)
    received = reader.events_received()
    if utf8_verdict(fragments):
        assert reader.failure is None
        assert [f.data for f in received] == fragments
    else:
        assert reader.failure is not None
        assert reader.failure.code == CloseCode.INVALID_DATA
        assert received[-1:] != [Frame(Opcode.CONT, fragments[-1], True)]


def test_invalid_utf8_fails_on_the_first_frame_that_shows_it() -> None:
    """A text message fails as soon as a fragment cannot start valid UTF-8, not at its end."""
    reader = FrameReader(MAX)
    reader.receive_data(frame(Opcode.TEXT, b"\xff", fin=False))
    assert reader.failure is not None
    assert reader.failure.reason == "invalid start byte at position 0"
    assert reader.events_received() == []


# --- random sequences ---


def random_frame(rng: random.Random, state: dict[str, bool]) -> bytes:
    """One random client frame, well-formed most of the time."""
    roll = rng.random()
    size = rng.choice([0, 1, 5, 125, 126, 127, 300, 999, 1000, 1001])
    payload = rng.randbytes(size)
    if roll < 0.01:  # a broken rule, now and then
        return rng.choice(
            [
                frame(Opcode.BINARY, payload, masked=False),
                frame(Opcode.BINARY, payload, rsv=rng.randint(1, 7)),
                frame(rng.choice([3, 4, 5, 6, 7, 11, 12, 13, 14, 15]), payload),
                frame(Opcode.PING, payload, fin=False),
                frame(Opcode.CLOSE, close_payload(rng.choice([1000, 1005, 999, 3000]))),
            ]
        )
    if roll < 0.2:
        return frame(
            rng.choice([Opcode.PING, Opcode.PONG]),
            payload[: rng.choice([0, 4, 125]) if rng.random() > 0.02 else 126],
        )
    in_message = state["in_message"]
    fin = rng.random() < 0.6
    state["in_message"] = not fin
    if in_message and rng.random() < 0.99:
        return frame(Opcode.CONT, payload, fin=fin, length_bits=rng.choice([None, 16, 64]))
    return frame(Opcode.BINARY, payload, fin=fin, length_bits=rng.choice([None, 16, 64]))


def random_chunks(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random places, into pieces of 0 to about 1,500 bytes."""
    chunks, position = [], 0
    while position < len(data):
        step = rng.choice([0, 1, 2, 3, 7, 14, 100, 1500])
        chunks.append(data[position : position + step])
        position += step
    return chunks


@pytest.mark.parametrize("seed", range(50))
def test_random_frame_sequences_agree(seed: int) -> None:
    """Random binary, control and broken frames, cut at random places, parse as websockets does."""
    rng = random.Random(seed)
    state = {"in_message": False}
    data = b"".join(random_frame(rng, state) for _ in range(rng.randint(1, 60)))
    max_size = rng.choice([5_000, 50_000, None])
    assert_agree(random_chunks(rng, data), max_size=max_size, eof=rng.random() < 0.5)


# --- what a server writes ---


def read_as_client(data: bytes) -> list[Frame]:
    """Parse a server's bytes with websockets' ClientProtocol; fail on any error."""
    client = ClientProtocol(parse_uri("ws://localhost/"), state=State.OPEN, max_size=None)
    client.receive_data(data)
    assert client.parser_exc is None
    return [e for e in client.events_received() if isinstance(e, Frame)]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_frame_header_is_what_websockets_clients_read(size: int) -> None:
    """A server frame written as frame_header() + payload reads back whole in websockets' client."""
    payload = bytes(size)
    assert read_as_client(frame_header(Opcode.BINARY, size) + payload) == [
        Frame(Opcode.BINARY, payload)
    ]


def test_close_frame_cuts_a_long_reason_at_a_character() -> None:
    """close_frame() cuts a long non-ASCII reason to fit 125 bytes, between two characters."""
    frames = read_as_client(close_frame(1011, "ü" * 100))
    assert len(frames[0].data) <= 125
    assert Close.parse(frames[0].data) == Close(1011, "ü" * 61)
