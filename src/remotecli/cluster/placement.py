"""The controller's side of the cluster: place a session with Ray, find it again, end it.

The controller is a Ray driver (:func:`connect`). Each session is a detached actor named
``remotecli-session-<id>`` in the ``remotecli`` namespace that asks for one session slot; Ray,
never our code, picks the host. A detached actor outlives the driver that made it, so a
restarted controller finds its sessions again by name (:func:`find_sessions`). Calls here block
(Ray's client API is synchronous); the controller runs them in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from remotecli.cluster import channel
from remotecli.cluster.actor import ACTOR_PREFIX as ACTOR_PREFIX
from remotecli.cluster.actor import SessionActor
from remotecli.cluster.nodes import DRIVER_LABEL, SLOT_RESOURCE
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ClusterError

NAMESPACE = "remotecli"
PLACE_TIMEOUT = 30.0
"""How long a session may wait for a slot on a host before placement fails."""
STOP_TIMEOUT = 10.0
"""How long a session's actor may take to end its payload before it is killed anyway."""
START_TIMEOUT = 300.0
"""How long the host's driver may take to start the session once placed: a microVM host makes
a provider's template the first time it runs it (minutes without KVM); the local sandbox and a
cloned microVM take about a second, and each driver bounds its own steps."""

_SessionActor: Any = ray.remote(SessionActor)  # Ray types actor classes loosely


@dataclass(frozen=True)
class Placement:
    """Where Ray put a session: the host's name, Ray's node id and IP, the stream's port, its
    channel secret (None for the stand-in payload), the channel's certificate (PEM; None
    when the channel is plain TCP) and, for a microVM, its VNC password (the bridge answers
    the VNC server's challenge with it, as for a microVM on the controller's own host)."""

    session_id: str
    host: str
    node_id: str
    node_ip: str
    port: int
    channel_secret: str | None = field(default=None, repr=False)
    local_seconds: float | None = None
    channel_cert: str | None = field(default=None, repr=False)
    vnc_password: str | None = field(default=None, repr=False)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> Placement:
        """Read what :meth:`SessionActor.start` returned."""
        return cls(
            str(report["session_id"]),
            str(report["host"]),
            str(report["node_id"]),
            str(report["node_ip"]),
            int(report["port"]),
            report.get("channel_secret"),
            report.get("local_seconds"),
            report.get("channel_cert"),
            report.get("vnc_password"),
        )

    def endpoint(self) -> VncEndpoint:
        """The session's stream: the channel on its host (the stand-in speaks only the banner)."""
        return VncEndpoint(
            host=self.node_ip,
            port=self.port,
            password=self.vnc_password,
            channel_secret=self.channel_secret,
            channel_cert=self.channel_cert,
            host_name=self.host,
        )


def connect(address: str) -> None:
    """Join the cluster at ``address`` (``HOST:6379``) as a driver in the remotecli namespace.

    The token comes from ``RAY_AUTH_TOKEN_PATH`` (see :func:`remotecli.cluster.nodes.
    ray_environment`); without the right one Ray refuses and this raises :class:`ClusterError`.
    """
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.ERROR)
    except Exception as exc:  # Ray raises ConnectionError, AuthenticationError, RuntimeError
        raise ClusterError(
            f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}; check that "
            "the head runs and RAY_AUTH_TOKEN_PATH names the cluster's token"
        ) from exc


def actor_name(session_id: str) -> str:
    """Return the Ray actor name of a session."""
    return f"{ACTOR_PREFIX}{session_id}"


def place_session(
    session_id: str,
    spec: Mapping[str, Any] | None = None,
    *,
    files: Mapping[str, bytes] | None = None,
    timeout: float = PLACE_TIMEOUT,
    start_timeout: float = START_TIMEOUT,
    tls: bool = True,
    host_driver: str = "local",
) -> Placement:
    """Create the session's actor, wait until Ray placed it and its payload runs; say where.

    ``spec`` (see :meth:`SessionActor.start`) runs a real session with the host's local driver;
    None runs the banner stand-in. For a real session the actor first opens its channel
    (:meth:`SessionActor.open`, once Ray found a slot), ``files`` (the kept sign-in, path
    relative to HOME → bytes) go over that channel, and only then does ``start(spec)`` run:
    neither the files nor the spec are constructor arguments, which Ray keeps for restarts.
    ``tls``: the channel is served with TLS and the session's certificate, which every client
    here pins (:mod:`remotecli.cluster.channel_tls`). ``host_driver``: only a host that joined
    with that driver (its :data:`~remotecli.cluster.nodes.DRIVER_LABEL`) takes the session.

    Raises :class:`ClusterError` when no such host had a free slot within ``timeout`` (the
    actor is then killed, so it does not take a slot later), the files could not be handed
    over, or the payload failed to start (within ``start_timeout``).
    """
    if spec is not None and "home_files" in spec:
        raise ValueError("kept files go over the session's channel (files=), never in its spec")
    actor = _SessionActor.options(
        name=actor_name(session_id),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        resources={SLOT_RESOURCE: 1},
        label_selector={DRIVER_LABEL: host_driver},
        max_restarts=0,
    ).remote(session_id)
    started = False
    try:
        if spec is None:
            report = ray.get(actor.start.remote(), timeout=timeout)
        else:
            opened = Placement.from_report(ray.get(actor.open.remote(tls), timeout=timeout))
            if files:
                hand_over(opened, files, timeout=timeout)
            started = True
            report = ray.get(actor.start.remote(dict(spec)), timeout=start_timeout)
    except GetTimeoutError as exc:
        _abandon(actor, started)
        if started:
            raise ClusterError(
                f"session {session_id} did not start on its host within {start_timeout:.0f} s",
                session_id=session_id,
            ) from exc
        raise ClusterError(
            f"no host took session {session_id} within {timeout:.0f} s: every "
            f"{SLOT_RESOURCE} of the hosts with driver {host_driver} is taken, or no such host "
            f"joined (remotecli cluster join --driver {host_driver}); add a host or end a "
            "session",
            session_id=session_id,
        ) from exc
    except RayActorError as exc:
        ray.kill(actor)
        raise ClusterError(
            f"session {session_id}'s actor died while starting: {exc}", session_id=session_id
        ) from exc
    except RayTaskError as exc:  # the payload raised: the host's driver's reason
        _abandon(actor, started)
        cause = getattr(exc, "cause", None)
        reason = getattr(cause, "message", None) or str(exc).splitlines()[-1]
        raise ClusterError(
            f"session {session_id} did not start on its host: {reason}", session_id=session_id
        ) from exc
    except ClusterError:
        ray.kill(actor)
        raise
    return Placement.from_report(report)


def _abandon(actor: Any, started: bool) -> None:
    """Kill a session's actor that did not start; once its start was asked, first let it end
    what its host's driver may have begun (a microVM's QEMU runs in a session of its own and
    would outlive the actor's process), for at most ``STOP_TIMEOUT``."""
    if started:
        with contextlib.suppress(RayActorError, GetTimeoutError, RayTaskError):
            ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT)
    ray.kill(actor)


def hand_over(placed: Placement, files: Mapping[str, bytes], *, timeout: float) -> None:
    """``put`` a session's kept files to its channel before it starts; ClusterError if refused."""
    assert placed.channel_secret is not None
    try:
        answer = channel.request(
            placed.node_ip,
            placed.port,
            placed.channel_secret,
            "put",
            {"files": channel.encode_files(files)},
            timeout=timeout,
            cert=placed.channel_cert,
        )
    except (OSError, ValueError) as exc:
        answer = {"error": str(exc) or type(exc).__name__}
    if answer.get("ok") is not True:
        raise ClusterError(
            f"session {placed.session_id}'s kept sign-in did not reach host {placed.host}: "
            f"{answer.get('error')}",
            session_id=placed.session_id,
        )


def read_back(placed: Placement, paths: Sequence[str], *, timeout: float) -> dict[str, bytes]:
    """``get`` the kept files at ``paths`` from a running session's HOME over its channel.

    Raises :class:`ClusterError` when the channel cannot be reached or refuses.
    """
    if placed.channel_secret is None:
        return {}
    try:
        answer = channel.request(
            placed.node_ip,
            placed.port,
            placed.channel_secret,
            "get",
            {"paths": list(paths)},
            timeout=timeout,
            cert=placed.channel_cert,
        )
        if "error" not in answer:
            return channel.decode_files(answer.get("files"))
    except (OSError, ValueError) as exc:
        answer = {"error": str(exc) or type(exc).__name__}
    raise ClusterError(
        f"session {placed.session_id}'s kept files could not be read from host {placed.host}: "
        f"{answer['error']}",
        session_id=placed.session_id,
    )


def find_sessions() -> dict[str, Placement]:
    """After a controller restart: the placements of every session actor still alive, by id."""
    found: dict[str, Placement] = {}
    for name in ray.util.list_named_actors(all_namespaces=False):
        if not name.startswith(ACTOR_PREFIX):
            continue
        session_id = name.removeprefix(ACTOR_PREFIX)
        placement = find_session(session_id)
        if placement is not None:
            found[session_id] = placement
    return found


def find_session(session_id: str, *, timeout: float = 10.0) -> Placement | None:
    """Return where a session's actor runs, or None when it is gone."""
    try:
        actor: Any = ray.get_actor(actor_name(session_id), namespace=NAMESPACE)
        return Placement.from_report(ray.get(actor.start_report.remote(), timeout=timeout))
    except (ValueError, RayActorError, GetTimeoutError):
        return None


def end_session(session_id: str) -> None:
    """Stop the session's payload and kill its actor (its slot frees); idempotent."""
    try:
        actor = ray.get_actor(actor_name(session_id), namespace=NAMESPACE)
    except ValueError:
        return
    with contextlib.suppress(RayActorError, GetTimeoutError):
        ray.get(actor.stop.remote(), timeout=STOP_TIMEOUT)
    ray.kill(actor)


def node_table() -> list[dict[str, Any]]:
    """Return Ray's node table now (one dict per node: ``NodeID``, ``Alive``, addresses)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return nodes


def available_per_node() -> dict[str, dict[str, float]]:
    """Return each live node's available resources now, by node id (a used-up one is missing).

    Ray's DeveloperAPI (``ray._private.state``, as Ray's own ``ray.util.tpu`` reads it; Ray is
    pinned to 2.60.0): one GCS call for every node, as :func:`node_table` is.
    """
    from ray._private.state import available_resources_per_node

    available: dict[str, dict[str, float]] = available_resources_per_node()  # type: ignore[no-untyped-call]
    return available


def node_alive(node_id: str) -> bool:
    """Whether Ray's node table has the node alive now."""
    return any(node["NodeID"] == node_id and node["Alive"] for node in node_table())


def wait_until_gone(session_id: str, *, timeout: float = 10.0) -> None:
    """Wait until the session's actor name is free again (after :func:`end_session`)."""
    deadline = time.monotonic() + timeout
    while actor_name(session_id) in ray.util.list_named_actors():
        if time.monotonic() > deadline:
            raise ClusterError(f"session {session_id}'s actor is still listed after {timeout} s")
        time.sleep(0.1)
