"""A real provider CLI in a microVM, through gateway and controller: Claude Code's first screen.

The guest image with Claude Code is built into the user's image cache the first time (the
host's npm installs the version the project's node_modules holds; about a minute more than the
base image) and reused afterwards. The VMs have egress ``none``: offline, Claude Code draws its
welcome screen, finds no route to its servers and exits, and the session ends saying so.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.exceptions import ImageBuildError
from remotecli.images import GuestImage, build_image, default_cache_dir, find_image
from remotecli.providers import installed_version
from tests.conftest import MS
from tests.e2e.test_qemu import TEMPLATE_TIMEOUT, TIMEOUT, System, report

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.qemu,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None,
        reason="qemu-system-x86_64 is needed: run scripts/install-system-deps.sh test",
    ),
    pytest.mark.asyncio(loop_scope="module"),
]

PROVIDER = "claude-code"
WELCOME = "Welcome to Claude Code"


@pytest.fixture(scope="module")
def claude_image(request: pytest.FixtureRequest) -> GuestImage:
    """The cached guest image holding Claude Code, built here (and timed) the first time."""
    cache = default_cache_dir()
    try:
        return find_image(cache, [PROVIDER])
    except ImageBuildError:
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip("no image with Claude Code and cannot build one here (needs root)")
        if installed_version("@anthropic-ai/claude-code") is None or shutil.which("npm") is None:
            pytest.skip("Claude Code is not in node_modules or npm is missing: run make test")
    started = time.monotonic()
    built = build_image(cache, [PROVIDER], progress=lambda step: None)
    report(
        request, f"qemu: guest image with Claude Code built in {time.monotonic() - started:.0f} s"
    )
    return built


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(
    claude_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    data_dir = tmp_path_factory.mktemp("providers") / "data"
    cache = claude_image.directory.parent
    driver = QemuBenchDriver(
        data_dir, image_cache=cache, template_cache=cache.parent / "templates", egress="none"
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


async def test_the_catalogue_offers_what_the_image_holds_with_the_guests_command(
    system: System,
) -> None:
    """On qemu, Claude Code is offered with the command the guest runs (``claude``, never a
    path of this host); a provider no image holds is not offered, and its hint names the
    build command that adds it."""
    async with system.api() as api:
        providers = {p["name"]: p for p in (await api.get("/api/providers")).json()}
    claude = providers[PROVIDER]
    assert claude["available"] is True, claude
    assert claude["command"] == ["claude"]
    cache = default_cache_dir()
    for name in ("codex", "gemini-cli"):
        try:
            find_image(cache, [name])
        except ImageBuildError:
            assert providers[name]["available"] is False, providers[name]
            assert f"--provider {name}" in providers[name]["hint"], providers[name]


async def test_claude_codes_first_screen_is_drawn_in_a_clone_and_its_end_is_said(
    system: System,
) -> None:
    """Through gateway and bridge, a Claude Code session on a microVM shows Claude Code's own
    welcome screen in its text view; offline, the CLI then exits, and the session ends with
    the reason (the command's exit), not a blank screen."""
    async with system.api() as api:
        created = await api.post("/api/sessions", json={"provider": PROVIDER})
        assert created.status_code == 201, created.text
        session_id = created.json()["id"]
        async with asyncio.timeout(TEMPLATE_TIMEOUT):
            while (state := (await api.get(f"/api/sessions/{session_id}")).json()["state"]) in (
                "pending",
                "starting",
            ):
                await asyncio.sleep(100 * MS)
        assert state == "ready", state
        ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
        url = f"{system.ws_base}/api/sessions/{session_id}/tty?ticket={ticket}"
        seen = ""
        async with connect(url, subprotocols=[Subprotocol("tty")], max_size=None) as ws:
            await ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
            async with asyncio.timeout(TIMEOUT):
                while WELCOME not in seen:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        message = message.decode(errors="replace")
                    seen += message
        async with asyncio.timeout(TEMPLATE_TIMEOUT):
            while (record := (await api.get(f"/api/sessions/{session_id}")).json())["state"] in (
                "ready",
                "stopping",
            ):
                await asyncio.sleep(200 * MS)
        assert "the session's command exited with status" in (record["reason"] or ""), record
