"""The session's tty server alone (remotecli.sandbox.tty_server), with a real tmux, no sandbox."""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotecli.sandbox import tty_server
from remotecli.sandbox.terminal import TMUX_CONF
from remotecli.sandbox.tty_server import (
    INPUT,
    MAX_CONNECTIONS,
    RESIZE,
    ProtocolViolation,
    RecordParser,
)
from tests.conftest import MS

PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
needs_tmux = pytest.mark.skipif(
    shutil.which("tmux") is None or PYTHON is None,
    reason="tmux and the system's python3 are needed: run scripts/install-system-deps.sh run",
)
TIMEOUT = 10_000 * MS


def record(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + struct.pack(">I", len(payload)) + payload


def typed(text: str) -> bytes:
    return record(INPUT, text.encode())


def resize(cols: int, rows: int) -> bytes:
    return record(RESIZE, struct.pack(">HH", cols, rows))


# --- the record parser, without I/O ---------------------------------------------------------


def test_parser_returns_records_split_anywhere() -> None:
    """Records cut at every byte boundary come out whole, in order, with their values."""
    data = resize(120, 40) + typed("ls\r") + record(INPUT, b"")
    parser = RecordParser()
    got = []
    for byte in data:
        got += parser.receive_data(bytes([byte]))
    assert got == [(RESIZE, (120, 40)), (INPUT, b"ls\r"), (INPUT, b"")]


@pytest.mark.parametrize(
    "data",
    [
        record(2, b""),
        bytes([INPUT]) + struct.pack(">I", tty_server.MAX_INPUT + 1),
        record(RESIZE, b"\x00\x50\x00"),
        resize(0, 24),
        resize(80, 1001),
    ],
    ids=["unknown-type", "input-too-long", "resize-short", "zero-cols", "rows-over-1000"],
)
def test_parser_refuses_what_the_protocol_forbids(data: bytes) -> None:
    """An unknown type, an over-long input, a malformed or out-of-range resize raise at once."""
    with pytest.raises(ProtocolViolation):
        RecordParser().receive_data(data)


# --- the server with a real tmux ------------------------------------------------------------


@dataclass
class Tmux:
    sock: Path
    tty: Path

    def display(self, fmt: str) -> str:
        """Ask the tmux server for a format (the test's own client, outside any sandbox)."""
        return subprocess.run(
            ["tmux", "-S", str(self.sock), "display-message", "-p", "-t", "main", fmt],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Tmux]:
    """A tmux server running a plain bash in session "main", and the tty server in front of it."""
    conf = tmp_path / "tmux.conf"
    conf.write_text(TMUX_CONF)
    sock, tty = tmp_path / "tmux.sock", tmp_path / "tty.sock"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PS1": "$ ", "LANG": "C.UTF-8"}
    subprocess.run(
        [
            *("tmux", "-u", "-S", str(sock), "-f", str(conf), "new-session", "-d", "-s", "main"),
            *("-x", "80", "-y", "24", "--", "bash", "--norc", "--noprofile"),
        ],
        env=env,
        check=True,
    )
    assert PYTHON is not None
    server = subprocess.Popen(
        [PYTHON, "-I", "-S", tty_server.__file__, str(tty), str(sock)], env=env
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not tty.exists():
            assert time.monotonic() < deadline, "the tty server did not listen"
            time.sleep(10 * MS)
        yield Tmux(sock, tty)
    finally:
        server.kill()
        server.wait()
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], check=False)


def connect(tmux: Tmux) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(tmux.tty))
    return client


def read_until(client: socket.socket, marker: bytes, timeout: float = TIMEOUT) -> bytes:
    """Read from ``client`` until ``marker`` shows; fail on EOF or timeout."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} did not come; got {seen[-300:]!r}"
        readable, _, _ = select.select([client], [], [], left)
        if readable:
            data = client.recv(65536)
            assert data, f"EOF before {marker!r}; got {seen[-300:]!r}"
            seen += data
    return seen


def read_to_eof(client: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Read until the server closes ``client``; fail if it does not within ``timeout``."""
    seen = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "the server did not close the connection"
        readable, _, _ = select.select([client], [], [], left)
        if readable:
            try:
                data = client.recv(65536)
            except ConnectionResetError:
                return seen
            if not data:
                return seen
            seen += data


def wait_for(check: object, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(20 * MS)


@needs_tmux
def test_listens_mode_0600(session: Tmux) -> None:
    """The tty socket is made mode 0600: only its owner (and root) can connect."""
    assert (session.tty.stat().st_mode & 0o777) == 0o600


@needs_tmux
def test_input_reaches_the_cli_and_its_output_comes_back(session: Tmux) -> None:
    """Keys sent as input records run a command in tmux's pane; its output is read back."""
    client = connect(session)
    client.sendall(resize(100, 30) + typed("echo hel''lo-$((6 * 7))\r"))
    read_until(client, b"hello-42")
    client.close()


@needs_tmux
def test_resize_changes_the_pty_and_tmux_window(session: Tmux, tmp_path: Path) -> None:
    """A resize record sets the PTY's size (stty sees it) and tmux's window follows it."""
    client = connect(session)
    client.sendall(resize(100, 30))
    wait_for(lambda: session.display("#{window_width}x#{window_height}") == "100x30")
    client.sendall(resize(123, 41))
    wait_for(lambda: session.display("#{window_width}x#{window_height}") == "123x41")
    # tmux hands the pane its new size a moment after the window's: ask until it has
    deadline = time.monotonic() + TIMEOUT
    for attempt in range(1000):
        client.sendall(typed(f"stty size </dev/tty >{tmp_path}/size; echo do''ne-{attempt}\r"))
        read_until(client, f"done-{attempt}".encode())
        if (tmp_path / "size").read_text() == "41 123\n" or time.monotonic() > deadline:
            break
        time.sleep(50 * MS)
    assert (tmp_path / "size").read_text() == "41 123\n"
    client.close()


@needs_tmux
@pytest.mark.parametrize(
    "bad",
    [record(9, b"x"), bytes([INPUT]) + struct.pack(">I", 70000), resize(80, 0)],
    ids=["unknown-type", "over-long-input", "bad-size"],
)
def test_a_bad_record_closes_that_connection_only(session: Tmux, bad: bytes) -> None:
    """A record the protocol forbids closes its own connection; another one keeps working."""
    good = connect(session)
    good.sendall(resize(90, 25))
    wrong = connect(session)
    wrong.sendall(resize(90, 25))
    time.sleep(200 * MS)
    wrong.sendall(bad)
    read_to_eof(wrong)
    good.sendall(typed("echo sti''ll-$((2 + 3))\r"))
    read_until(good, b"still-5")
    good.close()


@needs_tmux
def test_a_fifth_connection_is_closed_at_once(session: Tmux) -> None:
    """With four connections open a fifth reads EOF before any byte; once one closes, room again."""
    clients = [connect(session) for _ in range(MAX_CONNECTIONS)]
    for client in clients:
        client.sendall(resize(80, 24))
    for client in clients:
        read_until(client, b"$")
    fifth = connect(session)
    assert read_to_eof(fifth) == b""
    clients.pop().close()
    time.sleep(100 * MS)
    again = connect(session)
    again.sendall(resize(80, 24) + typed("echo ro''om\r"))
    read_until(again, b"room")
    for client in [*clients, again]:
        client.close()


@needs_tmux
def test_a_stalled_reader_does_not_hold_up_the_others(session: Tmux) -> None:
    """A client that never reads while the terminal floods output does not delay another's."""
    stalled = connect(session)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(resize(200, 60))
    reader = connect(session)
    reader.sendall(resize(200, 60))
    read_until(reader, b"$")
    reader.sendall(typed("for i in $(seq 1 20); do seq -w 1 30000; done; echo flo''oded\r"))
    read_until(reader, b"flooded", timeout=4 * TIMEOUT)
    reader.sendall(typed("echo aft''er-$((3 * 3))\r"))
    read_until(reader, b"after-9")
    stalled.close()
    reader.close()


@needs_tmux
def test_closing_a_connection_ends_its_tmux_client(session: Tmux) -> None:
    """When the controller hangs up, its tmux client is gone and tmux's session lives on."""
    client = connect(session)
    client.sendall(resize(80, 24))
    read_until(client, b"$")
    wait_for(lambda: session.display("#{session_attached}") == "1")
    client.close()
    wait_for(lambda: session.display("#{session_attached}") == "0")


@needs_tmux
def test_over_tcp_only_the_secret_opens_the_terminal(session: Tmux, tmp_path: Path) -> None:
    """The microVM form (--tcp, --secret-file): a connection that starts with the wrong secret,
    or with none in time, is closed without a byte of the terminal; the right one (read from
    the file at each connection, as the guest's agent rewrites it) reaches the CLI."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("a" * 64)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert PYTHON is not None
    server = subprocess.Popen(
        [PYTHON, "-I", "-S", tty_server.__file__, "--tcp", str(port), "--secret-file",
         str(secret_file), str(session.sock)],
    )  # fmt: skip
    try:

        def tcp() -> socket.socket:
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the tty server did not listen"
                    time.sleep(10 * MS)

        wrong = tcp()
        wrong.sendall(b"b" * 64 + b"\n" + resize(80, 24) + typed("echo leaked-$((6 * 7))\r"))
        assert b"leaked" not in read_to_eof(wrong)
        wrong.close()
        silent = tcp()
        started = time.monotonic()
        assert read_to_eof(silent, timeout=tty_server.SECRET_TIMEOUT + TIMEOUT) == b""
        assert time.monotonic() - started >= tty_server.SECRET_TIMEOUT - 0.5
        silent.close()
        secret_file.write_text("c" * 64)  # rewritten, as after a snapshot restore
        right = tcp()
        right.sendall(b"c" * 64 + b"\n" + resize(100, 30) + typed("echo vm-$((6 * 7))\r"))
        read_until(right, b"vm-42")
        right.close()
    finally:
        server.kill()
        server.wait()
