"""A headless run's command in a microVM: the relay connection that carries it, as a RunOutput.

Theory of operation. The qemu driver starts a run as a clone of the provider's template whose
CLI waits (``remotecli-run --wait``) and is never told to start; it gives the clone its own
secrets, then :func:`open_run` sends the guest relay the run request (the command and the HOME
files, :mod:`remotecli.drivers.qemu_runframes`) through the VM's loopback forward. From the
relay's ``ok`` on, :class:`QemuRun` reads the frames in a task of its own: standard output is
kept for :meth:`QemuRun.read` (at most :data:`BUFFER_MAX` unread bytes: past that the socket
is not read, so the relay stops reading the command's pipe and the command waits, as it would
on a full pipe), the end of standard error for :meth:`QemuRun.errors`, and the exit status for
:meth:`QemuRun.wait`. Closing the connection (:meth:`QemuRun.stop`, or QEMU going away) makes
the relay kill the command's process group.

A run that ends without its exit status (the VM died, the guest broke the protocol, the run
was stopped) makes :meth:`QemuRun.wait` raise :class:`DriverError` with the cause, the end of
the VM's console included when there is one: there is no status to report, and an invented
one (say 255) would read as the command's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from remotecli.drivers.base import RUN_ERRORS_MAX
from remotecli.drivers.qemu_guest import console_tail
from remotecli.drivers.qemu_runframes import (
    Errors,
    Output,
    RunFrames,
    parse_answer,
    run_request,
)
from remotecli.exceptions import DriverError, LocalProtocolError, RemoteProtocolError

BUFFER_MAX = 1 << 20
"""Unread standard output kept on the host before the guest's output is no longer read."""
_CHUNK = 65536


async def open_run(
    port: int, secret: str, argv: Sequence[str], files: Mapping[str, bytes], *, within: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Ask the VM's relay (on host ``port``) to run ``argv`` with ``files`` in HOME.

    Returns the connection once the relay answered ``ok``: the command runs, its frames
    follow. Raises :class:`DriverError` naming the relay's reason when it refused (a path it
    will not write, a program that is not there) or did not answer within ``within`` s.
    """
    try:
        request = run_request(secret, argv, files)
    except LocalProtocolError as exc:
        raise DriverError(exc.message) from exc
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(request)
                await writer.drain()
                answer = await reader.readline()
            except BaseException:
                writer.close()
                raise
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a line past the limit
        raise DriverError(
            f"the microVM's relay did not answer the run request within {within:.0f} s "
            f"({type(exc).__name__}); see the run's serial.log"
        ) from exc
    reason = parse_answer(answer)
    if reason is not None:
        writer.close()
        raise DriverError(f"the microVM did not start the run's command: {reason}")
    return reader, writer


class QemuRun:
    """The command of one headless run in a microVM (a :class:`~remotecli.drivers.base.RunOutput`).

    Read :meth:`read` until it returns b"": a command whose output nobody reads stops once
    :data:`BUFFER_MAX` bytes wait, and then never ends.
    """

    def __init__(
        self,
        run_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        console: Path,
    ) -> None:
        self.run_id = run_id
        self._reader = reader
        self._writer = writer
        self._console = console
        self._frames = RunFrames()
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._more = asyncio.Event()
        """Set when standard output grew or the stream ended."""
        self._room = asyncio.Event()
        self._room.set()
        self._done = asyncio.Event()
        self._failure: str | None = None
        self._receiving = asyncio.get_running_loop().create_task(
            self._receive(), name=f"run-{run_id}"
        )

    async def read(self) -> bytes:
        """Return the standard output that arrived since the last call, waiting for some;
        b"" once the stream ended (the command's exit, or a failure :meth:`wait` names)."""
        while not self._stdout and not self._done.is_set():
            self._more.clear()
            await self._more.wait()
        data = bytes(self._stdout)
        self._stdout.clear()
        self._room.set()
        return data

    async def wait(self) -> int:
        """Return the command's exit status once it ended.

        Raises :class:`DriverError` with the cause when the run ended without one: the VM
        died or was stopped, or the guest broke the frame protocol.
        """
        await self._done.wait()
        if self._frames.status is not None:
            return self._frames.status
        failure = self._failure or "the run ended without its exit status"
        tail = console_tail(self._console)
        raise DriverError(
            f"the run's command did not finish: {failure}" + (f"; console: {tail}" if tail else ""),
            session_id=self.run_id,
        )

    def errors(self) -> str:
        """Return the end of the command's standard error (at most RUN_ERRORS_MAX bytes)."""
        return self._stderr.decode("utf-8", "replace")

    def stop(self) -> None:
        """Close the connection (the relay then kills the command); :meth:`wait` raises."""
        if not self._done.is_set():
            self._end("the run was stopped before its command ended")
        self._receiving.cancel()

    async def _receive(self) -> None:
        try:
            while self._frames.status is None:  # the relay closes after the status
                await self._room.wait()
                data = await self._reader.read(_CHUNK)
                if not data:
                    self._frames.receive_eof()  # raises: no status came
                self._frames.receive_data(data)
                self._take()
        except RemoteProtocolError as exc:
            self._take()  # the whole frames before the bad one
            self._end(exc.message)
        except OSError as exc:
            self._end(f"the connection to the guest's relay failed ({exc})")
        else:
            self._end(None)

    def _take(self) -> None:
        for event in self._frames.events_received():
            if isinstance(event, Output):
                self._stdout += event.data
                self._more.set()
                if len(self._stdout) >= BUFFER_MAX:
                    self._room.clear()
            elif isinstance(event, Errors):
                self._stderr += event.data
                del self._stderr[:-RUN_ERRORS_MAX]

    def _end(self, failure: str | None) -> None:
        if self._done.is_set():
            return
        self._failure = failure
        with contextlib.suppress(OSError):
            self._writer.close()
        self._done.set()
        self._more.set()
