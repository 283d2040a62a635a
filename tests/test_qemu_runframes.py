"""The host's reader of a headless run's frames, fed bytes a hostile guest could send."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from remotecli.drivers.qemu_runframes import (
    FRAME_MAX,
    REQUEST_MAX,
    Errors,
    Exited,
    Output,
    RunFrames,
    parse_answer,
    run_request,
)
from remotecli.exceptions import LocalProtocolError, RemoteProtocolError
from remotecli.sandbox import guest_relay

SECRET = "ab" * 32


def frame(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload)) + payload


def test_frames_split_at_every_byte_give_output_errors_and_the_status_in_order() -> None:
    """However the stream is cut, the events come out whole and in order."""
    stream = frame(b"o", b"one\n") + frame(b"e", b"warn") + frame(b"o", b"") + frame(b"x", b"0")
    frames = RunFrames()
    events = []
    for index in range(len(stream)):
        frames.receive_data(stream[index : index + 1])
        events += frames.events_received()
    frames.receive_eof()
    assert events == [Output(b"one\n"), Errors(b"warn"), Output(b""), Exited(0)]
    assert frames.status == 0


def test_the_relays_frames_are_what_the_host_reads() -> None:
    """The relay's own frame writer and the host's reader agree, up to a full-size frame."""
    frames = RunFrames()
    frames.receive_data(guest_relay.frame(b"o", b"x" * FRAME_MAX) + guest_relay.frame(b"x", b"143"))
    assert frames.events_received() == [Output(b"x" * FRAME_MAX), Exited(143)]


def test_the_host_and_the_guest_agree_on_the_limits() -> None:
    """The host takes the frames the relay may send and sends requests the relay takes."""
    assert FRAME_MAX == guest_relay.CHUNK
    assert REQUEST_MAX == guest_relay.RUN_REQUEST_MAX


@pytest.mark.parametrize("kind", [b"O", b"\0", b"q", b"\xff"])
def test_a_frame_of_an_unknown_kind_ends_the_run(kind: bytes) -> None:
    """Only ``o``, ``e`` and ``x`` are frames; anything else is refused at its header."""
    with pytest.raises(RemoteProtocolError, match="unknown kind"):
        RunFrames().receive_data(frame(kind, b"hi"))


def test_a_frame_longer_than_the_cap_is_refused_from_its_header() -> None:
    """A length past FRAME_MAX is refused before any of its payload is waited for."""
    with pytest.raises(RemoteProtocolError, match="more than"):
        RunFrames().receive_data(b"o" + struct.pack("!I", FRAME_MAX + 1))
    with pytest.raises(RemoteProtocolError):
        RunFrames().receive_data(b"e\xff\xff\xff\xff")


@pytest.mark.parametrize("payload", [b"", b"256", b"-1", b"1234", b"ab", b" 1", b"\xd9\xa3"])
def test_an_exit_frame_that_holds_no_status_is_refused(payload: bytes) -> None:
    """The status is 1 to 3 ASCII digits, 0..255."""
    with pytest.raises(RemoteProtocolError, match="exit status"):
        RunFrames().receive_data(frame(b"x", payload))


@pytest.mark.parametrize(
    "stream",
    [
        b"",  # nothing at all
        frame(b"o", b"partial"),  # output, then the end without a status
        frame(b"o", b"partial")[:-2],  # the end inside a payload
        b"o\0\0",  # the end inside a header
    ],
)
def test_a_stream_that_ends_before_the_status_is_refused(stream: bytes) -> None:
    """A connection that closes inside a frame or before ``x`` is an error, never a status."""
    frames = RunFrames()
    frames.receive_data(stream)
    with pytest.raises(RemoteProtocolError, match="ended"):
        frames.receive_eof()
    assert frames.status is None


def test_bytes_after_the_status_are_refused() -> None:
    """Nothing may follow ``x``, in the same read or a later one."""
    with pytest.raises(RemoteProtocolError, match="after"):
        RunFrames().receive_data(frame(b"x", b"0") + frame(b"o", b"late"))
    frames = RunFrames()
    frames.receive_data(frame(b"x", b"0"))
    with pytest.raises(RemoteProtocolError, match="after"):
        frames.receive_data(b"o")


def test_the_request_carries_the_argv_and_the_files_in_base64() -> None:
    """One line with the secret and the body's length, then the JSON body."""
    data = run_request(SECRET, ["claude", "-p", "hi"], {".claude/.credentials.json": b"\0{}"})
    line, body = data.split(b"\n", 1)
    assert line == f"{SECRET} run {len(body)}".encode()
    assert json.loads(body) == {
        "argv": ["claude", "-p", "hi"],
        "files": {".claude/.credentials.json": base64.b64encode(b"\0{}").decode()},
    }
    assert guest_relay.parse_run_request(body) == (
        ["claude", "-p", "hi"],
        {".claude/.credentials.json": b"\0{}"},
    )


def test_a_request_past_the_relays_limit_is_not_sent() -> None:
    """Files too large for the relay raise LocalProtocolError on the host."""
    with pytest.raises(LocalProtocolError, match="more than"):
        run_request(SECRET, ["true"], {".big": bytes(REQUEST_MAX)})


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"ok\n", None),
        (b"error cannot start 'nope': No such file or directory\n", "cannot start 'nope': No"),
        (b"error \x1b[31mred\n", "?[31mred"),
        (b"", "closed the connection"),
        (b"okay\n", "no answer it may give"),
    ],
)
def test_the_relays_answer_is_ok_or_a_printable_reason(line: bytes, reason: str | None) -> None:
    """``ok`` is None; anything else is a refusal whose reason has no control characters."""
    answer = parse_answer(line)
    if reason is None:
        assert answer is None
    else:
        assert answer is not None
        assert reason in answer


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"argv": ["true"]}',
        b'{"argv": [], "files": {}}',
        b'{"argv": [""], "files": {}}',
        b'{"argv": ["true", 1], "files": {}}',
        b'{"argv": ["tr\\u0000ue"], "files": {}}',
        b'{"argv": ["true"], "files": [], "extra": 1}',
        b'{"argv": ["true"], "files": {".a": "!!"}}',
        b'{"argv": ["true"], "files": {".a": 1}}',
        b'{"argv": ["true"], "files": {"../x": ""}}',
        b'{"argv": ["true"], "files": {"/etc/x": ""}}',
        b'{"argv": ["true"], "files": {"a/../../x": ""}}',
        b'{"argv": ["true"], "files": {"a//b": ""}}',
        b'{"argv": ["true"], "files": {"./a": ""}}',
        b'{"argv": ["true"], "files": {"a/": ""}}',
        b'{"argv": ["true"], "files": {"": ""}}',
        b'{"argv": ["true"], "files": {"a\\u0000b": ""}}',
    ],
)
def test_the_relay_refuses_a_request_that_is_not_plain(body: bytes) -> None:
    """Anything but a non-empty argv of strings and files at plain paths below HOME (no
    absolute path, no ``..``, ``.`` or empty name), in base64, is refused before any write."""
    with pytest.raises(guest_relay.Refused):
        guest_relay.parse_run_request(body)
