"""The hosts' summary from Ray's node table, without Ray: names, slots, free slots, sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from remotecli.cluster.hosts import summarise_hosts
from remotecli.cluster.nodes import HOST_LABEL, SLOT_RESOURCE
from remotecli.drivers.base import HostStatus


@dataclass(frozen=True)
class Placed:
    """A placement as the summary reads it (session, host name reported, Ray node id)."""

    session_id: str
    host: str
    node_id: str


def node(
    node_id: str,
    ip: str,
    *,
    alive: bool = True,
    slots: int = 2,
    label: str | None = None,
    hostname: str = "machine",
) -> dict[str, Any]:
    """One entry of ``ray.nodes()`` with the keys the summary reads."""
    return {
        "NodeID": node_id,
        "Alive": alive,
        "NodeManagerAddress": ip,
        "NodeManagerHostname": hostname,
        "Resources": {SLOT_RESOURCE: float(slots), "memory": 1e9},
        "Labels": {"ray.io/node-id": node_id, **({HOST_LABEL: label} if label else {})},
    }


def test_each_host_has_its_slots_free_slots_and_sessions() -> None:
    """Slots come from the node's resources, free ones from Ray's available resources (a used-up
    resource is missing there: 0 free), sessions from this controller's placements."""
    nodes = [
        node("h", "10.0.0.1", slots=0, label="head"),
        node("a", "10.0.0.2", label="w1"),
        node("b", "10.0.0.3", label="w2"),
    ]
    available = {"h": {"memory": 1.0}, "a": {SLOT_RESOURCE: 1.0}, "b": {"memory": 1.0}}
    placed = [Placed("s2", "w2", "b"), Placed("s1", "w1", "a"), Placed("s3", "w2", "b")]
    assert summarise_hosts(nodes, available, placed) == [
        HostStatus("head", "10.0.0.1", True, 0, 0, ()),
        HostStatus("w1", "10.0.0.2", True, 2, 1, ("s1",)),
        HostStatus("w2", "10.0.0.3", True, 2, 0, ("s2", "s3")),
    ]


def test_a_name_comes_from_the_label_then_the_sessions_then_the_hostname() -> None:
    """Without a label a host is named by what its sessions report, else by its hostname."""
    nodes = [
        node("a", "10.0.0.2", label="labelled", hostname="x"),
        node("b", "10.0.0.3", hostname="y"),
        node("c", "10.0.0.4", hostname="z"),
    ]
    placed = [Placed("s1", "reported", "b")]
    names = [host.name for host in summarise_hosts(nodes, {}, placed)]
    assert names == ["labelled", "reported", "z"]


def test_a_lost_host_is_down_with_no_free_slot_whatever_ray_last_said() -> None:
    """A dead node is shown down with no free slot even where Ray's figures still offer some,
    with the slots its table gives and the sessions still placed on it."""
    nodes = [node("a", "10.0.0.2", alive=False, label="w1")]
    placed = [Placed("s1", "w1", "a")]
    assert summarise_hosts(nodes, {"a": {SLOT_RESOURCE: 2.0}}, placed) == [
        HostStatus("w1", "10.0.0.2", False, 2, 0, ("s1",))
    ]


def test_a_restarted_host_is_shown_once_as_its_living_node() -> None:
    """Ray's table keeps the dead node of a host that came back: only the living one shows."""
    nodes = [node("old", "10.0.0.2", alive=False, label="w1"), node("new", "10.0.0.2", label="w1")]
    hosts = summarise_hosts(nodes, {"new": {SLOT_RESOURCE: 2.0}}, [Placed("s1", "w1", "old")])
    assert hosts == [HostStatus("w1", "10.0.0.2", True, 2, 2, ())]


def test_two_living_hosts_with_one_name_are_told_apart_by_address() -> None:
    """Two living nodes under one name get ``NAME@IP``, so each name (a metric label) is unique."""
    nodes = [node("a", "10.0.0.2", label="w"), node("b", "10.0.0.3", label="w")]
    assert [h.name for h in summarise_hosts(nodes, {}, [])] == ["w@10.0.0.2", "w@10.0.0.3"]
