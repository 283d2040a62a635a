"""What sessions of a host's lost actors left behind: found and ended when the host runs again.

A session's actor ends its session when it is stopped. An actor that dies instead (its Ray
worker killed, the host's raylet gone while the host itself lives) ends nothing: its
session's directory stays under the host's data dir (``s/ID``), with its cgroup and, for a
microVM, possibly its QEMU process. The controller has already failed such a session ("host
H lost"). The next session actor that starts on that host sweeps: every directory under
``s/`` whose actor is no longer among the cluster's named actors is handed to the host's
driver as a restarted controller would hand it over (``recover``, then ``stop``), and removed.

A session's actor is named from its creation, before it makes its directory, so a directory
whose name is not among the live actors belongs to nobody. One sweep at a time per host (a
lock file); a sweep that finds the lock taken does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from remotecli.logs import get_logger

log = get_logger("cluster.sweep")

LOCK_NAME = ".sweep.lock"
SESSION_NAME = re.compile(r"(run-)?[A-Za-z0-9_-]{1,64}")
"""A session's or run's id as the controller makes them; anything else under ``s/`` is not
a session's directory and is left alone."""


async def sweep_leftovers(driver: Any, data_dir: Path, live: Collection[str]) -> list[str]:
    """End and remove the sessions under ``data_dir / "s"`` whose id is not in ``live``.

    ``driver`` is the host's driver (``recover`` and ``stop`` as the Driver seam has them).
    Returns the ids swept; none when another sweep holds the host's lock. A session the
    driver fails to end is still removed, and logged.
    """
    sessions = data_dir / "s"
    if not sessions.is_dir():
        return []
    descriptor = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []
        swept = []
        for workdir in sorted(sessions.iterdir()):
            session_id = workdir.name
            if session_id in live or not SESSION_NAME.fullmatch(session_id):
                continue
            if workdir.is_symlink() or not workdir.is_dir():
                continue
            try:
                await driver.recover(session_id, workdir)
                await driver.stop(session_id)
            except Exception as exc:  # a leftover that cannot be ended must not stop the sweep
                log.warning("leftover not ended", session_id=session_id, error=str(exc))
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
            swept.append(session_id)
            log.info("leftover swept", session_id=session_id)
        return swept
    finally:
        os.close(descriptor)
