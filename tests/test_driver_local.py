"""Tests for the local driver with real Xvnc, tmux, xterm, the window manager and bubblewrap."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.drivers.base import SessionSpec, VncEndpoint
from remotecli.drivers.local import PROGRAMS, LocalDriver
from remotecli.drivers.local_channels import sandbox_pids
from tests.conftest import MS
from tests.rfb_viewer import RfbViewer, wait_for_file

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in PROGRAMS),
    reason=f"{', '.join(PROGRAMS)} are needed: run scripts/install-system-deps.sh run",
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


def pids_of(spec: SessionSpec, program: str) -> list[int]:
    """Return the PIDs of the session's processes running ``program`` (tmux: its server only)."""
    found = []
    for pid in processes_of(spec):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.path.basename(argv[0].decode()) != program:
            continue
        if program == "tmux" and b"new-session" not in argv:
            continue  # a client (the xterm's, the waiter): the server is the one that made "main"
        found.append(pid)
    return found


def pid_of(spec: SessionSpec, program: str) -> int:
    pids = pids_of(spec, program)
    if not pids:
        raise AssertionError(f"no {program} among the processes of session {spec.session_id}")
    return pids[0]


async def all_running(spec: SessionSpec) -> None:
    """Wait until every program of the session runs (start() returns once Xvnc is ready)."""
    programs = ("Xvnc", "tmux", "remotecli-tty", "matchbox-window-manager", "xterm")
    async with asyncio.timeout(START_TIMEOUT):
        while not all(pids_of(spec, program) for program in programs):
            await asyncio.sleep(20 * MS)


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


@pytest.mark.parametrize("program", ["Xvnc", "tmux", "remotecli-tty", "matchbox-window-manager"])
async def test_crash_of_any_process_ends_wait_with_reason(
    driver: LocalDriver, tmp_path: Path, program: str
) -> None:
    """Killing any one of the session's programs makes wait() return a reason naming it."""
    spec = spec_for(tmp_path, f"crash-{program.lower()[:8]}")
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    await all_running(spec)
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
    await all_running(spec)
    pids = processes_of(spec)
    # sandbox (or script), Xvnc, tmux's server and the shell in it, the tty server, the window
    # manager, xterm and its tmux client
    assert len(pids) >= 8
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


async def test_a_killed_xterm_is_restarted_and_the_session_goes_on(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """xterm is only a view of tmux: killed, another one starts and the session does not end."""
    spec = spec_for(tmp_path, "xterm-again")
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    await all_running(spec)
    first = pid_of(spec, "xterm")
    os.kill(first, signal.SIGKILL)
    async with asyncio.timeout(START_TIMEOUT):
        while not [pid for pid in pids_of(spec, "xterm") if pid != first]:
            await asyncio.sleep(20 * MS)
    waiting = asyncio.ensure_future(driver.wait(spec.session_id))
    await asyncio.sleep(300 * MS)
    assert not waiting.done()
    waiting.cancel()
