"""A small, honest in-test driver: each "session" is a real TCP server that speaks an RFB banner.

It lets the controller's tests run the whole lifecycle (start, ready, crash, stop, recover)
over real sockets without a display. What it leaves out, on purpose: no Xvfb, no terminal, no
provider command, no sandbox, no child processes, no VNC beyond the 12-byte ``RFB 003.008``
banner, HOME is the ``kept`` dict a test fills (:meth:`BannerDriver.collect` returns it), and a
session's loopback is the host's (:meth:`BannerDriver.connect_loopback`: the test's own server
stands in for the CLI's). Nothing survives the test process (so ``recover`` only knows
sessions this very instance started), except what hibernation saves: with ``hibernatable`` set,
:meth:`BannerDriver.hibernate` closes the server and writes a marker file in the session's
directory, which any instance resumes from (a new server, a new port); no memory or screen is
saved, of course. The local driver's own tests and ``tests/e2e/`` cover those.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.base import (
    ProgressCallback,
    RunOutput,
    SessionSpec,
    TtyEndpoint,
    VncEndpoint,
)
from remotecli.exceptions import DriverError, UpstreamRefused
from remotecli.providers import HostPrograms

BANNER = b"RFB 003.008\n"
SAVED = "banner.hibernated"
"""The marker a hibernated banner session leaves in its directory."""


@dataclass
class _Sandbox:
    server: asyncio.Server
    endpoint: VncEndpoint
    ended: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BannerDriver:
    """Starts one banner server per session; tests can hold a start, fail it, or crash a session."""

    name = "banner"
    can_adopt = False  # recover() knows only this instance's sessions

    def __init__(self, *, fail_start: str | None = None) -> None:
        self.fail_start = fail_start
        self.gate: asyncio.Event | None = None  # set it to hold start() until the test releases it
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.specs: dict[str, SessionSpec] = {}
        self._sandboxes: dict[str, _Sandbox] = {}
        self.kept: dict[str, dict[str, bytes]] = {}  # session id → files "in its HOME"
        self.tty_paths: dict[str, str] = {}  # session id → a tty socket a test stands up
        self.hibernatable = False  # set it to let hibernate() save sessions
        self.hibernated: list[str] = []
        self.resumed: list[str] = []
        self.fail_resume: str | None = None  # set it to make resume() fail with this message
        self._asleep: dict[str, Path] = {}

    async def tty_endpoint(self, session_id: str) -> TtyEndpoint:
        """Return the session's text terminal: the Unix socket :meth:`tty_socket` names."""
        return TtyEndpoint(unix_path=await self.tty_socket(session_id))

    async def tty_socket(self, session_id: str) -> str:
        """Return the socket a test put in ``tty_paths`` for the session; else refuse."""
        path = self.tty_paths.get(session_id)
        if path is None:
            raise DriverError(f"session {session_id} has no text terminal in this test")
        return path

    async def collect(self, session_id: str, paths: Sequence[str]) -> dict[str, bytes]:
        """Return the files planted for the session (tests put them in ``kept``)."""
        return dict(self.kept.get(session_id, {}))

    async def connect_loopback(
        self, session_id: str, port: int, *, address: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``port`` on the host's loopback: a test stands up the session's server."""
        try:
            return await asyncio.open_connection(address, port)
        except ConnectionRefusedError as exc:  # as the local driver says it
            raise UpstreamRefused(f"{address}:{port} refused the connection") from exc

    def preparing(self, command: Sequence[str]) -> str | None:
        """Nothing is prepared ahead here."""
        return None

    def isolation(self) -> Mapping[str, object] | None:
        """Nothing to say about isolation here (see the Driver seam)."""
        return None

    def hosts(self) -> None:
        """Nothing: the stand-in's sessions run on this host."""

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Answer as the local driver does: the program must be on this host (never run here)."""
        return HostPrograms().can_run(command)

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Listen on 127.0.0.1:0, read our own banner back (ready = banner read), return it."""
        if self.fail_start is not None:
            raise DriverError(self.fail_start, session_id=spec.session_id)
        self.specs[spec.session_id] = spec
        server = await asyncio.start_server(self._serve_banner, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        progress(f"banner server on 127.0.0.1:{port}")
        try:
            if self.gate is not None:
                await self.gate.wait()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            banner = await reader.readexactly(len(BANNER))
            writer.close()
            await writer.wait_closed()
        except BaseException:
            server.close()
            raise
        if banner != BANNER:
            server.close()
            raise DriverError(f"unexpected banner {banner!r}")
        progress("VNC banner read")
        endpoint = VncEndpoint(host="127.0.0.1", port=port)
        self._sandboxes[spec.session_id] = _Sandbox(server, endpoint)
        self.started.append(spec.session_id)
        return endpoint

    async def start_run(self, spec: SessionSpec, progress: ProgressCallback) -> RunOutput:
        """Refuse: a banner server runs no command (headless runs are tested on the local
        driver, tests/test_runs_api.py)."""
        raise DriverError("the banner driver runs no command, so no headless run")

    async def wait(self, session_id: str) -> str:
        """Return the reason once the session was crashed or stopped."""
        sandbox = self._sandboxes.get(session_id)
        if sandbox is None:
            return "no such session"
        return await asyncio.shield(sandbox.ended)

    def crash(self, session_id: str, reason: str) -> None:
        """End a session as if its processes died by themselves."""
        sandbox = self._sandboxes.pop(session_id)
        sandbox.server.close()
        sandbox.ended.set_result(reason)

    async def stop(self, session_id: str) -> None:
        """Close the session's server, or remove its marker if hibernated; idempotent."""
        workdir = self._asleep.pop(session_id, None)
        if workdir is not None:
            (workdir / SAVED).unlink(missing_ok=True)
            self.stopped.append(session_id)
        sandbox = self._sandboxes.pop(session_id, None)
        if sandbox is None:
            return
        self.stopped.append(session_id)
        sandbox.server.close()
        await sandbox.server.wait_closed()
        if not sandbox.ended.done():
            sandbox.ended.set_result("stopped")

    async def hibernate(self, session_id: str) -> bool:
        """With ``hibernatable``: close the session's server and leave the marker file."""
        sandbox = self._sandboxes.get(session_id)
        spec = self.specs.get(session_id)
        if not self.hibernatable or sandbox is None or spec is None:
            return False
        spec.workdir.mkdir(parents=True, exist_ok=True)
        (spec.workdir / SAVED).write_text(session_id)
        del self._sandboxes[session_id]
        sandbox.server.close()
        await sandbox.server.wait_closed()
        if not sandbox.ended.done():
            sandbox.ended.set_result("hibernated")
        self._asleep[session_id] = spec.workdir
        self.hibernated.append(session_id)
        return True

    async def resume(
        self, session_id: str, workdir: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        """Serve the banner again on a new port; the marker is removed once it is read."""
        if self.fail_resume is not None:
            raise DriverError(self.fail_resume, session_id=session_id)
        if not (workdir / SAVED).is_file():
            raise DriverError(f"session {session_id} has no saved state", session_id=session_id)
        spec = SessionSpec(session_id, "shell", ("bash",), workdir)
        endpoint = await self.start(spec, progress)
        (workdir / SAVED).unlink()
        self._asleep.pop(session_id, None)
        self.resumed.append(session_id)
        return endpoint

    async def recover_hibernated(self, session_id: str, workdir: Path) -> bool:
        """True when the session's directory holds the marker (any instance left it)."""
        if not (workdir / SAVED).is_file():
            return False
        self._asleep[session_id] = workdir
        return True

    def asleep(self) -> list[str]:
        """Return the ids of sessions whose marker this instance holds."""
        return list(self._asleep)

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        """Return the endpoint if this instance still runs the session, else None."""
        sandbox = self._sandboxes.get(session_id)
        return None if sandbox is None else sandbox.endpoint

    async def close(self) -> None:
        """Stop every session."""
        for session_id in list(self._sandboxes):
            await self.stop(session_id)

    async def prepare(self) -> None:
        """Nothing to prepare."""

    def detach(self, session_id: str) -> bool:
        """Refuse: these sessions end with the controller."""
        return False

    def running(self) -> list[str]:
        """Return the ids of sessions whose server still listens."""
        return list(self._sandboxes)

    @staticmethod
    async def _serve_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        try:
            await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def banner_controller(data_dir: Path, **settings: Any) -> AsyncIterator[Controller]:
    """Run a whole controller on 127.0.0.1 port 0 whose sessions are banner-driver sessions.

    ``settings`` override other ControllerConfig fields (limits, allowed hosts, ...).
    """
    config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir, **settings)
    running = Controller(config, driver=BannerDriver())
    await running.start()
    try:
        yield running
    finally:
        await running.close()
