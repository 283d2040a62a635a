"""A headless run's command read from a connection of run frames: the RunOutput both remote
kinds of run share.

A microVM's relay (:mod:`remotecli.drivers.qemu_run`) and a cluster host's session channel
(:mod:`remotecli.cluster.run`) both write a run's output as the frames of
:mod:`remotecli.drivers.qemu_runframes`. :class:`FramedRun` reads them in a task of its own:
standard output is kept for :meth:`FramedRun.read` (at most :data:`BUFFER_MAX` unread bytes:
past that the connection is not read, so the far end stops reading the command's pipe and the
command waits, as on a full pipe), the end of standard error for :meth:`FramedRun.errors`, the
exit status for :meth:`FramedRun.wait`. A subclass names its far end in the failures (a stream
that ended early, broke the framing, or lost its connection) and says what a run that ended
without its status means (:meth:`FramedRun._failed`, :meth:`FramedRun._no_status`).
"""

from __future__ import annotations

import asyncio
import contextlib

from remotecli.drivers.base import RUN_ERRORS_MAX
from remotecli.drivers.qemu_runframes import Errors, Output, RunFrames
from remotecli.exceptions import DriverError, RemoteProtocolError

BUFFER_MAX = 1 << 20
"""Unread standard output kept here before the far end's stream is no longer read."""
_CHUNK = 65536


class FramedRun:
    """The command of one headless run whose frames arrive on ``reader`` (a
    :class:`~remotecli.drivers.base.RunOutput`); ``name`` is the run's id.

    Read :meth:`read` until it returns b"": a command whose output nobody reads stops once
    :data:`BUFFER_MAX` bytes wait here and the connection's buffers are full.
    """

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.name = name
        self._reader = reader
        self._writer = writer
        self._frames = RunFrames()
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._more = asyncio.Event()
        """Set when standard output grew or the stream ended."""
        self._room = asyncio.Event()
        self._room.set()
        self._done = asyncio.Event()
        self._failure: str | None = None
        self._tasks = [asyncio.get_running_loop().create_task(self._receive(), name=f"run-{name}")]

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
        """Return the command's exit status once it ended; raise :class:`DriverError` with the
        cause (:meth:`_no_status`) when the run ended without one."""
        await self._done.wait()
        if self._frames.status is not None:
            return self._frames.status
        raise self._no_status(self._failure or "the run ended without its exit status")

    def errors(self) -> str:
        """Return the end of the command's standard error (at most RUN_ERRORS_MAX bytes)."""
        return self._stderr.decode("utf-8", "replace")

    def stop(self) -> None:
        """Close the connection (the far end then ends the command); :meth:`wait` raises if no
        status came."""
        if not self._done.is_set():
            self._end("the run was stopped before its command ended")
        for task in self._tasks:
            task.cancel()

    # --- what a subclass says ------------------------------------------------------------------

    def _ended_early(self) -> str:
        """The failure of a stream that closed before the exit status (the framing's word)."""
        try:
            self._frames.receive_eof()
        except RemoteProtocolError as exc:
            return exc.message
        return "the stream ended before the command's exit status"

    def _broken(self, message: str) -> str:
        """The failure of a stream whose far end broke the framing (``message`` says how)."""
        return message

    def _connection_failed(self, error: OSError) -> str:
        """The failure of a connection that failed."""
        return f"the connection failed ({error})"

    async def _failed(self, failure: str) -> None:
        """The stream ended without the exit status: end the run with ``failure``."""
        self._end(failure)

    def _no_status(self, failure: str) -> DriverError:
        """The error :meth:`wait` raises for a run that ended with ``failure``, no status."""
        return DriverError(failure, session_id=self.name)

    # --- the frames ------------------------------------------------------------------------------

    async def _receive(self) -> None:
        try:
            while self._frames.status is None:  # the far end closes after the status
                await self._room.wait()
                data = await self._reader.read(_CHUNK)
                if not data:
                    failure = self._ended_early()
                    break
                self._frames.receive_data(data)
                self._take()
            else:
                self._end(None)
                return
        except RemoteProtocolError as exc:
            self._take()  # the whole frames before the bad one
            failure = self._broken(exc.message)
        except OSError as exc:
            failure = self._connection_failed(exc)
        await self._failed(failure)

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
        with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: its loop is closed
            self._writer.close()
        self._done.set()
        self._more.set()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
