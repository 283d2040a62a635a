"""The session actor: one detached, named Ray actor per session, on the host Ray picked.

It holds one session slot (:data:`remotecli.cluster.nodes.SLOT_RESOURCE`) for as long as it
lives and reports where the session's stream can be reached. Given a session's spec, its
payload runs with the host's own driver (:func:`host_driver`: the
:class:`~remotecli.drivers.local.LocalDriver`, Xvnc + tmux + xterm under bubblewrap, or on a
host that joined with ``--driver qemu`` the :class:`~remotecli.drivers.qemu.QemuDriver`, a
microVM clone), its VNC server exposed on the node's address by a
:class:`~remotecli.cluster.channel.SessionChannel` behind a secret the actor makes. Without a
spec (the foundation's tests and bench) the payload is a stand-in that speaks only the RFB
banner, like ``tests/banner_driver.py``.

The channel secret is made here and returned by :meth:`SessionActor.start` (and
:meth:`SessionActor.start_report`) to the caller, never passed to the actor's constructor:
Ray keeps an actor's creation arguments in its GCS for restarts, a method's result only goes
back to the caller that asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ray

from remotecli.cluster.channel import SessionChannel, new_secret
from remotecli.cluster.channel_tls import new_identity, server_context
from remotecli.cluster.sweep import SESSION_NAME, sweep_leftovers

BANNER = b"RFB 003.008\n"
ACTOR_PREFIX = "remotecli-session-"
"""A session's (or run's) actor is named this prefix and its id (:mod:`.placement`)."""
HOST_NAME_VARIABLE = "REMOTECLI_HOST_NAME"
"""Set on a host's ``ray start`` (``remotecli cluster join --name``); else its hostname."""
DATA_DIR_VARIABLE = "REMOTECLI_HOST_DATA_DIR"
"""Set on a host's ``ray start``: where its sessions' directories go (kept short: the VNC
socket's path must fit a Unix socket address)."""
DEFAULT_DATA_DIR = "/var/lib/remotecli/cluster"
IMAGE_CACHE_VARIABLE = "REMOTECLI_HOST_IMAGE_CACHE"
"""Set on a microVM host's ``ray start`` (``cluster join --driver qemu``): where its guest
images are; its templates are kept beside them. Else ``~/.cache/remotecli/images`` of the
user Ray's workers run as."""

HOST_DRIVERS = ("local", "qemu")
"""What a host can run its sessions with: its local sandbox, or microVMs (``join --driver``)."""

QEMU_MEMORY_MIB = (64, 65536)
"""The memory a host gives a microVM when a controller asks, in MiB (bounds, inclusive)."""

_driver: Any = None
"""The host's one driver in this Ray worker process (one actor per worker process)."""


def host_data_dir() -> Path:
    """Where this host keeps its sessions' directories (:data:`DATA_DIR_VARIABLE`)."""
    return Path(os.environ.get(DATA_DIR_VARIABLE) or DEFAULT_DATA_DIR)


def host_driver(settings: Mapping[str, Any] | None = None) -> Any:
    """Return this worker's driver, made on first use from the controller's ``settings``.

    ``settings`` (all optional): ``driver``, one of :data:`HOST_DRIVERS` (default ``local``);
    ``limits``, a :class:`~remotecli.sandbox.cgroups.Limits` as a dict (the controller's
    ``session_memory``, ``session_processes``, ``session_cpus``, ``session_home_size``, for the
    local sandbox); ``egress`` (``open`` or ``none``, default ``none``: the host's driver
    installs its own egress filter for ``open``); ``qemu_memory_mib``, a microVM's memory.
    They are taken when the driver is made: a worker process runs one actor, so one session.
    A microVM host finds its guest image and templates where ``remotecli image build`` put
    them on that host.
    """
    global _driver
    if _driver is None:
        settings = settings or {}
        data_dir = host_data_dir()
        kind = settings.get("driver") or "local"
        egress = str(settings.get("egress") or "none")
        if kind == "qemu":
            from remotecli.drivers.qemu import QemuDriver
            from remotecli.drivers.qemu_machine import DEFAULT_MEMORY_MIB

            memory = int(settings.get("qemu_memory_mib") or DEFAULT_MEMORY_MIB)
            if not QEMU_MEMORY_MIB[0] <= memory <= QEMU_MEMORY_MIB[1]:
                raise ValueError(f"a microVM of {memory} MiB is outside {QEMU_MEMORY_MIB} MiB")
            images = os.environ.get(IMAGE_CACHE_VARIABLE)
            _driver = QemuDriver(
                data_dir,
                image_cache=Path(images) if images else None,
                memory_mib=memory,
                egress=egress,
            )
        elif kind == "local":
            from remotecli.drivers.local import LocalDriver
            from remotecli.sandbox.cgroups import Limits

            limits = settings.get("limits")
            _driver = LocalDriver(
                data_dir, limits=Limits(**limits) if limits else None, egress=egress
            )
        else:
            raise ValueError(f"host driver {kind!r} is unknown; choose one of {HOST_DRIVERS}")
    return _driver


class SessionActor:
    """Runs one session on this node; every method is async, on the actor's one event loop."""

    def __init__(self, session_id: str) -> None:
        if not SESSION_NAME.fullmatch(session_id):  # it names the session's directory
            raise ValueError(f"{session_id!r} is not a session's or run's id")
        self.session_id = session_id
        self._server: asyncio.Server | None = None
        self._channel: SessionChannel | None = None
        self._local = False
        self._ended: asyncio.Event | None = None
        self._report: dict[str, Any] = {}
        self._sweep: asyncio.Task[list[str]] | None = None

    async def open(self, tls: bool = True) -> dict[str, Any]:
        """Open the session's channel on the node's address (Ray placed the actor: a slot is
        held) and return where it is: host, node id and IP, channel port, secret and, with
        ``tls``, the channel's certificate (``channel_cert``, PEM) for the controller to pin.

        With ``tls`` the channel is served with a key pair made here for this session; the
        private key stays in this process. The controller then ``put``s the session's kept
        files over the channel (never as an argument Ray would keep) and calls :meth:`start`.
        """
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        secret = new_secret()
        extra: dict[str, Any] = {"channel_secret": secret}
        context = None
        if tls:
            cert, key = new_identity(f"remotecli-session-{self.session_id}")
            context = server_context(cert, key)
            extra["channel_cert"] = cert
        self._channel = SessionChannel(
            secret, None, self._collect, tty=self._tty_path, loopback=self._connect_loopback
        )
        port = await self._channel.listen(node_ip, tls=context)
        self._report = self._where(node_ip, port, extra)
        return self._report

    async def start(self, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """Start the payload and return where it is (as :meth:`open`), for a real session with
        the seconds the host's local driver took and the sandbox's posture.

        ``spec``: ``provider``, ``command``, ``env``, ``width``, ``height``, ``keeps_signin``
        of a :class:`~remotecli.drivers.base.SessionSpec`; its kept files are those a ``put``
        brought over the channel. With ``"run": True`` the command runs headless instead
        (:meth:`LocalDriver.start_run`): its output is the channel's ``run`` verb. Raises the
        local driver's :class:`~remotecli.exceptions.DriverError` when it cannot start.
        """
        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self._ended = asyncio.Event()
        if spec is None:
            self._server = await asyncio.start_server(_serve_banner, node_ip, 0)
            self._report = self._where(node_ip, self._server.sockets[0].getsockname()[1], {})
        elif spec.get("run"):
            if self._channel is None:
                await self.open()
            self._report = {**self._report, **await self._start_run(spec)}
        else:
            if self._channel is None:
                await self.open()
            self._report = {**self._report, **await self._start_local(spec)}
        return self._report

    def _where(self, node_ip: str, port: int, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            **extra,
            "session_id": self.session_id,
            "host": os.environ.get(HOST_NAME_VARIABLE) or socket.gethostname(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": node_ip,
            "port": port,
            "pid": os.getpid(),
        }

    def _session_spec(self, spec: dict[str, Any]) -> tuple[Any, Any]:
        """The host's driver (made with the spec's limits) and the local SessionSpec of this
        session or run: its workdir under the host's data dir, the kept files ``put`` brought."""
        from remotecli.drivers.base import SessionSpec

        assert self._channel is not None
        driver = host_driver(spec.get("host"))
        workdir = host_data_dir() / "s" / self.session_id
        workdir.parent.mkdir(parents=True, exist_ok=True)
        if self._sweep is None:  # in the background: the session does not wait for it
            self._sweep = asyncio.get_running_loop().create_task(self._sweep_host(driver))
        return driver, SessionSpec(
            session_id=self.session_id,
            provider=str(spec["provider"]),
            command=tuple(spec["command"]),
            workdir=workdir,
            env=dict(spec.get("env") or {}),
            width=int(spec.get("width", 1280)),
            height=int(spec.get("height", 720)),
            home_files=self._channel.take_files(),
            keeps_signin=bool(spec.get("keeps_signin", False)),
        )

    async def _start_local(self, spec: dict[str, Any]) -> dict[str, Any]:
        assert self._channel is not None
        driver, session = self._session_spec(spec)
        began = asyncio.get_running_loop().time()
        endpoint = await driver.start(session, lambda step: None)
        seconds = asyncio.get_running_loop().time() - began
        self._local = True
        if endpoint.unix_path is not None:
            self._channel.vnc_path = endpoint.unix_path
        else:  # a microVM's VNC on this host's loopback, behind its VNC password
            self._channel.vnc_path = (str(endpoint.host), int(endpoint.port))
        report: dict[str, Any] = {"local_seconds": seconds, "driver": driver.name}
        if endpoint.password is not None:
            report["vnc_password"] = endpoint.password
        if hasattr(driver, "posture"):
            posture = driver.posture()
            report["sandbox"] = f"{posture.sandbox}; uids: {posture.uids}; limits: {posture.limits}"
            report["limits"] = {
                "memory": posture.memory,
                "processes": posture.processes,
                "cpu": posture.cpu,
            }
        else:
            report["sandbox"] = json.dumps(driver.isolation(), sort_keys=True)
        report["network"] = driver.egress
        return report

    async def _start_run(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Start a headless run with the host's local driver; the channel streams its output.

        Its sandbox, HOME included, stays until :meth:`stop`: the controller reads the kept
        sign-in back (``get``) after the command ended.
        """
        assert self._channel is not None
        driver, run = self._session_spec(spec)
        began = asyncio.get_running_loop().time()
        self._channel.run = await driver.start_run(run, lambda step: None)
        self._local = True
        return {"local_seconds": asyncio.get_running_loop().time() - began, "run": True}

    async def _sweep_host(self, driver: Any) -> list[str]:
        """End what sessions of this host's lost actors left (:mod:`.sweep`); the ids swept."""
        try:
            live = await asyncio.to_thread(_live_session_ids)
            return await sweep_leftovers(driver, host_data_dir(), {*live, self.session_id})
        except Exception:  # a sweep's trouble must not touch the session
            return []

    async def swept(self) -> list[str]:
        """The ids of other sessions' leftovers this actor's sweep removed (after it ran)."""
        return await asyncio.shield(self._sweep) if self._sweep is not None else []

    async def _collect(self, paths: Sequence[str]) -> Mapping[str, bytes]:
        if not self._local:
            return {}
        files: Mapping[str, bytes] = await host_driver().collect(self.session_id, paths)
        return files

    async def _tty_path(self) -> str:
        """The channel's ``tty``: the session's text terminal socket, from the host's driver."""
        path: str = await host_driver().tty_socket(self.session_id)
        return path

    async def _connect_loopback(
        self, port: int, address: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The channel's ``loopback``: the host's driver connects in the session's namespace."""
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter]
        streams = await host_driver().connect_loopback(self.session_id, port, address=address)
        return streams

    async def start_report(self) -> dict[str, Any]:
        """Return what :meth:`start` returned (a restarted controller asks again)."""
        return self._report

    async def wait(self) -> str:
        """Return, with the reason, once the session ends by itself or is stopped."""
        if self._ended is None:
            return "not started"
        if not self._local:
            await self._ended.wait()
            return "stopped"
        ended = asyncio.ensure_future(self._ended.wait())
        died = asyncio.ensure_future(host_driver().wait(self.session_id))
        done, pending = await asyncio.wait({ended, died}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return "stopped" if ended in done else str(died.result())

    async def refused(self) -> int:
        """How many connections the channel refused (a wrong or missing secret)."""
        return self._channel.refused if self._channel is not None else 0

    async def stop(self) -> None:
        """End the payload; idempotent. The controller then kills the actor (its slot frees)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._local:
            await host_driver().stop(self.session_id)
            self._local = False
        if self._ended is not None:
            self._ended.set()


def _live_session_ids() -> set[str]:
    """The ids of every session and run whose actor is alive in the cluster now (blocks)."""
    named: list[dict[str, str]] = ray.util.list_named_actors(all_namespaces=True)
    return {
        entry["name"].removeprefix(ACTOR_PREFIX)
        for entry in named
        if entry["name"].startswith(ACTOR_PREFIX)
    }


async def _serve_banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(BANNER)
    try:
        await writer.drain()
        await reader.read()
    except ConnectionError:
        pass
    finally:
        writer.close()
