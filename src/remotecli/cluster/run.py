"""A headless run on a cluster host, as the controller reads it: a RunOutput over its channel.

Theory of operation. :meth:`ClusterDriver.start_run <remotecli.cluster.driver.ClusterDriver.
start_run>` places the run as it places a session (its own detached actor holding one slot,
the kept sign-in ``put`` over the channel) and the actor starts the host's
:meth:`LocalDriver.start_run <remotecli.drivers.local.LocalDriver.start_run>`. Then
:func:`open_run` connects to the run's channel with the verb ``run`` (an asyncio connection:
no thread is held while the run goes) and :class:`ClusterRun` reads its frames in a task, as
:class:`~remotecli.drivers.qemu_run.QemuRun` reads a microVM's: standard output kept for
:meth:`ClusterRun.read` (at most :data:`BUFFER_MAX` unread bytes: past that the socket is not
read, and the host's command waits on its full pipe), the end of standard error for
:meth:`ClusterRun.errors`, the exit status for :meth:`ClusterRun.wait`.

A second task watches the host: every :data:`~remotecli.cluster.watch.POLL` it reads Ray's
node table through ``nodes`` (the driver's one shared read for every waiting session and
run), and once the table has the run's node dead the run ends ``"host HOST lost"``. A stream
that ends without its exit status is not yet a verdict (a host whose processes were killed
closes its sockets seconds before the GCS declares it dead): the node table is asked for up to
:data:`~remotecli.cluster.watch.LOST_BOUND`, and the run fails "host HOST lost" if the node is
declared dead in that time, else with the stream's own failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from remotecli.cluster.channel import preamble
from remotecli.cluster.channel_tls import client_context
from remotecli.cluster.placement import Placement
from remotecli.cluster.watch import LOST_BOUND, POLL, lost_reason, lost_sessions
from remotecli.drivers.base import RUN_ERRORS_MAX
from remotecli.drivers.qemu_runframes import Errors, Output, RunFrames
from remotecli.exceptions import DriverError, RemoteProtocolError
from remotecli.logs import get_logger

log = get_logger("cluster.run")

BUFFER_MAX = 1 << 20
"""Unread standard output kept on the controller before the host's stream is no longer read."""
_CHUNK = 65536

Nodes = Callable[[bool], Awaitable[Iterable[Mapping[str, Any]]]]
"""Ray's node table: ``nodes(fresh)``, as :func:`remotecli.cluster.watch.await_session` takes it."""


async def open_run(
    placed: Placement, *, within: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the run's channel with the verb ``run``; its frames follow.

    Raises :class:`DriverError` when the channel cannot be reached within ``within`` s.
    """
    assert placed.channel_secret is not None
    try:
        async with asyncio.timeout(within):
            tls = client_context(cert) if (cert := placed.channel_cert) else None
            reader, writer = await asyncio.open_connection(placed.node_ip, placed.port, ssl=tls)
            writer.write(preamble(placed.channel_secret, "run"))
            await writer.drain()
    except (OSError, TimeoutError) as exc:
        raise DriverError(
            f"the output of run {placed.session_id} on host {placed.host} "
            f"({placed.node_ip}:{placed.port}) could not be reached: {exc or type(exc).__name__}",
            session_id=placed.session_id,
        ) from exc
    return reader, writer


class ClusterRun:
    """The command of one headless run on a cluster host (a
    :class:`~remotecli.drivers.base.RunOutput`).

    Read :meth:`read` until it returns b"": a command whose output nobody reads stops once
    :data:`BUFFER_MAX` bytes wait here and the sockets' buffers are full.
    """

    def __init__(
        self,
        placed: Placement,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        nodes: Nodes,
    ) -> None:
        self.placed = placed
        self._reader = reader
        self._writer = writer
        self._nodes = nodes
        self._frames = RunFrames()
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._more = asyncio.Event()
        """Set when standard output grew or the stream ended."""
        self._room = asyncio.Event()
        self._room.set()
        self._done = asyncio.Event()
        self._failure: str | None = None
        loop = asyncio.get_running_loop()
        name = placed.session_id
        self._receiving = loop.create_task(self._receive(), name=f"run-{name}")
        self._watching = loop.create_task(self._watch(), name=f"run-{name}-host")

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

        Raises :class:`DriverError` with the cause when the run ended without one: "host HOST
        lost", the stream broken, or the run stopped.
        """
        await self._done.wait()
        if self._frames.status is not None:
            return self._frames.status
        raise DriverError(
            self._failure or "the run ended without its exit status",
            session_id=self.placed.session_id,
        )

    def errors(self) -> str:
        """Return the end of the command's standard error (at most RUN_ERRORS_MAX bytes)."""
        return self._stderr.decode("utf-8", "replace")

    def stop(self) -> None:
        """Close the connection and stop watching; :meth:`wait` raises if no status came."""
        if not self._done.is_set():
            self._end("the run was stopped before its command ended")
        self._receiving.cancel()
        self._watching.cancel()

    async def _receive(self) -> None:
        try:
            while self._frames.status is None:  # the channel closes after the status
                await self._room.wait()
                data = await self._reader.read(_CHUNK)
                if not data and self._frames.status is None:
                    failure = (
                        f"the run's stream from host {self.placed.host} ended before the "
                        "command's exit status"
                    )
                    break
                self._frames.receive_data(data)
                self._take()
            else:
                self._end(None)
                return
        except RemoteProtocolError as exc:  # the host's own code broke the framing
            self._take()
            failure = f"the run's stream from host {self.placed.host} broke: {exc.message}"
        except OSError as exc:
            failure = f"the connection to host {self.placed.host} failed ({exc})"
        await self._judge(failure)

    async def _judge(self, failure: str) -> None:
        """The stream ended without a status: "host HOST lost" if Ray says so within the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOST_BOUND
        while not self._done.is_set() and loop.time() < deadline:
            if await self._lost():
                failure = lost_reason(self.placed)
                break
            await asyncio.sleep(POLL)
        self._end(failure)

    async def _watch(self) -> None:
        while not self._done.is_set():
            await asyncio.sleep(POLL)
            if await self._lost():
                self._end(lost_reason(self.placed))

    async def _lost(self) -> bool:
        try:
            table = await self._nodes(False)
        except Exception as exc:  # a failed read of the table is no verdict
            log.warning("reading the node table failed", error=str(exc))
            return False
        return bool(lost_sessions({self.placed.session_id: self.placed}, table))

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
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()
        self._done.set()
        self._more.set()
        current = asyncio.current_task()
        for task in (self._receiving, self._watching):
            if task is not current:
                task.cancel()
