"""The driver seam: the few async methods every session driver implements.

A driver owns the processes of the sessions it started and nothing else. The provider
catalogue asks :meth:`Driver.can_run` whether a provider's program exists where sessions run.
The controller calls :meth:`Driver.start` once per session, watches :meth:`Driver.wait` to
learn when a sandbox dies on its own, and calls :meth:`Driver.stop` to end it. Every method is
safe to cancel: a cancelled ``start`` leaves no process behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

ProgressCallback = Callable[[str], None]
"""Receives short human-readable progress steps ("display :12 up", "VNC banner read")."""


@dataclass(frozen=True)
class VncEndpoint:
    """Where a session's VNC server listens.

    Exactly one of ``unix_path`` or ``host``/``port`` is set. A Unix socket is reachable only by
    the controller's user (directory mode 0700). A TCP endpoint is always on loopback and then
    carries the per-session VNC ``password`` (RFB security type 2) that the bridge answers for
    the viewer, so the browser never sees it. A TCP endpoint on another host (the cluster
    driver) carries instead a ``channel_secret`` that the bridge sends, with a newline, before
    any RFB byte (:mod:`remotecli.cluster.channel`), and, when that channel is served with TLS,
    its ``channel_cert`` (PEM, public), the only certificate the bridge accepts there.
    ``host_name`` names the machine a driver that places sessions on many hosts put the session
    on (the store records it); None when the session runs on the controller's own host.
    """

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None
    password: str | None = None
    channel_secret: str | None = field(default=None, repr=False)
    channel_cert: str | None = field(default=None, repr=False)
    host_name: str | None = None

    def describe(self) -> str:
        """Name the endpoint for logs and error messages (never the password)."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TtyEndpoint:
    """Where a session's text terminal (the tty protocol, :mod:`remotecli.tty`) listens.

    Exactly one of ``unix_path`` or ``host``/``port`` is set. A Unix socket is on the
    controller's host and reachable only by the controller's user. A TCP endpoint is a session
    channel on another host (the cluster driver): the bridge writes its ``channel_secret``
    with the verb ``tty`` (:func:`remotecli.cluster.channel.preamble`) before any record,
    inside TLS pinning ``channel_cert`` when the channel has one.
    """

    unix_path: str | None = None
    host: str | None = None
    port: int | None = None
    channel_secret: str | None = field(default=None, repr=False)
    channel_cert: str | None = field(default=None, repr=False)

    def describe(self) -> str:
        """Name the endpoint for logs and error messages (never the secret)."""
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HostStatus:
    """One host sessions can run on, as a driver last saw it (``/readyz``, ``/metrics``)."""

    name: str
    address: str
    """The host's IP address as the driver reaches it."""
    up: bool
    slots: int
    """How many sessions it offers in all."""
    slots_free: int
    """How many more it would take now (0 for a host that is down)."""
    sessions: tuple[str, ...]
    """The ids of this controller's sessions on it, sorted."""

    def to_json(self) -> dict[str, object]:
        """Return it as ``/readyz`` shows it."""
        return {
            "name": self.name,
            "address": self.address,
            "up": self.up,
            "slots": self.slots,
            "slots_free": self.slots_free,
            "sessions": list(self.sessions),
        }


@dataclass(frozen=True)
class SessionSpec:
    """What a driver needs to start one session."""

    session_id: str
    provider: str
    command: Sequence[str]
    """The argv the terminal runs (``["bash", "-l"]`` for the shell provider)."""
    workdir: Path
    """The session's own directory under the data dir; the driver creates what it needs in it."""
    env: Mapping[str, str] = field(default_factory=dict)
    width: int = 1280
    height: int = 720
    home_files: Mapping[str, bytes] = field(default_factory=dict)
    """Files to put in the session's HOME before its command starts (a kept sign-in):
    relative path → content, written mode 0600 and owned by the session's user."""
    keeps_signin: bool = False
    """The provider keeps a sign-in (it declares ``keep`` paths). Its CLI may read its sign-in
    and make its secrets (a sign-in's state, PKCE) when it starts, so it must start inside the
    session itself, after the session has its own entropy and ``home_files``; a driver that
    restores sessions from a saved machine (qemu) starts it again there."""
    open_url: Callable[[str], None] | None = None
    """Called, on the event loop, with each link the session asks a browser to open
    (``$BROWSER``, ``xdg-open``) once the driver has checked it is an ``http``/``https`` URL."""


RUN_ERRORS_MAX = 2048
"""Bytes of a headless run's standard error a driver keeps (its end), for the run's reason."""


class RunOutput(Protocol):
    """A headless run's command as a driver started it (:meth:`Driver.start_run`).

    Everything read here is written by the session's hostile user: bytes, never trusted.
    """

    async def read(self) -> bytes:
        """Return the next bytes the command wrote to its standard output; b"" once it is closed.

        Returns what is there as soon as there is some (never waits to fill a buffer), so the
        caller sees the output while the command still runs.
        """
        ...

    async def wait(self) -> int:
        """Return the command's exit status once it ended (128 + N when signal N killed it)."""
        ...

    def errors(self) -> str:
        """Return the end of what the command wrote to its standard error (at most
        :data:`RUN_ERRORS_MAX` bytes, decoded with replacement): the cause of a failed run."""
        ...


class Driver(Protocol):
    """Starts and stops session sandboxes. One instance per controller."""

    name: str
    can_adopt: bool
    """True when :meth:`recover` also finds sessions another controller's driver started (the
    cluster's actors, on hosts every controller reaches): only then may this controller take
    over a silent controller's sessions (docs/cluster.md). False when a session lives on its
    controller's own host (the local and qemu drivers)."""

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Return ``command`` as this driver will run it (its program resolved), or why it cannot.

        The reason names the cause and the next step, or is
        :data:`remotecli.providers.NOT_FOUND` when the provider's install hint is the next step.
        Called on every provider listing: it must be quick and must not block on the network.
        """
        ...

    def preparing(self, command: Sequence[str]) -> str | None:
        """Say, in words, what a first session running ``command`` would wait for now (the
        qemu driver's template for it, being prepared in the background), or None when it
        would start at once. Called on every provider listing: quick, no I/O."""
        ...

    def isolation(self) -> Mapping[str, object] | None:
        """Return what isolation and limits this driver enforces on this host, for ``/readyz``.

        JSON-ready; None when the driver has nothing to say. Must be quick.
        """
        ...

    def hosts(self) -> Sequence[HostStatus] | None:
        """Return the hosts sessions run on, as last seen, for ``/readyz`` and ``/metrics``.

        None for a driver that runs sessions on the controller's own host only. Must be quick
        and must not block (a driver that asks the network answers from a cached snapshot).
        """
        ...

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Start the session and return once an RFB banner was read from its VNC server.

        Raises :class:`remotecli.exceptions.DriverError` naming what failed and what to do.
        """
        ...

    async def start_run(self, spec: SessionSpec, progress: ProgressCallback) -> RunOutput:
        """Start ``spec.command`` headless in a fresh sandbox of its own (a headless run).

        The same isolation as a session's, without display or terminal: ``spec.home_files``
        are in HOME before the command starts, its standard input is empty, its standard
        output is :meth:`RunOutput.read`. ``spec.session_id`` names the run to the other
        verbs: :meth:`collect` reads its HOME (the sign-in to save back) and :meth:`stop`
        ends it (its processes killed, its files removed), as for a session.

        Raises :class:`remotecli.exceptions.DriverError` naming what failed; nothing is left
        running then.
        """
        ...

    async def wait(self, session_id: str) -> str:
        """Return when the session's sandbox ends by itself, with the reason in words."""
        ...

    async def stop(self, session_id: str) -> None:
        """Stop the session and remove every process it had. Idempotent."""
        ...

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        """After a controller restart: the endpoint if the session still runs, else clean up.

        Returns ``None`` when nothing of the session is alive; any leftover process is killed.
        """
        ...

    async def close(self) -> None:
        """Stop every session this driver started (controller shutdown)."""
        ...

    async def prepare(self) -> None:
        """Get ready on the controller's start, before any session; must return quickly.

        Slow checks (the qemu driver's accelerator probe) start here in the background, so
        that ``/readyz`` can report them and the first session does not wait for them.
        """
        ...

    def detach(self, session_id: str) -> bool:
        """Let go of a running session without stopping it, for the next controller's recover.

        Returns False, and changes nothing, when this driver cannot keep a session across a
        controller restart (the caller then stops it); ``docs/operations.md`` says which can.
        """
        ...

    async def hibernate(self, session_id: str) -> bool:
        """Save a running session whole (memory, devices) to its directory and end its processes.

        Returns False, and changes nothing, when this driver cannot hibernate (the local driver)
        or not now (too little disk). Once it returns True the session has no process and
        :meth:`resume` brings it back; :meth:`stop` removes what was saved. Raises
        :class:`remotecli.exceptions.DriverError` when saving failed; the session then still
        runs as before.
        """
        ...

    async def resume(
        self, session_id: str, workdir: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        """Start a hibernated session again from what :meth:`hibernate` saved in ``workdir``.

        Returns once an RFB banner was read from the new VNC server (a new endpoint and
        password). The saved state is removed only after that, so a resume that fails or is
        cancelled leaves the session hibernated, to be resumed or stopped later. Raises
        :class:`remotecli.exceptions.DriverError` naming what failed.
        """
        ...

    async def recover_hibernated(self, session_id: str, workdir: Path) -> bool:
        """After a controller restart: whether ``workdir`` holds a complete hibernated session.

        True makes the driver responsible for it again (:meth:`resume`, :meth:`stop`); False
        when nothing complete was saved (a save cut short is removed, never taken for whole).
        """
        ...

    async def collect(self, session_id: str, paths: Sequence[str]) -> dict[str, bytes]:
        """Read the files at ``paths`` (relative to HOME) from a running session's HOME.

        HOME is written by the session's hostile user: nothing outside it is ever read (no
        link followed), only regular files, size-capped. Returns {} for an unknown session.
        Must be called before :meth:`stop`, which removes HOME.
        """
        ...

    async def tty_endpoint(self, session_id: str) -> TtyEndpoint:
        """Return where the session's text terminal (the tty protocol) listens, once it is
        there; raise :class:`remotecli.exceptions.DriverError` when the session has none.

        On the controller's host a Unix socket reachable only by the controller's user; on
        another host a channel the bridge opens with its secret (:class:`TtyEndpoint`). What is
        read from it is the session's own (hostile) terminal output: relay it to the session's
        owner only. The protocol is described in ``docs/drivers.md`` and
        :mod:`remotecli.sandbox.tty_server`.
        """
        ...

    async def connect_loopback(
        self, session_id: str, port: int, *, address: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TCP connection to ``address``:``port`` on the session's own loopback.

        ``address`` is ``127.0.0.1`` or ``::1``; never the host's loopback or another session's.

        Raises :class:`remotecli.exceptions.UpstreamError` (nothing listens: refused) or
        :class:`remotecli.exceptions.DriverError` (the driver cannot reach a session's loopback).
        """
        ...
