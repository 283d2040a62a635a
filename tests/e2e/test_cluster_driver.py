"""The controller places sessions through Ray (``driver = "cluster"``) on a real 3-node cluster.

One cluster (tests/ray_cluster.py) and one controller run (tests/cluster_controller.py, in the
controller's namespace): sessions created through the API run the workers' real local driver
(Xvnc, tmux, xterm under bubblewrap), a viewer reaches them through the gateway and the bridge
over each session's channel (TLS, each session's certificate pinned), the channel refuses a
missing or wrong secret and plain TCP, and a killed worker
fails its sessions "host w1 lost" within the bound while a new session lands on the other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_skip import skip_module_unless
from tests.conftest import MS

pytestmark = pytest.mark.e2e


skip_module_unless(
    "tests/e2e/test_cluster_driver.py",
    "it creates network namespaces and runs sandboxes",
    ("ip", "unshare", "Xvnc", "xterm", "tmux", "bwrap"),
    "run scripts/install-system-deps.sh run",
)

from remotecli.cluster.nodes import NodeSettings  # noqa: E402
from remotecli.cluster.watch import LOST_BOUND  # noqa: E402
from tests.cluster_controller import KEPT, TAKEOVER_AFTER  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.ray_cluster import Cluster, leftovers, ray_cluster, wait_for_nodes  # noqa: E402

SLOTS = 3
"""Each worker's session slots: six sessions fill both (the two-controller test)."""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One real cluster for the module (Ray's TLS on), removed after its last test."""
    root = Path("/tmp") / f"rd{os.getpid()}"
    prefix = f"rd{os.getpid() % 100000}"
    with ray_cluster(
        root, workers=2, slots=SLOTS, prefix=prefix, default_route=True, tls=True
    ) as running:
        yield running


@pytest.fixture(scope="module")
def run(cluster: Cluster, postgres_server: PostgresServer) -> dict[str, Any]:
    """Run the controller program (two controllers on one PostgreSQL database for a while);
    kill worker w1 once it says its sessions are placed."""
    signals = cluster.root / "signals"
    signals.mkdir()
    argv = ["ip", "netns", "exec", cluster.controller_netns, sys.executable]
    argv += ["-m", "tests.cluster_controller", cluster.address, str(cluster.token_path)]
    argv += [str(cluster.root / "ctl"), str(signals), postgres_server.new_database()]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env()
    )
    deadline = time.monotonic() + 180_000 * MS
    while not (signals / "placed").exists():
        assert process.poll() is None, process.communicate()[1][-4000:]
        if time.monotonic() > deadline:
            process.kill()
            stderr = process.communicate()[1]
            raise AssertionError(f"the sessions were not placed: {stderr[-4000:]}")
        time.sleep(0.05)
    hosts = json.loads((signals / "placed").read_text())
    assert "w1" in hosts.values(), hosts
    survivors = {node.name: cluster.data_dir(node) for node in cluster.workers if node.name != "w1"}
    next(node for node in cluster.workers if node.name == "w1").kill()
    (signals / "failed").write_text(str(time.time()))
    stdout, stderr = process.communicate(timeout=180_000 * MS)
    assert "RESULT " in stdout, stderr[-4000:]
    result: dict[str, Any] = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
    result["survivor_dirs"] = {name: str(path) for name, path in survivors.items()}
    print(json.dumps({k: v for k, v in result.items() if k != "survivor_dirs"}, indent=1))
    return result


def test_sessions_land_on_the_workers_and_stream_through_the_bridge(run: dict[str, Any]) -> None:
    """Sessions created through the API run on w1 and w2; the viewer reads the real ServerInit."""
    assert set(run["hosts"].values()) == {"w1", "w2"}
    assert len(run["inits"]) == 4
    assert run["sandbox"] == [
        "bubblewrap: user, mount, pid, ipc, uts, cgroup and network namespaces; "
        "uids: one unprivileged host uid per session; limits: "
        + run["sandbox"][0].split("limits: ")[1]
    ]
    for width, height in run["inits"]:
        assert (width, height) == (1280, 720)


def test_the_text_view_and_the_sessions_loopback_reach_the_host(run: dict[str, Any]) -> None:
    """Through the gateway, a cluster session's text view runs a command typed into it and shows
    its output; a sign-in callback relayed to its loopback is refused while nothing listens
    there, and answered by the web server started from the text view once it does."""
    tty = run["tty"]
    assert tty["text"] == "tty-42-ok"
    status, answer = tty["before"]
    assert status == 502
    assert "nothing listens on localhost:8765 in the session" in answer["message"]
    assert tty["after"]["status"] == 200
    assert "Directory listing for /" in tty["after"]["body"]


def test_the_hosts_sessions_get_the_controllers_limits_and_egress(run: dict[str, Any]) -> None:
    """Each session on a host runs under the controller's session_memory, session_processes
    and session_cpus (1.5 GiB, 512, 0.5 CPU here), not the local driver's defaults, and with
    its egress (``open``, the default: the host's driver installed its egress filter)."""
    assert run["limits"] == [
        {"memory": "1.5 GiB", "processes": "512", "cpu": "0.5 CPU, weight 100"}
    ] * len(run["inits"])
    assert run["network"] == ["open"] * len(run["inits"])


def test_a_kept_signin_reaches_the_host_and_comes_back(run: dict[str, Any]) -> None:
    """A kept sign-in is in the session's HOME on its host; what the CLI added is kept after."""
    kept = json.loads(KEPT)
    assert json.loads(run["signin"]["held"][".standin/credentials.json"]) == kept
    assert json.loads(run["signin"]["held"][".standin/seen.json"]) == kept  # the CLI read it
    assert run["signin"]["held"][".standin/token"] == "refreshed"
    assert run["signin"]["version"] == 2  # the one saved before, then the session's
    assert run["signin"]["kept"][".standin/token"] == "refreshed"
    assert json.loads(run["signin"]["kept"][".standin/credentials.json"]) == kept


def test_a_headless_run_streams_from_its_host_and_keeps_its_signin(run: dict[str, Any]) -> None:
    """``POST /api/runs`` on the cluster: the first line streams as its own event before the
    rest, the run ends ``done`` having read the kept sign-in, the token it rotated is kept
    after, and its actor is gone."""
    events = run["run"]["events"]
    texts = [data["text"] for kind, data in events if kind == "text"]
    assert texts[0] == "first\n"  # read before the command's pause ended
    assert "".join(texts) == "first\nrefreshed\nsecond\n"
    assert events[-1][0] == "done", events[-1]
    assert events[-1][1]["exit_code"] == 0
    assert run["run"]["state"] == "done"
    assert run["run"]["kept_token"] == "run-refreshed"
    assert run["run"]["version"] == 3  # the session's save, then the run's
    assert run["run"]["actor_gone"] is True


def test_two_controllers_share_the_cluster_and_serve_each_others_sessions(
    run: dict[str, Any],
) -> None:
    """Six sessions made alternately at two controllers on one PostgreSQL database spread over
    both workers; each is viewed (RFB handshake) and typed into through the other controller's
    gateway, the command runs in it, and a delete there stops it at the one that runs it; the
    other controller also opens a session's text view and relays a callback to its loopback."""
    shared = run["shared"]
    assert len(shared["hosts"]) == 6
    assert set(shared["hosts"].values()) == {"w1", "w2"}
    assert sorted(Counter(shared["controllers"].values()).values()) == [3, 3]
    for session_id, init in shared["inits"].items():
        assert init == [1280, 720]
        assert shared["typed"][session_id] == f"typed-{session_id}"
    assert set(shared["stopped_elsewhere"].values()) == {"stopped"}
    assert shared["text_elsewhere"] == "elsewhere-5"
    status, answer = shared["callback_elsewhere"]
    assert status == 502  # reached the session's loopback, where nothing listens
    assert "nothing listens on localhost:8765 in the session" in answer["message"]


def test_readyz_metrics_and_the_store_show_each_worker_and_its_sessions(
    run: dict[str, Any],
) -> None:
    """/readyz lists the head and both workers with their slots, free slots and this controller's
    sessions, /metrics has the same per host, the store and the API name each session's worker,
    and once w1 is killed /readyz shows it down with no free slot."""
    placed: dict[str, str] = run["hosts"]
    on = {name: sorted(s for s, h in placed.items() if h == name) for name in ("w1", "w2")}
    readyz = run["readyz"]
    assert sorted(readyz) == ["head", "w1", "w2"]
    assert (readyz["head"]["slots"], readyz["head"]["sessions"]) == (0, [])
    for name in ("w1", "w2"):
        host = readyz[name]
        assert (host["up"], host["slots"], host["sessions"]) == (True, SLOTS, on[name])
        assert host["slots_free"] == SLOTS - len(on[name])
        assert f'remotecli_host_sessions{{host="{name}"}} {float(len(on[name]))}' in run["metrics"]
        assert f'remotecli_host_slots{{host="{name}"}} {float(SLOTS)}' in run["metrics"]
        free = f'remotecli_host_slots_free{{host="{name}"}} {float(SLOTS - len(on[name]))}'
        assert free in run["metrics"]
        assert f'remotecli_host_up{{host="{name}"}} 1.0' in run["metrics"]
    assert run["api_hosts"] == placed
    assert run["store_hosts"] == placed
    lost = run["readyz_after_loss"]["w1"]
    assert (lost["up"], lost["slots_free"]) == (False, 0)
    assert run["readyz_after_loss"]["w2"]["up"] is True


def test_a_silent_controllers_session_is_taken_over_and_keeps_running(
    run: dict[str, Any],
) -> None:
    """A session made at the second controller, which then shut down keeping it, is adopted by
    the first no sooner than the takeover bound after the second's last heartbeat and within a
    few store-watch rounds of it; it is still ready, is typed into through the first
    controller's gateway, and is deleted there."""
    check_taken_over(run["takeover"])


def test_a_killed_controllers_session_is_taken_over_and_keeps_running(
    run: dict[str, Any],
) -> None:
    """A session made at a third controller, in its own process, which was then killed
    (SIGKILL: no shutdown, its Ray driver gone with it), is adopted by the first as a silent
    one's is: its detached actor outlived its driver, it is still ready, typed into through
    the first controller's gateway, and deleted there."""
    check_taken_over(run["killed_takeover"])


def test_a_killed_controllers_run_is_ended_and_its_slot_freed(run: dict[str, Any]) -> None:
    """The killed controller's run (``sleep 600`` after its first line) is ended by the first
    controller once it takes over: failed with a reason naming the killed one, and its actor,
    which held a slot on a host, is gone."""
    killed = run["killed_run"]
    assert killed["state"] == "failed"
    assert killed["reason"].startswith(f"its controller {killed['lost']} went silent")
    assert killed["controller"] != killed["lost"]
    assert killed["actor_gone"] is True


def check_taken_over(taken: dict[str, Any]) -> None:
    """The adoption came no sooner than the bound after the last heartbeat and within a few
    store-watch rounds; the session was still ready, was typed into and then stopped."""
    print(f"session adopted {taken['seconds']:.1f} s after its controller's last heartbeat")
    assert TAKEOVER_AFTER <= taken["seconds"] < TAKEOVER_AFTER + 5
    assert taken["state"] == "ready"
    assert taken["init"] == [1280, 720]
    assert taken["typed"] == f"taken-{taken['session']}"
    assert taken["stopped"] == "stopped"


def test_the_channel_refuses_a_missing_or_wrong_secret(run: dict[str, Any]) -> None:
    """Inside TLS pinning the session's certificate, a connection without the secret or with a
    wrong one gets no byte, the right one RFB; plain TCP with the right secret gets no byte."""
    assert run["channel_tls"] is True
    assert run["no_secret"] == ""
    assert run["wrong_secret"] == ""
    assert run["right_secret_plain_tcp"] == ""
    assert run["right_secret"].startswith("RFB 003.")


def test_a_killed_worker_fails_its_sessions_and_new_ones_go_elsewhere(
    run: dict[str, Any],
) -> None:
    """Killing w1 fails its sessions with "host w1 lost" within the bound; the next is on w2."""
    assert run["lost"]
    for reason, seconds in run["lost"].values():
        assert "host w1 lost" in reason
        print(f"session on w1 failed {seconds:.2f} s after the kill: {reason}")
        assert seconds < LOST_BOUND * MS * 1000
    assert run["after_host"] == "w2"
    assert run["after_init"] == [1280, 720]


def session_cgroups(session_id: str) -> list[Path]:
    """The session's cgroups in every hierarchy (each under its own ``remotecli`` parent, which
    sits where the creating process's own cgroup was: the root, or a few levels below)."""
    root = Path("/sys/fs/cgroup")
    patterns = ["*/" * depth + f"remotecli/{session_id}" for depth in range(1, 5)]
    return [cgroup for pattern in patterns for cgroup in root.glob(pattern)]


ALIVE_AT_MOST = """
import ray, sys, time
ray.init(address="ADDRESS", logging_level="ERROR")
deadline = time.monotonic() + 30
while sum(node["Alive"] for node in ray.nodes()) > COUNT:
    if time.monotonic() > deadline:
        sys.exit("a killed host is still alive in Ray's node table")
    time.sleep(0.2)
"""

SWEEP_PROBE = """
import json, sys, ray
from remotecli.cluster import placement
placement.connect(sys.argv[1])
spec = {"provider": "shell", "command": ["true"], "run": True, "host": {"egress": "none"}}
placed = placement.place_session("sweep-probe", spec)
actor = ray.get_actor(placement.actor_name("sweep-probe"), namespace=placement.NAMESPACE)
swept = ray.get(actor.swept.remote(), timeout=60)
placement.end_session("sweep-probe")
print("RESULT " + json.dumps({"host": placed.host, "swept": swept}), flush=True)
"""


def test_a_lost_hosts_leftovers_are_swept_when_it_runs_again(
    run: dict[str, Any], cluster: Cluster
) -> None:
    """w1 was killed with sessions on it; their directories stayed on the host (its kernel
    lives on). w1 joins again and w2 goes: the first actor placed on w1 sweeps them (each id
    reported swept), and their directories and cgroups are gone."""
    w1, w2 = cluster.workers
    lost = sorted(run["lost"])
    sessions = cluster.data_dir(w1) / "s"
    assert all((sessions / sid).is_dir() for sid in lost)  # what the kill left
    w2.kill()  # first, and known dead: the probe must not be placed on a dying host
    gone = cluster.python(ALIVE_AT_MOST.replace("COUNT", "1").replace("ADDRESS", cluster.address))
    assert gone.returncode == 0, gone.stderr[-2000:]
    cluster.start_node(w1, NodeSettings(slots=SLOTS), head=False)
    wait_for_nodes(cluster, 2)
    done = cluster.python(SWEEP_PROBE.replace("sys.argv[1]", repr(cluster.address)))
    assert "RESULT " in done.stdout, done.stderr[-3000:]
    probe = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert probe["host"] == "w1"
    assert sorted(probe["swept"]) == lost
    assert [p.name for p in sessions.iterdir()] == []
    assert [c for s in lost for c in session_cgroups(s)] == []


def test_nothing_is_left_after_teardown(run: dict[str, Any], cluster: Cluster) -> None:
    """Ended sessions leave no actor, no session directory on w2, and the cluster nothing."""
    assert run["left"] == []
    assert sorted(run["states"].values()).count("failed") == len(run["lost"])
    for path in run["survivor_dirs"].values():
        sessions = Path(path) / "s"
        assert not sessions.exists() or list(sessions.iterdir()) == []
    cluster.stop()
    assert leftovers(cluster.network.prefix) == []
    # The killed host's kernel lives on here: its lost sessions' cgroups stayed, empty, until
    # that host ran again and swept them (the test above); any still here is removed, named.
    left = []
    for session_id in run["lost"]:
        for cgroup in session_cgroups(session_id):
            assert (cgroup / "cgroup.procs").read_text() == ""
            cgroup.rmdir()
            left.append(str(cgroup))
    assert left == []
