"""The cluster's pure pieces: session slots from a host's size, ``ray start``'s argv."""

from __future__ import annotations

import json

import pytest

from remotecli.cluster.nodes import (
    DRIVER_LABEL,
    HEALTH_CHECK,
    HOST_LABEL,
    SLOT_RESOURCE,
    NodeSettings,
    ray_start_argv,
    session_slots,
)
from remotecli.exceptions import ConfigError

GIB = 1 << 30


def test_slots_follow_the_smaller_of_cores_and_memory() -> None:
    """Two sessions a core, one GiB each after a 2 GiB reserve, never below zero."""
    assert session_slots(2, 24 * GIB) == 4
    assert session_slots(16, 10 * GIB) == 8
    assert session_slots(8, 1 * GIB) == 0


def test_head_argv_turns_the_dashboard_off_and_tunes_the_health_checks() -> None:
    """The head's argv offers the slots, turns the dashboard off and tunes the health checks."""
    argv = ray_start_argv(NodeSettings(slots=3), head_address=None, node_ip="10.0.0.1")
    assert argv[:2] == ["ray", "start"]
    assert f"--resources={json.dumps({SLOT_RESOURCE: 3})}" in argv
    for flag in ("--head", "--include-dashboard=false", "--num-cpus=0", "--disable-usage-stats"):
        assert flag in argv
    config = next(a for a in argv if a.startswith("--system-config="))
    assert json.loads(config.split("=", 1)[1]) == HEALTH_CHECK


def test_join_argv_names_the_head_and_carries_no_system_config() -> None:
    """A joining host points at the head; the system config is the head's alone."""
    argv = ray_start_argv(NodeSettings(slots=2), head_address="10.0.0.1:6379", node_ip="10.0.0.2")
    assert "--address=10.0.0.1:6379" in argv
    assert "--node-ip-address=10.0.0.2" in argv
    assert not any(a.startswith(("--head", "--system-config")) for a in argv)


def test_a_host_carries_its_driver_and_name_as_node_labels() -> None:
    """``--name`` becomes the node label the controller names the host by (none without it);
    ``--driver`` the label sessions select hosts by, ``local`` unless said."""
    named = NodeSettings(slots=2, name="host-2.eu", driver="qemu")
    argv = ray_start_argv(named, head_address="10.0.0.1:6379", node_ip="10.0.0.2")
    assert f"--labels={DRIVER_LABEL}=qemu,{HOST_LABEL}=host-2.eu" in argv
    unnamed = ray_start_argv(NodeSettings(slots=2), head_address=None, node_ip="10.0.0.1")
    assert [a for a in unnamed if a.startswith("--labels")] == [f"--labels={DRIVER_LABEL}=local"]


@pytest.mark.parametrize("name", ["two words", "-dash", "a,b=c", "x" * 64, ""])
def test_a_name_ray_cannot_label_is_refused_with_the_rule(name: str) -> None:
    """A name Ray would refuse as a label value (spaces, separators, too long) is a ConfigError."""
    with pytest.raises(ConfigError, match="letters, digits"):
        ray_start_argv(NodeSettings(slots=2, name=name), head_address=None, node_ip="10.0.0.1")
