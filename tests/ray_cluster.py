"""A real multi-node Ray cluster on this one machine, each node in network namespaces of its own.

Theory of operation. A hub namespace holds a Linux bridge with no address; every other
namespace (the head, each worker, the controller that drives them) gets one end of a veth pair
with an address in 10.200.0.0/24, the other end enslaved to the bridge. Nothing is added to the
host's own namespace, so the host's routes and addresses never change. Each Ray node runs as
``ray start --block`` inside ``unshare --pid --fork --kill-child --mount-proc``: the node's
processes (raylet, GCS, workers, agents) live in a PID namespace of their own, so killing the
one ``unshare`` process kills the whole node at once, as a host that loses power would, and
``ray stop`` (which matches process names host-wide) is never needed. Removing the namespaces
removes the veths with them. What this leaves out: real separate kernels, clocks and disks; all
nodes share this machine's 2 cores and one /tmp (each with its own ``--temp-dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.cluster.actor import DATA_DIR_VARIABLE, HOST_NAME_VARIABLE
from remotecli.cluster.nodes import NodeSettings, ray_start_argv
from remotecli.cluster.ray_tls import issue, make_ca, tls_environment

SUBNET = "10.200.0"
"""The private test range; addresses exist only inside the namespaces made here."""


def run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command and return its result (raise with its stderr when it fails)."""
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@dataclass
class Node:
    """One Ray node: its namespace, address and the ``unshare`` process that holds it."""

    name: str
    netns: str
    address: str
    temp_dir: Path
    process: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        """Kill every process of the node at once and return once none of them is left.

        SIGKILL to the holder makes the kernel kill the node's PID namespace, but that
        teardown is asynchronous: a raylet with a large address space can outlive the holder by
        a moment. Stragglers (found by the node's temp directory on their command line) are
        killed again until ``/proc`` shows none, so a leftovers check after this is not a race.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 20
        while stragglers := processes_naming(str(self.temp_dir)):
            if time.monotonic() > deadline:
                break  # the leftovers check names them
            for pid, _ in stragglers:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


@dataclass
class TestNetwork:
    """The namespaces and veths of one cluster; :meth:`remove` takes every one away."""

    prefix: str
    hub: str
    namespaces: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, prefix: str) -> TestNetwork:
        """Create the hub namespace and its bridge."""
        network = cls(prefix, f"{prefix}hub")
        run(["ip", "netns", "add", network.hub])
        network.namespaces.append(network.hub)
        run(["ip", "-n", network.hub, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", network.hub, "link", "set", "br0", "up"])
        return network

    def add(self, name: str, host: int) -> tuple[str, str]:
        """Create namespace ``<prefix><name>`` joined to the bridge at 10.200.0.<host>."""
        netns = f"{self.prefix}{name}"
        run(["ip", "netns", "add", netns])
        self.namespaces.append(netns)
        outer = f"{self.prefix}{name}"[:15]
        run(["ip", "link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", netns])
        run(["ip", "link", "set", outer, "netns", self.hub])
        run(["ip", "-n", self.hub, "link", "set", outer, "master", "br0", "up"])
        address = f"{SUBNET}.{host}"
        run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
        run(["ip", "-n", netns, "link", "set", "eth0", "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        return netns, address

    def cut(self, name: str) -> None:
        """Take a namespace's link to the bridge down: the host stops answering, processes live."""
        run(["ip", "-n", self.hub, "link", "set", f"{self.prefix}{name}"[:15], "down"])

    def remove(self) -> None:
        """Delete every namespace made here (their veths go with them)."""
        for netns in reversed(self.namespaces):
            run(["ip", "netns", "del", netns], check=False)
        self.namespaces.clear()


def leftovers(prefix: str) -> list[str]:
    """Name what a cluster with ``prefix`` left behind: namespaces, veths, Ray processes."""
    found = [line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines()]
    left = [f"netns {name}" for name in found if name.startswith(prefix)]
    links = run(["ip", "-o", "link", "show"]).stdout
    left += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if prefix in line]
    left += [f"process {pid}: {cmdline[:120]}" for pid, cmdline in processes_naming(prefix)]
    return left


def processes_naming(text: str) -> list[tuple[int, str]]:
    """The live processes whose command line contains ``text`` (zombies have none)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if text in cmdline:
                found.append((int(proc.name), cmdline))
    return found


@dataclass
class Cluster:
    """A head and workers, each in its own namespace, plus a controller namespace to drive them."""

    network: TestNetwork
    token_path: Path
    root: Path
    head: Node
    workers: list[Node]
    controller_netns: str
    controller_address: str
    node_env: dict[str, str] = field(default_factory=dict)
    """More variables for each node's ``ray start``."""
    tls_dirs: dict[str, Path] = field(default_factory=dict)
    """With Ray's TLS on: each node's certificate directory by name, the controllers' as
    ``controller`` (:mod:`remotecli.cluster.ray_tls`); empty: Ray's traffic is plain."""

    @property
    def address(self) -> str:
        """The GCS address a driver or a joining node connects to."""
        return f"{self.head.address}:6379"

    def env(self, *, token: bool = True, tls: bool = True) -> dict[str, str]:
        """The environment of a Ray process of this cluster (token auth on, no usage stats),
        with the controllers' TLS certificate when the cluster has TLS and ``tls``."""
        env = dict(os.environ)
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
            env.pop(name, None)
        env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", HOME=str(self.root))
        if token:
            env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        if tls and "controller" in self.tls_dirs:
            env.update(tls_environment(self.tls_dirs["controller"]))
            env["REMOTECLI_CLUSTER_TLS_DIR"] = str(self.tls_dirs["controller"])
        env["PYTHONPATH"] = os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / "src"), str(Path(__file__).parent.parent)]
        )
        return env

    def start_node(self, node: Node, settings: NodeSettings, *, head: bool) -> None:
        """Start ``ray start --block`` for the node in its namespaces; return once it runs."""
        argv = ray_start_argv(
            dataclasses.replace(settings, name=node.name),
            head_address=None if head else self.address,
            node_ip=node.address,
            temp_dir=node.temp_dir,
            block=True,
        )
        ray = str(Path(sys.executable).parent / "ray")
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the host's cgroup
        # hierarchies from the local driver the session actors run.
        holder = ["nsenter", f"--net=/var/run/netns/{node.netns}"]
        holder += ["unshare", "--pid", "--fork", "--kill-child"]
        holder += ["--mount-proc", ray, *argv[1:]]
        log = (self.root / f"{node.name}.log").open("wb")
        env = self.env()
        env[HOST_NAME_VARIABLE] = node.name  # the name a lost host is reported by
        env[DATA_DIR_VARIABLE] = str(self.data_dir(node))
        env.update(self.node_env)
        if node.name in self.tls_dirs:
            env.update(tls_environment(self.tls_dirs[node.name]))
        node.process = subprocess.Popen(holder, stdout=log, stderr=subprocess.STDOUT, env=env)

    def data_dir(self, node: Node) -> Path:
        """Where the node's sessions' directories go (short: Unix socket paths must fit)."""
        return self.root / f"{node.name}d"

    def python(
        self, code: str, *, token: bool = True, timeout: float = 120, extra: Mapping[str, str] = {}
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python program as a Ray driver in the controller's namespace."""
        env = self.env(token=token)
        env.update(extra)
        argv = ["ip", "netns", "exec", self.controller_netns, sys.executable, "-c", code]
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )

    def run_python(
        self, args: Sequence[str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python ARGS`` in the controller's namespace with no Ray variables but the mode
        (no token, no TLS: the command line must say them)."""
        env = self.env(token=False, tls=False)
        argv = ["ip", "netns", "exec", self.controller_netns, sys.executable, *args]
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )

    def popen_python(self, code: str) -> subprocess.Popen[str]:
        """Start a Python program as a Ray driver in the controller's namespace; do not wait."""
        argv = ["ip", "netns", "exec", self.controller_netns, sys.executable, "-c", code]
        return subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env()
        )

    def stop(self) -> None:
        """Kill every node and remove the network; idempotent."""
        for node in [*self.workers, self.head]:
            node.kill()
        self.network.remove()


@contextlib.contextmanager
def ray_cluster(
    root: Path,
    *,
    workers: int = 2,
    slots: int = 2,
    system_config: Mapping[str, int] | None = None,
    prefix: str | None = None,
    drivers: Sequence[str] = (),
    default_route: bool = False,
    node_env: Mapping[str, str] | None = None,
    tls: bool = False,
) -> Iterator[Cluster]:
    """Start a head (no slots) and ``workers`` nodes (``slots`` each; worker i joins with
    ``drivers[i]``, ``local`` past their end); tear all down after.

    ``default_route``: each worker routes what is not on the cluster's subnet via the head, as
    a host with a way out would (pasta, a session's egress ``open``, needs one); nothing
    answers there. ``node_env``: more variables for every worker's ``ray start`` (what
    ``cluster join`` would set, such as a microVM host's image cache). ``tls``: Ray's traffic
    is encrypted, each node and the controllers with a certificate for their address from one
    CA made here (``cluster tls-ca``, ``tls-cert``)."""
    prefix = prefix or f"rc{os.getpid() % 100000}"
    root.mkdir(parents=True, exist_ok=True)
    token_path = root / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    network = TestNetwork.create(prefix)
    started: list[Node] = []
    try:
        head_ns, head_ip = network.add("h", 1)
        head = Node("head", head_ns, head_ip, root / "head")
        nodes = []
        for index in range(workers):
            netns, address = network.add(f"w{index + 1}", 2 + index)
            nodes.append(Node(f"w{index + 1}", netns, address, root / f"w{index + 1}"))
            if default_route:
                run(["ip", "-n", netns, "route", "add", "default", "via", head_ip, "dev", "eth0"])
        ctl_ns, ctl_ip = network.add("c", 10)
        cluster = Cluster(network, token_path, root, head, nodes, ctl_ns, ctl_ip)
        cluster.node_env = dict(node_env or {})
        if tls:
            make_ca(root / "tls-ca")
            for node in [head, *nodes]:
                cluster.tls_dirs[node.name] = issue(
                    root / "tls-ca", root / f"tls-{node.name}", [node.address], node.name
                )
            cluster.tls_dirs["controller"] = issue(
                root / "tls-ca", root / "tls-controller", [ctl_ip], "controller"
            )
        started.append(head)
        cluster.start_node(head, NodeSettings(slots=0, system_config=system_config), head=True)
        wait_for_nodes(cluster, 1)
        for index, node in enumerate(nodes):
            started.append(node)
            driver = drivers[index] if index < len(drivers) else "local"
            cluster.start_node(node, NodeSettings(slots=slots, driver=driver), head=False)
        wait_for_nodes(cluster, 1 + workers)
        yield cluster
    finally:
        for node in reversed(started):
            node.kill()
        network.remove()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_nodes(cluster: Cluster, count: int, timeout: float = 90) -> None:
    """Wait until ``count`` nodes are alive in the cluster, as a token-holding driver sees it."""
    code = (
        "import ray, time, sys\n"
        f"ray.init(address={cluster.address!r}, logging_level='ERROR')\n"
        f"deadline = time.monotonic() + {timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
        "    if time.monotonic() > deadline: sys.exit('nodes did not come up')\n"
        "    time.sleep(0.2)\n"
    )
    deadline = time.monotonic() + timeout
    while True:
        done = cluster.python(code, timeout=timeout + 30)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster did not reach {count} nodes: {done.stderr[-2000:]}")
        time.sleep(1)
