"""The web attacks of "The sandbox holds", tried against a whole controller over real sockets.

Login CSRF, lock-outs through the failed-login limit, DNS rebinding (a foreign Host), a
third-party script on API docs, and one user starving others of sessions. Each test runs the
controller in-process (gateway, API on its Unix socket, VNC bridge) with the banner driver, on
127.0.0.1 port 0, and speaks to it as a browser, a script or an attacker would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from remotecli.config import load_controller_config
from remotecli.controller.server import Controller, add_user_token
from tests.banner_driver import banner_controller
from tests.conftest import MS
from tests.logins import login_cookie
from tests.test_trespass import VNC_PATHS, ready_session, upgrade_status

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """A running controller (banner driver, default settings) on 127.0.0.1 port 0."""
    async with banner_controller(tmp_path / "data") as running:
        yield running


def user(controller: Controller, name: str) -> str:
    """Create user ``name`` and return a token for it."""
    assert controller.store is not None
    return add_user_token(controller.store, name)


def browser(controller: Controller) -> httpx.AsyncClient:
    """A client that does not follow redirects and keeps no cookies between requests."""
    return httpx.AsyncClient(base_url=controller.url(), timeout=5000 * MS)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def raw_exchange(controller: Controller, request: str) -> tuple[int, bytes]:
    """Send ``request`` as is on a new connection; return the status and what came back.

    A 101 returns once its head arrived (the connection stays a WebSocket); anything else is
    read to the end.
    """
    host, port = controller.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request.replace("\n", "\r\n").encode())
        async with asyncio.timeout(5000 * MS):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            rest = b"" if status == 101 else await reader.read()
    finally:
        writer.close()
    return status, head + rest


def websocket_request(path: str, host: str, cookie: str) -> str:
    """A browser's WebSocket upgrade to ``path`` on ``host``, from a page on ``host``."""
    return (
        f"GET {path} HTTP/1.1\nHost: {host}\nUpgrade: websocket\nConnection: Upgrade\n"
        f"Sec-WebSocket-Key: {WS_KEY}\nSec-WebSocket-Version: 13\n"
        f"Origin: http://{host}\nCookie: {cookie}\n\n"
    )


def own_host(controller: Controller) -> str:
    return controller.url().removeprefix("http://")


def foreign_origins(text: str, own: str) -> list[str]:
    """Every http(s) origin named in ``text`` other than ``own``."""
    found = {m.group(0) for m in re.finditer(r"https?://[^\s\"'<>()/]+", text)}
    return sorted(origin for origin in found if origin != own)


# --- login CSRF -----------------------------------------------------------------------------------


async def test_cross_site_login_link_asks_instead_of_setting_the_cookie(
    controller: Controller,
) -> None:
    """A login link followed from another site sets no cookie and shows a confirmation page."""
    mallory = user(controller, "mallory")
    async with browser(controller) as client:
        for site in ("cross-site", "same-site"):
            response = await client.get(
                "/login",
                params={"token": mallory},
                headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "navigate"},
            )
            assert response.status_code == 200, response.text
            assert "set-cookie" not in response.headers
            page = response.text
            assert "Sign in as mallory" in page
            assert '<form method="post" action="/login">' in page
            assert f'name="token" value="{mallory}"' in page
            assert "<script" not in page
            csp = response.headers["content-security-policy"]
            assert "default-src 'none'" in csp
            assert "frame-ancestors 'none'" in csp
            assert response.headers["cache-control"] == "no-store"


async def test_login_link_does_not_replace_another_users_cookie(controller: Controller) -> None:
    """A valid cookie of another user is not replaced by a login link, even from the address bar."""
    mallory = user(controller, "mallory")
    admin_cookie = {"Cookie": login_cookie(controller)}
    async with browser(controller) as client:
        response = await client.get(
            "/login",
            params={"token": mallory},
            headers={"Sec-Fetch-Site": "none", **admin_cookie},
        )
        assert response.status_code == 200
        assert "set-cookie" not in response.headers
        assert "signed in here as <strong>admin</strong>" in response.text
        assert "Sign in as mallory" in response.text
        same_user = await client.get(
            "/login",
            params={"token": controller.admin_token},
            headers={"Sec-Fetch-Site": "none", **admin_cookie},
        )
        assert same_user.status_code == 303
        stale = await client.get(
            "/login",
            params={"token": mallory},
            headers={"Sec-Fetch-Site": "none", "Cookie": "remotecli_login=stale-login"},
        )
        assert stale.status_code == 303


async def test_same_origin_post_signs_in(controller: Controller) -> None:
    """The confirmation form's same-origin POST sets the strict HttpOnly cookie and goes on."""
    mallory = user(controller, "mallory")
    async with browser(controller) as client:
        for headers in (
            {"Origin": controller.url()},
            {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
        ):
            response = await client.post("/login", data={"token": mallory}, headers=headers)
            assert response.status_code == 303, response.text
            assert response.headers["location"] == "/dashboard/remote-cli"
            cookie = response.headers["set-cookie"]
            assert cookie.startswith("remotecli_login=")
            assert mallory not in cookie  # the cookie is a login of its own, not the token
            assert "HttpOnly" in cookie
            assert "SameSite=strict" in cookie


async def test_cross_site_post_is_403(controller: Controller) -> None:
    """A POST /login from another site, or that cannot show where it came from, is 403."""
    mallory = user(controller, "mallory")
    async with browser(controller) as client:
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
            {"Origin": controller.url(), "Sec-Fetch-Site": "same-site"},
            {},
        ):
            response = await client.post("/login", data={"token": mallory}, headers=headers)
            assert response.status_code == 403, headers
            assert "set-cookie" not in response.headers
            assert response.json()["message"].startswith("sign-in refused: ")


async def test_address_bar_login_still_signs_in(controller: Controller) -> None:
    """The printed login URL signs in from the address bar and for clients with no Fetch headers."""
    address_bar = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-User": "?1"}
    async with browser(controller) as client:
        for headers in (address_bar, {}):
            response = await client.get(
                "/login", params={"token": controller.admin_token}, headers=headers
            )
            assert response.status_code == 303
            assert response.headers["location"] == "/dashboard/remote-cli"
            assert "HttpOnly" in response.headers["set-cookie"]


# --- failed-login limiting ------------------------------------------------------------------------


async def test_wrong_logins_never_block_valid_credentials(controller: Controller) -> None:
    """After 12 wrong logins, a valid bearer works and a valid cookie WebSocket still upgrades."""
    async with browser(controller) as client:
        statuses = [
            (await client.get("/login", params={"token": f"wrong-{n}"})).status_code
            for n in range(12)
        ]
        assert statuses == [401] * 10 + [429] * 2
        api = await client.get("/api/sessions", headers=bearer(controller.admin_token))
        assert api.status_code == 200
        async with httpx.AsyncClient(
            base_url=controller.url(), headers=bearer(controller.admin_token), timeout=5000 * MS
        ) as owner:
            session_id = await ready_session(owner)
    for path in VNC_PATHS:
        status = await upgrade_status(
            controller,
            path.format(id=session_id),
            origin=controller.url(),
            Cookie=login_cookie(controller),
        )
        assert status == 101, path


async def test_bad_cookie_and_ticket_websockets_count_and_get_429(controller: Controller) -> None:
    """Wrong cookies and tickets on both VNC paths count as failed logins; past 10 they get 429."""
    async with httpx.AsyncClient(
        base_url=controller.url(), headers=bearer(controller.admin_token), timeout=5000 * MS
    ) as owner:
        session_id = await ready_session(owner)
        good_ticket = (await owner.post(f"/api/sessions/{session_id}/ticket")).json()["ticket"]
    statuses = []
    for n in range(5):
        for path in VNC_PATHS:
            url_path = path.format(id=session_id)
            if n % 2:
                status = await upgrade_status(controller, f"{url_path}?ticket=forged-{n}")
            else:
                status = await upgrade_status(
                    controller, url_path, origin=controller.url(), Cookie="remotecli_login=bad"
                )
            statuses.append(status)
    assert sorted(set(statuses)) == [401, 403]
    for path in VNC_PATHS:
        url_path = path.format(id=session_id)
        assert await upgrade_status(controller, f"{url_path}?ticket=forged-x") == 429
        bad_cookie = await upgrade_status(
            controller, url_path, origin=controller.url(), Cookie="remotecli_login=bad"
        )
        assert bad_cookie == 429
    async with browser(controller) as client:
        wrong = await client.get("/api/sessions", headers=bearer("wrong-token"))
        assert wrong.status_code == 429
        assert int(wrong.headers["retry-after"]) > 0
    good = f"/api/sessions/{session_id}/vnc?ticket={good_ticket}"
    assert await upgrade_status(controller, good) == 101


# --- Host allow-list (DNS rebinding) --------------------------------------------------------------


async def test_foreign_host_is_misdirected_everywhere(controller: Controller) -> None:
    """Host: evil.example gets 421 on pages, API, metrics, login and a WebSocket upgrade."""
    session_id = ""
    async with httpx.AsyncClient(
        base_url=controller.url(), headers=bearer(controller.admin_token), timeout=5000 * MS
    ) as owner:
        session_id = await ready_session(owner)
        for path in (
            "/",
            "/dashboard/remote-cli",
            "/metrics",
            "/api/sessions",
            f"/api/sessions/{session_id}",
            "/api/openapi.json",
            f"/login?token={controller.admin_token}",
        ):
            response = await owner.get(path, headers={"Host": "evil.example"})
            assert response.status_code == 421, path
            assert "evil.example" in response.text
            assert "--allowed-host" in response.text
            assert response.headers["connection"] == "close"
    path = f"/api/sessions/{session_id}/vnc"
    status, answer = await raw_exchange(
        controller, websocket_request(path, "evil.example", login_cookie(controller))
    )
    assert status == 421
    assert b"evil.example" in answer
    status, _ = await raw_exchange(
        controller, websocket_request(path, own_host(controller), login_cookie(controller))
    )
    assert status == 101


async def test_allowed_hosts_pass(controller: Controller) -> None:
    """The listen address, localhost and ::1 (any case, port, trailing dot) are served."""
    port = controller.address[1]
    async with browser(controller) as client:
        for host in (
            f"127.0.0.1:{port}",
            "127.0.0.1",
            f"localhost:{port}",
            f"LocalHost.:{port}",
            f"[::1]:{port}",
        ):
            response = await client.get("/readyz", headers={"Host": host})
            assert response.status_code == 200, host


async def test_healthz_and_http10_without_host_are_answered(controller: Controller) -> None:
    """The gateway's /healthz answers any Host, and an HTTP/1.0 request without Host is served."""
    status, _ = await raw_exchange(
        controller, "GET /healthz HTTP/1.1\nHost: evil.example\nConnection: close\n\n"
    )
    assert status == 200
    status, answer = await raw_exchange(controller, "GET /readyz HTTP/1.0\n\n")
    assert status == 200
    assert b'"ready"' in answer


async def test_allowed_host_setting_adds_a_name(tmp_path: Path) -> None:
    """An allowed_hosts name (--allowed-host) is served; other foreign names still get 421."""
    async with (
        banner_controller(tmp_path / "data", allowed_hosts=("cli.example.com",)) as running,
        browser(running) as client,
    ):
        ok = await client.get("/readyz", headers={"Host": "CLI.example.com:443"})
        assert ok.status_code == 200
        refused = await client.get("/readyz", headers={"Host": "evil.example"})
        assert refused.status_code == 421


def test_allowed_hosts_come_from_the_flag_or_the_environment() -> None:
    """`--allowed-host` and REMOTECLI_ALLOWED_HOSTS fill allowed_hosts; the flag wins."""
    environ = {"REMOTECLI_ALLOWED_HOSTS": "a.example, B.example"}
    from_env = load_controller_config({}, environ=environ)
    assert from_env.allowed_hosts == ("a.example", "b.example")
    from_flag = load_controller_config({"allowed_hosts": ("c.example",)}, environ=environ)
    assert from_flag.allowed_hosts == ("c.example",)


async def _gateway_cli(*args: str, env: dict[str, str] | None = None) -> tuple[Any, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "remotecli", "gateway", "--listen", "127.0.0.1:0",
        "--log-format", "json", *args,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert process.stderr is not None
    async with asyncio.timeout(20000 * MS):
        while True:
            line = await process.stderr.readline()
            if not line.startswith(b"{"):
                continue  # the warning that no --route was given
            record = json.loads(line)
            if record["event"] == "gateway listening":
                return process, int(record["address"].rsplit(":", 1)[1])


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("--allowed-host", "cli.example.com"), {}),
        ((), {"REMOTECLI_GATEWAY_ALLOWED_HOST": "other.example cli.example.com"}),
    ],
)
async def test_gateway_command_allowed_host(args: tuple[str, ...], env: dict[str, str]) -> None:
    """`remotecli gateway --allowed-host` (or its variable) adds a name; others get 421."""
    process, port = await _gateway_cli(*args, env=env)
    try:
        async with httpx.AsyncClient(timeout=5000 * MS) as client:
            url = f"http://127.0.0.1:{port}/x"
            allowed = await client.get(url, headers={"Host": "cli.example.com"})
            assert allowed.status_code == 404  # no route: the Host itself was accepted
            own = await client.get(url)
            assert own.status_code == 404
            refused = await client.get(url, headers={"Host": "evil.example"})
            assert refused.status_code == 421
            assert refused.json()["error"] == "misdirected_request"
    finally:
        process.terminate()
        await process.wait()


# --- API docs and third-party origins -------------------------------------------------------------


async def test_api_docs_are_off_and_pages_name_no_other_origin(controller: Controller) -> None:
    """/api/docs is 404, and the dashboard and login page reference no origin but our own."""
    mallory = user(controller, "mallory")
    own = controller.url()
    async with browser(controller) as client:
        assert (await client.get("/api/docs")).status_code == 404
        assert (await client.get("/api/redoc")).status_code == 404
        assert (await client.get("/api/openapi.json")).status_code == 200
        dashboard = await client.get("/dashboard/remote-cli")
        confirm = await client.get(
            "/login", params={"token": mallory}, headers={"Sec-Fetch-Site": "cross-site"}
        )
    assert dashboard.status_code == 200
    assert confirm.status_code == 200
    for page in (dashboard, confirm):
        assert foreign_origins(page.text, own) == []
        assert foreign_origins(page.headers["content-security-policy"], own) == []


# --- creation rate and fair share -----------------------------------------------------------------


async def test_creation_rate_limit_is_429_with_retry_after(tmp_path: Path) -> None:
    """Past its burst of creations a user gets 429 with Retry-After naming the limit; others not."""
    async with banner_controller(tmp_path / "data", create_rate=(3, 60.0)) as running:
        bob = user(running, "bob")
        async with browser(running) as client:
            for _ in range(3):
                created = await client.post(
                    "/api/sessions", json={"provider": "shell"}, headers=bearer(running.admin_token)
                )
                assert created.status_code == 201
                deleted = await client.delete(
                    f"/api/sessions/{created.json()['id']}", headers=bearer(running.admin_token)
                )
                assert deleted.status_code == 200
            limited = await client.post(
                "/api/sessions", json={"provider": "shell"}, headers=bearer(running.admin_token)
            )
            assert limited.status_code == 429
            assert 0 < int(limited.headers["retry-after"]) <= 20
            assert "3 per 1 min" in limited.json()["message"]
            other = await client.post(
                "/api/sessions", json={"provider": "shell"}, headers=bearer(bob)
            )
            assert other.status_code == 201


async def test_fair_share_leaves_room_for_newcomers(tmp_path: Path) -> None:
    """A fills its share, B fills a smaller one, the host still has room, and C can create."""
    settings: dict[str, Any] = {"max_sessions": 8, "max_sessions_per_user": 8, "create_rate": None}
    async with banner_controller(tmp_path / "data", **settings) as running:
        tokens = {name: user(running, name) for name in ("alice", "bob", "carol")}
        async with browser(running) as client:

            async def fill(name: str) -> tuple[int, dict[str, Any]]:
                created = 0
                while True:
                    response = await client.post(
                        "/api/sessions", json={"provider": "shell"}, headers=bearer(tokens[name])
                    )
                    if response.status_code != 201:
                        return created, {"status": response.status_code, **response.json()}
                    created += 1

            alice, refused = await fill("alice")
            assert alice == 4  # 8 // (0 others + 2)
            assert refused["status"] == 429
            assert "fair share" in refused["message"]
            bob, refused = await fill("bob")
            assert bob == 2  # 8 // (1 other + 2)
            assert refused["status"] == 429
            assert alice + bob < 8
            carol = await client.post(
                "/api/sessions", json={"provider": "shell"}, headers=bearer(tokens["carol"])
            )
            assert carol.status_code == 201
