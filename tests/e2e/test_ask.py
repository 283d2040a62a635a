"""Ask, the dashboard's headless runs, in Debian's chromium against a real `remotecli up`.

`remotecli up` runs on an ephemeral port with a temporary data dir and the local driver (each run
in a real sandbox under bubblewrap), with one run at once per user
(``REMOTECLI_MAX_RUNS_PER_USER=1``) so that the limit can be met. The shell provider is asked
(it needs no sign-in; its prompt is a command line). The module's tests share one signed-in page
and run in file order:

1. the shell card's Ask opens the Ask tab; Ctrl+Enter asks; ``line1`` shows while the run still
   runs (Stop shown and enabled, ``line3`` not yet written), then the exit code and duration,
   and the run in My runs;
2. while ``sleep 60`` runs, asking again is refused (429) in the API's words, with when to try
   again; Stop ends the run: cancelled, on the page and in the API;
3. output that looks like markup (``<img src=x onerror=...>``, ``<script>``) is shown as text:
   no element is made of it and nothing runs;
4. after a reload Ask is still the tab shown, and opening a run from My runs shows its output;
5. the period's usage is shown with its limits;
6. none of it logged a console error (but the refused 429) or a CSP violation.

Screenshots go to ``test-artifacts/ask/``.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Dialog, Page, Playwright, sync_playwright

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
ARTIFACTS = ROOT / "test-artifacts" / "ask"
TIMEOUT = 30_000 * MS  # seconds
LINES = "for i in 1 2 3; do echo line$i; sleep 1; done"
HOSTILE = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(2)</script>"
# The browser reports a refused request as a console error; the 429 of test 2 is expected.
REFUSED_429 = "the server responded with a status of 429"

# A snapshot of the answer once it holds `line1`: taken in the page, in one go, so that what it
# says of Stop and the state is true at the moment the line was shown.
FIRST_LINE_JS = """() => {
  const output = document.querySelector("#ask-output").textContent;
  if (!output.includes("line1")) return null;
  const stop = document.querySelector("#ask-stop");
  return {
    output,
    state: document.querySelector("#ask-state").textContent,
    stopShown: !stop.hidden && stop.offsetParent !== null,
    stopEnabled: !stop.disabled,
    ended: !document.querySelector("#ask-end").hidden,
  };
}"""


def screenshot(page: Page, name: str) -> None:
    """Save the whole page under test-artifacts/ask/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png")


def api(up: Up) -> httpx.Client:
    """A client of the API with the admin's token."""
    token = up.url.split("token=", 1)[1]
    return httpx.Client(
        base_url=up.base, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT
    )


@dataclass
class Asking:
    """The page the tests share, and what it reported."""

    page: Page
    up: Up
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    """`remotecli up` with one run at once per user."""
    env = {"REMOTECLI_MAX_RUNS_PER_USER": "1"}
    with remotecli_up(tmp_path_factory.mktemp("remotecli-ask"), env) as running:
        yield running


@pytest.fixture(scope="module")
def asking(up: Up) -> Iterator[Asking]:
    """One signed-in page in Debian's chromium, its console errors and dialogs recorded."""
    with sync_playwright() as driver:
        playwright: Playwright = driver
        browser: Browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(ms(TIMEOUT))
        state = Asking(page=page, up=up)

        def on_dialog(dialog: Dialog) -> None:
            state.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on(
            "console",
            lambda message: state.errors.append(message.text) if message.type == "error" else None,
        )
        page.on("pageerror", lambda error: state.errors.append(f"uncaught: {error}"))
        page.on("dialog", on_dialog)
        page.goto(up.url)
        page.wait_for_url(re.compile(r"/dashboard/remote-cli/?$"))
        yield state
        browser.close()


def ask(page: Page, prompt: str, *, keyboard: bool = False, refused: bool = False) -> str:
    """Write ``prompt`` and ask (Ctrl+Enter in the prompt, or the Ask button); return the id of
    the run the answer then shows (unless the ask is to be ``refused``)."""
    before = page.locator("#ask-answer").get_attribute("data-run-id")
    box = page.get_by_label(re.compile(r"^(Prompt|Command line)"))
    box.fill(prompt)
    if keyboard:
        box.press("Control+Enter")
    else:
        page.locator("#ask-submit").click()
    if refused:
        return ""
    page.wait_for_function(
        "(before) => (document.querySelector('#ask-answer').dataset.runId ?? null) !== before",
        arg=before,
    )
    run_id = page.locator("#ask-answer").get_attribute("data-run-id")
    assert run_id
    return run_id


def wait_for_end(page: Page) -> str:
    """Wait until the answer says how the run ended; return what it says."""
    end = page.locator("#ask-end")
    end.wait_for(state="visible")
    return end.inner_text()


def history_item(page: Page, run_id: str) -> Any:
    return page.locator(f'#ask-history li[data-run-id="{run_id}"]')


def test_1_an_answer_streams_in_while_the_run_runs(asking: Asking) -> None:
    """`line1` shows while Stop is still offered; then the exit code, duration and My runs."""
    page = asking.page
    page.locator('button[data-ask="shell"]').click()
    assert page.get_by_role("tab", name="Ask").get_attribute("aria-selected") == "true"
    assert page.evaluate("() => document.activeElement.id") == "ask-prompt"
    assert page.get_by_label("Command line (run by bash -c)").is_visible()
    run_id = ask(page, LINES, keyboard=True)
    first: dict[str, Any] = page.wait_for_function(FIRST_LINE_JS).json_value()
    screenshot(page, "1-first-line")
    assert first["state"] in ("queued", "running"), first
    assert first["stopShown"], first
    assert first["stopEnabled"], first
    assert not first["ended"], first
    assert "line3" not in first["output"], first
    said = wait_for_end(page)
    screenshot(page, "1-done")
    assert re.fullmatch(r"Done: exit code 0, \d+(\.\d)? s\.", said), said
    assert page.locator("#ask-state").inner_text() == "done"
    assert page.locator("#ask-output").inner_text() == "line1\nline2\nline3\n"
    assert page.locator("#ask-stop").is_hidden()
    asking.run_ids["lines"] = run_id
    item = history_item(page, run_id)
    assert item.get_attribute("data-state") == "done"
    assert LINES in item.inner_text()
    assert "shell" in item.inner_text()
    with api(asking.up) as client:
        run = client.get(f"/api/runs/{run_id}").json()
    assert (run["state"], run["exit_code"], run["output"]) == ("done", 0, "line1\nline2\nline3\n")


def test_2_a_refusal_is_said_in_words_and_stop_cancels(asking: Asking) -> None:
    """Over the runs at once the API's 429 is shown in words; Stop ends `sleep 60`: cancelled."""
    page = asking.page
    run_id = ask(page, "sleep 60")
    page.wait_for_function("() => document.querySelector('#ask-state').textContent === 'running'")
    asking.run_ids["sleep"] = run_id
    stop = page.get_by_role("button", name="Stop", exact=True)
    assert stop.is_visible()
    assert stop.is_enabled()
    ask(page, "echo a second one", refused=True)
    refusal = page.locator("#ask-error")
    refusal.wait_for(state="visible")
    text = refusal.inner_text()
    screenshot(page, "2-refused")
    assert "max_runs_per_user" in text, text  # the API's words, naming the limit
    assert re.search(r"Try again in \d+ s\.$", text), text  # and when, from Retry-After
    started = time.monotonic()
    stop.click()
    page.wait_for_function("() => document.querySelector('#ask-state').textContent === 'cancelled'")
    assert time.monotonic() - started < TIMEOUT / 2  # not the 60 s of sleep
    said = wait_for_end(page)
    screenshot(page, "2-stopped")
    assert said.startswith("Stopped"), said
    assert stop.is_hidden()
    page.wait_for_function(
        f"() => document.querySelector('#ask-history li[data-run-id=\"{run_id}\"]')"
        "?.dataset.state === 'cancelled'"
    )
    with api(asking.up) as client:
        assert client.get(f"/api/runs/{run_id}").json()["state"] == "cancelled"


def test_3_hostile_output_is_shown_as_text(asking: Asking) -> None:
    """Output that looks like markup is shown as the characters it is: no element, no script."""
    page = asking.page
    asking.run_ids["hostile"] = ask(page, f"printf '%s\\n' '{HOSTILE}' '{SCRIPT}'")
    said = wait_for_end(page)
    screenshot(page, "3-hostile")
    assert said.startswith("Done: exit code 0"), said
    output = page.locator("#ask-output")
    assert output.inner_text() == f"{HOSTILE}\n{SCRIPT}\n"
    assert output.locator("*").count() == 0  # text nodes only
    assert page.locator("img[src='x'], #ask-answer script").count() == 0
    assert HOSTILE in page.locator("#ask-run-prompt").inner_text()
    page.wait_for_timeout(200)  # an onerror would have fired by now
    assert asking.dialogs == []


def test_4_after_a_reload_my_runs_open_with_their_output(asking: Asking) -> None:
    """A reload keeps the Ask tab; a run opened from My runs shows its whole output and end."""
    page = asking.page
    page.reload()
    assert page.get_by_role("tab", name="Ask").get_attribute("aria-selected") == "true"
    item = history_item(page, asking.run_ids["lines"])
    item.wait_for()
    listed = page.locator("#ask-history li")
    newest_first = [asking.run_ids[name] for name in ("hostile", "sleep", "lines")]
    assert [item.get_attribute("data-run-id") for item in listed.all()] == newest_first
    item.get_by_role("button").click()
    said = wait_for_end(page)
    screenshot(page, "4-reopened")
    assert re.fullmatch(r"Done: exit code 0, \d+(\.\d)? s\.", said), said
    assert page.locator("#ask-output").inner_text() == "line1\nline2\nline3\n"
    assert page.locator("#ask-run-prompt").inner_text() == LINES
    assert item.get_by_role("button").get_attribute("aria-current") == "true"
    history_item(page, asking.run_ids["sleep"]).get_by_role("button").click()
    assert wait_for_end(page).startswith("Stopped")
    assert page.locator("#ask-state").inner_text() == "cancelled"


def test_5_the_period_s_usage_is_shown_with_its_limits(asking: Asking) -> None:
    """The usage line counts this month's runs against the quota, and the runs allowed at once."""
    page = asking.page
    usage = page.locator("#ask-usage")
    page.wait_for_function("() => document.querySelector('#ask-usage').textContent !== ''")
    with api(asking.up) as client:
        period = client.get("/api/usage").json()
    text = usage.inner_text()
    assert text.startswith(f"This {period['period']}: {period['runs']} of 500 runs"), text
    assert "at most 1 at once" in text, text


def test_6_no_console_error_or_csp_violation(asking: Asking) -> None:
    """Asking, streaming, stopping and reloading logged nothing but the refused request."""
    unexpected = [error for error in asking.errors if REFUSED_429 not in error]
    assert unexpected == []
    assert asking.dialogs == []
