"""The session's text terminal: a tiny relay from a Unix socket to ``tmux attach`` on a PTY.

Run inside the session's sandbox, as the session's user, with the system's interpreter:
``python3 -I -S tty_server.py TTY_SOCKET TMUX_SOCKET`` (standard library only; the file is bound
read-only into the sandbox). The controller never attaches to the session's tmux itself: it
only ever talks to ``TTY_SOCKET``, and whatever runs tmux runs here, in the sandbox.

Theory of operation. The server listens on ``TTY_SOCKET`` (mode 0600: only the session's uid
and root can connect; the driver moves it into its root-only workdir). Each connection gets its
own PTY with ``tmux -u -S TMUX_SOCKET attach -t main`` on it (``TERM=xterm-256color``), started
at the connection's first record or :data:`ATTACH_DELAY` seconds after it was accepted,
whichever comes first (so a bridge that sends its size first never shows tmux a stray 80x24).
The wire protocol, one connection:

- controller → server: records ``type (1 byte) | length (4 bytes, big-endian) | payload``.
  Type 0 (:data:`INPUT`): bytes for the terminal, ``length`` <= 65,536. Type 1
  (:data:`RESIZE`): ``cols`` (u16 BE) then ``rows`` (u16 BE), each 1..1,000, applied with
  ``TIOCSWINSZ`` (tmux follows its latest client: ``window-size latest``). Any other type, an
  over-long record or a bad size closes that connection.
- server → controller: the raw output of the terminal, as tmux writes it (UTF-8), unframed.

In a microVM the server listens on TCP instead (``--tcp PORT --secret-file FILE``; the host
reaches it through QEMU's loopback-only port forward, which any local process could open): a
connection must then start with the secret in ``FILE`` (64 hex digits and a newline, compared
in constant time; the file is read at each connection, since the guest's agent rewrites it
after a snapshot restore) within :data:`SECRET_TIMEOUT` seconds, or it is closed unread.

At most :data:`MAX_CONNECTIONS` connections at once; one more is accepted and closed at once
(the controller sees EOF before any byte). One event loop (``selectors``) with non-blocking
descriptors: a client that stops reading only fills its own buffer (:data:`OUTPUT_BUFFER`),
then its PTY is no longer read (its tmux client blocks, tmux's server carries on), and other
clients are not held up. On a client's EOF or error its tmux client gets SIGHUP (SIGKILL if it
lingers) and is reaped; when a tmux client ends, its connection is closed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac
import os
import pty
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Sequence

INPUT = 0
RESIZE = 1
HEADER_SIZE = 5
MAX_INPUT = 65536
MAX_SIZE = 1000
MAX_CONNECTIONS = 4
ATTACH_DELAY = 0.1
"""Seconds after accepting a connection before its tmux client starts without a first record."""
DEFAULT_SIZE = (80, 24)
OUTPUT_BUFFER = 1 << 20
"""Bytes of output held for one slow client before its PTY is no longer read."""
INPUT_BUFFER = 1 << 18
"""Bytes of input held for one terminal before its client's socket is no longer read."""
SECRET_LINE = 65
"""A TCP connection's first bytes: the secret, 64 hex digits, then a newline."""
SECRET_TIMEOUT = 5.0
_READ_SIZE = 65536
_HUP_GRACE = 1.0


class ProtocolViolation(Exception):
    """The controller sent a record the protocol does not allow; close its connection."""


class RecordParser:
    """The controller-to-server half of the protocol, without I/O.

    Feed :meth:`receive_data` the bytes read from a connection; it returns the records complete
    so far as ``(INPUT, bytes)`` or ``(RESIZE, (cols, rows))`` and raises
    :class:`ProtocolViolation` at the first record the protocol forbids.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def receive_data(self, data: bytes) -> list[tuple[int, object]]:
        """Take ``data``; return the records it completed, in order."""
        self._buffer += data
        records: list[tuple[int, object]] = []
        while len(self._buffer) >= HEADER_SIZE:
            kind = self._buffer[0]
            (length,) = struct.unpack_from(">I", self._buffer, 1)
            if kind == INPUT:
                if length > MAX_INPUT:
                    raise ProtocolViolation(f"input record of {length} bytes (max {MAX_INPUT})")
            elif kind == RESIZE:
                if length != 4:
                    raise ProtocolViolation(f"resize record of {length} bytes (must be 4)")
            else:
                raise ProtocolViolation(f"unknown record type {kind}")
            if len(self._buffer) < HEADER_SIZE + length:
                break
            payload = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
            del self._buffer[: HEADER_SIZE + length]
            if kind == INPUT:
                records.append((INPUT, payload))
                continue
            cols, rows = struct.unpack(">HH", payload)
            if not (1 <= cols <= MAX_SIZE and 1 <= rows <= MAX_SIZE):
                raise ProtocolViolation(f"resize to {cols}x{rows} (each must be 1..{MAX_SIZE})")
            records.append((RESIZE, (cols, rows)))
        return records


def set_size(fd: int, cols: int, rows: int) -> None:
    """Set the window size of the terminal ``fd`` (the kernel signals its foreground group)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Connection:
    """One controller connection and the tmux client on its PTY."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.parser = RecordParser()
        self.attach_at = deadline
        self.size = DEFAULT_SIZE
        self.pid: int | None = None
        self.reaped = False
        self.master: int | None = None
        self.to_client = bytearray()
        self.to_terminal = bytearray()
        self.ended = False  # the tmux client's terminal hung up: send what is left, then close
        self.closing = False
        self.secret: bytearray | None = None  # bytes of the secret line read so far (TCP mode)


class TtyServer:
    """Accepts controller connections and relays each to its own ``tmux attach``."""

    def __init__(
        self,
        listener: socket.socket,
        attach_argv: Sequence[str],
        secret_file: str | None = None,
    ) -> None:
        self.listener = listener
        self.attach_argv = list(attach_argv)
        self.secret_file = secret_file
        self.selector = selectors.DefaultSelector()
        self.connections: list[Connection] = []
        self.hanging_up: dict[int, float] = {}  # pid → when to SIGKILL it
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)

    # --- the loop ---------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Run until killed."""
        while True:
            self.step()

    def step(self) -> None:
        """Wait for one round of events (or the next deadline) and handle them."""
        now = time.monotonic()
        deadlines = [c.attach_at for c in self.connections if c.pid is None]
        deadlines += list(self.hanging_up.values())
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        for key, mask in self.selector.select(timeout):
            if key.data is None:
                self._accept()
                continue
            connection, which = key.data
            if connection.closing:
                continue
            try:
                if which == "sock":
                    self._on_socket(connection, mask)
                else:
                    self._on_master(connection, mask)
            except (ProtocolViolation, OSError):
                self._close(connection)
        now = time.monotonic()
        for connection in list(self.connections):
            if connection.pid is None and now >= connection.attach_at:
                if connection.secret is not None:
                    self._close(connection)  # no secret in time
                    continue
                try:
                    self._attach(connection)
                except OSError:
                    self._close(connection)
        self._reap(now)

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        if len(self.connections) >= MAX_CONNECTIONS:
            sock.close()  # refused: the client reads EOF before any byte
            return
        sock.setblocking(False)
        if self.secret_file is None:
            connection = Connection(sock, time.monotonic() + ATTACH_DELAY)
        else:
            connection = Connection(sock, time.monotonic() + SECRET_TIMEOUT)
            connection.secret = bytearray()
        self.connections.append(connection)
        self.selector.register(sock, selectors.EVENT_READ, (connection, "sock"))

    # --- one connection ---------------------------------------------------------------------

    def _attach(self, connection: Connection) -> None:
        """Start the connection's tmux client on a new PTY at its latest size."""
        pid, master = pty.fork()
        if pid == 0:  # the child: a new session with the PTY as its controlling terminal
            try:
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                set_size(0, *connection.size)
                env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
                env["TERM"] = "xterm-256color"
                os.execvpe(self.attach_argv[0], self.attach_argv, env)  # noqa: S606
            finally:
                os._exit(127)
        os.set_blocking(master, False)
        connection.pid, connection.master = pid, master
        set_size(master, *connection.size)
        self.selector.register(master, selectors.EVENT_READ, (connection, "master"))
        self._flush_terminal(connection)

    def _on_socket(self, connection: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush_client(connection)
        if not mask & selectors.EVENT_READ or connection.closing:
            return
        data = connection.sock.recv(_READ_SIZE)
        if not data:
            self._close(connection)
            return
        if connection.secret is not None:
            data = self._check_secret(connection, data)
            if not data:
                return
        for kind, value in connection.parser.receive_data(data):
            if kind == INPUT:
                assert isinstance(value, bytes)
                connection.to_terminal += value
            else:
                assert isinstance(value, tuple)
                connection.size = (value[0], value[1])
                if connection.master is not None:
                    set_size(connection.master, *connection.size)
        if connection.pid is None:
            self._attach(connection)  # the first record: attach now, at the size it gave
        else:
            self._flush_terminal(connection)

    def _check_secret(self, connection: Connection, data: bytes) -> bytes:
        """Take the secret line off the front of ``data``; return what follows it.

        Raises ProtocolViolation (the connection closes) for a wrong secret.
        """
        assert connection.secret is not None
        assert self.secret_file is not None
        need = SECRET_LINE - len(connection.secret)
        connection.secret += data[:need]
        if len(connection.secret) < SECRET_LINE:
            return b""
        try:
            with open(self.secret_file, "rb") as handle:
                expected = handle.read(SECRET_LINE).strip()
        except OSError:
            expected = b""
        given = bytes(connection.secret).rstrip(b"\n")
        if len(expected) != SECRET_LINE - 1 or not hmac.compare_digest(given, expected):
            raise ProtocolViolation("wrong secret")
        connection.secret = None
        connection.attach_at = time.monotonic() + ATTACH_DELAY
        return data[need:]

    def _on_master(self, connection: Connection, mask: int) -> None:
        assert connection.master is not None
        if mask & selectors.EVENT_WRITE:
            self._flush_terminal(connection)
        if not mask & selectors.EVENT_READ or connection.closing:
            return
        try:
            data = os.read(connection.master, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: the tmux client has gone; its terminal hung up
                raise
            data = b""
        if not data:
            self.selector.unregister(connection.master)
            os.close(connection.master)
            connection.master, connection.ended = None, True
            connection.to_terminal.clear()
        connection.to_client += data
        self._flush_client(connection)

    def _flush_client(self, connection: Connection) -> None:
        if connection.to_client:
            try:
                sent = connection.sock.send(connection.to_client)
            except BlockingIOError:
                sent = 0
            del connection.to_client[:sent]
        if connection.ended and not connection.to_client:
            self._close(connection)
            return
        self._interest(connection)

    def _flush_terminal(self, connection: Connection) -> None:
        if connection.master is not None and connection.to_terminal:
            try:
                written = os.write(connection.master, connection.to_terminal)
            except BlockingIOError:
                written = 0
            del connection.to_terminal[:written]
        self._interest(connection)

    def _interest(self, connection: Connection) -> None:
        """Read only what there is room for; write only what is waiting (backpressure)."""
        sock_events = selectors.EVENT_WRITE if connection.to_client else 0
        if len(connection.to_terminal) < INPUT_BUFFER and not connection.ended:
            sock_events |= selectors.EVENT_READ
        self._modify(connection.sock, sock_events, (connection, "sock"))
        if connection.master is not None:
            master_events = selectors.EVENT_WRITE if connection.to_terminal else 0
            if len(connection.to_client) < OUTPUT_BUFFER:
                master_events |= selectors.EVENT_READ
            self._modify(connection.master, master_events, (connection, "master"))

    def _modify(self, fileobj: socket.socket | int, events: int, data: object) -> None:
        try:
            key = self.selector.get_key(fileobj)
        except KeyError:
            key = None
        if key is not None and key.events == events:
            return
        if key is not None:
            self.selector.unregister(fileobj)
        if events:
            self.selector.register(fileobj, events, data)

    def _close(self, connection: Connection) -> None:
        if connection.closing:
            return
        connection.closing = True
        if connection in self.connections:
            self.connections.remove(connection)
        for fileobj in (connection.sock, connection.master):
            if fileobj is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(fileobj)
        connection.sock.close()
        if connection.master is not None:
            os.close(connection.master)
        if connection.pid is not None and not connection.reaped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(connection.pid, signal.SIGHUP)
            self.hanging_up[connection.pid] = time.monotonic() + _HUP_GRACE

    def _reap(self, now: float) -> None:
        """Reap ended tmux clients; SIGKILL one that outlived its SIGHUP grace."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            self.hanging_up.pop(pid, None)
            for connection in self.connections:
                if connection.pid == pid:
                    connection.reaped = True  # its number may be reused: never signal it now
        for pid, deadline in list(self.hanging_up.items()):
            if now >= deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    self.hanging_up.pop(pid, None)
            for connection in self.connections:
                if connection.pid == pid:
                    connection.reaped = True  # its number may be reused: never signal it now


def listen(path: str) -> socket.socket:
    """Listen on the Unix socket ``path``, mode 0600 (no window where it is wider).

    Bound and listening under a temporary name first, then renamed: whoever sees ``path``
    (the driver takes it as soon as it exists) can connect at once.
    """
    building = f"{path}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(building)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(building)
    finally:
        os.umask(old)
    listener.listen(16)
    os.rename(building, path)
    return listener


def listen_tcp(port: int) -> socket.socket:
    """Listen on TCP ``port`` on every address (a microVM's; QEMU forwards the host's to it)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))  # inside the VM, behind the host's loopback forward
    listener.listen(16)
    return listener


USAGE = (
    "usage: tty_server.py TTY_SOCKET TMUX_SOCKET\n"
    "       tty_server.py --tcp PORT --secret-file FILE TMUX_SOCKET\n"
)


def main(argv: Sequence[str]) -> int:
    """Entry point: ``tty_server.py TTY_SOCKET TMUX_SOCKET``, or the TCP form (a microVM's)."""
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    if len(argv) == 3:
        listener, secret_file, tmux_socket = listen(argv[1]), None, argv[2]
    elif len(argv) == 6 and argv[1] == "--tcp" and argv[3] == "--secret-file":
        listener, secret_file, tmux_socket = listen_tcp(int(argv[2])), argv[4], argv[5]
    else:
        sys.stderr.write(USAGE)
        return 2
    tmux = ["tmux", "-u", "-S", tmux_socket, "attach-session", "-t", "main"]
    TtyServer(listener, tmux, secret_file).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
