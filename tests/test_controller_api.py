"""The controller's HTTP API on a real uvicorn server over a Unix socket, with a banner driver.

Sessions run on :class:`tests.banner_driver.BannerDriver` (real TCP servers speaking an RFB
banner); the local driver and the VNC bridge are exercised end to end in ``tests/e2e/``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
import uvicorn

from remotecli.auth import COOKIE_NAME, LoginRateLimiter, TicketBook, hash_token
from remotecli.config import ControllerConfig
from remotecli.controller.app import create_app
from remotecli.controller.identity import Identity
from remotecli.controller.sessions import SessionManager
from remotecli.controller.signins import SecretKey, SignIns, new_key_material
from remotecli.controller.store import Store
from remotecli.controller.viewers import ViewerAccess
from remotecli.exceptions import Conflict, Forbidden, NotAuthenticated, NotFound
from remotecli.providers import Catalogue
from remotecli.states import State
from tests.banner_driver import BannerDriver
from tests.conftest import MS

ADMIN_TOKEN = "admin-token-0123456789abcdef"
BOB_TOKEN = "bob-token-0123456789abcdef"
HOST = "127.0.0.1:8080"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the event loop until ``condition`` holds (bounded by a timeout)."""
    async with asyncio.timeout(5000 * MS):
        while not condition():
            await asyncio.sleep(0.001)


@dataclass
class Harness:
    config: ControllerConfig
    store: Store
    driver: BannerDriver
    manager: SessionManager
    client: httpx.AsyncClient
    ticket_clock: FakeClock
    socket_path: Path
    viewers: ViewerAccess
    signins: SignIns

    def auth(self, token: str = ADMIN_TOKEN) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def login_cookie(self, token: str = ADMIN_TOKEN) -> str:
        """Sign in with ``token`` through GET /login; return the Cookie header it earns."""
        response = await self.client.get("/login", params={"token": token})
        assert response.status_code == 303, response.text
        value = response.headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
        self.client.cookies.clear()  # the caller sends it by hand, where it wants
        return f"{COOKIE_NAME}={value}"

    async def create(self, provider: str = "shell", token: str = ADMIN_TOKEN) -> dict[str, Any]:
        response = await self.client.post(
            "/api/sessions", json={"provider": provider}, headers=self.auth(token)
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def events(self, session_id: str, token: str = ADMIN_TOKEN) -> list[dict[str, Any]]:
        """Read the SSE stream to its end (a final state) and return its events."""
        events: list[dict[str, Any]] = []
        kind = ""
        async with self.client.stream(
            "GET", f"/api/sessions/{session_id}/events", headers=self.auth(token)
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append({"event": kind, **json.loads(line.removeprefix("data: "))})
        return events

    async def wait_state(self, session_id: str, state: State) -> None:
        """Follow the SSE stream until the session is in ``state``."""
        kind = ""
        async with self.client.stream(
            "GET", f"/api/sessions/{session_id}/events", headers=self.auth()
        ) as response:
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif (
                    line.startswith("data: ")
                    and kind == "state"
                    and json.loads(line.removeprefix("data: "))["state"] == state.value
                ):
                    return
        raise AssertionError(f"the stream ended before {session_id} was {state.value}")


async def start_harness(
    tmp_path: Path, config: ControllerConfig, driver: BannerDriver, catalogue: Catalogue
) -> AsyncIterator[Harness]:
    store = Store.open(tmp_path / "store.sqlite3")
    store.replace_tokens("admin", hash_token(ADMIN_TOKEN), 1.0)
    store.add_token("bob", hash_token(BOB_TOKEN), 1.0)
    ticket_clock = FakeClock()
    registry = prometheus_client.CollectorRegistry()
    signins = SignIns(store, SecretKey(new_key_material(), "test"))
    manager = SessionManager(
        config,
        store,
        driver,
        catalogue,
        tickets=TicketBook(clock=ticket_clock),
        registry=registry,
        signins=signins,
    )
    await manager.start()
    identity = Identity.of_store(store, manager.tickets, allowed_origins=config.allowed_origins)
    app = create_app(
        manager,
        identity,
        registry=registry,
        limiter=LoginRateLimiter(max_failures=3, window=60),
        dashboard=False,
    )
    socket_path = tmp_path / "api.sock"
    server = uvicorn.Server(
        uvicorn.Config(app, uds=str(socket_path), lifespan="off", log_config=None, ws="none")
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5000 * MS):
        while not server.started:
            await asyncio.sleep(0)
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://controller", timeout=5000 * MS
    ) as client:
        viewers = ViewerAccess(identity, manager)
        yield Harness(
            config, store, driver, manager, client, ticket_clock, socket_path, viewers, signins
        )
    await manager.close()
    server.should_exit = True
    await task
    store.close()


def base_config(tmp_path: Path) -> ControllerConfig:
    return ControllerConfig(
        data_dir=tmp_path,
        max_sessions=4,  # a user alone may hold 4 // 2 = 2 (the fair share, remotecli.quotas)
        max_sessions_per_user=2,
        session_ttl=0,
        idle_stop=0,
        reap_interval=3600,
    )


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Harness]:
    catalogue = Catalogue(extra_bin_dirs=[])
    async for harness in start_harness(tmp_path, base_config(tmp_path), BannerDriver(), catalogue):
        yield harness


# --- auth ----------------------------------------------------------------------------------------


async def test_no_credentials_is_401(api: Harness) -> None:
    """Every /api call without a token or cookie answers 401 with a JSON error."""
    for method, path in [("GET", "/api/sessions"), ("GET", "/api/providers")]:
        response = await api.client.request(method, path)
        assert response.status_code == 401
        assert response.json()["error"] == "not_authenticated"
        assert "Bearer" in response.json()["message"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    response = await api.client.post("/api/sessions", json={"provider": "shell"})
    assert response.status_code == 401


async def test_wrong_tokens_are_rate_limited(api: Harness) -> None:
    """Three wrong tokens from one address get 401s, then 429; the right token still works."""
    headers = {"X-Forwarded-For": "192.0.2.7"}
    for _ in range(3):
        response = await api.client.get(
            "/api/sessions", headers={**headers, **api.auth("wrong-token")}
        )
        assert response.status_code == 401
    valid = await api.client.get("/api/sessions", headers={**headers, **api.auth()})
    assert valid.status_code == 200
    response = await api.client.get("/api/sessions", headers={**headers, **api.auth("wrong-token")})
    assert response.status_code == 429
    assert response.json()["error"] == "too_many_requests"
    assert int(response.headers["retry-after"]) > 0
    other = await api.client.get(
        "/api/sessions", headers={"X-Forwarded-For": "192.0.2.8", **api.auth()}
    )
    assert other.status_code == 200


async def test_rate_limit_counts_the_client_behind_a_trusted_proxy(tmp_path: Path) -> None:
    """Behind a trusted proxy, failures count per real client, not per proxy address."""
    config = replace(base_config(tmp_path), trusted_proxies=("10.0.0.0/8",))
    async for api in start_harness(tmp_path, config, BannerDriver(), Catalogue()):
        for _ in range(3):
            wrong = {"X-Forwarded-For": "192.0.2.7, 10.1.1.1", **api.auth("wrong-token")}
            assert (await api.client.get("/api/sessions", headers=wrong)).status_code == 401
        blocked = {"X-Forwarded-For": "192.0.2.7, 10.1.1.1", **api.auth("wrong-token")}
        assert (await api.client.get("/api/sessions", headers=blocked)).status_code == 429
        other = {"X-Forwarded-For": "192.0.2.8, 10.1.1.1", **api.auth("wrong-token")}
        assert (await api.client.get("/api/sessions", headers=other)).status_code == 401


async def test_login_sets_strict_httponly_cookie(api: Harness) -> None:
    """/login?token= redirects to the dashboard with an HttpOnly SameSite=Strict cookie."""
    response = await api.client.get("/login", params={"token": ADMIN_TOKEN})
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/remote-cli"
    cookie = response.headers["set-cookie"]
    value = cookie.split(";", 1)[0].removeprefix(f"{COOKIE_NAME}=")
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert value
    assert ADMIN_TOKEN not in cookie  # a login of its own, not the token
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Secure" not in cookie
    listed = await api.client.get("/api/sessions", headers={"Cookie": f"{COOKIE_NAME}={value}"})
    assert listed.status_code == 200
    token_as_cookie = await api.client.get(
        "/api/sessions", headers={"Cookie": f"{COOKIE_NAME}={ADMIN_TOKEN}"}
    )
    assert token_as_cookie.status_code == 401


async def test_sign_out_ends_the_login_on_the_server(api: Harness) -> None:
    """POST /api/logout clears the cookie and the server forgets the login: replaying it is 401."""
    cookie = await api.login_cookie()
    me = await api.client.get("/api/me", headers={"Cookie": cookie})
    assert me.json() == {"name": "admin", "signed_in_with": "login"}
    out = await api.client.post("/api/logout", headers={"Cookie": cookie})
    assert out.status_code == 204
    assert 'remotecli_login=""' in out.headers["set-cookie"]
    assert "Max-Age=0" in out.headers["set-cookie"]
    replay = await api.client.get("/api/sessions", headers={"Cookie": cookie})
    assert replay.status_code == 401
    assert "login ended" in replay.json()["message"]
    # The token itself still works, and signing out twice is harmless.
    assert (await api.client.get("/api/sessions", headers=api.auth())).status_code == 200
    assert (await api.client.post("/api/logout", headers={"Cookie": cookie})).status_code == 204


async def test_login_over_https_sets_secure_cookie(api: Harness) -> None:
    """Behind TLS (the gateway says X-Forwarded-Proto: https) the cookie is also Secure."""
    response = await api.client.get(
        "/login", params={"token": ADMIN_TOKEN}, headers={"X-Forwarded-Proto": "https"}
    )
    assert "Secure" in response.headers["set-cookie"]


async def test_login_with_wrong_token_is_401(api: Harness) -> None:
    """A wrong login token sets no cookie and answers 401."""
    response = await api.client.get("/login", params={"token": "nope"})
    assert response.status_code == 401
    assert "set-cookie" not in response.headers


# --- sessions ------------------------------------------------------------------------------------


async def test_create_streams_progress_until_ready(api: Harness) -> None:
    """POST /api/sessions is 201 pending; its SSE stream shows progress and reaches ready."""
    session = await api.create()
    assert session["state"] == "pending"
    assert session["provider"] == "shell"
    assert session["vnc_path"] == f"/api/sessions/{session['id']}/vnc"
    await api.wait_state(session["id"], State.READY)
    got = (await api.client.get(f"/api/sessions/{session['id']}", headers=api.auth())).json()
    assert got["state"] == "ready"
    assert got["ready_at"] is not None
    spec = api.driver.specs[session["id"]]
    assert Path(spec.command[0]).name == "bash"
    assert spec.workdir == api.config.data_dir / "sessions" / session["id"]


async def test_events_report_progress_with_elapsed_time(api: Harness) -> None:
    """The stream carries the driver's progress steps with elapsed seconds, ending when final."""
    api.driver.gate = asyncio.Event()
    session = await api.create()
    reader = asyncio.create_task(api.events(session["id"]))
    await until(lambda: api.manager.events.subscriber_count(session["id"]) == 1)
    api.driver.gate.set()
    await api.wait_state(session["id"], State.READY)
    await api.client.delete(f"/api/sessions/{session['id']}", headers=api.auth())
    events = await asyncio.wait_for(reader, 5000 * MS)
    progress = [e["message"] for e in events if e["event"] == "progress"]
    assert "VNC banner read" in progress
    states = [e["state"] for e in events if e["event"] == "state"]
    assert states[-3:] == ["ready", "stopping", "stopped"]
    assert all(e["elapsed"] >= 0 for e in events)


async def test_delete_stops_the_session(api: Harness) -> None:
    """DELETE stops the sandbox and answers the session as stopped; a second DELETE is a no-op."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    response = await api.client.delete(f"/api/sessions/{session['id']}", headers=api.auth())
    assert response.status_code == 200
    assert response.json()["state"] == "stopped"
    assert response.json()["reason"] == "deleted by its owner"
    assert api.driver.running() == []
    again = await api.client.delete(f"/api/sessions/{session['id']}", headers=api.auth())
    assert again.status_code == 200
    assert again.json()["state"] == "stopped"


async def test_delete_while_starting_cancels_the_start(api: Harness) -> None:
    """Deleting a session that is still starting cancels the start and ends stopped."""
    api.driver.gate = asyncio.Event()
    session = await api.create()
    await api.wait_state(session["id"], State.STARTING)
    response = await api.client.delete(f"/api/sessions/{session['id']}", headers=api.auth())
    assert response.json()["state"] == "stopped"
    assert api.driver.running() == []


async def test_crash_marks_failed_with_reason(api: Harness) -> None:
    """When the sandbox dies by itself the session becomes failed with the driver's reason."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    api.driver.crash(session["id"], "Xvfb exited with status 1")
    events = await api.events(session["id"])
    assert events[-1]["state"] == "failed"
    assert "Xvfb exited with status 1" in events[-1]["reason"]
    got = (await api.client.get(f"/api/sessions/{session['id']}", headers=api.auth())).json()
    assert got["state"] == "failed"
    assert "Xvfb exited" in got["reason"]


async def test_others_sessions_are_404(api: Harness) -> None:
    """Someone else's session is invisible: GET, DELETE, ticket, events and list say 404/empty."""
    session = await api.create()
    sid = session["id"]
    bob = api.auth(BOB_TOKEN)
    assert (await api.client.get(f"/api/sessions/{sid}", headers=bob)).status_code == 404
    assert (await api.client.delete(f"/api/sessions/{sid}", headers=bob)).status_code == 404
    assert (await api.client.post(f"/api/sessions/{sid}/ticket", headers=bob)).status_code == 404
    assert (await api.client.get(f"/api/sessions/{sid}/events", headers=bob)).status_code == 404
    assert (await api.client.get(f"/api/auth/session/{sid}", headers=bob)).status_code == 404
    assert (await api.client.get("/api/sessions", headers=bob)).json() == []
    missing = await api.client.get("/api/sessions/doesnotexist", headers=api.auth())
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


@pytest.mark.parametrize("session_id", ["a" * 65, "bad.id", "x%20y", "%2e%2e"])
async def test_malformed_session_ids_are_422(api: Harness, session_id: str) -> None:
    """Session ids outside [A-Za-z0-9_-]{1,64} are refused before reaching the store."""
    response = await api.client.get(f"/api/sessions/{session_id}", headers=api.auth())
    assert response.status_code == 422
    assert response.json()["error"] == "unprocessable"


@pytest.mark.parametrize(
    "body", [{"provider": "Shell"}, {"provider": "../bin/sh"}, {}, {"provider": "shell", "x": 1}]
)
async def test_malformed_create_bodies_are_422(api: Harness, body: dict[str, object]) -> None:
    """A provider name outside the pattern, a missing one or an unknown field is a 422."""
    response = await api.client.post("/api/sessions", json=body, headers=api.auth())
    assert response.status_code == 422


async def test_uninstalled_provider_is_422_with_hint(tmp_path: Path) -> None:
    """A provider whose program is missing is listed unavailable and creating it is a 422."""
    catalogue = Catalogue(search_path=str(tmp_path / "empty"), extra_bin_dirs=[])
    async for api in start_harness(tmp_path, base_config(tmp_path), BannerDriver(), catalogue):
        providers = (await api.client.get("/api/providers", headers=api.auth())).json()
        claude = next(p for p in providers if p["name"] == "claude-code")
        assert claude["available"] is False
        assert "npm install -g @anthropic-ai/claude-code" in claude["hint"]
        response = await api.client.post(
            "/api/sessions", json={"provider": "claude-code"}, headers=api.auth()
        )
        assert response.status_code == 422
        assert "npm install -g @anthropic-ai/claude-code" in response.json()["message"]


async def test_per_user_limit_is_429_and_host_limit_503(api: Harness) -> None:
    """Past 2 active sessions a user gets 429; past 4 on the host anyone gets 503."""
    await api.create()
    await api.create()
    response = await api.client.post(
        "/api/sessions", json={"provider": "shell"}, headers=api.auth()
    )
    assert response.status_code == 429
    assert "limit per user" in response.json()["message"]
    await api.create(token=BOB_TOKEN)
    # Two users never fill the host (each holds at most its fair share): a third one does.
    carol = "carol-token-0123456789abcdef"
    api.store.add_token("carol", hash_token(carol), 1.0)
    await api.create(token=carol)
    response = await api.client.post(
        "/api/sessions", json={"provider": "shell"}, headers=api.auth(BOB_TOKEN)
    )
    assert response.status_code == 503
    assert "REMOTECLI_MAX_SESSIONS" in response.json()["message"]


async def test_driver_failure_marks_failed(tmp_path: Path) -> None:
    """A driver that cannot start leaves the session failed with the driver's message."""
    driver = BannerDriver(fail_start="Xvfb is not installed; run make up")
    async for api in start_harness(tmp_path, base_config(tmp_path), driver, Catalogue()):
        session = await api.create()
        events = await api.events(session["id"])
        assert events[-1]["state"] == "failed"
        assert events[-1]["reason"] == "Xvfb is not installed; run make up"


# --- tickets and the VNC authorizer --------------------------------------------------------------


async def test_ticket_opens_once(api: Harness) -> None:
    """A ticket from the API authorizes one VNC upgrade; reusing it is refused (403)."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    response = await api.client.post(f"/api/sessions/{session['id']}/ticket", headers=api.auth())
    assert response.status_code == 200
    ticket = response.json()["ticket"]
    assert response.json()["expires_in"] == 60
    assert response.json()["vnc_path"].endswith(f"?ticket={ticket}")
    target = await api.viewers.authorize_vnc(
        session["id"], cookie_header=None, origin=None, host=HOST, ticket=ticket
    )
    assert target.owner == "admin"
    assert target.endpoint.port is not None
    with pytest.raises(Forbidden, match="already used"):
        await api.viewers.authorize_vnc(
            session["id"], cookie_header=None, origin=None, host=HOST, ticket=ticket
        )


async def test_expired_ticket_refused(api: Harness) -> None:
    """A ticket used 60 s after it was issued is refused (403)."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    ticket = (
        await api.client.post(f"/api/sessions/{session['id']}/ticket", headers=api.auth())
    ).json()["ticket"]
    api.ticket_clock.now += 60
    with pytest.raises(Forbidden, match="expired"):
        await api.viewers.authorize_vnc(
            session["id"], cookie_header=None, origin=None, host=HOST, ticket=ticket
        )


async def test_cookie_needs_allowed_origin(api: Harness) -> None:
    """The login cookie opens the stream from the same origin only; no credentials is 401."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    cookie = await api.login_cookie()
    sid = session["id"]
    target = await api.viewers.authorize_vnc(
        sid, cookie_header=cookie, origin=f"http://{HOST}", host=HOST, ticket=None
    )
    assert target.session_id == sid
    with pytest.raises(Forbidden):
        await api.viewers.authorize_vnc(
            sid, cookie_header=cookie, origin="http://evil.example", host=HOST, ticket=None
        )
    with pytest.raises(NotAuthenticated):
        await api.viewers.authorize_vnc(
            sid, cookie_header=None, origin=None, host=HOST, ticket=None
        )
    with pytest.raises(NotAuthenticated):
        await api.viewers.authorize_vnc(
            sid,
            cookie_header=f"{COOKIE_NAME}=wrong",
            origin=f"http://{HOST}",
            host=HOST,
            ticket=None,
        )
    bob_cookie = await api.login_cookie(BOB_TOKEN)
    with pytest.raises(NotFound):
        await api.viewers.authorize_vnc(
            sid, cookie_header=bob_cookie, origin=f"http://{HOST}", host=HOST, ticket=None
        )


async def test_vnc_refused_while_starting(api: Harness) -> None:
    """A session that is not ready yet refuses the stream with 409."""
    api.driver.gate = asyncio.Event()
    session = await api.create()
    await api.wait_state(session["id"], State.STARTING)
    ticket = (
        await api.client.post(f"/api/sessions/{session['id']}/ticket", headers=api.auth())
    ).json()["ticket"]
    with pytest.raises(Conflict, match="not ready"):
        await api.viewers.authorize_vnc(
            session["id"], cookie_header=None, origin=None, host=HOST, ticket=ticket
        )
    api.driver.gate.set()


async def test_compat_path_reports_health(api: Harness) -> None:
    """GET /api/auth/session/{id} returns the session with healthy=true once ready."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    body = (await api.client.get(f"/api/auth/session/{session['id']}", headers=api.auth())).json()
    assert body["healthy"] is True
    assert body["state"] == "ready"
    assert body["novnc_path"] == f"/api/auth/session/{session['id']}/novnc/websock"


# --- operations ----------------------------------------------------------------------------------


async def test_operations_endpoints(api: Harness) -> None:
    """/healthz, /readyz's status and the OpenAPI document answer anyone; /metrics and
    /readyz's details only the admin (a user's token is not enough)."""
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    assert (await api.client.get("/readyz")).json() == {"status": "ready"}
    await api.create()
    anonymous = await api.client.get("/metrics")
    assert anonymous.status_code == 401
    assert "REMOTECLI_METRICS_TOKEN" in anonymous.json()["message"]
    assert (await api.client.get("/metrics", headers=api.auth(BOB_TOKEN))).status_code == 401
    metrics = (await api.client.get("/metrics", headers=api.auth())).text
    assert "remotecli_session_transitions_total" in metrics
    detailed = (await api.client.get("/readyz", headers=api.auth())).json()
    assert detailed["active_sessions"] == 1
    openapi = (await api.client.get("/api/openapi.json")).json()
    for path in [
        "/api/providers",
        "/api/sessions",
        "/api/sessions/{session_id}",
        "/api/sessions/{session_id}/events",
        "/api/sessions/{session_id}/ticket",
        "/api/auth/session/{session_id}",
    ]:
        assert path in openapi["paths"]
    root = await api.client.get("/")
    assert root.status_code == 307
    assert root.headers["location"] == "/dashboard/remote-cli"


# --- restart safety and the reaper ---------------------------------------------------------------


async def test_restart_marks_orphaned_ready_session_failed(api: Harness) -> None:
    """A controller restarting over a ready session whose sandbox is gone marks it failed."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    # A new controller process: its own store connection and a driver that started nothing.
    store = Store.open(api.store.path)
    restarted = SessionManager(
        api.config,
        store,
        BannerDriver(),
        Catalogue(),
        registry=prometheus_client.CollectorRegistry(),
    )
    await restarted.start()
    record = store.session(session["id"])
    assert record.state is State.FAILED
    assert "remote-cli was restarted" in (record.reason or "")
    assert record.end_cause == "restart"
    await restarted.close()
    store.close()


async def test_restart_keeps_a_still_running_session(api: Harness) -> None:
    """A session whose sandbox survived the restart stays ready and is watched again."""
    session = await api.create()
    await api.wait_state(session["id"], State.READY)
    store = Store.open(api.store.path)
    restarted = SessionManager(
        api.config, store, api.driver, Catalogue(), registry=prometheus_client.CollectorRegistry()
    )
    await restarted.start()
    assert store.session(session["id"]).state is State.READY
    assert restarted.watched(session["id"])
    api.driver.crash(session["id"], "x11vnc exited")
    await api.wait_state(session["id"], State.FAILED)
    await restarted.close()
    store.close()


async def test_reaper_enforces_ttl_and_idle(tmp_path: Path) -> None:
    """The reaper stops sessions past their TTL, and ready ones with no viewer for too long."""
    clock = FakeClock()
    config = replace(
        base_config(tmp_path), session_ttl=3600, idle_stop=600, max_sessions_per_user=5
    )
    store = Store.open(tmp_path / "reaper.sqlite3")
    store.add_user("alice", 0)
    driver = BannerDriver()
    manager = SessionManager(
        config,
        store,
        driver,
        Catalogue(),
        clock=clock,
        registry=prometheus_client.CollectorRegistry(),
    )
    await manager.start()
    watched = manager.create("alice", "shell")
    idle = manager.create("alice", "shell")
    await until(lambda: len(driver.started) == 2)
    manager.viewer_attached(watched.id)
    clock.now += 599
    assert await manager.reap() == []
    clock.now += 1
    assert await manager.reap() == [idle.id]
    assert store.session(idle.id).reason == "no viewer was attached for 10 min"
    assert store.session(watched.id).state is State.READY
    manager.viewer_detached(watched.id, 10, 20)
    assert store.session(watched.id).bytes_out == 20
    clock.now += 3000
    assert await manager.reap() == [watched.id]
    assert store.session(watched.id).reason == "its time to live (1 h) ran out"
    assert driver.running() == []
    await manager.close()
    store.close()


async def test_shutdown_stops_every_session(api: Harness) -> None:
    """Closing the manager stops every active session and refuses new ones with 503."""
    first = await api.create()
    second = await api.create(token=BOB_TOKEN)
    await api.wait_state(first["id"], State.READY)
    await api.manager.close()
    assert api.driver.running() == []
    assert api.store.session(first["id"]).state is State.STOPPED
    assert api.store.session(second["id"]).state in (State.STOPPED, State.FAILED)
    response = await api.client.post(
        "/api/sessions", json={"provider": "shell"}, headers=api.auth()
    )
    assert response.status_code == 503


# --- hibernation through the API and the viewer access -----------------------------------------


async def test_hibernate_and_resume_endpoints(api: Harness) -> None:
    """POST .../hibernate answers the session hibernated; POST .../resume answers it ready again;
    hibernating a session on a driver that cannot is 409."""
    api.driver.hibernatable = True
    session = await api.create()
    sid = session["id"]
    await api.wait_state(sid, State.READY)
    response = await api.client.post(f"/api/sessions/{sid}/hibernate", headers=api.auth())
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "hibernated"
    listed = (await api.client.get("/api/sessions", headers=api.auth())).json()
    assert [s["state"] for s in listed if s["id"] == sid] == ["hibernated"]
    response = await api.client.post(f"/api/sessions/{sid}/resume", headers=api.auth())
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "ready"
    api.driver.hibernatable = False
    response = await api.client.post(f"/api/sessions/{sid}/hibernate", headers=api.auth())
    assert response.status_code == 409
    assert "cannot hibernate" in response.json()["message"]


async def test_a_viewer_resumes_a_hibernated_session(api: Harness) -> None:
    """Authorizing a VNC viewer for a hibernated session resumes it and returns the new
    endpoint; another user's viewer gets 404 and resumes nothing."""
    api.driver.hibernatable = True
    session = await api.create()
    sid = session["id"]
    await api.wait_state(sid, State.READY)
    old = api.store.session(sid).endpoint
    assert await api.manager.hibernate(sid)
    bob_cookie = await api.login_cookie(BOB_TOKEN)
    with pytest.raises(NotFound):
        await api.viewers.authorize_vnc(
            sid, cookie_header=bob_cookie, origin=f"http://{HOST}", host=HOST, ticket=None
        )
    assert api.store.session(sid).state is State.HIBERNATED
    ticket = (await api.client.post(f"/api/sessions/{sid}/ticket", headers=api.auth())).json()
    target = await api.viewers.authorize_vnc(
        sid, cookie_header=None, origin=None, host=HOST, ticket=ticket["ticket"]
    )
    assert api.store.session(sid).state is State.READY
    assert target.endpoint != old
    assert target.endpoint == api.store.session(sid).endpoint
