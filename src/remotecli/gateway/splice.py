"""A tunnel between two plain sockets that the gateway runs itself, bulk moved by splice(2).

Theory of operation. When both sides of a tunnel are plain TCP or Unix sockets (no TLS),
:func:`take_socket` takes each socket out of its asyncio transport (a duplicate descriptor; the
transport is then dropped without a word on the wire) and each side's :class:`SpliceEnd` moves
what its socket reads to the other side, watching the descriptors with the loop's
``add_reader`` / ``add_writer``. It moves bytes one of two ways, per read:

- **copied**: ``recv_into`` one per-thread buffer of :data:`COPY_SIZE`, then ``write`` to the
  peer (what the peer cannot take is kept as bytes). No allocation when the peer keeps up.
- **spliced**: ``splice(socket → pipe)`` then ``splice(pipe → peer)``; the kernel moves pages by
  reference, so the gateway touches no byte and makes a few system calls per up to
  :data:`PIPE_SIZE` bytes.

A read that fills the whole copy buffer means more was waiting: a bulk transfer, and the next
reads splice, until one moves less than :data:`COPY_SIZE`. Splicing costs the receiving peer
somewhat more per byte (it gets the sender's pages, in smaller pieces), so message-sized traffic
(an interactive session, an echo) stays copied and a flood (an upload) is spliced. Bytes keep
their order: a copying read happens only while the pipe is empty, a splicing one only while
nothing copied is held.

Backpressure: what the peer's socket cannot take yet (``EAGAIN``) stays in the pipe or the held
bytes and is flushed when the peer is writable; reading goes on until :data:`PIPE_SIZE` bytes
wait (the read that crossed it kept: less than :data:`PIPE_SIZE` + :data:`COPY_SIZE`), then
stops until the peer takes some. So a peer that does not read costs at most that much plus the
kernel's socket buffers, and a peer that is only briefly full costs no stop
and restart. Pipes come from a small per-thread pool and are held only while bytes are in
them: an idle tunnel holds none (two descriptors per tunnel, as with transports). An EOF is
passed on as a half-close (``shutdown(SHUT_WR)``) once everything before it is delivered; the
second EOF ends the tunnel. A failing system call (reset, broken pipe) ends it as ``reset``.
:meth:`SpliceTunnel.close` flushes what is held to the sides still there, then closes;
:meth:`SpliceTunnel.abort` closes at once.

:class:`SpliceTunnel` has the surface of :class:`~remotecli.gateway.tunnel.Tunnel` (``client``
and ``upstream`` ends with their byte counts, ``ended``, ``about``, the idle timer, ``on_end``),
and each end's ``transport`` is a :class:`SocketView` answering what one asks a transport about
a tunnel (its socket, what waits to be written to it, whether it is read), so the rest of the
gateway does not care which kind relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from remotecli.gateway.tunnel import TunnelAbout, TunnelRecord, keepalive

PIPE_SIZE = 1024 * 1024  # the most an end holds in flight; one splice moves up to this
MAX_ROUNDS = 16  # full pipes moved per readable event before the loop serves the others
POOL_KEEP = 64  # empty pipes kept for the next busy end
COPY_SIZE = 256 * 1024  # one copying read; a read that fills it starts splicing
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if hasattr(os, "splice") else 0
_STREAM_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


class _PipePool:
    """Pipes for ends with bytes in flight; an empty pipe comes back for the next one."""

    def __init__(self) -> None:
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # the default 64 KiB where the limit forbids more
            fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return read, write

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        """Take back a pipe; one with bytes left in it is closed, not reused."""
        if empty and len(self._free) < POOL_KEEP:
            self._free.append(pipe)
            return
        for fd in pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


class _PerThread(threading.local):
    """Each event loop's thread has its own pipes and its own copy buffer.

    A write from the buffer releases the GIL: another thread's loop must not read into it.
    """

    def __init__(self) -> None:
        self.pool = _PipePool()
        self.view = memoryview(bytearray(COPY_SIZE))


_here = _PerThread()


class SpliceEnd:
    """One side of a splice tunnel: moves what its socket reads to the peer's socket."""

    __slots__ = (
        "bulk",
        "bytes",
        "done",
        "eof",
        "held",
        "held_size",
        "peer",
        "pipe",
        "queued",
        "reading",
        "sock",
        "transport",
        "tunnel",
        "waiting",
    )

    def __init__(self, tunnel: SpliceTunnel, sock: socket.socket) -> None:
        self.tunnel = tunnel
        self.sock = sock
        self.peer: SpliceEnd = self
        self.transport = SocketView(self)
        self.pipe: tuple[int, int] | None = None
        self.queued = 0  # bytes in the pipe, not yet in the peer's socket
        self.held: list[bytes | memoryview] = []  # copied reads (a list: idle ends cost less)
        self.held_size = 0  # bytes in ``held``: copied, not yet in the peer's socket
        self.bulk = False  # the last read filled what it was offered: splice the next one
        self.bytes = 0  # bytes read from this side (and written, or queued, to the peer)
        self.eof = False  # this side sent EOF
        self.done = False  # nothing more will move from this side
        self.reading = False  # watching this socket for bytes
        self.waiting = False  # watching the peer's socket until it takes what is queued

    @property
    def pending(self) -> int:
        """Bytes from this side waiting for the peer's socket."""
        return self.queued + self.held_size

    def hold(self, data: bytes | memoryview) -> None:
        """Keep ``data`` for the peer's socket, after what is held already."""
        self.held.append(data)
        self.held_size += len(data)

    def start(self) -> None:
        """Send what was read before the tunnel began on, then read."""
        if not self.held or self.push():
            self.set_reading(True)

    def readable(self) -> None:
        """Move what the socket has to the peer: spliced when it comes in bulk, else copied.

        Bytes keep their order: a copying read happens only while the pipe is empty, a
        splicing one only while nothing copied is held. While the peer is full, reading goes
        on until :data:`PIPE_SIZE` bytes wait, so a peer that is briefly full costs no stop
        and restart of reading.
        """
        if self.queued or (self.bulk and not self.held):
            self._splice_in()
        else:
            self._copy_in()

    def _copy_in(self) -> None:
        tunnel = self.tunnel
        view = _here.view
        try:
            size = self.sock.recv_into(view)
        except BlockingIOError:
            return
        except OSError:
            tunnel.failed(self)
            return
        if size == 0:
            self._eof()
            return
        self.bytes += size
        self.bulk = size == COPY_SIZE  # more was waiting: a bulk transfer, splice from now on
        if tunnel.idle_timeout is not None:
            tunnel.last_activity = time.monotonic()
        sent = 0
        if not self.waiting:
            try:
                sent = os.write(self.peer.sock.fileno(), view[:size])
            except BlockingIOError:
                pass
            except OSError:
                tunnel.failed(self.peer)
                return
        if sent < size:
            self.hold(bytes(view[sent:size]))
            self._wait_writable()
            if self.pending >= PIPE_SIZE:
                self.set_reading(False)  # as much as an end may hold: wait for the peer

    def _splice_in(self) -> None:
        tunnel = self.tunnel
        if self.pipe is None:
            self.pipe = _here.pool.take()
        pipe_in = self.pipe[1]
        fd = self.sock.fileno()
        for _ in range(MAX_ROUNDS):
            room = PIPE_SIZE - self.queued
            try:
                if room <= 0:
                    raise BlockingIOError  # as much as an end may hold: wait for the peer
                moved = os.splice(fd, pipe_in, room, flags=_FLAGS)
            except BlockingIOError:
                if self.queued:
                    self.set_reading(False)  # the pipe is full: read once the peer takes some
                break
            except OSError:
                tunnel.failed(self)
                return
            if moved == 0:
                self._eof()
                return
            self.queued += moved
            self.bytes += moved
            self.bulk = moved >= COPY_SIZE
            if tunnel.idle_timeout is not None:
                tunnel.last_activity = time.monotonic()
            if not self.waiting and not self.push() and self.done:
                return  # the peer failed
            if moved < room:
                break  # the socket is drained for now: spare the call that would say so
        self._release_pipe()

    def push(self) -> bool:
        """Write what is held to the peer's socket; False when it is full (or failed)."""
        fd = self.peer.sock.fileno()
        held = self.held
        try:
            while held:
                chunk = held[0]
                sent = os.write(fd, chunk)
                self.held_size -= sent
                if sent < len(chunk):
                    held[0] = memoryview(chunk)[sent:]
                else:
                    del held[0]
            while self.queued:
                assert self.pipe is not None
                self.queued -= os.splice(self.pipe[0], fd, self.queued, flags=_FLAGS)
        except BlockingIOError:
            self._wait_writable()
            return False
        except OSError:
            self.tunnel.failed(self.peer)
            return False
        return True

    def _wait_writable(self) -> None:
        if not self.waiting:
            self.waiting = True
            asyncio.get_running_loop().add_writer(self.peer.sock.fileno(), self.writable)

    def writable(self) -> None:
        """The peer's socket takes more: flush, then read again, pass an EOF on, or finish."""
        if not self.push():
            idle = not (self.done or self.reading or self.eof or self.tunnel.closing)
            if idle and self.pending < PIPE_SIZE:
                self.set_reading(True)  # there is room again
            return
        self.waiting = False
        asyncio.get_running_loop().remove_writer(self.peer.sock.fileno())
        self._release_pipe()
        tunnel = self.tunnel
        if tunnel.closing:
            self.done = True
            tunnel.maybe_finish()
        elif self.eof:
            self._pass_eof()
        elif not self.reading:
            self.set_reading(True)

    def stop(self) -> None:
        """Stop watching for this end and drop what its pipe holds (nothing more moves)."""
        self.set_reading(False)
        if self.waiting:
            self.waiting = False
            asyncio.get_running_loop().remove_writer(self.peer.sock.fileno())
        if self.pipe is not None:
            _here.pool.give(self.pipe, empty=not self.queued)
            self.pipe = None
        self.queued = 0
        self.held.clear()
        self.held_size = 0
        self.done = True

    def set_reading(self, on: bool) -> None:
        """Watch this socket for bytes, or stop (reading is off while the pipe is full)."""
        if on != self.reading:
            self.reading = on
            loop = asyncio.get_running_loop()
            if on:
                loop.add_reader(self.sock.fileno(), self.readable)
            else:
                loop.remove_reader(self.sock.fileno())

    def _release_pipe(self) -> None:
        if self.pipe is not None and not self.queued:
            _here.pool.give(self.pipe, empty=True)
            self.pipe = None

    def _eof(self) -> None:
        self.eof = True
        self.set_reading(False)
        self._release_pipe()
        if not self.pending:
            self._pass_eof()

    def _pass_eof(self) -> None:
        self.done = True
        tunnel = self.tunnel
        if self.peer.eof or tunnel.closing:
            tunnel.close("eof")
            return
        try:
            self.peer.sock.shutdown(socket.SHUT_WR)  # half-close: the peer may still answer
        except OSError:
            tunnel.failed(self.peer)


class SocketView:
    """A spliced socket, answering what one asks a tunnel side's transport about it."""

    __slots__ = ("_end",)

    def __init__(self, end: SpliceEnd) -> None:
        self._end = end

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``socket``, ``peername`` or ``sockname``, as a transport answers them (typed alike)."""
        sock = self._end.sock
        try:
            if name == "socket":
                return sock
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            pass
        return default

    def get_write_buffer_size(self) -> int:
        """Bytes waiting to be written to this socket (in the peer's pipe)."""
        return self._end.peer.pending

    def is_reading(self) -> bool:
        """True while the tunnel reads this socket."""
        return self._end.reading

    def is_closing(self) -> bool:
        """True once the tunnel is closing."""
        return self._end.tunnel.closing


class SpliceTunnel(TunnelRecord):
    """A relay between two plain sockets, moved by the kernel, until both are closed.

    Build it with the sockets :func:`take_socket` gave, register it, then :meth:`start` it:
    ``on_end`` is called once with the tunnel when it is over, which may be from ``start``
    itself when a side is already gone.
    """

    __slots__ = ("client", "closing", "finished", "upstream")

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        on_end: Callable[[SpliceTunnel], None],
        idle_timeout: float | None = None,
        client_early: bytes = b"",
        upstream_early: bytes = b"",
        about: TunnelAbout = ("", "", "", ""),
    ) -> None:
        self.client = SpliceEnd(self, client)
        self.upstream = SpliceEnd(self, upstream)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        if client_early:
            self.client.hold(client_early)
        if upstream_early:
            self.upstream.hold(upstream_early)
        self._start_record(on_end, idle_timeout, about)
        self.closing = False
        self.finished = False

    def start(self) -> None:
        """Start relaying (register the tunnel first: it may end here)."""
        keepalive(self.upstream.sock)
        self.upstream.start()
        if not self.closing:
            self.client.start()
        if not self.finished:
            self._arm_idle()

    @property
    def bytes_up(self) -> int:
        """Bytes relayed from the client to the upstream."""
        return self.client.bytes

    @property
    def bytes_down(self) -> int:
        """Bytes relayed from the upstream to the client."""
        return self.upstream.bytes

    def close(self, reason: str) -> None:
        """End the tunnel: flush what the pipes hold to the sides still there, then close."""
        if not self.ended:
            self.ended = reason
        if not self.closing:
            self.closing = True
            for end in (self.client, self.upstream):
                if end.done:
                    continue
                end.set_reading(False)
                # Flushed now, or by writable() once the peer takes the rest.
                end.done = not end.pending or (not end.waiting and end.push())
        self.maybe_finish()

    def abort(self) -> None:
        """Drop both sides now, discarding what the pipes hold."""
        self.closing = True
        self.client.stop()
        self.upstream.stop()
        self.maybe_finish()

    def failed(self, end: SpliceEnd) -> None:
        """A system call on ``end``'s socket failed (reset, broken pipe): end as ``reset``."""
        if not self.ended:
            self.ended = "reset"
        end.peer.stop()  # nothing can reach a dead socket
        self.close("reset")

    def maybe_finish(self) -> None:
        """Close both sockets and report the end once neither side has anything to flush."""
        if self.finished or not (self.client.done and self.upstream.done):
            return
        self.finished = True
        for end in (self.client, self.upstream):
            end.stop()
        for end in (self.client, self.upstream):
            end.sock.close()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self.ended:
            self.ended = "closed"
        self._on_end(self)


def can_splice(*transports: asyncio.Transport) -> bool:
    """True when every transport is a plain stream socket with nothing left to write."""
    if not _FLAGS:
        return False
    for transport in transports:
        if transport.get_extra_info("ssl_object") is not None or transport.is_closing():
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or sock.family not in _STREAM_FAMILIES or sock.type != socket.SOCK_STREAM:
            return False
        if transport.get_write_buffer_size():
            return False
    return True


class _Dropped(asyncio.Protocol):
    """The protocol of a transport whose socket went to a splice tunnel: it hears nothing."""


def take_socket(transport: asyncio.Transport) -> socket.socket:
    """Take ``transport``'s socket away from it (a duplicate) and drop the transport.

    The connection stays open: the transport's own descriptor closes without a shutdown, and
    the duplicate keeps the socket. Call only when :func:`can_splice` said yes.
    """
    sock = transport.get_extra_info("socket")
    fd = os.dup(sock.fileno())
    transport.set_protocol(_Dropped())
    transport.abort()
    # Family, type and protocol given: socket() would otherwise ask the kernel three times.
    return socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
