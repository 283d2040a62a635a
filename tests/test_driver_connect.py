"""The local driver's side of connecting a provider, with a real sandbox and real programs.

Kept files restored into HOME before the command starts, links handed out through the
session's browser stand-ins, loopback callbacks relayed into the session's own network
namespace, and a command's exit status named in the session's reason.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from remotecli.controller.connect import relay_callback
from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local import LocalDriver
from remotecli.exceptions import BadRequest, UpstreamRefused
from remotecli.providers import Catalogue
from tests.conftest import MS
from tests.rfb_viewer import wait_for_file
from tests.test_driver_local import open_viewer

pytestmark = [
    pytest.mark.skipif(
        any(shutil.which(p) is None for p in ("Xvnc", "xterm", "tmux", "bwrap")),
        reason="Xvnc, xterm, tmux and bubblewrap are needed: make test installs them",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the full sandbox needs a root controller"),
]
START_TIMEOUT = 15_000 * MS


def spec_for(tmp_path: Path, session_id: str, script: str, **extra: object) -> SessionSpec:
    return SessionSpec(
        session_id=session_id,
        provider="shell",
        command=["bash", "--norc", "--noprofile", "-c", script],
        workdir=tmp_path / "sessions" / session_id,
        width=640,
        height=400,
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[LocalDriver]:
    local = LocalDriver(tmp_path, egress="none")
    yield local
    await local.close()


async def test_kept_files_are_in_home_before_the_command_starts(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """Restored files are there, owned by the session's user and 0600, when its command runs."""
    script = "cp ~/.tool/auth.json ~/seen.json; exec sleep 60"
    spec = spec_for(
        tmp_path, "restore", script, home_files={".tool/auth.json": b'{"token": "t-1"}'}
    )
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    home = spec.workdir / "home"
    assert await wait_for_file(home / "seen.json", START_TIMEOUT) == '{"token": "t-1"}'
    info = os.stat(home / ".tool" / "auth.json")
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.stat(home / "seen.json").st_uid != 0
    assert await driver.collect("restore", [".tool/auth.json"]) == {
        ".tool/auth.json": b'{"token": "t-1"}'
    }


async def test_links_reach_the_controller_through_every_browser_name(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """$BROWSER, xdg-open, sensible-browser and www-browser hand http(s) links out; nothing else."""
    links: list[str] = []
    got = asyncio.Event()

    def open_url(url: str) -> None:
        links.append(url)
        if len(links) == 4:
            got.set()

    script = (
        '"$BROWSER" https://auth.example.test/a; xdg-open "http://localhost:1455/b?x=1"; '
        "sensible-browser file:///etc/shadow; www-browser 'javascript:alert(1)'; "
        "sensible-browser https://auth.example.test/c; www-browser https://auth.example.test/d; "
        "exec sleep 60"
    )
    spec = spec_for(tmp_path, "links", script, open_url=open_url)
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    await asyncio.wait_for(got.wait(), START_TIMEOUT)
    assert links == [
        "https://auth.example.test/a",
        "http://localhost:1455/b?x=1",
        "https://auth.example.test/c",
        "https://auth.example.test/d",
    ]


async def test_a_callback_reaches_only_the_sessions_own_loopback(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """Two sessions on the same port answer their own callbacks; ::1 is tried for localhost."""
    server = (
        "import http.server, socket, sys\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        body = (sys.argv[1] + ' ' + self.path).encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers(); self.wfile.write(body)\n"
        "class S(http.server.HTTPServer):\n"
        "    address_family = socket.AF_INET6 if sys.argv[2] == '::1' else socket.AF_INET\n"
        "S((sys.argv[2], 47823), H).serve_forever()\n"
    )
    (tmp_path / "sessions").mkdir(mode=0o700)
    specs = [
        spec_for(tmp_path, name, f"exec python3 -c {shlex.quote(server)} {name} {address}")
        for name, address in (("one", "127.0.0.1"), ("two", "::1"))
    ]
    for spec in specs:
        await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    for name in ("one", "two"):
        url = f"http://localhost:47823/callback?code={name}"
        for _ in range(100):  # python3 takes a moment to listen
            try:
                status, body = await relay_callback(driver, name, url)
                break
            except UpstreamRefused:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"session {name}'s server never listened on port 47823")
        assert (status, body) == (200, f"{name} /callback?code={name}")
    with pytest.raises(BadRequest):
        await relay_callback(driver, "one", "http://10.0.0.1:47823/")


async def test_the_commands_own_exit_status_is_the_reason(
    driver: LocalDriver, tmp_path: Path
) -> None:
    """When the CLI exits and the terminal is closed, the reason names the CLI and its status."""
    spec = spec_for(tmp_path, "exit", "exit 7")
    endpoint = await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    viewer, writer = await open_viewer(endpoint)
    await viewer.wait_non_blank(START_TIMEOUT)
    await wait_for_file(spec.workdir / "run" / "command.exit", START_TIMEOUT)
    await viewer.type("\n")  # "press Enter to end the session"
    reason = await asyncio.wait_for(driver.wait("exit"), START_TIMEOUT)
    assert reason == "bash exited with status 7"
    writer.close()


@pytest.mark.parametrize("provider", ["claude-code", "codex", "gemini-cli"])
async def test_each_installed_cli_runs_in_the_sandbox_from_the_checkout(
    driver: LocalDriver, tmp_path: Path, provider: str
) -> None:
    """The provider's CLI, found where `make up` installs it, starts and exits 0 in a session."""
    status = Catalogue(driver=driver).get(provider)
    if not status.available:
        pytest.skip(f"{provider} cannot run here: {status.hint}")
    spec = SessionSpec(
        session_id=f"cli-{provider}",
        provider=provider,
        command=[*status.argv(), "--version"],
        workdir=tmp_path / "sessions" / f"cli-{provider}",
        width=640,
        height=400,
    )
    await asyncio.wait_for(driver.start(spec, lambda _: None), START_TIMEOUT)
    written = await wait_for_file(spec.workdir / "run" / "command.exit", 60_000 * MS)
    program = Path(status.argv()[0]).name
    assert written == f"{program} 0\n"
