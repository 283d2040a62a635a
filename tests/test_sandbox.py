"""Attacks on the local sandbox, tried from inside a real session (bubblewrap, Xvnc, tmux, xterm).

Each test starts real sessions through :class:`LocalDriver` as root, runs a probe as the
session's command (the hostile user's code), and asserts from the host that the attack failed.
The probes use Debian's ``/usr/bin/python3`` inside the sandbox for raw system calls.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import stat
import textwrap
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import uvloop

from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local import PROGRAMS, LocalDriver
from remotecli.drivers.local_channels import LocalSession, read_reports, sandbox_pids
from remotecli.exceptions import DriverError
from remotecli.sandbox import seccomp
from remotecli.sandbox.cgroups import Limits
from remotecli.sandbox.uids import UID_BASE, UID_COUNT
from tests.conftest import MS

_MISSING = [p for p in ("bwrap", *PROGRAMS) if shutil.which(p) is None]
pytestmark = [
    pytest.mark.skipif(bool(_MISSING), reason=f"not installed: {', '.join(_MISSING)}"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's per-session uids need root"),
    pytest.mark.skipif(
        not Path("/usr/bin/python3").exists(), reason="the probes need Debian's /usr/bin/python3"
    ),
]
TIMEOUT = 20_000 * MS

# Raw system calls from inside the sandbox; each prints "NAME errno" (0 means it succeeded).
SYSCALL_PROBE = textwrap.dedent(
    """
    import ctypes, errno, fcntl, os, socket, sys
    libc = ctypes.CDLL(None, use_errno=True)
    def call(name, *args):
        libc.syscall.restype = ctypes.c_long
        r = libc.syscall(*args)
        print(name, 0 if r >= 0 else ctypes.get_errno(), flush=True)
    buf = ctypes.create_string_buffer(128)
    ctypes.memmove(buf, (8).to_bytes(4, "little") + (1).to_bytes(4, "little"), 8)
    mount_id = ctypes.c_int()
    call("name_to_handle_at", 303, -100, b"/etc", buf, ctypes.byref(mount_id), 0)
    handle = (8).to_bytes(4, "little") + (1).to_bytes(4, "little") + (2).to_bytes(8, "little")
    call("open_by_handle_at", 304, os.open("/", os.O_RDONLY), handle, 0)
    call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, None)
    call("umount2", 166, b"/proc", 2)
    call("pivot_root", 155, b"/tmp", b"/tmp")
    call("bpf", 321, 0, None, 0)
    call("perf_event_open", 298, None, 0, -1, -1, 0)
    call("keyctl", 250, 0, 0, 0, 0, 0)
    call("add_key", 248, b"user", b"x", b"y", 1, -1)
    call("userfaultfd", 323, 0)
    call("ptrace", 101, 16, os.getppid(), 0, 0)
    call("unshare_user", 272, 0x10000000)
    call("clone_newuser", 56, 0x10000000 | 17, 0, 0, 0, 0)
    call("kexec_load", 246, 0, 0, None, 0)
    call("init_module", 175, None, 0, b"")
    call("pidfd_getfd", 438, os.pidfd_open(os.getppid()), 1, 0)
    for name, family in (("vsock", 40), ("alg", 38)):
        try:
            socket.socket(family, socket.SOCK_STREAM).close()
            print(name, 0, flush=True)
        except OSError as exc:
            print(name, exc.errno, flush=True)
    for name, request in (("tiocsti", 0x5412), ("tiocsti_high_bits", 0x100005412)):
        try:
            fcntl.ioctl(0, request, b"x")
            print(name, 0, flush=True)
        except OSError as exc:
            print(name, exc.errno, flush=True)
    try:
        open("/proc/sys/kernel/core_pattern", "w").write("|/bin/sh")
        print("core_pattern", 0)
    except OSError as exc:
        print("core_pattern", exc.errno)
    """
)


def spec_for(data_dir: Path, session_id: str, command: list[str]) -> SessionSpec:
    return SessionSpec(
        session_id, "shell", command, data_dir / "sessions" / session_id, width=320, height=200
    )


def probe(script: str) -> list[str]:
    """A session command: run ``script`` (bash), write its output to ~/out, then ~/done."""
    return ["bash", "-c", f"( {script} ) > ~/out 2>&1; echo done > ~/done; exec sleep 600"]


async def output_of(spec: SessionSpec) -> str:
    done = spec.workdir / "home" / "done"
    async with asyncio.timeout(TIMEOUT):
        while not done.exists():
            await asyncio.sleep(20 * MS)
    return (spec.workdir / "home" / "out").read_text()


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(tmp_path, sandbox=True, limits=Limits(pids=128, memory_bytes=256 << 20))
    yield local
    await local.close()


def test_seccomp_program_compiles_every_rule() -> None:
    """libseccomp compiles the deny table into a non-empty BPF program of whole instructions."""
    program = seccomp.program()
    assert len(program) > 8 * len({r.syscall for r in seccomp.DENIED})
    assert len(program) % 8 == 0


async def test_session_has_no_privilege(driver: LocalDriver, tmp_path: Path) -> None:
    """Inside, the session is uid 1000 with no capability, no_new_privs and a seccomp filter;
    outside, its processes run as an unprivileged host uid of its own."""
    script = "id -u; grep -E '^(CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status"
    first = spec_for(tmp_path, "priv1", probe(script))
    second = spec_for(tmp_path, "priv2", probe(script))
    await driver.start(first, lambda _: None)
    await driver.start(second, lambda _: None)
    out = await output_of(first)
    fields = dict(line.split(":\t") for line in out.splitlines()[1:])
    assert out.splitlines()[0] == "1000"
    for name in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[name], 16) == 0, f"{name} is {fields[name]}"
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"
    uids = []
    for spec in (first, second):
        owners: set[int] = set()
        for pid in sandbox_pids(spec.workdir):
            try:  # a short-lived helper (a tmux client, a subshell) may be gone already
                with open(f"/proc/{pid}/status") as handle:
                    owners.update(
                        int(line.split()[1]) for line in handle if line.startswith("Uid:")
                    )
            except (FileNotFoundError, ProcessLookupError):
                continue
        assert len(owners) == 1, f"{spec.session_id} runs as several uids: {owners}"
        uids.append(owners.pop())
    assert all(UID_BASE <= uid < UID_BASE + UID_COUNT for uid in uids)
    assert uids[0] != uids[1], "two sessions share a host uid"


async def test_dangerous_system_calls_are_refused(driver: LocalDriver, tmp_path: Path) -> None:
    """open_by_handle_at, mounts, bpf, perf, keyrings, userfaultfd, ptrace, pidfd_getfd, new user
    namespaces, kexec, modules, TIOCSTI (also with high bits set) and vsock or AF_ALG sockets
    fail; core_pattern is not writable."""
    spec = spec_for(tmp_path, "calls", probe(f"/usr/bin/python3 -c '{SYSCALL_PROBE}'"))
    await driver.start(spec, lambda _: None)
    results = dict(line.split() for line in (await output_of(spec)).splitlines() if " " in line)
    for name, code in results.items():
        assert code != "0", f"{name} succeeded inside the sandbox"
        expected = (errno.EPERM, errno.EACCES, errno.EROFS, errno.EAFNOSUPPORT)
        assert int(code) in expected, (name, code)
    assert len(results) == 21, results


async def test_no_remount_and_no_write_outside_home(driver: LocalDriver, tmp_path: Path) -> None:
    """remount,rw of /etc fails, the system is read-only, and HOME is writable."""
    script = (
        "mount -o remount,rw /etc; echo remount=$?; touch /etc/x 2>/dev/null; echo etc=$?; "
        "touch /usr/x 2>/dev/null; echo usr=$?; touch ~/x; echo home=$?"
    )
    spec = spec_for(tmp_path, "remount", probe(script))
    await driver.start(spec, lambda _: None)
    out = await output_of(spec)
    assert "remount=0" not in out
    assert "etc=1" in out
    assert "usr=1" in out
    assert "home=0" in out


async def test_host_loopback_and_other_sessions_unreachable(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """A host listener on 127.0.0.1 is unreachable from a session (its loopback is its own), two
    sessions both listen on 127.0.0.1:1455, and neither sees the other's files or display."""
    host = socket.socket()
    host.bind(("127.0.0.1", 0))
    host.listen()
    host.setblocking(False)
    port = host.getsockname()[1]
    listener = (
        "/usr/bin/python3 -c 'import socket,sys; s=socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
        's.bind(("127.0.0.1", 1455)); s.listen(); print("listening", flush=True); '
        "c,_=s.accept(); c.sendall(sys.argv[1].encode()); c.close()' "
    )
    victim = spec_for(tmp_path, "victim", probe(f"{listener} victim-banner"))
    await driver.start(victim, lambda _: None)
    (victim.workdir / "home" / "secret").write_text("victim-secret-42")
    script = (
        f"timeout 3 bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>/dev/null; echo host=$?; "
        f"cat {victim.workdir}/home/secret 2>/dev/null; echo files=$?; "
        f"ls {victim.workdir}/run 2>/dev/null; echo run=$?; "
        "echo x11=$(awk '$4 ~ /^00010000$/ && $8 ~ /^@.tmp.[.]X11-unix/' /proc/net/unix | wc -l); "
        f"{listener} thief-banner & sleep 0.5"
    )
    thief = spec_for(tmp_path, "thief", probe(script))
    await driver.start(thief, lambda _: None)
    out = await output_of(thief)
    assert "host=0" not in out, "the host's loopback was reachable"
    assert "victim-secret-42" not in out
    assert "files=1" in out
    assert "run=2" in out
    assert "x11=1" in out, out  # one listening X socket: its own display's
    with pytest.raises(BlockingIOError):
        host.accept()
    host.close()
    banners = []
    for spec in (victim, thief):
        reader, writer = await driver.connect_loopback(spec.session_id, 1455, timeout=5)
        banners.append(await asyncio.wait_for(reader.read(100), TIMEOUT))
        writer.close()
    assert banners == [b"victim-banner", b"thief-banner"]


async def test_process_limit_stops_a_fork_bomb(driver: LocalDriver, tmp_path: Path) -> None:
    """A session starting 400 background processes under a 128-process limit gets refused forks,
    and the host and the driver stay responsive."""
    bomb = textwrap.dedent(
        """
        import os, time
        ok = fail = 0
        for _ in range(400):
            try:
                pid = os.fork()
            except OSError:
                fail += 1
                continue
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            ok += 1
        print("forked", ok, "refused", fail)
        """
    )
    spec = spec_for(tmp_path, "forks", probe(f"/usr/bin/python3 -c '{bomb}'"))
    await driver.start(spec, lambda _: None)
    out = await output_of(spec)
    _, forked, _, refused = out.split()
    assert int(forked) < 128, out
    assert int(refused) > 0, out
    other = spec_for(tmp_path, "bystander", probe("echo fine"))
    await driver.start(other, lambda _: None)
    assert "fine" in await output_of(other)


async def test_memory_hog_fails_alone_with_the_reason(driver: LocalDriver, tmp_path: Path) -> None:
    """A session touching more memory than its 256 MiB limit ends with "out of memory: limit
    256 MiB" while another session keeps running."""
    if driver.cgroups is None or driver.cgroups.version is None:
        pytest.skip(f"no cgroup here: {driver.posture().limits}")
    bystander = spec_for(tmp_path, "calm", probe("echo calm"))
    await driver.start(bystander, lambda _: None)
    hog = "/usr/bin/python3 -c 'b=[str(i) * (1 << 20) for i in range(1024)]'; sleep 600"
    spec = spec_for(tmp_path, "hog", ["bash", "-c", hog])
    await driver.start(spec, lambda _: None)
    reason = await asyncio.wait_for(driver.wait("hog"), TIMEOUT)
    assert reason == "out of memory: limit 256 MiB"
    assert "calm" in await output_of(bystander)
    assert not driver._sessions["calm"].exited.done()  # type: ignore[union-attr]


def test_no_inherited_descriptor_reaches_the_sandbox(tmp_path: Path) -> None:
    """Under uvloop (which ignores close_fds), an inheritable descriptor the controller holds is
    open in none of the session's processes."""
    canary = tmp_path / "canary"
    canary.write_text("controller-only")
    fd = os.open(canary, os.O_RDONLY)
    os.set_inheritable(fd, True)

    async def scenario() -> list[str]:
        local = LocalDriver(tmp_path / "data", sandbox=True)
        spec = spec_for(tmp_path / "data", "fds", probe("ls -l /proc/self/fd"))
        try:
            await local.start(spec, lambda _: None)
            await output_of(spec)
            leaks = []
            for pid in sandbox_pids(spec.workdir):
                with_canary = []
                for entry in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{entry}")
                    except OSError:
                        continue
                    if target == str(canary):
                        with_canary.append(entry)
                leaks += [f"{pid}:{e}" for e in with_canary]
            return leaks
        finally:
            await local.close()

    try:
        assert uvloop.run(scenario()) == []
    finally:
        os.close(fd)


async def test_session_directory_is_gone_after_stop(driver: LocalDriver, tmp_path: Path) -> None:
    """After stop() the session's workdir, its HOME tmpfs and its processes are gone."""
    spec = spec_for(tmp_path, "gone", probe("echo data > ~/file"))
    await driver.start(spec, lambda _: None)
    await output_of(spec)
    pids = sandbox_pids(spec.workdir)
    assert os.path.ismount(spec.workdir / "home")
    await driver.stop("gone")
    assert not spec.workdir.exists()
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


async def test_vnc_socket_swapped_for_a_link_is_never_followed(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """A session that keeps replacing its VNC socket with a link to a host socket never gets the
    controller to connect there: the session fails, or its endpoint is its own socket."""
    decoy_path = tmp_path / "decoy.sock"
    decoy = socket.socket(socket.AF_UNIX)
    decoy.bind(str(decoy_path))
    decoy.listen()
    decoy.setblocking(False)
    swap = (
        f"for i in $(seq 3000); do ln -sfn {decoy_path} /run/session/vnc.sock.new && "
        "mv -T /run/session/vnc.sock.new /run/session/vnc.sock; done; exec sleep 600"
    )
    spec = spec_for(tmp_path, "swap", ["bash", "-c", swap])
    try:
        endpoint = await driver.start(spec, lambda _: None)
    except DriverError as exc:
        failure: DriverError | None = exc
    else:
        failure = None
        assert endpoint.unix_path is not None
        info = os.lstat(endpoint.unix_path)
        assert stat.S_ISSOCK(info.st_mode)
        assert info.st_uid >= UID_BASE
    if failure is not None:
        assert "socket" in failure.message
    with pytest.raises(BlockingIOError):
        decoy.accept()
    decoy.close()


async def test_readyz_says_which_limits_are_in_force(tmp_path: Path) -> None:
    """/readyz of a controller on the local driver names the sandbox, its uids and its limits."""
    import httpx

    from remotecli.config import ControllerConfig
    from remotecli.controller.server import Controller

    config = ControllerConfig(
        listen=("127.0.0.1", 0), data_dir=tmp_path / "data", session_memory=512 << 20
    )
    controller = Controller(config)
    await controller.start()
    try:
        async with httpx.AsyncClient(base_url=controller.url()) as client:
            operator = {"Authorization": f"Bearer {controller.admin_token}"}
            body = (await client.get("/readyz", headers=operator)).json()
    finally:
        await controller.close()
    sandbox = body["sandbox"]
    assert sandbox["uids"] == "one unprivileged host uid per session"
    assert sandbox["seccomp"] == "on"
    assert sandbox["limits"].startswith(("cgroup v1", "cgroup v2", "none: "))
    if not sandbox["limits"].startswith("none"):
        assert sandbox["memory"] == "512 MiB"
        assert sandbox["processes"] == "1024"


@pytest.mark.parametrize(
    "written",
    [b"display 99 garbage\n", b"x" * 100_000 + b"\n", b"exited sshd 0\n", b"\xff\xfe\n"],
    ids=["unknown-form", "long-line", "unknown-program", "not-ascii"],
)
async def test_anything_but_a_report_on_the_report_channel_ends_the_session(
    tmp_path: Path, written: bytes
) -> None:
    """The report pipe is session-writable (any sandbox process can reach its descriptor), so
    one line that is not a short ``display N`` / ``exited PROGRAM N`` ends the session with the
    reason, and queues nothing."""
    stdout = asyncio.StreamReader(limit=256)
    stdout.feed_data(b"display 3\n" + written * 50)
    stdout.feed_eof()
    process = types.SimpleNamespace(stdout=stdout, pid=-1, returncode=0)
    session = LocalSession(
        spec_for(tmp_path, "pipe", ["true"]),
        "pipe.marker",
        None,
        tmp_path,
        process=cast(asyncio.subprocess.Process, process),
    )
    await read_reports(session)
    assert session.reason == "the session wrote to the driver's report channel; ended"
    assert session.lines.qsize() == 1  # the display line only


async def test_a_deep_tree_and_a_full_run_dir_cannot_stop_the_cleanup(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """A run dir filled to its cap (16 MiB, no disk) and 3,000 nested directories (deeper than
    a recursive removal survives) neither break stop() nor survive it."""
    deep = (
        "dd if=/dev/zero of=/run/session/big bs=1M count=64 2>&1 | grep -m1 space; "
        '/usr/bin/python3 -c \'import os\nos.chdir("/run/session")\n'
        'for _ in range(3000):\n    os.mkdir("d"); os.chdir("d")\nprint("deep")\''
    )
    spec = spec_for(tmp_path, "deep", probe(deep))
    await driver.start(spec, lambda _: None)
    out = await output_of(spec)
    assert "No space left on device" in out
    assert (spec.workdir / "run" / "big").stat().st_size <= 16 * 1024**2
    assert "deep" in out
    await driver.stop("deep")
    assert not spec.workdir.exists()


async def test_pasta_runs_inside_the_sessions_cgroup(driver: LocalDriver, tmp_path: Path) -> None:
    """The session's pasta is in its cgroup, so its CPU and memory count in the session's."""
    if driver.egress != "open" or driver.cgroups is None or driver.cgroups.version is None:
        pytest.skip(f"needs egress open and cgroups: {driver.posture()}")
    spec = spec_for(tmp_path, "netcg", probe("true"))
    await driver.start(spec, lambda _: None)
    session = driver._sessions["netcg"]
    assert session.pasta is not None
    assert session.cgroup is not None
    assert session.pasta.pid in session.cgroup.pids()
