"""Who a request is (remotecli.controller.identity): the credential first, then the limit."""

from __future__ import annotations

import pytest

from remotecli.auth import COOKIE_NAME, LoginRateLimiter, TicketBook
from remotecli.controller.identity import Identity
from remotecli.exceptions import Forbidden, NotAuthenticated, TooManyRequests

TOKENS = {"alice-token": "alice", "bob-token": "bob"}
ORIGIN = "http://127.0.0.1:8080"
HOST = "127.0.0.1:8080"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class DictLogins:
    """Browser logins in a dict: ``alice-login`` and ``bob-login`` exist from the start."""

    def __init__(self) -> None:
        self.logins = {"alice-login": "alice", "bob-login": "bob"}

    def user(self, secret: str) -> str | None:
        return self.logins.get(secret)

    def open(self, user: str, token: str | None = None) -> str:
        secret = f"{user}-login-{len(self.logins)}"
        self.logins[secret] = user
        return secret

    def close(self, secret: str) -> bool:
        return self.logins.pop(secret, None) is not None


def make_identity(max_failures: int = 3) -> tuple[Identity, TicketBook]:
    clock = FakeClock()
    tickets = TicketBook(clock=clock)
    limiter = LoginRateLimiter(max_failures=max_failures, window=60, clock=clock)
    return Identity(TOKENS.get, tickets, logins=DictLogins(), limiter=limiter), tickets


def api_user(identity: Identity, token: str | None, client: str = "127.0.0.1") -> str:
    return identity.request_user(
        authorization=f"Bearer {token}" if token else None, cookie_header=None, client=client
    )


def test_a_valid_token_is_accepted_past_the_failure_limit() -> None:
    """After the limit of wrong tokens from an address, its valid ones still pass; wrong get 429."""
    identity, _ = make_identity()
    for _ in range(3):
        with pytest.raises(NotAuthenticated):
            api_user(identity, "wrong")
    with pytest.raises(TooManyRequests):
        api_user(identity, "wrong")
    assert api_user(identity, "alice-token") == "alice"
    assert (
        identity.request_user(
            authorization=None, cookie_header=f"{COOKIE_NAME}=bob-login", client="127.0.0.1"
        )
        == "bob"
    )


def test_no_credential_is_401_and_not_counted() -> None:
    """Requests without any credential are 401 however many, and never reach 429."""
    identity, _ = make_identity()
    for _ in range(10):
        with pytest.raises(NotAuthenticated, match="no credentials"):
            api_user(identity, None)
    with pytest.raises(NotAuthenticated, match="not valid"):
        api_user(identity, "wrong")


def test_bad_tickets_and_cookies_on_the_websocket_count() -> None:
    """Wrong tickets and cookies on the VNC WebSocket count like wrong tokens, then get 429."""
    identity, tickets = make_identity()
    for ticket in ("forged-1", "forged-2"):
        with pytest.raises(Forbidden):
            identity.viewer_user(
                "s1", ticket=ticket, cookie_header=None, origin=None, host=HOST, client="10.0.0.1"
            )
    with pytest.raises(NotAuthenticated):
        identity.viewer_user(
            "s1",
            ticket=None,
            cookie_header=f"{COOKIE_NAME}=wrong",
            origin=ORIGIN,
            host=HOST,
            client="10.0.0.1",
        )
    with pytest.raises(TooManyRequests):
        identity.viewer_user(
            "s1", ticket="forged-3", cookie_header=None, origin=None, host=HOST, client="10.0.0.1"
        )
    with pytest.raises(TooManyRequests):
        api_user(identity, "wrong", client="10.0.0.1")
    ticket, _ = tickets.issue("s1", "alice")
    user = identity.viewer_user(
        "s1", ticket=ticket, cookie_header=None, origin=None, host=HOST, client="10.0.0.1"
    )
    assert user == "alice"


def test_a_foreign_origin_with_a_valid_cookie_is_403_and_not_counted() -> None:
    """A valid cookie from a foreign Origin is refused (403) but is not a failed credential."""
    identity, _ = make_identity(max_failures=1)
    for _ in range(3):
        with pytest.raises(Forbidden):
            identity.viewer_user(
                "s1",
                ticket=None,
                cookie_header=f"{COOKIE_NAME}=alice-login",
                origin="http://evil.example",
                host=HOST,
                client="10.0.0.1",
            )
    with pytest.raises(NotAuthenticated):
        api_user(identity, "wrong", client="10.0.0.1")


def test_peek_counts_nothing() -> None:
    """Looking up whose cookie a browser holds never counts as a failure."""
    identity, _ = make_identity(max_failures=1)
    for _ in range(5):
        assert identity.peek("stale") is None
    assert identity.peek(None) is None
    assert identity.peek("bob-login") == "bob"
    with pytest.raises(NotAuthenticated):
        api_user(identity, "wrong")


def test_a_token_is_not_a_cookie_and_a_closed_login_is_gone() -> None:
    """The cookie holds a login, not the token: a token there is refused; sign out ends it."""
    identity, _ = make_identity()
    with pytest.raises(NotAuthenticated, match="login ended"):
        identity.request_user(
            authorization=None, cookie_header=f"{COOKIE_NAME}=alice-token", client="127.0.0.1"
        )
    secret = identity.logins.open("alice")
    cookie = f"{COOKIE_NAME}={secret}"
    assert identity.request_user(authorization=None, cookie_header=cookie, client="::1") == "alice"
    assert identity.logins.close(secret)
    with pytest.raises(NotAuthenticated):
        identity.request_user(authorization=None, cookie_header=cookie, client="::1")
