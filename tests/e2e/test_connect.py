"""Connect a provider and stay connected, end to end: `remotecli up`, the sandbox, Chromium.

Offline: the provider is the stand-in CLI of ``tests/standin/`` (declared in a TOML file with
``keep = ["~/.standin"]``), the sessions have no egress, and the browser never opens the
sign-in page (``auth.invalid``): the test plays the browser and pastes the address the provider
would have redirected it to. The tests share one `remotecli up` and run in file order:

1. the card says signed out; a click shows the sign-in link the CLI opened;
2. wrong pasted addresses are explained (the API's refusal, the CLI's own 400);
3. the right one finishes the sign-in: the CLI's 200 is shown, the credential is in HOME, and
   the card says Connected;
4. a new session of that provider starts signed in;
5. another user gets none of it;
6. Disconnect: a running session does not keep the sign-in again, the next starts signed out;
7. two sessions at once, each CLI on the same port of its own loopback;
8. once the sessions ended, no file of the data dir holds the token in plaintext;
9. the page threw nothing on the way.

Screenshots go to ``test-artifacts/connect/``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from remotecli.controller.connect import KEEP_INTERVAL
from tests.conftest import MS
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, BrowserLog, Up, ms, remotecli_up

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(
        any(shutil.which(p) is None for p in ("Xvnc", "xterm", "tmux", "bwrap")),
        reason="Xvnc, xterm, tmux and bwrap are needed: run scripts/install-system-deps.sh run",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "connect"
STANDIN = ROOT / "tests" / "standin" / "standin-cli"
PROVIDER = "standin"
TIMEOUT = 30_000 * MS  # seconds
PORT = 47823  # where the stand-in listens, in every session's own loopback
REDIRECT_URI = f"http://localhost:{PORT}/callback"
CODE = "e2e-code-" + "7f3a9c1d5b"  # the authorization code the "provider" hands back
OTHER_USER = "bob"
CARD = f'button[data-provider="{PROVIDER}"]'
CARD_ITEM = f'#providers li[data-provider="{PROVIDER}"]'
# Chromium resolves no name but this machine's: the sign-in link (auth.invalid) is never looked
# up, not even by a DNS prefetch of the page's links.
OFFLINE = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--dns-prefetch-disable",
]
ANSWERED_JS = """() =>
  ["ok", "error"].includes(document.querySelector("#callback-result").dataset.tone)"""


def derive(code: str) -> tuple[str, str]:
    """The stand-in's (user, token) for ``code`` (its docstring gives the rule)."""
    digest = hashlib.sha256(f"standin:{code}".encode()).hexdigest()
    return f"user-{digest[:8]}", f"standin-{digest}"


USER, TOKEN = derive(CODE)


def wait_until(check: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png")


@dataclass
class World:
    """The running system, the admin's page, and what the tests learnt along the way."""

    up: Up
    admin_token: str
    other_token: str
    browser: Browser
    context: BrowserContext
    page: Page
    log: BrowserLog
    state: str = ""  # the first sign-in's state, from the link the CLI opened
    session_id: str = ""  # the admin's session being viewed
    sessions: list[str] = field(default_factory=list)  # every session created, to end them

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.up.base,
            headers={"Authorization": f"Bearer {token or self.admin_token}"},
            timeout=TIMEOUT,
        )

    def home(self, session_id: str) -> Path:
        return self.up.data_dir / "sessions" / session_id / "home"


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def world(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """`remotecli up` with the stand-in provider and a second user; the admin's page open."""
    base = tmp_path_factory.mktemp("connect")
    config = base / "remotecli.toml"
    config.write_text(
        "[controller]\n"
        'egress = "none"\n\n'
        f"[providers.{PROVIDER}]\n"
        f"command = [{json.dumps(str(STANDIN))}]\n"
        'title = "Stand-in"\n'
        'keep = ["~/.standin"]\n'
    )
    data_dir = base / "data"
    env = {"REMOTECLI_CONFIG": str(config), "REMOTECLI_TOKEN": "", "REMOTECLI_SECRET_KEY": ""}
    added = subprocess.run(
        [
            sys.executable,
            "-m",
            "remotecli",
            "user",
            "add",
            OTHER_USER,
            "--token-only",
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=TIMEOUT,
        check=True,
    )
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *OFFLINE])
    with remotecli_up(data_dir, env) as up:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(ms(TIMEOUT))
        log = BrowserLog()
        log.attach(page)
        world = World(
            up=up,
            admin_token=up.url.split("token=", 1)[1],
            other_token=added.stdout.strip(),
            browser=browser,
            context=context,
            page=page,
            log=log,
        )
        try:
            yield world
        finally:
            context.close()
            with world.api() as api:
                for session_id in world.sessions:
                    api.delete(f"/api/sessions/{session_id}")
    browser.close()


def start_in_page(world: World, page: Page) -> str:
    """Click the stand-in's card in ``page``; return the new session's id once it is ready."""
    current = page.locator("#sessions li.current")
    before = current.get_attribute("data-session-id") if current.count() else None
    page.locator(CARD).click()
    wait_until(
        lambda: current.count() == 1 and current.get_attribute("data-session-id") != before,
        "the new session is listed as the current one",
    )
    session_id = current.get_attribute("data-session-id")
    assert session_id
    world.sessions.append(session_id)
    page.locator(f'#sessions li[data-session-id="{session_id}"][data-state="ready"]').wait_for()
    return session_id


def end_session(world: World, session_id: str, token: str | None = None) -> None:
    """Delete the session through the API; return once it is stopped and its HOME is gone."""
    with world.api(token) as api:
        answer = api.delete(f"/api/sessions/{session_id}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "stopped"
    wait_until(lambda: not world.home(session_id).exists(), f"{session_id}'s HOME is removed")


def standin_log(world: World, session_id: str) -> str:
    try:
        return (world.home(session_id) / "standin.log").read_text()
    except OSError:
        return ""


def credential(world: World, session_id: str) -> dict[str, str] | None:
    try:
        kept = (world.home(session_id) / ".standin" / "credentials.json").read_text()
    except OSError:
        return None
    data: dict[str, str] = json.loads(kept)
    return data


def sign_in_link(page: Page) -> str:
    """Wait for the page's sign-in link; return its href."""
    link = page.locator("#signin-link")
    link.wait_for(state="visible")
    href = link.get_attribute("href")
    assert href is not None
    return href


def state_of(href: str) -> str:
    """The ``state`` of an authorize URL the stand-in opened, checked for its shape."""
    parts = urlsplit(href)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "auth.invalid", "/authorize")
    query = parse_qs(parts.query)
    assert query["redirect_uri"] == [REDIRECT_URI]
    return query["state"][0]


def paste_callback(page: Page, url: str) -> str:
    """Paste ``url`` into the box, submit, and return the text the page shows once answered."""
    page.locator("#callback-url").fill(url)
    page.get_by_role("button", name="Finish sign-in").click()
    result = page.locator("#callback-result")
    # Submitting sets the tone to "pending" at once; the answer sets "ok" or "error".
    page.wait_for_function(ANSWERED_JS)
    return result.inner_text()


def test_1_the_sign_in_link_the_cli_opens_appears_in_the_page(world: World) -> None:
    """A signed-out provider's session shows its CLI's sign-in page as a safe link, and Copy."""
    page = world.page
    page.goto(world.up.url)
    page.locator(CARD).wait_for()
    assert page.locator(CARD_ITEM).get_attribute("data-connected") == "false"
    assert page.locator(f"{CARD_ITEM} .connected").count() == 0
    world.session_id = start_in_page(world, page)
    href = sign_in_link(page)
    world.state = state_of(href)
    screenshot(page, "1-sign-in-link")
    link = page.locator("#signin-link")
    assert link.inner_text() == "Open sign-in page"
    assert link.get_attribute("target") == "_blank"
    assert set((link.get_attribute("rel") or "").split()) == {"noopener", "noreferrer"}
    with world.api() as api:
        session = api.get(f"/api/sessions/{world.session_id}").json()
    assert session["open_url"] == href
    assert "not signed in" in standin_log(world, world.session_id)
    world.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=world.up.base)
    page.get_by_role("button", name="Copy link").click()
    wait_until(lambda: page.evaluate("() => navigator.clipboard.readText()") == href, "copied")
    # Reloading and reconnecting to the session shows the same link again, from open_url.
    page.reload()
    item = page.locator(f'#sessions li[data-session-id="{world.session_id}"]')
    item.get_by_role("button", name="Reconnect").click()
    assert sign_in_link(page) == href


def test_2_wrong_addresses_are_explained(world: World) -> None:
    """A non-loopback address is refused by the API, a wrong state by the CLI: both are shown."""
    page = world.page
    refused = paste_callback(page, "http://example.com/callback?code=x")
    assert page.locator("#callback-result").get_attribute("data-tone") == "error"
    assert "localhost" in refused, refused  # the API's message names what it accepts
    wrong = paste_callback(page, f"{REDIRECT_URI}?code={CODE}&state=not-{world.state}")
    assert page.locator("#callback-result").get_attribute("data-status") == "400"
    assert "The CLI answered 400" in wrong
    assert "state does not match" in wrong
    screenshot(page, "2-wrong-state")
    assert credential(world, world.session_id) is None


def test_3_pasting_the_redirect_signs_the_cli_in_and_the_card_says_connected(
    world: World,
) -> None:
    """The pasted redirect reaches the CLI (its 200 shown), HOME has the credential: Connected."""
    page = world.page
    shown = paste_callback(page, f"{REDIRECT_URI}?code={CODE}&state={world.state}")
    assert page.locator("#callback-result").get_attribute("data-status") == "200"
    assert "The CLI answered 200" in shown
    assert "Signed in. You may close this page." in shown
    assert credential(world, world.session_id) == {"user": USER, "token": TOKEN}
    wait_until(lambda: f"signed in as {USER}" in standin_log(world, world.session_id), "signed in")
    mode = (world.home(world.session_id) / ".standin" / "credentials.json").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    # The controller keeps the sign-in within seconds; the page's refresh then shows it.
    page.locator(f'{CARD_ITEM}[data-connected="true"]').wait_for()
    note = page.locator(f"#connected-{PROVIDER}").inner_text()
    assert note.startswith("Connected since ")
    with world.api() as api:
        (provider,) = [p for p in api.get("/api/providers").json() if p["name"] == PROVIDER]
    assert provider["connected"] is True
    assert provider["connected_at"] is not None
    screenshot(page, "3-connected")
    # Hidden, the box stays hidden through the page's next refresh of the session list.
    page.get_by_role("button", name="Hide").click()
    assert page.locator("#signin").is_hidden()
    with page.expect_response(re.compile(r"/api/sessions$")):
        pass
    page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 100))")
    assert page.locator("#signin").is_hidden()


def test_4_a_new_session_of_a_connected_provider_starts_signed_in(world: World) -> None:
    """After the signed-in session ends, the next one has the credential and asks for nothing."""
    end_session(world, world.session_id)
    page = world.page
    world.session_id = start_in_page(world, page)
    assert credential(world, world.session_id) == {"user": USER, "token": TOKEN}
    wait_until(lambda: standin_log(world, world.session_id), "the stand-in has started")
    assert standin_log(world, world.session_id) == f"signed in as {USER}\n"
    with world.api() as api:
        assert api.get(f"/api/sessions/{world.session_id}").json()["open_url"] is None
        # Nothing listens for a sign-in in this session: its CLI is not waiting for one.
        answer = api.post(
            f"/api/sessions/{world.session_id}/callback",
            json={"url": f"{REDIRECT_URI}?code={CODE}&state=x"},
        )
    assert answer.status_code == 502, answer.text
    assert page.locator("#signin").is_hidden()
    assert page.locator(f'{CARD_ITEM}[data-connected="true"]').count() == 1
    screenshot(page, "4-signed-in-again")


def test_5_another_user_does_not_get_the_sign_in(world: World) -> None:
    """Another user's card says not connected, and their session's CLI has no credential."""
    context = world.browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        page.set_default_timeout(ms(TIMEOUT))
        page.goto(f"{world.up.base}/login?token={world.other_token}")
        page.locator(CARD).wait_for()
        assert page.locator(CARD_ITEM).get_attribute("data-connected") == "false"
        assert page.locator(f"{CARD_ITEM} .connected").count() == 0
        session_id = start_in_page(world, page)
        state_of(sign_in_link(page))  # it asks its own user to sign in
        assert credential(world, session_id) is None
        assert "not signed in" in standin_log(world, session_id)
        screenshot(page, "5-other-user")
        end_session(world, session_id, world.other_token)
    finally:
        context.close()
    with world.api(world.other_token) as api:
        (provider,) = [p for p in api.get("/api/providers").json() if p["name"] == PROVIDER]
    assert provider == {**provider, "connected": False, "connected_at": None, "updated_at": None}


def test_6_disconnect_makes_the_next_session_start_signed_out(world: World) -> None:
    """Disconnect sticks: a running session keeps it no more, and the next starts signed out."""
    page = world.page
    running = world.session_id  # signed in, from the kept copy: it reads its files every 5 s
    page.get_by_role("button", name="Disconnect Stand-in").click()
    page.locator(f'{CARD_ITEM}[data-connected="false"]').wait_for()
    assert "Stand-in disconnected" in page.locator("#providers-note").inner_text()
    time.sleep(2 * KEEP_INTERVAL + 1)  # the running session's keeper had two chances to save
    end_session(world, running)  # and its last one at the end
    with world.api() as api:
        (provider,) = [p for p in api.get("/api/providers").json() if p["name"] == PROVIDER]
    assert provider["connected"] is False
    world.session_id = start_in_page(world, page)
    state_of(sign_in_link(page))
    assert credential(world, world.session_id) is None
    assert "not signed in" in standin_log(world, world.session_id)
    assert page.locator(f'{CARD_ITEM}[data-connected="false"]').count() == 1
    screenshot(page, "6-disconnected")
    end_session(world, world.session_id)


def open_url_of(api: httpx.Client, session_id: str) -> str | None:
    url: str | None = api.get(f"/api/sessions/{session_id}").json()["open_url"]
    return url


def test_7_two_sessions_listen_on_the_same_port_each_on_its_own_loopback(world: World) -> None:
    """Two signed-out sessions at once: both CLIs listen on one port; callbacks reach their own."""
    first = start_in_page(world, world.page)
    second = start_in_page(world, world.page)
    with world.api() as api:
        wait_until(lambda: open_url_of(api, first) and open_url_of(api, second), "both links")
        states = {sid: state_of(open_url_of(api, sid) or "") for sid in (first, second)}
        assert states[first] != states[second]
        for sid in (first, second):
            assert "cannot listen" not in standin_log(world, sid)
        # The first session's state pasted into the second is refused by the second's own CLI.
        crossed = api.post(
            f"/api/sessions/{second}/callback",
            json={"url": f"{REDIRECT_URI}?code={CODE}&state={states[first]}"},
        )
        assert crossed.status_code == 200, crossed.text
        assert crossed.json()["status"] == 400
        for sid in (first, second):
            answer = api.post(
                f"/api/sessions/{sid}/callback",
                json={"url": f"{REDIRECT_URI}?code={CODE}-{sid}&state={states[sid]}"},
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == 200, answer.json()
            user, token = derive(f"{CODE}-{sid}")
            assert credential(world, sid) == {"user": user, "token": token}
    for sid in (first, second):
        end_session(world, sid)


def test_8_no_file_in_the_data_dir_holds_the_token_in_plaintext(world: World) -> None:
    """With every session ended, the data dir holds no token in plaintext: sign-ins are sealed."""
    tokens = [TOKEN, *(derive(f"{CODE}-{sid}")[1] for sid in world.sessions)]
    needles = {token.encode() for token in tokens}
    # The kept form of the first credential file, were it stored base64-encoded but unencrypted.
    needles.add(base64.b64encode(json.dumps({"user": USER, "token": TOKEN}).encode()))
    needles.add(CODE.encode())
    with world.api() as api:
        providers = {p["name"]: p for p in api.get("/api/providers").json()}
        # test_7's sign-in is kept (sealed) right now: there is something to find, were it clear
        assert providers[PROVIDER]["connected"] is True
        active = [s["id"] for s in api.get("/api/sessions").json() if s["state"] == "ready"]
    assert active == []
    searched = 0
    found: list[str] = []
    for directory, _, names in os.walk(world.up.data_dir):
        for name in names:
            path = Path(directory) / name
            if not stat.S_ISREG(path.lstat().st_mode):
                continue  # sockets and FIFOs
            data = path.read_bytes()
            searched += 1
            found += [f"{path}: {needle[:24]!r}" for needle in needles if needle in data]
    output = "".join(world.up.output).encode()
    found += [f"controller output: {needle[:24]!r}" for needle in needles if needle in output]
    assert searched >= 3, "the data dir holds almost nothing: was the right one searched?"
    assert found == []


# What the page logs by design in these tests: the browser's line for the 400 test_2 provokes,
# and noVNC's for a viewed session the tests end through the API rather than the page.
EXPECTED_ERRORS = re.compile(
    r"console: (Failed to load resource: the server responded with a status of 400 "
    r"|Failed when connecting: Connection closed \(code: 1000, reason: session stopped\))"
)


def test_9_the_page_raised_no_error_along_the_way(world: World) -> None:
    """Through all of the above the page threw nothing and logged no error it should not have."""
    unexpected = [error for error in world.log.errors if not EXPECTED_ERRORS.match(error)]
    assert unexpected == []
    assert world.log.failed_sockets == []
