"""Session cgroups: real cgroupfs and real processes here, plus v2 against a laid-out directory.

The real-kernel tests need root and a usable cgroup (v1 on the development machine) and skip
otherwise, saying why. cgroup v2 cannot run here, so its file writes are checked against a
temporary directory laid out like a cgroup2 mount. That fake is honest about what it leaves out:
the kernel fills a new cgroup with its files on mkdir, takes a moved pid out of its old
``cgroup.procs``, and refuses (EBUSY, EINVAL) what breaks its rules; a directory does none of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotecli.exceptions import DriverError
from remotecli.sandbox.cgroups import CgroupHost, Limits, SessionCgroup, human_bytes, parse_bytes
from tests.conftest import MS

PREFIX = f"remotecli-test-{os.getpid()}"
WAIT = 30_000 * MS  # seconds: a generous bound for a child to start, die or finish
MiB = 1024**2

# The launcher every session uses, in miniature: join each cgroup, then exec the program.
LAUNCHER = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 97; shift; done; shift; exec "$@"'

# Start `sleep` children until fork fails; report how many started and why it stopped.
FORKER = """
import subprocess, sys
children = []
try:
    for _ in range(200):
        children.append(subprocess.Popen(["sleep", "60"]))
except BlockingIOError as exc:
    print(len(children), exc.strerror, flush=True)
else:
    print(len(children), "no error", flush=True)
sys.stdin.read()
"""

# Touch MiB after MiB (bytes filled with "x", so every page is really used), then wait.
ALLOCATOR = """
import sys
chunks = [b"x" * (1 << 20) for _ in range(int(sys.argv[1]))]
print("allocated", len(chunks), flush=True)
sys.stdin.read()
"""


def launch(cgroup: SessionCgroup, argv: list[str]) -> subprocess.Popen[str]:
    """Run ``argv`` inside ``cgroup`` from its first instruction, pipes on stdin and stdout."""
    procs = [str(path) for path in cgroup.procs_files]
    return subprocess.Popen(
        ["/bin/sh", "-c", LAUNCHER, "launcher", *procs, "--", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def host() -> Iterator[CgroupHost]:
    """This machine's cgroups under a prefix of this test run; everything made is removed."""
    if os.geteuid() != 0:
        pytest.skip(f"cgroup tests need root (euid is {os.geteuid()}): run pytest as root")
    found = CgroupHost.detect(prefix=PREFIX)
    if found.version is None:
        pytest.skip(f"no usable cgroup on this machine: {found.reason}")
    yield found
    names = {d.name for p in found.parents if p.is_dir() for d in p.iterdir() if d.is_dir()}
    for name in names:
        leftover = SessionCgroup(
            name=name, version=found.version, dirs=tuple(p / name for p in found.parents)
        )
        leftover.kill()
        leftover.remove()
    for parent in found.parents:
        if parent.is_dir():
            parent.rmdir()


def read(path: Path) -> str:
    return path.read_text().strip()


# --- values -------------------------------------------------------------------------------------


def test_parse_bytes_reads_plain_and_binary_units() -> None:
    """parse_bytes reads bytes and K/M/G/T sizes in any spelling as binary units."""
    assert parse_bytes("1073741824") == 1024**3
    assert parse_bytes("512M") == 512 * MiB
    assert parse_bytes("2G") == parse_bytes("2GiB") == parse_bytes("2 GB") == 2 * 1024**3
    assert parse_bytes("2gi") == 2 * 1024**3
    assert parse_bytes("64k") == 64 * 1024
    assert parse_bytes("1.5G") == 1536 * MiB
    assert parse_bytes(" 100b ") == 100


@pytest.mark.parametrize("text", ["", "G", "-1G", "2X", "two gigs", "0.5b"])
def test_parse_bytes_names_the_bad_value(text: str) -> None:
    """parse_bytes refuses what is not a whole size with a ValueError quoting the value."""
    with pytest.raises(ValueError, match=repr(text).replace(".", r"\.")):
        parse_bytes(text)


def test_human_bytes_uses_the_largest_unit() -> None:
    """human_bytes names a size in the largest binary unit it reaches."""
    assert human_bytes(2 * 1024**3) == "2 GiB"
    assert human_bytes(512 * MiB) == "512 MiB"
    assert human_bytes(1536 * MiB) == "1.5 GiB"
    assert human_bytes(1000) == "1000 B"
    assert human_bytes(0) == "0 B"


def test_limits_describe_in_words() -> None:
    """Limits.describe() gives memory, processes, CPU and HOME in words."""
    assert Limits().describe() == {
        "memory": "2 GiB",
        "processes": "1024",
        "cpu": "1 CPU, weight 100",
        "home": "1 GiB",
    }
    assert Limits(cpus=2.5, cpu_weight=50).describe()["cpu"] == "2.5 CPUs, weight 50"
    assert Limits(cpus=0).describe()["cpu"] == "no cap, weight 100"


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_bytes", 0), ("pids", 0), ("cpu_weight", 0), ("cpu_weight", 10_001), ("cpus", -1)],
)
def test_limits_refuse_values_the_kernel_would(field: str, value: int) -> None:
    """Limits refuses out-of-range values with a ValueError naming the field."""
    with pytest.raises(ValueError, match=field):
        Limits(**{field: value})


# --- this machine's cgroups ---------------------------------------------------------------------


def test_detect_nests_under_our_own_cgroups(host: CgroupHost) -> None:
    """On a v1 host, detect() finds memory, pids and cpu and nests under our own cgroup in each."""
    if host.version != 1:
        pytest.skip(f"this host uses cgroup v{host.version}; the v1 layout is not here")
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            own[controller] = path.lstrip("/")
    assert host.describe() == "cgroup v1 (memory, pids, cpu)"
    expected = tuple(
        (Path("/sys/fs/cgroup") / c).resolve() / own[c] / PREFIX for c in ("memory", "pids", "cpu")
    )
    assert host.parents == expected


def test_create_writes_the_limits(host: CgroupHost) -> None:
    """create() writes memory, memory+swap, pids and CPU limits that read back as given."""
    if host.version != 1:
        pytest.skip(f"this host uses cgroup v{host.version}; the v2 files are tested below")
    capped = host.create("capped", Limits(memory_bytes=64 * MiB, pids=20, cpu_weight=50, cpus=0.5))
    memory, pids, cpu = capped.dirs
    assert read(memory / "memory.limit_in_bytes") == str(64 * MiB)
    if (memory / "memory.memsw.limit_in_bytes").exists():
        assert read(memory / "memory.memsw.limit_in_bytes") == str(64 * MiB)
    assert read(memory / "memory.oom_control").startswith("oom_kill_disable 0")
    assert read(pids / "pids.max") == "20"
    assert read(cpu / "cpu.shares") == "512"
    assert read(cpu / "cpu.cfs_period_us") == "100000"
    assert read(cpu / "cpu.cfs_quota_us") == "50000"
    uncapped = host.create("uncapped", Limits(cpus=0))
    assert read(uncapped.dirs[2] / "cpu.cfs_quota_us") == "-1"
    assert capped.procs_files == tuple(d / "cgroup.procs" for d in capped.dirs)


def test_create_refuses_an_existing_cgroup_and_a_bad_name(host: CgroupHost) -> None:
    """create() refuses a session id taken or malformed, and leaves the existing cgroup intact."""
    first = host.create("twice", Limits())
    with pytest.raises(DriverError, match="exists already") as caught:
        host.create("twice", Limits())
    assert caught.value.data["session_id"] == "twice"
    assert all(d.is_dir() for d in first.dirs)
    with pytest.raises(ValueError, match="session id"):
        host.create("../escape", Limits())


def test_processes_cannot_exceed_pids(host: CgroupHost) -> None:
    """A session forking without end is refused with EAGAIN at its pids limit."""
    # The children are forked by Python rather than a bash loop: bash retries a fork that fails
    # with EAGAIN for 15 seconds before it gives up, which the limit is not about.
    limit = 20
    cgroup = host.create("forker", Limits(pids=limit))
    process = launch(cgroup, ["/usr/bin/python3", "-c", FORKER])
    assert process.stdout is not None
    started, _, error = process.stdout.readline().strip().partition(" ")
    try:
        assert error == "Resource temporarily unavailable"
        assert limit - 3 <= int(started) <= limit - 1  # the forker itself is one of them
        assert len(cgroup.pids()) <= limit
    finally:
        cgroup.kill()
        process.wait(timeout=WAIT)


def test_memory_limit_kills_inside_only(host: CgroupHost) -> None:
    """A session allocating past its memory limit is SIGKILLed and counted; outside, no one is."""
    cgroup = host.create("hungry", Limits(memory_bytes=64 * MiB))
    outside = subprocess.Popen(
        ["/usr/bin/python3", "-c", ALLOCATOR, "128"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert outside.stdout is not None
        assert outside.stdout.readline().strip() == "allocated 128"
        inside = launch(cgroup, ["/usr/bin/python3", "-c", ALLOCATOR, "256"])
        stdout, _ = inside.communicate(timeout=WAIT)
        assert inside.returncode == -9, stdout
        assert cgroup.oom_kills() >= 1
        outside.communicate("", timeout=WAIT)
        assert outside.returncode == 0
    finally:
        outside.kill()
        outside.wait(timeout=WAIT)


def test_kill_and_remove_leave_nothing(host: CgroupHost) -> None:
    """kill() ends every process of a session and remove() then deletes its directories."""
    cgroup = host.create("doomed", Limits())
    shell = launch(
        cgroup, ["bash", "-c", "for i in 1 2 3 4 5; do sleep 60 & done; echo ready; wait"]
    )
    assert shell.stdout is not None
    assert shell.stdout.readline().strip() == "ready"
    assert len(cgroup.pids()) == 6
    cgroup.kill()
    assert cgroup.pids() == []
    assert shell.wait(timeout=WAIT) == -9
    cgroup.remove()
    assert not any(d.exists() for d in cgroup.dirs)
    cgroup.remove()  # already gone: nothing to do, no error


def test_sweep_removes_empty_leftovers_only(host: CgroupHost) -> None:
    """sweep() after a restart removes empty session cgroups not kept, and no busy one."""
    leftover = host.create("leftover", Limits())
    kept = host.create("kept", Limits())
    busy = host.create("busy", Limits())
    sleeper = launch(busy, ["bash", "-c", "echo ready; exec sleep 60"])
    try:
        assert sleeper.stdout is not None
        assert sleeper.stdout.readline().strip() == "ready"
        restarted = CgroupHost.detect(prefix=PREFIX)
        assert restarted.sweep(keep={"kept"}) == ["leftover"]
        assert not any(d.exists() for d in leftover.dirs)
        assert all(d.is_dir() for d in (*kept.dirs, *busy.dirs))
    finally:
        busy.kill()
        sleeper.wait(timeout=WAIT)


def test_detect_refuses_without_root() -> None:
    """detect() run by an unprivileged user reports cgroups unusable because it is not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the unprivileged user")
    probe = (
        "from remotecli.sandbox.cgroups import CgroupHost; print(CgroupHost.detect().describe())"
    )
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    result = subprocess.run(
        [*as_nobody, sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot run Python as another user here: {result.stderr.strip()}")
    assert result.stdout.strip() == "none: not root (euid 65534): run the controller as root"


# --- laid-out directories: v2, and v1 with cpu,cpuacct -----------------------------------------


def _write_tree(base: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)


def _proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> Path:
    """A fake /proc/self: our membership and the mounts, as the kernel prints them."""
    base = [
        "22 27 0:21 / /proc rw,relatime - proc proc rw",
        "23 27 0:22 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw",
    ]
    proc = tmp_path / "proc"
    _write_tree(proc, {"cgroup": cgroup, "mountinfo": "\n".join(base + mounts) + "\n"})
    return proc


def _fake_v2(
    tmp_path: Path,
    own: str = "/system.slice/remotecli.service",
    controllers: str = "cpu memory pids",
    subtree: str = "",
    procs: str = "101\n202\n",
) -> tuple[Path, Path, Path]:
    """A cgroup2 mount with our cgroup at ``own``; return (mount, our cgroup's dir, fake /proc)."""
    mount = tmp_path / "cgroup"
    files = {
        "cgroup.controllers": "cpuset cpu io memory hugetlb pids rdma misc\n",
        "cgroup.subtree_control": "cpu memory pids\n" if own != "/" else subtree,
        "cgroup.procs": "1\n" if own != "/" else procs,
    }
    path = ""
    for part in [p for p in own.split("/") if p]:
        path += f"{part}/"
        last = path == own.lstrip("/") + "/"
        files[f"{path}cgroup.type"] = "domain\n"
        files[f"{path}cgroup.controllers"] = controllers if last else "cpu memory pids\n"
        files[f"{path}cgroup.subtree_control"] = subtree if last else "cpu memory pids\n"
        files[f"{path}cgroup.procs"] = procs if last else ""
    _write_tree(mount, files)
    line = f"31 23 0:26 / {mount} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw"
    return mount, mount / own.lstrip("/"), _proc(tmp_path, f"0::{own}\n", [line])


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(f"detect() refuses without root (euid is {os.geteuid()}): run pytest as root")


@pytest.mark.usefixtures("as_root")
def test_v2_moves_our_processes_to_a_leaf_then_delegates(tmp_path: Path) -> None:
    """v2 create() moves our processes to a leaf, enables the controllers, writes the limits."""
    mount, own, proc = _fake_v2(tmp_path)
    host = CgroupHost.detect(root=mount, proc_self=proc)
    assert host.describe() == "cgroup v2 (memory, pids, cpu)"
    limits = Limits(memory_bytes=512 * MiB, pids=100, cpu_weight=200, cpus=1.5)
    cgroup = host.create("s1", limits)
    assert (own / "remotecli-controller" / "cgroup.procs").read_text() == "101\n202\n"
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (own / "remotecli" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    session = own / "remotecli" / "s1"
    assert {f.name: f.read_text() for f in session.iterdir()} == {
        "memory.max": "536870912",
        "memory.oom.group": "1",
        "pids.max": "100",
        "cpu.weight": "200",
        "cpu.max": "150000 100000",
    }
    assert cgroup.procs_files == (session / "cgroup.procs",)
    host.create("s2", Limits(cpus=0))
    assert (own / "remotecli" / "s2" / "cpu.max").read_text() == "max 100000"
    # Delegation happens once: the second create() moved nobody again.
    assert (own / "remotecli-controller" / "cgroup.procs").read_text() == "101\n202\n"


@pytest.mark.usefixtures("as_root")
def test_v2_turns_swap_off_where_the_host_accounts_it(tmp_path: Path) -> None:
    """v2 create() writes memory.swap.max 0 when the kernel offers that file."""
    mount, own, proc = _fake_v2(tmp_path, subtree="cpu memory pids\n", procs="")
    _write_tree(own / "remotecli", {"memory.swap.max": "max\n", "cgroup.subtree_control": ""})
    CgroupHost.detect(root=mount, proc_self=proc).create("s1", Limits())
    assert (own / "remotecli" / "s1" / "memory.swap.max").read_text() == "0"


@pytest.mark.usefixtures("as_root")
def test_v2_root_cgroup_delegates_without_a_leaf(tmp_path: Path) -> None:
    """v2 create() in the root cgroup (exempt from the no-internal-processes rule) moves no one."""
    mount, own, proc = _fake_v2(tmp_path, own="/")
    CgroupHost.detect(root=mount, proc_self=proc).create("s1", Limits())
    assert own == mount
    assert (mount / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert not (mount / "remotecli-controller").exists()
    assert (mount / "remotecli" / "s1" / "memory.max").read_text() == str(2 * 1024**3)


@pytest.mark.usefixtures("as_root")
def test_v2_already_delegating_cgroup_is_left_alone(tmp_path: Path) -> None:
    """v2 create() under a cgroup that delegates already neither moves processes nor rewrites it."""
    mount, own, proc = _fake_v2(tmp_path, subtree="cpu memory pids\n", procs="")
    CgroupHost.detect(root=mount, proc_self=proc).create("s1", Limits())
    assert (own / "cgroup.subtree_control").read_text() == "cpu memory pids\n"
    assert not (own / "remotecli-controller").exists()


@pytest.mark.usefixtures("as_root")
def test_v2_detect_from_the_leaf_finds_the_same_parent(tmp_path: Path) -> None:
    """detect() run from the leaf an earlier create() moved us into nests under the same cgroup."""
    mount, own, _ = _fake_v2(tmp_path)
    proc = _proc(
        tmp_path,
        "0::/system.slice/remotecli.service/remotecli-controller\n",
        [f"31 23 0:26 / {mount} rw,relatime shared:4 - cgroup2 cgroup2 rw"],
    )
    assert CgroupHost.detect(root=mount, proc_self=proc).parents == (own / "remotecli",)


@pytest.mark.usefixtures("as_root")
def test_v2_missing_controller_makes_cgroups_unusable(tmp_path: Path) -> None:
    """detect() names the controller the parent does not delegate, and create() then refuses."""
    mount, own, proc = _fake_v2(tmp_path, controllers="cpu memory\n")
    host = CgroupHost.detect(root=mount, proc_self=proc)
    assert host.version is None
    assert host.reason is not None
    assert f"controller pids missing from {own / 'cgroup.controllers'}" in host.reason
    with pytest.raises(DriverError, match="cannot limit session s1: cgroup v2"):
        host.create("s1", Limits())


@pytest.mark.usefixtures("as_root")
def test_v2_kill_uses_cgroup_kill_and_oom_reads_events(tmp_path: Path) -> None:
    """v2 kill() writes 1 to cgroup.kill when present; oom_kills() reads memory.events."""
    mount, own, proc = _fake_v2(tmp_path)
    cgroup = CgroupHost.detect(root=mount, proc_self=proc).create("s1", Limits())
    session = own / "remotecli" / "s1"
    _write_tree(session, {"cgroup.kill": "", "memory.events": "low 0\noom 2\noom_kill 2\n"})
    cgroup.kill()
    assert (session / "cgroup.kill").read_text() == "1"
    assert cgroup.oom_kills() == 2


@pytest.mark.usefixtures("as_root")
def test_v1_co_mounted_cpu_and_nested_memory(tmp_path: Path) -> None:
    """v1 detect() reads cpu,cpuacct as one hierarchy and a nested memory cgroup from mountinfo."""
    mount = tmp_path / "cgroup"
    _write_tree(
        mount,
        {
            "memory/process_api/abc/remotecli/memory.memsw.limit_in_bytes": "",
            "pids/cgroup.procs": "",
            "cpu,cpuacct/cgroup.procs": "",
        },
    )
    fmt = "{n} 31 0:{n} / {mount}/{name} rw,relatime - cgroup cgroup rw,{name}"
    mounts = [
        fmt.format(n=n, mount=mount, name=name)
        for n, name in enumerate(("memory", "pids", "cpu,cpuacct"), start=40)
    ]
    membership = "12:pids:/\n4:memory:/process_api/abc\n3:cpu,cpuacct:/\n1:name=systemd:/\n0::/\n"
    host = CgroupHost.detect(root=mount, proc_self=_proc(tmp_path, membership, mounts))
    assert host.describe() == "cgroup v1 (memory, pids, cpu)"
    cgroup = host.create("s1", Limits(memory_bytes=64 * MiB, pids=20, cpu_weight=200, cpus=2))
    memory, pids, cpu = (mount / "memory/process_api/abc", mount / "pids", mount / "cpu,cpuacct")
    assert cgroup.dirs == tuple(d / "remotecli" / "s1" for d in (memory, pids, cpu))
    assert {f.name: f.read_text() for f in cgroup.dirs[0].iterdir()} == {
        "memory.limit_in_bytes": str(64 * MiB),
        "memory.memsw.limit_in_bytes": str(64 * MiB),
    }
    assert (cgroup.dirs[1] / "pids.max").read_text() == "20"
    assert {f.name: f.read_text() for f in cgroup.dirs[2].iterdir()} == {
        "cpu.shares": "2048",
        "cpu.cfs_period_us": "100000",
        "cpu.cfs_quota_us": "200000",
    }


@pytest.mark.usefixtures("as_root")
def test_detect_without_a_cgroup_mount(tmp_path: Path) -> None:
    """detect() with no cgroup filesystem under root says so."""
    host = CgroupHost.detect(root=tmp_path / "cgroup", proc_self=_proc(tmp_path, "0::/\n", []))
    assert host.describe() == f"none: no cgroup filesystem is mounted under {tmp_path / 'cgroup'}"
    assert host.sweep(keep=()) == []
