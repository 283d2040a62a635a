"""Tokens, tickets, login rate limiting and the Origin rule, with an injected clock."""

from __future__ import annotations

import pytest

from remotecli.auth import (
    COOKIE_NAME,
    LoginRateLimiter,
    TicketBook,
    bearer_token,
    check_origin,
    cookie_token,
    hash_token,
    new_token,
    normalize_origin,
    tokens_match,
)
from remotecli.exceptions import Forbidden, TooManyRequests


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tokens_are_random_and_hashed() -> None:
    """Two tokens differ, carry at least 256 bits, and are stored as a SHA-256 hex digest."""
    first, second = new_token(), new_token()
    assert first != second
    assert len(first) >= 43
    assert len(hash_token(first)) == 64
    assert hash_token(first) != first
    assert hash_token(first) == hash_token(first)


def test_tokens_match_compares_exactly() -> None:
    """The constant-time comparison accepts only the identical secret."""
    assert tokens_match("abc", "abc")
    assert not tokens_match("abc", "abd")
    assert not tokens_match("abc", "abcd")


def test_bearer_and_cookie_parsing() -> None:
    """The token is read from `Authorization: Bearer` and from the login cookie, nothing else."""
    assert bearer_token("Bearer xyz") == "xyz"
    assert bearer_token("bearer  xyz ") == "xyz"
    assert bearer_token("Basic xyz") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None
    assert cookie_token(f"a=1; {COOKIE_NAME}=tok; b=2") == "tok"
    assert cookie_token("a=1") is None
    assert cookie_token(None) is None


def test_ticket_redeems_once() -> None:
    """A ticket opens its session once; the second use is refused."""
    book = TicketBook(clock=FakeClock())
    ticket, ttl = book.issue("s1", "alice")
    assert ttl == 60.0
    granted = book.redeem(ticket, "s1")
    assert (granted.session_id, granted.user) == ("s1", "alice")
    with pytest.raises(Forbidden, match="already used"):
        book.redeem(ticket, "s1")


def test_ticket_expires_after_60_seconds() -> None:
    """A ticket is valid just before 60 s and refused at 60 s."""
    clock = FakeClock()
    book = TicketBook(clock=clock)
    early, _ = book.issue("s1", "alice")
    late, _ = book.issue("s1", "alice")
    clock.now += 59.9
    assert book.redeem(early, "s1").user == "alice"
    clock.now += 0.1
    with pytest.raises(Forbidden, match="expired"):
        book.redeem(late, "s1")


def test_ticket_bound_to_its_session() -> None:
    """A ticket for one session does not open another, and is spent by the attempt."""
    book = TicketBook(clock=FakeClock())
    ticket, _ = book.issue("s1", "alice")
    with pytest.raises(Forbidden, match="another session"):
        book.redeem(ticket, "s2")
    with pytest.raises(Forbidden, match="already used"):
        book.redeem(ticket, "s1")


def test_expired_tickets_are_pruned() -> None:
    """Issuing forgets expired tickets, so memory does not grow with unused ones."""
    clock = FakeClock()
    book = TicketBook(clock=clock)
    for _ in range(5):
        book.issue("s1", "alice")
    clock.now += 61
    book.issue("s1", "alice")
    assert len(book) == 1


def test_login_rate_limit_per_address_and_window() -> None:
    """After 3 failures an address gets 429 with a retry time; others are unaffected; it heals."""
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=3, window=60, clock=clock)
    for _ in range(3):
        limiter.check("10.0.0.1")
        limiter.failed("10.0.0.1")
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("10.0.0.1")
    assert caught.value.status == 429
    assert caught.value.data["retry_after"] == 60
    limiter.check("10.0.0.2")
    clock.now += 60
    limiter.check("10.0.0.1")


def test_origin_normalization() -> None:
    """Origins compare by scheme, host and non-default port, case-insensitively."""
    assert normalize_origin("HTTP://Example.COM:80") == "http://example.com"
    assert normalize_origin("https://example.com:8443/") == "https://example.com:8443"
    assert normalize_origin("http://[::1]:8080") == "http://[::1]:8080"


def test_same_origin_allowed() -> None:
    """An Origin equal to the Host the client asked for is allowed."""
    check_origin("http://127.0.0.1:8080", "127.0.0.1:8080", "http")
    check_origin("https://example.com", "example.com", None)


def test_configured_origin_allowed() -> None:
    """An Origin in the configured list is allowed even for another Host."""
    check_origin("https://app.example.com", "127.0.0.1:8080", "http", ["https://app.example.com/"])


@pytest.mark.parametrize(
    "origin",
    [None, "null", "http://evil.example", "http://127.0.0.1:8081", "https://127.0.0.1:8080"],
)
def test_foreign_or_missing_origin_refused(origin: str | None) -> None:
    """A missing, null, foreign, other-port or other-scheme Origin is refused with 403."""
    with pytest.raises(Forbidden) as caught:
        check_origin(origin, "127.0.0.1:8080", "http")
    assert caught.value.status == 403


def test_rate_limit_keys_ipv6_by_its_64_and_mapped_ipv4_as_ipv4() -> None:
    """Addresses of one IPv6 /64 share a count, and ::ffff:a.b.c.d counts as a.b.c.d."""
    limiter = LoginRateLimiter(max_failures=2, window=60, clock=FakeClock())
    limiter.failed("2001:db8:1:2::1")
    limiter.failed("2001:db8:1:2:ffff::99")
    with pytest.raises(TooManyRequests):
        limiter.check("2001:db8:1:2::abcd")
    limiter.check("2001:db8:1:3::1")
    limiter.failed("::ffff:192.0.2.1")
    limiter.failed("192.0.2.1")
    with pytest.raises(TooManyRequests):
        limiter.check("192.0.2.1")
    assert LoginRateLimiter.key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert LoginRateLimiter.key("unknown") == "unknown"


def test_record_failure_counts_until_the_limit_then_refuses_without_counting() -> None:
    """Failures past the limit are refused with 429 and not stored, so a flood costs no memory."""
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=3, window=60, clock=clock)
    for _ in range(3):
        limiter.record_failure("10.0.0.1")
    for _ in range(100):
        with pytest.raises(TooManyRequests):
            limiter.record_failure("10.0.0.1")
    clock.now += 60
    limiter.record_failure("10.0.0.1")  # the window slid past the three counted ones
