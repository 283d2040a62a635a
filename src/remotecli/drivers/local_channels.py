"""A running local session as the driver holds it, and what it says back, read as hostile input.

:class:`LocalSession` is the local driver's record of one session. The functions below read what
the session writes for the controller, every byte of it under the control of the session's
hostile user: the report pipe (:func:`read_reports`: short known lines only, anything else
ends the session), the sign-in link FIFO (:func:`read_links`, through
:class:`remotecli.links.LinkReader`), the sockets it makes in ``run/`` (:func:`take_socket`:
moved into the root-only workdir, checked to be a socket of the session's own uid, never
followed), and its logs (:func:`log_tails`: tails, owner-checked, no link followed).
:func:`members` finds every process of the session, to kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local_sandbox import (
    COMMAND_EXIT,
    REPORT_LINES_MAX,
    Report,
    parse_command_exit,
    parse_report,
)
from remotecli.exceptions import DriverError
from remotecli.links import LinkReader
from remotecli.logs import get_logger
from remotecli.sandbox import files
from remotecli.sandbox.cgroups import SessionCgroup
from remotecli.sandbox.network import Pasta
from remotecli.sandbox.processes import kill, session_processes
from remotecli.sandbox.uids import Lease

log = get_logger("driver.local")

PID_FILE = "sandbox.pid"
"""In the root-only workdir: "PGID MARKER UID" of a running sandbox, for recover() after a crash."""


def sandbox_pids(workdir: Path) -> list[int]:
    """Return the PIDs of the session whose workdir is ``workdir``, from its pid file (tests)."""
    pgid, marker, uid = (workdir / PID_FILE).read_text().split()
    return session_processes(marker, int(pgid), None if uid == "-" else int(uid))


@dataclass
class LocalSession:
    """What the local driver knows of one session it started."""

    spec: SessionSpec
    marker: str
    lease: Lease | None
    run_dir: Path
    process: asyncio.subprocess.Process | None = None
    cgroup: SessionCgroup | None = None
    pasta: Pasta | None = None
    child_pid: int | None = None
    netns_fd: int | None = None
    links_fd: int | None = None
    links: LinkReader = field(default_factory=LinkReader)
    reason: str | None = None
    display: int | None = None
    lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[object]] = field(default_factory=list)
    reports: asyncio.Task[None] | None = None
    """The report reader (a session's, not a headless run's: its output is the command's)."""
    headless: bool = False
    sockets: set[str] = field(default_factory=set)
    """The sockets of run/ already moved into the workdir (and checked)."""
    exited: asyncio.Task[str] | None = None

    @property
    def uid(self) -> int | None:
        return None if self.lease is None else self.lease.uid


async def read_reports(session: LocalSession) -> None:
    """Read the session script's reports: ``display N`` once, then ``exited NAME STATUS``.

    The pipe is the session's to write (any of its processes can take the descriptor with
    /proc or pidfd tricks), so it is read as hostile input: short lines of the two forms
    only, a few of them, nothing queued after the display; anything else ends the session.
    """
    assert session.process is not None
    stdout = session.process.stdout
    assert stdout is not None
    lines = 0
    try:
        while line := await stdout.readline():
            lines += 1
            if lines > REPORT_LINES_MAX:
                raise ValueError("too many reports")
            report = parse_report(line)
            if report.kind == "display":
                if session.display is None:
                    await session.lines.put(line.decode())
            else:
                if session.reason is None:
                    session.reason = exit_reason(session, report)
                await session.lines.put(line.decode())
    except (ValueError, asyncio.LimitOverrunError):
        session.reason = "the session wrote to the driver's report channel; ended"
        log.warning("session_report_violation", session_id=session.spec.session_id)
        kill(members(session))


def exit_reason(session: LocalSession, report: Report) -> str:
    """Name the session's own command when its exit ended the terminal, else the program."""
    if report.program == "tmux":  # the CLI's hold script ends tmux's server
        written = files.read_tail(session.run_dir / COMMAND_EXIT, 80, owner=session.uid)
        command = parse_command_exit(written)
        if command is not None:
            return f"{command[0]} exited with status {command[1]}"
    return f"{report.program} exited with status {report.status}"


def read_links(session: LocalSession) -> None:
    """Pass each link the session asks a browser to open to ``spec.open_url``."""
    fd, notify = session.links_fd, session.spec.open_url
    if fd is None:
        return

    def readable() -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            stop_links(session)
            return
        for link in session.links.receive_data(data):
            log.info("session_open_url", session_id=session.spec.session_id)
            if notify is not None:
                notify(link)

    asyncio.get_running_loop().add_reader(fd, readable)


def stop_links(session: LocalSession) -> None:
    if session.links_fd is not None:
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().remove_reader(session.links_fd)
        os.close(session.links_fd)
        session.links_fd = None


def take_socket(session: LocalSession, name: str) -> bool:
    """Move the session's socket ``run/NAME`` into the root-only workdir; False until made.

    The socket is made by a program the session controls, in a directory the session can
    write: it could be a link to another session's socket or the controller's own. Moved
    into the workdir it can no longer be swapped, and it must be a socket owned by the
    session's uid there, or the session fails.
    """
    if name in session.sockets:
        return True
    taken = session.spec.workdir / name
    try:
        os.rename(session.run_dir / name, taken)
    except FileNotFoundError:
        return False
    info = os.lstat(taken)
    owner = session.uid if session.uid is not None else os.getuid()
    if stat.S_ISSOCK(info.st_mode) and info.st_uid == owner:
        session.sockets.add(name)
        return True
    with contextlib.suppress(OSError):
        os.unlink(taken)  # a link or file: unlink never follows it
    if session.reason is None:
        session.reason = f"the session put something other than its own socket at run/{name}"
    kill(members(session))
    raise DriverError(
        f"session {session.spec.session_id} put something other than its own "
        f"socket where its {name} belongs; the session was ended",
        session_id=session.spec.session_id,
    )


def launcher_error(session: LocalSession) -> str:
    return files.read_tail(session.spec.workdir / "sandbox.log", 400).replace("\n", "; ")


def log_tails(session: LocalSession) -> str:
    """The last lines of the session's logs, for an error message (never following links)."""
    parts = []
    logs: list[tuple[str, Path, int | None]] = [
        ("sandbox", session.spec.workdir / "sandbox.log", None)
    ]
    logs += [
        (name, session.run_dir / f"{name}.log", session.uid)
        for name in ("xvnc", "tmux", "tty", "wm", "xterm")
    ]
    for name, path, owner in logs:
        tail = files.read_tail(path, 300, owner=owner)
        if tail:
            parts.append(f"{name}: {tail.replace(chr(10), ' | ')}")
    return ("; " + "; ".join(parts)) if parts else ""


def members(session: LocalSession) -> list[int]:
    """Every process of ``session`` now, and the driver's own child while it is not reaped."""
    process = session.process
    pgid = process.pid if process is not None else None
    found = set(session_processes(session.marker, pgid, session.uid, session.cgroup))
    if process is not None and process.returncode is None:
        found.add(process.pid)  # our unreaped child: its pid cannot belong to anyone else
    return sorted(found)


async def read_child_pid(info_fd: int) -> int:
    """Read bubblewrap's ``--info-fd`` JSON and return the sandbox's first process id."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(info_fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        data = await reader.readuntil(b"}")
    except asyncio.IncompleteReadError as exc:
        raise DriverError("the sandbox did not start") from exc
    finally:
        transport.close()
    return int(json.loads(data)["child-pid"])


def remove_workdir(workdir: Path) -> None:
    """Unmount the session's HOME and workdir tmpfs, then remove what is left (no links
    followed, any depth)."""
    files.unmount(workdir / "home")
    files.unmount(workdir)
    files.remove_tree(workdir)
