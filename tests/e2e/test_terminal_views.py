"""The session as text and as a desktop that follows the viewer, in Debian's chromium.

Against a real `remotecli up` (ephemeral port, temporary data dir, the local driver) with one
`shell` session, shared by the tests, which run in file order:

1. the text view is the default: a click on the card shows the shell as text, and the address
   names the session;
2. its capitals are at least 10 CSS px tall, in DejaVu Sans Mono on the dark theme;
3. the text size control changes the font and is kept across a reload;
4. keys typed in the text view run a command; the desktop then shows the same terminal changed;
5. the desktop takes the size of its box, at 1440x900 and again after the window shrinks;
6. a link printed in the text view opens in a new page (the network is blocked: only the
   request is seen);
7. a reload reconnects to the session the address names, in the view chosen for it;
8. on a phone (390x844, touch, 3x pixels) the desktop fills its box too, and text shows;
9. Ctrl+V in the desktop types the clipboard into the session;
10. Terminate asks first, since the session is being viewed;
11. nothing on the way logged an error or a CSP violation.

A test whose backend piece is missing is skipped and says which: the text view needs the
driver's terminal socket (``tty_socket``), the resizing desktop a VNC server that accepts
SetDesktopSize (Xvnc; x11vnc refuses it). Tests 5, 9 and 10 need no text terminal.
Screenshots go to ``test-artifacts/terminal-views/``.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    Route,
    ViewportSize,
    sync_playwright,
)

from remotecli.drivers.local import LocalDriver
from tests.conftest import MS
from tests.e2e.test_dashboard import (
    CANVAS_PIXELS_JS,
    CHROMIUM,
    CHROMIUM_ARGS,
    BrowserLog,
    Up,
    ms,
    remotecli_up,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(
        shutil.which("bwrap") is None or not Path(CHROMIUM).exists(),
        reason=f"bwrap and {CHROMIUM} are needed: run scripts/install-system-deps.sh test",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "terminal-views"
TIMEOUT = 30_000 * MS  # seconds
DESKTOP: ViewportSize = {"width": 1440, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
LINK = "https://example.test/remote-cli-link"
HAS_TTY = callable(getattr(LocalDriver, "tty_socket", None))
needs_tty = pytest.mark.skipif(
    not HAS_TTY,
    reason="the local driver serves no text terminal yet (LocalDriver.tty_socket is missing)",
)

# The text view's first row of glyphs: the font it is drawn in, its size, and the height of a
# capital H in that font as the browser measures it (the ink above the baseline).
TEXT_METRICS_JS = """() => {
  const row = document.querySelector("#terminal .xterm-rows > div");
  const style = getComputedStyle(row);
  const context = document.createElement("canvas").getContext("2d");
  context.font = `${style.fontSize} ${style.fontFamily}`;
  const capital = context.measureText("H").actualBoundingBoxAscent;
  const scrollable = document.querySelector("#terminal .xterm-scrollable-element");
  return {
    family: style.fontFamily,
    size: parseFloat(style.fontSize),
    capital,
    cell: row.getBoundingClientRect().height,
    loaded: document.fonts.check(`${style.fontSize} "DejaVu Sans Mono"`),
    background: getComputedStyle(scrollable).backgroundColor,
    box: getComputedStyle(document.querySelector("#terminal")).backgroundColor,
  };
}"""

# The desktop's framebuffer (noVNC's canvas, drawn 1:1 once the sizes agree) and its box.
DESKTOP_SIZE_JS = """() => {
  const screen = document.querySelector("#screen");
  const canvas = screen.querySelector("canvas");
  const box = screen.getBoundingClientRect();
  const drawn = canvas.getBoundingClientRect();
  return {
    framebuffer: [canvas.width, canvas.height],
    box: [Math.floor(box.width), Math.floor(box.height)],
    drawn: [Math.round(drawn.width), Math.round(drawn.height)],
  };
}"""


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png")


def wait_until(check: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


@dataclass
class World:
    """The running system, the page viewing the shell session, and what it logged."""

    up: Up
    browser: Browser
    context: BrowserContext
    page: Page
    log: BrowserLog
    session_id: str = ""
    blocked: list[str] = field(default_factory=list)  # requests to other hosts, aborted

    @property
    def home(self) -> Path:
        return self.up.data_dir / "sessions" / self.session_id / "home"

    def wait_for_file(self, name: str, content: str) -> None:
        target = self.home / name
        wait_until(
            lambda: target.exists() and target.read_text() == content,
            f"{target} holds {content!r}",
        )


def block_other_hosts(context: BrowserContext, blocked: list[str]) -> None:
    """Abort every request that is not to this machine; note its URL."""

    def handle(route: Route) -> None:
        url = route.request.url
        if re.match(r"^(https?|wss?)://(127\.0\.0\.1|localhost)(:\d+)?/", url):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", handle)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def world(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """`remotecli up`, and a 1440x900 page signed in, its requests to other hosts blocked."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    with remotecli_up(tmp_path_factory.mktemp("terminal-views")) as up:
        context = browser.new_context(viewport=DESKTOP)
        blocked: list[str] = []
        block_other_hosts(context, blocked)
        page = context.new_page()
        page.set_default_timeout(ms(TIMEOUT))
        log = BrowserLog()
        log.attach(page)
        world = World(up=up, browser=browser, context=context, page=page, log=log)
        world.blocked = blocked
        page.goto(up.url)
        page.wait_for_url(re.compile(r"/dashboard/remote-cli/?$"))
        try:
            yield world
        finally:
            context.close()
    browser.close()


def ensure_session(world: World) -> None:
    """Start the shell session the tests share, unless an earlier test did."""
    if world.session_id:
        return
    page = world.page
    page.locator('button[data-provider="shell"]').click()
    current = page.locator("#sessions li.current")
    wait_until(lambda: current.count() == 1, "the new session is the current one")
    session_id = current.get_attribute("data-session-id")
    assert session_id
    world.session_id = session_id
    page.locator(f'#sessions li[data-session-id="{session_id}"][data-state="ready"]').wait_for()


def text_view_ready(page: Page) -> None:
    """Wait until the text view shows output and says it is connected."""
    page.locator('#terminal[data-first-output="drawn"]').wait_for()
    wait_until(
        lambda: page.locator("#status").inner_text().startswith("Connected to shell"),
        "the status says the text view is connected",
    )


def type_in_text_view(page: Page, line: str) -> None:
    page.locator("#terminal .xterm-screen").click()
    page.keyboard.type(line)
    page.keyboard.press("Enter")


def switch_to(page: Page, view: str) -> None:
    page.get_by_role("button", name=view, exact=True).click()
    if view == "Desktop":
        page.locator('#screen[data-first-frame="drawn"]').wait_for()
    else:
        text_view_ready(page)


def desktop_pixels(page: Page) -> list[int]:
    """The desktop's digest once two reads one animation frame apart agree."""
    deadline = time.monotonic() + TIMEOUT
    previous: list[int] = page.evaluate(CANVAS_PIXELS_JS)
    while True:
        page.evaluate("() => new Promise((resolve) => requestAnimationFrame(resolve))")
        page.wait_for_timeout(200)
        current: list[int] = page.evaluate(CANVAS_PIXELS_JS)
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def desktop_follows_its_box(page: Page, name: str) -> dict[str, list[int]]:
    """Wait until the desktop's framebuffer is its box's size and drawn 1:1; skip if it cannot."""
    page.locator('#screen[data-first-frame="drawn"]').wait_for()
    sizes: dict[str, list[int]] = page.evaluate(DESKTOP_SIZE_JS)
    deadline = time.monotonic() + TIMEOUT
    while not (
        all(abs(a - b) <= 1 for a, b in zip(sizes["framebuffer"], sizes["box"], strict=True))
        and all(abs(a - b) <= 1 for a, b in zip(sizes["drawn"], sizes["box"], strict=True))
    ):
        answer = page.evaluate("() => document.querySelector('#screen').dataset.resizable ?? ''")
        if answer.startswith("refused") or time.monotonic() > deadline:
            if answer != "yes":
                pytest.skip(
                    f"the session's VNC server did not resize its desktop ({answer or 'no answer'}"
                    f"; x11vnc refuses SetDesktopSize, Xvnc takes it): sizes were {sizes}"
                )
            pytest.fail(f"the desktop never took its box's size: {sizes}")
        page.wait_for_timeout(100)
        sizes = page.evaluate(DESKTOP_SIZE_JS)
    screenshot(page, name)
    return sizes


@needs_tty
def test_1_text_is_the_default_view(world: World) -> None:
    """A click on the shell card shows the session as text, and the address names the session."""
    page = world.page
    page.locator('button[data-provider="shell"]').click()
    text_view_ready(page)
    session_id = page.locator("#sessions li.current").get_attribute("data-session-id")
    assert session_id
    world.session_id = session_id
    assert page.locator("#terminal").is_visible()
    assert page.locator("#screen").is_hidden()
    assert page.get_by_role("button", name="Text", exact=True).get_attribute("aria-pressed") == (
        "true"
    )
    assert page.evaluate("() => location.hash") == f"#session={session_id}"
    assert f"shell {session_id[:8]}" in page.locator("#status").inner_text()
    screenshot(page, "1-text-view")


@needs_tty
def test_2_capitals_are_at_least_10_css_px_in_dejavu_on_dark(world: World) -> None:
    """The text view draws DejaVu Sans Mono on #1e1e1e, its capitals at least 10 CSS px tall."""
    metrics = world.page.evaluate(TEXT_METRICS_JS)
    assert metrics["family"].startswith('"DejaVu Sans Mono"'), metrics
    assert metrics["loaded"], metrics
    assert metrics["size"] == 15, metrics
    assert metrics["capital"] >= 10, metrics
    assert metrics["cell"] >= metrics["size"], metrics
    assert metrics["background"] == "rgb(30, 30, 30)", metrics  # the theme, as xterm.js draws it
    assert metrics["box"] == "rgb(30, 30, 30)", metrics  # and the page around it


@needs_tty
def test_3_the_text_size_control_changes_the_font_and_is_kept(world: World) -> None:
    """A+ makes the text view's font 16 px and it stays so after a reload; A- brings back 15."""
    page = world.page
    page.get_by_role("button", name="Larger text").click()
    wait_until(lambda: page.evaluate(TEXT_METRICS_JS)["size"] == 16, "the font is 16 px")
    assert page.locator("#font-size").inner_text() == "16 px"
    page.reload()
    text_view_ready(page)
    assert page.evaluate(TEXT_METRICS_JS)["size"] == 16
    screenshot(page, "3-larger-text")
    page.get_by_role("button", name="Smaller text").click()
    wait_until(lambda: page.evaluate(TEXT_METRICS_JS)["size"] == 15, "the font is 15 px again")
    assert page.evaluate("() => localStorage.getItem('remotecli.fontSize')") == "15"


@needs_tty
def test_4_typing_as_text_runs_a_command_the_desktop_then_shows(world: World) -> None:
    """Keys typed in the text view run a command in the session, and the desktop shows it too."""
    page = world.page
    type_in_text_view(page, "echo text-ok > ~/text.txt")
    world.wait_for_file("text.txt", "text-ok\n")
    switch_to(page, "Desktop")
    before = desktop_pixels(page)
    screenshot(page, "4-desktop-before")
    switch_to(page, "Text")
    type_in_text_view(page, "printf 'desktop sees %s\\n' text-two > ~/two.txt; cat ~/two.txt")
    world.wait_for_file("two.txt", "desktop sees text-two\n")
    screenshot(page, "4-text-typed")
    switch_to(page, "Desktop")
    wait_until(lambda: desktop_pixels(page) != before, "the desktop shows the new output")
    screenshot(page, "4-desktop-after")


def test_5_the_desktop_takes_the_size_of_its_box(world: World) -> None:
    """The desktop's framebuffer is its box's size, drawn 1:1, also after the window shrinks."""
    ensure_session(world)
    page = world.page
    if page.locator("#screen").is_hidden():
        switch_to(page, "Desktop")
    first = desktop_follows_its_box(page, "5-desktop-1440x900")
    page.set_viewport_size({"width": 1100, "height": 700})
    wait_until(lambda: page.evaluate(DESKTOP_SIZE_JS)["box"] != first["box"], "the box shrinks")
    second = desktop_follows_its_box(page, "5-desktop-1100x700")
    assert second["framebuffer"][0] < first["framebuffer"][0]
    page.set_viewport_size(DESKTOP)
    desktop_follows_its_box(page, "5-desktop-back")


@needs_tty
def test_6_a_link_in_the_text_view_opens_in_a_new_page(world: World) -> None:
    """Clicking a printed https link opens it in a new page (its request seen, and blocked)."""
    page = world.page
    switch_to(page, "Text")
    type_in_text_view(page, f"clear; printf '%s\\n' {LINK}")
    link = page.locator("#terminal .xterm-rows > div", has_text=LINK).last
    wait_until(lambda: link.count() > 0 and link.inner_text().strip() == LINK, "the link shows")
    box = link.bounding_box()
    assert box is not None
    x, y = box["x"] + 40, box["y"] + box["height"] / 2
    page.mouse.move(x, y)  # the web-links add-on finds links under the pointer
    page.wait_for_timeout(300)
    screenshot(page, "6-link-hovered")
    with world.context.expect_page() as opened:
        page.mouse.click(x, y)
    popup = opened.value
    wait_until(lambda: LINK in world.blocked, f"{LINK} is requested")
    assert popup.evaluate("() => window.opener") is None
    popup.close()


@needs_tty
def test_7_reload_reconnects_to_the_session_in_its_view(world: World) -> None:
    """After a reload the address's session opens again, in the view last chosen for it."""
    page = world.page
    switch_to(page, "Desktop")
    page.reload()
    page.locator('#screen[data-first-frame="drawn"]').wait_for()
    current = page.locator("#sessions li.current")
    assert current.get_attribute("data-session-id") == world.session_id
    assert page.locator("#terminal").is_hidden()
    screenshot(page, "7-reloaded-desktop")
    switch_to(page, "Text")
    page.reload()
    text_view_ready(page)
    assert current.get_attribute("data-session-id") == world.session_id
    screenshot(page, "7-reloaded-text")


@needs_tty
def test_8_on_a_phone_the_desktop_fills_its_box_and_text_shows(world: World) -> None:
    """At 390x844 with touch and 3x pixels, text shows and the desktop takes its box's size."""
    context = world.browser.new_context(
        viewport=PHONE, device_scale_factor=3, is_mobile=True, has_touch=True
    )
    block_other_hosts(context, world.blocked)
    page = context.new_page()
    page.set_default_timeout(ms(TIMEOUT))
    log = BrowserLog()
    log.attach(page)
    try:
        page.goto(world.up.url)
        page.wait_for_url(re.compile(r"/dashboard/remote-cli/?$"))
        page.goto(f"{world.up.base}/dashboard/remote-cli#session={world.session_id}")
        text_view_ready(page)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
        assert overflow <= 0
        metrics = page.evaluate(TEXT_METRICS_JS)
        assert metrics["capital"] >= 10, metrics
        screenshot(page, "8-phone-text")
        switch_to(page, "Desktop")
        desktop_follows_its_box(page, "8-phone-desktop")
        assert log.errors == []
    finally:
        context.close()


def test_9_ctrl_v_in_the_desktop_types_the_clipboard(world: World) -> None:
    """Ctrl+V in the desktop types the clipboard's text into the session in one step."""
    ensure_session(world)
    page = world.page
    world.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page.evaluate("() => navigator.clipboard.writeText('echo paste-ok > ~/paste.txt\\n')")
    if page.locator("#screen").is_hidden():
        switch_to(page, "Desktop")
    page.locator("#screen canvas").click()
    page.keyboard.press("Control+V")
    world.wait_for_file("paste.txt", "paste-ok\n")
    assert "Pasted" in page.locator("#status").inner_text()
    screenshot(page, "9-pasted")


def test_10_terminate_asks_before_ending_a_viewed_session(world: World) -> None:
    """Terminate on the viewed session asks first; Keep it keeps it, End session ends it."""
    ensure_session(world)
    page = world.page
    item = page.locator(f'#sessions li[data-session-id="{world.session_id}"]')
    item.get_by_role("button", name="Terminate").click()
    question = item.get_by_text("End this session?")
    question.wait_for()
    screenshot(page, "10-terminate-asks")
    item.get_by_role("button", name="Keep it").click()
    assert question.count() == 0
    assert item.get_attribute("data-state") == "ready"
    item.get_by_role("button", name="Terminate").click()
    item.get_by_role("button", name="End session").click()
    item.wait_for(state="detached")
    assert page.evaluate("() => location.hash") == ""


@needs_tty
def test_11_no_errors_or_csp_violations_on_the_way(world: World) -> None:
    """The page logged no uncaught error, console error, CSP violation or failed WebSocket."""
    assert world.log.errors == []
    assert world.log.failed_sockets == []
