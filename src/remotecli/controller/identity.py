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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NoReturn

from remotecli.auth import (
    LoginRateLimiter,
    TicketBook,
    bearer_token,
    check_origin,
    cookie_token,
    hash_token,
)
from remotecli.controller.store import Store
from remotecli.exceptions import ClientError, NotAuthenticated, RemoteCliError

UserLookup = Callable[[str], str | None]


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
        limiter: LoginRateLimiter | None = None,
        allowed_origins: Iterable[str] = (),
    ) -> None:
        self._users = users
        self.tickets = tickets
        self.limiter = limiter if limiter is not None else LoginRateLimiter()
        self._allowed_origins = tuple(allowed_origins)

    @classmethod
    def of_store(
        cls,
        store: Store,
        tickets: TicketBook,
        *,
        limiter: LoginRateLimiter | None = None,
        allowed_origins: Iterable[str] = (),
    ) -> Identity:
        """Return the identity whose login tokens are the ones ``store`` keeps (hashed)."""

        def users(token: str) -> str | None:
            return store.user_for_token(hash_token(token))

        return cls(users, tickets, limiter=limiter, allowed_origins=allowed_origins)

    def peek(self, token: str | None) -> str | None:
        """Return the user of ``token`` without counting anything (e.g. a cookie to replace)."""
        return self._users(token) if token else None

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
                    "the token is not valid; use the one `remotecli up` printed, or create one "
                    "with `remotecli user add NAME`"
                ),
            )
        return user

    def request_user(
        self, *, authorization: str | None, cookie_header: str | None, client: str
    ) -> str:
        """Return the user of an API request (bearer token first, else the login cookie)."""
        return self.token_user(
            bearer_token(authorization) or cookie_token(cookie_header),
            client=client,
            missing="no credentials: send `Authorization: Bearer TOKEN`, or open the login URL "
            "`remotecli up` printed",
        )

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
        user = self.token_user(
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
