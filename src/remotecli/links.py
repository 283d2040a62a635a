"""Sign-in links out of a session, and loopback callbacks back into it: the rules, no I/O.

Theory of operation. A CLI signing in asks for a browser (``$BROWSER``, ``xdg-open``); in a
session those programs write the URL, one line, into a FIFO the driver reads
(:class:`LinkReader`, fed the bytes as they come). The session is hostile, so the reader keeps
at most :data:`MAX_LINK` bytes of a line (a longer one is dropped whole), lets a few links
through and then at most one per :data:`LINK_INTERVAL` seconds, and passes only absolute
``http``/``https`` URLs of printable ASCII. The user opens the link in their own browser; when
the provider then redirects that browser to ``http://localhost:PORT/...`` (where the CLI
listens, inside the session), the user pastes the address into the dashboard and
:func:`callback_target` decides whether it may be relayed: only ``localhost``, ``127.0.0.1``
and ``[::1]`` over ``http``, and only ever to the session's own loopback (the driver's
``connect_loopback``). :func:`callback_request` and :func:`callback_answer` build the GET and
read its answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from remotecli.exceptions import BadRequest, UpstreamBadResponse, UpstreamClosed

MAX_LINK = 4096
"""The longest link, in bytes, a session may hand out (sign-in URLs are well under 2 KiB)."""
LINK_BURST = 5
LINK_INTERVAL = 2.0
"""After :data:`LINK_BURST` links, at most one every this many seconds."""
MAX_ANSWER = 64 * 1024
"""How much of a callback's answer is read (the CLI's "you may close this page")."""
SHOWN_BODY = 2048
"""How much of that answer's body is shown to the user."""

_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_LOOPBACK_NAMES = {"localhost": "127.0.0.1", "127.0.0.1": "127.0.0.1", "::1": "::1"}
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[^\r\n]*\r?\n")


def check_link(text: str) -> str | None:
    """Return ``text`` when it is an absolute http(s) URL of printable ASCII, else None."""
    if not text or len(text) > MAX_LINK or not _PRINTABLE.fullmatch(text):
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return text


class LinkReader:
    """Turns the bytes a session writes into its link FIFO into links worth showing.

    Feed :meth:`receive_data` whatever was read; it returns the links that pass, in order.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buffer = bytearray()
        self._discarding = False  # inside a line that was already too long
        self._allowance = float(LINK_BURST)
        self._last = clock()
        self.dropped = 0
        """Lines refused so far (too long, not a link, or over the rate)."""

    def receive_data(self, data: bytes) -> list[str]:
        """Take bytes from the FIFO; return the complete lines that are links, within the rate."""
        links: list[str] = []
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._discarding:
                self._discarding = False
                continue
            link = self._accept(line)
            if link is not None:
                links.append(link)
        if len(self._buffer) > MAX_LINK:
            self._buffer.clear()
            self._discarding = True
            self.dropped += 1
        return links

    def _accept(self, line: bytes) -> str | None:
        try:
            link = check_link(line.decode("ascii").strip())
        except UnicodeDecodeError:
            link = None
        if link is None or not self._spend():
            self.dropped += 1
            return None
        return link

    def _spend(self) -> bool:
        now = self._clock()
        elapsed, self._last = now - self._last, now
        self._allowance = min(float(LINK_BURST), self._allowance + elapsed / LINK_INTERVAL)
        if self._allowance < 1.0:
            return False
        self._allowance -= 1.0
        return True


@dataclass(frozen=True)
class CallbackTarget:
    """Where a pasted callback address goes: a loopback address and port of the session."""

    address: str  # "127.0.0.1" or "::1"
    port: int
    host: str  # the Host header, as the browser would send it
    target: str  # path and query


def callback_target(url: str) -> CallbackTarget:
    """Check a pasted callback address; raise BadRequest (400) naming what is wrong.

    Only ``http://localhost:PORT/...``, ``http://127.0.0.1:PORT/...`` and
    ``http://[::1]:PORT/...`` pass (``http://`` may be left out): the session's own loopback,
    nothing else.
    """
    text = url.strip()
    if not text or len(text) > MAX_LINK or not _PRINTABLE.fullmatch(text):
        raise BadRequest("the callback address must be one line of printable ASCII, under 4 KiB")
    if "://" not in text:  # copied from an address bar that hides the scheme
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(f"the callback address is not a URL: {exc}") from exc
    if parts.scheme != "http":
        raise BadRequest(
            "only http://localhost:PORT/... addresses are relayed (the CLI's own callback); "
            "paste the address your browser ended on"
        )
    address = _LOOPBACK_NAMES.get((parts.hostname or "").lower())
    if address is None:
        raise BadRequest(
            f"{parts.hostname or 'no host'} is not the session's loopback; only localhost, "
            "127.0.0.1 and [::1] are relayed"
        )
    if parts.username is not None or parts.password is not None:
        raise BadRequest("the callback address must not carry a user name or password")
    if port is None or port == 0:
        raise BadRequest("the callback address must name the CLI's port (localhost:PORT)")
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    return CallbackTarget(address, port, parts.netloc, target)


def callback_request(target: CallbackTarget) -> bytes:
    """Return the GET the browser would have sent to the CLI (one request, then close)."""
    return (
        f"GET {target.target} HTTP/1.1\r\nHost: {target.host}\r\n"
        "User-Agent: remote-cli callback relay\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def callback_answer(data: bytes) -> tuple[int, str]:
    """Return the status and the start of the body of the CLI's answer (502 errors if none).

    The body is shown as text (chunked framing is undone when the whole of it was read).
    """
    if not data:
        raise UpstreamClosed("the CLI in the session closed the connection without answering")
    match = _STATUS_LINE.match(data)
    if match is None:
        raise UpstreamBadResponse("the CLI in the session answered with something not HTTP/1.x")
    head, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return int(match.group(1)), body[:SHOWN_BODY].decode("utf-8", errors="replace")


def _unchunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return bytes(out)
