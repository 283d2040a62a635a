"""The API client's own parts: reading ``text/event-stream`` and turning error answers into
remote-cli's errors. The client against a real controller is in tests/test_runs_api.py."""

from __future__ import annotations

import httpx
import pytest

from remotecli.client import EventStreamParser, StreamEvent, _raise_for
from remotecli.exceptions import NotFound, ServiceUnavailable, TooManyRequests


def feed(parser: EventStreamParser, text: str) -> list[StreamEvent]:
    events = [parser.feed_line(line) for line in text.split("\n")]
    return [e for e in events if e is not None]


def test_events_are_read_with_their_ids_names_and_json() -> None:
    """Each blank line ends an event: its id, name and JSON data, comments skipped."""
    parser = EventStreamParser()
    stream = (
        ": keepalive\n\n"
        'id: 1\nevent: text\ndata: {"text":"hel"}\n\n'
        'id: 2\nevent: text\ndata: {"text":"lo"}\n\n'
        'id: 3\nevent: done\ndata: {"exit_code":0,"duration_s":1.5}\n\n'
    )
    events = feed(parser, stream)
    assert [(e.id, e.type) for e in events] == [(1, "text"), (2, "text"), (3, "done")]
    assert events[0].data == {"text": "hel"}
    assert events[-1].final
    assert parser.last_id == 3


def test_the_standard_s_corners_are_kept() -> None:
    """Several data lines join with newlines, a field without a space after the colon counts,
    an event without data is not dispatched, and unknown fields are skipped."""
    parser = EventStreamParser()
    events = feed(parser, 'event:text\nretry: 100\ndata:{"a":\ndata: 1}\n\nevent: x\n\n')
    assert events == [StreamEvent(0, "text", {"a": 1})]


def test_data_that_is_not_a_json_object_is_kept_not_raised() -> None:
    """A data line that is not JSON, or JSON but not an object, is handed over as it is."""
    parser = EventStreamParser()
    events = feed(parser, "data: not json\n\ndata: [1, 2]\n\n")
    assert [e.data for e in events] == [{"raw": "not json"}, {"value": [1, 2]}]


@pytest.mark.parametrize(
    ("status", "headers", "error"),
    [
        (404, {}, NotFound),
        (429, {"Retry-After": "17"}, TooManyRequests),
        (503, {}, ServiceUnavailable),
    ],
)
def test_error_answers_raise_the_error_of_their_status(
    status: int, headers: dict[str, str], error: type[Exception]
) -> None:
    """An error answer raises remote-cli's error of its status with the API's message, and
    a Retry-After in its data."""
    body = {"error": "x", "message": "what went wrong, and what to do"}
    response = httpx.Response(status, json=body, headers=headers)
    with pytest.raises(error) as raised:
        _raise_for(response)
    assert raised.value.args[0] == "what went wrong, and what to do"
    if "Retry-After" in headers:
        assert getattr(raised.value, "data", {})["retry_after"] == 17
