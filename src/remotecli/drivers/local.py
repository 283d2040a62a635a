"""The local driver: each session is Xvnc, tmux, xterm and a tty server in a bubblewrap sandbox.

Theory of operation. :meth:`LocalDriver.start` creates the session's ``workdir`` (root-only,
0700) with ``home/`` (HOME: a size-capped tmpfs owned by the session's uid) and ``run/`` (the
session's own: the X cookie, the logs, the sockets as the session's programs make them). It
leases an unprivileged host uid for the session (:mod:`remotecli.sandbox.uids`), creates its
cgroup (:mod:`remotecli.sandbox.cgroups`) and runs the launcher (:mod:`remotecli.sandbox.launch`),
which joins the cgroup, sets rlimits, stages the directories, closes every inherited
descriptor, drops to that uid and execs ``bwrap``. bubblewrap then builds a user namespace
(uid 1000 inside, the leased uid outside, no capabilities), new mount, PID, IPC, UTS, cgroup and
network namespaces, and loads the seccomp filter (:mod:`remotecli.sandbox.seccomp`). It stops
before running anything (``--block-fd``) until the driver has given the network namespace its
user-mode egress (``pasta``, :mod:`remotecli.sandbox.network`), then runs a short bash script
(what the sandbox is, as data: :mod:`remotecli.drivers.local_sandbox`):

1. ``Xvnc -displayfd``: display and VNC server in one; it picks the first free display number,
   accepts only X clients holding the session's MIT-MAGIC-COOKIE (``run/Xauthority``) and
   serves RFB on the Unix socket ``run/vnc.sock`` only;
2. ``tmux`` running the session's command with ``HOME=/home/user``; the tty server
   (:mod:`remotecli.sandbox.tty_server`) on ``run/tty.sock``; the window manager; ``xterm``
   attached to tmux (restarted if it exits while the command runs);
3. waits for any of them to exit and reports which one on its stdout.

The session is ready once the driver has moved ``run/vnc.sock`` into the root-only workdir
(checking it is a socket the session's uid made, not a link to anyone else's) and read an RFB
banner from it; ``run/tty.sock`` is moved and checked the same way on the first
:meth:`LocalDriver.tty_socket`. Stopping kills every process of the session (its process
group, its marker, its uid, its cgroup), stops pasta, removes the cgroup, unmounts HOME and
removes the workdir. This process is a child subreaper, so orphaned sandbox processes are
reaped here, not left as zombies.

Run by a non-root controller the sandbox is weaker, and says so in :meth:`LocalDriver.posture`:
the sessions share the controller's uid, no cgroup or HOME cap, and no egress (a filter on it
needs root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from remotecli.drivers.banner import await_rfb_banner
from remotecli.drivers.base import (
    RUN_ERRORS_MAX,
    ProgressCallback,
    RunOutput,
    SessionSpec,
    TtyEndpoint,
    VncEndpoint,
)
from remotecli.drivers.local_channels import (
    PID_FILE,
    LocalSession,
    launcher_error,
    log_tails,
    members,
    read_child_pid,
    read_links,
    read_reports,
    remove_workdir,
    stop_links,
    take_socket,
)
from remotecli.drivers.local_sandbox import (
    BROWSER_NAMES,
    BROWSER_SCRIPT,
    GROUP,
    LINKS_FIFO,
    PASSWD,
    REPORT_LINE_MAX,
    RUN_ERRORS,
    TMUX_CONF_NAME,
    TTY_SERVER_NAME,
    TTY_SOCKET,
    VNC_SOCKET,
    LaunchPlan,
    launcher_argv,
    script_argv,
    session_environment,
    tty_server_source,
    xauthority_entry,
)
from remotecli.exceptions import DriverError, RemoteCliError, RemoteProtocolError
from remotecli.logs import get_logger
from remotecli.providers import HostPrograms
from remotecli.sandbox import SYSTEM_PATH, files, keep, seccomp
from remotecli.sandbox.cgroups import CgroupHost, Limits, human_bytes
from remotecli.sandbox.egress import EGRESS_CHOICES, EgressFilter
from remotecli.sandbox.network import Pasta, connect_loopback, open_namespace, tun_problem
from remotecli.sandbox.processes import (
    MARKER_VARIABLE,
    become_subreaper,
    kill,
    proc_stat,
    reap,
    session_processes,
)
from remotecli.sandbox.terminal import TMUX_CONF
from remotecli.sandbox.uids import UidPool

log = get_logger("driver.local")

READY_TIMEOUT = 15.0
"""Seconds a session may take from start to an RFB banner before start() gives up."""
TTY_TIMEOUT = 5.0
"""Seconds :meth:`LocalDriver.tty_socket` waits for a ready session's tty server to listen."""
PROGRAMS = ("Xvnc", "xterm", "tmux", "matchbox-window-manager", "python3")
"""What the session script runs, found on the sandbox's PATH (the system directories)."""

_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
RUN_CHUNK = 65536
"""Bytes a headless run's output is read in, at most, per :meth:`_LocalRun.read`."""
_POLL_INTERVAL = 0.01
_WORKDIR_BYTES = 16 * 1024**2
_WORKDIR_INODES = 4096
_MEMORY_POLL_INTERVAL = 0.25


class _LocalRun:
    """A headless run's command in its local sandbox (:class:`RunOutput`)."""

    def __init__(self, session: LocalSession) -> None:
        self._session = session
        self._errors = ""

    async def read(self) -> bytes:
        """Return the next output the command wrote (b"" once the pipe is closed)."""
        process = self._session.process
        if process is None or process.stdout is None:
            return b""
        return await process.stdout.read(RUN_CHUNK)

    async def wait(self) -> int:
        """Return the command's exit status once the sandbox ended (128 + N for signal N)."""
        session = self._session
        assert session.exited is not None
        assert session.process is not None
        await asyncio.shield(session.exited)
        self._errors = files.read_tail(
            session.run_dir / RUN_ERRORS, RUN_ERRORS_MAX, owner=session.uid
        )
        code = session.process.returncode
        assert code is not None
        return 128 - code if code < 0 else code

    def errors(self) -> str:
        """Return the end of the command's standard error (read once it ended)."""
        return self._errors


async def _drain(stream: asyncio.StreamReader) -> None:
    """Read ``stream`` to its end, keeping nothing."""
    while await stream.read(RUN_CHUNK):
        pass


@dataclass(frozen=True)
class Posture:
    """What the local sandbox enforces on this host, for ``/readyz`` and the docs."""

    sandbox: str
    uids: str
    seccomp: str
    network: str
    limits: str
    memory: str
    processes: str
    cpu: str
    home: str

    def to_json(self) -> dict[str, str]:
        """Return the posture as a JSON object of strings."""
        return dict(self.__dict__)


class LocalDriver:
    """Runs sessions as sandboxed processes on this machine. One instance per controller.

    ``sandbox=None`` requires bubblewrap when it is installed and runs unsandboxed only when it
    is not (a development machine); ``False`` never sandboxes (tests of the bare script).
    ``egress`` is ``open`` (internet through pasta, never the host or private ranges) or
    ``none``; ``open`` falls back to ``none``, with the reason in :meth:`posture`, when the host
    cannot enforce it.
    """

    name = "local"
    can_adopt = False  # sessions live on this host

    def __init__(
        self,
        data_dir: Path,
        *,
        sandbox: bool | None = None,
        limits: Limits | None = None,
        egress: str = "open",
        uid_pool: UidPool | None = None,
        programs: HostPrograms | None = None,
    ) -> None:
        self.data_dir = data_dir
        self._programs = programs if programs is not None else HostPrograms()
        self.bwrap = shutil.which("bwrap") if sandbox is not False else None
        if sandbox and self.bwrap is None:
            raise DriverError("bubblewrap (bwrap) is not installed; install the bubblewrap package")
        if egress not in EGRESS_CHOICES:
            raise DriverError(f"egress {egress!r} is unknown; choose open or none")
        self.limits = limits if limits is not None else Limits()
        self.privileged = self.bwrap is not None and os.geteuid() == 0
        self.uids = (uid_pool or UidPool()) if self.privileged else None
        self.cgroups = CgroupHost.detect() if self.privileged else None
        self.egress, self.egress_reason = self._choose_egress(egress)
        self._sessions: dict[str, LocalSession] = {}
        become_subreaper()

    def _choose_egress(self, wanted: str) -> tuple[str, str]:
        if self.bwrap is None:
            return "host", "no sandbox: sessions share the host's network"
        if wanted == "none":
            return "none", "egress none: only the session's own loopback"
        if not self.privileged or self.uids is None:
            return (
                "none",
                "egress open needs a root controller (the filter is a host firewall rule)",
            )
        if shutil.which("pasta") is None:
            return "none", "egress open needs pasta: install the Debian package passt"
        problem = tun_problem()
        if problem is not None:
            return "none", problem
        try:
            egress_filter = EgressFilter.install(self.uids.first, self.uids.last)
        except RemoteCliError as exc:
            log.warning("egress_filter_failed", error=exc.message)
            return "none", f"egress open refused: {exc.message}"
        return "open", f"internet through pasta; {egress_filter.describe()}"

    def preparing(self, command: Sequence[str]) -> str | None:
        """Nothing is prepared ahead: a local session starts its programs when it starts."""
        return None

    def isolation(self) -> Mapping[str, object]:
        """Return :meth:`posture` as JSON, for ``/readyz``."""
        return self.posture().to_json()

    def hosts(self) -> None:
        """Nothing: sessions run on the controller's own host (``/readyz``'s sandbox says how)."""

    def posture(self) -> Posture:
        """Say what the sandbox enforces here, in words (``/readyz`` shows it)."""
        limits = self.limits
        cgroups = self.cgroups
        enforced = cgroups is not None and cgroups.version is not None
        backend = cgroups.describe() if cgroups is not None else "none: the controller is not root"
        if self.bwrap is None:
            sandbox = "none: bubblewrap is not installed; sessions run as the controller's user"
        else:
            sandbox = "bubblewrap: user, mount, pid, ipc, uts, cgroup and network namespaces"
        return Posture(
            sandbox=sandbox,
            uids="one unprivileged host uid per session"
            if self.uids is not None
            else "the controller's own uid (not root)",
            seccomp="on" if self.bwrap is not None else "off",
            network=self.egress_reason,
            limits=backend,
            memory=human_bytes(limits.memory_bytes) if enforced else "not enforced",
            processes=str(limits.pids) if enforced or self.uids is not None else "not enforced",
            cpu=limits.describe()["cpu"] if enforced else "not enforced",
            home=f"{human_bytes(limits.home_bytes)} (tmpfs)" if self.privileged else "not capped",
        )

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Start the session's sandbox and return its VNC socket once a banner was read.

        Raises :class:`DriverError` with the failing program's log when the sandbox dies or the
        banner does not come within :data:`READY_TIMEOUT`; nothing is left running then.
        """
        if spec.session_id in self._sessions:
            raise DriverError(f"session {spec.session_id} is already running in this driver")
        missing = [p for p in PROGRAMS if shutil.which(p, path=SYSTEM_PATH) is None]
        if missing:
            raise DriverError(
                f"{', '.join(missing)} not installed; run scripts/install-system-deps.sh run",
                missing=missing,
            )
        socket_path = spec.workdir / VNC_SOCKET
        if len(os.fsencode(spec.workdir / "run" / "tmux.sock")) > _UNIX_PATH_MAX:
            raise DriverError(
                f"the session's socket path {socket_path} is longer than a Unix socket allows "
                f"({_UNIX_PATH_MAX} bytes); choose a shorter data directory",
                session_id=spec.session_id,
            )
        began = time.monotonic()
        lease = self.uids.lease() if self.uids is not None else None
        marker = f"{spec.session_id}.{secrets.token_hex(8)}"
        session = LocalSession(spec, marker, lease, spec.workdir / "run")
        self._sessions[spec.session_id] = session
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._launch(session, progress)
                await self._await_display(session, progress)
                version = await self._await_banner(session)
        except BaseException as exc:
            reason = session.reason
            details = log_tails(session)
            await self.stop(spec.session_id)
            if isinstance(exc, TimeoutError):
                raise DriverError(
                    f"session {spec.session_id} showed no VNC banner within {READY_TIMEOUT:.0f} s"
                    + details,
                    session_id=spec.session_id,
                ) from exc
            if isinstance(exc, DriverError):
                cause = f": {reason}" if reason is not None else ""
                raise DriverError(
                    f"{exc.message}{cause}{details}", session_id=spec.session_id
                ) from exc
            raise
        elapsed = time.monotonic() - began
        progress(f"VNC banner read (RFB {version}) after {elapsed:.2f} s")
        log.info("session_ready", session_id=spec.session_id, seconds=round(elapsed, 3))
        return VncEndpoint(unix_path=str(socket_path))

    async def start_run(self, spec: SessionSpec, progress: ProgressCallback) -> RunOutput:
        """Start ``spec.command`` headless in a sandbox of its own; its output is the pipe.

        The sandbox is a session's (uid, namespaces, seccomp, cgroup, HOME tmpfs with
        ``spec.home_files``, egress) running :data:`RUN_SCRIPT` instead of a display: the
        command's standard output is the sandbox's, read by :meth:`_LocalRun.read`.
        """
        if spec.session_id in self._sessions:
            raise DriverError(f"run {spec.session_id} is already running in this driver")
        if len(os.fsencode(spec.workdir / "run" / RUN_ERRORS)) > _UNIX_PATH_MAX:
            raise DriverError(
                "the data directory's path is too long for a run's files; an operator can "
                "choose a shorter one (data_dir)",
                session_id=spec.session_id,
            )
        lease = self.uids.lease() if self.uids is not None else None
        marker = f"{spec.session_id}.{secrets.token_hex(8)}"
        session = LocalSession(spec, marker, lease, spec.workdir / "run", headless=True)
        self._sessions[spec.session_id] = session
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._launch(session, progress)
        except BaseException as exc:
            details = log_tails(session)
            await self.stop(spec.session_id)
            if isinstance(exc, TimeoutError):
                raise DriverError(
                    f"run {spec.session_id} did not start within {READY_TIMEOUT:.0f} s" + details,
                    session_id=spec.session_id,
                ) from exc
            if isinstance(exc, DriverError):
                raise DriverError(exc.message + details, session_id=spec.session_id) from exc
            raise
        return _LocalRun(session)

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Return ``command`` with its program resolved on this host, or say it is not found.

        The sandbox shows the host's system directories and binds the program's own root, so a
        program found on the controller's PATH (or in node_modules/.bin) is found inside it.
        """
        return self._programs.can_run(command)

    async def wait(self, session_id: str) -> str:
        """Return, with the reason, when any process of the session exits by itself."""
        session = self._sessions.get(session_id)
        if session is None or session.exited is None:
            return f"session {session_id} is not running in this driver"
        return await asyncio.shield(session.exited)

    async def stop(self, session_id: str) -> None:
        """Kill every process of the session, then remove all it had. Idempotent.

        Each clean-up step runs whatever the one before it did: a session must not keep its
        uid, cgroup or files because something it left behind made an earlier step fail.
        """
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        pgid = session.process.pid if session.process is not None else None
        drain = None
        if session.headless and session.process is not None and session.process.stdout:
            # Output nobody reads any more may have paused the pipe, and asyncio waits for
            # its end before it reports the exit: read it away.
            drain = asyncio.create_task(_drain(session.process.stdout))
        killed = kill(members(session))
        if session.process is not None:
            with contextlib.suppress(ProcessLookupError):
                await session.process.wait()
        if drain is not None:
            drain.cancel()
        await reap(session.marker, pgid, killed, session.uid)
        for task in (*session.tasks, session.reports, session.exited):
            if task is not None and not task.done():
                task.cancel()
        if session.pasta is not None:
            await session.pasta.stop()
        if session.netns_fd is not None:
            os.close(session.netns_fd)
            session.netns_fd = None
        stop_links(session)
        if session.cgroup is not None:
            try:
                # Both wait (briefly) for the kernel to empty the cgroup: off the event loop.
                await asyncio.to_thread(session.cgroup.kill)
                await asyncio.to_thread(session.cgroup.remove)
            except (OSError, RemoteCliError) as exc:
                log.warning("session_cgroup_left", session_id=session_id, error=str(exc))
        try:
            await asyncio.to_thread(remove_workdir, session.spec.workdir)
        except OSError as exc:
            log.warning("session_workdir_left", session_id=session_id, error=str(exc))
        if session.lease is not None:
            session.lease.release()
        log.info("session_stopped", session_id=session_id)

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        """Kill what a previous controller left of the session, remove its files; return None.

        A local sandbox dies with the controller that started it, so nothing is ever resumed.
        """
        try:
            pid_text, marker, uid_text = (workdir / PID_FILE).read_text().split()
        except (OSError, ValueError):
            # No pid file: no process of it can be told from others (and none can be left
            # when the mount namespace that held the workdir's tmpfs is gone, as for a host's
            # lost session actor); its empty cgroup and its directory still go.
            self._sweep_cgroup(session_id)
            remove_workdir(workdir)
            return None
        uid = None if uid_text == "-" else int(uid_text)
        # The recorded group counts only if a process with the marker is still in it: the
        # number may belong to someone else by now.
        marked = session_processes(marker)
        pgid: int | None = int(pid_text)
        if not any((stat_ := proc_stat(pid)) is not None and stat_[1] == pgid for pid in marked):
            pgid = None
        leftovers = session_processes(marker, pgid, uid)
        await reap(marker, pgid, kill(leftovers), uid)
        self._sweep_cgroup(session_id)
        remove_workdir(workdir)
        if leftovers:
            log.info("session_leftovers_killed", session_id=session_id, pids=leftovers)
        return None

    def _sweep_cgroup(self, session_id: str) -> None:
        """Remove the session's cgroup if it is empty; only its own: others may belong to
        sessions of other controllers."""
        if self.cgroups is not None and self.cgroups.version is not None:
            others = {e.name for p in self.cgroups.parents if p.is_dir() for e in p.iterdir()}
            with contextlib.suppress(OSError, RemoteCliError):
                self.cgroups.sweep(keep=others - {session_id})

    async def close(self) -> None:
        """Stop every session this driver started."""
        await asyncio.gather(*(self.stop(session_id) for session_id in list(self._sessions)))

    async def prepare(self) -> None:
        """Nothing slow to check ahead of sessions."""

    def detach(self, session_id: str) -> bool:
        """Refuse: a local sandbox dies with its controller (see docs/operations.md)."""
        return False

    async def hibernate(self, session_id: str) -> bool:
        """Refuse: a sandbox's processes cannot be saved to disk; the session keeps running."""
        return False

    async def resume(
        self, session_id: str, workdir: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        """Refuse: this driver never hibernates a session, so there is nothing to resume."""
        raise DriverError(
            f"session {session_id} was not hibernated by the local driver, which cannot "
            "hibernate; start a new session",
            session_id=session_id,
        )

    async def recover_hibernated(self, session_id: str, workdir: Path) -> bool:
        """Nothing is ever saved by this driver: no hibernated session to take back."""
        return False

    async def connect_loopback(
        self,
        session_id: str,
        port: int,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 -- passed on: it bounds the namespace switch too
        address: str = "127.0.0.1",
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a TCP connection to ``address``:``port`` on the session's own loopback.

        The session's network namespace is its own, so this reaches only what the session
        listens on (sign-in callbacks), never the host's or another session's loopback.
        ``address`` is ``127.0.0.1`` or ``::1``.
        """
        session = self._sessions.get(session_id)
        if session is None or session.child_pid is None or session.netns_fd is None:
            raise DriverError(
                f"session {session_id} is not running in a network namespace of this driver",
                session_id=session_id,
            )
        return await connect_loopback(
            session.child_pid, port, timeout=timeout, netns_fd=session.netns_fd, address=address
        )

    # --- starting ------------------------------------------------------------------------------

    async def _launch(self, session: LocalSession, progress: ProgressCallback) -> None:
        spec = session.spec
        home, run_dir = self._prepare(session)
        if self.cgroups is not None and self.cgroups.version is not None:
            session.cgroup = self.cgroups.create(spec.session_id, self.limits)
        env = {
            MARKER_VARIABLE: session.marker,
            **session_environment(spec, sandboxed=self.bwrap is not None),
        }
        child_fds: list[int] = []
        info_fd = block_fd = -1
        try:
            if self.bwrap is None:
                argv = script_argv(
                    spec, str(run_dir), str(run_dir / "bin"), headless=session.headless
                )
            else:
                info_fd, info_w = os.pipe()
                block_r, block_fd = os.pipe()
                child_fds += [info_w, block_r]
                fds = {"info": info_w, "block": block_r, "seccomp": seccomp.program_fd()}
                child_fds.append(fds["seccomp"])
                fds["browser"] = files.data_pipe(BROWSER_SCRIPT.encode())
                child_fds.append(fds["browser"])
                fds["tmux_conf"] = files.data_pipe(TMUX_CONF.encode())
                fds["tty_server"] = files.data_pipe(tty_server_source())
                child_fds += [fds["tmux_conf"], fds["tty_server"]]
                if self.privileged:
                    fds["passwd"] = files.data_pipe(PASSWD.encode())
                    fds["group"] = files.data_pipe(GROUP.encode())
                    child_fds += [fds["passwd"], fds["group"]]
                argv = launcher_argv(
                    LaunchPlan(
                        bwrap=self.bwrap,
                        spec=spec,
                        home=home,
                        run_dir=run_dir,
                        fds=fds,
                        privileged=self.privileged,
                        uid=session.uid,
                        processes=self.limits.pids,
                        home_bytes=self.limits.home_bytes,
                        cgroup_procs=session.cgroup.procs_files if session.cgroup else (),
                        headless=session.headless,
                    )
                )
            workdir = spec.workdir
            (workdir / PID_FILE).write_text(f"0 {session.marker} {session.uid or '-'}\n")
            with (workdir / "sandbox.log").open("wb") as sandbox_log:
                session.process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=sandbox_log,
                    start_new_session=True,
                    env=env,
                    pass_fds=child_fds,
                    limit=RUN_CHUNK if session.headless else REPORT_LINE_MAX,
                )
        finally:
            for fd in child_fds:
                os.close(fd)
        process = session.process
        (spec.workdir / PID_FILE).write_text(
            f"{process.pid} {session.marker} {session.uid or '-'}\n"
        )
        if not session.headless:
            session.reports = asyncio.create_task(read_reports(session))
        read_links(session)
        session.exited = asyncio.create_task(self._watch(session))
        if self.bwrap is None:
            progress("sandbox started (no bubblewrap)")
            return
        try:
            session.child_pid = await read_child_pid(info_fd)
            session.netns_fd = open_namespace(session.child_pid)
            if self.egress == "open" and session.uid is not None:
                session.pasta = await Pasta.start(
                    session.child_pid,
                    session.uid,
                    session.uid,
                    log_path=spec.workdir / "pasta.log",
                    extra_env={MARKER_VARIABLE: session.marker},
                )
                if session.cgroup is not None:  # its CPU and memory are the session's
                    for procs in session.cgroup.procs_files:
                        procs.write_text(f"{session.pasta.pid}\n")
            os.write(block_fd, b"go")
        finally:
            os.close(block_fd)
        if session.cgroup is not None:
            session.tasks.append(asyncio.create_task(self._watch_memory(session)))
        progress(f"sandbox started under bubblewrap (network: {self.egress})")

    def _prepare(self, session: LocalSession) -> tuple[Path, Path]:
        workdir = session.spec.workdir
        home, run_dir = workdir / "home", workdir / "run"
        if workdir.exists():
            remove_workdir(workdir)  # a previous run's leftovers: never reuse what a session wrote
        workdir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        workdir.mkdir(mode=0o700)
        if session.uid is not None:
            # run/ and the logs live on a small tmpfs: no disk, no inode flood, one unmount.
            files.mount_tmpfs(workdir, _WORKDIR_BYTES, 0, 0, inodes=_WORKDIR_INODES)
        home.mkdir(mode=0o700)
        run_dir.mkdir(mode=0o700)
        xauthority = run_dir / "Xauthority"
        xauthority.touch(mode=0o600)
        xauthority.write_bytes(xauthority_entry(secrets.token_bytes(16)))
        if session.uid is not None:
            inodes = max(4096, self.limits.home_bytes // 4096)
            files.mount_tmpfs(home, self.limits.home_bytes, session.uid, session.uid, inodes=inodes)
        links = run_dir / LINKS_FIFO
        os.mkfifo(links, 0o600)
        # Ours open for reading and writing: never EOF, never blocking the session's writers.
        session.links_fd = os.open(links, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if self.bwrap is None:  # no sandbox to bind the browser stand-ins into
            bin_dir = run_dir / "bin"
            bin_dir.mkdir(mode=0o700)
            (bin_dir / "remotecli-open").write_text(BROWSER_SCRIPT)
            (bin_dir / "remotecli-open").chmod(0o700)
            for name in BROWSER_NAMES:
                (bin_dir / name).symlink_to("remotecli-open")
            (bin_dir / TMUX_CONF_NAME).write_text(TMUX_CONF)
            (bin_dir / TTY_SERVER_NAME).write_bytes(tty_server_source())
        keep.write_kept(home, session.spec.home_files, session.uid)
        if session.uid is not None:
            for path in (run_dir, xauthority, links):
                os.chown(path, session.uid, session.uid)
        return home, run_dir

    # --- watching ------------------------------------------------------------------------------

    async def collect(self, session_id: str, paths: Sequence[str]) -> dict[str, bytes]:
        """Read the kept files at ``paths`` from the session's HOME (see the Driver seam)."""
        session = self._sessions.get(session_id)
        if session is None or not paths:
            return {}
        return await asyncio.to_thread(keep.read_kept, session.spec.workdir / "home", paths)

    async def _watch(self, session: LocalSession) -> str:
        assert session.process is not None
        returncode = await session.process.wait()
        if session.reports is not None:  # its last line may name the cause
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.reports
        pgid = session.process.pid
        killed = kill(members(session))
        await reap(session.marker, pgid, killed, session.uid)
        self._note_oom(session)
        if session.reason is None:
            session.reason = (
                f"sandbox killed by signal {-returncode}"
                if returncode < 0
                else f"sandbox exited with status {returncode}"
                + (f" ({tail})" if (tail := launcher_error(session)) else "")
            )
        await session.lines.put("")
        log.info("session_exited", session_id=session.spec.session_id, reason=session.reason)
        return session.reason

    def _note_oom(self, session: LocalSession) -> bool:
        """Make "out of memory" the reason when the kernel killed inside the session's cgroup."""
        if session.cgroup is None:
            return False
        with contextlib.suppress(OSError):
            if session.cgroup.oom_kills() > 0:
                limit = human_bytes(self.limits.memory_bytes)
                session.reason = f"out of memory: limit {limit}"
                return True
        return False

    async def _watch_memory(self, session: LocalSession) -> None:
        """End the whole session once the kernel's OOM killer struck inside it (cgroup v1 kills
        one process only; v2 with ``memory.oom.group`` kills them all)."""
        while not self._note_oom(session):  # noqa: ASYNC110 -- a counter in a file: polled
            await asyncio.sleep(_MEMORY_POLL_INTERVAL)
        log.warning("session_out_of_memory", session_id=session.spec.session_id)
        kill(members(session))

    async def _await_display(self, session: LocalSession, progress: ProgressCallback) -> None:
        while True:
            line = await session.lines.get()
            if line.startswith("display "):
                session.display = int(line.split()[1])
                progress(f"display :{session.display} up")
                return
            if not line or line.startswith("exited "):
                raise DriverError(
                    f"the X server of session {session.spec.session_id} did not start"
                )

    async def _await_banner(self, session: LocalSession) -> str:
        """Take Xvnc's socket into the root-only workdir, then read its RFB banner."""
        socket_path = session.spec.workdir / VNC_SOCKET

        def take_vnc_socket() -> bool:
            if session.exited is not None and session.exited.done():
                raise DriverError(
                    f"session {session.spec.session_id} ended before its VNC server was ready"
                )
            return take_socket(session, VNC_SOCKET)

        try:
            major, minor = await await_rfb_banner(
                lambda: asyncio.open_unix_connection(str(socket_path)),
                not_yet=(FileNotFoundError, ConnectionRefusedError),
                interval=_POLL_INTERVAL,
                prepare=take_vnc_socket,
            )
        except (asyncio.IncompleteReadError, RemoteProtocolError) as exc:
            raise DriverError(
                f"the VNC socket of session {session.spec.session_id} sent no RFB banner",
            ) from exc
        return f"{major}.{minor}"

    async def tty_endpoint(self, session_id: str) -> TtyEndpoint:
        """Return the session's text terminal: its Unix socket (:meth:`tty_socket`)."""
        return TtyEndpoint(unix_path=await self.tty_socket(session_id))

    async def tty_socket(self, session_id: str) -> str:
        """Return the Unix socket of the session's text terminal (the tty protocol).

        Waits up to :data:`TTY_TIMEOUT` for the session's tty server to listen. Raises
        :class:`DriverError` when the session is not running here or has no text terminal.
        """
        session = self._sessions.get(session_id)
        if session is None:
            raise DriverError(
                f"session {session_id} is not running in this driver", session_id=session_id
            )
        deadline = time.monotonic() + TTY_TIMEOUT
        while not take_socket(session, TTY_SOCKET):
            if session.exited is None or session.exited.done():
                raise DriverError(
                    f"session {session_id} ended before its text terminal was ready",
                    session_id=session_id,
                )
            if time.monotonic() >= deadline:
                raise DriverError(
                    f"the text terminal of session {session_id} did not start within "
                    f"{TTY_TIMEOUT:.0f} s" + log_tails(session),
                    session_id=session_id,
                )
            await asyncio.sleep(_POLL_INTERVAL)
        return str(session.spec.workdir / TTY_SOCKET)
