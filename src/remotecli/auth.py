"""Credentials: login tokens, WebSocket tickets, login rate limiting and the Origin rule.

Pure rules with no I/O; time comes from an injectable clock so tests can move it.

- A *token* belongs to one user. Only its SHA-256 is stored: tokens carry 256 random bits, so a
  plain hash is as strong as a slow password hash and keeps each check cheap.
- A *ticket* lets one WebSocket open one session's VNC stream: single use, bound to a session
  and a user, valid for 60 s. Tickets live in memory; a restart voids them, which is harmless.
- Failed credentials are counted per client (IPv6 per /64); past the limit further *wrong*
  credentials are refused with 429 until the window slides past the failures. A valid
  credential is never refused: callers check it first (:mod:`remotecli.controller.identity`).
- A WebSocket authenticated by the cookie must come from an allowed Origin, which stops other
  sites from opening a stream with the user's cookie (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from urllib.parse import urlsplit

from remotecli.exceptions import Forbidden, TooManyRequests

Clock = Callable[[], float]

COOKIE_NAME = "remotecli_login"  # a browser login, not the token (controller/identity.py)
TICKET_TTL = 60.0


def new_token() -> str:
    """Return a fresh random token (256 bits, URL-safe); show it to its user once."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Return the hex SHA-256 under which ``token`` is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def tokens_match(given: str, expected: str) -> bool:
    """Compare two secrets in constant time."""
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """Return the token of an ``Authorization: Bearer ...`` header, or None."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value


def cookie_token(cookie_header: str | None) -> str | None:
    """Return the browser login secret carried by a ``Cookie`` header, or None."""
    if not cookie_header:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(cookie_header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE_NAME)
    return morsel.value if morsel is not None and morsel.value else None


@dataclass(frozen=True)
class Ticket:
    """What a redeemed ticket proves: this user may open this session's stream."""

    session_id: str
    user: str
    expires_at: float


class TicketBook:
    """Issues and redeems single-use WebSocket tickets.

    Call :meth:`issue` after checking the user owns the session; call :meth:`redeem` once per
    WebSocket before the upgrade. A redeemed ticket is gone whether or not it matched.
    """

    def __init__(self, ttl: float = TICKET_TTL, clock: Clock = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._tickets: dict[str, Ticket] = {}  # hash of the ticket → what it grants

    def issue(self, session_id: str, user: str) -> tuple[str, float]:
        """Return a new ticket for ``user`` on ``session_id`` and its lifetime in seconds."""
        self._prune()
        ticket = secrets.token_urlsafe(24)
        expires_at = self._clock() + self._ttl
        self._tickets[hash_token(ticket)] = Ticket(session_id, user, expires_at)
        return ticket, self._ttl

    def redeem(self, ticket: str, session_id: str) -> Ticket:
        """Consume ``ticket`` for ``session_id`` and return what it grants.

        Raises :class:`Forbidden` when the ticket is unknown, used, expired or for another
        session; the caller must refuse the upgrade with 403.
        """
        granted = self._tickets.pop(hash_token(ticket), None)
        if granted is None:
            raise Forbidden(
                "ticket is unknown or was already used; request a new one with "
                f"POST /api/sessions/{session_id}/ticket",
                session_id=session_id,
            )
        if self._clock() >= granted.expires_at:
            raise Forbidden(
                f"ticket expired (tickets live {self._ttl:g} s); request a new one with "
                f"POST /api/sessions/{session_id}/ticket",
                session_id=session_id,
            )
        if not tokens_match(granted.session_id, session_id):
            raise Forbidden(
                "ticket was issued for another session; request one for this session",
                session_id=session_id,
            )
        return granted

    def _prune(self) -> None:
        now = self._clock()
        for key in [k for k, t in self._tickets.items() if now >= t.expires_at]:
            del self._tickets[key]

    def __len__(self) -> int:
        return len(self._tickets)


class LoginRateLimiter:
    """Counts failed credentials per client and refuses more of them past ``max_failures``.

    Call it only for a credential that was wrong (:meth:`record_failure`); a valid one is
    accepted without asking the limiter, so no one can be locked out by someone else's
    failures. Keying: an IPv4 address is its own key; an IPv6 address counts by its /64 (one
    machine usually holds a whole /64, so rotating addresses inside it gains nothing); an
    IPv4-mapped IPv6 address counts as the IPv4 one. Every local process shares the key
    ``127.0.0.1``: one of them failing often makes other local users' *wrong* credentials
    answer 429 instead of 401 for a while, never their valid ones.
    """

    def __init__(
        self, max_failures: int = 10, window: float = 60.0, clock: Clock = time.monotonic
    ) -> None:
        self._max = max_failures
        self._window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    @staticmethod
    @functools.lru_cache(maxsize=4096)
    def key(address: str) -> str:
        """Return the key failures from ``address`` are counted under (see the class)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def check(self, address: str) -> None:
        """Raise :class:`TooManyRequests` (429) when ``address`` failed too often recently."""
        key = self.key(address)
        recent = self._recent(key)
        if len(recent) >= self._max:
            retry = max(1, round(recent[0] + self._window - self._clock()))
            raise TooManyRequests(
                f"too many wrong credentials from {key} ({len(recent)} within "
                f"{self._window:g} s); wrong ones are refused for {retry} s more, a valid "
                "token is still accepted",
                address=key,
                retry_after=retry,
            )

    def failed(self, address: str) -> None:
        """Count one failed credential from ``address``."""
        self._recent(self.key(address)).append(self._clock())

    def record_failure(self, address: str) -> None:
        """Count a wrong credential from ``address``; past the limit raise 429 instead.

        A refused attempt is not counted, so a flood of them cannot grow memory; the caller
        answers with the original error (401, 403) when this returns.
        """
        self.check(address)
        self.failed(address)

    def _recent(self, key: str) -> deque[float]:
        cutoff = self._clock() - self._window
        recent = self._failures.setdefault(key, deque())
        while recent and recent[0] <= cutoff:
            recent.popleft()
        if not recent and len(self._failures) > 10_000:
            # Forget idle keys so a scan of many addresses cannot grow memory forever.
            self._failures = {a: q for a, q in self._failures.items() if q}
            self._failures[key] = recent
        return recent


def normalize_origin(origin: str) -> str:
    """Return ``scheme://host[:port]`` in lower case, without a default port or a path."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        return ""
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port is None or port == default else f"{host}:{port}"
    return f"{scheme}://{netloc}"


def same_origin(origin: str, host: str | None, scheme: str | None) -> bool:
    """True when ``origin`` is ``scheme://host``, ``host`` being the Host the client asked for.

    ``scheme`` None takes the Origin's own scheme, so only host and port count.
    """
    given = normalize_origin(origin)
    scheme = scheme or urlsplit(origin.strip()).scheme
    return bool(host and given and given == normalize_origin(f"{scheme}://{host}"))


def check_origin(
    origin: str | None, host: str | None, scheme: str | None, allowed: Iterable[str] = ()
) -> None:
    """Allow a cookie-authenticated WebSocket only from the same origin or a configured one.

    Same origin means the Origin header equals ``scheme://host`` where ``host`` is the Host the
    client asked for (``scheme`` None: the Origin's own scheme, so only host and port count).
    Raises :class:`Forbidden` (403) naming the origin and the setting to change.
    """
    if not origin or origin == "null":
        raise Forbidden(
            "WebSocket with cookie authentication needs an Origin header; "
            "use a ticket from POST /api/sessions/{id}/ticket instead"
        )
    if same_origin(origin, host, scheme):
        return
    given = normalize_origin(origin)
    if given and given in {normalize_origin(a) for a in allowed}:
        return
    raise Forbidden(
        f"Origin {origin} is not allowed for this server; open the dashboard from the same "
        "address or add the origin to REMOTECLI_ALLOWED_ORIGINS",
        origin=origin,
    )
