"""A host's sweep of what lost session actors left: real local sandboxes, a fresh driver."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.cluster.sweep import LOCK_NAME, sweep_leftovers
from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local import LocalDriver
from remotecli.drivers.local_channels import sandbox_pids

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None or os.geteuid() != 0,
    reason="sessions are sandboxed by bubblewrap as root: run scripts/install-system-deps.sh test",
)


def spec_for(data_dir: Path, session_id: str) -> SessionSpec:
    """A run that would go on for ten minutes, in the host's ``s/ID`` as an actor puts it."""
    return SessionSpec(
        session_id=session_id,
        provider="shell",
        command=["bash", "-c", "--", "sleep 600"],
        workdir=data_dir / "s" / session_id,
    )


@pytest.fixture
async def lost_actors_driver(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    """The driver of the actors that are lost (it is closed at the end, whatever is left)."""
    driver = LocalDriver(tmp_path, egress="none")
    yield driver
    await driver.close()


async def test_a_sweep_ends_only_the_sessions_whose_actors_are_gone(
    lost_actors_driver: LocalDriver, tmp_path: Path
) -> None:
    """With two sessions running under one driver (two actors' work on a host), a fresh driver
    (the next actor's) sweeping with only ``live-1`` alive ends ``lost-1``: its processes are
    gone and its directory too; ``live-1`` runs on untouched. A directory that is no session's
    (a name no id has) and a symlink are left alone. While another sweep holds the host's lock,
    a sweep does nothing."""
    lost, live = spec_for(tmp_path, "lost-1"), spec_for(tmp_path, "live-1")
    for spec in (lost, live):
        await lost_actors_driver.start_run(spec, lambda _: None)
    lost_pids = sandbox_pids(lost.workdir)
    assert lost_pids
    (tmp_path / "s" / "not a session").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "s" / "link-1").symlink_to(outside)

    next_actors = LocalDriver(tmp_path, egress="none")
    holder = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        assert await sweep_leftovers(next_actors, tmp_path, {"live-1"}) == []
        assert lost.workdir.is_dir()
    finally:
        os.close(holder)

    assert await sweep_leftovers(next_actors, tmp_path, {"live-1"}) == ["lost-1"]
    assert not lost.workdir.exists()
    assert not any(Path(f"/proc/{pid}").exists() for pid in lost_pids)
    assert sandbox_pids(live.workdir)  # its sleep goes on
    assert (tmp_path / "s" / "not a session").is_dir()
    assert (tmp_path / "s" / "link-1").is_symlink()
    assert outside.is_dir()
    await next_actors.close()


async def test_a_host_with_no_sessions_yet_sweeps_nothing(tmp_path: Path) -> None:
    """No ``s/`` under the host's data dir: nothing to sweep, and no lock file is made."""
    assert await sweep_leftovers(LocalDriver(tmp_path, egress="none"), tmp_path, set()) == []
    assert not (tmp_path / LOCK_NAME).exists()
