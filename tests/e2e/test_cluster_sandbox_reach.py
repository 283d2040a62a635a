"""A session's sandbox on a cluster host reaches neither Ray's ports nor the session channels.

One real cluster (tests/ray_cluster.py: a head and one worker, each in a network namespace of
its own). In the worker's namespace, as its session actor would, ``tests/sandbox_reach.py``
runs the host's real :class:`LocalDriver`: a headless run under bubblewrap, egress ``none``
and egress ``open`` (pasta, with the host firewall rule the driver installs), whose command
connects to every TCP port listening on the worker's address (``ss``), and at a second address
the test gives the worker, to a live session channel on the worker's address, and to the head's
GCS. The same probe run outside the sandbox, in the
same namespace, must connect to each, or the refusals inside would prove nothing. For ``open``
pasta needs a default route: the test adds one in the worker's namespace, via the head's
address (a test-made address; nothing leaves the test's namespaces).

Why each is refused. Egress ``none``: the sandbox has only its own ``lo``, every connect is
"network unreachable". Egress ``open``: pasta copies the host's address into the sandbox, so
there the worker's address is the sandbox's own and its kernel refuses the connect; anything
else (the head, the worker's second address) leaves through pasta as a socket of the
session's uid, which the driver's nftables rule rejects (the host's own addresses, 10.0.0.0/8),
and Debian 12's pasta loses that reset, so the connect times out (remotecli.sandbox.network).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_skip import skip_module_unless
from tests.conftest import MS

pytestmark = pytest.mark.e2e

REFUSALS = {"refused", "unreachable", "timeout"}
"""What a probe from inside may see: the connection never opened (see the table's reasons)."""
ALIAS = "10.200.0.22"
"""A second address the test gives the worker (only in its namespace): Ray's wildcard listeners
answer there too, and pasta does not copy it into the sandbox, so only the firewall rule holds."""
PROBE_TIMEOUT = 1_500 * MS
"""Seconds each connect may take: with egress open a refused one ends here (pasta's lost RST)."""


def _more() -> str | None:
    if not Path("/usr/bin/python3").exists():
        return "the probe needs Debian's /usr/bin/python3"
    from remotecli.sandbox.network import tun_problem

    return tun_problem()


skip_module_unless(
    "tests/e2e/test_cluster_sandbox_reach.py",
    "it creates network namespaces, sandboxes and a firewall rule",
    ("ip", "unshare", "nsenter", "ss", "bwrap", "pasta", "nft"),
    "run scripts/install-system-deps.sh test",
    _more,
)

from tests.ray_cluster import Cluster, leftovers, ray_cluster, run  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and one worker (one slot), removed after the module's last test."""
    root = Path("/tmp") / f"rr{os.getpid()}"
    with ray_cluster(root, workers=1, slots=1, prefix=f"rr{os.getpid() % 100000}") as running:
        yield running


@pytest.fixture(scope="module")
def reach(cluster: Cluster) -> dict[str, Any]:
    """Run tests/sandbox_reach.py in the worker's namespace; return its result, print its table."""
    worker = cluster.workers[0]
    route = ["ip", "-n", worker.netns, "route"]
    alias = ["ip", "-n", worker.netns, "addr"]
    run([*alias, "add", f"{ALIAS}/24", "dev", "eth0"])
    run([*route, "add", "default", "via", cluster.head.address, "dev", "eth0"])
    try:
        argv = ["nsenter", f"--net=/var/run/netns/{worker.netns}", sys.executable]
        argv += ["-m", "tests.sandbox_reach", str(cluster.root / "reach"), worker.address]
        argv += [ALIAS, cluster.address, str(PROBE_TIMEOUT)]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=cluster.env(),
            timeout=120_000 * MS,
            check=False,
        )
    finally:
        run([*route, "del", "default"], check=False)
        run([*alias, "del", f"{ALIAS}/24", "dev", "eth0"], check=False)
    assert "RESULT " in done.stdout, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    result["head"] = cluster.address
    inside = result["inside"]
    rows = [("target", "listener", "outside", "egress none", "egress open")]
    for target, label in result["targets"].items():
        outcomes = (result["outside"], inside["none"], inside["open"])
        rows.append((target, label, *(outcome.get(target, "-") for outcome in outcomes)))
    print()
    for row in rows:
        print("{:<18} {:<16} {:<8} {:<12} {}".format(*row))
    for egress, facts in result["facts"].items():
        print(f"egress {egress}: {facts['reason']}")
    print(f"packets the egress rule rejected: {result['facts']['open'].get('rejected')}")
    return result


def test_every_target_answers_outside_the_sandbox(reach: dict[str, Any]) -> None:
    """From the worker's namespace every target connects: raylet, channel and GCS among them."""
    labels = set(reach["targets"].values())
    assert {"raylet", "session channel", "head GCS"} <= labels, reach["targets"]
    assert len(reach["targets"]) >= 4, reach["targets"]  # Ray's agents and object manager too
    assert reach["outside"] == dict.fromkeys(reach["targets"], "open")


@pytest.mark.parametrize("egress", ["none", "open"])
def test_the_sandbox_reaches_no_target(reach: dict[str, Any], egress: str) -> None:
    """From a LocalDriver run's sandbox, with this egress, no target accepts a connection."""
    facts = reach["facts"][egress]
    assert facts["egress"] == egress, facts["reason"]
    assert facts["status"] == 0, facts["errors"]
    inside = reach["inside"][egress]
    assert set(inside) == set(reach["targets"])
    assert {target: o for target, o in inside.items() if o not in REFUSALS} == {}


def test_the_firewall_rejects_what_pasta_would_carry(reach: dict[str, Any]) -> None:
    """With egress open, the driver's rule rejected the connects to the GCS and the 2nd address."""
    carried = [reach["head"], *(t for t in reach["targets"] if t.startswith(f"{ALIAS}:"))]
    assert len(carried) >= 3, reach["targets"]  # the GCS and the raylet's two wildcard ports
    assert {reach["inside"]["open"][target] for target in carried} <= REFUSALS
    assert reach["facts"]["open"]["rejected"] >= len(carried)


def test_the_channel_saw_only_the_outside_probe(reach: dict[str, Any]) -> None:
    """The session channel counted one connection without the secret: the outside probe's."""
    assert reach["channel_connections"] == 1


@pytest.mark.parametrize("egress", ["none", "open"])
def test_the_driver_removes_its_cgroup_and_workdir(reach: dict[str, Any], egress: str) -> None:
    """The run had its cgroup; the driver's stop removed it and the run's directory."""
    facts = reach["facts"][egress]
    assert facts["cgroups_made"]
    assert facts["cgroups_left"] == []
    assert facts["workdir_left"] is False


def test_nothing_is_left_after_teardown(reach: dict[str, Any], cluster: Cluster) -> None:
    """The route, the 2nd address and the rule are gone; the cluster leaves nothing behind."""
    worker = cluster.workers[0]
    routes = run(["ip", "-n", worker.netns, "route", "show", "default"]).stdout
    assert routes.strip() == ""
    addresses = run(["ip", "-n", worker.netns, "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert ALIAS not in addresses
    tables = run(["nsenter", f"--net=/var/run/netns/{worker.netns}", "nft", "list", "tables"])
    assert "remotecli_egress" not in tables.stdout  # the probe removed the driver's rule
    cluster.stop()
    assert leftovers(cluster.network.prefix) == []
