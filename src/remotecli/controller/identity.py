"""Who a request is: the one rule for the API, the login page and the VNC WebSocket.

Theory of operation. A request proves who it is with a login token (``Authorization: Bearer``
or the login cookie) or, on the VNC WebSocket only, a single-use ticket. :class:`Identity`
decides, in this order:

1. no credential at all: 401 (not counted: nothing was guessed);
2. the credential is checked first; a valid one is accepted whatever the failure count of
   its client, so failures from others behind the same address lock no one out;
3. a wrong one (unknown token, bad, used or expired ticket) is counted against its client
   in the :class:`~remotecli.auth.LoginRateLimiter`, keyed as its docstring says; past the
   limit it is answered 429 with ``Retry-After`` instead of 401 or 403.

A valid cookie on a WebSocket must also come from an allowed Origin (403 otherwise; not a
failed credential, so not counted). Tokens carry 256 random bits, so the limit is not what
stops guessing: it tells a misconfigured or hostile client to back off.

The cookie is not the token. Signing in with a token opens a *browser login*: a fresh random
secret whose hash the store keeps beside the user, valid for :data:`LOGIN_TTL`. Sign out
deletes it on the server, so a copied cookie stops working at once; removing a user, or
``remotecli user token`` (a new token, the old ones revoked), signs out every browser of that
user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import NoReturn, Protocol

from remotecli.auth import (
    LoginRateLimiter,
    TicketBook,
    bearer_token,
    check_origin,
    cookie_token,
    hash_token,
    new_token,
)
from remotecli.controller.store import Store
from remotecli.exceptions import ClientError, NotAuthenticated, RemoteCliError

UserLookup = Callable[[str], str | None]

ADMIN_USER = "admin"
"""The operator's user: its token is REMOTECLI_TOKEN or DATA_DIR/admin.token."""

LOGIN_TTL = 30 * 24 * 3600.0
"""Seconds a browser login (the cookie) lasts; the cookie's Max-Age is the same."""

SEEN_EVERY = 60.0
"""A user's last seen is written at most this often (seconds), not on every request."""


class Logins(Protocol):
    """Browser logins: the secret in a cookie, the user it stands for, and sign out."""

    def user(self, secret: str) -> str | None:
        """Return the user of a login secret, or None (unknown, signed out, expired)."""

    def open(self, user: str, token: str | None = None) -> str:
        """Start a login for ``user``; return its secret (the cookie's value).

        ``token``, the one signed in with: the login ends no later than it expires.
        """

    def close(self, secret: str) -> bool:
        """End a login (sign out); True when there was one."""


class StoreLogins:
    """:class:`Logins` kept in the store (hashed), each valid for :data:`LOGIN_TTL`."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def user(self, secret: str) -> str | None:
        """Return the user of ``secret`` while its login lasts."""
        return self._store.user_for_login(hash_token(secret), self._clock())

    def open(self, user: str, token: str | None = None) -> str:
        """Record a new login of ``user`` and return its secret (shown once, stored hashed)."""
        secret = new_token()
        now = self._clock()
        expires_at = now + LOGIN_TTL
        token_expiry = None if token is None else self._store.token_expiry(hash_token(token))
        if token_expiry is not None:
            expires_at = min(expires_at, token_expiry)
        self._store.add_login(user, hash_token(secret), now, expires_at)
        return secret

    def close(self, secret: str) -> bool:
        """Delete the login of ``secret``."""
        return self._store.delete_login(hash_token(secret))


class Identity:
    """Decides who a request is (see the module's theory); one per controller.

    ``users`` maps a login token to its user (None when unknown); ``tickets`` is the book the
    WebSocket tickets are issued from and redeemed in; ``limiter`` counts wrong credentials.
    Both are attributes a test may replace (a smaller limiter, a ticket book on a fake clock).
    """

    def __init__(
        self,
        users: UserLookup,
        tickets: TicketBook,
        *,
        logins: Logins,
        limiter: LoginRateLimiter | None = None,
        allowed_origins: Iterable[str] = (),
        seen: Callable[[str], None] | None = None,
    ) -> None:
        self._users = users
        self.logins = logins
        self.tickets = tickets
        self.limiter = limiter if limiter is not None else LoginRateLimiter()
        self._allowed_origins = tuple(allowed_origins)
        self._seen = seen

    @classmethod
    def of_store(
        cls,
        store: Store,
        tickets: TicketBook,
        *,
        limiter: LoginRateLimiter | None = None,
        allowed_origins: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> Identity:
        """Return the identity whose tokens and logins are the ones ``store`` keeps (hashed).

        Each user's last seen is written to the store at most every :data:`SEEN_EVERY` s.
        """

        def users(token: str) -> str | None:
            return store.user_for_token(hash_token(token), clock())

        written: dict[str, float] = {}

        def seen(user: str) -> None:
            now = clock()
            if now - written.get(user, -SEEN_EVERY) >= SEEN_EVERY:
                written[user] = now
                store.touch_user(user, now)

        return cls(
            users,
            tickets,
            logins=StoreLogins(store, clock),
            limiter=limiter,
            allowed_origins=allowed_origins,
            seen=seen,
        )

    def peek(self, cookie: str | None) -> str | None:
        """Return the user of a login cookie without counting anything (e.g. one to replace)."""
        return self.logins.user(cookie) if cookie else None

    def token_user(self, token: str | None, *, client: str, missing: str) -> str:
        """Return the user of a login token; ``missing`` is the 401 message without one.

        Raises NotAuthenticated (401) for no token or a wrong one, TooManyRequests (429) for a
        wrong one past the limit.
        """
        if not token:
            raise NotAuthenticated(missing)
        user = self._users(token)
        if user is None:
            self._refuse(
                client,
                NotAuthenticated(
                    "the token is not valid (unknown, expired or revoked); use the one "
                    "`remotecli up` printed, or ask for one with `remotecli user token NAME`"
                ),
            )
        self._saw(user)
        return user

    def cookie_user(self, cookie: str | None, *, client: str, missing: str) -> str:
        """Return the user of a login cookie; 401 (429 past the limit) as :meth:`token_user`."""
        if not cookie:
            raise NotAuthenticated(missing)
        user = self.logins.user(cookie)
        if user is None:
            self._refuse(
                client,
                NotAuthenticated(
                    "this browser's login ended (signed out, expired, or its user was removed); "
                    "sign in again with your login URL"
                ),
            )
        self._saw(user)
        return user

    def request_user(
        self, *, authorization: str | None, cookie_header: str | None, client: str
    ) -> str:
        """Return the user of an API request (bearer token first, else the login cookie)."""
        missing = (
            "no credentials: send `Authorization: Bearer TOKEN`, or open the login URL "
            "`remotecli up` printed"
        )
        token = bearer_token(authorization)
        if token is not None:
            return self.token_user(token, client=client, missing=missing)
        return self.cookie_user(cookie_token(cookie_header), client=client, missing=missing)

    def _saw(self, user: str) -> None:
        if self._seen is not None:
            self._seen(user)

    def viewer_user(
        self,
        session_id: str,
        *,
        ticket: str | None,
        cookie_header: str | None,
        origin: str | None,
        host: str | None,
        client: str,
    ) -> str:
        """Return the user of a VNC WebSocket: its ticket, else its cookie and Origin.

        Raises Forbidden (403) for a bad ticket or Origin, NotAuthenticated (401) without
        credentials or with a wrong cookie, TooManyRequests (429) for a wrong ticket or cookie
        past the limit: all before the upgrade.
        """
        if ticket:
            try:
                return self.tickets.redeem(ticket, session_id).user
            except ClientError as exc:
                self._refuse(client, exc)
        user = self.cookie_user(
            cookie_token(cookie_header),
            client=client,
            missing="the session's WebSocket needs a ticket (?ticket= from "
            f"POST /api/sessions/{session_id}/ticket) or the login cookie; "
            "log in with the URL `remotecli up` printed",
        )
        check_origin(origin, host, None, self._allowed_origins)
        return user

    def _refuse(self, client: str, error: RemoteCliError) -> NoReturn:
        self.limiter.record_failure(client)  # 429 past the limit
        raise error
