"""Connect a provider in a microVM and stay connected: link out, callback in, sign-in kept.

Offline, through gateway and controller on the qemu driver (egress ``none``: nothing leaves a
VM). The provider is a compact stand-in CLI (:data:`STANDIN`, run with the guest's python3),
which signs in the way Codex does: it listens on 127.0.0.1:47823 inside its VM, asks
``$BROWSER`` to open a sign-in link with a random ``state``, and on the redirect
``/callback?code=...&state=...`` writes ``~/.standin/credentials.json``. Signed in, it prints
``signed in as USER``. What it leaves out: a real identity provider (the test plays the browser
and pastes the redirect), code exchange, token refresh, a full-screen interface.

The tests share one controller and run in file order: the link reaches the session, the pasted
callback reaches the CLI on the VM's own loopback, the sign-in is kept, and the next session
of that provider starts signed in; another user's session does not.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from remotecli.config import ControllerConfig, ProviderConfig
from remotecli.controller.server import Controller
from remotecli.drivers.qemu_bench import QemuBenchDriver
from remotecli.images import GuestImage
from tests.conftest import MS
from tests.e2e.test_qemu import TEMPLATE_TIMEOUT, TIMEOUT, System, delete_and_wait, qemu_pid
from tests.e2e.test_qemu import image as image  # the module-scoped fixture, shared
from tests.e2e.test_qemu import pytestmark as QEMU_MARKS

__all__ = ["image"]

pytestmark = QEMU_MARKS  # e2e, qemu, skipped without QEMU, one event loop per module

PROVIDER = "standin-vm"
PORT = 47823
CODE = "vm-code-5e1f0c"
STANDIN = textwrap.dedent(
    """
    import hashlib, json, os, secrets, subprocess
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from pathlib import Path
    from urllib.parse import parse_qs, urlencode, urlsplit
    cred = Path.home() / ".standin" / "credentials.json"
    if cred.exists():
        user = json.loads(cred.read_text())["user"]
    else:
        state, done = secrets.token_hex(8), []
        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                q = parse_qs(urlsplit(self.path).query)
                ok = q.get("state") == [state] and "code" in q
                self.send_response(200 if ok else 400)
                self.end_headers()
                if not ok:
                    self.wfile.write(b"wrong state")
                    return
                d = hashlib.sha256(("standin:" + q["code"][0]).encode()).hexdigest()
                cred.parent.mkdir(mode=0o700, exist_ok=True)
                cred.write_text(json.dumps({"user": "user-" + d[:8], "token": "standin-" + d}))
                cred.chmod(0o600)
                self.wfile.write(b"Signed in. You may close this page.")
                done.append("user-" + d[:8])
            def log_message(self, *args):
                pass
        server = HTTPServer(("127.0.0.1", PORT), H)
        query = {"redirect_uri": f"http://localhost:{PORT}/callback", "state": state}
        subprocess.run([os.environ["BROWSER"], "http://auth.invalid/authorize?" + urlencode(query)])
        print("not signed in; waiting for the callback", flush=True)
        while not done:
            server.handle_request()
        user = done[0]
    print("signed in as", user, flush=True)
    input()
    """
).replace("PORT", str(PORT))


def standin_command() -> tuple[str, ...]:
    """The provider's argv: the stand-in, compressed to fit the guest kernel's command line."""
    packed = base64.b64encode(gzip.compress(STANDIN.encode(), mtime=0)).decode()
    return ("sh", "-c", f'exec python3 -c "$(echo {packed} | base64 -d | gunzip)"')


def derive(code: str) -> tuple[str, str]:
    digest = hashlib.sha256(f"standin:{code}".encode()).hexdigest()
    return f"user-{digest[:8]}", f"standin-{digest}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The controller's data dir (``remotecli user add`` writes its store beside it)."""
    return tmp_path_factory.mktemp("signin") / "data"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(image: GuestImage, data_dir: Path) -> AsyncIterator[System]:
    cache = image.directory.parent
    driver = QemuBenchDriver(
        data_dir, image_cache=cache, template_cache=cache.parent / "templates", egress="none"
    )
    provider = ProviderConfig(PROVIDER, standin_command(), keep=("~/.standin",))
    controller = Controller(
        ControllerConfig(
            listen=("127.0.0.1", 0), data_dir=data_dir, egress="none", providers=(provider,)
        ),
        driver=driver,
    )
    await controller.start()
    try:
        yield System(controller.url(), controller.admin_token, driver)
    finally:
        await controller.close()
        await driver.close()


async def start(api: httpx.AsyncClient) -> str:
    created = await api.post("/api/sessions", json={"provider": PROVIDER})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    async with asyncio.timeout(TEMPLATE_TIMEOUT):
        while (state := (await api.get(f"/api/sessions/{session_id}")).json()["state"]) != "ready":
            assert state not in ("failed", "stopped"), state
            await asyncio.sleep(100 * MS)
    return session_id


async def screen_shows(system: System, api: httpx.AsyncClient, session_id: str, text: str) -> None:
    """Wait until the session's text view (through the gateway) shows ``text``."""
    ticket = (await api.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    url = f"{system.ws_base}/api/sessions/{session_id}/tty?ticket={ticket}"
    seen = ""
    async with connect(url, subprotocols=[Subprotocol("tty")], max_size=None) as ws:
        await ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 30}))
        async with asyncio.timeout(TIMEOUT):
            while text not in seen:
                message = await ws.recv()
                seen += message.decode(errors="replace") if isinstance(message, bytes) else message


async def link_of(api: httpx.AsyncClient, session_id: str) -> str:
    async with asyncio.timeout(TIMEOUT):
        while True:
            link = (await api.get(f"/api/sessions/{session_id}")).json().get("open_url")
            if link:
                return str(link)
            await asyncio.sleep(100 * MS)


async def test_a_signed_out_cli_signs_in_through_its_link_and_a_pasted_callback(
    system: System,
) -> None:
    """The link the CLI in the VM opens reaches the session's API; a wrong ``state`` is
    answered 400 by the CLI itself; the right redirect, pasted, reaches the CLI on the VM's
    own 127.0.0.1 and signs it in; ending the session keeps the sign-in (the provider shows
    connected)."""
    async with system.api() as api:
        session_id = await start(api)
        pid = qemu_pid(system, session_id)
        link = await link_of(api, session_id)
        query = parse_qs(urlsplit(link).query)
        assert query["redirect_uri"] == [f"http://localhost:{PORT}/callback"]
        callback = f"http://localhost:{PORT}/callback?code={CODE}&state="
        wrong = await api.post(
            f"/api/sessions/{session_id}/callback", json={"url": callback + "not-it"}
        )
        assert wrong.status_code == 200, wrong.text
        assert wrong.json()["status"] == 400
        right = await api.post(
            f"/api/sessions/{session_id}/callback", json={"url": callback + query["state"][0]}
        )
        assert right.status_code == 200, right.text
        assert right.json() == {"status": 200, "body": "Signed in. You may close this page."}
        user, _ = derive(CODE)
        await screen_shows(system, api, session_id, f"signed in as {user}")
        await delete_and_wait(api, session_id, pid)
        providers = (await api.get("/api/providers")).json()
        entry = next(p for p in providers if p["name"] == PROVIDER)
        assert entry["connected"] is True, entry


async def test_the_next_session_starts_signed_in_and_another_users_does_not(
    system: System, data_dir: Path
) -> None:
    """A new session of the connected provider starts signed in (the kept file is put into
    the clone's HOME before its CLI starts); another user's session of it starts signed out."""
    user, _ = derive(CODE)
    async with system.api() as api:
        session_id = await start(api)
        pid = qemu_pid(system, session_id)
        await screen_shows(system, api, session_id, f"signed in as {user}")
        await delete_and_wait(api, session_id, pid)
    command = ["user", "add", "bob", "--token-only", "--data-dir", str(data_dir)]
    added = subprocess.run(
        [sys.executable, "-m", "remotecli", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "REMOTECLI_CONFIG": "", "REMOTECLI_TOKEN": ""},
        timeout=TIMEOUT,
        check=True,
    )
    bob_token = added.stdout.strip()
    async with httpx.AsyncClient(
        base_url=system.base,
        headers={"Authorization": f"Bearer {bob_token}"},
        timeout=TEMPLATE_TIMEOUT,
    ) as bob:
        session_id = await start(bob)
        pid = qemu_pid(system, session_id)
        await screen_shows(system, bob, session_id, "not signed in")
        assert (await link_of(bob, session_id)).startswith("http://auth.invalid/authorize?")
        await delete_and_wait(bob, session_id, pid)
