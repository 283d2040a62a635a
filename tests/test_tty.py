"""Tests for the tty protocol's controller side: values in, record bytes out, no I/O."""

from __future__ import annotations

import json

import pytest

from remotecli.exceptions import BadRequest, close_for
from remotecli.sandbox.tty_server import RecordParser
from remotecli.tty import (
    MAX_CONTROL,
    MAX_INPUT,
    Resize,
    input_records,
    parse_control,
    resize_record,
)


def test_input_is_one_type_0_record() -> None:
    """Input bytes become type 0, a 4-byte big-endian length, then the bytes as they are."""
    assert input_records(b"ls -l\r") == [b"\x00\x00\x00\x00\x06ls -l\r"]
    assert input_records("é".encode()) == [b"\x00\x00\x00\x00\x02\xc3\xa9"]


def test_empty_input_gives_no_record() -> None:
    """An empty binary message sends nothing to the terminal."""
    assert input_records(b"") == []


def test_input_of_exactly_the_limit_is_one_record() -> None:
    """64 KiB of input fits one record."""
    records = input_records(b"a" * MAX_INPUT)
    assert records == [b"\x00\x00\x01\x00\x00" + b"a" * MAX_INPUT]


def test_longer_input_is_split_in_order() -> None:
    """Input over 64 KiB is split into records of at most 64 KiB, in order, nothing lost."""
    data = bytes(range(256)) * 600  # 153,600 bytes
    records = input_records(memoryview(data))
    assert [len(r) - 5 for r in records] == [65536, 65536, 22528]
    assert [r[:5] for r in records] == [
        b"\x00\x00\x01\x00\x00",
        b"\x00\x00\x01\x00\x00",
        b"\x00\x00\x00\x58\x00",
    ]
    assert b"".join(r[5:] for r in records) == data


def test_resize_is_a_type_1_record() -> None:
    """A resize is type 1, length 4, then cols and rows as unsigned 16-bit big-endian."""
    assert resize_record(80, 24) == b"\x01\x00\x00\x00\x04\x00\x50\x00\x18"
    assert resize_record(1000, 1) == b"\x01\x00\x00\x00\x04\x03\xe8\x00\x01"
    assert Resize(132, 43).record() == resize_record(132, 43)


@pytest.mark.parametrize(("cols", "rows"), [(0, 24), (80, 0), (1001, 24), (80, 65536), (-1, 5)])
def test_resize_out_of_range_is_refused(cols: int, rows: int) -> None:
    """Sizes outside 1..1000 are never encoded."""
    with pytest.raises(BadRequest, match="from 1 to 1000"):
        resize_record(cols, rows)


def test_parse_control_reads_a_resize() -> None:
    """The one control message, a resize, gives its size."""
    assert parse_control('{"type": "resize", "cols": 120, "rows": 40}') == Resize(120, 40)
    assert parse_control('{"rows": 1, "cols": 1000, "type": "resize"}') == Resize(1000, 1)


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ("resize 80 24", "not JSON"),
        ("", "not JSON"),
        ("[" * 3000, "not JSON"),
        ('["resize", 80, 24]', "not an object"),
        ('"resize"', "not an object"),
        ('{"type": "paste", "data": "x"}', "unknown control message type"),
        ('{"cols": 80, "rows": 24}', "unknown control message type"),
        ('{"type": "resize", "cols": 80, "rows": 24, "x": 1}', "unknown keys x"),
        ('{"type": "resize", "cols": 80}', "rows must be an integer"),
        ('{"type": "resize", "cols": "80", "rows": 24}', "cols must be an integer"),
        ('{"type": "resize", "cols": 80.0, "rows": 24}', "cols must be an integer"),
        ('{"type": "resize", "cols": true, "rows": 24}', "cols must be an integer"),
        ('{"type": "resize", "cols": 80, "rows": 1001}', "rows must be an integer"),
        ('{"type": "resize", "cols": 0, "rows": 24}', "not 0"),
        ('{"type": "resize", "cols": null, "rows": 24}', "not null"),
    ],
)
def test_parse_control_refuses_anything_else_with_1008(message: str, says: str) -> None:
    """Anything but a well-formed resize is a BadRequest, which closes 1008 with the reason."""
    with pytest.raises(BadRequest, match=says) as caught:
        parse_control(message)
    code, reason = close_for(caught.value)
    assert code == 1008
    assert says in reason
    assert len(reason.encode()) <= 123


def test_parse_control_refuses_oversized_messages() -> None:
    """A control message over 4 KiB is refused before it is parsed."""
    message = json.dumps({"type": "resize", "cols": 80, "rows": 24, "pad": "x" * MAX_CONTROL})
    with pytest.raises(BadRequest, match="over 4096 bytes"):
        parse_control(message)


def test_the_sandbox_server_reads_what_the_controller_writes() -> None:
    """The session's tty server parses these records back into the same input and sizes."""
    paste = bytes(range(256)) * 300  # 76,800 bytes: two records
    stream = b"".join([*input_records(b"ls\r"), resize_record(132, 43), *input_records(paste)])
    parser = RecordParser()
    records = []
    for start in range(0, len(stream), 7):  # fed in odd slices, as a socket might read them
        records += parser.receive_data(stream[start : start + 7])
    assert records[0] == (0, b"ls\r")
    assert records[1] == (1, (132, 43))
    assert [kind for kind, _ in records[2:]] == [0, 0]
    assert b"".join(p for _, p in records[2:] if isinstance(p, bytes)) == paste
