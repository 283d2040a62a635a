"""Tests for the local driver with real Xvfb, xterm, x11vnc and bubblewrap."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.drivers.base import SessionSpec, VncEndpoint
from remotecli.drivers.local import LocalDriver, sandbox_pids
from tests.conftest import MS
from tests.rfb_viewer import RfbViewer, wait_for_file

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("Xvfb", "xterm", "x11vnc")),
    reason="Xvfb, xterm and x11vnc are needed: run scripts/install-system-deps.sh run",
)
needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap is not installed"
)
START_TIMEOUT = 15_000 * MS


def spec_for(tmp_path: Path, session_id: str) -> SessionSpec:
    return SessionSpec(
        session_id=session_id,
        provider="shell",
        command=["bash", "--norc", "--noprofile"],
        workdir=tmp_path / "sessions" / session_id,
        width=640,
        height=400,
    )


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(tmp_path)
    yield local
    await local.close()


async def open_viewer(endpoint: VncEndpoint) -> tuple[RfbViewer, asyncio.StreamWriter]:
    assert endpoint.unix_path is not None
    reader, writer = await asyncio.open_unix_connection(endpoint.unix_path)

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    viewer = RfbViewer(lambda: reader.read(1 << 20), send)
    await viewer.handshake()
    return viewer, writer


def processes_of(spec: SessionSpec) -> list[int]:
    """Return the PIDs of the session's processes, found as the driver finds them."""
    return sandbox_pids(spec.workdir)


def pid_of(spec: SessionSpec, program: str) -> int:
    for pid in processes_of(spec):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(argv0.decode()) == program:
            return pid
    raise AssertionError(f"no {program} among the processes of session {spec.session_id}")


async def test_start_returns_unix_endpoint_after_banner(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """start() reports progress and returns a Unix socket in the 0700 workdir that speaks RFB."""
    steps: list[str] = []
    spec = spec_for(tmp_path, "banner")
    endpoint = await asyncio.wait_for(driver.start(spec, steps.append), START_TIMEOUT)
    assert endpoint.unix_path == str(spec.workdir / "vnc.sock")
    assert (spec.workdir.stat().st_mode & 0o777) == 0o700
    assert any(step.startswith("display :") for step in steps)
    assert steps[-1].startswith("VNC banner read (RFB 3.8)")
    reader, writer = await asyncio.open_unix_connection(endpoint.unix_path)
    assert await reader.readexactly(12) == b"RFB 003.008\n"
    writer.close()


async def test_framebuffer_has_pixels_and_keys_reach_the_shell(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """A viewer sees a non-blank xterm and its key events make the shell write a file in HOME."""
    spec = spec_for(tmp_path, "typing")
    endpoint = await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    viewer, writer = await open_viewer(endpoint)
    assert viewer.init is not None
    assert (viewer.init.width, viewer.init.height) == (640, 400)
    await viewer.wait_non_blank(START_TIMEOUT)
    await viewer.type("echo proof > ~/proof.txt\n")
    text = await wait_for_file(spec.workdir / "home" / "proof.txt", START_TIMEOUT, "proof\n")
    assert text == "proof\n"
    writer.close()


@pytest.mark.parametrize("program", ["Xvfb", "xterm", "x11vnc"])
async def test_crash_of_any_process_ends_wait_with_reason(
    driver: LocalDriver, tmp_path: Path, program: str
) -> None:
    """Killing any one of the session's programs makes wait() return a reason naming it."""
    spec = spec_for(tmp_path, f"crash-{program.lower()}")
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    pids = processes_of(spec)
    os.kill(pid_of(spec, program), signal.SIGKILL)
    reason = await asyncio.wait_for(driver.wait(spec.session_id), START_TIMEOUT)
    assert reason.startswith(f"{program} exited with status")
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


@pytest.mark.parametrize("sandbox", [None, False], ids=["bubblewrap-if-installed", "no-sandbox"])
async def test_stop_leaves_no_process(tmp_path: Path, sandbox: bool | None) -> None:
    """After stop() none of the session's processes is in the process table, zombies included."""
    driver = LocalDriver(tmp_path, sandbox=sandbox)
    spec = spec_for(tmp_path, "stop")
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    pids = processes_of(spec)
    assert len(pids) >= 5  # sandbox (or script), Xvfb, xterm and its shell, x11vnc
    await asyncio.wait_for(driver.stop(spec.session_id), START_TIMEOUT)
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    await driver.stop(spec.session_id)  # idempotent
    await driver.close()


async def test_cancelled_start_leaves_no_process(driver: LocalDriver, tmp_path: Path) -> None:
    """Cancelling start() once the display is up kills everything the session started."""
    spec = spec_for(tmp_path, "cancel")
    display_up = asyncio.Event()

    def progress(step: str) -> None:
        if step.startswith("display :"):
            display_up.set()

    task = asyncio.create_task(driver.start(spec, progress))
    await asyncio.wait_for(display_up.wait(), START_TIMEOUT)
    pids = processes_of(spec)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pids
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []


async def test_recover_kills_leftovers_and_returns_none(tmp_path: Path) -> None:
    """recover() on a new driver kills the processes an earlier driver left and returns None."""
    first = LocalDriver(tmp_path)
    spec = spec_for(tmp_path, "recover")
    await asyncio.wait_for(first.start(spec, lambda _: None), START_TIMEOUT)
    pids = processes_of(spec)
    assert pids
    second = LocalDriver(tmp_path)
    assert await second.recover(spec.session_id, spec.workdir) is None
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    await first.close()


@needs_bwrap
async def test_sessions_cannot_read_each_others_home(driver: LocalDriver, tmp_path: Path) -> None:
    """Under bubblewrap a session's shell cannot see another session's HOME."""
    victim = spec_for(tmp_path, "victim")
    thief = spec_for(tmp_path, "thief")
    await asyncio.wait_for(driver.start(victim, lambda _: None), START_TIMEOUT)
    endpoint = await asyncio.wait_for(driver.start(thief, lambda _: None), START_TIMEOUT)
    secret = victim.workdir / "home" / "secret.txt"
    secret.write_text("victim's secret\n")
    viewer, writer = await open_viewer(endpoint)
    await viewer.wait_non_blank(START_TIMEOUT)
    await viewer.type(f"cat {secret} > ~/stolen.txt 2> ~/error.txt; echo done > ~/done.txt\n")
    home = thief.workdir / "home"
    await wait_for_file(home / "done.txt", START_TIMEOUT, "done")
    assert (home / "stolen.txt").read_text() == ""
    assert "No such file or directory" in (home / "error.txt").read_text()
    writer.close()
