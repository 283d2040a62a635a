"""Finding, killing and reaping every process of one local session.

A hostile session can leave its process group, clear its environment and rename itself, but it
cannot change its uid or its cgroup: with a root controller those decide. Without root, the
session's process group and the ``REMOTECLI_SANDBOX`` marker in each environment do. Killing
is SIGKILL; :func:`reap` then waits until none is left in the process table, reaping the
zombies orphaned to this process, which :func:`become_subreaper` made their reaper.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from pathlib import Path

from remotecli.logs import get_logger
from remotecli.sandbox.cgroups import SessionCgroup
from remotecli.sandbox.uids import processes_of_uid

log = get_logger("sandbox.processes")

MARKER_VARIABLE = "REMOTECLI_SANDBOX"
_PR_SET_CHILD_SUBREAPER = 36
_REAP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.01
_ENVIRON_HEAD = 4096


def become_subreaper() -> None:
    """Make this process the reaper of orphaned descendants (Linux), so kills leave no zombie."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def proc_stat(pid: int) -> tuple[int, int, str, int] | None:
    """Return (ppid, pgrp, state, start time) of ``pid`` from /proc, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), fields[0], int(fields[19])


def session_processes(
    marker: str,
    pgid: int | None = None,
    uid: int | None = None,
    cgroup: SessionCgroup | None = None,
) -> list[int]:
    """Return the PIDs of one session (zombies included).

    With a ``uid`` of its own (a root controller), every process running as it or in its
    ``cgroup``: a hostile session can leave its process group and clear its environment, not
    change its uid or cgroup. (The launcher, root until it drops, is the driver's own child,
    killed by its pid.) Without one, its process group and every process carrying its
    ``REMOTECLI_SANDBOX`` marker (the display server and the terminal's shell may leave the
    group); the marker is the first variable of the environment, so only a bounded head of each
    environment is read.
    """
    needle = f"\0{MARKER_VARIABLE}={marker}\0".encode()
    members = set(processes_of_uid(uid)) if uid is not None else set()
    if cgroup is not None:
        with contextlib.suppress(OSError):
            members.update(cgroup.pids())
    if uid is not None:
        return sorted(members)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat_ = proc_stat(pid)
        if stat_ is None:
            continue
        if stat_[1] == pgid:
            members.add(pid)
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read(_ENVIRON_HEAD)
        except OSError:
            continue
        if needle in b"\0" + environ:
            members.add(pid)
    return sorted(members)


def kill(pids: list[int]) -> dict[int, int]:
    """SIGKILL ``pids``; return them with their start times, to follow them as zombies."""
    known = {}
    for pid in pids:
        info = proc_stat(pid)
        if info is not None:
            known[pid] = info[3]
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return known


async def reap(
    marker: str, pgid: int | None, known: dict[int, int], uid: int | None = None
) -> None:
    """Wait until no process of the session is left, reaping those orphaned to us.

    ``known`` (from :func:`kill`) keeps zombies in view: a zombie's environment, hence its
    marker, is no longer readable.
    """
    deadline = time.monotonic() + _REAP_TIMEOUT
    me = os.getpid()
    while True:
        members = set(session_processes(marker, pgid, uid))
        members.update(
            pid
            for pid, start in known.items()
            if (info := proc_stat(pid)) is not None and info[3] == start
        )
        if not members:
            return
        for pid in members:
            info = proc_stat(pid)
            if info is not None and info[0] == me and info[2] == "Z":
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 -- a zombie: returns at once
            elif info is not None and info[2] != "Z":
                known.update(kill([pid]))
        if time.monotonic() > deadline:
            log.warning("session_processes_left", marker=marker, pids=sorted(members))
            return
        await asyncio.sleep(_POLL_INTERVAL)
