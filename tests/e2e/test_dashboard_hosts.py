"""The admin's "Hosts" view in a real browser (Debian's chromium, Playwright).

The controller runs whole in this process (gateway, API, the banner driver's real sockets)
with a driver that says it placed its sessions on host ``w1`` and lists that host, as the
cluster driver does (the real cluster's /readyz is tests/e2e/test_cluster_driver.py). The
browser runs in a worker thread (Playwright's sync API) while the event loop serves it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright

from remotecli.auth import hash_token
from remotecli.config import ControllerConfig
from remotecli.controller.server import Controller
from tests.conftest import MS
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS
from tests.test_host_metrics import PlacingDriver

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

WAIT_MS = 15_000 * MS * 1000
BOB_TOKEN = "bob-token-0123456789abcdef"


def browse(url: str, token: str) -> tuple[str | None, list[str]]:
    """Sign in with ``token``; return the Hosts section's text (None: hidden) and console errors.

    The section is read once the page listed the user's sessions and asked /readyz (or 5 s
    after, for a user the view is not for).
    """
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{url}/login?token={token}")
            page.wait_for_selector("#account-name:has-text('Signed in')", timeout=WAIT_MS)
            try:
                page.wait_for_selector("#hosts li", timeout=5000)
            except Exception:  # Playwright's TimeoutError: the section stayed hidden
                return None, errors
            return page.inner_text("#hosts-section"), errors
        finally:
            browser.close()


async def test_the_admin_sees_each_host_its_slots_and_sessions(tmp_path: Path) -> None:
    """Signed in as the admin, the sidebar's Hosts lists w1, up, 3 of 4 slots free, with the
    session placed on it, and the page logs no console error; another user sees no Hosts."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    config = ControllerConfig(listen=("127.0.0.1", 0), data_dir=tmp_path)
    controller = Controller(config, driver=PlacingDriver())
    await controller.start()
    try:
        url = controller.url()
        admin = {"Authorization": f"Bearer {controller.admin_token}"}
        async with httpx.AsyncClient(base_url=url, headers=admin, timeout=5) as api:
            session_id = (await api.post("/api/sessions", json={"provider": "shell"})).json()["id"]
        assert controller.manager is not None
        controller.manager.store.add_token("bob", hash_token(BOB_TOKEN), 0.0)
        shown, errors = await asyncio.to_thread(browse, url, controller.admin_token)
        assert shown is not None
        assert "w1" in shown
        assert "up · 10.0.0.2 · 3 of 4 slots free" in shown
        assert f"sessions: {session_id}" in shown
        assert errors == []
        assert await asyncio.to_thread(browse, url, BOB_TOKEN) == (None, [])
    finally:
        await controller.close()
