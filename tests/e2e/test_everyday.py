"""Everyday operation in Debian's chromium: who is signed in, labels, ended sessions, Sign out.

Against a real `remotecli up` (ephemeral port, temporary data dir, the local driver's `shell`
sessions under bubblewrap), started by test_dashboard's harness. The module's tests share one
signed-in page and run in file order:

1. the header names the signed-in user and offers Sign out;
2. a name typed before connecting a provider becomes the session's label: the list, the status
   line and the window title speak of it;
3. Rename saves on Enter, and a hostile label is shown as text: no element, no script;
4. Escape cancels a rename, and a name the API refuses (422) is explained in the editor;
5. a session ended elsewhere stays in the list, in the Ended group, with its reason;
6. Sign out shows the token form; a reload is still signed out, and the old cookie, replayed,
   is refused (401): the server forgot the login.

Then, with a data dir of its own: stopping `remotecli up` and starting it again on the same data
dir ends the running sessions (``end_cause`` restart); the page lists them with their reason and
says so in a notice once, not again after a reload, and again in another browser (it is this
browser that was told). Screenshots go to ``test-artifacts/everyday/``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Dialog,
    Locator,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from remotecli.auth import COOKIE_NAME
from tests.conftest import MS
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, Up, ms, remotecli_up

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or not Path(CHROMIUM).exists(),
        reason=f"bwrap and {CHROMIUM} are needed: run scripts/install-system-deps.sh test",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "everyday"
TIMEOUT = 30_000 * MS  # seconds
HOSTILE = "<img src=x onerror=alert(1)>"
RESTARTED = "ended because remote-cli was restarted"
# The status line once a view of the session is connected (the text view, or the desktop).
CONNECTED = "Connected to {name} ("
# True once My sessions marks a session other than ``before`` as the viewed one.
NEW_CURRENT_JS = """(before) => {
  const current = document.querySelector("#sessions li.current");
  return current !== null && current.dataset.sessionId !== before;
}"""


def screenshot(page: Page, name: str) -> None:
    """Save the whole page under test-artifacts/everyday/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png")


def api(up: Up, cookie: str | None = None) -> httpx.Client:
    """A client of the API with the admin's token, or with nothing but the login ``cookie``."""
    if cookie is not None:
        headers = {"Cookie": f"{COOKIE_NAME}={cookie}"}
    else:
        headers = {"Authorization": f"Bearer {up.url.split('token=', 1)[1]}"}
    return httpx.Client(base_url=up.base, headers=headers, timeout=TIMEOUT)


@dataclass
class Tab:
    """A browser context's page, and what it reported: uncaught errors and dialogs (alert())."""

    context: BrowserContext
    page: Page
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Browser) -> Tab:
        """A new browser context (cookies and localStorage of its own) and its page."""
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.set_default_timeout(ms(TIMEOUT))
        tab = cls(context, page)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))

        def on_dialog(dialog: Dialog) -> None:
            tab.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        return tab

    def sign_in(self, up: Up) -> None:
        """Open the login URL `remotecli up` printed; wait until the providers are listed."""
        self.page.goto(up.url)
        self.page.wait_for_url(re.compile(r"/dashboard/remote-cli/?$"))
        self.page.locator('button[data-provider="shell"]').wait_for()

    def item(self, session_id: str) -> Locator:
        """The session's entry in My sessions."""
        return self.page.locator(f'#sessions li[data-session-id="{session_id}"]')

    def cookie(self) -> str | None:
        """The value of the login cookie this browser holds, or None."""
        for cookie in self.context.cookies():
            if cookie.get("name") == COOKIE_NAME:
                return cookie.get("value")
        return None

    def start(self, label: str = "") -> str:
        """Connect the shell provider with ``label`` in the Name box; return the session's id
        once the status line says a view of it (by that name) is connected."""
        page = self.page
        page.get_by_label("Name (optional)").fill(label)
        current = page.locator("#sessions li.current")
        before = current.get_attribute("data-session-id") if current.count() else None
        page.locator('button[data-provider="shell"]').click()
        page.wait_for_function(NEW_CURRENT_JS, arg=before)
        session_id = current.get_attribute("data-session-id")
        assert session_id
        name = label or f"shell {session_id[:8]}"
        expect(page.locator("#status")).to_contain_text(CONNECTED.format(name=name))
        return session_id


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        expect.set_options(timeout=ms(TIMEOUT))
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@dataclass
class World:
    """The running system and the signed-in page the module's tests share."""

    up: Up
    tab: Tab
    session_id: str = ""


@pytest.fixture(scope="module")
def world(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """`remotecli up` on a fresh data dir, and a page signed in through its login URL."""
    with remotecli_up(tmp_path_factory.mktemp("everyday")) as up:
        tab = Tab.open(browser)
        tab.sign_in(up)
        try:
            yield World(up=up, tab=tab)
        finally:
            tab.context.close()


def test_1_the_header_names_the_user_and_offers_sign_out(world: World) -> None:
    """Once signed in, the header says who (GET /api/me's name) and shows Sign out."""
    page = world.tab.page
    expect(page.locator("#account-name")).to_have_text("Signed in as admin")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    screenshot(page, "1-header")


def test_2_a_label_given_at_creation_names_the_session(world: World) -> None:
    """The Name box's text becomes the label: in the list, the status line, the title, the API."""
    tab = world.tab
    page = tab.page
    world.session_id = tab.start("nightly build")
    item = tab.item(world.session_id)
    expect(item.locator(".session-name")).to_have_text("nightly build")
    expect(item.locator(".facts")).to_contain_text(f"shell · {world.session_id}")
    assert page.title() == "nightly build · remote-cli"
    expect(page.locator("#viewer-session")).to_have_text(
        f"nightly build · shell · {world.session_id}"
    )
    expect(page.get_by_label("Name (optional)")).to_have_value("")  # for the next session only
    screenshot(page, "2-labelled")
    with api(world.up) as client:
        assert client.get(f"/api/sessions/{world.session_id}").json()["label"] == "nightly build"


def test_3_rename_saves_on_enter_and_shows_a_hostile_label_as_text(world: World) -> None:
    """Rename, a new name and Enter relabel the session; markup in it stays text, nothing runs."""
    tab = world.tab
    page = tab.page
    item = tab.item(world.session_id)
    item.get_by_role("button", name="Rename").click()
    editor = item.get_by_role("textbox")
    expect(editor).to_be_focused()
    expect(editor).to_have_value("nightly build")
    editor.fill(HOSTILE)
    editor.press("Enter")
    expect(item.locator(".session-name")).to_have_text(HOSTILE)
    expect(editor).to_have_count(0)
    expect(page.locator("#status")).to_contain_text(CONNECTED.format(name=HOSTILE))
    assert page.title() == f"{HOSTILE} · remote-cli"
    screenshot(page, "3-renamed-hostile")
    assert page.locator("img").count() == 0  # no element was made of the label
    assert tab.dialogs == []
    assert tab.errors == []
    with api(world.up) as client:
        assert client.get(f"/api/sessions/{world.session_id}").json()["label"] == HOSTILE


def test_4_escape_cancels_and_a_refused_name_is_explained(world: World) -> None:
    """Escape leaves the name as it was; a name with a control character gets the API's 422."""
    tab = world.tab
    page = tab.page
    item = tab.item(world.session_id)
    item.get_by_role("button", name="Rename").click()
    editor = item.get_by_role("textbox")
    editor.fill("not kept")
    editor.press("Escape")
    expect(editor).to_have_count(0)
    expect(item.locator(".session-name")).to_have_text(HOSTILE)
    expect(item.get_by_role("button", name="Rename")).to_be_focused()

    item.get_by_role("button", name="Rename").click()
    editor.fill("evil\u202egnp.exe")  # a right-to-left override: a format character
    editor.press("Enter")
    problem = item.get_by_role("alert")
    expect(problem).to_contain_text("printable")
    expect(editor).to_have_attribute("aria-invalid", "true")
    expect(editor).to_be_focused()
    screenshot(page, "4-rename-refused")
    editor.press("Escape")
    expect(problem).to_have_count(0)
    expect(item.locator(".session-name")).to_have_text(HOSTILE)
    with api(world.up) as client:
        assert client.get(f"/api/sessions/{world.session_id}").json()["label"] == HOSTILE


def test_5_a_session_ended_elsewhere_stays_listed_with_its_reason(world: World) -> None:
    """A session stopped through the API is not dropped from the list: it is under Ended."""
    tab = world.tab
    page = tab.page
    with api(world.up) as client:
        created = client.post("/api/sessions", json={"provider": "shell", "label": "to stop"})
        assert created.status_code == 201, created.text
        other = created.json()["id"]
        stopped = client.delete(f"/api/sessions/{other}")
        assert stopped.status_code == 200, stopped.text
        reason = stopped.json()["reason"]
    assert reason
    page.reload()
    ended = page.locator(f'#sessions-ended li[data-session-id="{other}"]')
    expect(ended).to_be_visible()
    expect(ended).to_have_attribute("data-state", "stopped")
    expect(ended.locator(".session-name")).to_have_text("to stop")
    expect(ended.locator(".reason")).to_have_text(reason)
    expect(page.locator("#sessions-ended-title")).to_have_text("Ended (1)")
    # the running one is listed above, and no restart was told of
    expect(
        page.locator(f'#sessions-active li[data-session-id="{world.session_id}"]')
    ).to_be_visible()
    expect(page.locator("#notice")).to_be_hidden()
    screenshot(page, "5-ended-listed")


def test_6_sign_out_ends_the_login_for_good(world: World) -> None:
    """Sign out shows the token form; after a reload too; the old cookie then gets a 401."""
    tab = world.tab
    page = tab.page
    cookie = tab.cookie()
    assert cookie, "the login URL left no login cookie"
    with api(world.up, cookie) as client:
        assert client.get("/api/sessions").status_code == 200  # it works until Sign out
    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#main")).to_be_hidden()
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()
    expect(page.locator("#account-name")).to_have_text("Not signed in")
    assert page.title() == "remote-cli"
    screenshot(page, "6-signed-out")
    page.reload()
    expect(page.locator("#login")).to_be_visible()
    expect(page.get_by_label("Token")).to_be_focused()
    expect(page.locator("#main")).to_be_hidden()
    screenshot(page, "6-signed-out-reloaded")
    assert tab.cookie() is None
    with api(world.up, cookie) as client:
        assert client.get("/api/sessions").status_code == 401
    assert tab.errors == []


# --- a restart of remote-cli ---------------------------------------------------------------------


def test_sessions_a_restart_ended_are_listed_and_told_once(
    browser: Browser, tmp_path: Path
) -> None:
    """Running sessions a restart ended are listed with the reason; the notice comes once."""
    data_dir = tmp_path / "data"
    with remotecli_up(data_dir) as before:
        tab = Tab.open(browser)
        tab.sign_in(before)
        labelled = tab.start(HOSTILE)
        unnamed = tab.start()
        short = f"shell {unnamed[:8]}"
        assert tab.page.locator(".session-name").all_inner_texts() == [short, HOSTILE]
        screenshot(tab.page, "restart-1-before")
    # `remotecli up` stopped (SIGTERM): every running session ended with it
    with remotecli_up(data_dir) as after:
        page = tab.page
        page.goto(after.url)
        notice = page.locator("#notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text(f"2 sessions {RESTARTED}")
        expect(notice.locator("li")).to_have_text(
            [short, f"{HOSTILE} (shell {labelled[:8]})"], use_inner_text=True
        )
        for session_id in (labelled, unnamed):
            item = tab.item(session_id)
            expect(item).to_have_attribute("data-end-cause", "restart")
            expect(item.locator(".reason")).to_contain_text("remote-cli was restarted")
        screenshot(page, "restart-2-notice")
        assert page.locator("img").count() == 0
        assert tab.dialogs == []

        page.reload()
        expect(tab.item(labelled)).to_be_visible()  # the list is drawn: the notice was decided
        expect(notice).to_be_hidden()
        screenshot(page, "restart-3-reloaded")

        other = Tab.open(browser)  # another browser has not been told yet
        other.sign_in(after)
        expect(other.page.locator("#notice")).to_contain_text(f"2 sessions {RESTARTED}")
        other.page.get_by_role("button", name="Dismiss").click()
        expect(other.page.locator("#notice")).to_be_hidden()
        other.page.reload()
        expect(other.item(unnamed)).to_be_visible()
        expect(other.page.locator("#notice")).to_be_hidden()
        assert tab.errors == []
        assert other.errors == []
        other.context.close()
        tab.context.close()
