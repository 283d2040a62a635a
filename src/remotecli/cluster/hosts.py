"""The cluster's hosts as operators see them: name, address, up, slots, free slots, sessions.

Pure: :func:`summarise_hosts` turns what Ray reports (its node table and each live node's
available resources) and this controller's placements into one :class:`HostStatus` per host;
the cluster driver reads Ray in a worker thread and keeps the result (``/readyz``,
``/metrics``). A host is named by the label its ``ray start`` carries (:data:`HOST_LABEL`,
from ``--name``), else by the name its sessions report, else by its hostname, else its IP.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from remotecli.cluster.nodes import HOST_LABEL, SLOT_RESOURCE
from remotecli.drivers.base import HostStatus


class Placed(Protocol):
    """What the summary needs of a placement (:class:`remotecli.cluster.placement.Placement`)."""

    @property
    def session_id(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def node_id(self) -> str: ...


def node_name(node: Mapping[str, Any], reported: Mapping[str, str]) -> str:
    """Name one node of Ray's table; ``reported`` maps node ids to the name sessions gave."""
    labels = node.get("Labels") or {}
    for name in (
        labels.get(HOST_LABEL),
        reported.get(str(node.get("NodeID"))),
        node.get("NodeManagerHostname"),
        node.get("NodeManagerAddress"),
    ):
        if name:
            return str(name)
    return str(node.get("NodeID", "unknown"))


def summarise_hosts(
    nodes: Iterable[Mapping[str, Any]],
    available: Mapping[str, Mapping[str, float]],
    placements: Iterable[Placed],
) -> list[HostStatus]:
    """Return one status per host, by name, from Ray's node table and available resources.

    ``available`` is Ray's available resources by node id (live nodes only; a resource used
    up may be missing: 0 free). A host that restarted is in Ray's table twice, dead then
    alive, under one name: the living node is shown. Two living nodes with one name (a
    misconfiguration) are told apart by their address (``NAME@IP``), so every name is unique.
    """
    placed = list(placements)
    reported = {p.node_id: p.host for p in placed}
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for node in nodes:
        groups.setdefault(node_name(node, reported), []).append(node)
    hosts = []
    for name, group in groups.items():
        shown = [node for node in group if node.get("Alive")] or group[-1:]
        for node in shown:
            node_id = str(node.get("NodeID"))
            up = bool(node.get("Alive"))
            resources = node.get("Resources") or {}
            free = available.get(node_id, {}).get(SLOT_RESOURCE, 0) if up else 0
            address = str(node.get("NodeManagerAddress", ""))
            hosts.append(
                HostStatus(
                    name=name if len(shown) == 1 else f"{name}@{address}",
                    address=address,
                    up=up,
                    slots=int(resources.get(SLOT_RESOURCE, 0)),
                    slots_free=int(free),
                    sessions=tuple(sorted(p.session_id for p in placed if p.node_id == node_id)),
                )
            )
    return sorted(hosts, key=lambda host: host.name)
