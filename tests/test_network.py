"""Tests for the session's network: pasta egress, the host filter, reaching a session's loopback.

The root tests start real bubblewrap sandboxes the way the local driver does (as root, dropped to
a test uid with ``setpriv``, blocked on ``--block-fd`` while pasta is set up) and run Debian's
``/usr/bin/python3`` inside as the hostile user's code.

Network rule of the test machine: traffic goes only to loopback or into namespaces these tests
create. "The internet" is a server in a test namespace at 198.51.100.1 (and 2001:db8:100::1), "a
private network" one at 10.213.0.1 (and fd13:213::1); the host reaches each through a veth pair
whose host end (198.51.100.2, 10.213.0.2, ...) is one of the host's own addresses. A server saw
no connection when the first connection it ever answers is the test's own, made afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from remotecli.exceptions import DriverError, UpstreamRefused
from remotecli.sandbox import network
from remotecli.sandbox.egress import (
    BLOCKED_V4,
    BLOCKED_V6,
    EgressFilter,
    egress_ruleset,
    nameservers_from_resolv_conf,
)
from remotecli.sandbox.network import Pasta, connect_loopback, create_socket_in, tun_problem
from tests.conftest import MS


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces, nftables and pasta --runas"
    for tool in ("pasta", "nft", "bwrap", "setpriv", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}: run scripts/install-system-deps.sh test"
    if not Path("/usr/bin/python3").exists():
        return "the probes need Debian's /usr/bin/python3"
    return tun_problem()


_MISSING = _missing()
# The reason is printed in the summary (-ra, the project's default addopts).
needs_root = pytest.mark.skipif(_MISSING is not None, reason=str(_MISSING))

# Overriding event_loop_policy is deprecated in pytest-asyncio, as in the gateway's tests.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')

TIMEOUT = 10_000 * MS
PROBE_TIMEOUT = 2_000 * MS
"""How long a session's probe waits for a connect: blocked ones end here (pasta's RST is lost)."""
UID_FIRST = 3_100_000
"""Test sandboxes run as 3100000 and up: outside the production range (3000000-3065535)."""
UID_LAST = 3_100_999
LOOPBACK_PORT = 1455
LOCK_PATH = Path("/run/lock/remotecli-test-network.lock")

# A banner server: answers every connection with "NAME #N", N counting from 1, then closes.
# Its first line on stdout is the port it listens on.
SERVER = textwrap.dedent(
    """
    import socket, sys
    name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    print(s.getsockname()[1], flush=True)
    n = 0
    while True:
        conn, _ = s.accept()
        n += 1
        conn.sendall(f"{name} #{n}\\n".encode())
        conn.close()
    """
)

# Connects to every HOST:PORT argument at once and prints one JSON object: target -> outcome,
# "answer: LINE" or "error: ERRNO-NAME".
PROBE = textwrap.dedent(
    """
    import errno, json, socket, sys, threading
    timeout = float(sys.argv[1])
    results = {}
    def probe(target):
        host, _, port = target.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as s:
                s.settimeout(timeout)
                results[target] = "answer: " + s.recv(200).decode().strip()
        except TimeoutError:
            results[target] = "error: ETIMEDOUT"
        except OSError as exc:
            results[target] = "error: " + errno.errorcode.get(exc.errno or 0, str(exc))
    threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[2:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(results), flush=True)
    """
)


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli up` does."""
    return uvloop.EventLoopPolicy()


# --- the pure parts ------------------------------------------------------------------------------


def test_nameservers_from_resolv_conf() -> None:
    """Nameserver lines give their addresses in order, zone indexes dropped, junk skipped."""
    text = (
        "# comment\nsearch example.org\nnameserver 10.255.255.53\nnameserver fe80::1%eth0\n"
        "nameserver not-an-address\nnameserver 10.255.255.53\noptions ndots:2\n"
    )
    assert nameservers_from_resolv_conf(text) == ("10.255.255.53", "fe80::1")


def test_blocked_ranges_include_nat64_of_private_ranges_only() -> None:
    """NAT64 of each blocked IPv4 range is blocked, the rest of the NAT64 prefix is not."""
    assert "64:ff9b::a00:0/104" in BLOCKED_V6  # 10.0.0.0/8
    assert "64:ff9b::7f00:0/104" in BLOCKED_V6  # 127.0.0.0/8
    assert "64:ff9b::a9fe:0/112" in BLOCKED_V6  # 169.254.0.0/16
    assert "64:ff9b::/96" not in BLOCKED_V6
    assert len(BLOCKED_V4) == 10


def test_ruleset_judges_only_the_uid_range_and_opens_dns_to_nameservers() -> None:
    """The script replaces the table atomically, filters the uid range, and opens port 53 only."""
    script = egress_ruleset("t_x", 3_000_000, 3_065_535, ["10.255.255.53", "fd00::53"])
    lines = script.splitlines()
    assert lines[:3] == ["table inet t_x", "delete table inet t_x", "table inet t_x {"]
    assert "meta skuid 3000000-3065535 jump sandbox" in script
    assert "elements = { 10.255.255.53 }" in script
    assert "elements = { fd00::53 }" in script
    assert "th dport 53 ip daddr @dns_v4 accept" in script
    assert "fib daddr type { local, broadcast, anycast, multicast }" in script


@pytest.mark.parametrize(
    ("table", "first", "last", "nameservers"),
    [
        ("bad name; flush ruleset", 3_000_000, 3_000_001, []),
        ("t", 0, 10, []),
        ("t", 20, 10, []),
        ("t", 3_000_000, 3_000_001, ["example.org"]),
    ],
)
def test_ruleset_refuses_bad_input(
    table: str, first: int, last: int, nameservers: list[str]
) -> None:
    """A non-identifier table, a range with uid 0 or reversed, a non-address nameserver fail."""
    with pytest.raises(DriverError):
        egress_ruleset(table, first, last, nameservers)


def test_namespace_parsers_find_default_routes_and_addresses() -> None:
    """The /proc/net readers find a default route's interface and non-loopback addresses."""
    route = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    fib_trie = (
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 127.0.0.1\n        /32 host LOCAL\n"
        "     |-- 192.0.2.2\n        /32 host LOCAL\n     |-- 192.0.2.255\n"
        "        /32 link BROADCAST\n"
    )
    ipv6_route = (
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n"
        "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
        "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n"
    )
    if_inet6 = (
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fd000000000000000000000000000002 02 40 00 80     eth0\n"
        "fe8000000000000000fc00fffe000001 02 40 20 80     eth0\n"
    )
    assert network.default_routes_v4(route) == {"eth0"}
    assert network.local_addresses_v4(fib_trie) == {"192.0.2.2"}
    assert network.default_routes_v6(ipv6_route) == {"eth0"}
    assert network.global_address_interfaces_v6(if_inet6) == {"eth0"}
    assert network.default_routes_v4(route.splitlines()[0]) == set()


def test_tun_problem_names_a_missing_device_and_the_fix(tmp_path: Path) -> None:
    """A missing device is reported with the way to get one."""
    problem = tun_problem(tmp_path / "tun")
    assert problem is not None
    assert "does not exist" in problem
    assert "modprobe tun" in problem


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a character device needs root")
def test_tun_problem_names_mode_0600_and_the_chmod(tmp_path: Path) -> None:
    """A TUN node of mode 0600 (as some containers create it) is reported with chmod 0666."""
    device = tmp_path / "tun"
    os.mknod(device, 0o020600, os.makedev(10, 200))
    os.chmod(device, 0o600)
    problem = tun_problem(device)
    assert problem is not None
    assert "mode 0600" in problem
    assert f"chmod 0666 {device}" in problem


# --- test networks, servers and sandboxes --------------------------------------------------------


@dataclass
class Netns:
    """A network namespace reached from the host through a veth pair (host end: host address)."""

    name: str
    host_if: str
    address: str
    host_address: str
    address6: str
    host_address6: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TIMEOUT)


@contextlib.contextmanager
def netns_pair(tag: str, v4: tuple[str, str], v6: tuple[str, str]) -> Iterator[Netns]:
    """Create namespace ``tag`` with ``v4[0]``/24 and ``v6[0]``/64, the host end taking ``[1]``."""
    suffix = os.getpid() % 100_000
    net = Netns(f"rcli-{tag}-{suffix}", f"rc{tag}{suffix}h", v4[0], v4[1], v6[0], v6[1])
    peer = f"rc{tag}{suffix}n"
    ip("netns", "add", net.name)
    try:
        ip("link", "add", net.host_if, "type", "veth", "peer", "name", peer, "netns", net.name)
        ip("addr", "add", f"{net.host_address}/24", "dev", net.host_if)
        ip("-6", "addr", "add", f"{net.host_address6}/64", "dev", net.host_if, "nodad")
        ip("link", "set", net.host_if, "up")
        ip("-n", net.name, "addr", "add", f"{net.address}/24", "dev", peer)
        ip("-n", net.name, "-6", "addr", "add", f"{net.address6}/64", "dev", peer, "nodad")
        ip("-n", net.name, "link", "set", peer, "up")
        ip("-n", net.name, "link", "set", "lo", "up")
        yield net
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", net.host_if)
        ip("netns", "del", net.name)


@pytest.fixture(scope="module")
def serialized() -> Iterator[None]:
    """Hold a host-wide lock: two runs of this module must not both claim the test subnets."""
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def internet(serialized: None) -> Iterator[Netns]:
    """ "The internet": a namespace at 198.51.100.1 and 2001:db8:100::1."""
    with netns_pair(
        "inet", ("198.51.100.1", "198.51.100.2"), ("2001:db8:100::1", "2001:db8:100::2")
    ) as net:
        yield net


@pytest.fixture(scope="module")
def private(serialized: None) -> Iterator[Netns]:
    """A private network: a namespace at 10.213.0.1 and fd13:213::1."""
    with netns_pair("priv", ("10.213.0.1", "10.213.0.2"), ("fd13:213::1", "fd13:213::2")) as net:
        yield net


class BannerServer:
    """A :data:`SERVER` process, on the host or in a test namespace."""

    def __init__(self, name: str, host: str, port: int, netns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.name = name
        self.host = host
        self.process = subprocess.Popen(
            [*prefix, "/usr/bin/python3", "-c", SERVER, name, host, str(port)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT)
        assert ready, f"server {name} did not start"
        self.port = int(self.process.stdout.readline())

    def target(self, host: str | None = None) -> str:
        host = host or self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def first_visit(self, via: str | None = None) -> str:
        """Connect from the host (root: never filtered) and return the banner received."""
        with socket.create_connection((via or self.host, self.port), timeout=TIMEOUT) as conn:
            return conn.recv(200).decode().strip()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def servers() -> Iterator[list[BannerServer]]:
    """Banner servers started by a test, killed at its end."""
    started: list[BannerServer] = []
    yield started
    for server in started:
        server.close()


def bwrap_command(uid: int, info_fd: int, block_fd: int, command: list[str]) -> list[str]:
    """The local driver's bubblewrap invocation, reduced to what the network needs."""
    return [
        "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--",
        "bwrap", "--unshare-user", "--uid", "1000", "--gid", "1000",
        "--unshare-net", "--unshare-pid", "--die-with-parent",
        "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
        "--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
        "--info-fd", str(info_fd), "--block-fd", str(block_fd),
        *command,
    ]  # fmt: skip


class Sandbox:
    """A bubblewrap sandbox started as the local driver does, blocked until :meth:`release`."""

    def __init__(self, uid: int, command: list[str]) -> None:
        self.uid = uid
        info_read, info_write = os.pipe()
        block_read, block_write = os.pipe()
        self.process = subprocess.Popen(
            bwrap_command(uid, info_write, block_read, command),
            pass_fds=(info_write, block_read),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        os.close(info_write)
        os.close(block_read)
        self._block = block_write
        try:
            self.child_pid = _read_child_pid(info_read)
        finally:
            os.close(info_read)
        # bubblewrap's child outlives a killed bubblewrap while it is blocked (no
        # --die-with-parent yet): kill() kills it first, through this pidfd.
        self._child = os.pidfd_open(self.child_pid)

    def release(self) -> None:
        """Let the sandbox run its command."""
        os.write(self._block, b"go")

    async def line(self) -> str:
        """Return the next line the command prints."""
        assert self.process.stdout is not None
        data = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), TIMEOUT)
        return data.decode().strip()

    def kill(self) -> None:
        """Kill the sandbox's first process (and so its PID namespace), then bubblewrap."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._child, signal.SIGKILL)
        os.close(self._child)
        try:  # bubblewrap reaps it and exits; killed first, it would leave a zombie to pid 1
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._block)
        assert self.process.stdout is not None
        self.process.stdout.close()


def wait_gone(pid: int) -> None:
    """Wait until process ``pid`` (not necessarily our child) has exited."""
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], TIMEOUT)
            assert ready, f"process {pid} did not exit"
        finally:
            os.close(pidfd)


def _read_child_pid(fd: int) -> int:
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        assert ready, "bubblewrap wrote no child pid"
        chunk = os.read(fd, 4096)
        assert chunk, f"bubblewrap exited before its child started: {data!r}"
        data += chunk
        with contextlib.suppress(ValueError):
            child_pid: int = json.loads(data)["child-pid"]
            return child_pid


class Sandboxes:
    """Starts sandboxes (each on the next test uid) and pasta for them; cleans both up."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Sandbox] = []
        self.pastas: list[Pasta] = []
        self._next_uid = UID_FIRST

    def start(self, command: list[str]) -> Sandbox:
        sandbox = Sandbox(self._next_uid, command)
        self._next_uid += 1
        self.started.append(sandbox)
        return sandbox

    async def pasta(self, sandbox: Sandbox) -> Pasta:
        uid = sandbox.uid
        pasta = await Pasta.start(
            sandbox.child_pid, uid, uid, log_path=self.log_dir / f"pasta-{uid}.log", timeout=TIMEOUT
        )
        self.pastas.append(pasta)
        return pasta

    async def probe(self, targets: list[str], *, egress: bool = True) -> dict[str, str]:
        """Run :data:`PROBE` in a new sandbox (with pasta when ``egress``); return its outcomes."""
        sandbox = self.start(["/usr/bin/python3", "-c", PROBE, str(PROBE_TIMEOUT), *targets])
        if egress:
            await self.pasta(sandbox)
        sandbox.release()
        outcome: dict[str, str] = json.loads(await sandbox.line())
        return outcome


@pytest.fixture
async def sandboxes(tmp_path: Path, serialized: None) -> AsyncIterator[Sandboxes]:
    """A :class:`Sandboxes` whose sandboxes and pastas are gone after the test."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir(mode=0o700)
    made = Sandboxes(log_dir)
    yield made
    for pasta in made.pastas:
        await pasta.stop()
    for sandbox in made.started:
        sandbox.kill()


@pytest.fixture
def egress_filter(serialized: None) -> Iterator[EgressFilter]:
    """The egress filter for the test uids, in a table of the test's own (removed afterwards)."""
    installed = EgressFilter.install(
        UID_FIRST, UID_LAST, table=f"remotecli_test_{os.getpid()}", nameservers=[]
    )
    yield installed
    installed.remove()


def host_addresses() -> list[str]:
    """The host's own global IPv4 addresses (all of them are local: traffic never leaves)."""
    result = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "scope", "global"],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    return [a["local"] for link in json.loads(result.stdout) for a in link.get("addr_info", [])]


# --- egress --------------------------------------------------------------------------------------


@needs_root
async def test_session_reaches_internet_through_pasta(
    internet: Netns,
    egress_filter: EgressFilter,
    sandboxes: Sandboxes,
    servers: list[BannerServer],
) -> None:
    """With pasta and the filter, a session reaches a public server over IPv4 and IPv6."""
    servers.append(BannerServer("internet", internet.address, 8000, internet.name))
    servers.append(BannerServer("internet6", internet.address6, 8000, internet.name))
    outcome = await sandboxes.probe([servers[0].target(), servers[1].target()])
    assert outcome == {
        servers[0].target(): "answer: internet #1",
        servers[1].target(): "answer: internet6 #1",
    }


@needs_root
def test_filter_leaves_the_hosts_own_traffic_alone(
    internet: Netns, egress_filter: EgressFilter, servers: list[BannerServer]
) -> None:
    """With the filter, the host's own traffic (and its IPv6 neighbour discovery) still flows."""
    servers.append(BannerServer("internet", internet.address, 8000, internet.name))
    servers.append(BannerServer("internet6", internet.address6, 8000, internet.name))
    assert servers[0].first_visit() == "internet #1"
    assert servers[1].first_visit() == "internet6 #1"


@needs_root
async def test_filter_blocks_private_networks(
    private: Netns,
    egress_filter: EgressFilter,
    sandboxes: Sandboxes,
    servers: list[BannerServer],
) -> None:
    """With the filter, a session cannot reach a private server, and the server sees nothing."""
    servers.append(BannerServer("private", private.address, 80, private.name))
    servers.append(BannerServer("private6", private.address6, 80, private.name))
    outcome = await sandboxes.probe([servers[0].target(), servers[1].target()])
    assert all(result.startswith("error: ") for result in outcome.values()), outcome
    assert servers[0].first_visit() == "private #1"
    assert servers[1].first_visit() == "private6 #1"


@needs_root
async def test_filter_blocks_the_hosts_own_addresses(
    internet: Netns,
    private: Netns,
    egress_filter: EgressFilter,
    sandboxes: Sandboxes,
    servers: list[BannerServer],
) -> None:
    """A host server is unreachable by every host address, 127.0.0.1 and ::1 being the session's."""
    host = BannerServer("host", "::", 0)  # dual-stack: IPv4 and IPv6
    servers.append(host)
    addresses = {
        internet.host_address,
        private.host_address,
        internet.host_address6,
        private.host_address6,
        *host_addresses(),
    }
    targets = [host.target(address) for address in sorted(addresses)]
    loopbacks = [host.target("127.0.0.1"), host.target("::1")]
    outcome = await sandboxes.probe([*targets, *loopbacks])
    assert [outcome[target] for target in loopbacks] == ["error: ECONNREFUSED"] * 2
    assert all(outcome[target].startswith("error: ") for target in targets), outcome
    assert host.first_visit("127.0.0.1") == "host #1"


@needs_root
async def test_without_the_filter_private_and_host_are_reachable(
    internet: Netns,
    private: Netns,
    sandboxes: Sandboxes,
    servers: list[BannerServer],
) -> None:
    """Without the filter pasta reaches the private server and the host: the filter is the wall."""
    servers.append(BannerServer("private", private.address, 80, private.name))
    servers.append(BannerServer("host", "::", 0))
    via_veth = servers[1].target(internet.host_address)
    outcome = await sandboxes.probe([servers[0].target(), via_veth])
    assert outcome == {servers[0].target(): "answer: private #1", via_veth: "answer: host #1"}


@needs_root
async def test_dns_exception_opens_port_53_of_nameservers_only(
    private: Netns,
    sandboxes: Sandboxes,
    servers: list[BannerServer],
) -> None:
    """A nameserver in a blocked range is reachable on port 53 and on no other port."""
    dns = BannerServer("dns", private.address, 53, private.name)
    web = BannerServer("web", private.address, 80, private.name)
    servers.extend([dns, web])
    installed = EgressFilter.install(
        UID_FIRST, UID_LAST, table=f"remotecli_test_{os.getpid()}", nameservers=[private.address]
    )
    try:
        outcome = await sandboxes.probe([dns.target(), web.target()])
    finally:
        installed.remove()
    assert outcome[dns.target()] == "answer: dns #1"
    assert outcome[web.target()].startswith("error: ")
    assert web.first_visit() == "web #1"


@needs_root
async def test_egress_none_has_only_loopback(internet: Netns, sandboxes: Sandboxes) -> None:
    """Without pasta a session has only lo, and connecting out fails with network unreachable."""
    interfaces = sandboxes.start(
        [
            "/usr/bin/python3",
            "-c",
            "import socket; print(sorted(n for _, n in socket.if_nameindex()))",
        ]
    )
    interfaces.release()
    assert await interfaces.line() == "['lo']"
    target = f"{internet.address}:8000"
    assert await sandboxes.probe([target], egress=False) == {target: "error: ENETUNREACH"}


# --- nothing exposed on the host -----------------------------------------------------------------


def host_sockets() -> dict[int, tuple[str, int, str]]:
    """Host-namespace sockets by inode: (protocol, local port, TCP state or "" for UDP)."""
    found = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/self/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            port = int(fields[1].rsplit(":", 1)[1], 16)
            state = fields[3] if proto.startswith("tcp") else ""
            found[int(fields[9])] = (proto, port, state)
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


@needs_root
async def test_pasta_exposes_nothing_on_the_host(sandboxes: Sandboxes) -> None:
    """While a session listens on 0.0.0.0:1455, nothing of pasta's listens on the host."""

    def bound_1455(sockets: dict[int, tuple[str, int, str]]) -> list[tuple[str, int, str]]:
        return [s for s in sockets.values() if s[1] == LOOPBACK_PORT and s[2] in ("0A", "")]

    assert bound_1455(host_sockets()) == [], "1455 is in use on the host: this test cannot tell"
    sandbox = sandboxes.start(
        ["/usr/bin/python3", "-c", SERVER, "session", "0.0.0.0", str(LOOPBACK_PORT)]
    )
    pasta = await sandboxes.pasta(sandbox)
    sandbox.release()
    assert await sandbox.line() == str(LOOPBACK_PORT)
    after = host_sockets()
    # pasta's pre-opened sockets are unbound (absent from these tables); none may listen.
    pastas = [after[inode] for inode in socket_inodes(pasta.pid) if inode in after]
    assert [s for s in pastas if s[2] in ("0A", "")] == []  # no TCP listener, no UDP socket
    assert bound_1455(after) == []


# --- reaching a session's loopback ---------------------------------------------------------------


@needs_root
async def test_connect_loopback_reaches_each_sessions_own_listener(sandboxes: Sandboxes) -> None:
    """Two sessions both listen on 127.0.0.1:1455; each connection reaches its own session."""
    first, second = (
        sandboxes.start(["/usr/bin/python3", "-c", SERVER, name, "127.0.0.1", str(LOOPBACK_PORT)])
        for name in ("session-a", "session-b")
    )
    for sandbox in (first, second):
        sandbox.release()
        assert await sandbox.line() == str(LOOPBACK_PORT)
    for sandbox, banner in (
        (first, "session-a #1"),
        (second, "session-b #1"),
        (first, "session-a #2"),
    ):
        reader, writer = await connect_loopback(sandbox.child_pid, LOOPBACK_PORT, timeout=TIMEOUT)
        try:
            assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).decode().strip() == banner
        finally:
            writer.close()
            await writer.wait_closed()


@needs_root
async def test_connect_loopback_refusals(sandboxes: Sandboxes) -> None:
    """Nothing listening is UpstreamRefused; a dead pid or our own namespace is a DriverError."""
    sandbox = sandboxes.start(["/usr/bin/sleep", "60"])
    with pytest.raises(UpstreamRefused) as refused:
        await connect_loopback(sandbox.child_pid, LOOPBACK_PORT, timeout=TIMEOUT)
    assert "refused" in refused.value.message
    with pytest.raises(DriverError) as ours:
        await connect_loopback(os.getpid(), LOOPBACK_PORT, timeout=TIMEOUT)
    assert "controller's network namespace" in ours.value.message
    sandbox.kill()
    sandboxes.started.remove(sandbox)
    wait_gone(sandbox.child_pid)
    with pytest.raises(DriverError):
        await connect_loopback(sandbox.child_pid, LOOPBACK_PORT, timeout=TIMEOUT)


@needs_root
async def test_create_socket_in_leaves_the_callers_namespace_alone(sandboxes: Sandboxes) -> None:
    """A socket made in a session binds there, and the calling thread stays in the host's."""
    sandbox = sandboxes.start(["/usr/bin/sleep", "60"])
    home = os.stat("/proc/thread-self/ns/net").st_ino
    with create_socket_in(sandbox.child_pid) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.listen()
        # The host's 127.0.0.1 does not have that listener: it lives in the session.
        with socket.socket() as probe:
            probe.settimeout(TIMEOUT)
            assert probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    assert os.stat("/proc/thread-self/ns/net").st_ino == home


# --- lifecycle -----------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    """True when ``pid`` is no longer a child of this process (exited and reaped)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return f"\nPPid:\t{os.getpid()}\n" not in status


@needs_root
def test_pasta_stop_leaves_no_process_on_either_loop(tmp_path: Path) -> None:
    """stop() kills and reaps pasta and a second stop() does nothing, on uvloop and on asyncio."""

    async def scenario() -> int:
        made = Sandboxes(tmp_path)
        sandbox = made.start(["/usr/bin/sleep", "60"])
        try:
            pasta = await made.pasta(sandbox)
            assert not _gone(pasta.pid)
            await pasta.stop()
            await pasta.stop()
            return pasta.pid
        finally:
            sandbox.kill()

    for runner in (asyncio.Runner(loop_factory=uvloop.new_event_loop), asyncio.Runner()):
        with runner:
            pid = runner.run(scenario())
        assert _gone(pid)


@needs_root
async def test_pasta_failure_reports_its_log_and_leaves_no_process(sandboxes: Sandboxes) -> None:
    """pasta as a uid not owning the namespace fails: DriverError with its log, no process left."""
    sandbox = sandboxes.start(["/usr/bin/sleep", "60"])
    wrong = UID_LAST
    with pytest.raises(DriverError) as failed:
        await Pasta.start(
            sandbox.child_pid, wrong, wrong, log_path=sandboxes.log_dir / "bad.log", timeout=TIMEOUT
        )
    assert "pasta could not give the session its network" in failed.value.message
    assert failed.value.data["log"], "the log tail is part of the error"
    pid = failed.value.data["pasta_pid"]
    assert isinstance(pid, int)
    assert _gone(pid)


@needs_root
async def test_pasta_refuses_the_controllers_own_namespace(tmp_path: Path) -> None:
    """Pasta.start on a process sharing our namespace refuses: it would rewire the host."""
    with pytest.raises(DriverError) as refused:
        await Pasta.start(os.getpid(), UID_FIRST, UID_FIRST, log_path=tmp_path / "p.log")
    assert "controller's network namespace" in refused.value.message


def nft_tables() -> list[str]:
    result = subprocess.run(
        ["nft", "list", "tables"], check=True, capture_output=True, text=True, timeout=TIMEOUT
    )
    return result.stdout.splitlines()


@needs_root
def test_egress_filter_install_is_idempotent_and_remove_removes(serialized: None) -> None:
    """Installing twice leaves one table with one chain; remove() deletes it, twice is harmless."""
    table = f"remotecli_test_{os.getpid()}"
    first = EgressFilter.install(UID_FIRST, UID_LAST, table=table, nameservers=["10.255.255.53"])
    second = EgressFilter.install(UID_FIRST, UID_LAST, table=table, nameservers=[])
    try:
        assert nft_tables().count(f"table inet {table}") == 1
        listed = subprocess.run(
            ["nft", "list", "table", "inet", table], check=True, capture_output=True, text=True
        ).stdout
        assert listed.count("chain output") == 1
        assert listed.count("chain sandbox") == 1
        assert "10.255.255.53" not in listed  # replaced, not merged
        assert "uids 3100000-3100999" in second.describe()
    finally:
        first.remove()
    assert f"table inet {table}" not in nft_tables()
    second.remove()
    assert f"table inet {table}" not in nft_tables()


ROUTE_V4 = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
veth1\t006433C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
ROUTE_V6 = (
    "fd000000000000000000000000000000 40 "
    + "0" * 32
    + " 00 "
    + "0" * 32
    + " 00000100 00000002 00000000 00000001     eth0\n"
    + "0" * 32
    + " 00 "
    + "0" * 32
    + " 00 fd000000000000000000000000000001"
    + " 00000400 00000003 00000000 00000003     eth0\n"
    + "0" * 32
    + " 00 "
    + "0" * 32
    + " 00 "
    + "0" * 32
    + " ffffffff 00000001 00000000 00200200       lo\n"
)


def test_host_networks_are_the_uplinks_prefixes_and_gateways() -> None:
    """The host's LAN is what hangs off its default-route interfaces: their connected prefixes
    and the gateways, not the other interfaces' routes and not lo's unreachable default."""
    from remotecli.sandbox.egress import host_networks

    lan = host_networks(ROUTE_V4, ROUTE_V6)
    assert lan == ("192.0.2.1/32", "192.0.2.0/24", "fd00::/64", "fd00::1/128")


def test_ruleset_merges_the_lan_into_the_blocked_ranges() -> None:
    """A LAN prefix inside a fixed range is merged, since nft refuses overlapping intervals."""
    script = egress_ruleset("t", 3_000_000, 3_000_009, (), ("10.1.0.0/16", "192.0.2.0/24"))
    assert "10.1.0.0/16" not in script
    assert "192.0.2.0/24" in script


def test_loopback_configured_tells_a_fresh_namespace_from_a_ready_one() -> None:
    """A new network namespace has lo down (pasta must wait: bubblewrap sets lo up itself and
    fails if pasta did first); this process's namespace has 127.0.0.1 up."""
    from remotecli.sandbox.network import loopback_configured

    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to make a network namespace")
    fresh = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while (
            os.readlink(f"/proc/{fresh.pid}/ns/net") == os.readlink("/proc/self/ns/net")
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)  # unshare has not switched namespaces yet
        assert loopback_configured(os.getpid())
        assert not loopback_configured(fresh.pid)
    finally:
        fresh.kill()
        fresh.wait()
