"""The local driver: each session is Xvfb + xterm + x11vnc in one bubblewrap sandbox.

Theory of operation. :meth:`LocalDriver.start` creates, in the session's ``workdir`` (mode
0700), ``home/`` (the session's HOME) and ``run/`` (the VNC socket, the X cookie, the logs),
then starts one process group: ``bwrap`` (when installed) running a short bash script that

1. starts ``Xvfb -displayfd``: the server itself takes the first free display number, so
   concurrent sessions never race for one; it accepts only clients holding the session's
   MIT-MAGIC-COOKIE (``run/Xauthority``), because X's abstract sockets are shared by every
   sandbox on the host;
2. starts ``xterm`` running the session's command with ``HOME=workdir/home``, and ``x11vnc``
   serving the display on the Unix socket ``run/vnc.sock`` only (``-rfbport 0``);
3. waits for any of the three to exit and reports which one on its stdout.

Under bubblewrap the sandbox sees the system read-only, a private ``/tmp`` and ``/proc``, and
only its own ``home/`` and ``run/`` writable; it is killed with the controller
(``--die-with-parent``) and its processes live in their own PID namespace. The session is ready
once an RFB banner was read from ``run/vnc.sock``. Stopping kills the process group and reaps
every member (this process becomes a child subreaper, so sandbox processes orphaned by the kill
are reaped here rather than left as zombies).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.drivers.base import ProgressCallback, SessionSpec, VncEndpoint
from remotecli.exceptions import DriverError, RemoteProtocolError
from remotecli.logs import get_logger
from remotecli.rfb import parse_protocol_version

log = get_logger("driver.local")

READY_TIMEOUT = 15.0
"""Seconds a session may take from start to an RFB banner before start() gives up."""

_PR_SET_CHILD_SUBREAPER = 36
_MARKER_VARIABLE = "REMOTECLI_SANDBOX"
_REAP_TIMEOUT = 5.0
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
_POLL_INTERVAL = 0.01

# Runs inside the sandbox. Arguments: run dir, width, height, then the session's command.
_SESSION_SCRIPT = r"""
set -u
run=$1 width=$2 height=$3
shift 3
fifo="$run/display.fifo"
rm -f "$fifo" "$run/vnc.sock"
mkfifo -m 600 "$fifo"
Xvfb -displayfd 3 -nolisten tcp -br -auth "$run/Xauthority" -screen 0 "${width}x${height}x24" \
  3>"$fifo" </dev/null 2>"$run/xvfb.log" &
xvfb=$!
if ! read -r display <"$fifo"; then
  wait "$xvfb"
  echo "exited Xvfb $?"
  exit 1
fi
rm -f "$fifo"
export DISPLAY=":$display"
echo "display $display"
cols=$((width / 6)) rows=$((height / 13))
HOLD_SCRIPT='"$@"; status=$?
printf "\n[%s exited with status %d; press Enter to end the session]\n" "${1##*/}" "$status"
read -r _'
# When the command ends, keep its last screen (often an error message) until Enter is pressed.
xterm -geometry "${cols}x${rows}+0+0" -e bash -c "$HOLD_SCRIPT" command "$@" \
  </dev/null 2>"$run/xterm.log" &
xterm=$!
x11vnc -display "$DISPLAY" -unixsock "$run/vnc.sock" -rfbport 0 -noipv6 -nopw -forever \
  -shared -quiet -nowf -noxdamage -nonap </dev/null >/dev/null 2>"$run/x11vnc.log" &
x11vnc=$!
wait -n -p who
status=$?
# Xvfb's death takes xterm and x11vnc with it: name the first program found dead or dying, in
# order of cause, not merely the first one `wait -n` reported. Dead: bash may have reaped it
# already (its status stays available to `wait PID`); dying: PF_EXITING (0x4) in its flags.
for pid in "$xvfb" "$x11vnc" "$xterm"; do
  [ "$pid" = "$who" ] && break
  flags=$(cut -d' ' -f9 "/proc/$pid/stat" 2>/dev/null || echo 4)
  if (( ${flags:-4} & 4 )); then
    who=$pid
    wait "$pid"
    status=$?
    break
  fi
done
case $who in
  "$xvfb") name=Xvfb ;;
  "$xterm") name=xterm ;;
  "$x11vnc") name=x11vnc ;;
  *) name=unknown ;;
esac
echo "exited $name $status"
"""


def _become_subreaper() -> None:
    """Make this process the reaper of orphaned descendants (Linux), so kills leave no zombie."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _proc_stat(pid: int) -> tuple[int, int, str, int] | None:
    """Return (ppid, pgrp, state, start time) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0], int(fields[19])


def session_processes(marker: str, pgid: int | None = None) -> list[int]:
    """Return the PIDs of one session (zombies included): its process group and every process
    carrying its ``REMOTECLI_SANDBOX`` marker (Xvfb and xterm's shell leave the group)."""
    needle = f"\0{_MARKER_VARIABLE}={marker}\0".encode()
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = _proc_stat(pid)
        if stat is None:
            continue
        if stat[1] == pgid:
            members.append(pid)
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in b"\0" + environ:
            members.append(pid)
    return members


_SYSTEM_ROOTS = tuple(Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt"))


def _program_roots(program: str) -> list[Path]:
    """Directories to show read-only in the sandbox so the session's program can run.

    A provider's CLI may live outside the system directories, for example in the project's
    ``node_modules/.bin`` as a link into its package: show the whole ``node_modules`` tree it
    belongs to (a Node.js CLI loads its dependencies from there), or else its own directory.
    """
    path = Path(program)
    if not path.is_absolute():
        return []
    roots: list[Path] = []
    for candidate in (path, path.resolve()):
        root = next((p for p in candidate.parents if p.name == "node_modules"), candidate.parent)
        if not any(root.is_relative_to(system) for system in _SYSTEM_ROOTS) and root not in roots:
            roots.append(root)
    return roots


def _xauthority_entry(cookie: bytes) -> bytes:
    """Return one Xauthority record for any address and display (FamilyWild)."""

    def counted(value: bytes) -> bytes:
        return struct.pack(">H", len(value)) + value

    family_wild = 0xFFFF
    return struct.pack(">H", family_wild) + b"".join(
        counted(part) for part in (b"", b"", b"MIT-MAGIC-COOKIE-1", cookie)
    )


@dataclass
class _Session:
    spec: SessionSpec
    process: asyncio.subprocess.Process
    run_dir: Path
    marker: str
    reason: str | None = None
    display: int | None = None
    lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None
    exited: asyncio.Task[str] | None = None


class LocalDriver:
    """Runs sessions as sandboxed processes on this machine. One instance per controller."""

    name = "local"

    def __init__(self, data_dir: Path, *, sandbox: bool | None = None) -> None:
        """Keep state under ``data_dir``; ``sandbox=None`` uses bubblewrap when it is installed."""
        self.data_dir = data_dir
        self.bwrap = shutil.which("bwrap") if sandbox is not False else None
        if sandbox and self.bwrap is None:
            raise DriverError("bubblewrap (bwrap) is not installed; install the bubblewrap package")
        self._sessions: dict[str, _Session] = {}
        _become_subreaper()

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Start the session's sandbox and return its VNC socket once a banner was read.

        Raises :class:`DriverError` with the failing program's log when the sandbox dies or the
        banner does not come within :data:`READY_TIMEOUT`; nothing is left running then.
        """
        if spec.session_id in self._sessions:
            raise DriverError(f"session {spec.session_id} is already running in this driver")
        missing = [p for p in ("Xvfb", "xterm", "x11vnc") if shutil.which(p) is None]
        if missing:
            raise DriverError(
                f"{', '.join(missing)} not installed; run scripts/install-system-deps.sh run",
                missing=missing,
            )
        socket_path = spec.workdir / "run" / "vnc.sock"
        if len(os.fsencode(socket_path)) > _UNIX_PATH_MAX:
            raise DriverError(
                f"the VNC socket path {socket_path} is longer than a Unix socket allows "
                f"({_UNIX_PATH_MAX} bytes); choose a shorter data directory",
                session_id=spec.session_id,
            )
        began = time.monotonic()
        home, run_dir = self._prepare(spec)
        marker = f"{spec.session_id}.{secrets.token_hex(8)}"
        # Record the marker before spawning: a controller killed between the spawn and the pid
        # line below (before bwrap's --die-with-parent is armed) leaves a sandbox that recover()
        # can then still find by its marker (a pid of 0 means "no group known").
        (run_dir / "pid").write_text(f"0 {marker}\n")
        with (run_dir / "sandbox.log").open("wb") as sandbox_log:
            process = await asyncio.create_subprocess_exec(
                *self._argv(spec, home, run_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=sandbox_log,
                start_new_session=True,
                env={**self._environment(spec, home, run_dir), _MARKER_VARIABLE: marker},
            )
        (run_dir / "pid").write_text(f"{process.pid} {marker}\n")
        session = _Session(spec, process, run_dir, marker)
        self._sessions[spec.session_id] = session
        session.reader = asyncio.create_task(self._read_reports(session))
        session.exited = asyncio.create_task(self._watch(session))
        progress("sandbox started" + (" under bubblewrap" if self.bwrap else " (no bubblewrap)"))
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self._await_display(session, progress)
                version = await self._await_banner(session)
        except BaseException as exc:
            reason = session.reason
            await self.stop(spec.session_id)
            if isinstance(exc, TimeoutError):
                raise DriverError(
                    f"session {spec.session_id} showed no VNC banner within {READY_TIMEOUT:.0f} s;"
                    f" see {run_dir}/x11vnc.log",
                    session_id=spec.session_id,
                ) from exc
            if isinstance(exc, DriverError) and reason is not None:
                raise DriverError(f"{exc.message}: {reason}", session_id=spec.session_id) from exc
            raise
        elapsed = time.monotonic() - began
        progress(f"VNC banner read (RFB {version}) after {elapsed:.2f} s")
        log.info("session_ready", session_id=spec.session_id, seconds=round(elapsed, 3))
        return VncEndpoint(unix_path=str(run_dir / "vnc.sock"))

    async def wait(self, session_id: str) -> str:
        """Return, with the reason, when any process of the session exits by itself."""
        session = self._sessions.get(session_id)
        if session is None or session.exited is None:
            return f"session {session_id} is not running in this driver"
        return await asyncio.shield(session.exited)

    async def stop(self, session_id: str) -> None:
        """Kill the session's process group and reap every member. Idempotent."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        killed = _kill(session_processes(session.marker, session.process.pid))
        with contextlib.suppress(ProcessLookupError):
            await session.process.wait()
        await _reap(session.marker, session.process.pid, killed)
        for task in (session.reader, session.exited):
            if task is not None and not task.done():
                task.cancel()
        with contextlib.suppress(OSError):
            (session.run_dir / "vnc.sock").unlink()
        with contextlib.suppress(OSError):
            (session.run_dir / "pid").unlink()
        log.info("session_stopped", session_id=session_id)

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        """Kill what a previous controller left of the session (from its pid file); return None.

        A local sandbox dies with the controller that started it, so nothing is ever resumed.
        """
        pid_file = workdir / "run" / "pid"
        try:
            pid_text, marker = pid_file.read_text().split()
        except (OSError, ValueError):
            return None
        # The recorded group counts only if a process with the marker is still in it: the
        # number may belong to someone else by now.
        marked = session_processes(marker)
        pgid: int | None = int(pid_text)
        if not any((stat := _proc_stat(pid)) is not None and stat[1] == pgid for pid in marked):
            pgid = None
        leftovers = session_processes(marker, pgid)
        await _reap(marker, pgid, _kill(leftovers))
        with contextlib.suppress(OSError):
            pid_file.unlink()
        if leftovers:
            log.info("session_leftovers_killed", session_id=session_id, pids=leftovers)
        return None

    async def close(self) -> None:
        """Stop every session this driver started."""
        await asyncio.gather(*(self.stop(session_id) for session_id in list(self._sessions)))

    def _prepare(self, spec: SessionSpec) -> tuple[Path, Path]:
        home, run_dir = spec.workdir / "home", spec.workdir / "run"
        for directory in (spec.workdir, home, run_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        xauthority = run_dir / "Xauthority"
        xauthority.touch(mode=0o600)
        xauthority.write_bytes(_xauthority_entry(secrets.token_bytes(16)))
        return home, run_dir

    def _argv(self, spec: SessionSpec, home: Path, run_dir: Path) -> list[str]:
        script = [
            "bash",
            "-c",
            _SESSION_SCRIPT,
            "session",
            str(run_dir),
            str(spec.width),
            str(spec.height),
            *spec.command,
        ]
        if self.bwrap is None:
            return script
        sandbox = [self.bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc"]
        sandbox += ["--unshare-uts", "--unshare-cgroup-try", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            root = Path("/") / name
            if root.is_symlink():
                sandbox += ["--symlink", os.readlink(root), str(root)]
            elif root.is_dir():
                sandbox += ["--ro-bind", str(root), str(root)]
        sandbox += ["--ro-bind", "/etc", "/etc", "--ro-bind-try", "/opt", "/opt"]
        sandbox += ["--ro-bind-try", "/var/cache/fontconfig", "/var/cache/fontconfig"]
        for root in _program_roots(spec.command[0]):
            sandbox += ["--ro-bind", str(root), str(root)]
        sandbox += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # noqa: S108 -- a private one
        sandbox += ["--bind", str(home), str(home), "--bind", str(run_dir), str(run_dir)]
        sandbox += ["--chdir", str(home), "--"]
        return sandbox + script

    def _environment(self, spec: SessionSpec, home: Path, run_dir: Path) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "USER": os.environ.get("USER", "remotecli"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "TERM": "xterm-256color",
            "XAUTHORITY": str(run_dir / "Xauthority"),
            "REMOTECLI_SESSION_ID": spec.session_id,
        }
        env.update(spec.env)
        return env

    async def _read_reports(self, session: _Session) -> None:
        assert session.process.stdout is not None
        while line := await session.process.stdout.readline():
            text = line.decode(errors="replace").strip()
            if text.startswith("exited "):
                _, name, status = [*text.split(), "?", "?"][:3]
                session.reason = f"{name} exited with status {status}"
            await session.lines.put(text)

    async def _watch(self, session: _Session) -> str:
        returncode = await session.process.wait()
        if session.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await session.reader
        killed = _kill(session_processes(session.marker, session.process.pid))
        await _reap(session.marker, session.process.pid, killed)
        if session.reason is None:
            session.reason = (
                f"sandbox killed by signal {-returncode}"
                if returncode < 0
                else f"sandbox exited with status {returncode}"
            )
        await session.lines.put("")
        log.info("session_exited", session_id=session.spec.session_id, reason=session.reason)
        return session.reason

    async def _await_display(self, session: _Session, progress: ProgressCallback) -> None:
        while True:
            line = await session.lines.get()
            if line.startswith("display "):
                session.display = int(line.split()[1])
                progress(f"display :{session.display} up")
                return
            if not line or line.startswith("exited "):
                raise DriverError(
                    f"the X server of session {session.spec.session_id} did not start; "
                    f"see {session.run_dir}/xvfb.log"
                )

    async def _await_banner(self, session: _Session) -> str:
        """Connect to the VNC socket until a banner is read (x11vnc creates it when ready)."""
        socket_path = str(session.run_dir / "vnc.sock")
        while True:
            if session.exited is not None and session.exited.done():
                raise DriverError(
                    f"session {session.spec.session_id} ended before its VNC server was ready; "
                    f"see {session.run_dir}/x11vnc.log"
                )
            try:
                reader, writer = await asyncio.open_unix_connection(socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(_POLL_INTERVAL)
                continue
            try:
                banner = await reader.readexactly(12)
                major, minor = parse_protocol_version(banner)
            except (asyncio.IncompleteReadError, RemoteProtocolError) as exc:
                raise DriverError(
                    f"the VNC socket of session {session.spec.session_id} sent no RFB banner",
                ) from exc
            finally:
                writer.close()
            return f"{major}.{minor}"


def _kill(pids: list[int]) -> dict[int, int]:
    """SIGKILL ``pids``; return them with their start times, to follow them as zombies."""
    known = {}
    for pid in pids:
        stat = _proc_stat(pid)
        if stat is not None:
            known[pid] = stat[3]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return known


async def _reap(marker: str, pgid: int | None, known: dict[int, int]) -> None:
    """Wait until no process of the session is left, reaping those orphaned to us.

    ``known`` (from :func:`_kill`) keeps zombies in view: a zombie's environment, hence its
    marker, is no longer readable.
    """
    deadline = time.monotonic() + _REAP_TIMEOUT
    me = os.getpid()
    while True:
        members = set(session_processes(marker, pgid))
        members.update(
            pid
            for pid, start in known.items()
            if (stat := _proc_stat(pid)) is not None and stat[3] == start
        )
        if not members:
            return
        for pid in members:
            stat = _proc_stat(pid)
            if stat is not None and stat[0] == me and stat[2] == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 -- a zombie: returns at once
            elif stat is not None and stat[2] != "Z":
                known.update(_kill([pid]))
        if time.monotonic() > deadline:
            log.warning("session_processes_left", marker=marker, pids=sorted(members))
            return
        await asyncio.sleep(_POLL_INTERVAL)
