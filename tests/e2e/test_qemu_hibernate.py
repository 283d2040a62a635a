"""Hibernate end to end: a microVM session saved to disk and resumed, through gateway and bridge.

Each test runs a controller with the qemu driver on its own data dir (the guest image and
templates come from the shared caches, as in ``test_qemu.py``). Sessions are hibernated with
``POST .../hibernate`` rather than by waiting for ``hibernate_after``: the reaper's timing is
covered with a fake clock in ``tests/test_sessions_hibernate.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.drivers.qemu_hibernate import STATE_NAME
from remotecli.images import GuestImage
from tests.conftest import MS
from tests.e2e.sessions_api import create_ready_session
from tests.e2e.test_qemu import (
    TEMPLATE_TIMEOUT,
    TIMEOUT,
    System,
    desktop_through_bridge,
    image,
    pytestmark,
    type_in,
)
from tests.rfb_viewer import wait_for_file
from tests.test_driver_terminal import capital_rows, until_terminal_shows

__all__ = ["image", "pytestmark"]  # the module's image fixture and marks: e2e, qemu

RESUME_BOUND = 30_000 * MS
"""Generous: a resume takes well under a second here; the figure is measured by the bench."""


@contextlib.asynccontextmanager
async def controller(image: GuestImage, data_dir: Path) -> AsyncIterator[System]:
    """A controller and gateway with the qemu driver on ``data_dir``; closed on exit."""
    cache = image.directory.parent
    driver = QemuBenchDriver(data_dir, image_cache=cache, template_cache=cache.parent / "templates")
    running = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir, hibernate_after=0),
        driver=driver,
    )
    await running.start()
    try:
        yield System(running.url(), running.admin_token, driver)
    finally:
        await running.close()


def qemu_processes_of(session_id: str) -> list[int]:
    """PIDs of every process whose command line names the session (its QEMU's serial log)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"qemu-system") and f"/{session_id}/".encode() in cmdline:
            pids.append(int(entry.name))
    return pids


async def until_unwatched(api: httpx.AsyncClient, session_id: str) -> None:
    """Wait until the controller counts no viewer on the session (a closed view is counted
    out when the bridge sees the close)."""
    async with asyncio.timeout(TIMEOUT):
        while (await api.get(f"/api/sessions/{session_id}")).json()["viewers"]:
            await asyncio.sleep(20 * MS)


async def hibernate(system: System, api: httpx.AsyncClient, session_id: str) -> Path:
    """Hibernate the session through the API; check that its QEMU is gone; return its state."""
    pid = system.driver.pid_of(session_id)
    serial = system.driver.serial_log(session_id)
    assert pid is not None
    assert serial is not None
    await until_unwatched(api, session_id)
    response = await api.post(f"/api/sessions/{session_id}/hibernate")
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "hibernated"
    assert not Path(f"/proc/{pid}").exists()
    assert qemu_processes_of(session_id) == []
    assert system.driver.pid_of(session_id) is None
    listed = (await api.get("/api/sessions")).json()
    assert [s["state"] for s in listed if s["id"] == session_id] == ["hibernated"]
    state = serial.parent / STATE_NAME
    assert state.is_file()
    return state


async def test_hibernate_then_a_viewer_resumes_the_same_screen_and_files(
    image: GuestImage, tmp_path: Path
) -> None:
    """A hibernated session has no QEMU process; a desktop viewer connecting resumes it within
    the bound, sees the very screen it left, and a file written before is still there."""
    async with controller(image, tmp_path / "data") as system, system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        async with desktop_through_bridge(system, api, session_id) as desktop:
            await until_terminal_shows(desktop)
            # a file, then a screen that does not change: capitals, the cursor hidden, waiting
            await desktop.type(
                "echo written-before-sleep > /root/note.txt; clear; "
                "printf '\\033[?25l\\n\\nHHHHHHHHHHHHHHHH'; read -r _\n"
            )
            await capital_rows(desktop)
            await desktop.update()
            before = bytes(desktop.pixels)
            size = (desktop.width, desktop.height)
        state = await hibernate(system, api, session_id)
        started = time.monotonic()
        async with desktop_through_bridge(system, api, session_id) as desktop:
            resumed_in = time.monotonic() - started
            assert resumed_in < RESUME_BOUND, f"resumed in {resumed_in:.1f} s"
            assert (await api.get(f"/api/sessions/{session_id}")).json()["state"] == "ready"
            assert not state.exists()
            await desktop.update()
            assert (desktop.width, desktop.height) == size
            assert bytes(desktop.pixels) == before
            await desktop.type("\ncat /root/note.txt > /dev/ttyS0\n")
            serial = system.driver.serial_log(session_id)
            assert serial is not None
            await wait_for_file(serial, TIMEOUT, "written-before-sleep")


async def test_a_hibernated_session_survives_a_controller_restart(
    image: GuestImage, tmp_path: Path
) -> None:
    """Stopping remote-cli (on_shutdown stop) leaves a hibernated session hibernated, with no
    QEMU process; the next controller lists it hibernated, resumes it on POST .../resume, and a
    file written before is still there."""
    data_dir = tmp_path / "data"
    async with controller(image, data_dir) as system, system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        await type_in(system, api, session_id, "echo kept-across-restart > /root/note.txt\n")
        await type_in(system, api, session_id, "sync; echo noted > /dev/ttyS0\n")
        serial = system.driver.serial_log(session_id)
        assert serial is not None
        await wait_for_file(serial, TIMEOUT, "noted")
        state = await hibernate(system, api, session_id)
    assert state.is_file()
    assert qemu_processes_of(session_id) == []
    async with controller(image, data_dir) as system, system.api() as api:
        assert (await api.get(f"/api/sessions/{session_id}")).json()["state"] == "hibernated"
        response = await api.post(f"/api/sessions/{session_id}/resume")
        assert response.status_code == 200, response.text
        assert response.json()["state"] == "ready"
        assert not state.exists()
        await type_in(system, api, session_id, "cat /root/note.txt > /dev/ttyS0\n")
        serial = system.driver.serial_log(session_id)
        assert serial is not None
        await wait_for_file(serial, TIMEOUT, "kept-across-restart")
        pid = system.driver.pid_of(session_id)
        assert (await api.delete(f"/api/sessions/{session_id}")).status_code == 200
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists()
