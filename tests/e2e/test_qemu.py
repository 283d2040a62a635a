"""Issue 5 end to end: microVM sessions as copy-on-write clones, through gateway and bridge.

The guest image is built once into the user's image cache (``remotecli image build``) and
reused by later runs; the build time is printed. One controller with the qemu driver serves
the whole module, so the template VM is cold-booted once and every session is a clone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.base import SessionSpec
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.drivers.qemu_guest import read_banner, relay_open
from remotecli.exceptions import DriverError, ImageBuildError
from remotecli.images import GuestImage, build_image, find_image
from remotecli.images.build import default_cache_dir
from remotecli.rfb import PROTOCOL_VERSION_3_8, SECURITY_VNC_AUTH
from remotecli.sandbox.uids import UidPool
from tests.conftest import MS
from tests.e2e.sessions_api import create_ready_session
from tests.rfb_viewer import RfbViewer, wait_for_file
from tests.test_driver_terminal import Desktop, background_share, capital_rows, until_terminal_shows

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is needed: run scripts/install-system-deps.sh test",
    ),
    pytest.mark.asyncio(loop_scope="module"),
]
TIMEOUT = 60_000 * MS
TEMPLATE_TIMEOUT = 240_000 * MS
BINARY = Subprotocol("binary")


@dataclass
class System:
    base: str
    token: str
    driver: QemuBenchDriver

    @property
    def ws_base(self) -> str:
        return "ws" + self.base.removeprefix("http")

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.base,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=TEMPLATE_TIMEOUT,
        )


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Print ``line`` on the terminal even while pytest captures output."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capture is None or reporter is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> GuestImage:
    """The cached guest image, built here (and timed) the first time."""
    cache = default_cache_dir()
    try:
        found = find_image(cache)
        manifest = json.loads((found.directory / "manifest.json").read_text())
        report(
            request,
            f"qemu: guest image {found.key} taken from the cache {cache} "
            f"(its build took {manifest.get('build_seconds', '?')} s)",
        )
        return found
    except ImageBuildError:
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip("no guest image and cannot build one here: run `remotecli image build`")
    started = time.monotonic()
    built = build_image(cache, progress=lambda step: None)
    report(request, f"qemu: guest image built in {time.monotonic() - started:.0f} s")
    return built


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(
    image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    data_dir = tmp_path_factory.mktemp("qemu") / "data"
    # Templates are kept next to the image cache, so later runs clone at once.
    cache = image.directory.parent
    driver = QemuBenchDriver(data_dir, image_cache=cache, template_cache=cache.parent / "templates")
    controller = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir), driver=driver
    )
    await controller.start()
    try:
        yield System(controller.url(), controller.admin_token, driver)
    finally:
        await controller.close()
        await driver.close()


async def delete_and_wait(api: httpx.AsyncClient, session_id: str, pid: int) -> None:
    """Delete a session and wait until it is stopped and its QEMU process is gone."""
    assert (await api.delete(f"/api/sessions/{session_id}")).status_code in (200, 202)
    async with asyncio.timeout(TIMEOUT):
        while (await api.get(f"/api/sessions/{session_id}")).json()["state"] != "stopped":
            await asyncio.sleep(50 * MS)
        while Path(f"/proc/{pid}").exists():
            await asyncio.sleep(20 * MS)


def qemu_pid(system: System, session_id: str) -> int:
    pid = system.driver.pid_of(session_id)
    assert pid is not None
    return pid


async def wait_drawn(viewer: RfbViewer) -> None:
    """Request full updates until the screen is not one uniform colour.

    The guest's xterm is white on black, so the shared "mostly lit" check does not apply; a
    clone's window is mapped already (it was in the template), so no keys are lost.
    """
    async with asyncio.timeout(TIMEOUT):
        while True:
            update = await viewer.framebuffer_update()
            pixels = b"".join(rect.pixels for rect in update.rectangles)
            if pixels != pixels[:4] * (len(pixels) // 4):
                return


async def type_in(system: System, api: httpx.AsyncClient, session_id: str, text: str) -> None:
    """Open the session's VNC WebSocket through gateway and bridge and type ``text``."""
    ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    url = f"{system.ws_base}/api/sessions/{session_id}/vnc?ticket={ticket}"
    async with connect(url, subprotocols=[BINARY], max_size=None) as ws:

        async def receive() -> bytes:
            data = await ws.recv()
            assert isinstance(data, bytes)
            return data

        viewer = RfbViewer(receive, ws.send)
        await asyncio.wait_for(viewer.handshake(), TIMEOUT)
        await wait_drawn(viewer)
        await viewer.type(text)
        await viewer.framebuffer_update()  # a round trip: the keys were processed


def serial_log(system: System, session_id: str) -> Path:
    path = system.driver.serial_log(session_id)
    assert path is not None
    return path


def is_clone(pid: int) -> bool:
    return b"-incoming" in Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_keys_typed_over_vnc_reach_the_clones_shell(system: System) -> None:
    """A clone session's RFB stream, through gateway and bridge, carries keys to its shell."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        assert is_clone(pid)
        await type_in(system, api, session_id, "echo vm-ok > /dev/ttyS0\n")
        await wait_for_file(serial_log(system, session_id), TIMEOUT, "vm-ok")
        await delete_and_wait(api, session_id, pid)


async def test_two_sessions_do_not_see_each_others_files(system: System) -> None:
    """A file written in one clone does not exist in another clone running at the same time."""
    async with system.api() as api:
        first, second = await asyncio.gather(
            create_ready_session(api, TEMPLATE_TIMEOUT), create_ready_session(api, TEMPLATE_TIMEOUT)
        )
        pids = {session_id: qemu_pid(system, session_id) for session_id in (first, second)}
        await type_in(system, api, first, "echo mine > /root/first.txt; echo wrote > /dev/ttyS0\n")
        await wait_for_file(serial_log(system, first), TIMEOUT, "wrote")
        await type_in(
            system,
            api,
            second,
            "test -e /root/first.txt && echo seen > /dev/ttyS0 || echo unseen > /dev/ttyS0\n",
        )
        text = await wait_for_file(serial_log(system, second), TIMEOUT, "seen")
        assert "unseen" in text
        for session_id, pid in pids.items():
            await delete_and_wait(api, session_id, pid)


async def test_delete_leaves_no_qemu_process(system: System) -> None:
    """Deleting a session ends its QEMU process and the state reaches stopped."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        assert Path(f"/proc/{pid}").exists()
        await delete_and_wait(api, session_id, pid)
        assert not Path(f"/proc/{pid}").exists()


async def test_guest_vnc_demands_a_password_on_loopback_only(system: System) -> None:
    """The clone's VNC forward listens on 127.0.0.1 and offers only VNC Authentication; a root
    controller's QEMU runs as a sandbox uid of its own, never as root."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        forwards = [arg for arg in cmdline if b"hostfwd=" in arg]
        assert forwards
        assert all(b"hostfwd=tcp:127.0.0.1:" in arg for arg in forwards)
        assert not [arg for arg in cmdline if b"hostfwd=tcp:" in arg and b":127.0.0.1:" not in arg]
        if os.geteuid() == 0:
            status = Path(f"/proc/{pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()
            assert len(set(uids[1:])) == 1, status  # real, effective, saved, filesystem
            assert UidPool().first <= int(uids[1]) <= UidPool().last, status
        record = json.loads((Path(serial_log(system, session_id)).parent / "vm.json").read_text())
        reader, writer = await asyncio.open_connection("127.0.0.1", record["port"])
        try:
            assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == PROTOCOL_VERSION_3_8
            writer.write(PROTOCOL_VERSION_3_8)
            count = (await asyncio.wait_for(reader.readexactly(1), TIMEOUT))[0]
            offered = await asyncio.wait_for(reader.readexactly(count), TIMEOUT)
        finally:
            writer.close()
        assert list(offered) == [SECURITY_VNC_AUTH]
        await delete_and_wait(api, session_id, pid)


async def test_a_restarted_controller_reattaches_to_a_running_vm(
    system: System, tmp_path: Path
) -> None:
    """A new driver's recover() returns the running VM's endpoint, and its stop ends the VM."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        workdir = serial_log(system, session_id).parent
        record = json.loads((workdir / "vm.json").read_text())
        system.driver.detach(session_id)  # the old controller's driver lets go of the VM
        restarted = QemuBenchDriver(tmp_path / "restarted")
        try:
            endpoint = await restarted.recover(session_id, workdir)
            assert endpoint is not None
            assert (endpoint.port, endpoint.password) == (record["port"], record["password"])
            await restarted.stop(session_id)
            async with asyncio.timeout(TIMEOUT):
                while Path(f"/proc/{pid}").exists():
                    await asyncio.sleep(20 * MS)
        finally:
            await restarted.close()
        assert await restarted.recover(session_id, workdir) is None
        await api.delete(f"/api/sessions/{session_id}")


class _SocketWriter:
    """A StreamWriter's write, drain and close over a WebSocket (binary messages)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        self.pending += data

    async def drain(self) -> None:
        if self.pending:
            data, self.pending = bytes(self.pending), bytearray()
            await self.ws.send(data)

    def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def desktop_through_bridge(
    system: System, api: httpx.AsyncClient, session_id: str
) -> AsyncIterator[Desktop]:
    """An RFB viewer on the session's desktop WebSocket (a ticket, through gateway and bridge)."""
    ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    url = f"{system.ws_base}/api/sessions/{session_id}/vnc?ticket={ticket}"
    async with connect(url, subprotocols=[BINARY], max_size=None) as ws:
        reader = asyncio.StreamReader()

        async def pump() -> None:
            try:
                async for message in ws:
                    assert isinstance(message, bytes)
                    reader.feed_data(message)
            finally:
                reader.feed_eof()  # a close (1011 with its reason) ends the read at once

        pumping = asyncio.create_task(pump())
        try:
            yield await asyncio.wait_for(Desktop.over(reader, _SocketWriter(ws)), TIMEOUT)
        finally:
            pumping.cancel()


async def test_the_microvm_desktop_follows_set_desktop_size(system: System) -> None:
    """Through gateway and bridge, a microVM's Xvnc grants SetDesktopSize and then draws at it."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        async with desktop_through_bridge(system, api, session_id) as desktop:
            await desktop.set_desktop_size(1024, 640)
            async with asyncio.timeout(TIMEOUT):
                while not any(reason == 1 for reason, *_ in desktop.sizes):
                    await desktop.update(incremental=True)
            assert desktop.sizes[-1] == (1, 0, 1024, 640)  # asked by this viewer; granted
            await asyncio.wait_for(desktop.update(), TIMEOUT)
            assert (desktop.width, desktop.height) == (1024, 640)
        await delete_and_wait(api, session_id, pid)


async def test_on_shutdown_keep_carries_a_microvm_across_a_controller_restart(
    image: GuestImage, system: System, tmp_path: Path
) -> None:
    """With on_shutdown = keep, stopping the controller leaves a ready microVM running; the
    next controller on the same data dir takes it back (ready, watched) and its desktop answers
    through the new gateway and bridge; deleting it then ends the VM."""
    cache = image.directory.parent
    templates = cache.parent / "templates"
    config = ControllerConfig(
        listen=("127.0.0.1", 0), data_dir=tmp_path / "data", on_shutdown="keep"
    )
    old_driver = QemuBenchDriver(config.data_dir, image_cache=cache, template_cache=templates)
    first = Controller(config, driver=old_driver)
    await first.start()
    try:
        async with httpx.AsyncClient(
            base_url=first.url(),
            headers={"Authorization": f"Bearer {first.admin_token}"},
            timeout=TEMPLATE_TIMEOUT,
        ) as api:
            session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = old_driver.pid_of(session_id)
        assert pid is not None
    finally:
        await first.close()
    assert Path(f"/proc/{pid}").exists(), "the kept VM must outlive its controller"
    second = Controller(
        config, driver=QemuBenchDriver(config.data_dir, image_cache=cache, template_cache=templates)
    )
    await second.start()
    try:
        assert second.manager is not None
        assert second.manager.watched(session_id)
        async with httpx.AsyncClient(
            base_url=second.url(),
            headers={"Authorization": f"Bearer {second.admin_token}"},
            timeout=TIMEOUT,
        ) as api:
            assert (await api.get(f"/api/sessions/{session_id}")).json()["state"] == "ready"
            ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()
            ws_base = "ws" + second.url().removeprefix("http")
            async with connect(f"{ws_base}{ticket['vnc_path']}", subprotocols=[BINARY]) as ws:
                banner = await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert isinstance(banner, bytes)
            assert banner.startswith(b"RFB 003.")
            await delete_and_wait(api, session_id, pid)
    finally:
        await second.close()


async def test_microvm_capitals_are_at_least_10_pixels_tall_on_a_dark_background(
    system: System,
) -> None:
    """Through gateway and bridge, a row of capital H the microVM's terminal draws is >= 10
    framebuffer pixels tall, light on the dark background: readable as the local driver's."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        async with desktop_through_bridge(system, api, session_id) as desktop:
            await until_terminal_shows(desktop)
            # clear the screen, hide the cursor, draw capitals on the third line, then wait
            await desktop.type("clear; printf '\\033[?25l\\n\\nHHHHHHHHHHHHHHHH'; read -r _\n")
            rows = await capital_rows(desktop)
            cap_height = rows[-1] - rows[0] + 1
            assert rows == list(range(rows[0], rows[-1] + 1))  # one band: the capitals
            assert cap_height >= 10, f"capitals are {cap_height} px tall"
            foreground = max((desktop.rgb(x, y) for x in range(200) for y in rows), key=sum)
            assert min(foreground) >= 0xC0  # light on ...
            assert background_share(desktop) > 0.9  # ... the dark background
        await delete_and_wait(api, session_id, pid)


async def test_the_microvm_terminal_is_reachable_as_text_and_only_with_its_secret(
    system: System,
) -> None:
    """Through gateway and bridge, a microVM session's text view (/tty) runs a command typed
    into it and shows its output; the guest's terminal behind the VM's loopback forward gives
    nothing to a local process that connects without the VM's secret."""
    async with system.api() as api:
        session_id = await create_ready_session(api, TEMPLATE_TIMEOUT)
        pid = qemu_pid(system, session_id)
        ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
        url = f"{system.ws_base}/api/sessions/{session_id}/tty?ticket={ticket}"
        async with connect(url, subprotocols=[Subprotocol("tty")], max_size=None) as ws:
            await ws.send(json.dumps({"type": "resize", "cols": 100, "rows": 30}))
            await ws.send(b"echo vm-$((6 * 7))-text\r")
            seen = b""
            async with asyncio.timeout(TIMEOUT):
                while b"vm-42-text" not in seen:
                    message = await ws.recv()
                    seen += message if isinstance(message, bytes) else message.encode()
        workdir = serial_log(system, session_id).parent
        record = json.loads((workdir / "vm.json").read_text())
        reader, writer = await asyncio.open_connection("127.0.0.1", record["tty_port"])
        try:
            writer.write(b"0" * 64 + b"\n" + b"\x00\x00\x00\x00\x05echo\r")
            await writer.drain()
            leaked = await asyncio.wait_for(reader.read(), TIMEOUT)
        finally:
            writer.close()
        assert leaked == b""  # closed unread: the wrong secret opens nothing
        await delete_and_wait(api, session_id, pid)


async def test_a_fresh_data_dir_clones_the_template_this_host_already_booted(
    image: GuestImage, tmp_path: Path
) -> None:
    """A qemu driver on a new data dir prepares in the background: the shell's template,
    kept beside the images (booted once on this host), is found there, its state says ready,
    and the data dir's first session is a clone at once, never a cold boot."""
    driver = QemuBenchDriver(tmp_path / "fresh", image_cache=image.directory.parent)
    try:
        await driver.prepare()
        async with asyncio.timeout(TEMPLATE_TIMEOUT):
            while not str((driver.isolation() or {})["template"]).startswith("ready"):
                await asyncio.sleep(50 * MS)
        steps: list[str] = []
        spec = SessionSpec(
            session_id="fresh1",
            provider="shell",
            command=["bash", "-l"],
            workdir=tmp_path / "fresh" / "sessions" / "fresh1",
        )
        endpoint = await asyncio.wait_for(driver.start(spec, steps.append), TIMEOUT)
        assert endpoint.port
        assert not [step for step in steps if "cold-booting" in step], steps
        assert any("clone restored" in step for step in steps), steps
        await driver.stop("fresh1")
    finally:
        await driver.close()


async def test_a_template_being_prepared_is_shown_in_the_provider_listing(
    image: GuestImage, tmp_path: Path
) -> None:
    """While the shell's template is cold-booted in the background (a host that never booted
    it: an empty template cache), ``/api/providers`` says so for the shell, in words; once it is
    ready the note is gone and ``/readyz`` (for the operator) says ready."""
    data_dir = tmp_path / "data"
    driver = QemuBenchDriver(
        data_dir, image_cache=image.directory.parent, template_cache=tmp_path / "templates"
    )
    controller = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir), driver=driver
    )
    await controller.start()
    try:
        system = System(controller.url(), controller.admin_token, driver)
        notes: list[str] = []
        async with system.api() as api, asyncio.timeout(TEMPLATE_TIMEOUT):
            while True:
                shell = next(
                    p for p in (await api.get("/api/providers")).json() if p["name"] == "shell"
                )
                if shell["preparing"] is None:
                    break
                notes.append(shell["preparing"])
                await asyncio.sleep(200 * MS)
            ready = (await api.get("/readyz")).json()
        assert any("cold-booting" in note for note in notes), notes
        assert str(ready["sandbox"]["template"]).startswith("ready"), ready
    finally:
        await controller.close()
        await driver.close()


async def test_a_restored_clone_opens_nothing_before_it_has_its_own_secrets(
    system: System, tmp_path: Path
) -> None:
    """Between restore and personalisation (the window a warm pool keeps open) a clone lets
    nobody in: VNC authentication fails, and the text terminal and the relay close unanswered
    for the secrets offered. (The guest writes no boot-time password or secret at all: one would
    be the template's, known to every clone restored from it.)"""
    spec = SessionSpec("bare", "shell", ("bash", "-l"), tmp_path / "bare")
    ports = await system.driver.restore_only(spec, lambda _step: None)
    try:
        await read_banner(ports[5900], within=TIMEOUT)
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[5900])
        try:
            assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == PROTOCOL_VERSION_3_8
            writer.write(PROTOCOL_VERSION_3_8)
            count = (await asyncio.wait_for(reader.readexactly(1), TIMEOUT))[0]
            await asyncio.wait_for(reader.readexactly(count), TIMEOUT)
            writer.write(bytes([SECURITY_VNC_AUTH]))
            await asyncio.wait_for(reader.readexactly(16), TIMEOUT)  # the challenge
            writer.write(bytes(16))  # an answer for whatever password a clone could share
            result = await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
        finally:
            writer.close()
        assert result != b"\0\0\0\0"  # not OK
        for secret in ("0" * 64, "ab" * 32):
            with pytest.raises(DriverError):
                await relay_open(ports[5903], secret, "connect 127.0.0.1 5900")
            reader, writer = await asyncio.open_connection("127.0.0.1", ports[5902])
            try:
                writer.write(secret.encode() + b"\n\x00\x00\x00\x00\x05echo\r")
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
            finally:
                writer.close()
    finally:
        await system.driver.stop("bare")
