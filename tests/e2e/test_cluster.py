"""Sessions placed by Ray on a real three-node cluster (head, two workers) in network namespaces.

One cluster for the module (tests/ray_cluster.py): token authentication on, dashboard off, the
tuned health checks, two session slots per worker. Each test drives it as a controller would,
from a Ray driver process in a namespace of its own. The last test kills a worker, so the
order of the tests matters.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_skip import skip_module_unless
from tests.conftest import MS

pytestmark = pytest.mark.e2e


skip_module_unless(
    "tests/e2e/test_cluster.py",
    "it creates network namespaces and veth pairs",
    ("ip", "unshare"),
    "install iproute2 and util-linux",
)

from remotecli.cluster.watch import LOST_BOUND  # noqa: E402
from tests.ray_cluster import Cluster, leftovers, ray_cluster  # noqa: E402

PRELUDE = """
import json, socket, time
from remotecli.cluster import placement, watch
from remotecli.exceptions import ClusterError
placement.connect(ADDRESS)
def banner(p):
    with socket.create_connection((p.node_ip, p.port), timeout=5) as s:
        return s.recv(12).decode()
def out(value):
    print("RESULT " + json.dumps(value), flush=True)
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One real cluster for the module, Ray's TLS on, removed after its last test."""
    root = Path("/tmp") / f"rc-test-{os.getpid()}"
    prefix = f"rt{os.getpid() % 100000}"
    with ray_cluster(root, workers=2, slots=2, prefix=prefix, tls=True) as running:
        yield running


def drive(cluster: Cluster, code: str, *, timeout: float = 120, **options: Any) -> Any:
    """Run ``code`` as a controller's Ray driver; return what it passed to ``out``."""
    program = f"ADDRESS = {cluster.address!r}\n{PRELUDE}\n{code}"
    done = cluster.python(program, timeout=timeout * MS * 1000, **options)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise AssertionError(f"the driver gave no result ({done.returncode}): {done.stderr[-3000:]}")


def test_sessions_fill_one_host_then_the_next(cluster: Cluster) -> None:
    """Ray places sessions by slots: two per worker, each reachable, a fifth finds no slot."""
    result = drive(
        cluster,
        """
placed = [placement.place_session(f"s{i}") for i in range(4)]
hosts = sorted(p.host for p in placed)
banners = [banner(p) for p in placed]
try:
    placement.place_session("s4", timeout=3)
    refused = None
except ClusterError as exc:
    refused = exc.message
for p in placed:
    placement.end_session(p.session_id)
out({"hosts": hosts, "banners": banners, "refused": refused,
     "ips": sorted({p.node_ip for p in placed})})
""",
    )
    assert result["hosts"] == ["w1", "w1", "w2", "w2"]
    assert result["ips"] == ["10.200.0.2", "10.200.0.3"]
    assert result["banners"] == ["RFB 003.008\n"] * 4
    assert "no host took session s4" in result["refused"]


def test_driver_without_the_token_is_refused(cluster: Cluster) -> None:
    """A driver with no token, or a wrong one, cannot join the cluster."""
    program = f"""
import json
from remotecli.cluster import placement
from remotecli.exceptions import ClusterError
try:
    placement.connect({cluster.address!r})
    answer = "joined"
except ClusterError as exc:
    answer = exc.message
print("RESULT " + json.dumps(answer), flush=True)
"""
    for extra in ({}, {"RAY_AUTH_TOKEN": "0" * 64}):
        done = cluster.python(program, token=False, extra=extra, timeout=120)
        assert "RESULT" in done.stdout, done.stderr[-3000:]
        answer = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        assert answer.startswith(f"cannot join the Ray cluster at {cluster.address}"), answer


PROBE = """
import json, socket, ssl, sys
HTTP2 = b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes.fromhex("000000040000000000")
def answer(host, port, context):
    with socket.create_connection((host, port), timeout=10) as raw:
        sock = raw
        try:
            if context is not None:
                sock = context.wrap_socket(raw, server_hostname=host)
            sock.sendall(HTTP2)
            data = sock.recv(9)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            return "refused: " + type(exc).__name__
        return data.hex()
def context(ca, cert=None, key=None):
    made = ssl.create_default_context(cafile=ca)
    made.set_alpn_protocols(["h2"])
    if cert is not None:
        made.load_cert_chain(cert, key)
    return made
host, port, ca, ours, other = sys.argv[1:6]
found = {
    "plain": answer(host, int(port), None),
    "no certificate": answer(host, int(port), context(ca)),
    "another CA's certificate": answer(
        host, int(port), context(ca, other + "/node.crt", other + "/node.key")
    ),
    "the cluster's certificate": answer(
        host, int(port), context(ca, ours + "/node.crt", ours + "/node.key")
    ),
}
print("RESULT " + json.dumps(found), flush=True)
"""


def test_rays_traffic_needs_a_certificate_from_the_clusters_ca(cluster: Cluster) -> None:
    """Ray's TLS on, from the hosts' network: the GCS answers an HTTP/2 (gRPC) client that
    shows a certificate from the cluster's CA with a SETTINGS frame, and nobody else. Plain
    TCP, TLS without a client certificate and TLS with another CA's certificate get no HTTP/2
    frame: the token never crosses the wire in the clear, and holding it is not enough."""
    from remotecli.cluster.ray_tls import issue, make_ca

    make_ca(cluster.root / "attacker-ca")
    issue(
        cluster.root / "attacker-ca", cluster.root / "attacker", [cluster.controller_address], "x"
    )
    ca = str(cluster.tls_dirs["controller"] / "ca.crt")
    args = [cluster.head.address, "6379", ca, str(cluster.tls_dirs["controller"])]
    args.append(str(cluster.root / "attacker"))
    done = cluster.run_python(["-c", PROBE, *args])
    assert "RESULT " in done.stdout, done.stderr[-3000:]
    found = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    print(found)
    settings = found.pop("the cluster's certificate")
    assert settings[6:8] == "04", settings  # an HTTP/2 frame of type SETTINGS
    for who, seen in found.items():
        assert seen.startswith("refused") or seen[6:8] != "04", (who, seen)
        assert seen == "" or seen.startswith(("refused", "15")), (who, seen)  # 0x15: TLS alert


def test_restarted_controller_finds_its_sessions(cluster: Cluster) -> None:
    """Detached named actors outlive their driver: the next driver finds them by name."""
    first = drive(
        cluster,
        """
placed = [placement.place_session(f"r{i}") for i in range(2)]
out([[p.session_id, p.host, p.port] for p in placed])
""",
    )
    second = drive(
        cluster,
        """
found = placement.find_sessions()
alive = {i: banner(p) for i, p in found.items()}
out({"found": sorted([p.session_id, p.host, p.port] for p in found.values()), "alive": alive})
for session_id in found:
    placement.end_session(session_id)
""",
    )
    assert second["found"] == sorted(first)
    assert second["alive"] == {"r0": "RFB 003.008\n", "r1": "RFB 003.008\n"}


def lose_host(cluster: Cluster, name: str, sessions: int, how: str) -> dict[str, Any]:
    """Place ``sessions`` sessions, make host ``name`` fail (``kill`` or ``cut``), and return
    what a watching driver saw: each lost session's reason and seconds, then a new placement."""
    signal_dir = cluster.root / f"lose-{name}"
    signal_dir.mkdir()
    code = f"""
import pathlib, threading
signals = pathlib.Path({str(signal_dir)!r})
placed = [placement.place_session(f"{name}-{{i}}") for i in range({sessions})]
(signals / "placed").write_text(json.dumps(sorted({{p.host for p in placed}})))
while not (signals / "failed").exists():
    time.sleep(0.05)
failed_at = float((signals / "failed").read_text())
reasons = {{}}
def watch_one(p):
    reasons[p.session_id] = [watch.wait_session(p), time.time() - failed_at, p.host]
threads = [threading.Thread(target=watch_one, args=(p,)) for p in placed if p.host == {name!r}]
for t in threads: t.start()
for t in threads: t.join()
table = watch.check_hosts({{p.session_id: p for p in placed}})
# Free one place on a living host (Ray may have filled them): the new session must find it.
survivors = [p for p in placed if p.host != {name!r}]
if survivors:
    placement.end_session(survivors[0].session_id)
    placed.remove(survivors[0])
try:
    after = placement.place_session("{name}-new", timeout=10)
    new = [after.host, banner(after)]
    placed.append(after)
except ClusterError as exc:
    new = [None, exc.message]
out({{"placed": sorted({{p.host for p in placed}}), "reasons": reasons, "table": table,
     "new": new}})
for p in placed:
    if p.host != {name!r}:
        placement.end_session(p.session_id)
"""
    process = cluster.popen_python(f"ADDRESS = {cluster.address!r}\n{PRELUDE}\n{code}")
    deadline = time.monotonic() + 60_000 * MS
    while not (signal_dir / "placed").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the sessions were not placed"
        time.sleep(0.05)
    victim = next(node for node in cluster.workers if node.name == name)
    if how == "kill":
        victim.kill()
    else:
        cluster.network.cut(name)
    (signal_dir / "failed").write_text(str(time.time()))
    stdout, stderr = process.communicate(timeout=120_000 * MS)
    assert "RESULT " in stdout, stderr[-3000:]
    result: dict[str, Any] = json.loads(stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["reasons"], f"no session was on {name}"
    for reason, seconds, host in result["reasons"].values():
        assert (reason, host) == (f"host {name} lost", name)
        print(f"session on {name} ({how}) reported lost {seconds:.2f} s after the failure")
        assert seconds < LOST_BOUND * MS * 1000
    assert set(result["table"]) == set(result["reasons"])
    return result


def test_killed_host_sessions_are_lost_within_the_bound(cluster: Cluster) -> None:
    """Killing a worker's processes: its sessions end "host w1 lost" in bound, new ones go to w2.

    Four sessions fill both workers' two slots each, whatever order Ray takes them in."""
    result = lose_host(cluster, "w1", 4, "kill")
    assert result["placed"] == ["w1", "w2"]
    assert result["new"] == ["w2", "RFB 003.008\n"]


def test_silent_host_sessions_are_lost_within_the_bound(cluster: Cluster) -> None:
    """A worker whose link is cut (processes alive, no answer) is lost in bound; none is left."""
    result = lose_host(cluster, "w2", 1, "cut")
    assert result["placed"] == ["w2"]
    assert result["new"][0] is None
    assert "no host took session w2-new" in result["new"][1]


def test_status_command_shows_hosts_and_refuses_a_wrong_token(cluster: Cluster) -> None:
    """`remotecli cluster status` lists the hosts by name (two now dead, no session left) and
    fails with a wrong token."""
    tls = ["--tls-dir", str(cluster.tls_dirs["controller"])]
    status = ["-m", "remotecli", "cluster", "status", cluster.address, *tls, "--token-file"]
    done = cluster.run_python([*status, str(cluster.token_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(done.stdout.splitlines())
    assert lines == [
        "head\t10.200.0.1\talive\t0 of 0 slots free\t0 sessions",
        "w1\t10.200.0.2\tdead\t0 of 0 slots free\t0 sessions",
        "w2\t10.200.0.3\tdead\t0 of 0 slots free\t0 sessions",
    ]
    wrong = cluster.root / "wrong_token"
    wrong.write_text("0" * 64)
    done = cluster.run_python([*status, str(wrong)])
    assert done.returncode == 1
    assert "Unauthenticated" in done.stderr  # the GCS's own word, logged by Ray's client
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot join the Ray cluster at {cluster.address}"), last


def test_teardown_leaves_nothing(cluster: Cluster) -> None:
    """After the cluster stops, no namespace, veth or Ray process of it is left."""
    cluster.stop()
    assert leftovers(cluster.network.prefix) == []
