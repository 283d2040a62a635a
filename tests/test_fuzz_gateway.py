"""Hostile request heads against a real Gateway and a strict upstream: a clean 4xx or close, always.

One Gateway and one h11 upstream run on 127.0.0.1 in a background event loop (uvloop) for the
whole module; hypothesis sends each generated head over a fresh socket, half-closes it and reads
to the end. Every answer must be a clean 4xx, a clean close, or (for a valid head) the
upstream's own answer; never a 5xx, never a hang. Ambiguous framing, folding and injected
CR/LF/NUL must never reach the upstream. Then the gateway must still serve, and its process
must hold no more file descriptors than before. A short atheris run over the corpus in
``tests/fuzz/`` closes the module.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remotecli.config import GatewayConfig, Route
from remotecli.gateway import Gateway
from tests.conftest import MS
from tests.gateway_peers import HttpUpstream

T = TypeVar("T")
FUZZ_DIR = Path(__file__).parent / "fuzz"
CORPUS = FUZZ_DIR / "corpus"
MAX_HEADER_BYTES = 16 * 1024
FUZZ_SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class GatewayUnderTest:
    """A Gateway routing ``/`` to an h11 upstream, on its own uvloop thread, for blocking tests."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.upstream = self.call(HttpUpstream().start())
        config = GatewayConfig(
            listen=("127.0.0.1", 0),
            routes=(Route("/", self.upstream.url),),
            handshake_timeout=5000 * MS,
            max_header_bytes=MAX_HEADER_BYTES,
        )
        self.gateway = Gateway(config)
        self.call(self.gateway.start())
        self.port = self.gateway.address[1]

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the gateway's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10000 * MS)

    def close(self) -> None:
        """Shut the gateway and upstream down and stop the loop thread."""
        self.call(self.gateway.shutdown(grace=0))
        self.loop.call_soon_threadsafe(self.upstream.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10000 * MS)
        self.loop.close()

    def send(self, raw: bytes) -> bytes:
        """Send ``raw``, half-close, and return every byte answered until the gateway closes.

        A reset is a close too (the gateway may close with unread bytes pending); a hang fails.
        """
        answer = b""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5000 * MS) as sock:
            try:
                sock.sendall(raw)
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    answer += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            except TimeoutError:
                pytest.fail(f"the gateway neither answered nor closed for {raw[:200]!r}")
        return answer

    def seen(self) -> int:
        """How many requests the upstream has received so far."""
        return len(self.upstream.requests)


def open_fds() -> int:
    """Count this process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def gut() -> Iterator[GatewayUnderTest]:
    """The module's gateway under test, with the fd count taken once it is warm."""
    running = GatewayUnderTest()
    yield running
    running.close()


def status_of(answer: bytes) -> int | None:
    """Return the status code of a raw answer, or None for a close without an answer."""
    if not answer:
        return None
    assert answer.startswith(b"HTTP/1.1 "), f"not an HTTP answer: {answer[:100]!r}"
    return int(answer[9:12])


def assert_clean(answer: bytes, raw: bytes) -> int | None:
    """Assert ``answer`` is a close, a 4xx, or an upstream answer below 500; return the status."""
    status = status_of(answer)
    assert status is None or status < 500, f"{status} for {raw[:300]!r}: {answer[:300]!r}"
    if status is not None and status >= 400:
        assert b"Connection: close" in answer.partition(b"\r\n\r\n")[0]
    return status


def assert_refused(gut: GatewayUnderTest, raw: bytes, statuses: set[int | None]) -> None:
    """Assert ``raw`` is answered with one of ``statuses`` and never reaches the upstream."""
    before = gut.seen()
    status = status_of(gut.send(raw))
    assert status in statuses, f"{status} for {raw[:300]!r}"
    assert gut.seen() == before, f"the upstream received {raw[:300]!r}"


def head(*lines: bytes, target: bytes = b"/fuzz", method: bytes = b"GET") -> bytes:
    """Return a request head with Host and the given header lines."""
    start = method + b" " + target + b" HTTP/1.1\r\nHost: gw.test\r\n"
    return start + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


VALID = head(b"Accept: */*")
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
VALUE = st.binary(max_size=40).filter(lambda v: not set(v) & set(b"\r\n\x00"))
FRAMING_NAMES = st.sampled_from(
    [b"Content-Length", b"content-length", b"Transfer-Encoding", b"transfer-encoding"]
)
FRAMING_VALUES = st.sampled_from(
    [b"0", b"4", b"5", b"+4", b"-1", b"4, 4", b"0x4", b" 4", b"chunked", b"Chunked",
     b"chunked, chunked", b"gzip, chunked", b"identity", b"xchunked", b"chunked\x0b", b""]
)  # fmt: skip
INJECTED = st.sampled_from([b"\x00", b"\r", b"\n", b"\rInjected: 1", b"\nInjected: 1"])


def mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (position, kind, byte) edits: 0 replaces, 1 inserts, 2 deletes a byte."""
    out = bytearray(data)
    for position, kind, value in edits:
        index = position % (len(out) + 1)
        if kind == 0 and index < len(out):
            out[index] = value
        elif kind == 1:
            out.insert(index, value)
        elif kind == 2 and index < len(out):
            del out[index]
    return bytes(out)


@FUZZ_SETTINGS
@given(raw=st.binary(max_size=512))
def test_random_bytes_get_a_clean_answer(gut: GatewayUnderTest, raw: bytes) -> None:
    """Arbitrary bytes get a 4xx, a close, or (if they happen to be valid) a forwarded answer."""
    assert_clean(gut.send(raw), raw)


@FUZZ_SETTINGS
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 2), st.integers(0, 255)),
        min_size=1,
        max_size=6,
    ),
    base=st.sampled_from(
        [
            VALID,
            head(b"Content-Length: 4", method=b"POST") + b"abcd",
            head(b"Transfer-Encoding: chunked", method=b"POST") + b"4\r\nabcd\r\n0\r\n\r\n",
            head(
                b"Upgrade: websocket",
                b"Connection: Upgrade",
                b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==",
                b"Sec-WebSocket-Version: 13",
                target=b"/fuzz/ws",
            ),
        ]
    ),
)
def test_mutated_heads_get_a_clean_answer(
    gut: GatewayUnderTest, base: bytes, edits: list[tuple[int, int, int]]
) -> None:
    """Valid heads with random bytes replaced, inserted or deleted never get a 5xx or a hang."""
    raw = mutate(base, edits)
    assert_clean(gut.send(raw), raw)


@FUZZ_SETTINGS
@given(
    framing=st.lists(st.tuples(FRAMING_NAMES, FRAMING_VALUES), min_size=2, max_size=4),
)
def test_several_framing_headers_are_400_and_never_forwarded(
    gut: GatewayUnderTest, framing: list[tuple[bytes, bytes]]
) -> None:
    """Two or more Content-Length/Transfer-Encoding headers (smuggling) are 400, never forwarded."""
    lines = [name + b": " + value for name, value in framing]
    assert_refused(gut, head(*lines, method=b"POST") + b"0\r\n\r\n", {400})


@FUZZ_SETTINGS
@given(value=FRAMING_VALUES.filter(lambda v: not v.strip().isdigit() and v != b"chunked"))
def test_malformed_framing_value_is_400_and_never_forwarded(
    gut: GatewayUnderTest, value: bytes
) -> None:
    """A Content-Length or Transfer-Encoding that is not plainly a number or chunked is 400."""
    for name in (b"Content-Length", b"Transfer-Encoding"):
        if name == b"Transfer-Encoding" and value.strip().lower() == b"chunked":
            continue
        assert_refused(gut, head(name + b": " + value, method=b"POST") + b"abcd", {400})


@FUZZ_SETTINGS
@given(name=TOKEN, first=VALUE, fold=st.sampled_from([b" ", b"\t", b"  \t"]), rest=VALUE)
def test_obs_fold_is_400_and_never_forwarded(
    gut: GatewayUnderTest, name: bytes, first: bytes, fold: bytes, rest: bytes
) -> None:
    """A header continued on the next line (obs-fold, RFC 9112 5.2) is refused with 400."""
    raw = head(b"X-" + name + b": " + first + b"\r\n" + fold + b"more" + rest)
    assert_refused(gut, raw, {400})


@FUZZ_SETTINGS
@given(where=st.sampled_from(["value", "path", "name"]), bad=INJECTED, left=TOKEN, right=TOKEN)
def test_nul_cr_lf_injection_never_forwarded(
    gut: GatewayUnderTest, where: str, bad: bytes, left: bytes, right: bytes
) -> None:
    """NUL, bare CR or LF inside a header value, name or path is refused; nothing is injected."""
    if where == "value":
        raw = head(b"X-A: " + left + bad + right)
    elif where == "name":
        raw = head(b"X-" + left + bad + right + b": v")
    else:
        raw = head(target=b"/" + left + bad + right)
    assert_refused(gut, raw, {400})


@FUZZ_SETTINGS
@given(
    where=st.sampled_from(["value", "path", "count"]),
    size=st.integers(MAX_HEADER_BYTES + 1, 4 * MAX_HEADER_BYTES),
)
def test_over_long_heads_are_refused(gut: GatewayUnderTest, where: str, size: int) -> None:
    """A head over the limit (one value, the path, or many headers) is 431 (or 400), not sent."""
    if where == "value":
        raw = head(b"X-Big: " + b"v" * size)
    elif where == "path":
        raw = head(target=b"/" + b"p" * size)
    else:
        raw = head(*[b"X-Many: 0123456789"] * (size // 20 + 1))
    assert_refused(gut, raw, {431, 414, 400})


@FUZZ_SETTINGS
@given(
    target=st.lists(
        st.one_of(
            st.sampled_from(["%", "%2", "%zz", "%2F", "%2f", "%00", "%0d%0a", "%c0%ae", "../"]),
            st.text("abc/.-_~", min_size=1, max_size=4),
        ),
        min_size=1,
        max_size=8,
    ).map(lambda parts: "/fuzz/" + "".join(parts))
)
def test_invalid_percent_encoding_is_forwarded_verbatim_or_refused(
    gut: GatewayUnderTest, target: str
) -> None:
    """Bad or encoded-slash percent escapes are passed on unchanged (the app decides) or 400."""
    before = gut.seen()
    raw = head(target=target.encode())
    status = assert_clean(gut.send(raw), raw)
    if status is not None and status < 400:
        assert gut.upstream.requests[before].target == target.encode()


@FUZZ_SETTINGS
@given(
    where=st.sampled_from(["value", "path", "name", "method"]),
    text=st.binary(min_size=1, max_size=12).map(lambda b: bytes(x | 0x80 for x in b)),
)
def test_non_ascii_is_refused_or_forwarded_unchanged(
    gut: GatewayUnderTest, where: str, text: bytes
) -> None:
    """Bytes above 0x7f are refused in a name, method or path, and passed on as-is in a value."""
    before = gut.seen()
    if where == "value":
        raw = head(b"X-Latin: a" + text)
        status = assert_clean(gut.send(raw), raw)
        if status == 200:
            assert gut.upstream.header(b"x-latin", before) == b"a" + text
        return
    if where == "path":
        raw = head(target=b"/" + text)
    elif where == "name":
        raw = head(b"X-" + text + b": v")
    else:
        raw = text + b" /fuzz HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    assert_refused(gut, raw, {400})


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda path: path.name)
def test_corpus_entry_gets_a_clean_answer(gut: GatewayUnderTest, path: Path) -> None:
    """Every seed in the fuzz corpus gets a clean answer; smuggling, folding, injection: 4xx."""
    raw = path.read_bytes()
    before = gut.seen()
    status = assert_clean(gut.send(raw), raw)
    if path.name.startswith(("smuggle-", "fold-", "inject-", "length-", "version-")):
        assert status is not None
        assert 400 <= status < 500
        assert gut.seen() == before, f"the upstream received {path.name}"


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass; return whether it held."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(10 * MS)
    return True


def test_gateway_still_serves_and_holds_no_extra_fds(gut: GatewayUnderTest) -> None:
    """After every hostile head above, a valid request is served and fds are back to baseline."""
    assert status_of(gut.send(VALID)) == 200
    baseline = open_fds()
    for _ in range(200):
        gut.send(b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\x00\r\n\r\n")
        gut.send(os.urandom(64))
        gut.send(VALID)
    assert wait_until(lambda: open_fds() <= baseline + 2, 5000 * MS), (
        f"{open_fds()} fds open, {baseline} before 600 more hostile connections"
    )
    assert status_of(gut.send(VALID)) == 200


def test_short_atheris_run_over_the_corpus_finds_nothing(tmp_path: Path) -> None:
    """A few thousand coverage-guided mutations of the corpus raise nothing but clean refusals."""
    pytest.importorskip("atheris", reason="atheris is not installed; pip install -e '.[dev]'")
    work = tmp_path / "new"
    work.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ_DIR / "fuzz_gateway.py"),
            "-runs=3000",
            "-seed=1",
            "-max_len=65536",
            f"-artifact_prefix={tmp_path}/",
            str(work),
            str(CORPUS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 3000 runs" in result.stderr
