"""Coverage-guided fuzzing of the gateway's request-head handling, with atheris.

Each input is fed, as a client would send it, through the path the gateway runs for every
request (:mod:`remotecli.gateway.connection` minus the sockets): httptools (llhttp) reads the
head, then the pure core decides: :func:`remotecli.http11.check_head_size`,
:func:`~remotecli.http11.check_request_head`, :mod:`remotecli.upgrade`,
:func:`~remotecli.http11.request_framing`, :func:`remotecli.forwarding.forward` and
:func:`~remotecli.http11.end_to_end`. The property checked for every input:

- it is refused with a :class:`~remotecli.exceptions.ClientError` (a clean 4xx) or a parser
  error (a clean 400), and nothing else is raised; or
- the head the gateway would forward upstream is read by an independent strict parser (h11)
  as the same method and target, with exactly one unambiguous body framing (never both
  Content-Length and Transfer-Encoding), and no header the client did not send except the
  gateway's own forwarding headers (no CR/LF/NUL injection).

Run it: ``python tests/fuzz/fuzz_gateway.py -runs=100000 WORKDIR tests/fuzz/corpus``
(``make fuzz`` does a longer run; new inputs go to WORKDIR, crashes to ``-artifact_prefix``).
Without atheris installed, ``python tests/fuzz/fuzz_gateway.py FILE...`` checks files once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

try:
    import atheris
except ImportError:  # checking a corpus needs no fuzzer
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        import h11
        import httptools

        from remotecli import http11, upgrade
        from remotecli.exceptions import ClientError, RemoteCliError
        from remotecli.forwarding import FORWARDING_HEADERS, forward
else:
    import h11
    import httptools

    from remotecli import http11, upgrade
    from remotecli.exceptions import ClientError, RemoteCliError
    from remotecli.forwarding import FORWARDING_HEADERS, forward

MAX_HEADER_BYTES = 16 * 1024  # the gateway's default
GATEWAY_HEADERS = FORWARDING_HEADERS | {b"x-request-id", b"transfer-encoding"}


class Refused(Exception):
    """The gateway would answer this input with a clean 4xx and close."""


@dataclass
class Parsed:
    """One request head that passed every check, as the gateway would forward it."""

    head: http11.RequestHead
    framing: http11.BodyFraming
    websocket: bool
    forwarded: bytes = b""


@dataclass
class HeadReader:
    """The httptools callbacks the gateway's ClientConnection implements, minus the I/O."""

    parser: httptools.HttpRequestParser | None = None
    url: bytes = b""
    headers: list[http11.Header] = field(default_factory=list)
    heads: list[Parsed] = field(default_factory=list)
    error: RemoteCliError | None = None

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        head = http11.RequestHead(
            method=self.parser.get_method().decode("ascii"),
            target=self.url.decode("latin-1"),
            version=self.parser.get_http_version(),
            headers=self.headers,
        )
        size = len(self.url) + len(head.method) + 12
        size += sum(len(name) + len(value) + 4 for name, value in head.headers)
        try:
            http11.check_head_size(size, MAX_HEADER_BYTES)
            http11.check_request_head(head)
            websocket = upgrade.wants_websocket(head)
            if websocket:
                upgrade.check_websocket_request(head)
            framing = http11.request_framing(head.headers)
        except RemoteCliError as exc:
            self.error = exc
            raise
        self.heads.append(Parsed(head, framing, websocket))


def read_heads(data: bytes) -> list[Parsed]:
    """Return the heads the gateway would accept from ``data``; raise Refused if it refuses."""
    reader = HeadReader()
    reader.parser = httptools.HttpRequestParser(reader)
    rest = data
    while True:
        try:
            reader.parser.feed_data(rest)
        except httptools.HttpParserUpgrade as exc:
            last = reader.heads[-1] if reader.heads else None
            if last is not None and last.websocket:
                return reader.heads  # the rest belongs to the tunnel (or the local bridge)
            rest = rest[exc.args[0] :]
            reader.parser = httptools.HttpRequestParser(reader)  # h2c offer: ignored
            if rest:
                continue
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(reader.error, ClientError):
                raise AssertionError(f"a check raised {reader.error!r}, not a 4xx") from exc
            raise Refused(reader.error.message) from exc
        except httptools.HttpParserError as exc:
            raise Refused(str(exc)) from exc
        break
    if len(data) > MAX_HEADER_BYTES and not reader.heads:
        raise Refused("head too large")  # data_received's running count answers 431
    return reader.heads


def forwarded_head(parsed: Parsed) -> bytes:
    """Return the bytes the gateway would send upstream for ``parsed`` (as connection.py does)."""
    forwarding = forward(
        parsed.head.headers, peer="127.0.0.1", scheme="http", port=8080, trusted=()
    )
    if parsed.websocket:
        headers = upgrade.upstream_upgrade_headers(forwarding.headers)
    else:
        headers = http11.end_to_end(forwarding.headers)
        if parsed.framing.kind is http11.Framing.CHUNKED:
            headers.append((b"Transfer-Encoding", b"chunked"))
    head = http11.RequestHead(parsed.head.method, parsed.head.target, "1.1", headers)
    return http11.serialize_request(head)


def check_forwarded(parsed: Parsed) -> None:
    """Assert that an independent strict parser reads the forwarded head as the gateway meant."""
    raw = forwarded_head(parsed)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        if parsed.head.version == "1.0" and http11.get_one(parsed.head.headers, b"host") is None:
            return  # known: HTTP/1.0 without Host is forwarded as 1.1 without Host (reported)
        raise AssertionError(f"forwarded head is not valid HTTP/1.1 ({exc}): {raw!r}") from exc
    assert isinstance(event, h11.Request), f"forwarded head read as {event!r}: {raw!r}"
    assert event.method.decode("latin-1") == parsed.head.method
    assert event.target.decode("latin-1") == parsed.head.target
    names = [name for name, _ in event.headers]
    lengths = names.count(b"content-length")
    codings = names.count(b"transfer-encoding")
    assert not (lengths and codings), f"forwarded with both framings: {raw!r}"
    assert lengths <= 1, f"forwarded with a repeated Content-Length: {raw!r}"
    assert codings <= 1, f"forwarded with a repeated Transfer-Encoding: {raw!r}"
    if parsed.framing.kind is http11.Framing.CHUNKED:
        assert codings == 1
    elif parsed.framing.kind is http11.Framing.LENGTH:
        assert dict(event.headers)[b"content-length"] == str(parsed.framing.length).encode()
    sent = {name.lower() for name, _ in parsed.head.headers}
    invented = set(names) - sent - GATEWAY_HEADERS - {b"upgrade", b"connection"}
    assert not invented, f"forwarded head has headers the client never sent: {invented}"


def check_one(data: bytes) -> str:
    """Run one input through the property; return "refused" or "forwarded", or raise."""
    try:
        heads = read_heads(data)
    except Refused:
        return "refused"
    for parsed in heads:
        check_forwarded(parsed)
    return "forwarded" if heads else "incomplete"


def test_one_input(data: bytes) -> None:
    """The atheris entry: any exception other than a refusal is a finding."""
    check_one(data)


def main() -> None:
    """Fuzz with atheris (libFuzzer flags in argv), or check the given files once without it."""
    if atheris is None:
        for path in sys.argv[1:]:
            with open(path, "rb") as file:
                print(path, check_one(file.read()))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
