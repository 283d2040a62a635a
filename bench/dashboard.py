"""Dashboard benchmark: from the click on "Connect" to the first framebuffer drawn in the page.

Runs `remotecli up` (local driver) with a fresh data dir, signs in through the printed URL in
headless Debian chromium, and per run reloads the page, clicks the `shell` card and waits until
noVNC has drawn its first framebuffer update. The page itself measures the interval (its
``#screen`` element gets ``data-connect-ms``), so no browser-automation latency is counted.
Each session is deleted before the next run. Target: p50 <= 1.5 s over 10 runs.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.async_api import async_playwright

from bench.report import Section, fmt, verdict

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
URL_PATTERN = re.compile(r"https?://\S+/login\?token=\S+")
TARGET_P50_S = 1.5
STEP_TIMEOUT_S = 30.0

# True once the view drew its first frame (and noted the time), or the session ended.
FRAME_OR_END_JS = """() =>
  document.querySelector("#screen").dataset.connectMs !== undefined ||
  ["ended", "error"].includes(document.querySelector("#status").dataset.tone)"""

DELETE_SESSION_JS = """async (id) => {
  const response = await fetch(`/api/sessions/${id}`, { method: "DELETE" });
  return response.status;
}"""


async def run(quick: bool, workdir: Path) -> list[Section]:
    """Measure click-to-first-frame over 10 runs (3 when quick); return one report section.

    ``workdir`` holds the data dir of the `remotecli up` it starts (and stops before returning).
    """
    section = Section(
        title="Dashboard: click on Connect to first framebuffer drawn (headless chromium)",
        columns=["runs", "p50 s", "p95 s", "min s", "max s"],
    )
    if shutil.which(CHROMIUM) is None:
        section.skipped = f"{CHROMIUM} is missing: `make bench` installs Debian's chromium"
        return [section]
    runs = 3 if quick else 10
    process, url = await _start_up(workdir / "data")
    try:
        timings = await _measure(url, runs)
    finally:
        await _stop(process)
    timings.sort()
    p50 = statistics.median(timings)
    p95 = timings[min(len(timings) - 1, round(0.95 * (len(timings) - 1)))]
    section.rows.append(
        [str(runs), fmt(p50, 3), fmt(p95, 3), fmt(timings[0], 3), fmt(timings[-1], 3)]
    )
    section.targets.append((f"p50 <= {TARGET_P50_S} s", f"{p50:.3f} s", verdict(p50 <= 1.5)))
    section.notes.append(
        "Measured in the page: from the click handler to the end of noVNC's first "
        "framebuffer update; includes session create, sandbox start, ticket, WebSocket and "
        "RFB handshake. The original took 15-30 s."
    )
    return [section]


async def _start_up(data_dir: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Start `remotecli up` on an ephemeral port; return it and the login URL it printed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "remotecli",
        "up",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
        except TimeoutError:
            break
        if not line:
            break
        text = line.decode(errors="replace")
        seen.append(text)
        match = URL_PATTERN.search(text)
        if match:
            asyncio.create_task(_drain(process))  # noqa: RUF006 - ends with the process
            return process, match.group(0)
    await _stop(process)
    raise RuntimeError("`remotecli up` printed no login URL:\n" + "".join(seen[-20:]))


async def _drain(process: asyncio.subprocess.Process) -> None:
    """Keep reading the process's output so it never blocks on a full pipe."""
    assert process.stdout is not None
    while await process.stdout.readline():
        pass


async def _measure(url: str, runs: int) -> list[float]:
    """Sign in, then per run: reload, click the shell card, read the page's own timing."""
    timings: list[float] = []
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = await browser.new_page(viewport={"width": 1280, "height": 720})
        page.set_default_timeout(STEP_TIMEOUT_S * 1000)
        # click-to-picture: the desktop view (Text is the page's default for terminals)
        await page.add_init_script("localStorage.setItem('remotecli.defaultView', 'desktop')")
        await page.goto(url)
        for _ in range(runs):
            await page.reload()
            card = page.locator('button[data-provider="shell"]')
            await card.wait_for()
            await card.click()
            await page.wait_for_function(FRAME_OR_END_JS)
            screen = page.locator('#screen[data-first-frame="drawn"][data-connect-ms]')
            if await screen.count() != 1:
                status = await page.locator("#status").inner_text()
                raise RuntimeError(f"the shell session did not show its screen: {status}")
            timings.append(float(await screen.get_attribute("data-connect-ms") or "nan") / 1000)
            session_id = await page.locator("#sessions li.current").get_attribute("data-session-id")
            await page.evaluate(DELETE_SESSION_JS, session_id)
        await browser.close()
    return timings


async def _stop(process: asyncio.subprocess.Process) -> None:
    """Stop `remotecli up` (it stops its sessions); kill its group if it does not exit."""
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STEP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await process.wait()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="remotecli-bench-dashboard-") as tmp:
        for result in asyncio.run(run("--quick" in sys.argv, Path(tmp))):
            print(result.markdown())
