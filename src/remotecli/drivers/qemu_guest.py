"""The host's channels to a running guest: its control agent, its VNC banner, its terminal.

:func:`control_exchange` sends the control agent one line on the second serial port and reads
its answer; :func:`read_banner` reads the RFB banner through the VM's loopback forward.

The text terminal, on a host Unix socket as the local driver's (the tty protocol). Inside the
guest the tty server (:mod:`remotecli.sandbox.tty_server`, TCP form) listens behind QEMU's
loopback-only port forward, and opens to a connection that starts with the VM's secret. Any
local process may connect to that forward, so the secret is what keeps them out; the
controller, which holds it, reaches the terminal through :class:`TtyProxy`: a Unix socket (mode
0600, in the VM's private socket directory) whose every connection is joined to a new
connection to the forward, the secret sent first. From there on the bytes are the tty protocol
both ways, unchanged, with backpressure (each side is read only as fast as the other takes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from remotecli.drivers.banner import await_rfb_banner
from remotecli.exceptions import DriverError, RemoteProtocolError

CONNECT_SECONDS = 5.0
_CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until EOF or an error, then half-close ``writer``."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class TtyProxy:
    """The Unix socket the bridge opens for one VM's text terminal; :meth:`close` ends it."""

    def __init__(self, server: asyncio.Server, path: Path) -> None:
        self._server = server
        self.path = path

    @classmethod
    async def start(cls, path: Path, port: int, secret: str) -> TtyProxy:
        """Listen on ``path``; join each connection to ``127.0.0.1:port`` after ``secret``."""

        async def join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(CONNECT_SECONDS):
                    guest_reader, guest_writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                writer.close()  # the bridge reads EOF before any byte: no terminal
                return
            guest_writer.write(secret.encode("ascii") + b"\n")
            try:
                await asyncio.gather(_pipe(reader, guest_writer), _pipe(guest_reader, writer))
            finally:
                guest_writer.close()
                writer.close()

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(join, path=str(path))
        finally:
            os.umask(old)
        return cls(server, path)

    def close(self) -> None:
        """Stop accepting and remove the socket (open connections end with the VM)."""
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def control_exchange(path: Path, line: bytes, expect: str, *, within: float) -> str:
    """Send ``line`` to the guest's control agent and return its answer starting ``expect``."""
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                if line:
                    writer.write(line)
                    await writer.drain()
                while True:
                    raw = await reader.readline()
                    if not raw:
                        raise DriverError("the VM closed its control channel (did QEMU exit?)")
                    answer = raw.decode(errors="replace").strip()
                    if answer.startswith(expect):
                        return answer
            finally:
                writer.close()
    except TimeoutError as exc:
        raise DriverError(
            f"the guest did not answer {expect.strip()!r} on its control channel within "
            f"{within:.0f} s; see the session's serial.log"
        ) from exc


async def read_banner(port: int, *, within: float) -> tuple[int, int]:
    """Read the RFB banner through the forward, retrying while the guest is not listening yet.

    QEMU's forward accepts at once and closes when nothing listens in the guest yet, so a short
    read or an odd greeting means "not yet" here, not a failure.
    """
    last_error = ["no answer"]

    def remember(exc: BaseException) -> None:
        last_error[0] = getattr(exc, "message", None) or str(exc) or type(exc).__name__

    try:
        async with asyncio.timeout(within):
            return await await_rfb_banner(
                lambda: asyncio.open_connection("127.0.0.1", port),
                not_yet=(OSError, asyncio.IncompleteReadError, RemoteProtocolError),
                retried=remember,
            )
    except TimeoutError as exc:
        raise DriverError(
            f"no RFB banner from the guest's VNC server on 127.0.0.1:{port} within "
            f"{within:.0f} s ({last_error[0]}); see the session's serial.log"
        ) from exc


def is_our_qemu(pid: int, qmp_path: str) -> bool:
    """Whether ``pid`` is still the QEMU with this monitor socket (a pid may be reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return qmp_path.encode() in cmdline


def console_tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` of a VM's console log, on one line (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])
