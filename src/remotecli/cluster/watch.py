"""The failure watcher: which sessions ran on a host Ray has declared dead.

Ray's GCS health-checks every node (``HEALTH_CHECK`` in :mod:`remotecli.cluster.nodes`); once
a node misses ``health_check_failure_threshold`` checks it is marked dead in the node table and
every actor on it dies with ``ActorDiedError`` ("its node has died"). Before that, a call to an
actor on a silent host fails with ``ActorUnavailableError``, which is *not* a verdict (the host
may come back), so the watcher decides by the node table only: :func:`lost_sessions` is the
pure rule, :func:`check_hosts` applies it to Ray's table, :func:`wait_session` blocks on one
session until it ends or its host is lost. Measured bounds are in docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

from remotecli.cluster.placement import NAMESPACE, Placement, actor_name, node_table

LOST_BOUND = 10.0
"""Seconds from a host's death to its sessions reported lost, with the tuned health checks:
3 missed checks of 1 s period and 1 s timeout (measured 2.5 s for killed processes, 5.6 s for
a cut link) plus one poll of the watcher."""

POLL = 0.5


def lost_reason(placement: Placement) -> str:
    """The failure reason a session gets when its host is lost."""
    return f"host {placement.host} lost"


def lost_sessions(
    placements: Mapping[str, Placement], nodes: Iterable[Mapping[str, Any]]
) -> dict[str, str]:
    """Return ``{session id: reason}`` for each placement whose node the table has dead.

    A node missing from the table counts as dead too (Ray forgets dead nodes after a while).
    """
    alive = {str(node["NodeID"]) for node in nodes if node.get("Alive")}
    return {
        session_id: lost_reason(placement)
        for session_id, placement in placements.items()
        if placement.node_id not in alive
    }


def check_hosts(placements: Mapping[str, Placement]) -> dict[str, str]:
    """Apply :func:`lost_sessions` to Ray's node table now."""
    return lost_sessions(placements, node_table())


async def await_session(
    placement: Placement, nodes: Callable[[bool], Awaitable[Iterable[Mapping[str, Any]]]]
) -> str:
    """Return once the session ends, with its reason (``"host HOST lost"`` for a dead host).

    The same rule as :func:`wait_session`, holding no thread while it waits: the actor's
    ``wait`` result is awaited as a future, and ``nodes(fresh)`` gives Ray's node table (a caller
    watching many sessions reads it once per :data:`POLL` for all of them; ``fresh`` asks for
    a read now, when the actor died and the table must say whether its host did).
    """
    actor: Any = await asyncio.to_thread(
        ray.get_actor, actor_name(placement.session_id), namespace=NAMESPACE
    )
    pending = asyncio.wrap_future(actor.wait.remote().future())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=POLL)
            if done:
                try:
                    return str(pending.result())
                except ActorUnavailableError:
                    await asyncio.sleep(POLL)  # the host is silent: the node table decides
                    pending = asyncio.wrap_future(actor.wait.remote().future())
                except ActorDiedError as exc:  # a fresh table: the GCS marked the node first
                    if lost_sessions({placement.session_id: placement}, await nodes(True)):
                        return lost_reason(placement)
                    return f"session actor died: {str(exc).splitlines()[0]}"
            if lost_sessions({placement.session_id: placement}, await nodes(False)):
                return lost_reason(placement)
    finally:
        pending.cancel()


def wait_session(placement: Placement) -> str:
    """Block until the session ends; return its reason (``"host HOST lost"`` for a dead host)."""
    actor: Any = ray.get_actor(actor_name(placement.session_id), namespace=NAMESPACE)
    pending: Any = actor.wait.remote()
    while True:
        try:
            return str(ray.get(pending, timeout=POLL))
        except GetTimeoutError:
            pass
        except ActorUnavailableError:
            time.sleep(POLL)  # the host is silent: wait for the node table's verdict
            pending = actor.wait.remote()
        except ActorDiedError as exc:
            if check_hosts({placement.session_id: placement}):
                return lost_reason(placement)
            return f"session actor died: {str(exc).splitlines()[0]}"
        if check_hosts({placement.session_id: placement}):
            return lost_reason(placement)
