"""Trespass on everyday operation: users removed or rotated, sign out, expiry, labels, metrics,
the data dir's lock, backups, restores and the clean-up, each tried from where an attacker sits.

Every test here is an attack the defence holds against. The controller runs whole, in-process
(gateway, API on its Unix socket, both viewer bridges) with the banner driver plus a stand-in
terminal; users are removed and re-tokened through a second store connection, as the
`remotecli user ...` commands do, so the running controller has to notice on its own. Backups,
restores and the clean-up run on real SQLite files and real directories.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from remotecli.auth import COOKIE_NAME, LoginRateLimiter, hash_token, new_token
from remotecli.config import ControllerConfig
from remotecli.controller.backup import STORE_FILE, back_up, restore
from remotecli.controller.datadir import LOCK_FILE, DataDirLock
from remotecli.controller.gc import SETTLE_SECONDS, run_gc
from remotecli.controller.server import (
    Controller,
    add_user_token,
    open_store,
    prepare_data_dir,
    save_admin_token,
)
from remotecli.controller.store import Store
from remotecli.exceptions import ConfigError, DriverError
from remotecli.sandbox import files
from remotecli.states import Event, State
from tests.banner_driver import BANNER, BannerDriver
from tests.conftest import MS
from tests.test_tty_bridge import TtyBannerDriver

TIMEOUT = 5_000 * MS
METRICS_TOKEN = "metrics-" + "k" * 24
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (another uid, mounts)")


# --- harness -------------------------------------------------------------------------------------


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """A whole controller on 127.0.0.1 port 0, with a metrics token and a metrics listener.

    Its failed-credential limit is raised: these tests send many wrong credentials on purpose
    and want each one's own answer, not 429.
    """
    config = ControllerConfig(
        listen=("127.0.0.1", 0),
        data_dir=tmp_path / "data",
        metrics_token=METRICS_TOKEN,
        metrics_listen=("127.0.0.1", 0),
    )
    running = Controller(config, driver=TtyBannerDriver(tmp_path))
    await running.start()
    assert running.identity is not None
    running.identity.limiter = LoginRateLimiter(max_failures=10_000)
    try:
        yield running
    finally:
        await running.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def web(controller: Controller, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    """A client of the controller's public address (the gateway), with ``headers`` on each call."""
    return httpx.AsyncClient(base_url=controller.url(), headers=headers, timeout=TIMEOUT)


def store_path(controller: Controller) -> Path:
    assert controller.store is not None
    return controller.store.path


def as_cli(controller: Controller, act: Callable[[Store], object]) -> None:
    """Do ``act`` on a second connection to the controller's store, as `remotecli user` does."""
    store = Store.open(store_path(controller))
    try:
        act(store)
    finally:
        store.close()


def state_of(controller: Controller, session_id: str) -> State:
    assert controller.store is not None
    return controller.store.session(session_id).state


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds (the store watch polls once a second)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(20 * MS)


async def ready_session(client: httpx.AsyncClient, label: str | None = None) -> str:
    """Create a shell session and return its id once its event stream says ready."""
    body: dict[str, str] = {"provider": "shell"}
    if label is not None:
        body["label"] = label
    created = await client.post("/api/sessions", json=body)
    assert created.status_code == 201, created.text
    session_id: str = created.json()["id"]
    async with client.stream("GET", f"/api/sessions/{session_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["state"] == "ready":
                return session_id
    raise AssertionError(f"session {session_id} never became ready")


async def browser_login(controller: Controller, token: str) -> str:
    """Sign in as a browser does from the address bar; return the ``Cookie`` header it gets."""
    async with web(controller) as client:
        answer = await client.get("/login", params={"token": token})
    assert answer.status_code == 303, answer.text
    pair = answer.headers["set-cookie"].split(";", 1)[0]
    assert pair.startswith(f"{COOKIE_NAME}=")
    return pair


async def ticket_for(controller: Controller, token: str, session_id: str) -> str:
    async with web(controller, bearer(token)) as client:
        answer = await client.post(f"/api/sessions/{session_id}/ticket")
    assert answer.status_code == 200, answer.text
    ticket: str = answer.json()["ticket"]
    return ticket


def ws_url(controller: Controller, path: str) -> str:
    host, port = controller.address
    return f"ws://{host}:{port}{path}"


async def upgrade_status(
    controller: Controller, path: str, *, origin: str | None = None, cookie: str | None = None
) -> int:
    """Open a WebSocket on ``path``; return the HTTP status it was refused with, 101 if opened."""
    headers = {"Cookie": cookie} if cookie else {}
    try:
        async with connect(
            ws_url(controller, path),
            origin=origin,  # type: ignore[arg-type]
            additional_headers=headers,
            open_timeout=TIMEOUT,
        ):
            return 101
    except InvalidStatus as refused:
        status: int = refused.response.status_code
        return status


async def closed(ws: ClientConnection) -> tuple[int | None, str]:
    """Wait for ``ws`` to be closed by the server; return its close code and reason."""
    async with asyncio.timeout(TIMEOUT):
        await ws.wait_closed()
    return ws.close_code, ws.close_reason or ""


def viewer_paths(session_id: str) -> tuple[str, ...]:
    return (
        f"/api/sessions/{session_id}/vnc",
        f"/api/auth/session/{session_id}/novnc/websock",
        f"/api/sessions/{session_id}/tty",
    )


# --- a removed user ------------------------------------------------------------------------------


async def test_a_removed_users_token_cookie_and_unspent_ticket_open_nothing(
    controller: Controller,
) -> None:
    """Attack: a user removed with `remotecli user remove` (from another process) keeps using the
    bearer token, the browser login and a WebSocket ticket fetched just before; from the user's
    own scripts and browser. Every one is refused and the session is ended as user-removed."""
    assert controller.store is not None
    bob = add_user_token(controller.store, "bob")
    cookie = await browser_login(controller, bob)
    async with web(controller, bearer(bob)) as client:
        session_id = await ready_session(client)
    ticket = await ticket_for(controller, bob, session_id)

    as_cli(controller, lambda store: store.remove_user("bob", time.time()))
    await until(lambda: state_of(controller, session_id) is State.STOPPED, "bob's session to end")

    assert controller.store.session(session_id).end_cause == "user-removed"
    async with web(controller) as client:
        for headers in (bearer(bob), {"Cookie": cookie}):
            assert (await client.get("/api/me", headers=headers)).status_code == 401
            assert (await client.get("/api/sessions", headers=headers)).status_code == 401
            again = await client.post(f"/api/sessions/{session_id}/ticket", headers=headers)
            assert again.status_code == 401
        login = await client.get("/login", params={"token": bob})
        assert login.status_code == 401
        assert "set-cookie" not in login.headers
    for path in viewer_paths(session_id):
        refused = await upgrade_status(controller, path, origin=controller.url(), cookie=cookie)
        assert refused == 401, path
    spent = await upgrade_status(controller, f"/api/sessions/{session_id}/vnc?ticket={ticket}")
    assert spent == 409  # the ticket names bob, but bob's session is over


async def test_a_removed_users_open_viewers_and_event_stream_are_ended(
    controller: Controller,
) -> None:
    """Attack: a user about to be removed holds open a desktop WebSocket, a text WebSocket and
    the events stream, hoping they outlive the removal; from the user's browser. All three end
    within seconds: both views close 1000, the stream says stopped and ends."""
    assert controller.store is not None
    bob = add_user_token(controller.store, "bob")
    async with web(controller, bearer(bob)) as client:
        session_id = await ready_session(client)
        desktop_ticket = await ticket_for(controller, bob, session_id)
        text_ticket = await ticket_for(controller, bob, session_id)
        states: list[str] = []

        async def follow() -> None:
            async with client.stream("GET", f"/api/sessions/{session_id}/events") as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: "):
                        states.append(json.loads(line[6:])["state"])

        async with (
            connect(
                ws_url(controller, f"/api/sessions/{session_id}/vnc?ticket={desktop_ticket}"),
                subprotocols=[Subprotocol("binary")],
            ) as desktop,
            connect(
                ws_url(controller, f"/api/sessions/{session_id}/tty?ticket={text_ticket}"),
                subprotocols=[Subprotocol("tty")],
            ) as text,
        ):
            assert await asyncio.wait_for(desktop.recv(), TIMEOUT) == BANNER
            follower = asyncio.create_task(follow())
            await until(lambda: states == ["ready"], "the events stream to start")
            as_cli(controller, lambda store: store.remove_user("bob", time.time()))
            assert await closed(desktop) == (1000, "session stopped")
            assert await closed(text) == (1000, "session stopped")
            await asyncio.wait_for(follower, TIMEOUT)
    assert states[-1] == "stopped"
    assert controller.manager is not None
    assert controller.manager.viewers(session_id) == 0


async def test_a_re_added_name_inherits_no_token_login_or_kept_sign_in(
    controller: Controller,
) -> None:
    """Attack: after bob is removed, the name bob is given again (to a new person, or to the
    old bob re-invited); from the old bob's saved token and browser, and from the new bob's
    account looking for the old one's kept sign-ins. The old token and login stay dead, the
    new bob has no kept sign-in, and the old session is not the new bob's (404, as unknown)."""
    assert controller.store is not None
    old = add_user_token(controller.store, "bob")
    cookie = await browser_login(controller, old)
    async with web(controller, bearer(old)) as client:
        session_id = await ready_session(client)
    controller.store.save_signin("bob", "shell", None, ("k1", b"n" * 12, b"sealed"), time.time())

    as_cli(controller, lambda store: store.remove_user("bob", time.time()))
    await until(lambda: state_of(controller, session_id) is State.STOPPED, "bob's session to end")
    fresh: list[str] = []
    as_cli(controller, lambda store: fresh.append(add_user_token(store, "bob")))

    async with web(controller) as client:
        assert (await client.get("/api/me", headers=bearer(old))).status_code == 401
        assert (await client.get("/api/me", headers={"Cookie": cookie})).status_code == 401
        me = await client.get("/api/me", headers=bearer(fresh[0]))
        assert me.json() == {"name": "bob", "signed_in_with": "token"}
        providers = (await client.get("/api/providers", headers=bearer(fresh[0]))).json()
        assert [p["name"] for p in providers if p["connected"]] == []
        reopen = await client.post(f"/api/sessions/{session_id}/ticket", headers=bearer(fresh[0]))
        assert reopen.status_code == 404
        listed = (await client.get("/api/sessions", headers=bearer(fresh[0]))).json()
        assert listed == []
    assert controller.store.signins("bob") == []


# --- sign out, rotation and expiry ---------------------------------------------------------------


async def test_a_signed_out_cookie_works_nowhere(controller: Controller) -> None:
    """Attack: someone copied the admin's login cookie before the admin pressed Sign out, and
    replays it on the API, a WebSocket upgrade with the right Origin, /metrics, /readyz and the
    /login confirmation page (to learn who is signed in); from another machine. All refuse or
    say nothing, and signing out again is harmless."""
    assert controller.store is not None
    cookie = await browser_login(controller, controller.admin_token)
    async with web(controller, bearer(controller.admin_token)) as admin:
        session_id = await ready_session(admin)
    async with web(controller) as client:
        assert (await client.get("/api/me", headers={"Cookie": cookie})).status_code == 200
        out = await client.post("/api/logout", headers={"Cookie": cookie})
        assert out.status_code == 204
        assert 'remotecli_login=""' in out.headers["set-cookie"]
        assert "max-age=0" in out.headers["set-cookie"].lower()

        stolen = {"Cookie": cookie}
        assert (await client.get("/api/me", headers=stolen)).status_code == 401
        assert (await client.get("/api/sessions", headers=stolen)).status_code == 401
        assert (await client.get("/metrics", headers=stolen)).status_code == 401
        assert (await client.get("/readyz", headers=stolen)).json() == {"status": "ready"}
        bob = add_user_token(controller.store, "bob")
        page = await client.get(
            "/login",
            params={"token": bob},
            headers={**stolen, "Sec-Fetch-Site": "cross-site"},
        )
        assert page.status_code == 200
        assert "sent no valid login" in page.text
        assert "signed in here as" not in page.text
        assert (await client.post("/api/logout", headers=stolen)).status_code == 204
    for path in viewer_paths(session_id):
        status = await upgrade_status(controller, path, origin=controller.url(), cookie=cookie)
        assert status == 401, path


async def test_login_secrets_tokens_and_the_metrics_token_do_not_stand_in_for_each_other(
    controller: Controller,
) -> None:
    """Attack: with one kind of secret in hand (a stolen cookie, a leaked token, the scraper's
    metrics token), present it as another kind; from a script. A login secret is no bearer token
    and no login URL, a token is no cookie, the metrics token opens only /metrics."""
    cookie = await browser_login(controller, controller.admin_token)
    secret = cookie.split("=", 1)[1]
    admin = controller.admin_token
    async with web(controller) as client:
        assert (await client.get("/api/me", headers=bearer(secret))).status_code == 401
        assert (await client.get("/login", params={"token": secret})).status_code == 401
        as_cookie = {"Cookie": f"{COOKIE_NAME}={admin}"}
        assert (await client.get("/api/me", headers=as_cookie)).status_code == 401
        assert (await client.get("/metrics", headers=as_cookie)).status_code == 401
        assert (await client.get("/api/me", headers=bearer(METRICS_TOKEN))).status_code == 401
        assert (await client.get("/login", params={"token": METRICS_TOKEN})).status_code == 401
        scraper_cookie = {"Cookie": f"{COOKIE_NAME}={METRICS_TOKEN}"}
        assert (await client.get("/metrics", headers=scraper_cookie)).status_code == 401
        assert (await client.get("/metrics", headers=bearer(METRICS_TOKEN))).status_code == 200


async def test_user_token_revokes_the_old_token_and_every_browser_of_the_user(
    controller: Controller,
) -> None:
    """Attack: after `remotecli user token bob` (bob's token leaked), the leaker keeps the old
    token and the two browser logins made with it; from the leaker's scripts and browsers.
    Token and both logins are refused on the API, /login and the WebSocket cookie path; only
    the new token works."""
    assert controller.store is not None
    old = add_user_token(controller.store, "bob")
    cookies = [await browser_login(controller, old), await browser_login(controller, old)]
    async with web(controller, bearer(old)) as client:
        session_id = await ready_session(client)
    fresh: list[str] = []
    as_cli(controller, lambda store: fresh.append(add_user_token(store, "bob", replace=True)))

    async with web(controller) as client:
        assert (await client.get("/api/me", headers=bearer(old))).status_code == 401
        relogin = await client.get("/login", params={"token": old})
        assert (relogin.status_code, "set-cookie" in relogin.headers) == (401, False)
        ticket = await client.post(f"/api/sessions/{session_id}/ticket", headers=bearer(old))
        assert ticket.status_code == 401
        for cookie in cookies:
            assert (await client.get("/api/me", headers={"Cookie": cookie})).status_code == 401
        assert (await client.get("/api/me", headers=bearer(fresh[0]))).status_code == 200
    for cookie in cookies:
        status = await upgrade_status(
            controller,
            f"/api/sessions/{session_id}/vnc",
            origin=controller.url(),
            cookie=cookie,
        )
        assert status == 401
    assert state_of(controller, session_id) is State.READY  # rotation ends logins, not work


async def test_an_expired_token_opens_no_path(controller: Controller) -> None:
    """Attack: a contractor's token made with --expires is used after it ran out, on the API,
    the login URL, the confirmation form's POST /login and the ticket endpoint; from the
    contractor's scripts and browser. Each answers 401 and no cookie is ever set."""
    assert controller.store is not None
    token = new_token()
    controller.store.add_token("carol", hash_token(token), time.time(), expires_at=time.time())
    async with web(controller) as client:
        assert (await client.get("/api/me", headers=bearer(token))).status_code == 401
        assert (await client.post("/api/sessions", headers=bearer(token))).status_code == 401
        for answer in (
            await client.get("/login", params={"token": token}),
            await client.post(
                "/login",
                content=f"token={token}",
                headers={
                    "Origin": controller.url(),
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            ),
        ):
            assert answer.status_code == 401
            assert "set-cookie" not in answer.headers


# --- session labels ------------------------------------------------------------------------------


async def test_markup_in_a_label_is_kept_as_text_and_served_only_as_json(
    controller: Controller,
) -> None:
    """Attack: store a script in a session label, hoping a page renders it as HTML; from a
    user's script. The label comes back byte for byte inside JSON, never as HTML."""
    payloads = ('<script>alert("x")</script>', '"><img src=x onerror=alert(1)>', "{{7*7}}")
    async with web(controller, bearer(controller.admin_token)) as client:
        session_id = await ready_session(client, label=payloads[0])
        for payload in payloads:
            renamed = await client.patch(f"/api/sessions/{session_id}", json={"label": payload})
            assert renamed.status_code == 200
            shown = await client.get(f"/api/sessions/{session_id}")
            assert shown.headers["content-type"] == "application/json"
            assert shown.json()["label"] == payload
            listed = await client.get("/api/sessions")
            assert listed.headers["content-type"] == "application/json"


DISGUISES = (
    "\u202egpj.exe",  # right-to-left override
    "a\u2066b\u2069",  # isolates
    "zero\u200bwidth",  # zero-width space
    "join\u200dme",  # zero-width joiner
    "\ufeffbom",  # byte-order mark
    "soft\u00adhyphen",
    "arabic\u061cmark",
    "tag\U000e0041char",
    "next\u0085line",  # C1 control
    "line\u2028sep",
    "para\u2029sep",
    "tab\there",
    "nul\x00byte",
    "\x1b]0;title\x07",
    "private\ue000use",
    "lone\ud800surrogate",
)


async def test_labels_that_disguise_themselves_are_refused(controller: Controller) -> None:
    """Attack: name a session with direction overrides, zero-width, format, separator, control,
    private-use or lone surrogate characters so a list shows something else; from a user's
    script, at create and by PATCH. Every one is 422 and nothing is created or renamed."""
    async with web(controller, bearer(controller.admin_token)) as client:
        session_id = await ready_session(client, label="honest")
        for label in DISGUISES:
            body = json.dumps({"label": label}).encode()  # escaped: a lone surrogate survives
            patched = await client.patch(
                f"/api/sessions/{session_id}",
                content=body,
                headers={"Content-Type": "application/json"},
            )
            assert patched.status_code == 422, repr(label)
            created = await client.post(
                "/api/sessions",
                content=json.dumps({"provider": "shell", "label": label}).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert created.status_code == 422, repr(label)
        listed = (await client.get("/api/sessions")).json()
    assert [(s["id"], s["label"]) for s in listed] == [(session_id, "honest")]


async def test_oversized_labels_are_refused_and_the_controller_keeps_serving(
    controller: Controller,
) -> None:
    """Attack: send labels of 65 characters, 257 characters and 10 MB, at create and by PATCH,
    to bloat the store or the dashboard; from a user's script. All are 422 and nothing changed."""
    async with web(controller, bearer(controller.admin_token)) as client:
        session_id = await ready_session(client, label="short")
        for size in (65, 257, 10 * 1024 * 1024):
            label = "x" * size
            patched = await client.patch(f"/api/sessions/{session_id}", json={"label": label})
            assert patched.status_code == 422, size
            created = await client.post("/api/sessions", json={"provider": "shell", "label": label})
            assert created.status_code == 422, size
        listed = (await client.get("/api/sessions")).json()
    assert [(s["id"], s["label"]) for s in listed] == [(session_id, "short")]
    assert controller.store is not None
    assert len(controller.store.sessions()) == 1


async def test_labels_cannot_touch_someone_elses_session_or_smuggle_fields(
    controller: Controller,
) -> None:
    """Attack: rename the admin's session, or create or rename one while smuggling owner, id or
    state fields; from another user's script. Someone else's session is 404 like a missing one,
    extra fields are 422, and the admin's session keeps its label and owner."""
    assert controller.store is not None
    mallory = add_user_token(controller.store, "mallory")
    async with web(controller, bearer(controller.admin_token)) as admin:
        session_id = await ready_session(admin, label="admin's work")
    async with web(controller, bearer(mallory)) as client:
        foreign = await client.patch(f"/api/sessions/{session_id}", json={"label": "pwned"})
        missing = await client.patch("/api/sessions/AAAAAAAAAAAAAAAA", json={"label": "pwned"})
        assert (foreign.status_code, missing.status_code) == (404, 404)
        assert foreign.json()["error"] == missing.json()["error"] == "not_found"
        assert "admin" not in foreign.text
        for extra in ({"owner": "admin"}, {"id": session_id}, {"state": "ready"}):
            smuggled = await client.post(
                "/api/sessions", json={"provider": "shell", "label": "x", **extra}
            )
            assert smuggled.status_code == 422, extra
        own = await client.patch(
            f"/api/sessions/{session_id}", json={"label": "x", "owner": "mallory"}
        )
        assert own.status_code == 422  # refused before ownership is even looked at
        assert (await client.get("/api/sessions")).json() == []
    record = controller.store.session(session_id)
    assert (record.owner, record.label) == ("admin", "admin's work")


# --- /metrics and /readyz ------------------------------------------------------------------------


async def raw_get(controller: Controller, target: str, headers: str = "") -> tuple[int, bytes]:
    """Send one GET with ``target`` as written (no client normalises it); return status, body."""
    host, port = controller.address
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = f"GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n"
        writer.write(head.encode("latin-1"))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def test_path_host_and_header_tricks_read_no_metrics(controller: Controller) -> None:
    """Attack: read /metrics or /readyz's details without the metrics token through the public
    gateway, by spelling the path otherwise (//, trailing /, case, %-encoding, dot segments,
    ;params), by another Host, or by forged forwarding headers; from the network. None of them
    yields a metric or a detail."""
    host, port = controller.address
    own = f"Host: {host}:{port}\r\n"
    targets = (
        "/metrics",
        "//metrics",
        "/metrics/",
        "/METRICS",
        "/%2Fmetrics",
        "/%6detrics",
        "/./metrics",
        "/api/../metrics",
        "/metrics;x=1",
        "/metrics%00",
        "/metrics?format=text",
        "/dashboard/../metrics",
        "http://127.0.0.1/metrics",
        "*",
    )
    forged = (
        own,
        "Host: evil.example\r\n",
        f"Host: localhost:{port}\r\n",
        f"{own}X-Forwarded-For: 127.0.0.1\r\nX-Real-IP: 127.0.0.1\r\n",
        f"{own}X-Forwarded-Host: 127.0.0.1:9100\r\nForwarded: for=127.0.0.1\r\n",
        f"{own}Authorization: Basic {METRICS_TOKEN}\r\n",
        f"{own}Authorization: Bearer {METRICS_TOKEN[:-1]}\r\n",
        f"{own}Authorization: Bearer {METRICS_TOKEN}x\r\n",
        f"{own}Authorization: Bearer \xff\xfe{METRICS_TOKEN}\r\n",
    )
    for target in targets:
        for headers in forged:
            status, body = await raw_get(controller, target, headers)
            assert status != 200 or b"remotecli_" not in body, (target, headers)
            assert status < 500, (target, headers, body)
    for target in ("/readyz", "//readyz", "/readyz/", "/READYZ", "/readyz?details=1"):
        for headers in forged:
            status, body = await raw_get(controller, target, headers)
            assert b"active_sessions" not in body, (target, headers)
            assert b"sandbox" not in body, (target, headers)


async def test_a_user_who_is_not_the_admin_reads_no_metrics(controller: Controller) -> None:
    """Attack: an ordinary user scrapes /metrics and /readyz's details with their own token or
    browser login, to learn how busy the host is and how it isolates sessions; from their
    script and browser. /metrics is 401 and /readyz says only ready."""
    assert controller.store is not None
    bob = add_user_token(controller.store, "bob")
    cookie = await browser_login(controller, bob)
    async with web(controller) as client:
        for headers in (bearer(bob), {"Cookie": cookie}):
            assert (await client.get("/metrics", headers=headers)).status_code == 401
            assert (await client.get("/readyz", headers=headers)).json() == {"status": "ready"}
        operator = await client.get("/readyz", headers=bearer(METRICS_TOKEN))
        assert "active_sessions" in operator.json()  # the details exist: they were withheld


async def test_the_metrics_token_is_compared_in_constant_time(
    controller: Controller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack: guess the metrics token byte by byte from how long a wrong one takes to refuse;
    from the network. The comparison is hmac.compare_digest over the whole token."""
    seen: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        seen.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    guess = METRICS_TOKEN[:-1] + "?"  # right but for its last byte
    async with web(controller) as client:
        assert (await client.get("/metrics", headers=bearer(guess))).status_code == 401
    assert (guess.encode(), METRICS_TOKEN.encode()) in seen


async def test_the_metrics_listener_serves_operations_and_nothing_else(
    controller: Controller,
) -> None:
    """Attack: use the metrics listener, which trusts everyone who reaches it, as a back door
    to the API, the login URL, the OpenAPI document or the dashboard; from whoever can reach
    its address. Everything but /healthz, /readyz and /metrics is 404, credentials or not."""
    address = controller.metrics_address
    assert address is not None
    admin = bearer(controller.admin_token)
    async with httpx.AsyncClient(
        base_url=f"http://{address[0]}:{address[1]}", timeout=TIMEOUT
    ) as private:
        for method, path in (
            ("GET", "/api/me"),
            ("GET", "/api/sessions"),
            ("POST", "/api/sessions"),
            ("GET", f"/login?token={controller.admin_token}"),
            ("POST", "/api/logout"),
            ("GET", "/api/openapi.json"),
            ("GET", "/dashboard/remote-cli"),
            ("GET", "/"),
        ):
            answer = await private.request(method, path, headers=admin)
            assert answer.status_code in (404, 405), (method, path, answer.status_code)
            assert "set-cookie" not in answer.headers


# --- the data dir's lock -------------------------------------------------------------------------


@needs_root
def test_another_local_user_cannot_open_the_lock_to_hold_it() -> None:
    """Attack: another local account opens DATA_DIR/controller.lock and holds its flock, so no
    remote-cli can ever start on that data dir; from a shell as uid 65534 on the host, with the
    data dir traversable and the operator's umask 000. The lock is made 0600: the open fails."""
    top = Path(tempfile.mkdtemp(prefix="remotecli-lock-"))
    try:
        data = top / "data"
        data.mkdir()
        os.chmod(top, 0o755)  # noqa: S103 (the attack needs a traversable data dir)
        os.chmod(data, 0o755)  # noqa: S103 (an operator's own mkdir, say)
        previous = os.umask(0)
        try:
            lock = DataDirLock.serve(data)
        finally:
            os.umask(previous)
        try:
            assert stat.S_IMODE((data / LOCK_FILE).stat().st_mode) == 0o600
            probe = subprocess.run(
                ["flock", "--exclusive", "--nonblock", str(data / LOCK_FILE), "true"],
                user=65534,
                group=65534,
                capture_output=True,
                text=True,
                timeout=TIMEOUT * 4,
                check=False,
            )
            assert probe.returncode != 0
            assert "Permission denied" in probe.stderr, probe.stderr
        finally:
            lock.release()
    finally:
        subprocess.run(["rm", "-rf", "--", str(top)], check=True)


# --- backup and restore --------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A stopped controller's data dir: a store with admin and bob, and admin.token."""
    data = tmp_path / "data"
    store = open_store(data)
    try:
        add_user_token(store, "admin")
        add_user_token(store, "bob")
    finally:
        store.close()
    save_admin_token(data, "admin-token-for-the-test")
    return data


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_a_backup_never_lands_behind_a_planted_link(tmp_path: Path, data_dir: Path) -> None:
    """Attack: plant a symbolic link where the operator will write the backup (to a directory
    the attacker reads, or dangling into one), so the store and admin token land there; from a
    local account that can write the backup's parent. The backup is refused, nothing is written
    through the link."""
    loot = tmp_path / "attacker-reads-this"
    loot.mkdir(mode=0o777)
    to_dir = tmp_path / "backup-1"
    to_dir.symlink_to(loot)
    dangling = tmp_path / "backup-2"
    dangling.symlink_to(loot / "new")
    for target in (to_dir, dangling):
        with pytest.raises(ConfigError, match="exists"):
            back_up(data_dir, target)
    assert list(loot.iterdir()) == []


def test_a_backup_is_private_even_under_umask_000(tmp_path: Path, data_dir: Path) -> None:
    """Attack: read the token hashes and the admin token from a fresh backup, relying on the
    operator's permissive umask; from another local account. The directory is 0700 and every
    file in it 0600, whatever the umask."""
    target = tmp_path / "backup"
    previous = os.umask(0)
    try:
        report = back_up(data_dir, target)
    finally:
        os.umask(previous)
    assert set(report.files) == {STORE_FILE, "admin.token"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in target.iterdir()}
    assert set(modes) >= set(report.files)
    assert set(modes.values()) == {0o600}, modes


def crafted_backup(tmp_path: Path, make: Callable[[Path], None]) -> Path:
    source = tmp_path / "crafted"
    source.mkdir()
    make(source / STORE_FILE)
    (source / "admin.token").write_text("attacker-chosen-admin-token\n")
    return source


def _future_store(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT PRIMARY KEY, created_at REAL NOT NULL)")
        db.execute("PRAGMA user_version = 2147483647")


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00 but not really" + os.urandom(512))


def _not_ours(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE something_else (x)")


@pytest.mark.parametrize("make", [_future_store, _not_sqlite, _not_ours])
def test_restore_refuses_a_crafted_store_and_touches_nothing(
    tmp_path: Path, data_dir: Path, make: Callable[[Path], None]
) -> None:
    """Attack: hand the operator a "backup" whose store claims a huge schema version, is not
    SQLite, or is someone else's database, with an admin.token of the attacker's choosing;
    from whoever can write into the backup store. Restore refuses before moving anything."""
    before = snapshot(data_dir)
    with pytest.raises(ConfigError):
        restore(crafted_backup(tmp_path, make), data_dir)
    assert snapshot(data_dir) == before
    assert not [p for p in data_dir.iterdir() if p.name.endswith(".before-restore")]


def test_restore_is_refused_while_remote_cli_serves_the_data_dir(
    tmp_path: Path, data_dir: Path
) -> None:
    """Attack: swap the store of a running remote-cli under it with `remotecli restore`, so its
    open connection and the new file disagree; from an operator's script racing the service.
    The data dir's lock refuses, and nothing moves."""
    good = tmp_path / "good-backup"
    back_up(data_dir, good)
    before = snapshot(data_dir)
    held = DataDirLock.serve(data_dir)
    try:
        with pytest.raises(ConfigError, match="is using the data dir"):
            restore(good, data_dir)
    finally:
        held.release()
    assert {k: v for k, v in snapshot(data_dir).items() if k != LOCK_FILE} == {
        k: v for k, v in before.items() if k != LOCK_FILE
    }


# --- the clean-up --------------------------------------------------------------------------------


def ended_session(store: Store, session_id: str) -> None:
    store.create_session(session_id, "admin", "shell", 1.0)
    store.apply(session_id, Event.STOP, 2.0)
    store.apply(session_id, Event.STOPPED, 3.0)


def clean_up(data_dir: Path, store: Store, tmp_path: Path) -> None:
    """One clean-up round as if two hours had passed (every leftover is past its settling)."""
    config = ControllerConfig(data_dir=data_dir)
    report = run_gc(
        config, store, now=time.time() + 2 * SETTLE_SECONDS, image_cache=tmp_path / "images"
    )
    assert report.failures == [], report.failures


def test_the_clean_up_follows_no_link_a_hostile_session_left(
    tmp_path: Path, data_dir: Path
) -> None:
    """Attack: an ended session leaves in its directory a hard link to a host file, a FIFO
    (to hang a reader), links to a host directory and file, and HOME as a link to a host
    directory; a session directory that is itself a link sits beside it; from inside the
    session. The clean-up removes the links and leaves every host file and directory as it was."""
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "passwd").write_text("root:x:0:0\n")
    (host / "secret").write_bytes(b"s" * 4096)
    (host / "home").mkdir()
    (host / "home" / "notes").write_text("keep me\n")
    session = data_dir / "sessions" / "evil"
    session.mkdir(parents=True)
    os.link(host / "secret", session / "hard")
    os.mkfifo(session / "pipe")
    (session / "etc").symlink_to(host / "etc")
    (session / "passwd").symlink_to(host / "etc" / "passwd")
    (session / "home").symlink_to(host / "home")
    (data_dir / "sessions" / "linked").symlink_to(host)
    before = {p: p.read_bytes() for p in host.rglob("*") if p.is_file()}

    store = Store.open(data_dir / STORE_FILE)
    try:
        ended_session(store, "evil")
        clean_up(data_dir, store, tmp_path)
    finally:
        store.close()
    assert not os.path.lexists(session)
    assert not os.path.lexists(data_dir / "sessions" / "linked")
    assert {p: p.read_bytes() for p in host.rglob("*") if p.is_file()} == before


@needs_root
def test_the_clean_up_detaches_no_host_mount_through_a_home_link(
    tmp_path: Path, data_dir: Path
) -> None:
    """Attack: an ended session turns its HOME into a link to a mount point of the host, so that
    the clean-up's "unmount HOME first" detaches the host's file system; from inside the
    session. The host's mount stays mounted with its files."""
    mounted = tmp_path / "host-mount"
    mounted.mkdir()
    try:
        files.mount_tmpfs(mounted, 1024**2, 0, 0, inodes=64)
    except DriverError as exc:
        pytest.skip(f"this test needs a real tmpfs mount: {exc.message}")
    try:
        (mounted / "data").write_text("on the host's mount\n")
        session = data_dir / "sessions" / "evil"
        session.mkdir(parents=True)
        (session / "home").symlink_to(mounted)
        store = Store.open(data_dir / STORE_FILE)
        try:
            ended_session(store, "evil")
            clean_up(data_dir, store, tmp_path)
        finally:
            store.close()
        assert not os.path.lexists(session)
        assert os.path.ismount(mounted)
        assert (mounted / "data").read_text() == "on the host's mount\n"
    finally:
        files.unmount(mounted)


# --- regressions of what this review found -------------------------------------------------------


async def test_removing_and_re_adding_a_name_at_once_still_ends_the_old_sessions(
    controller: Controller,
) -> None:
    """Attack: `user remove bob` then `user add bob` before the controller looks (it polls every
    second), hoping the old bob's live session survives for whoever now holds the name. The
    session still ends as removed, and the new bob never sees it."""
    assert controller.store is not None
    old = add_user_token(controller.store, "bob")
    async with web(controller, bearer(old)) as client:
        session_id = await ready_session(client)
    fresh: list[str] = []

    def remove_and_add(store: Store) -> None:
        store.remove_user("bob", time.time())
        fresh.append(add_user_token(store, "bob"))

    as_cli(controller, remove_and_add)
    async with web(controller, bearer(fresh[0])) as client:
        assert (await client.get(f"/api/sessions/{session_id}")).status_code == 404
        await until(lambda: state_of(controller, session_id) is State.STOPPED, "it to end")
        assert (await client.get("/api/sessions")).json() == []
    record = controller.store.session(session_id)
    assert record.end_cause == "user-removed"


async def test_a_browser_login_ends_when_its_token_expires(controller: Controller) -> None:
    """Attack: sign in once with a token made to expire (`user add --expires 1h`) and keep the
    cookie past the expiry. The login ends with the token (asked of the store at that time, so
    no test waits for a clock)."""
    assert controller.store is not None
    expires_at = time.time() + 60.0
    token = add_user_token(controller.store, "temp", expires_at=expires_at)
    cookie = await browser_login(controller, token)
    async with web(controller) as client:
        assert (await client.get("/api/me", headers={"Cookie": cookie})).status_code == 200
    login = hash_token(cookie.split("=", 1)[1])
    assert controller.store.user_for_login(login, expires_at - 1.0) == "temp"
    assert controller.store.user_for_login(login, expires_at) is None


async def test_a_new_admin_token_signs_out_the_old_ones_browsers(tmp_path: Path) -> None:
    """Attack: a thief signed in once with a leaked admin token; the operator changes
    REMOTECLI_TOKEN and restarts. The thief's browser login no longer works."""
    data = tmp_path / "data"
    first = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data, admin_token="A" * 20),
        driver=BannerDriver(),
    )
    await first.start()
    try:
        cookie = await browser_login(first, "A" * 20)
    finally:
        await first.close()
    second = Controller(
        ControllerConfig(listen=("127.0.0.1", 0), data_dir=data, admin_token="B" * 20),
        driver=BannerDriver(),
    )
    await second.start()
    try:
        async with web(second) as client:
            assert (await client.get("/api/me", headers={"Cookie": cookie})).status_code == 401
            assert (await client.get("/metrics", headers={"Cookie": cookie})).status_code == 401
    finally:
        await second.close()


def test_planted_links_in_the_data_dir_are_never_written_through(tmp_path: Path) -> None:
    """Attack: with a way to plant links in the data dir, point controller.lock and
    admin.token.tmp at a file elsewhere, hoping the controller truncates or overwrites it; and
    hand the controller a data dir others may write. Nothing is written through a link, and
    the loose data dir is refused."""

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "controller.lock").symlink_to(victim)
    with pytest.raises(ConfigError):
        DataDirLock.serve(data)
    (data / "admin.token.tmp").symlink_to(victim)
    save_admin_token(data, "new-token")
    assert victim.read_text() == "precious\n"
    assert not (data / "admin.token").is_symlink()
    assert (data / "admin.token").read_text() == "new-token\n"
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by no one else"):
        prepare_data_dir(loose)


def test_restore_refuses_a_negative_schema_version(tmp_path: Path) -> None:
    """Attack: a crafted backup whose store says schema version -1 (which would run the last
    migration first). Restore refuses it and opening such a store names the cause."""

    crafted = tmp_path / "crafted"
    crafted.mkdir()
    connection = sqlite3.connect(crafted / "remotecli.sqlite3")
    connection.execute("CREATE TABLE users (name TEXT)")
    connection.execute("PRAGMA user_version = -1")
    connection.commit()
    connection.close()
    with pytest.raises(ConfigError, match="not a remote-cli store"):
        restore(crafted, tmp_path / "data")
    with pytest.raises(ConfigError, match="not a remote-cli store"):
        Store.open(crafted / "remotecli.sqlite3")
