"""Route parsing and longest-prefix routing, with no server."""

from __future__ import annotations

import pytest

from remotecli.config import Route
from remotecli.exceptions import ConfigError
from remotecli.routing import Router, UpstreamAddress, parse_route, parse_upstream


def test_parse_route_http_and_unix() -> None:
    """PREFIX=UPSTREAM parses for http://host:port and unix:/path upstreams."""
    assert parse_route("/api/=http://127.0.0.1:4000") == Route("/api/", "http://127.0.0.1:4000")
    assert parse_route("/=unix:/run/c.sock") == Route("/", "unix:/run/c.sock")


def test_parse_upstream_addresses() -> None:
    """Upstreams parse to host and port (80 by default), IPv6, or a socket path."""
    assert parse_upstream("http://h:81") == UpstreamAddress(host="h", port=81)
    assert parse_upstream("http://h") == UpstreamAddress(host="h", port=80)
    assert parse_upstream("http://[::1]:82/").label == "[::1]:82"
    assert parse_upstream("unix:/s.sock").label == "unix:/s.sock"


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        ("/api", "has no '='"),
        ("api/=http://h:1", "must start with '/'"),
        ("/=https://h:1", "uses https"),
        ("/=ftp://h:1", "is not understood"),
        ("/=http://h:1/base", "has a path or query"),
        ("/=http://h:99999", "is not a valid URL"),
        ("/=http://u:p@h:1", "carries credentials"),
        ("/=unix:relative.sock", "absolute socket path"),
        ("/=127.0.0.1:4000", "is not understood"),
    ],
)
def test_bad_routes_raise_config_error_naming_the_fix(text: str, cause: str) -> None:
    """Each malformed route raises ConfigError saying what is wrong."""
    with pytest.raises(ConfigError, match=cause):
        parse_route(text)


def test_longest_prefix_wins_regardless_of_order() -> None:
    """The longest matching prefix wins, whatever order the routes were given in."""
    router = Router(
        [
            Route("/", "http://root:1"),
            Route("/api/", "http://api:1"),
            Route("/api/auth/", "http://auth:1"),
        ]
    )
    assert router.match("/api/auth/session/1/novnc/websock") == Route("/api/auth/", "http://auth:1")
    assert router.match("/api/sessions") == Route("/api/", "http://api:1")
    assert router.match("/dashboard") == Route("/", "http://root:1")


def test_no_match_is_none() -> None:
    """A path no prefix matches gives None (the gateway answers 404)."""
    assert Router([Route("/api/", "http://api:1")]).match("/other") is None


def test_duplicate_prefix_is_config_error() -> None:
    """The same prefix twice is refused rather than silently picking one."""
    with pytest.raises(ConfigError, match="given twice"):
        Router([Route("/a/", "http://x:1"), Route("/a/", "http://y:1")])
