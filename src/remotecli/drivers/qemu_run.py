"""A headless run's command in a microVM: the relay connection that carries it, as a RunOutput.

Theory of operation. The qemu driver starts a run as a clone of the provider's template whose
CLI waits (``remotecli-run --wait``) and is never told to start; it gives the clone its own
secrets, then :func:`open_run` sends the guest relay the run request (the command and the HOME
files, :mod:`remotecli.drivers.qemu_runframes`) through the VM's loopback forward. From the
relay's ``ok`` on, :class:`QemuRun` reads the frames in a task of its own: standard output is
kept for :meth:`QemuRun.read` (at most :data:`~remotecli.drivers.framed_run.BUFFER_MAX`
unread bytes: past that the socket
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
from collections.abc import Mapping, Sequence
from pathlib import Path

from remotecli.drivers.framed_run import FramedRun
from remotecli.drivers.qemu_guest import console_tail
from remotecli.drivers.qemu_runframes import parse_answer, run_request
from remotecli.exceptions import DriverError, LocalProtocolError


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


class QemuRun(FramedRun):
    """The command of one headless run in a microVM (a :class:`~remotecli.drivers.base.RunOutput`).

    Read :meth:`read` until it returns b"": a command whose output nobody reads stops once
    :data:`~remotecli.drivers.framed_run.BUFFER_MAX` bytes wait, and then never ends.
    """

    def __init__(
        self,
        run_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        console: Path,
    ) -> None:
        super().__init__(run_id, reader, writer)
        self._console = console

    def _connection_failed(self, error: OSError) -> str:
        return f"the connection to the guest's relay failed ({error})"

    def _no_status(self, failure: str) -> DriverError:
        """The VM died or was stopped, or the guest broke the frame protocol: the failure, and
        the end of the VM's console when there is one."""
        tail = console_tail(self._console)
        return DriverError(
            f"the run's command did not finish: {failure}" + (f"; console: {tail}" if tail else ""),
            session_id=self.name,
        )
