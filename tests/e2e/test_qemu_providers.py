"""A provider CLI in a microVM, end to end: Claude Code's first screen, drawn in a clone.

The guest image with Claude Code (``remotecli image build --provider claude-code``, at the
version this host has) is built once into the user's image cache and reused by later runs.
The driver sees a cache of its own holding that image (and the base image, when the user's
cache has one, for the shell), so which providers are available depends on nothing else the
cache holds. One controller with the qemu driver serves the module, through its gateway and
bridge; the template VM is cold-booted once per host and every session is a clone.

Claude Code needs no network for its first screen: offline and signed out it draws its
welcome ("Welcome to Claude Code v2.1.197"), then says it cannot reach Anthropic's servers and
exits, which ends the VM and the session with that reason. Claude Code keeps a sign-in, so it
starts in the clone (after the kept files and the clone's own entropy), not in the template:
under emulation (TCG) its first screen takes tens of seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.local_sandbox import BACKGROUND
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.exceptions import ImageBuildError
from remotecli.images import GuestImage, build_image, find_image
from remotecli.images.build import MANIFEST, default_cache_dir
from remotecli.providers import HostPrograms
from tests.conftest import MS
from tests.e2e.test_qemu import (
    TEMPLATE_TIMEOUT,
    TIMEOUT,
    System,
    desktop_through_bridge,
    is_clone,
    qemu_pid,
    report,
)
from tests.e2e.test_qemu import pytestmark as QEMU_MARKS
from tests.test_driver_terminal import background_share

pytestmark = [
    *QEMU_MARKS,  # e2e, qemu, skipped without QEMU, one event loop per module
    pytest.mark.timeout(900),  # a first run builds the image and cold-boots the template
]
PROVIDER = "claude-code"
WELCOME = "Welcome to Claude Code"
CSI = re.compile(rb"\x1b(\[[0-9;?>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|.)")


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest) -> GuestImage:
    """The cached image with Claude Code (and no other CLI), built here (and timed) if absent."""
    cache = default_cache_dir()
    try:
        found = find_image(cache, [PROVIDER])
        if found.providers == (PROVIDER,):
            manifest = json.loads((found.directory / MANIFEST).read_text())
            report(
                request,
                f"qemu: guest image {found.key} with {PROVIDER} taken from the cache "
                f"(its build took {manifest.get('build_seconds', '?')} s)",
            )
            return found
    except ImageBuildError:
        pass
    if os.geteuid() != 0 or shutil.which("debootstrap") is None or shutil.which("npm") is None:
        pytest.skip(f"no guest image with {PROVIDER} and cannot build one here (root, npm)")
    if HostPrograms().find("claude") is None:
        pytest.skip("Claude Code is not installed on this host: run `make up` (npm ci)")
    started = time.monotonic()
    built = build_image(cache, [PROVIDER], progress=lambda step: None)
    took = time.monotonic() - started
    report(request, f"qemu: guest image with {PROVIDER} built in {took:.0f} s")
    return built


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(
    image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    root = tmp_path_factory.mktemp("qemu-providers")
    cache, user_cache = root / "images", image.directory.parent
    cache.mkdir()
    (cache / image.key).symlink_to(image.directory)
    try:
        base = find_image(user_cache)
        if not base.providers:
            (cache / base.key).symlink_to(base.directory)  # the shell's, whose template exists
    except ImageBuildError:
        pass
    if (user_cache / "accelerator.json").exists():  # this host's KVM verdict, not probed again
        shutil.copy(user_cache / "accelerator.json", cache / "accelerator.json")
    data_dir = root / "data"
    # Egress none: offline, nothing a CLI tries leaves the VM (not even a DNS question).
    driver = QemuBenchDriver(
        data_dir, image_cache=cache, template_cache=user_cache.parent / "templates", egress="none"
    )
    controller = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data_dir, egress="none"),
        driver=driver,
    )
    await controller.start()
    try:
        yield System(controller.url(), controller.admin_token, driver)
    finally:
        await controller.close()
        await driver.close()


def screen_text(stream: bytes) -> str:
    """The printed characters of a terminal stream, escape sequences and whitespace removed."""
    return re.sub(r"\s+", "", CSI.sub(b"", stream).decode("utf-8", "replace"))


async def test_the_listing_offers_what_the_image_holds(system: System) -> None:
    """On qemu, /api/providers lists Claude Code available with the command the guest runs
    (its name, found on the guest's PATH), and a CLI the image lacks unavailable, with a hint
    naming the build command that adds it."""
    async with system.api() as api:
        listing = {p["name"]: p for p in (await api.get("/api/providers")).json()}
    claude = listing[PROVIDER]
    assert claude["available"], claude
    assert claude["command"] == ["claude"]
    codex = listing["codex"]
    assert not codex["available"]
    assert "holds codex" in codex["hint"]
    assert "remotecli image build" in codex["hint"]
    assert "--provider codex" in codex["hint"]


async def test_claude_codes_first_screen_is_drawn_in_a_clone(
    system: System, request: pytest.FixtureRequest
) -> None:
    """Through gateway and bridge, a claude-code session on qemu is a clone whose text view
    shows Claude Code's welcome, and whose desktop shows the terminal with it drawn; offline,
    Claude Code then exits and the session ends saying so, never a blank screen."""
    async with system.api() as api:
        started = time.monotonic()
        created = await api.post("/api/sessions", json={"provider": PROVIDER})
        assert created.status_code == 201, created.text
        session_id = created.json()["id"]
        async with asyncio.timeout(TEMPLATE_TIMEOUT):
            while (state := (await api.get(f"/api/sessions/{session_id}")).json())[
                "state"
            ] != "ready":
                assert state["state"] not in ("failed", "stopped"), state
                await asyncio.sleep(50 * MS)
        ready = time.monotonic() - started
        pid = qemu_pid(system, session_id)
        assert is_clone(pid)
        ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
        url = f"{system.ws_base}/api/sessions/{session_id}/tty?ticket={ticket}"
        seen = b""
        async with connect(url, subprotocols=[Subprotocol("tty")], max_size=None) as ws:
            await ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            async with asyncio.timeout(TEMPLATE_TIMEOUT):
                while WELCOME.replace(" ", "") not in screen_text(seen):
                    message = await ws.recv()
                    seen += message if isinstance(message, bytes) else message.encode()
        drawn = time.monotonic() - started
        report(
            request,
            f"qemu: {PROVIDER} session ready {ready:.1f} s after create, its first screen in the "
            f"text view after {drawn:.1f} s",
        )
        async with desktop_through_bridge(system, api, session_id) as desktop:
            want = tuple(int(BACKGROUND[i : i + 2], 16) for i in (1, 3, 5))
            async with asyncio.timeout(TIMEOUT):
                while True:
                    await desktop.update()
                    # the terminal fills the screen, and more than a prompt is drawn on it
                    lit = sum(
                        1
                        for y in range(0, desktop.height, 4)
                        for x in range(0, desktop.width, 4)
                        if desktop.rgb(x, y) != want
                    ) / ((desktop.height // 4) * (desktop.width // 4))
                    if background_share(desktop) > 0.5 and lit > 0.01:
                        break
                    await asyncio.sleep(50 * MS)
        console = system.driver.serial_log(session_id)  # None once the VM ended
        try:
            async with asyncio.timeout(TEMPLATE_TIMEOUT):
                while (record := (await api.get(f"/api/sessions/{session_id}")).json())[
                    "state"
                ] in ("ready", "stopping"):
                    await asyncio.sleep(200 * MS)
        except TimeoutError:
            # Say why Claude Code did not exit: the guest's console (seen once: a disk error).
            tail = console.read_text(errors="replace")[-3000:] if console is not None else ""
            raise AssertionError(
                f"Claude Code did not exit offline; its console:\n{tail}"
            ) from None
        assert "the session's command exited with status" in (record["reason"] or ""), record
