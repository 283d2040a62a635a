"""Cluster hosts that run microVMs: ``cluster_host_driver = "qemu"`` on a real 3-node cluster.

Worker w1 joins with the qemu driver (Ray's node label ``remotecli-driver=qemu``), w2 with the
local sandbox. A controller (tests/qemu_cluster_controller.py, in the cluster's controller
namespace) asks for microVM sessions: Ray puts them on w1 only, each a real QEMU clone of the
shell's template on that host, started by the host's own qemu driver in the session's actor.
Through the gateway, a viewer completes the RFB handshake (the bridge answers the microVM's
VNC password, which came back from the host with the placement), a command typed into the text
view runs in the VM, and a headless run streams from a microVM on w1. Deleting the sessions
ends their QEMU processes on the host.

The module comes after tests/e2e/test_qemu.py and the microVM runs' modules, so the shell's
session and run templates are usually made already; without them the first session waits
for its host to make one.
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

from remotecli.images import GuestImage
from tests.cluster_skip import skip_module_unless
from tests.e2e.test_qemu import image as image  # the module-scoped fixture, shared

__all__ = ["image"]

pytestmark = pytest.mark.e2e


skip_module_unless(
    "tests/e2e/test_qemu_sessions_on_cluster.py",
    "it creates network namespaces and runs microVMs as sandbox uids",
    ("ip", "unshare", "nsenter", "qemu-system-x86_64"),
    "run scripts/install-system-deps.sh run",
)

from tests.ray_cluster import Cluster, leftovers, processes_naming, ray_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(image: GuestImage) -> Iterator[Cluster]:
    """A head, w1 (qemu, the test's guest image) and w2 (local), 3 slots each: the two
    sessions and the run fit on w1; removed after the module."""
    root = Path("/tmp") / f"rq{os.getpid()}"
    prefix = f"rq{os.getpid() % 100000}"
    images = {"REMOTECLI_HOST_IMAGE_CACHE": str(image.directory.parent)}
    with ray_cluster(
        root, workers=2, slots=3, prefix=prefix, drivers=("qemu", "local"), node_env=images
    ) as running:
        yield running


@pytest.fixture(scope="module")
def run(cluster: Cluster) -> dict[str, Any]:
    """Run the controller program to its end and return what it found."""
    argv = ["ip", "netns", "exec", cluster.controller_netns, sys.executable]
    argv += ["-m", "tests.qemu_cluster_controller", cluster.address, str(cluster.token_path)]
    argv += [str(cluster.root / "ctl")]
    done = subprocess.run(
        argv, capture_output=True, text=True, env=cluster.env(), timeout=900, check=False
    )
    assert "RESULT " in done.stdout, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    print(json.dumps(result, indent=1))
    return result


def test_microvm_sessions_land_only_on_the_qemu_host(run: dict[str, Any]) -> None:
    """Both sessions go to w1, the host that joined with the qemu driver, though w2 has free
    slots; each actor ran the host's qemu driver with the controller's egress (``none``), the
    placement carried the VM's VNC password, and the API names w1 as each session's host."""
    assert list(run["hosts"].values()) == ["w1", "w1"]
    assert run["api_hosts"] == ["w1", "w1"]
    assert run["drivers"] == ["qemu", "qemu"]
    assert run["network"] == ["none", "none"]
    assert run["passwords"] == [True, True]


def test_a_viewer_and_the_text_view_reach_the_microvm_through_the_gateway(
    run: dict[str, Any],
) -> None:
    """Through the gateway and the bridge, over each session's channel: the RFB handshake
    reaches the guest's ServerInit (the bridge answered the VM's VNC password), and a command
    typed into the text view runs in the VM (its hostname is the guest's, not the worker's)."""
    assert run["inits"] == [[1280, 720], [1280, 720]]
    assert run["typed"] == f"vm-42-ok on {run['guest']}"
    assert run["guest"].startswith("rcli-")


def test_a_headless_run_streams_from_a_microvm_on_the_host(run: dict[str, Any]) -> None:
    """``POST /api/runs`` with the qemu hosts: the command's output streams back and the run
    ends ``done`` with exit status 0; its actor is gone afterwards."""
    events = run["run"]["events"]
    text = "".join(data["text"] for kind, data in events if kind == "text")
    assert text == f"run-42 on {run['run']['guest']}\n", events  # the run's own VM
    assert events[-1][0] == "done", events[-1]
    assert events[-1][1]["exit_code"] == 0
    assert run["run"]["state"] == "done"


def test_deleting_the_sessions_ends_their_microvms(run: dict[str, Any], cluster: Cluster) -> None:
    """Each session ran one QEMU process on its host; after the deletes both sessions are
    stopped, those processes are gone (the program waited for it), no session or run actor
    is left, and nothing of the host's data dir runs."""
    assert list(run["qemus"].values()) == [1, 1]
    assert run["states"] == ["stopped", "stopped"]
    assert run["actors_left"] == []
    assert processes_naming(str(cluster.data_dir(cluster.workers[0]))) == []


async def test_joining_as_a_microvm_host_makes_or_finds_the_templates(image: GuestImage) -> None:
    """What ``cluster join --driver qemu`` does before ``ray start``: the shell's template (and
    each provider's the image holds) is made beside the image cache, or found there."""
    from remotecli.cli import _make_templates

    state = await _make_templates(image.directory.parent)
    assert state.startswith("ready ("), state


def test_nothing_is_left_after_teardown(cluster: Cluster) -> None:
    """Once the cluster is stopped, no namespace or process of it is left."""
    prefix = cluster.network.prefix
    cluster.stop()
    assert leftovers(prefix) == []
    assert processes_naming(str(cluster.root)) == []
