"""The cluster driver: the Driver seam delegated to Ray (``driver = "cluster"``).

Each session is a detached named actor (:mod:`remotecli.cluster.placement`) on a host that
joined with the controller's ``cluster_host_driver`` (``local`` or ``qemu``); it runs that host's
own driver and exposes the session's VNC server on its host's address behind a channel
secret (:mod:`remotecli.cluster.channel`); :meth:`ClusterDriver.start` returns that channel as
the session's :class:`VncEndpoint`, which the bridge dials. A headless run is
placed the same way and its output read over its channel (:mod:`remotecli.cluster.run`).
Ray's client API blocks, so every call to it runs in a worker thread; a run's stream and a
session's wait hold none. Verbs that need the session's files or sockets on its host are served
over the same channel by verb: the text view (``tty``: the bridge dials the channel itself,
:meth:`ClusterDriver.tty_endpoint`), a session's loopback (``loopback``: the sign-in callback
relay) and its kept files (``get``). Hibernation is refused, with a :class:`DriverError`
naming why.

The hosts (:meth:`ClusterDriver.hosts`, for ``/readyz`` and ``/metrics``) are read from Ray
by a background task every :data:`HOSTS_REFRESH` seconds, in a worker thread; the answer is
that last snapshot, so a slow or unreachable head never holds up ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from remotecli.cluster import channel, placement, watch
from remotecli.cluster.host import use_token
from remotecli.cluster.hosts import summarise_hosts
from remotecli.cluster.placement import Placement
from remotecli.cluster.run import ClusterRun, open_run
from remotecli.drivers.base import (
    HostStatus,
    ProgressCallback,
    RunOutput,
    SessionSpec,
    TtyEndpoint,
    VncEndpoint,
)
from remotecli.exceptions import ClusterError, DriverError, RemoteCliError
from remotecli.logs import get_logger
from remotecli.providers import HostPrograms
from remotecli.sandbox.cgroups import Limits

log = get_logger("cluster.driver")

COLLECT_TIMEOUT = 10.0
"""How long reading a session's kept files back from its host may take."""
LOOPBACK_TIMEOUT = 10.0
"""How long opening a connection on a session's loopback, on its host, may take."""
NOT_YET = 'is not done for the cluster driver yet (docs/cluster.md, "Not done yet")'

HOSTS_REFRESH = 2.0
"""Seconds between two reads of the cluster's hosts (the snapshot ``/readyz`` shows)."""


def read_hosts(placements: Sequence[Placement]) -> list[HostStatus]:
    """Read Ray's node table and free slots now and summarise them per host (blocks)."""
    return summarise_hosts(placement.node_table(), placement.available_per_node(), placements)


class ClusterDriver:
    """Places sessions on the cluster's hosts; one instance per controller."""

    name = "cluster"
    can_adopt = True  # any controller finds a session's detached actor by name

    def __init__(
        self,
        address: str,
        token_file: Path,
        *,
        channel_tls: bool = True,
        limits: Limits | None = None,
        host_driver: str = "local",
        egress: str = "none",
        qemu_memory_mib: int | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        """``channel_tls``: serve each session's channel with TLS, its certificate pinned.
        ``limits``: what each session (and run) may use on its host (the controller's
        ``session_*`` settings; None: the local driver's defaults). ``host_driver``: what the
        hosts run sessions with (``local`` or ``qemu``; only hosts that joined with it take
        them), with ``egress`` (``open`` or ``none``) and, for microVMs, ``qemu_memory_mib``
        (None: the qemu driver's default). ``tls_dir``: this controller's certificate for
        Ray's TLS (:mod:`remotecli.cluster.ray_tls`), when the cluster encrypts its traffic."""
        self.address = address
        self.token_file = token_file
        self.channel_tls = channel_tls
        self.limits = limits
        self.host_driver = host_driver
        self.egress = egress
        self.qemu_memory_mib = qemu_memory_mib
        self.tls_dir = tls_dir
        self._programs = HostPrograms()
        self._placements: dict[str, Placement] = {}
        self._runs: dict[str, ClusterRun] = {}
        self._connected = False
        self._lock = asyncio.Lock()
        self._table_lock = asyncio.Lock()
        self._table: list[dict[str, Any]] = []
        self._table_at = float("-inf")
        self._hosts: tuple[HostStatus, ...] = ()
        self._hosts_read_at: float | None = None
        self._hosts_task: asyncio.Task[None] | None = None

    async def _connect(self) -> None:
        async with self._lock:
            if not self._connected:
                use_token(self.token_file, self.tls_dir)
                await asyncio.to_thread(placement.connect, self.address)
                self._connected = True

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Answer from this host's programs: every host runs the same install (docs/cluster.md)."""
        return self._programs.can_run(command)

    def preparing(self, command: Sequence[str]) -> str | None:
        """Nothing is prepared ahead."""
        return None

    def isolation(self) -> Mapping[str, object]:
        """Say where sessions run, for ``/readyz``, and how old the hosts' snapshot is."""
        read_at = self._hosts_read_at
        return {
            "sessions": f"on the Ray cluster at {self.address}, on hosts with driver "
            f"{self.host_driver} (egress {self.egress})",
            "hosts_age_s": None if read_at is None else round(time.monotonic() - read_at, 1),
        }

    def hosts(self) -> Sequence[HostStatus]:
        """Return the hosts as last read from Ray (empty until the first read); never blocks."""
        return self._hosts

    async def refresh_hosts(self) -> None:
        """Read the hosts from Ray now (in a worker thread) and keep them for :meth:`hosts`."""
        await self._connect()
        placed = list(self._placements.values())  # copied here: the thread must not see it change
        self._hosts = tuple(await asyncio.to_thread(read_hosts, placed))
        self._hosts_read_at = time.monotonic()

    async def _refresh_hosts_forever(self) -> None:
        while True:
            try:
                await self.refresh_hosts()
            except RemoteCliError as exc:  # the last snapshot stays; its age says how old
                log.warning("reading the cluster's hosts failed", error=exc.message)
            except Exception:  # a Ray surprise must not end the refresh
                log.exception("reading the cluster's hosts crashed")
            await asyncio.sleep(HOSTS_REFRESH)

    def _host_settings(self) -> dict[str, Any]:
        """How the host's driver is made, as the actor takes it (:func:`~remotecli.cluster.
        actor.host_driver`; plain values: they are no secret)."""
        return {
            "driver": self.host_driver,
            "limits": None if self.limits is None else dataclasses.asdict(self.limits),
            "egress": self.egress,
            "qemu_memory_mib": self.qemu_memory_mib,
        }

    async def _place(
        self, spec: SessionSpec, progress: ProgressCallback, *, run: bool = False
    ) -> Placement:
        """Place a session (or with ``run`` a headless run) with Ray, its spec as the actor's
        ``start`` takes it and its kept files over its channel; keep and say where.

        Raises :class:`DriverError` with the cluster's reason when it could not be placed.
        """
        await self._connect()
        payload = {
            "provider": spec.provider,
            "command": list(spec.command),
            "env": dict(spec.env),
            "width": spec.width,
            "height": spec.height,
            "keeps_signin": spec.keeps_signin,
            "run": run,
            "host": self._host_settings(),
        }
        try:
            placed = await asyncio.to_thread(
                placement.place_session,
                spec.session_id,
                payload,
                files=dict(spec.home_files),
                tls=self.channel_tls,
                host_driver=self.host_driver,
            )
        except ClusterError as exc:
            raise DriverError(exc.message, session_id=spec.session_id) from exc
        self._placements[spec.session_id] = placed
        progress(f"placed on host {placed.host} ({placed.node_ip})")
        return placed

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Place the session with Ray; return its channel once the host's Xvnc showed a banner."""
        placed = await self._place(spec, progress)
        return placed.endpoint()

    async def wait(self, session_id: str) -> str:
        """Return when the session ends: "host HOST lost" for a dead host, else the reason."""
        placed = self._placements.get(session_id)
        if placed is None:
            return f"session {session_id} is not running in this driver"
        try:
            return await watch.await_session(placed, self._node_table)
        except ValueError:  # its actor is gone (stopped)
            return "stopped"

    async def _node_table(self, fresh: bool) -> list[dict[str, Any]]:
        """Ray's node table, read at most once per :data:`watch.POLL` for every waiting session
        unless ``fresh`` (a read is a short blocking call, in a worker thread; a wait holds
        none)."""
        async with self._table_lock:
            now = asyncio.get_running_loop().time()
            if fresh or now - self._table_at >= watch.POLL:
                self._table = await asyncio.to_thread(placement.node_table)
                self._table_at = asyncio.get_running_loop().time()
            return self._table

    async def stop(self, session_id: str) -> None:
        """End the session's (or run's) actor (the host's driver removes its processes);
        idempotent."""
        self._placements.pop(session_id, None)
        run = self._runs.pop(session_id, None)
        if run is not None:
            run.stop()
        try:
            await self._connect()  # one another controller placed (taken over) has an actor too
        except ClusterError as exc:  # no cluster: nothing of it can be ended from here
            log.warning("cannot end a session's actor", session_id=session_id, error=exc.message)
            return
        await asyncio.to_thread(placement.end_session, session_id)

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        """Find the session's detached actor again by name; None when it is gone."""
        await self._connect()
        placed = await asyncio.to_thread(placement.find_session, session_id)
        if placed is None:
            return None
        self._placements[session_id] = placed
        return placed.endpoint()

    async def close(self) -> None:
        """Stop every session this driver placed, and the hosts' refresh."""
        if self._hosts_task is not None:
            self._hosts_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hosts_task
            self._hosts_task = None
        await asyncio.gather(*(self.stop(sid) for sid in list(self._placements)))

    async def prepare(self) -> None:
        """Start reading the hosts in the background (it joins the cluster); return at once."""
        if self._hosts_task is None:
            self._hosts_task = asyncio.create_task(
                self._refresh_hosts_forever(), name="cluster-hosts"
            )

    def detach(self, session_id: str) -> bool:
        """Let go: the actor is detached and outlives this controller; :meth:`recover` finds it."""
        return self._placements.pop(session_id, None) is not None

    async def hibernate(self, session_id: str) -> bool:
        """Refuse: the host's local driver cannot hibernate."""
        return False

    async def resume(
        self, session_id: str, workdir: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        raise DriverError(f"resuming {NOT_YET}", session_id=session_id)

    async def recover_hibernated(self, session_id: str, workdir: Path) -> bool:
        return False

    async def start_run(self, spec: SessionSpec, progress: ProgressCallback) -> RunOutput:
        """Place the run as a session (one slot, the kept sign-in ``put`` over its channel), start
        it headless with the host's local driver, and return its output read over the channel.

        The run's actor and its HOME stay until :meth:`stop` (:meth:`collect` reads the sign-in
        back after the command ended). Raises :class:`DriverError` naming what failed; nothing
        is left running then.
        """
        placed = await self._place(spec, progress, run=True)
        try:
            reader, writer = await open_run(placed, within=COLLECT_TIMEOUT)
        except BaseException:  # a failed or cancelled start leaves nothing running
            await asyncio.shield(self.stop(spec.session_id))
            raise
        run = ClusterRun(placed, reader, writer, self._node_table)
        self._runs[spec.session_id] = run
        return run

    async def collect(self, session_id: str, paths: Sequence[str]) -> dict[str, bytes]:
        """Read the kept files from the session's HOME on its host, over its channel."""
        placed = self._placements.get(session_id)
        if placed is None or not paths:
            return {}
        try:
            return await asyncio.to_thread(
                placement.read_back, placed, paths, timeout=COLLECT_TIMEOUT
            )
        except ClusterError as exc:
            raise DriverError(exc.message, session_id=session_id) from exc

    async def _placed(self, session_id: str) -> Placement:
        """Where the session runs: this controller's placement, else its actor's (a session
        another controller on the same store placed); DriverError when it has none."""
        placed = self._placements.get(session_id)
        if placed is None:
            await self._connect()
            placed = await asyncio.to_thread(placement.find_session, session_id)
        if placed is None or placed.channel_secret is None:
            raise DriverError(
                f"session {session_id} is not running on the cluster", session_id=session_id
            )
        return placed

    async def tty_endpoint(self, session_id: str) -> TtyEndpoint:
        """Return the session's channel for the verb ``tty``: the bridge dials it and writes the
        secret first; the host relays to the session's terminal."""
        placed = await self._placed(session_id)
        return TtyEndpoint(
            host=placed.node_ip,
            port=placed.port,
            channel_secret=placed.channel_secret,
            channel_cert=placed.channel_cert,
        )

    async def connect_loopback(
        self, session_id: str, port: int, *, address: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``address``:``port`` on the session's own loopback, on its host, over its
        channel (``loopback``); return once the host's driver connected.

        Raises what the host's driver raised (UpstreamRefused when nothing listens), or
        DriverError when the channel cannot be reached or the address is not a loopback one.
        """
        if address not in channel.LOOPBACK_ADDRESSES or not 0 < port < 65536:
            raise DriverError(f"{address}:{port} is not on a session's loopback")
        placed = await self._placed(session_id)
        assert placed.channel_secret is not None
        try:
            return await channel.open_loopback(
                placed.node_ip,
                placed.port,
                placed.channel_secret,
                address,
                port,
                timeout=LOOPBACK_TIMEOUT,
                cert=placed.channel_cert,
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise DriverError(
                f"session {session_id}'s channel on host {placed.host} "
                f"({placed.node_ip}:{placed.port}) did not open its loopback: "
                f"{str(exc) or type(exc).__name__}",
                session_id=session_id,
            ) from exc
