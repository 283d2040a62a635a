"""Trespass: other users' sessions, hijacked WebSockets, tickets, tokens, paths, forged headers.

Most tests run the whole controller in-process (gateway, API on its Unix socket, VNC bridge)
with the banner driver, and speak to it over real sockets as a browser or a script would. The
log test runs `remotecli up` as a subprocess and greps everything it wrote; the sandbox test
runs two real local sessions under bubblewrap.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from remotecli import auth
from remotecli.auth import TicketBook
from remotecli.controller.server import STORE_FILE, Controller, add_user_token
from remotecli.drivers.base import SessionSpec
from remotecli.exceptions import Forbidden
from tests.banner_driver import BANNER, banner_controller
from tests.conftest import MS
from tests.logins import login_cookie

VNC_PATHS = ("/api/sessions/{id}/vnc", "/api/auth/session/{id}/novnc/websock")


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """A running controller (banner driver) with its admin user, on 127.0.0.1 port 0."""
    async with banner_controller(tmp_path / "data") as running:
        yield running


def client_for(controller: Controller, token: str) -> httpx.AsyncClient:
    """An API client authenticated by ``token`` as a bearer."""
    return httpx.AsyncClient(
        base_url=controller.url(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=5000 * MS,
    )


def second_user(controller: Controller, name: str = "mallory") -> str:
    """Create another user and return its token."""
    assert controller.store is not None
    return add_user_token(controller.store, name)


async def ready_session(client: httpx.AsyncClient) -> str:
    """Create a shell session and return its id once the event stream says ready."""
    created = await client.post("/api/sessions", json={"provider": "shell"})
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    async with client.stream("GET", f"/api/sessions/{session_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["state"] == "ready":
                return session_id
    raise AssertionError(f"session {session_id} never became ready")


async def upgrade_status(controller: Controller, path: str, **headers: str) -> int:
    """Open a WebSocket to ``path``; return the HTTP status it was refused with (101 if not)."""
    host, port = controller.address
    origin = headers.pop("origin", None)
    try:
        async with connect(
            f"ws://{host}:{port}{path}",
            origin=origin,  # type: ignore[arg-type]
            additional_headers=headers,
            open_timeout=5000 * MS,
        ) as ws:
            assert await ws.recv() == BANNER
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


async def test_other_users_session_is_404_on_every_endpoint(controller: Controller) -> None:
    """Another user gets 404 for a session on every HTTP endpoint and both WebSocket paths."""
    intruder = second_user(controller)
    async with client_for(controller, controller.admin_token) as owner:
        session_id = await ready_session(owner)
    own_origin = controller.url()
    async with client_for(controller, intruder) as other:
        for method, path in [
            ("GET", "/api/sessions/{id}"),
            ("GET", "/api/sessions/{id}/events"),
            ("POST", "/api/sessions/{id}/ticket"),
            ("GET", "/api/auth/session/{id}"),
            ("DELETE", "/api/sessions/{id}"),
        ]:
            response = await other.request(method, path.format(id=session_id))
            assert response.status_code == 404, f"{method} {path}: {response.status_code}"
            assert session_id not in response.text.replace(f"no session {session_id}", "")
        listed = await other.get("/api/sessions")
        assert listed.status_code == 200
        assert session_id not in listed.text
    for path in VNC_PATHS:
        status = await upgrade_status(
            controller,
            path.format(id=session_id),
            origin=own_origin,
            Cookie=login_cookie(controller, "mallory"),
        )
        assert status == 404, f"{path}: {status}"
    async with client_for(controller, controller.admin_token) as owner:
        assert (await owner.get(f"/api/sessions/{session_id}")).json()["state"] == "ready"


async def test_cookie_websocket_needs_an_allowed_origin(controller: Controller) -> None:
    """With cookie auth, a foreign or missing Origin is refused with HTTP 403 before the upgrade."""
    async with client_for(controller, controller.admin_token) as owner:
        session_id = await ready_session(owner)
    cookie = login_cookie(controller)
    for path in VNC_PATHS:
        url_path = path.format(id=session_id)
        for origin in ("http://evil.example", "null", f"{controller.url()}.evil.example"):
            status = await upgrade_status(controller, url_path, origin=origin, Cookie=cookie)
            assert status == 403, f"{path} from {origin}: {status}"
        assert await upgrade_status(controller, url_path, Cookie=cookie) == 403
        assert (
            await upgrade_status(controller, url_path, origin=controller.url(), Cookie=cookie)
            == 101
        )


async def test_tickets_are_single_use_and_bound_to_one_session(controller: Controller) -> None:
    """A ticket opens its own session's stream once; reused or on another session it is 403."""
    async with client_for(controller, controller.admin_token) as owner:
        first = await ready_session(owner)
        second = await ready_session(owner)
        issued = (await owner.post(f"/api/sessions/{first}/ticket")).json()
        assert 0 < issued["expires_in"] <= 60
        ticket = issued["ticket"]
        for path in VNC_PATHS:
            other_ticket = (await owner.post(f"/api/sessions/{first}/ticket")).json()["ticket"]
            wrong = f"{path.format(id=second)}?ticket={other_ticket}"
            assert await upgrade_status(controller, wrong) == 403
        assert await upgrade_status(controller, f"{issued['vnc_path']}") == 101
        assert await upgrade_status(controller, f"/api/sessions/{first}/vnc?ticket={ticket}") == 403
        assert await upgrade_status(controller, f"/api/sessions/{first}/vnc?ticket=forged") == 403


def test_tickets_expire_after_their_lifetime() -> None:
    """A ticket redeemed after its 60 s lifetime is refused (403), even on its own session."""
    now = [1000.0]
    book = TicketBook(clock=lambda: now[0])
    ticket, ttl = book.issue("s1", "alice")
    assert ttl == 60.0
    now[0] += ttl
    with pytest.raises(Forbidden, match="expired"):
        book.redeem(ticket, "s1")


def test_tokens_are_compared_in_constant_time_and_stored_hashed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Secrets are compared with hmac.compare_digest, and the store holds only their hashes."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert auth.tokens_match("secret-a", "secret-a")
    assert not auth.tokens_match("secret-a", "secret-b")
    assert seen == [(b"secret-a", b"secret-a"), (b"secret-a", b"secret-b")]

    from remotecli.controller.server import open_store

    store = open_store(tmp_path)
    token = add_user_token(store, "alice")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(STORE_FILE))
    assert token.encode() not in raw
    assert auth.hash_token(token).encode() in raw


async def test_login_is_rate_limited(controller: Controller) -> None:
    """After ten failed logins from one address, wrong tokens get 429; the right one still works."""
    async with httpx.AsyncClient(base_url=controller.url(), timeout=5000 * MS) as client:
        for attempt in range(10):
            failed = await client.get("/login", params={"token": f"wrong-{attempt}"})
            assert failed.status_code == 401
        limited = await client.get("/login", params={"token": "wrong-10"})
        assert limited.status_code == 429
        assert "Retry-After" in limited.headers
        bearer = await client.get(
            "/api/sessions", headers={"Authorization": f"Bearer {controller.admin_token}"}
        )
        assert bearer.status_code == 200
        login = await client.get("/login", params={"token": controller.admin_token})
        assert login.status_code == 303


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/sessions/..%2F..%2Fetc%2Fpasswd", None),
        ("GET", "/api/sessions/%2e%2e", None),
        ("GET", "/api/sessions/..", None),
        ("GET", "/api/sessions/" + "a" * 65, None),
        ("GET", "/api/sessions/a%00b", None),
        ("DELETE", "/api/sessions/..%2Fsessions", None),
        ("POST", "/api/sessions/%2E%2E%2Fx/ticket", None),
        ("GET", "/api/auth/session/..%2F..", None),
        ("POST", "/api/sessions", {"provider": "../../bin/sh"}),
        ("POST", "/api/sessions", {"provider": "shell/../x"}),
        ("POST", "/api/sessions", {"provider": "%2e%2e%2fsh"}),
        ("POST", "/api/sessions", {"provider": "s" * 200}),
        ("POST", "/api/sessions", {"provider": "shell", "workdir": "/etc"}),
    ],
)
async def test_traversal_and_over_long_names_are_refused_before_the_store(
    controller: Controller, method: str, path: str, body: dict[str, str] | None
) -> None:
    """Ids and providers with ../, encoded slashes, NUL or too long: 4xx, and nothing is made."""
    data_dir = controller.config.data_dir
    before = sorted(str(p) for p in data_dir.rglob("*") if "run" not in p.parts)
    async with client_for(controller, controller.admin_token) as client:
        response = await client.request(method, path, json=body)
        assert response.status_code in (400, 404, 405, 422), response.text
        assert (await client.get("/api/sessions")).json() == []
    after = sorted(str(p) for p in data_dir.rglob("*") if "run" not in p.parts)
    assert [p for p in after if p not in before and "sessions" in p] == []


async def test_websocket_paths_with_traversal_are_refused(controller: Controller) -> None:
    """A WebSocket to a VNC path whose id holds ../, %2F or is over-long is refused with a 4xx."""
    cookie = login_cookie(controller)
    for session_id in ("..%2F..%2Fetc", "%2e%2e", "a" * 65, "x%00y"):
        for path in VNC_PATHS:
            status = await upgrade_status(
                controller, path.format(id=session_id), origin=controller.url(), Cookie=cookie
            )
            assert 400 <= status < 500, f"{path} with {session_id}: {status}"


async def test_forged_forwarding_headers_do_not_set_the_secure_cookie(
    controller: Controller,
) -> None:
    """X-Forwarded-Proto: https from an untrusted client does not make the login cookie Secure."""
    async with httpx.AsyncClient(base_url=controller.url(), timeout=5000 * MS) as client:
        response = await client.get(
            "/login",
            params={"token": controller.admin_token},
            headers={
                "X-Forwarded-Proto": "https",
                "Forwarded": "for=6.6.6.6;proto=https",
                "X-Forwarded-For": "6.6.6.6",
            },
        )
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "secure" not in cookie


async def test_forged_client_address_does_not_dodge_the_login_limit(
    controller: Controller,
) -> None:
    """A client rotating X-Forwarded-For is still one address to the login rate limit."""
    async with httpx.AsyncClient(base_url=controller.url(), timeout=5000 * MS) as client:
        for attempt in range(10):
            headers = {"X-Forwarded-For": f"10.0.0.{attempt}", "X-Real-IP": f"10.1.0.{attempt}"}
            await client.get("/login", params={"token": f"wrong-{attempt}"}, headers=headers)
        limited = await client.get(
            "/login",
            params={"token": "wrong-10"},
            headers={"X-Forwarded-For": "10.9.9.9"},
        )
    assert limited.status_code == 429


@pytest.fixture
def remotecli_up(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`remotecli up` on port 0 (JSON logs, banner-free local driver), its login URL, its log."""
    log_path = tmp_path / "up.log"
    log_file = log_path.open("w")
    env = {
        **os.environ,
        "REMOTECLI_LOG_FORMAT": "json",
        "REMOTECLI_LOG_LEVEL": "debug",
        "REMOTECLI_DATA_DIR": str(tmp_path / "data"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "remotecli", "up", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        env=env,
    )
    url = ""
    assert process.stdout is not None
    for line in process.stdout:
        if "/login?token=" in line:
            url = line.strip()
            break
    try:
        assert url, "remotecli up printed no login URL"
        yield process, url, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        log_file.close()


async def test_tokens_and_tickets_never_reach_the_logs(
    remotecli_up: tuple[subprocess.Popen[str], str, Path],
) -> None:
    """Logins (good and bad), API calls, tickets and forged headers leave no secret in the logs."""
    process, url, log_path = remotecli_up
    match = re.fullmatch(r"(http://[^/]+)/login\?token=(\S+)", url)
    assert match is not None, url
    base, token = match.groups()
    wrong = "wrong-token-0123456789abcdef"
    spoofed = "6.6.6.6"
    async with httpx.AsyncClient(base_url=base, timeout=10000 * MS) as client:
        assert (await client.get("/login", params={"token": wrong})).status_code == 401
        assert (await client.get("/login", params={"token": token})).status_code == 303
        headers = {"Authorization": f"Bearer {token}", "X-Forwarded-For": spoofed}
        assert (await client.get("/api/sessions", headers=headers)).status_code == 200
        bad = {"Authorization": f"Bearer {wrong}", "X-Forwarded-For": spoofed}
        assert (await client.get("/api/sessions", headers=bad)).status_code == 401
        created = await client.post("/api/sessions", json={"provider": "shell"}, headers=headers)
        assert created.status_code in (201, 422, 503), created.text
        tickets: list[str] = []
        if created.status_code == 201:
            session_id = created.json()["id"]
            ticket = await client.post(f"/api/sessions/{session_id}/ticket", headers=headers)
            if ticket.status_code == 200:
                tickets.append(ticket.json()["ticket"])
                host_port = base.removeprefix("http://")
                with pytest.raises(Exception):  # noqa: B017,PT011 -- any refusal or close will do
                    async with connect(
                        f"ws://{host_port}/api/sessions/{session_id}/vnc?ticket=x{ticket.json()['ticket']}",
                        open_timeout=5000 * MS,
                    ):
                        pass
            await client.delete(f"/api/sessions/{session_id}", headers=headers)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=20)
    logs = log_path.read_text()
    assert '"event"' in logs, "no JSON log lines were captured"
    for secret in (token, wrong, *tickets):
        assert secret not in logs, "a secret appeared in the logs"
    for line in logs.splitlines():
        if line.startswith("{") and '"client"' in line:
            assert spoofed not in line, f"a forged address was logged as the client: {line}"


needs_sandbox = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("bwrap", "Xvnc", "xterm", "tmux")),
    reason="bubblewrap, Xvnc, xterm and tmux are needed: scripts/install-system-deps.sh run",
)


@needs_sandbox
async def test_one_sandbox_cannot_read_another_sessions_home(tmp_path: Path) -> None:
    """Under bubblewrap a session sees neither another session's HOME nor its VNC socket."""
    from remotecli.drivers.local import LocalDriver

    driver = LocalDriver(tmp_path, sandbox=True)
    victim_dir = tmp_path / "sessions" / "victim"
    spy_dir = tmp_path / "sessions" / "spy"
    probe = (
        f"cat {victim_dir}/home/secret > $HOME/probe 2>&1; "
        f"ls {victim_dir}/run >> $HOME/probe 2>&1; "
        f"ls {tmp_path} >> $HOME/probe 2>&1; echo done >> $HOME/probe; exec sleep 600"
    )
    try:
        await driver.start(
            SessionSpec("victim", "shell", ["sleep", "600"], victim_dir, width=320, height=200),
            lambda step: None,
        )
        (victim_dir / "home" / "secret").write_text("victim-secret-42")
        await driver.start(
            SessionSpec("spy", "shell", ["bash", "-c", probe], spy_dir, width=320, height=200),
            lambda step: None,
        )
        probe_file = spy_dir / "home" / "probe"
        async with asyncio.timeout(15000 * MS):
            while "done" not in (probe_file.read_text() if probe_file.exists() else ""):
                await asyncio.sleep(20 * MS)
        seen = probe_file.read_text()
        assert "victim-secret-42" not in seen
        assert "vnc.sock" not in seen
        assert "No such file" in seen
        assert victim_dir.stat().st_mode & 0o077 == 0, "a session's workdir is open to others"
    finally:
        await driver.close()


@needs_sandbox
async def test_another_local_user_cannot_reach_a_sessions_vnc_socket() -> None:
    """The VNC socket is reachable only by the controller's user, even with the data dir open."""
    from remotecli.drivers.local import LocalDriver

    data_dir = Path(tempfile.mkdtemp(prefix="rc-perm-"))
    data_dir.chmod(0o755)  # only the driver's own modes stand between other users and the socket
    driver = LocalDriver(data_dir, sandbox=True)
    workdir = data_dir / "sessions" / "s1"
    try:
        endpoint = await driver.start(
            SessionSpec("s1", "shell", ["sleep", "600"], workdir, width=320, height=200),
            lambda step: None,
        )
        assert endpoint.unix_path is not None
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(e.errno)\n"
            "else:\n    print('connected')\n"
        )
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        result = subprocess.run(
            [*as_nobody, sys.executable, "-c", probe, endpoint.unix_path],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0 and "setpriv" in result.stderr:
            pytest.skip(f"cannot switch to another user here: {result.stderr.strip()}")
        assert result.stdout.strip() == str(errno.EACCES), result.stdout + result.stderr
    finally:
        await driver.close()
        shutil.rmtree(data_dir, ignore_errors=True)


TOOL_SCRIPT = """#!/bin/bash
# A stand-in CLI: signs in by writing its token, asks a browser to open a link, then waits
# for its callback on the session's loopback (python3's http.server, answering 200).
mkdir -p ~/.tool && printf '%s' "$TOOL_TOKEN" > ~/.tool/auth.json
xdg-open "https://auth.example.test/authorize?state=$TOOL_STATE"
exec python3 -m http.server --bind 127.0.0.1 47824
"""


@needs_sandbox
async def test_sign_ins_links_and_callbacks_leave_no_secret_in_logs_or_on_disk(
    tmp_path: Path,
) -> None:
    """A kept token, a sign-in link's state and a callback's code appear in no log line and,
    once the session ended, in no file of the data dir; the next session is signed in."""
    secret_token, secret_state, secret_code = "tok-5e1f0c2a9b", "st-77d2e4", "code-3a9c1b"
    tool_dir = tmp_path / "tool"
    tool_dir.mkdir()
    script = TOOL_SCRIPT.replace("$TOOL_TOKEN", secret_token)
    (tool_dir / "tool-cli").write_text(script.replace("$TOOL_STATE", secret_state))
    (tool_dir / "tool-cli").chmod(0o755)
    config = tmp_path / "remotecli.toml"
    config.write_text(
        f'[providers.tool]\ncommand = ["{tool_dir / "tool-cli"}"]\nkeep = ["~/.tool"]\n'
    )
    data_dir, log_path = tmp_path / "data", tmp_path / "up.log"
    env = {
        **os.environ,
        "REMOTECLI_LOG_FORMAT": "json",
        "REMOTECLI_LOG_LEVEL": "debug",
        "REMOTECLI_DATA_DIR": str(data_dir),
    }
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "remotecli",
                "up",
                "--listen",
                "127.0.0.1:0",
                "--config",
                str(config),
            ],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            env=env,
        )
        try:
            assert process.stdout is not None
            url = next(line.strip() for line in process.stdout if "/login?token=" in line)
            match = re.fullmatch(r"(http://[^/]+)/login\?token=(\S+)", url)
            assert match is not None, url
            base, token = match.groups()
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=base, timeout=10000 * MS) as client:
                created = await client.post(
                    "/api/sessions", json={"provider": "tool"}, headers=headers
                )
                assert created.status_code == 201, created.text
                session_id = created.json()["id"]
                async with asyncio.timeout(20000 * MS):
                    while True:
                        got = (
                            await client.get(f"/api/sessions/{session_id}", headers=headers)
                        ).json()
                        if got["state"] == "ready" and got["open_url"]:
                            break
                        await asyncio.sleep(0.1)
                assert secret_state in got["open_url"]
                callback = f"http://localhost:47824/?code={secret_code}"
                async with asyncio.timeout(20000 * MS):
                    while True:
                        relayed = await client.post(
                            f"/api/sessions/{session_id}/callback",
                            json={"url": callback},
                            headers=headers,
                        )
                        if relayed.status_code != 502:  # http.server takes a moment to listen
                            break
                        await asyncio.sleep(0.1)
                assert relayed.json()["status"] == 200, relayed.text
                await client.delete(f"/api/sessions/{session_id}", headers=headers)
                providers = (await client.get("/api/providers", headers=headers)).json()
                assert next(p for p in providers if p["name"] == "tool")["connected"] is True
                for path in data_dir.rglob("*"):
                    if path.is_file() and not path.is_symlink():
                        assert secret_token.encode() not in path.read_bytes(), path
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)
    logs = log_path.read_text()
    assert "signin_kept" in logs  # the keeping did happen, and was logged
    for secret in (secret_token, secret_state, secret_code, token):
        assert secret not in logs, f"{secret} appeared in the logs"
