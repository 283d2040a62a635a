"""A session without a text terminal (a microVM from an older image) is shown as its desktop.

The controller runs in-process with the honest in-test banner driver (tests/banner_driver.py),
whose sessions have no text terminal unless a test gives one: the text view's WebSocket then
closes 1011 "... has no text terminal ...", and the page must switch to Desktop by itself
instead of retrying the text view forever.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import MS
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, ms
from tests.test_api_schema import ControllerUnderTest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() or shutil.which("node") is None,
        reason=f"{CHROMIUM} is needed: run scripts/install-system-deps.sh test",
    ),
]
TIMEOUT = 20_000 * MS


@pytest.fixture
def cut() -> Iterator[ControllerUnderTest]:
    with tempfile.TemporaryDirectory(prefix="rc-notext-") as data_dir:
        running = ControllerUnderTest(Path(data_dir))
        yield running
        running.close()


def test_a_session_without_text_view_is_shown_as_its_desktop(cut: ControllerUnderTest) -> None:
    """With Text the default, a session that has no text terminal switches to Desktop at once."""
    token = cut.controller.admin_token
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_default_timeout(ms(TIMEOUT))
        sockets: list[str] = []
        page.on("websocket", lambda socket: sockets.append(socket.url))
        page.goto(f"{cut.base_url}/login?token={token}")
        page.wait_for_url(re.compile(r"/dashboard/remote-cli/?$"))
        page.locator('button[data-provider="shell"]').click()
        status = page.locator("#status")
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('has no text view')"
        )
        assert "showing its desktop" in status.inner_text()
        desktop = page.get_by_role("button", name="Desktop")
        assert desktop.get_attribute("aria-pressed") == "true"
        page.wait_for_timeout(ms(1000 * MS))
        assert [url for url in sockets if "/tty" in url] == [sockets[0]]  # tried once only
        assert any("/vnc" in url for url in sockets)
        browser.close()
