"""A headless run on a cluster host, as the controller reads it: a RunOutput over its channel.

Theory of operation. :meth:`ClusterDriver.start_run <remotecli.cluster.driver.ClusterDriver.
start_run>` places the run as it places a session (its own detached actor holding one slot,
the kept sign-in ``put`` over the channel) and the actor starts the host's
:meth:`LocalDriver.start_run <remotecli.drivers.local.LocalDriver.start_run>`. Then
:func:`open_run` connects to the run's channel with the verb ``run`` (an asyncio connection:
no thread is held while the run goes) and :class:`ClusterRun` reads its frames in a task, as
:class:`~remotecli.drivers.qemu_run.QemuRun` reads a microVM's: standard output kept for
:meth:`ClusterRun.read` (at most :data:`~remotecli.drivers.framed_run.BUFFER_MAX` unread
bytes: past that the socket is not
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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from remotecli.cluster.channel import preamble
from remotecli.cluster.channel_tls import client_context
from remotecli.cluster.placement import Placement
from remotecli.cluster.watch import LOST_BOUND, POLL, lost_reason, lost_sessions
from remotecli.drivers.framed_run import FramedRun
from remotecli.exceptions import DriverError
from remotecli.logs import get_logger

log = get_logger("cluster.run")

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


class ClusterRun(FramedRun):
    """The command of one headless run on a cluster host (a
    :class:`~remotecli.drivers.base.RunOutput`) read over its channel, its host watched.

    Read :meth:`read` until it returns b"": a command whose output nobody reads stops once
    :data:`~remotecli.drivers.framed_run.BUFFER_MAX` bytes wait here and the sockets' buffers
    are full.
    """

    def __init__(
        self,
        placed: Placement,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        nodes: Nodes,
    ) -> None:
        self.placed = placed
        self._nodes = nodes
        super().__init__(placed.session_id, reader, writer)
        self._tasks.append(
            asyncio.get_running_loop().create_task(self._watch(), name=f"run-{self.name}-host")
        )

    def _ended_early(self) -> str:
        return (
            f"the run's stream from host {self.placed.host} ended before the command's exit status"
        )

    def _broken(self, message: str) -> str:
        return f"the run's stream from host {self.placed.host} broke: {message}"

    def _connection_failed(self, error: OSError) -> str:
        return f"the connection to host {self.placed.host} failed ({error})"

    async def _failed(self, failure: str) -> None:
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
