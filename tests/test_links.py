"""Sign-in links and loopback callbacks (remotecli.links): fed bytes and strings, no I/O."""

from __future__ import annotations

import pytest

from remotecli.exceptions import BadRequest, UpstreamBadResponse, UpstreamClosed
from remotecli.links import (
    LINK_BURST,
    LINK_INTERVAL,
    MAX_LINK,
    CallbackTarget,
    LinkReader,
    callback_answer,
    callback_request,
    callback_target,
    check_link,
)

URL = "https://auth.example.test/oauth/authorize?client_id=abc&redirect_uri=http%3A%2F%2Flocalhost%3A1455"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_link_split_across_reads_comes_out_whole() -> None:
    """A link written in pieces is returned once its newline arrives, exactly as written."""
    reader = LinkReader(Clock())
    assert reader.receive_data(URL[:10].encode()) == []
    assert reader.receive_data(URL[10:].encode() + b"\nhttp://local") == [URL]
    assert reader.receive_data(b"host:8080/x\n") == ["http://localhost:8080/x"]


@pytest.mark.parametrize(
    "line",
    [
        b"file:///etc/shadow",
        b"javascript:alert(1)",
        b"data:text/html,<script>",
        b"https://",
        b"https://example.test/with space",
        b"https://example.test/\x1b[31m",
        "https://ex\u00e4mple.test/".encode(),
        b"\xff\xfe",
        b"https://example.test:99999/",
        b"",
    ],
)
def test_only_http_and_https_links_of_printable_ascii_pass(line: bytes) -> None:
    """Anything but an absolute http(s) URL of printable ASCII is dropped and counted."""
    reader = LinkReader(Clock())
    assert reader.receive_data(line + b"\n") == []
    assert reader.dropped == 1


def test_an_overlong_line_is_dropped_whole_and_the_next_one_passes() -> None:
    """A line over MAX_LINK bytes is discarded up to its newline; the reader then recovers."""
    reader = LinkReader(Clock())
    assert reader.receive_data(b"https://example.test/" + b"a" * MAX_LINK) == []
    assert reader.receive_data(b"b" * 100_000) == []
    assert reader.receive_data(b"tail\n" + URL.encode() + b"\n") == [URL]


def test_links_are_rate_limited_after_a_burst() -> None:
    """After LINK_BURST links only one per LINK_INTERVAL passes; the rest are dropped."""
    clock = Clock()
    reader = LinkReader(clock)
    flood = (URL + "\n").encode() * (LINK_BURST + 10)
    assert len(reader.receive_data(flood)) == LINK_BURST
    assert reader.dropped == 10
    clock.now += LINK_INTERVAL
    assert reader.receive_data((URL + "\n").encode() * 3) == [URL]


def test_check_link_keeps_a_valid_link_unchanged() -> None:
    """A valid link is returned as it is (the user opens exactly what the CLI asked for)."""
    assert check_link(URL) == URL
    assert check_link("http://127.0.0.1:1455/") == "http://127.0.0.1:1455/"


@pytest.mark.parametrize(
    ("url", "address", "port", "target"),
    [
        (
            "http://localhost:1455/auth/callback?code=a&state=b",
            "127.0.0.1",
            1455,
            "/auth/callback?code=a&state=b",
        ),
        (
            "http://127.0.0.1:8085/oauth2callback?code=x",
            "127.0.0.1",
            8085,
            "/oauth2callback?code=x",
        ),
        ("http://[::1]:54545/callback", "::1", 54545, "/callback"),
        ("  http://LOCALHOST:9/  ", "127.0.0.1", 9, "/"),
        ("localhost:1455/auth/callback?code=a", "127.0.0.1", 1455, "/auth/callback?code=a"),
    ],
)
def test_loopback_callbacks_are_accepted(url: str, address: str, port: int, target: str) -> None:
    """localhost, 127.0.0.1 and [::1] http addresses with a port become a loopback target."""
    parsed = callback_target(url)
    assert (parsed.address, parsed.port, parsed.target) == (address, port, target)


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:1455/callback",  # the CLI's own server speaks http
        "http://10.0.0.1:80/",
        "http://192.0.2.1:1455/",
        "http://localhost.evil.test:1455/",
        "http://127.0.0.2:1455/",
        "http://[::ffff:127.0.0.1]:1455/",
        "http://user:pw@localhost:1455/",
        "http://localhost/",  # no port: port 80 of the host is never meant
        "http://localhost:0/",
        "http://localhost:99999/",
        "file:///etc/passwd",
        "http://localhost:1455/\nHost: evil",
        "",
    ],
)
def test_other_callback_addresses_are_refused(url: str) -> None:
    """Anything but http on the session's loopback with a port is a 400, never relayed."""
    with pytest.raises(BadRequest):
        callback_target(url)


def test_the_relayed_request_is_one_get_with_the_browser_host() -> None:
    """The relay sends one GET for the path and query, Host as pasted, then closes."""
    target = CallbackTarget("127.0.0.1", 1455, "localhost:1455", "/cb?code=1")
    request = callback_request(target)
    assert request.startswith(b"GET /cb?code=1 HTTP/1.1\r\nHost: localhost:1455\r\n")
    assert request.endswith(b"Connection: close\r\n\r\n")


def test_the_answer_gives_status_and_body_chunked_or_not() -> None:
    """The CLI's status and body come back as text, chunked framing undone."""
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nSigned in"
    assert callback_answer(plain) == (200, "Signed in")
    head = b"HTTP/1.1 302 Found\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = head + b"4\r\nSign\r\n5\r\ned in\r\n0\r\n\r\n"
    assert callback_answer(chunked) == (302, "Signed in")


def test_no_answer_or_a_non_http_answer_is_a_502() -> None:
    """A closed connection and bytes that are not HTTP/1.x are upstream errors (502)."""
    with pytest.raises(UpstreamClosed):
        callback_answer(b"")
    with pytest.raises(UpstreamBadResponse):
        callback_answer(b"SSH-2.0-OpenSSH\r\n")
